"""Decoding product photos: any PIL mode to RGB, JPEG draft decoding, and the check that every
file of a dataset decodes (in a process pool for large sets)."""

import multiprocessing
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

# Errors that mean "this file is not a readable image" (PIL raises all of these in practice).
IMAGE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


def default_workers():
    """Worker processes of an image job: one a core, at most 8."""
    return min(os.cpu_count() or 1, 8)


def mp_context():
    """The multiprocessing context of image jobs."""
    # fork starts in milliseconds; spawn would re-import torch in every worker.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _to_rgb(im):
    """Any PIL mode → RGB: transparency goes onto white (product photos sit on white),
    16/32-bit and float grey is rescaled to 8 bits instead of being clipped (`_grey_to_l`)."""
    if im.mode == "RGB":
        return im
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if im.mode.startswith("I") or im.mode == "F":
        im = _grey_to_l(im)
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


# rows of a 16/32-bit image rescaled at a time: a float64 copy of a whole 40-megapixel image
# would cost 320 MB, more than the RGB image it becomes (160 MB)
STRIP_PIXELS = 1 << 20


def _grey_to_l(im):
    """A 16/32-bit integer or float grey image as 8-bit L: I;16 divided by 257, others scaled
    by 255 / max when their max exceeds 255, clipped to [0, 255] and truncated; computed in
    strips of `STRIP_PIXELS`, so the extra memory is the L image itself."""
    w, h = im.size
    if im.mode.startswith("I;16"):

        def scale(strip):
            return np.divide(strip, 257.0, out=strip)
    else:
        high = im.getextrema()[1] if w and h else 0
        factor = 255.0 / high if high > 255 else 1.0

        def scale(strip):
            return np.multiply(strip, factor, out=strip)

    out = np.empty((h, w), np.uint8)
    rows = max(1, STRIP_PIXELS // max(w, 1))
    for top in range(0, h, rows):
        strip = np.asarray(im.crop((0, top, w, min(h, top + rows))), dtype=np.float64)
        out[top : top + rows] = np.clip(scale(strip), 0, 255, out=strip)
    return Image.fromarray(out)  # uint8 [H, W]: mode L


def load_image(path, size=None):
    """Open an image file as an RGB PIL image, decoded completely (errors surface here).

    ``size``: the side the caller will resize to. For a JPEG, ``Image.draft`` then lets
    libjpeg decode at 1/2, 1/4 or 1/8 scale whenever both sides stay >= ``size`` — the
    DCT scaling skips most of the decoding work, and no image ends up smaller than the
    resize asks for. The EXIF orientation is applied; palette, alpha, CMYK and 16-bit
    images become RGB (see ``_to_rgb``). Peak memory: the decoded file plus the RGB image
    (a 16-bit grey image's own pixels are freed before its RGB copy is made).
    """
    with Image.open(path) as im:
        if size is not None and im.format == "JPEG":
            im.draft("RGB", (int(size), int(size)))
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode.startswith("I") or im.mode == "F":
            im = _grey_to_l(im)  # before the file's image is released at the end of the block
    return _to_rgb(im)


def check_image(path):
    """None when ``path`` decodes completely, else a short reason (missing, zero-byte, ...)."""
    try:
        if os.path.getsize(path) == 0:
            return "zero-byte file"
        load_image(path)
    except FileNotFoundError:
        return "missing"
    except IMAGE_ERRORS as e:
        return f"{type(e).__name__}: {e}"
    return None


def _check_image_item(path):
    return path, check_image(path)


def scan_bad_images(paths, workers=None, progress=True, desc="verify"):
    """Decode every image in ``paths``; returns ``[(path, reason), ...]`` for the bad ones
    (missing, zero-byte, truncated, not an image), in input order."""
    paths = [str(p) for p in paths]
    workers = default_workers() if workers is None else workers
    bar = dict(total=len(paths), desc=desc, unit="img", disable=not progress, smoothing=0.05)
    if workers <= 1 or len(paths) < 256:
        results = (_check_image_item(p) for p in paths)
        return [(p, r) for p, r in tqdm(results, **bar) if r is not None]
    with mp_context().Pool(workers) as pool:
        results = pool.imap(_check_image_item, paths, chunksize=64)
        return [(p, r) for p, r in tqdm(results, **bar) if r is not None]
