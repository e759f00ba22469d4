"""Near-identity in pixels: is one photo a copy of another, up to crop, resize, re-encoding and
brightness / contrast?

An embedding places two different photos of look-alike products as close as a photo and its
re-encoded crop, so the audit confirms each duplicate candidate here. A photo's signature is
its grey thumbnail (`SIDE` x `SIDE`) whole and cropped to 85%, 90% and 95% of each side at nine
places (corners, edge middles, centre: 28 views), each normalised to zero mean and unit norm; the
similarity of photos a and b is the best normalised cross-correlation between one's whole view
and any view of the other (`similarity`), so a copy cropped by up to ~15% at any of those places
aligns with its original. Brightness and contrast changes cancel in the normalisation.
"""

import numpy as np
from PIL import Image

from dataio import photos

SIDE = 24  # thumbnail side: coarse enough to ignore JPEG noise, fine enough to tell labels apart
CROPS = (0.85, 0.9, 0.95)
PLACES = tuple((x, y) for y in (0.0, 0.5, 1.0) for x in (0.0, 0.5, 1.0))  # corners, edge middles, centre


def signature(image: Image.Image) -> np.ndarray:
    """float32 [28, SIDE * SIDE]: the normalised whole view first, then the 27 crops."""
    grey = image.convert("L")
    w, h = grey.size
    views = [grey]
    for f in CROPS:
        cw, ch = max(1, round(w * f)), max(1, round(h * f))
        for px, py in PLACES:
            left, top = round((w - cw) * px), round((h - ch) * py)
            views.append(grey.crop((left, top, left + cw, top + ch)))
    arr = np.stack([np.asarray(v.resize((SIDE, SIDE), Image.BILINEAR), np.float32).reshape(-1) for v in views])
    arr -= arr.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(arr, axis=1, keepdims=True)
    return arr / np.maximum(norm, 1e-6)  # a flat image: all zeros, similar to nothing


def file_signature(path) -> np.ndarray:
    """`signature` of an image file (decoded small: JPEG draft mode)."""
    return signature(photos.load_image(path, size=4 * SIDE))


def similarity(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Best normalised cross-correlation of a's whole view with any view of b, and of b's whole
    view with any view of a (1.0 for identical photos; symmetric)."""
    return float(max((sig_b @ sig_a[0]).max(), (sig_a @ sig_b[0]).max()))
