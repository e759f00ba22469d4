"""dataio/photos.py: decoding memory of 16-bit and CMYK photos against the 8-bit RGB photo of
the same size, measured as the peak resident memory of a fresh process (an upload within the
pixel cap must not cost several times what its RGB image does)."""

from pathlib import Path
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from dataio import photos

REPO = Path(__file__).resolve().parents[1]
W, H = 4000, 3000  # 12 megapixels: 48 MB as PIL's RGB (4 bytes a pixel)

# VmHWM (this process's peak resident memory), not ru_maxrss: Linux carries ru_maxrss over
# from the parent across fork + exec, so a child of a large pytest would never exceed it
PEAK = """
import sys
sys.path.insert(0, {repo!r})
from dataio import photos
from PIL import Image

def peak_kb():
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0])

Image.open({path!r}).close()
before = peak_kb()
im = photos.load_image({path!r})
assert im.mode == "RGB" and im.size == ({w}, {h})
print(peak_kb() - before)
"""


def decode_peak_kb(path):
    code = PEAK.format(repo=str(REPO), path=str(path), w=W, h=H)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return int(out.stdout.strip())


@pytest.fixture(scope="module")
def big_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    grey16 = (rng.integers(0, 65536, (H // 8, W // 8), dtype=np.uint32) * 1).astype(np.uint16)
    grey16 = np.kron(grey16, np.ones((8, 8), np.uint16))  # compressible: the test is about decoding
    files = {}
    Image.fromarray(grey16).save(folder / "grey16.png", compress_level=1)
    files["grey16"] = folder / "grey16.png"
    rgb = np.repeat((grey16 >> 8).astype(np.uint8)[..., None], 3, axis=2)
    Image.fromarray(rgb, "RGB").save(folder / "rgb8.png", compress_level=1)
    files["rgb8"] = folder / "rgb8.png"
    Image.fromarray(rgb, "RGB").convert("CMYK").save(folder / "cmyk.jpg", quality=90)
    files["cmyk"] = folder / "cmyk.jpg"
    Image.fromarray(rgb, "RGB").save(folder / "rgb8.jpg", quality=90)
    files["rgb8_jpeg"] = folder / "rgb8.jpg"
    return files


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from Linux's /proc")
def test_16_bit_and_cmyk_decode_within_twice_the_rgb_memory(big_images):
    rgb_png, rgb_jpeg = decode_peak_kb(big_images["rgb8"]), decode_peak_kb(big_images["rgb8_jpeg"])
    assert rgb_png > 30_000  # the measurement sees the 48 MB image at all
    assert decode_peak_kb(big_images["grey16"]) <= 2 * rgb_png
    assert decode_peak_kb(big_images["cmyk"]) <= 2 * rgb_jpeg


def test_16_bit_grey_rescales_like_the_whole_image_computation(tmp_path, monkeypatch):
    """Strips give the numbers of the whole-image formula (division by 257, truncation)."""
    monkeypatch.setattr(photos, "STRIP_PIXELS", 7 * 5)  # several strips, a short last one
    values = (np.arange(7 * 13, dtype=np.uint32) * 719 % 65536).astype(np.uint16).reshape(13, 7)
    Image.fromarray(values).save(tmp_path / "g.png")
    got = np.asarray(photos.load_image(tmp_path / "g.png"))
    want = np.clip(values.astype(np.float64) / 257.0, 0, 255).astype(np.uint8)
    assert got.shape == (13, 7, 3) and (got == want[..., None]).all()
    wide = np.array([[0, 1000, 70000]] * 4, dtype=np.int32)  # 32-bit: scaled by 255 / max
    Image.fromarray(wide).save(tmp_path / "i.png")
    got = np.asarray(photos.load_image(tmp_path / "i.png"))[..., 0]
    assert (got == np.clip(wide * (255.0 / 70000), 0, 255).astype(np.uint8)).all()
