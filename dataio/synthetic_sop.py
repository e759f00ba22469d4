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
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from dataio.catalogue import EBAY_HEADER, SOP_CATEGORIES
from dataio.fileio import make_tmp_dir, publish_dir, read_marker, write_marker
from dataio.photos import default_workers, mp_context

SYNTHETIC_VERSION = 2  # bump when the renderer changes: a complete folder of another version is regenerated


_COLOURS = {
    "white": (236, 236, 230), "cream": (232, 218, 186), "beige": (208, 192, 164),
    "black": (34, 34, 38), "grey": (126, 128, 134), "silver": (188, 192, 200),
    "red": (188, 40, 42), "orange": (222, 118, 40), "yellow": (228, 196, 58),
    "green": (58, 138, 70), "teal": (38, 136, 138), "blue": (44, 80, 168),
    "navy": (32, 42, 92), "purple": (108, 60, 138), "pink": (224, 140, 168),
    "brown": (116, 78, 48), "tan": (188, 148, 100), "wood": (160, 110, 62),
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
_SIZE_WEIGHTS = np.array([.13, .14, .15, .14, .12, .10, .07, .05, .04, .03, .03])  # 2..12 images


class _Sketch:
    """Drawing operations in unit coordinates (x right, y down, object inside [0, 1]²).
    Layers are drawn back → body → front; the body layer is filled with the product's
    surface pattern, the others with a plain colour role."""

    def __init__(self, rng):
        self.rng = rng
        self.ops = []

    def u(self, lo, hi):
        return float(self.rng.uniform(lo, hi))

    def pick(self, options):
        return options[int(self.rng.integers(len(options)))]

    def chance(self, p):
        return bool(self.rng.random() < p)

    def add(self, layer, kind, xy, role="body", **kw):
        self.ops.append((layer, kind, xy, role, kw))


def _box(x0, y0, x1, y1):
    return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def _bicycle(s):
    r, wb, cy = s.u(.15, .21), s.u(.5, .62), .68
    h1, h2 = .5 - wb / 2, .5 + wb / 2
    tyre, spokes = s.u(.02, .045), s.pick([0, 6, 8, 12, 16])
    for hx in (h1, h2):
        s.add("back", "ring", (hx - r, cy - r, hx + r, cy + r), "dark", width=tyre)
        for j in range(spokes):
            a = math.pi * j / max(spokes, 1) * 2
            s.add("back", "line", [(hx, cy), (hx + .9 * r * math.cos(a), cy + .9 * r * math.sin(a))],
                  "metal", width=.006)
        s.add("back", "ellipse", (hx - .02, cy - .02, hx + .02, cy + .02), "metal")
    bb = (.5 + s.u(-.06, .04), cy + s.u(-.02, .04))
    seat = (bb[0] - s.u(.02, .1), cy - s.u(.3, .4))
    head = (h2 - s.u(.06, .12), cy - s.u(.26, .38))
    fw = s.u(.022, .045)
    top = (seat[0] + .01, seat[1] + (s.u(.12, .2) if s.chance(.25) else .03))   # step-through
    for a, b in [((h1, cy), bb), ((h1, cy), seat), (bb, seat), (top, head), (bb, head), (head, (h2, cy))]:
        s.add("body", "line", [a, b], width=fw)
    s.add("front", "poly", [(seat[0] - .07, seat[1] - .02), (seat[0] + .05, seat[1] - .03),
                            (seat[0] + .04, seat[1] + .01), (seat[0] - .06, seat[1] + .01)], "dark")
    bar = (head[0] - s.u(-.02, .05), head[1] - s.u(.05, .1))
    s.add("front", "line", [head, bar, (bar[0] + s.u(-.08, .08), bar[1] + s.u(-.02, .05))],
          s.pick(["dark", "metal"]), width=.015)
    if s.chance(.35):   # rear rack
        s.add("front", "rect", (h1 - .05, seat[1] + .06, h1 + .12, seat[1] + .09), "accent")
    if s.chance(.3):    # front basket
        s.add("front", "rect", (bar[0] - .02, bar[1] + .02, bar[0] + .14, bar[1] + .12), "accent")
    if s.chance(.3):    # mudguards
        for hx in (h1, h2):
            s.add("front", "arc", (hx - r - .02, cy - r - .02, hx + r + .02, cy + r + .02), "accent",
                  start=200, end=340, width=.015)


def _cabinet(s):
    w, h = s.u(.4, .7), s.u(.5, .78)
    x0, y0 = .5 - w / 2, .46 - h / 2
    legs = s.chance(.5)
    if legs:
        for lx in (x0 + .03, x0 + w - .06):
            s.add("back", "rect", (lx, y0 + h - .02, lx + .03, y0 + h + .08), "dark")
    s.add("body", "rect", (x0, y0, x0 + w, y0 + h), radius=s.u(0, .03))
    if s.chance(.6):
        s.add("front", "rect", (x0 - .02, y0 - .03, x0 + w + .02, y0 + .01), s.pick(["accent", "dark"]))
    n_col, n_dr = int(s.rng.integers(1, 4)), int(s.rng.integers(0, 4))
    dh = h * s.u(.12, .2)
    knob, glass = s.chance(.5), s.chance(.25)
    handle_role = s.pick(["metal", "dark", "accent"])
    for j in range(n_dr):
        y = y0 + .02 + j * dh
        s.add("front", "rectline", (x0 + .02, y, x0 + w - .02, y + dh - .01), "dark", width=.008)
        s.add("front", "rect", (.5 - .05, y + dh / 2 - .01, .5 + .05, y + dh / 2 + .01), handle_role)
    top = y0 + .02 + n_dr * dh
    cw = (w - .04) / n_col
    for c in range(n_col):
        cx0 = x0 + .02 + c * cw
        s.add("front", "rectline", (cx0, top, cx0 + cw - .01, y0 + h - .02), "dark", width=.008)
        if glass:
            s.add("front", "rect", (cx0 + .03, top + .03, cx0 + cw - .04, y0 + h - .05), "light")
        hx = cx0 + (cw - .05 if c % 2 == 0 else .04)
        if knob:
            s.add("front", "ellipse", (hx - .015, top + .1, hx + .015, top + .13), handle_role)
        else:
            s.add("front", "rect", (hx - .008, top + .06, hx + .008, top + .16), handle_role)


def _chair(s):
    seat_y, sw, st = s.u(.5, .6), s.u(.34, .5), s.u(.04, .08)
    x0 = .5 - sw / 2
    lw, splay = s.u(.02, .045), s.u(0, .06)
    leg = s.pick(["dark", "accent", "metal", "body"])
    for lx, d in ((x0 + .06, -1), (x0 + sw - .06, 1)):
        s.add("back", "line", [(lx, seat_y), (lx + d * splay * .5, .86)], leg, width=lw)
    bh, style = s.u(.25, .4), int(s.rng.integers(4))
    by0 = seat_y - bh
    if style == 0:
        s.add("body", "rect", (x0, by0, x0 + sw, seat_y), radius=s.u(0, .06))
    elif style == 1:   # vertical slats
        s.add("body", "rect", (x0, by0, x0 + sw, by0 + .06), radius=.01)
        n = int(s.rng.integers(3, 6))
        for j in range(n):
            sx = x0 + .02 + j * (sw - .06) / max(n - 1, 1)
            s.add("body", "rect", (sx, by0, sx + .03, seat_y))
    elif style == 2:   # rounded top
        s.add("body", "ellipse", (x0, by0 - .08, x0 + sw, by0 + .14))
        s.add("body", "rect", (x0 + .03, by0 + .03, x0 + sw - .03, seat_y))
    else:              # ladder back
        for lx in (x0, x0 + sw - .03):
            s.add("body", "rect", (lx, by0, lx + .03, seat_y))
        n = int(s.rng.integers(2, 5))
        for j in range(n):
            y = by0 + .02 + j * (bh - .08) / max(n - 1, 1)
            s.add("body", "rect", (x0, y, x0 + sw, y + .035))
    s.add("body", "rect", (x0 - .02, seat_y, x0 + sw + .02, seat_y + st), radius=.01)
    for lx, d in ((x0 + .01, -1), (x0 + sw - .01, 1)):
        s.add("front", "line", [(lx, seat_y + st), (lx + d * splay, .93)], leg, width=lw)
    if s.chance(.35):
        for lx in (x0 - .03, x0 + sw + .03):
            s.add("front", "line", [(lx, seat_y - .12), (lx, seat_y)], "accent", width=.025)
        s.add("front", "line", [(x0 - .05, seat_y - .12), (x0 + .08, seat_y - .12)], "accent", width=.025)
    if s.chance(.3):
        s.add("front", "rect", (x0, seat_y - .03, x0 + sw, seat_y + .01), "accent", radius=.015)


def _coffee_maker(s):
    bw, left = s.u(.45, .6), s.chance(.5)
    x0, x1, base_y = .5 - bw / 2, .5 + bw / 2, .82
    tw, top_y = s.u(.16, .26), s.u(.14, .28)
    tx0, tx1 = (x0, x0 + tw) if left else (x1 - tw, x1)
    s.add("body", "rect", (x0, base_y - .07, x1, base_y), radius=.015)
    s.add("body", "rect", (tx0, top_y, tx1, base_y - .05), radius=s.u(0, .04))
    hh = s.u(.1, .16)
    s.add("body", "rect", (x0, top_y, x1, top_y + hh), radius=s.u(.01, .05))
    cx0, cx1 = (tx1 + .03, x1 - .03) if left else (x0 + .03, tx0 - .03)
    cy0 = top_y + hh + .03
    s.add("front", "poly", [(cx0 + .03, cy0), (cx1 - .03, cy0), (cx1, base_y - .08), (cx0, base_y - .08)],
          "light")
    level = s.u(.3, .8)
    ly = base_y - .08 - level * (base_y - .08 - cy0)
    s.add("front", "poly", [(cx0 + .01, ly), (cx1 - .01, ly), (cx1, base_y - .08), (cx0, base_y - .08)], "dark")
    hx = cx1 if left else cx0
    s.add("front", "ring", (hx - .04, cy0 + .04, hx + .04, cy0 + .16), "accent", width=.018)
    for j in range(int(s.rng.integers(1, 5))):
        bx = (tx0 + tx1) / 2
        by = top_y + hh + .06 + j * .06
        s.add("front", "ellipse", (bx - .018, by - .018, bx + .018, by + .018), "accent")
    if s.chance(.5):
        s.add("front", "rect", (tx0 + .02, top_y + .03, tx1 - .02, top_y + .08), "dark")


def _fan(s):
    if s.chance(.25):   # tower fan
        w, h = s.u(.18, .28), s.u(.6, .75)
        x0, y0 = .5 - w / 2, .86 - h
        s.add("back", "ellipse", (.5 - w * .9, .84, .5 + w * .9, .92), "dark")
        s.add("body", "rect", (x0, y0, x0 + w, .87), radius=s.u(.02, .09))
        n = int(s.rng.integers(3, 8))
        for j in range(n):
            sx = x0 + .04 + j * (w - .08) / max(n - 1, 1)
            s.add("front", "line", [(sx, y0 + .15), (sx, .8)], "dark", width=.01)
        s.add("front", "rect", (x0 + .03, y0 + .03, x0 + w - .03, y0 + .1), "accent", radius=.02)
        return
    bw = s.u(.3, .45)
    cy, rh = s.u(.3, .4), s.u(.2, .28)
    s.add("back", "ellipse", (.5 - bw / 2, .86, .5 + bw / 2, .94), "dark")
    s.add("back", "line", [(.5, .9), (.5, cy)], s.pick(["metal", "dark"]), width=s.u(.02, .04))
    nb, off, bwid = s.pick([3, 4, 5]), s.u(0, math.pi), s.u(.3, .5)
    for j in range(nb):
        a = off + 2 * math.pi * j / nb
        pts = []
        for t in np.linspace(0, 2 * math.pi, 16, endpoint=False):
            along, across = .45 * rh * (1 + math.cos(t)), bwid * rh * .5 * math.sin(t)
            pts.append((.5 + along * math.cos(a) - across * math.sin(a),
                        cy + along * math.sin(a) + across * math.cos(a)))
        s.add("body", "poly", pts)
    for j in range(int(s.rng.integers(2, 5))):
        rr = rh * (j + 1) / 4.5
        s.add("front", "ring", (.5 - rr, cy - rr, .5 + rr, cy + rr), "metal", width=.006)
    for j in range(s.pick([8, 12, 16])):
        a = 2 * math.pi * j / 16
        s.add("front", "line", [(.5, cy), (.5 + rh * math.cos(a), cy + rh * math.sin(a))], "metal", width=.005)
    s.add("front", "ring", (.5 - rh, cy - rh, .5 + rh, cy + rh), "accent", width=.018)
    hub = s.u(.03, .06)
    s.add("front", "ellipse", (.5 - hub, cy - hub, .5 + hub, cy + hub), "accent")


def _kettle(s):
    w, h, bottom = s.u(.38, .52), s.u(.38, .55), .82
    x0, top = .5 - w / 2, bottom - h
    d = s.pick([-1, 1])   # spout side
    sx = .5 + d * w / 2
    s.add("back", "poly", [(sx - d * .03, top + h * .45), (sx - d * .03, top + h * .7),
                           (sx + d * s.u(.1, .16), top + h * s.u(.05, .3))], "body")
    if s.chance(.5):   # handle over the top
        s.add("back", "arc", (x0 + .06, top - h * .35, x0 + w - .06, top + h * .3), "accent",
              start=180, end=360, width=s.u(.025, .045))
    else:
        hx = .5 - d * w / 2
        s.add("back", "ring", (hx - .1, top + h * .15, hx + .1, top + h * .75), "accent",
              width=s.u(.025, .045))
    shape = int(s.rng.integers(3))
    if shape == 0:
        s.add("body", "ellipse", (x0, top, x0 + w, bottom + .03))
    elif shape == 1:
        s.add("body", "poly", [(x0 + w * .22, top), (x0 + w * .78, top), (x0 + w, bottom), (x0, bottom)])
    else:
        s.add("body", "rect", (x0, top, x0 + w, bottom), radius=s.u(.02, .08))
    s.add("front", "ellipse", (.5 - w * .25, top - .025, .5 + w * .25, top + .025), "accent")
    s.add("front", "ellipse", (.5 - .02, top - .05, .5 + .02, top - .01), "dark")
    if s.chance(.6):
        s.add("front", "ellipse", (x0 - .02, bottom - .02, x0 + w + .02, bottom + .04), "dark")
    if s.chance(.3):
        s.add("front", "rect", (.5 - .025, top + h * .25, .5 + .025, top + h * .8), "light", radius=.02)


def _lamp(s):
    bw = s.u(.2, .34)
    base = s.pick(["dark", "metal", "accent"])
    if s.chance(.5):
        s.add("back", "ellipse", (.5 - bw / 2, .87, .5 + bw / 2, .94), base)
    else:
        s.add("back", "rect", (.5 - bw / 2, .86, .5 + bw / 2, .93), base, radius=.01)
    top_y, sh = s.u(.08, .2), s.u(.18, .3)
    stem, sw = s.pick(["metal", "dark", "accent"]), s.u(.015, .03)
    if s.chance(.4):   # angled arm with a joint
        jx, jy = .5 + s.pick([-1, 1]) * s.u(.08, .18), s.u(.45, .6)
        s.add("back", "line", [(.5, .88), (jx, jy), (.5, top_y + sh)], stem, width=sw)
        s.add("back", "ellipse", (jx - .025, jy - .025, jx + .025, jy + .025), "dark")
    else:
        s.add("back", "line", [(.5, .88), (.5, top_y + sh)], stem, width=sw)
    if s.chance(.4):
        s.add("back", "ellipse", (.5 - .05, top_y + sh - .04, .5 + .05, top_y + sh + .06), "light")
    if s.chance(.35):   # dome
        dw = s.u(.3, .48)
        s.add("body", "pie", (.5 - dw / 2, top_y, .5 + dw / 2, top_y + 2 * sh), start=180, end=360)
        y_trim, half = top_y + sh, dw / 2
    else:
        tw, bw2 = s.u(.14, .3), s.u(.3, .5)
        s.add("body", "poly", [(.5 - tw / 2, top_y), (.5 + tw / 2, top_y),
                               (.5 + bw2 / 2, top_y + sh), (.5 - bw2 / 2, top_y + sh)])
        y_trim, half = top_y + sh, bw2 / 2
    if s.chance(.4):
        s.add("front", "line", [(.5 - half, y_trim), (.5 + half, y_trim)], "accent", width=.02)


def _mug(s):
    w, h = s.u(.34, .48), s.u(.38, .55)
    x0, top = .46 - w / 2, .52 - h / 2
    right = s.chance(.8)
    hw, hh = s.u(.1, .18), h * s.u(.4, .65)
    hx0 = x0 + w - .05 if right else x0 - hw + .05
    s.add("back", "ring", (hx0, top + h * .15, hx0 + hw, top + h * .15 + hh),
          s.pick(["body", "accent"]), width=s.u(.03, .06))
    if s.chance(.3):
        s.add("back", "ellipse", (x0 - .1, top + h - .03, x0 + w + .1, top + h + .06), s.pick(["accent", "light"]))
    s.add("body", "rect", (x0, top, x0 + w, top + h), radius=s.u(.01, .06))
    s.add("front", "ellipse", (x0, top - .03, x0 + w, top + .03), "dark")
    if s.chance(.4):
        s.add("front", "line", [(x0, top + .005), (x0 + w, top + .005)], "accent", width=.012)


def _sofa(s):
    w, seat_y, bh = s.u(.66, .86), s.u(.48, .56), s.u(.16, .24)
    x0, x1 = .5 - w / 2, .5 + w / 2
    back_h, aw = s.u(.14, .28), s.u(.06, .12)
    leg = s.pick(["dark", "metal", None])
    if leg:
        for lx in (x0 + .04, .5, x1 - .06)[:: 1 if s.chance(.5) else 2]:
            s.add("back", "rect", (lx, seat_y + bh - .02, lx + .025, seat_y + bh + .06), leg)
    s.add("body", "rect", (x0 + aw * .5, seat_y - back_h, x1 - aw * .5, seat_y + .02), radius=s.u(.01, .05))
    s.add("body", "rect", (x0, seat_y, x1, seat_y + bh), radius=.02)
    arm_top = seat_y - s.u(.03, .12)
    for ax in (x0, x1 - aw):
        s.add("body", "rect", (ax, arm_top, ax + aw, seat_y + bh), radius=s.u(.01, .04))
    n = int(s.rng.integers(1, 5))
    inner = (x1 - aw) - (x0 + aw)
    for j in range(1, n):
        cx = x0 + aw + inner * j / n
        s.add("front", "line", [(cx, seat_y - back_h + .03), (cx, seat_y + .06)], "dark", width=.008)
    s.add("front", "line", [(x0 + aw, seat_y + .06), (x1 - aw, seat_y + .06)], "dark", width=.008)
    if s.chance(.5):
        for px in ([x0 + aw + .02] + ([x1 - aw - .14] if s.chance(.6) else [])):
            s.add("front", "rect", (px, seat_y - .12, px + .12, seat_y + .01), "accent", radius=.02)


def _stapler(s):
    length = s.u(.6, .8)
    x0, base_y = .5 - length / 2, s.u(.6, .66)
    s.add("back", "rect", (x0, base_y, x0 + length, base_y + .05), s.pick(["dark", "metal"]), radius=.01)
    back_h, front_h = s.u(.1, .2), s.u(.04, .09)
    front_x, bump = x0 + length * s.u(.9, 1.0), s.u(0, .04)
    s.add("body", "poly", [(x0, base_y), (x0, base_y - back_h), ((x0 + front_x) / 2, base_y - back_h * .7 - bump),
                           (front_x, base_y - front_h), (front_x, base_y - .005)])
    s.add("front", "ellipse", (x0 + .01, base_y - .05, x0 + .06, base_y), "accent")
    if s.chance(.5):
        s.add("front", "line", [(x0 + .05, base_y - back_h * .6), (front_x - .04, base_y - front_h * .6)],
              "accent", width=.015)
    s.add("front", "rect", (front_x - .05, base_y - front_h, front_x, base_y - .005), "metal", radius=.01)


def _table(s):
    w, th, top_y = s.u(.6, .86), s.u(.03, .07), s.u(.32, .45)
    x0, x1 = .5 - w / 2, .5 + w / 2
    leg, style, lw = s.pick(["accent", "dark", "metal", "body"]), int(s.rng.integers(4)), s.u(.025, .05)
    if style == 0:   # four straight legs
        for lx in (x0 + .06, x1 - .06 - lw):
            s.add("back", "rect", (lx + .04, top_y, lx + lw + .04, .86), leg)
        for lx in (x0 + .02, x1 - .02 - lw):
            s.add("front", "rect", (lx, top_y + th, lx + lw, .9), leg)
    elif style == 1:   # splayed
        for lx, d in ((x0 + .06, -1), (x1 - .06, 1)):
            s.add("front", "line", [(lx, top_y + th), (lx + d * .06, .9)], leg, width=lw)
    elif style == 2:   # pedestal
        s.add("back", "rect", (.5 - lw, top_y, .5 + lw, .88), leg)
        s.add("back", "ellipse", (.5 - w * .3, .85, .5 + w * .3, .92), leg)
    else:              # trestle
        for cx in (x0 + .12, x1 - .12):
            s.add("front", "line", [(cx - .07, .9), (cx, top_y + th), (cx + .07, .9)], leg, width=lw)
    if s.chance(.35):
        s.add("body", "ellipse", (x0, top_y - th, x1, top_y + th))
    else:
        s.add("body", "rect", (x0, top_y, x1, top_y + th), radius=s.u(0, .02))
    if s.chance(.5):
        s.add("body", "rect", (x0 + .04, top_y + th, x1 - .04, top_y + th + s.u(.03, .07)))
    if s.chance(.3):
        s.add("front", "rect", (x0 + .05, .72, x1 - .05, .75), leg)


def _toaster(s):
    w, h, bottom = s.u(.5, .7), s.u(.32, .46), .78
    x0, top = .5 - w / 2, bottom - h
    depth = s.u(.05, .1)
    s.add("back", "poly", [(x0 + depth, top - depth), (x0 + w + depth, top - depth), (x0 + w, top), (x0, top)], "metal")
    n_slots = s.pick([1, 2, 2, 4])
    for j in range(n_slots):
        sx = x0 + w * (j + 1) / (n_slots + 1)
        s.add("back", "line", [(sx - .06 + depth * .6, top - depth * .55), (sx + .06 + depth * .4, top - depth * .45)],
              "dark", width=.018)
    s.add("body", "rect", (x0, top, x0 + w, bottom), radius=s.u(.03, .12))
    s.add("front", "rect", (x0 + w - .07, top + h * .2, x0 + w - .03, top + h * .28), "accent", radius=.01)
    for j in range(int(s.rng.integers(1, 4))):
        cx = x0 + w - .05
        cy = top + h * .45 + j * .07
        s.add("front", "ellipse", (cx - .022, cy - .022, cx + .022, cy + .022), s.pick(["accent", "dark"]))
    if s.chance(.4):
        s.add("front", "rect", (x0, top + h * .55, x0 + w - .1, top + h * .62), "metal")
    for fx in (x0 + .05, x0 + w - .09):
        s.add("front", "rect", (fx, bottom - .005, fx + .04, bottom + .02), "dark")


_FAMILIES = {
    "bicycle": _bicycle, "cabinet": _cabinet, "chair": _chair, "coffee_maker": _coffee_maker,
    "fan": _fan, "kettle": _kettle, "lamp": _lamp, "mug": _mug, "sofa": _sofa,
    "stapler": _stapler, "table": _table, "toaster": _toaster,
}


def _jitter(rng, rgb, amount=12):
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _pattern_texture(rng, size, body, second):
    """The product's surface: a size×size RGB image in the product's own frame."""
    kind = _PATTERNS[int(rng.integers(len(_PATTERNS)))]
    # 1-D coordinates that broadcast to size×size: no full grids for stripes
    xx = (np.arange(size, dtype=np.float32) / size)[None, :]
    yy = (np.arange(size, dtype=np.float32) / size)[:, None]
    freq, duty, phase = rng.uniform(4, 12), rng.uniform(.3, .6), rng.uniform(0, 1)
    if kind == "solid":
        mask = np.zeros((1, 1), dtype=bool)
    elif kind == "hstripes":
        mask = (yy * freq + phase) % 1 < duty
    elif kind == "vstripes":
        mask = (xx * freq + phase) % 1 < duty
    elif kind == "diagonal":
        mask = ((xx + rng.choice([-1, 1]) * yy) * freq * .7 + phase) % 1 < duty
    elif kind == "dots":
        fx, fy = (xx * freq + phase) % 1 - .5, (yy * freq + phase) % 1 - .5
        mask = fx * fx + fy * fy < (duty * .6) ** 2
    elif kind == "checker":
        f = freq * .6
        mask = ((np.floor(xx * f + phase) + np.floor(yy * f + phase)) % 2) == 1
    elif kind == "bands":
        centres = rng.uniform(.2, .8, int(rng.integers(1, 4)))
        width = rng.uniform(.03, .08)
        mask = np.zeros_like(yy, dtype=bool)
        for c in centres:
            mask |= np.abs(yy - c) < width
    else:  # grid
        mask = ((xx * freq + phase) % 1 < duty * .35) | ((yy * freq + phase) % 1 < duty * .35)
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
        "body": body, "accent": accent,
        "dark": _jitter(rng, [(30, 30, 32), (58, 46, 40), (70, 72, 78)][int(rng.integers(3))], 6),
        "metal": _jitter(rng, [(180, 184, 192), (150, 152, 158), (205, 185, 130)][int(rng.integers(3))], 8),
        "light": _jitter(rng, [(222, 236, 244), (246, 236, 196)][int(rng.integers(2))], 6),
    }
    sketch = _Sketch(rng)
    _FAMILIES[category](sketch)
    texture = _pattern_texture(rng, size, body, second)

    sprite = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    body_mask = Image.new("L", (size, size), 0)
    px = lambda pts: [(x * size, y * size) for x, y in pts]  # noqa: E731

    def draw_op(draw, kind, xy, fill, kw):
        width = max(1, int(round(kw.get("width", 0) * size)))
        if kind in ("rect", "rectline", "ellipse", "ring", "arc", "pie"):
            box = [v * size for v in _box(*xy)]
            if kind == "rect":
                radius = kw.get("radius", 0) * size
                if radius >= 1:
                    draw.rounded_rectangle(box, radius=radius, fill=fill)
                else:
                    draw.rectangle(box, fill=fill)
            elif kind == "rectline":
                draw.rectangle(box, outline=fill, width=width)
            elif kind == "ellipse":
                draw.ellipse(box, fill=fill)
            elif kind == "ring":
                draw.ellipse(box, outline=fill, width=width)
            elif kind == "arc":
                draw.arc(box, kw["start"], kw["end"], fill=fill, width=width)
            else:
                draw.pieslice(box, kw["start"], kw["end"], fill=fill)
        elif kind == "poly":
            draw.polygon(px(xy), fill=fill)
        elif kind == "line":
            draw.line(px(xy), fill=fill, width=width, joint="curve")
        else:
            raise ValueError(f"unknown drawing op {kind!r}")

    sprite_draw, mask_draw = ImageDraw.Draw(sprite), ImageDraw.Draw(body_mask)
    for layer in ("back", "body", "front"):
        for op_layer, kind, xy, role, kw in sketch.ops:
            if op_layer != layer:
                continue
            if layer == "body":
                draw_op(mask_draw, kind, xy, 255, kw)
            else:
                draw_op(sprite_draw, kind, xy, roles[role] + (255,), kw)
        if layer == "body":
            # Pattern over the whole body layer, then a darker outline so parts stay distinct.
            sprite.paste(texture, (0, 0), body_mask)
            edge = body_mask.filter(ImageFilter.FIND_EDGES)
            outline = tuple(int(c * .55) for c in body) + (255,)
            sprite.paste(Image.new("RGBA", (size, size), outline), (0, 0), edge)
    return sprite


