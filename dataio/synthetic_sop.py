"""The synthetic SOP: a deterministic offline stand-in for Stanford Online Products with the
same files, header and folder names (``python datasets.py synthetic --root DIR``).

Each product is a fixed identity: a drawing from its category's shape family (geometry drawn
per product), body/accent colours from a small per-category palette (shared by many products,
so colour alone does not identify one), a surface pattern and optional parts. Each photo of it
is a new view: scale, aspect (viewpoint), mirror, rotation, offset and crop, background,
shadow, lighting, occlusion, noise and JPEG quality.
"""

import io
import math
import os
from pathlib import Path
import shutil

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from dataio.catalogue import EBAY_HEADER, SOP_CATEGORIES
from dataio.fileio import make_tmp_dir, publish_dir, read_marker, write_marker
from dataio.photos import default_workers, mp_context
from dataio.shape_families import FAMILIES, Sketch, draw_op

SYNTHETIC_VERSION = 2  # bump when the renderer changes: a complete folder of another version is regenerated


_COLOURS = {
    "white": (236, 236, 230),
    "cream": (232, 218, 186),
    "beige": (208, 192, 164),
    "black": (34, 34, 38),
    "grey": (126, 128, 134),
    "silver": (188, 192, 200),
    "red": (188, 40, 42),
    "orange": (222, 118, 40),
    "yellow": (228, 196, 58),
    "green": (58, 138, 70),
    "teal": (38, 136, 138),
    "blue": (44, 80, 168),
    "navy": (32, 42, 92),
    "purple": (108, 60, 138),
    "pink": (224, 140, 168),
    "brown": (116, 78, 48),
    "tan": (188, 148, 100),
    "wood": (160, 110, 62),
}
_BODY_PALETTES = {
    "bicycle": ["red", "blue", "black", "white", "green", "yellow", "orange", "silver"],
    "cabinet": ["white", "wood", "brown", "black", "grey", "cream", "navy", "teal"],
    "chair": ["wood", "black", "white", "red", "grey", "blue", "tan", "green"],
    "coffee_maker": ["black", "silver", "white", "red", "grey", "cream"],
    "fan": ["white", "black", "grey", "silver", "blue", "teal"],
    "kettle": ["silver", "white", "black", "red", "cream", "blue", "green"],
    "lamp": ["white", "black", "cream", "beige", "blue", "green", "yellow", "silver"],
    "mug": ["white", "black", "red", "blue", "yellow", "green", "pink", "navy"],
    "sofa": ["grey", "beige", "navy", "brown", "green", "tan", "red", "black"],
    "stapler": ["black", "red", "blue", "silver", "grey", "orange"],
    "table": ["wood", "white", "black", "brown", "tan", "grey"],
    "toaster": ["silver", "black", "red", "white", "cream", "blue"],
}
_PATTERNS = ["solid", "solid", "hstripes", "vstripes", "diagonal", "dots", "checker", "bands", "grid"]
_SIZE_WEIGHTS = np.array([0.13, 0.14, 0.15, 0.14, 0.12, 0.10, 0.07, 0.05, 0.04, 0.03, 0.03])  # 2..12 images


def _jitter(rng, rgb, amount=12):
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _pattern_texture(rng, size, body, second):
    """The product's surface: a size×size RGB image in the product's own frame."""
    kind = _PATTERNS[int(rng.integers(len(_PATTERNS)))]
    # 1-D coordinates that broadcast to size×size: no full grids for stripes
    xx = (np.arange(size, dtype=np.float32) / size)[None, :]
    yy = (np.arange(size, dtype=np.float32) / size)[:, None]
    freq, duty, phase = rng.uniform(4, 12), rng.uniform(0.3, 0.6), rng.uniform(0, 1)
    if kind == "solid":
        mask = np.zeros((1, 1), dtype=bool)
    elif kind == "hstripes":
        mask = (yy * freq + phase) % 1 < duty
    elif kind == "vstripes":
        mask = (xx * freq + phase) % 1 < duty
    elif kind == "diagonal":
        mask = ((xx + rng.choice([-1, 1]) * yy) * freq * 0.7 + phase) % 1 < duty
    elif kind == "dots":
        fx, fy = (xx * freq + phase) % 1 - 0.5, (yy * freq + phase) % 1 - 0.5
        mask = fx * fx + fy * fy < (duty * 0.6) ** 2
    elif kind == "checker":
        f = freq * 0.6
        mask = ((np.floor(xx * f + phase) + np.floor(yy * f + phase)) % 2) == 1
    elif kind == "bands":
        centres = rng.uniform(0.2, 0.8, int(rng.integers(1, 4)))
        width = rng.uniform(0.03, 0.08)
        mask = np.zeros_like(yy, dtype=bool)
        for c in centres:
            mask |= np.abs(yy - c) < width
    else:  # grid
        mask = ((xx * freq + phase) % 1 < duty * 0.35) | ((yy * freq + phase) % 1 < duty * 0.35)
    mask = np.broadcast_to(mask, (size, size))
    arr = np.where(mask[..., None], np.asarray(second, np.uint8), np.asarray(body, np.uint8))
    return Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8), "RGB")


