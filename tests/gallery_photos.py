"""Fixtures shared by the database gallery tests (tests/test_vectordb.py, tests/test_milvus_server.py):
folders of tiny photos whose category names hold what broke Milvus expressions, and the model
key they are indexed under."""

import numpy as np
from PIL import Image

IMAGE_SIZE = 32
KEY = "sha256-of-a-checkpoint"
ADVERSARIAL = ['Kid\'s "B" shoes', 'A" or category != "', "back\\slash"]


def write_image(path, seed):
    """A 40×40 RGB PNG of noise with a flat corner, different for each seed."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
    pixels[:20, :20] = rng.integers(0, 256, size=3, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def make_folder(root, n=30):
    """n photos over the adversarial category names, one with a newline and CR, and a plain
    one ("mugs"), two levels down."""
    names = ADVERSARIAL + ["new\nline\r", "mugs"]
    for i in range(n):
        write_image(root / names[i % len(names)] / f"p{i // 8}" / f"img{i:04d}.png", i)
    return root
