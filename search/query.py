"""A query as the demo takes it: an uploaded file decoded safely into an RGB image, or refused
with a `QueryError` whose message is for the user (`load_query_image`), and the checks of its
K (`clamp_k`) and category filter (`category_to_super_id`, `category_choices`)."""

import math
import os

import numpy as np
from PIL import Image

from dataio import photos

CATEGORY_ALL = "All"
DEFAULT_K = 10
MAX_K = 50
# Formats a query may have. Decoding others (EPS runs Ghostscript, ...) is refused up front.
QUERY_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF")


class QueryError(ValueError):
    """A query the demo refuses; the message is meant for the user and is shown as is."""


# ============ query decoding ============


def load_query_image(path, max_pixels=40_000_000, draft_size=None):
    """Decode an uploaded file into an upright RGB PIL image, or raise QueryError saying why.

    Checks, in order, before any pixel data is decoded: the file exists and is not empty;
    Pillow recognises it as one of QUERY_FORMATS; width × height <= ``max_pixels`` (a PNG
    can declare 50,000 × 50,000 in a 100-byte file). Decoding is `photos.load_image` — the
    gallery's own loader, so a gallery photo uploaded as a query embeds exactly as in the
    index: JPEG draft mode at ``draft_size``, EXIF orientation applied, palette / alpha /
    LA / CMYK / 16-bit grey converted to RGB (transparency onto white).
    """
    try:
        size = os.path.getsize(path)
    except OSError:
        raise QueryError("The uploaded file could not be found on the server; upload it again.") from None
    if size == 0:
        raise QueryError("The uploaded file is empty (0 bytes). Upload a JPEG, PNG or WebP photo.")
    try:
        with Image.open(path) as im:  # reads the header only
            fmt, (w, h) = im.format, im.size
    except Image.DecompressionBombError:
        raise QueryError(
            f"The image declares too many pixels (more than {max_pixels / 1e6:.0f} megapixels); upload a smaller photo."
        ) from None
    except Exception:  # UnidentifiedImageError, SyntaxError, struct errors of broken headers
        raise QueryError("This file is not an image Pillow can read. Upload a JPEG, PNG or WebP photo.") from None
    if fmt not in QUERY_FORMATS:
        raise QueryError(f"{fmt} files are not accepted; upload a JPEG, PNG, WebP, GIF, BMP or TIFF photo.")
    if w < 1 or h < 1:
        raise QueryError(f"The image has no pixels ({w}×{h}).")
    if w * h > max_pixels:
        raise QueryError(
            f"The image is {w}×{h} pixels ({w * h / 1e6:.0f} megapixels); the limit "
            f"is {max_pixels / 1e6:.0f} megapixels. Upload a smaller photo."
        )
    try:
        return photos.load_image(path, size=draft_size)
    except Exception as e:  # whatever a broken file makes a Pillow plugin raise is the file's fault
        truncated = "truncated" in str(e).lower() or isinstance(e, (EOFError, SyntaxError))
        raise QueryError(
            "The image file is truncated or corrupt: it could not be decoded completely. "
            "Upload the photo again or use another one."
            if truncated
            else f"The image could not be decoded ({type(e).__name__}). Upload another photo."
        ) from None


def category_choices(index):
    """The category filter's choices: "All", then the gallery's category names (the data's:
    SOP's 12, a catalogue's own, or a --gallery folder's first level) that hold an image."""
    present = set(np.unique(index.super_ids).tolist())
    return [CATEGORY_ALL] + [c for i, c in enumerate(index.categories, start=1) if i in present]


def category_to_super_id(category, categories):
    """ "All" / None → None (whole gallery); a name among ``categories`` (the index's) → its
    1-based super id; anything else is a QueryError listing the choices."""
    if category in (None, "", CATEGORY_ALL):
        return None
    if category not in categories:
        shown = ", ".join([CATEGORY_ALL, *categories[:30]]) + (" ..." if len(categories) > 30 else "")
        raise QueryError(f"Unknown category {category!r}; choose one of: {shown}.")
    return categories.index(category) + 1


def clamp_k(k):
    """K as an int in 1..MAX_K (the slider's range); non-numbers are refused."""
    try:
        k = float(k)
    except (TypeError, ValueError):
        raise QueryError(f"K must be a number between 1 and {MAX_K}, got {k!r}.") from None
    if not math.isfinite(k):
        raise QueryError(f"K must be a number between 1 and {MAX_K}, got {k!r}.")
    return int(min(max(round(k), 1), MAX_K))