def _render_product(category, rng, size):
    """The product's identity: an RGBA sprite of ``size``×``size`` pixels."""
    names = list(_COLOURS)
    body = _jitter(rng, _COLOURS[_BODY_PALETTES[category][int(rng.integers(len(_BODY_PALETTES[category])))]])
    accent = _jitter(rng, _COLOURS[names[int(rng.integers(len(names)))]])
    second = _jitter(rng, _COLOURS[names[int(rng.integers(len(names)))]])
    roles = {
        "body": body,
        "accent": accent,
        "dark": _jitter(rng, [(30, 30, 32), (58, 46, 40), (70, 72, 78)][int(rng.integers(3))], 6),
        "metal": _jitter(rng, [(180, 184, 192), (150, 152, 158), (205, 185, 130)][int(rng.integers(3))], 8),
        "light": _jitter(rng, [(222, 236, 244), (246, 236, 196)][int(rng.integers(2))], 6),
    }
    sketch = Sketch(rng)
    FAMILIES[category](sketch)
    texture = _pattern_texture(rng, size, body, second)

    sprite = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    body_mask = Image.new("L", (size, size), 0)
    sprite_draw, mask_draw = ImageDraw.Draw(sprite), ImageDraw.Draw(body_mask)
    for layer in ("back", "body", "front"):
        for op_layer, kind, xy, role, kw in sketch.ops:
            if op_layer != layer:
                continue
            if layer == "body":
                draw_op(mask_draw, kind, xy, 255, kw, size)
            else:
                draw_op(sprite_draw, kind, xy, roles[role] + (255,), kw, size)
        if layer == "body":
            # Pattern over the whole body layer, then a darker outline so parts stay distinct.
            sprite.paste(texture, (0, 0), body_mask)
            edge = body_mask.filter(ImageFilter.FIND_EDGES)
            outline = tuple(int(c * 0.55) for c in body) + (255,)
            sprite.paste(Image.new("RGBA", (size, size), outline), (0, 0), edge)
    return sprite


def _background(rng, w, h):
    """A random scene for one photo (independent of the product)."""
    # Product photos are mostly shot on light, plain backgrounds; the rest are scenes.
    kind = rng.choice(["plain", "gradient", "texture", "room", "clutter"], p=[0.45, 0.15, 0.1, 0.18, 0.12])

    def colour(light=False):
        if light:
            g = rng.uniform(200, 255)
            return np.clip(g + rng.uniform(-12, 12, 3), 0, 255)
        return rng.uniform(0, 255, 3)

    if kind in ("plain", "clutter"):
        arr = np.broadcast_to(colour(rng.random() < 0.7), (h, w, 3)).astype(np.float32)
        arr = arr * (1 + rng.uniform(-0.08, 0.08) * np.linspace(-1, 1, h, dtype=np.float32)[:, None, None])
    elif kind == "gradient":
        a, b = colour(), colour()
        t = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        ramp = (xx / w - 0.5) * np.cos(t) + (yy / h - 0.5) * np.sin(t) + 0.5
        arr = a + (b - a) * np.clip(ramp, 0, 1)[..., None]
    elif kind == "texture":
        cells = int(rng.integers(2, 9))
        low = (rng.random((cells, cells, 3)) * 255).astype(np.uint8)
        arr = np.asarray(Image.fromarray(low, "RGB").resize((w, h), Image.BICUBIC), np.float32)
        arr = arr * rng.uniform(0.3, 0.7) + colour() * rng.uniform(0.3, 0.6)
    else:  # room: wall above, floor (maybe planks) below
        horizon = int(h * rng.uniform(0.45, 0.8))
        arr = np.empty((h, w, 3), np.float32)
        arr[:horizon] = colour(rng.random() < 0.5)
        floor = colour()
        arr[horizon:] = floor
        if rng.random() < 0.5:
            period = max(2, int(w * rng.uniform(0.05, 0.15)))
            arr[horizon:, ::period] = floor * 0.7
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    if kind == "clutter":
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(2, 6))):
            x, y = rng.uniform(0, w), rng.uniform(0, h)
            rw, rh = rng.uniform(0.1, 0.35) * w, rng.uniform(0.1, 0.35) * h
            fill = tuple(int(c) for c in colour())
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(
                [x - rw / 2, y - rh / 2, x + rw / 2, y + rh / 2], fill=fill
            )
    return img