def _background(rng, w, h):
    """A random scene for one photo (independent of the product)."""
    # Product photos are mostly shot on light, plain backgrounds; the rest are scenes.
    kind = rng.choice(["plain", "gradient", "texture", "room", "clutter"], p=[.45, .15, .1, .18, .12])

    def colour(light=False):
        if light:
            g = rng.uniform(200, 255)
            return np.clip(g + rng.uniform(-12, 12, 3), 0, 255)
        return rng.uniform(0, 255, 3)
    if kind in ("plain", "clutter"):
        arr = np.broadcast_to(colour(rng.random() < .7), (h, w, 3)).astype(np.float32)
        arr = arr * (1 + rng.uniform(-.08, .08) * np.linspace(-1, 1, h, dtype=np.float32)[:, None, None])
    elif kind == "gradient":
        a, b = colour(), colour()
        t = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        ramp = (xx / w - .5) * np.cos(t) + (yy / h - .5) * np.sin(t) + .5
        arr = a + (b - a) * np.clip(ramp, 0, 1)[..., None]
    elif kind == "texture":
        cells = int(rng.integers(2, 9))
        low = (rng.random((cells, cells, 3)) * 255).astype(np.uint8)
        arr = np.asarray(Image.fromarray(low, "RGB").resize((w, h), Image.BICUBIC), np.float32)
        arr = arr * rng.uniform(.3, .7) + colour() * rng.uniform(.3, .6)
    else:  # room: wall above, floor (maybe planks) below
        horizon = int(h * rng.uniform(.45, .8))
        arr = np.empty((h, w, 3), np.float32)
        arr[:horizon] = colour(rng.random() < .5)
        floor = colour()
        arr[horizon:] = floor
        if rng.random() < .5:
            period = max(2, int(w * rng.uniform(.05, .15)))
            arr[horizon:, ::period] = floor * .7
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    if kind == "clutter":
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(2, 6))):
            x, y = rng.uniform(0, w), rng.uniform(0, h)
            rw, rh = rng.uniform(.1, .35) * w, rng.uniform(.1, .35) * h
            fill = tuple(int(c) for c in colour())
            (draw.ellipse if rng.random() < .5 else draw.rectangle)(
                [x - rw / 2, y - rh / 2, x + rw / 2, y + rh / 2], fill=fill)
    return img


