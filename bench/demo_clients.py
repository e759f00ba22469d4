"""Clients of the demo for its tests and load benchmarks: query files of every kind the demo must
accept or refuse (a PNG declaring more pixels than it holds among them), and a headless Chromium
under selenium. Neither is part of the library: the demo never makes a query file or a browser.
"""

from __future__ import annotations

import io
from pathlib import Path
import struct
import zlib

import numpy as np
from PIL import Image

from dataio import photos

# Debian's chromium and chromium-driver (.ci/run installs them): the browser the demo's browser
# test and bench/bench_explain.py --browser drive
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--disable-extensions",
    "--window-size=1400,1000",
]


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width, height) -> bytes:
    """A ~100-byte PNG whose header declares ``width`` × ``height`` RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


def write_query_files(folder, source) -> dict:
    """Query files built from the gallery photo ``source``: ``{name: (path, accepted)}``.

    Accepted (must be searched): plain JPEG, RGBA / palette-with-transparency / LA PNG,
    CMYK JPEG, 16-bit grey PNG, a 1×1 PNG, WebP, an EXIF-rotated JPEG. Refused (must be
    answered with an error): text named .jpg, a 0-byte file, a truncated JPEG, a PNG
    declaring 50,000 × 50,000 (over Pillow's own bomb limit) and one declaring
    9,000 × 9,000 (under Pillow's limit, over the demo's).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = photos.load_image(source)
    files = {}

    def put(name, accepted, save=None, raw=None):
        path = folder / name
        if raw is not None:
            path.write_bytes(raw)
        else:
            save(path)
        files[name] = (path, accepted)

    put("plain.jpg", True, lambda p: base.save(p, quality=95))
    rgba = base.convert("RGBA")
    alpha = np.full((base.height, base.width), 255, np.uint8)
    alpha[: base.height // 2] = 0  # top half transparent, bottom half opaque
    rgba.putalpha(Image.fromarray(alpha))
    put("rgba.png", True, rgba.save)
    pal = base.convert("P", palette=Image.ADAPTIVE, colors=64)
    pal.info["transparency"] = 0
    put("palette.png", True, lambda p: pal.save(p, transparency=0))
    put("la.png", True, base.convert("LA").save)
    put("cmyk.jpg", True, lambda p: base.convert("CMYK").save(p, quality=95))
    grey16 = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    assert grey16.mode == "I;16"
    put("grey16.png", True, grey16.save)
    put("one_pixel.png", True, Image.new("RGB", (1, 1), (200, 30, 30)).save)
    put("photo.webp", True, lambda p: base.save(p, "WEBP", quality=90))
    # Stored pixels turned 90° counter-clockwise; EXIF orientation 6 says "turn 90° clockwise
    # to display", so the upright photo is `upright.jpg`.
    upright = base.resize((base.width, base.height * 2 // 3))
    put("upright.jpg", True, lambda p: upright.save(p, quality=95))
    exif = Image.Exif()
    exif[0x0112] = 6
    put("exif_rotated.jpg", True, lambda p: upright.transpose(Image.Transpose.ROTATE_90).save(p, quality=95, exif=exif))

    put("not_an_image.jpg", False, raw=b"this is a text file, not a photo\n" * 20)
    put("empty.jpg", False, raw=b"")
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noisy.save(buf, "JPEG", quality=90)
    put("truncated.jpg", False, raw=buf.getvalue()[: len(buf.getvalue()) // 2])
    put("bomb.png", False, raw=png_declaring(50_000, 50_000))
    put("big_dims.png", False, raw=png_declaring(9_000, 9_000))
    return files


def start_chromium(page_load_timeout=30):
    """``(driver, profile folder)``: headless Chromium under selenium with a fresh profile (the
    caller quits the driver and removes the folder)."""
    import tempfile

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(page_load_timeout)
    return driver, profile