def _render_view(sprite, rng, w, h):
    """One photo of the product: returns JPEG bytes."""
    img = _background(rng, w, h)
    base = min(w, h)
    scale = rng.uniform(0.6, 0.98) * base
    aspect = math.exp(rng.uniform(-0.15, 0.15))  # viewpoint: wider or narrower
    ow, oh = max(2, int(round(scale * aspect))), max(2, int(round(scale / aspect)))
    obj = sprite.resize((ow, oh), Image.BILINEAR, reducing_gap=2.0)
    if rng.random() < 0.5:
        obj = obj.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # rotate premultiplied, so the transparent border does not bleed black into the edges
    obj = obj.convert("RGBa").rotate(rng.uniform(-25, 25), Image.BILINEAR, expand=True).convert("RGBA")
    cx = w / 2 + rng.uniform(-0.15, 0.15) * w
    cy = h / 2 + rng.uniform(-0.15, 0.15) * h
    left, top = int(round(cx - obj.width / 2)), int(round(cy - obj.height / 2))
    if rng.random() < 0.4:  # soft contact shadow, blurred at quarter resolution (cheap at 600 px)
        q = 4 if base >= 128 else 1
        shadow = Image.new("L", (max(1, w // q), max(1, h // q)), 0)
        sw = obj.width * rng.uniform(0.5, 0.9)
        bottom = top + obj.height * 0.9
        ImageDraw.Draw(shadow).ellipse(
            [(cx - sw / 2) / q, (bottom - 0.06 * base) / q, (cx + sw / 2) / q, (bottom + 0.04 * base) / q],
            fill=int(rng.uniform(60, 140)),
        )
        shadow = shadow.filter(ImageFilter.GaussianBlur(base * 0.03 / q)).resize((w, h), Image.BILINEAR)
        img.paste(Image.new("RGB", (w, h), (0, 0, 0)), (0, 0), shadow)
    img.paste(obj, (left, top), obj)
    if rng.random() < 0.3:  # occluder: something in front of the product
        draw = ImageDraw.Draw(img)
        ow2, oh2 = rng.uniform(0.12, 0.32) * base, rng.uniform(0.12, 0.32) * base
        ox = cx + rng.uniform(-0.5, 0.5) * obj.width
        oy = cy + rng.uniform(-0.5, 0.5) * obj.height
        fill = tuple(int(c) for c in rng.uniform(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(
            [ox - ow2 / 2, oy - oh2 / 2, ox + ow2 / 2, oy + oh2 / 2], fill=fill
        )
    # lighting: exposure and white balance, light falling off across the scene, sensor
    # noise, then gamma (a lookup table: cheap at 600 px)
    gain = (rng.uniform(0.75, 1.2) * rng.uniform(0.9, 1.1, 3)).astype(np.float32)
    t = rng.uniform(0, 2 * np.pi)
    ramp = rng.uniform(0, 0.4) * (
        np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :] * np.float32(np.cos(t))
        + np.linspace(-0.5, 0.5, h, dtype=np.float32)[:, None] * np.float32(np.sin(t))
    )
    arr = np.asarray(img, np.float32) * (1 + ramp)[..., None]
    arr *= gain
    sigma = rng.uniform(0, 5)
    arr += rng.standard_normal(arr.shape, dtype=np.float32) * np.float32(sigma)
    np.clip(arr, 0, 255, out=arr)
    lut = np.round(255 * (np.arange(256) / 255.0) ** rng.uniform(0.75, 1.3)).astype(np.uint8)
    img = Image.fromarray(lut[(arr + 0.5).astype(np.uint8)], "RGB")
    if rng.random() < 0.2:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0) * base / 96))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(rng.integers(55, 96)))
    return buf.getvalue()


