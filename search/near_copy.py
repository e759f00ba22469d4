"""Near-identity in pixels: is one photo a copy of another, up to crop, resize, re-encoding and
brightness / contrast?

An embedding places two different photos of look-alike products (or two frames of one video) as
close as a photo and its re-encoded crop, so the audit confirms each duplicate candidate here.

`similarity(a, b)` is the normalised cross-correlation (NCC) of a's whole grey image with the
best-aligned crop of b, or of b's with a crop of a, whichever is higher (1.0 for identical
photos; symmetric). The crop is found coarse to fine: the best of the whole image and crops
keeping 85, 90 and 95% of each side at nine places (corners, edge middles, centre), then each
edge of that box moved by sub-pixel steps while the NCC rises (`align`). Both sides are compared
at `SIDE` pixels or at the smaller photo's own size when that is smaller (`compare_side`), so a
small copy is not judged on detail neither photo has. Brightness and contrast changes cancel in
the normalisation; what is left of a real copy is re-encoding noise, while two different photos
(a later frame, the same product held otherwise) differ in structure that alignment cannot undo.

`coarse_similarity` of two `signature` s is the same comparison on the fixed grid of crops at
24 px, without the alignment: a cheap first check that leaves `similarity` only the pairs worth
aligning.
"""

import numpy as np
from PIL import Image

from dataio import photos

SIDE = 64  # comparison side: fine enough to tell two frames of one video apart
CROPS = (0.85, 0.9, 0.95, 1.0)
PLACES = tuple((x, y) for y in (0.0, 0.5, 1.0) for x in (0.0, 0.5, 1.0))  # corners, edge middles, centre
STEPS = (2.0, 1.0, 0.5, 0.25)  # edge moves of the fine alignment, in pixels of the cropped photo
MIN_KEEP = 0.5  # the aligned crop keeps at least half of each side


def grey(image: Image.Image) -> Image.Image:
    """The photo as the comparison sees it: 8-bit grey."""
    return image.convert("L")


def load_grey(path, side=SIDE) -> Image.Image:
    """A photo file as `grey`, its smaller side at most 4 x ``side`` (a JPEG decoded small; any
    other format resized after decoding): what the comparison needs, and a bounded size to cache."""
    image = grey(photos.load_image(path, size=4 * side))
    scale = 4 * side / min(image.size)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)
    return image


def compare_side(a: Image.Image, b: Image.Image, side=SIDE) -> int:
    """The side both photos are compared at: ``side``, or the smallest side of the two when smaller."""
    return max(1, min(side, *a.size, *b.size))


def unit(image: Image.Image) -> np.ndarray:
    """The pixels as a zero-mean, unit-norm vector (all zeros for a flat image: similar to nothing)."""
    v = np.asarray(image, np.float32).reshape(-1)
    v = v - v.mean()
    return v / max(float(np.linalg.norm(v)), 1e-6)


def crop_score(target: np.ndarray, b: Image.Image, box, side: int) -> float:
    """NCC of ``target`` (a `unit` vector at ``side``) with the ``box`` of ``b`` resized to ``side``."""
    return float(target @ unit(b.resize((side, side), Image.BILINEAR, box=tuple(box))))


def grid_boxes(w: float, h: float):
    """The coarse crops of a ``w`` x ``h`` photo: `CROPS` of each side at each of `PLACES`."""
    for f in CROPS:
        cw, ch = w * f, h * f
        for px, py in PLACES:
            left, top = (w - cw) * px, (h - ch) * py
            yield [left, top, left + cw, top + ch]


def valid(box, w: float, h: float) -> bool:
    return (
        box[0] >= 0
        and box[1] >= 0
        and box[2] <= w
        and box[3] <= h
        and box[2] - box[0] >= w * MIN_KEEP
        and box[3] - box[1] >= h * MIN_KEEP
    )


def align(a: Image.Image, b: Image.Image, side: int) -> float:
    """The best NCC of a's whole image with a crop of b (coarse grid, then edge moves)."""
    target = unit(a.resize((side, side), Image.BILINEAR))
    w, h = b.size
    score, box = max((crop_score(target, b, box, side), box) for box in grid_boxes(w, h))
    for step in STEPS:
        moved = True
        while moved:
            moved = False
            for edge in range(4):
                for delta in (-step, step):
                    trial = list(box)
                    trial[edge] += delta
                    if not valid(trial, w, h):
                        continue
                    s = crop_score(target, b, trial, side)
                    if s > score + 1e-6:
                        score, box, moved = s, trial, True
    return score


# ---- the coarse check: a cheap filter before `similarity` (one signature per photo, a dot product a pair)
COARSE_SIDE = 24


def signature(image: Image.Image) -> np.ndarray:
    """float32 [1 + 27, COARSE_SIDE ** 2]: the `unit` grey thumbnails of the whole photo, then of the
    crops keeping 85, 90 and 95% of each side at the nine `PLACES`."""
    g = grey(image)
    w, h = g.size
    boxes = [box for box in grid_boxes(w, h) if box[2] - box[0] < w]  # the crops; the whole photo first
    views = [g.resize((COARSE_SIDE, COARSE_SIDE), Image.BILINEAR)]
    views += [g.resize((COARSE_SIDE, COARSE_SIDE), Image.BILINEAR, box=tuple(box)) for box in boxes]
    return np.stack([unit(v) for v in views])


def coarse_similarity(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """The best NCC of one photo's whole thumbnail with any view of the other's (`signature`), either
    way round: `similarity` on a fixed grid of crops at `COARSE_SIDE` px, without its alignment."""
    return float(max((sig_b @ sig_a[0]).max(), (sig_a @ sig_b[0]).max()))


def similarity(a: Image.Image, b: Image.Image, side=SIDE) -> float:
    """Near-copy similarity of two photos (module docstring): in [-1, 1], 1.0 for identical ones."""
    a, b = grey(a), grey(b)
    n = compare_side(a, b, side)
    return max(align(a, b, n), align(b, a, n))