def _render_view(sprite, rng, w, h):
    """One photo of the product: returns JPEG bytes."""
    img = _background(rng, w, h)
    base = min(w, h)
    scale = rng.uniform(.6, .98) * base
    aspect = math.exp(rng.uniform(-.15, .15))           # viewpoint: wider or narrower
    ow, oh = max(2, int(round(scale * aspect))), max(2, int(round(scale / aspect)))
    obj = sprite.resize((ow, oh), Image.BILINEAR, reducing_gap=2.0)
    if rng.random() < .5:
        obj = obj.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # rotate premultiplied, so the transparent border does not bleed black into the edges
    obj = obj.convert("RGBa").rotate(rng.uniform(-25, 25), Image.BILINEAR, expand=True).convert("RGBA")
    cx = w / 2 + rng.uniform(-.15, .15) * w
    cy = h / 2 + rng.uniform(-.15, .15) * h
    left, top = int(round(cx - obj.width / 2)), int(round(cy - obj.height / 2))
    if rng.random() < .4:   # soft contact shadow, blurred at quarter resolution (cheap at 600 px)
        q = 4 if base >= 128 else 1
        shadow = Image.new("L", (max(1, w // q), max(1, h // q)), 0)
        sw = obj.width * rng.uniform(.5, .9)
        bottom = top + obj.height * .9
        ImageDraw.Draw(shadow).ellipse([(cx - sw / 2) / q, (bottom - .06 * base) / q,
                                        (cx + sw / 2) / q, (bottom + .04 * base) / q],
                                       fill=int(rng.uniform(60, 140)))
        shadow = shadow.filter(ImageFilter.GaussianBlur(base * .03 / q)).resize((w, h), Image.BILINEAR)
        img.paste(Image.new("RGB", (w, h), (0, 0, 0)), (0, 0), shadow)
    img.paste(obj, (left, top), obj)
    if rng.random() < .3:  # occluder: something in front of the product
        draw = ImageDraw.Draw(img)
        ow2, oh2 = rng.uniform(.12, .32) * base, rng.uniform(.12, .32) * base
        ox = cx + rng.uniform(-.5, .5) * obj.width
        oy = cy + rng.uniform(-.5, .5) * obj.height
        fill = tuple(int(c) for c in rng.uniform(0, 255, 3))
        (draw.ellipse if rng.random() < .5 else draw.rectangle)(
            [ox - ow2 / 2, oy - oh2 / 2, ox + ow2 / 2, oy + oh2 / 2], fill=fill)
    # lighting: exposure and white balance, light falling off across the scene, sensor
    # noise, then gamma (a lookup table: cheap at 600 px)
    gain = (rng.uniform(.75, 1.2) * rng.uniform(.9, 1.1, 3)).astype(np.float32)
    t = rng.uniform(0, 2 * np.pi)
    ramp = rng.uniform(0, .4) * (np.linspace(-.5, .5, w, dtype=np.float32)[None, :] * np.float32(np.cos(t))
                                 + np.linspace(-.5, .5, h, dtype=np.float32)[:, None] * np.float32(np.sin(t)))
    arr = np.asarray(img, np.float32) * (1 + ramp)[..., None]
    arr *= gain
    sigma = rng.uniform(0, 5)
    arr += rng.standard_normal(arr.shape, dtype=np.float32) * np.float32(sigma)
    np.clip(arr, 0, 255, out=arr)
    lut = np.round(255 * (np.arange(256) / 255.0) ** rng.uniform(.75, 1.3)).astype(np.uint8)
    img = Image.fromarray(lut[(arr + .5).astype(np.uint8)], "RGB")
    if rng.random() < .2:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(.3, 1.0) * base / 96))
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
    if num_products < 2:
        raise ValueError(f"num_products must be >= 2 (train and test), got {num_products}")
    if root.exists() and any(root.iterdir()) and (read_marker(root) or {}).get("source") != "synthetic":
        raise FileExistsError(f"{root} exists and is not a synthetic SOP made by datasets.py; "
                              f"choose another --root or remove it")
    plan = _product_plan(num_products, seed)
    workers = default_workers() if workers is None else workers
    tmp = make_tmp_dir(root)
    try:
        for cat in SOP_CATEGORIES:
            (tmp / f"{cat}_final").mkdir()
        jobs = [(str(tmp), cid, cat, n, seed, (lo, hi)) for cid, cat, n, _ in plan]
        bar = dict(total=len(jobs), desc="synthetic SOP", unit="product", disable=not progress)
        if workers > 1 and len(jobs) > 4 * workers:
            with mp_context().Pool(workers) as pool:
                rels = list(tqdm(pool.imap(_write_product, jobs, chunksize=8), **bar))
        else:
            rels = [_write_product(job) for job in tqdm(jobs, **bar)]
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
            "\n".join([" ".join(EBAY_HEADER)] + [f"{i} {c} {s} {p}" for i, (c, s, p)
                                                 in enumerate(info_lines, start=1)]) + "\n")
        write_marker(tmp, {"source": "synthetic", "version": SYNTHETIC_VERSION,
                            "num_products": num_products, "image_size": [lo, hi], "seed": seed,
                            "train_images": counts["train"], "test_images": counts["test"]})
        publish_dir(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def ensure_synthetic_sop(root, num_products=1200, image_size=96, seed=0, workers=None, progress=False,
                         replace=False):
    """``root`` as a Path, generated by ``make_synthetic_sop`` when absent (or empty).

    A complete synthetic SOP already there is returned as is when it was made with the same
    arguments and generator version. One made otherwise is replaced only with
    ``replace=True`` (for caches a tool owns); else FileExistsError names what differs, so a
    dataset someone pointed us at is never regenerated behind their back."""
    root = Path(root).expanduser()
    lo, hi = _parse_image_size(image_size)
    marker = read_marker(root) or {}
    wanted = {"source": "synthetic", "version": SYNTHETIC_VERSION, "num_products": num_products,
              "image_size": [lo, hi], "seed": seed}
    differs = {k: (marker.get(k), v) for k, v in wanted.items() if marker.get(k) != v}
    if not differs:
        return root
    if marker.get("source") == "synthetic" and not replace:
        detail = ", ".join(f"{k} {have!r} (wanted {want!r})" for k, (have, want) in differs.items())
        raise FileExistsError(
            f"{root} holds a synthetic SOP made with other settings: {detail}. Use it with those "
            f"settings, pass another --root, or regenerate it (`python datasets.py synthetic "
            f"--root {root} --force` with the settings you want)")
    return make_synthetic_sop(root, num_products, (lo, hi), seed, workers, progress)