def _parse_image_size(image_size):
    """96 → (96, 96); "300-600" or (300, 600) → sides drawn per photo in [300, 600]."""
    if isinstance(image_size, str):
        lo, _, hi = image_size.partition("-")
        image_size = (int(lo), int(hi or lo))
    if isinstance(image_size, (int, np.integer)):
        image_size = (int(image_size), int(image_size))
    lo, hi = (int(v) for v in image_size)
    if not 16 <= lo <= hi <= 4096:
        raise ValueError(f"image_size must be a side in 16..4096 or a range 'MIN-MAX', got {image_size}")
    return lo, hi


def _product_plan(num_products, seed):
    """(class_id, category, n_images, split) for every product. Train gets class ids
    1..n_train, test n_train+1..num_products, as in SOP; every split cycles through all
    12 categories (shuffled) so each holds every category once it has 12 products."""
    rng = np.random.default_rng([seed, 0xC0FFEE])
    n_train = (num_products + 1) // 2
    plan = []
    for split, first, count in (("train", 1, n_train), ("test", n_train + 1, num_products - n_train)):
        cats = rng.permutation(np.arange(count) % len(SOP_CATEGORIES))
        sizes = 2 + rng.choice(len(_SIZE_WEIGHTS), count, p=_SIZE_WEIGHTS)
        plan += [(first + j, SOP_CATEGORIES[c], int(n), split) for j, (c, n) in enumerate(zip(cats, sizes))]
    return plan


def _product_stem(class_id):
    """An eBay-like 12-digit product id for file names ``<id>_<n>.JPG``."""
    return f"{111_000_000_000 + 7919 * class_id}"


def _write_product(job):
    tmp_root, class_id, category, n_images, seed, (lo, hi) = job
    rng = np.random.default_rng([seed, class_id])
    sprite = _render_product(category, rng, size=min(2 * hi, 768))
    rel = []
    for n in range(n_images):
        w, h = (int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))) if hi > lo else (lo, lo)
        path = f"{category}_final/{_product_stem(class_id)}_{n}.JPG"
        with open(os.path.join(tmp_root, path), "wb") as f:
            f.write(_render_view(sprite, rng, w, h))
        rel.append(path)
    return rel


def _check_root(root, num_products):
    """Raise unless ``num_products`` is at least 2 and ``root`` is absent, empty or a synthetic SOP."""
    if num_products < 2:
        raise ValueError(f"num_products must be >= 2 (train and test), got {num_products}")
    if root.exists() and any(root.iterdir()) and (read_marker(root) or {}).get("source") != "synthetic":
        raise FileExistsError(
            f"{root} exists and is not a synthetic SOP made by datasets.py; choose another --root or remove it"
        )


def _write_all_products(tmp, plan, seed, sides, workers, progress):
    """Render every product of ``plan`` into ``tmp``; the relative image paths of each product, in plan order."""
    for cat in SOP_CATEGORIES:
        (tmp / f"{cat}_final").mkdir()
    jobs = [(str(tmp), cid, cat, n, seed, sides) for cid, cat, n, _ in plan]
    bar = dict(total=len(jobs), desc="synthetic SOP", unit="product", disable=not progress)
    if workers > 1 and len(jobs) > 4 * workers:
        with mp_context().Pool(workers) as pool:
            return list(tqdm(pool.imap(_write_product, jobs, chunksize=8), **bar))
    return [_write_product(job) for job in tqdm(jobs, **bar)]


def _write_image_lists(tmp, plan, rels):
    """Write ``Ebay_train.txt``, ``Ebay_test.txt`` and ``Ebay_info.txt``; the image count of each split."""
    info_lines, counts = [], {}
    for split, name in (("train", "Ebay_train.txt"), ("test", "Ebay_test.txt")):
        lines = [" ".join(EBAY_HEADER)]
        for (cid, cat, _, s), rel in zip(plan, rels):
            if s != split:
                continue
            for path in rel:
                image_id = len(lines)
                lines.append(f"{image_id} {cid} {SOP_CATEGORIES.index(cat) + 1} {path}")
                info_lines.append((cid, SOP_CATEGORIES.index(cat) + 1, path))
        counts[split] = len(lines) - 1
        (tmp / name).write_text("\n".join(lines) + "\n")
    (tmp / "Ebay_info.txt").write_text(
        "\n".join([" ".join(EBAY_HEADER)] + [f"{i} {c} {s} {p}" for i, (c, s, p) in enumerate(info_lines, start=1)])
        + "\n"
    )
    return counts


def make_synthetic_sop(root, num_products=1200, image_size=96, seed=0, workers=None, progress=False):
    """Write a synthetic SOP to ``root`` and return ``root`` as a Path.

    Layout as SOP: ``Ebay_train.txt``, ``Ebay_test.txt``, ``Ebay_info.txt`` (header
    ``image_id class_id super_class_id path``) and ``<category>_final/<id>_<n>.JPG`` for the
    12 categories; products split about 50/50 into train (class ids 1..n_train) and test
    (the rest), 2–12 photos each (mean ≈ 5.5). ``image_size``: an int for square photos, or
    ``(min, max)`` / ``"min-max"`` for sides drawn per photo (e.g. "300-600" for SOP-like
    JPEGs). Byte-identical output for the same arguments, whatever ``workers``.

    Atomic: everything goes to a sibling ``.<name>.tmp-*`` folder, ``.complete`` is written
    last and the folder is renamed onto ``root``, so an interrupted run never leaves a
    dataset at ``root``. An existing ``root`` must be empty or a dataset made by this
    function (it is replaced); anything else raises FileExistsError.
    """
    root = Path(root).expanduser()
    lo, hi = _parse_image_size(image_size)
    _check_root(root, num_products)
    plan = _product_plan(num_products, seed)
    workers = default_workers() if workers is None else workers
    tmp = make_tmp_dir(root)
    try:
        rels = _write_all_products(tmp, plan, seed, (lo, hi), workers, progress)
        counts = _write_image_lists(tmp, plan, rels)
        write_marker(
            tmp,
            {
                "source": "synthetic",
                "version": SYNTHETIC_VERSION,
                "num_products": num_products,
                "image_size": [lo, hi],
                "seed": seed,
                "train_images": counts["train"],
                "test_images": counts["test"],
            },
        )
        publish_dir(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def ensure_synthetic_sop(root, num_products=1200, image_size=96, seed=0, workers=None, progress=False, replace=False):
    """``root`` as a Path, generated by ``make_synthetic_sop`` when absent (or empty).

    A complete synthetic SOP already there is returned as is when it was made with the same
    arguments and generator version. One made otherwise is replaced only with
    ``replace=True`` (for caches a tool owns); else FileExistsError names what differs, so a
    dataset someone pointed us at is never regenerated behind their back."""
    root = Path(root).expanduser()
    lo, hi = _parse_image_size(image_size)
    marker = read_marker(root) or {}
    wanted = {
        "source": "synthetic",
        "version": SYNTHETIC_VERSION,
        "num_products": num_products,
        "image_size": [lo, hi],
        "seed": seed,
    }
    differs = {k: (marker.get(k), v) for k, v in wanted.items() if marker.get(k) != v}
    if not differs:
        return root
    if marker.get("source") == "synthetic" and not replace:
        detail = ", ".join(f"{k} {have!r} (wanted {want!r})" for k, (have, want) in differs.items())
        raise FileExistsError(
            f"{root} holds a synthetic SOP made with other settings: {detail}. Use it with those "
            f"settings, pass another --root, or regenerate it (`python datasets.py synthetic "
            f"--root {root} --force` with the settings you want)"
        )
    return make_synthetic_sop(root, num_products, (lo, hi), seed, workers, progress)
