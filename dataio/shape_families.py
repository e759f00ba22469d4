"""The shape families of the synthetic SOP: one drawing function per category, which draws a
product's geometry (drawn per product from ``Sketch``'s random source) as ops in unit
coordinates, and ``draw_op``, which renders one such op with PIL."""

import math

import numpy as np


class Sketch:
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
    r, wb, cy = s.u(0.15, 0.21), s.u(0.5, 0.62), 0.68
    h1, h2 = 0.5 - wb / 2, 0.5 + wb / 2
    tyre, spokes = s.u(0.02, 0.045), s.pick([0, 6, 8, 12, 16])
    for hx in (h1, h2):
        s.add("back", "ring", (hx - r, cy - r, hx + r, cy + r), "dark", width=tyre)
        for j in range(spokes):
            a = math.pi * j / max(spokes, 1) * 2
            s.add(
                "back",
                "line",
                [(hx, cy), (hx + 0.9 * r * math.cos(a), cy + 0.9 * r * math.sin(a))],
                "metal",
                width=0.006,
            )
        s.add("back", "ellipse", (hx - 0.02, cy - 0.02, hx + 0.02, cy + 0.02), "metal")
    bb = (0.5 + s.u(-0.06, 0.04), cy + s.u(-0.02, 0.04))
    seat = (bb[0] - s.u(0.02, 0.1), cy - s.u(0.3, 0.4))
    head = (h2 - s.u(0.06, 0.12), cy - s.u(0.26, 0.38))
    fw = s.u(0.022, 0.045)
    top = (seat[0] + 0.01, seat[1] + (s.u(0.12, 0.2) if s.chance(0.25) else 0.03))  # step-through
    for a, b in [((h1, cy), bb), ((h1, cy), seat), (bb, seat), (top, head), (bb, head), (head, (h2, cy))]:
        s.add("body", "line", [a, b], width=fw)
    s.add(
        "front",
        "poly",
        [
            (seat[0] - 0.07, seat[1] - 0.02),
            (seat[0] + 0.05, seat[1] - 0.03),
            (seat[0] + 0.04, seat[1] + 0.01),
            (seat[0] - 0.06, seat[1] + 0.01),
        ],
        "dark",
    )
    bar = (head[0] - s.u(-0.02, 0.05), head[1] - s.u(0.05, 0.1))
    s.add(
        "front",
        "line",
        [head, bar, (bar[0] + s.u(-0.08, 0.08), bar[1] + s.u(-0.02, 0.05))],
        s.pick(["dark", "metal"]),
        width=0.015,
    )
    if s.chance(0.35):  # rear rack
        s.add("front", "rect", (h1 - 0.05, seat[1] + 0.06, h1 + 0.12, seat[1] + 0.09), "accent")
    if s.chance(0.3):  # front basket
        s.add("front", "rect", (bar[0] - 0.02, bar[1] + 0.02, bar[0] + 0.14, bar[1] + 0.12), "accent")
    if s.chance(0.3):  # mudguards
        for hx in (h1, h2):
            s.add(
                "front",
                "arc",
                (hx - r - 0.02, cy - r - 0.02, hx + r + 0.02, cy + r + 0.02),
                "accent",
                start=200,
                end=340,
                width=0.015,
            )


def _cabinet(s):
    w, h = s.u(0.4, 0.7), s.u(0.5, 0.78)
    x0, y0 = 0.5 - w / 2, 0.46 - h / 2
    legs = s.chance(0.5)
    if legs:
        for lx in (x0 + 0.03, x0 + w - 0.06):
            s.add("back", "rect", (lx, y0 + h - 0.02, lx + 0.03, y0 + h + 0.08), "dark")
    s.add("body", "rect", (x0, y0, x0 + w, y0 + h), radius=s.u(0, 0.03))
    if s.chance(0.6):
        s.add("front", "rect", (x0 - 0.02, y0 - 0.03, x0 + w + 0.02, y0 + 0.01), s.pick(["accent", "dark"]))
    n_col, n_dr = int(s.rng.integers(1, 4)), int(s.rng.integers(0, 4))
    dh = h * s.u(0.12, 0.2)
    knob, glass = s.chance(0.5), s.chance(0.25)
    handle_role = s.pick(["metal", "dark", "accent"])
    for j in range(n_dr):
        y = y0 + 0.02 + j * dh
        s.add("front", "rectline", (x0 + 0.02, y, x0 + w - 0.02, y + dh - 0.01), "dark", width=0.008)
        s.add("front", "rect", (0.5 - 0.05, y + dh / 2 - 0.01, 0.5 + 0.05, y + dh / 2 + 0.01), handle_role)
    top = y0 + 0.02 + n_dr * dh
    cw = (w - 0.04) / n_col
    for c in range(n_col):
        cx0 = x0 + 0.02 + c * cw
        s.add("front", "rectline", (cx0, top, cx0 + cw - 0.01, y0 + h - 0.02), "dark", width=0.008)
        if glass:
            s.add("front", "rect", (cx0 + 0.03, top + 0.03, cx0 + cw - 0.04, y0 + h - 0.05), "light")
        hx = cx0 + (cw - 0.05 if c % 2 == 0 else 0.04)
        if knob:
            s.add("front", "ellipse", (hx - 0.015, top + 0.1, hx + 0.015, top + 0.13), handle_role)
        else:
            s.add("front", "rect", (hx - 0.008, top + 0.06, hx + 0.008, top + 0.16), handle_role)


def _chair(s):
    seat_y, sw, st = s.u(0.5, 0.6), s.u(0.34, 0.5), s.u(0.04, 0.08)
    x0 = 0.5 - sw / 2
    lw, splay = s.u(0.02, 0.045), s.u(0, 0.06)
    leg = s.pick(["dark", "accent", "metal", "body"])
    for lx, d in ((x0 + 0.06, -1), (x0 + sw - 0.06, 1)):
        s.add("back", "line", [(lx, seat_y), (lx + d * splay * 0.5, 0.86)], leg, width=lw)
    bh, style = s.u(0.25, 0.4), int(s.rng.integers(4))
    by0 = seat_y - bh
    if style == 0:
        s.add("body", "rect", (x0, by0, x0 + sw, seat_y), radius=s.u(0, 0.06))
    elif style == 1:  # vertical slats
        s.add("body", "rect", (x0, by0, x0 + sw, by0 + 0.06), radius=0.01)
        n = int(s.rng.integers(3, 6))
        for j in range(n):
            sx = x0 + 0.02 + j * (sw - 0.06) / max(n - 1, 1)
            s.add("body", "rect", (sx, by0, sx + 0.03, seat_y))
    elif style == 2:  # rounded top
        s.add("body", "ellipse", (x0, by0 - 0.08, x0 + sw, by0 + 0.14))
        s.add("body", "rect", (x0 + 0.03, by0 + 0.03, x0 + sw - 0.03, seat_y))
    else:  # ladder back
        for lx in (x0, x0 + sw - 0.03):
            s.add("body", "rect", (lx, by0, lx + 0.03, seat_y))
        n = int(s.rng.integers(2, 5))
        for j in range(n):
            y = by0 + 0.02 + j * (bh - 0.08) / max(n - 1, 1)
            s.add("body", "rect", (x0, y, x0 + sw, y + 0.035))
    s.add("body", "rect", (x0 - 0.02, seat_y, x0 + sw + 0.02, seat_y + st), radius=0.01)
    for lx, d in ((x0 + 0.01, -1), (x0 + sw - 0.01, 1)):
        s.add("front", "line", [(lx, seat_y + st), (lx + d * splay, 0.93)], leg, width=lw)
    if s.chance(0.35):
        for lx in (x0 - 0.03, x0 + sw + 0.03):
            s.add("front", "line", [(lx, seat_y - 0.12), (lx, seat_y)], "accent", width=0.025)
        s.add("front", "line", [(x0 - 0.05, seat_y - 0.12), (x0 + 0.08, seat_y - 0.12)], "accent", width=0.025)
    if s.chance(0.3):
        s.add("front", "rect", (x0, seat_y - 0.03, x0 + sw, seat_y + 0.01), "accent", radius=0.015)


def _coffee_maker(s):
    bw, left = s.u(0.45, 0.6), s.chance(0.5)
    x0, x1, base_y = 0.5 - bw / 2, 0.5 + bw / 2, 0.82
    tw, top_y = s.u(0.16, 0.26), s.u(0.14, 0.28)
    tx0, tx1 = (x0, x0 + tw) if left else (x1 - tw, x1)
    s.add("body", "rect", (x0, base_y - 0.07, x1, base_y), radius=0.015)
    s.add("body", "rect", (tx0, top_y, tx1, base_y - 0.05), radius=s.u(0, 0.04))
    hh = s.u(0.1, 0.16)
    s.add("body", "rect", (x0, top_y, x1, top_y + hh), radius=s.u(0.01, 0.05))
    cx0, cx1 = (tx1 + 0.03, x1 - 0.03) if left else (x0 + 0.03, tx0 - 0.03)
    cy0 = top_y + hh + 0.03
    s.add("front", "poly", [(cx0 + 0.03, cy0), (cx1 - 0.03, cy0), (cx1, base_y - 0.08), (cx0, base_y - 0.08)], "light")
    level = s.u(0.3, 0.8)
    ly = base_y - 0.08 - level * (base_y - 0.08 - cy0)
    s.add("front", "poly", [(cx0 + 0.01, ly), (cx1 - 0.01, ly), (cx1, base_y - 0.08), (cx0, base_y - 0.08)], "dark")
    hx = cx1 if left else cx0
    s.add("front", "ring", (hx - 0.04, cy0 + 0.04, hx + 0.04, cy0 + 0.16), "accent", width=0.018)
    for j in range(int(s.rng.integers(1, 5))):
        bx = (tx0 + tx1) / 2
        by = top_y + hh + 0.06 + j * 0.06
        s.add("front", "ellipse", (bx - 0.018, by - 0.018, bx + 0.018, by + 0.018), "accent")
    if s.chance(0.5):
        s.add("front", "rect", (tx0 + 0.02, top_y + 0.03, tx1 - 0.02, top_y + 0.08), "dark")


def _fan(s):
    if s.chance(0.25):  # tower fan
        w, h = s.u(0.18, 0.28), s.u(0.6, 0.75)
        x0, y0 = 0.5 - w / 2, 0.86 - h
        s.add("back", "ellipse", (0.5 - w * 0.9, 0.84, 0.5 + w * 0.9, 0.92), "dark")
        s.add("body", "rect", (x0, y0, x0 + w, 0.87), radius=s.u(0.02, 0.09))
        n = int(s.rng.integers(3, 8))
        for j in range(n):
            sx = x0 + 0.04 + j * (w - 0.08) / max(n - 1, 1)
            s.add("front", "line", [(sx, y0 + 0.15), (sx, 0.8)], "dark", width=0.01)
        s.add("front", "rect", (x0 + 0.03, y0 + 0.03, x0 + w - 0.03, y0 + 0.1), "accent", radius=0.02)
        return
    bw = s.u(0.3, 0.45)
    cy, rh = s.u(0.3, 0.4), s.u(0.2, 0.28)
    s.add("back", "ellipse", (0.5 - bw / 2, 0.86, 0.5 + bw / 2, 0.94), "dark")
    s.add("back", "line", [(0.5, 0.9), (0.5, cy)], s.pick(["metal", "dark"]), width=s.u(0.02, 0.04))
    nb, off, bwid = s.pick([3, 4, 5]), s.u(0, math.pi), s.u(0.3, 0.5)
    for j in range(nb):
        a = off + 2 * math.pi * j / nb
        pts = []
        for t in np.linspace(0, 2 * math.pi, 16, endpoint=False):
            along, across = 0.45 * rh * (1 + math.cos(t)), bwid * rh * 0.5 * math.sin(t)
            pts.append(
                (0.5 + along * math.cos(a) - across * math.sin(a), cy + along * math.sin(a) + across * math.cos(a))
            )
        s.add("body", "poly", pts)
    for j in range(int(s.rng.integers(2, 5))):
        rr = rh * (j + 1) / 4.5
        s.add("front", "ring", (0.5 - rr, cy - rr, 0.5 + rr, cy + rr), "metal", width=0.006)
    for j in range(s.pick([8, 12, 16])):
        a = 2 * math.pi * j / 16
        s.add("front", "line", [(0.5, cy), (0.5 + rh * math.cos(a), cy + rh * math.sin(a))], "metal", width=0.005)
    s.add("front", "ring", (0.5 - rh, cy - rh, 0.5 + rh, cy + rh), "accent", width=0.018)
    hub = s.u(0.03, 0.06)
    s.add("front", "ellipse", (0.5 - hub, cy - hub, 0.5 + hub, cy + hub), "accent")


def _kettle(s):
    w, h, bottom = s.u(0.38, 0.52), s.u(0.38, 0.55), 0.82
    x0, top = 0.5 - w / 2, bottom - h
    d = s.pick([-1, 1])  # spout side
    sx = 0.5 + d * w / 2
    s.add(
        "back",
        "poly",
        [
            (sx - d * 0.03, top + h * 0.45),
            (sx - d * 0.03, top + h * 0.7),
            (sx + d * s.u(0.1, 0.16), top + h * s.u(0.05, 0.3)),
        ],
        "body",
    )
    if s.chance(0.5):  # handle over the top
        s.add(
            "back",
            "arc",
            (x0 + 0.06, top - h * 0.35, x0 + w - 0.06, top + h * 0.3),
            "accent",
            start=180,
            end=360,
            width=s.u(0.025, 0.045),
        )
    else:
        hx = 0.5 - d * w / 2
        s.add("back", "ring", (hx - 0.1, top + h * 0.15, hx + 0.1, top + h * 0.75), "accent", width=s.u(0.025, 0.045))
    shape = int(s.rng.integers(3))
    if shape == 0:
        s.add("body", "ellipse", (x0, top, x0 + w, bottom + 0.03))
    elif shape == 1:
        s.add("body", "poly", [(x0 + w * 0.22, top), (x0 + w * 0.78, top), (x0 + w, bottom), (x0, bottom)])
    else:
        s.add("body", "rect", (x0, top, x0 + w, bottom), radius=s.u(0.02, 0.08))
    s.add("front", "ellipse", (0.5 - w * 0.25, top - 0.025, 0.5 + w * 0.25, top + 0.025), "accent")
    s.add("front", "ellipse", (0.5 - 0.02, top - 0.05, 0.5 + 0.02, top - 0.01), "dark")
    if s.chance(0.6):
        s.add("front", "ellipse", (x0 - 0.02, bottom - 0.02, x0 + w + 0.02, bottom + 0.04), "dark")
    if s.chance(0.3):
        s.add("front", "rect", (0.5 - 0.025, top + h * 0.25, 0.5 + 0.025, top + h * 0.8), "light", radius=0.02)


def _lamp(s):
    bw = s.u(0.2, 0.34)
    base = s.pick(["dark", "metal", "accent"])
    if s.chance(0.5):
        s.add("back", "ellipse", (0.5 - bw / 2, 0.87, 0.5 + bw / 2, 0.94), base)
    else:
        s.add("back", "rect", (0.5 - bw / 2, 0.86, 0.5 + bw / 2, 0.93), base, radius=0.01)
    top_y, sh = s.u(0.08, 0.2), s.u(0.18, 0.3)
    stem, sw = s.pick(["metal", "dark", "accent"]), s.u(0.015, 0.03)
    if s.chance(0.4):  # angled arm with a joint
        jx, jy = 0.5 + s.pick([-1, 1]) * s.u(0.08, 0.18), s.u(0.45, 0.6)
        s.add("back", "line", [(0.5, 0.88), (jx, jy), (0.5, top_y + sh)], stem, width=sw)
        s.add("back", "ellipse", (jx - 0.025, jy - 0.025, jx + 0.025, jy + 0.025), "dark")
    else:
        s.add("back", "line", [(0.5, 0.88), (0.5, top_y + sh)], stem, width=sw)
    if s.chance(0.4):
        s.add("back", "ellipse", (0.5 - 0.05, top_y + sh - 0.04, 0.5 + 0.05, top_y + sh + 0.06), "light")
    if s.chance(0.35):  # dome
        dw = s.u(0.3, 0.48)
        s.add("body", "pie", (0.5 - dw / 2, top_y, 0.5 + dw / 2, top_y + 2 * sh), start=180, end=360)
        y_trim, half = top_y + sh, dw / 2
    else:
        tw, bw2 = s.u(0.14, 0.3), s.u(0.3, 0.5)
        s.add(
            "body",
            "poly",
            [(0.5 - tw / 2, top_y), (0.5 + tw / 2, top_y), (0.5 + bw2 / 2, top_y + sh), (0.5 - bw2 / 2, top_y + sh)],
        )
        y_trim, half = top_y + sh, bw2 / 2
    if s.chance(0.4):
        s.add("front", "line", [(0.5 - half, y_trim), (0.5 + half, y_trim)], "accent", width=0.02)


def _mug(s):
    w, h = s.u(0.34, 0.48), s.u(0.38, 0.55)
    x0, top = 0.46 - w / 2, 0.52 - h / 2
    right = s.chance(0.8)
    hw, hh = s.u(0.1, 0.18), h * s.u(0.4, 0.65)
    hx0 = x0 + w - 0.05 if right else x0 - hw + 0.05
    s.add(
        "back",
        "ring",
        (hx0, top + h * 0.15, hx0 + hw, top + h * 0.15 + hh),
        s.pick(["body", "accent"]),
        width=s.u(0.03, 0.06),
    )
    if s.chance(0.3):
        s.add("back", "ellipse", (x0 - 0.1, top + h - 0.03, x0 + w + 0.1, top + h + 0.06), s.pick(["accent", "light"]))
    s.add("body", "rect", (x0, top, x0 + w, top + h), radius=s.u(0.01, 0.06))
    s.add("front", "ellipse", (x0, top - 0.03, x0 + w, top + 0.03), "dark")
    if s.chance(0.4):
        s.add("front", "line", [(x0, top + 0.005), (x0 + w, top + 0.005)], "accent", width=0.012)


def _sofa(s):
    w, seat_y, bh = s.u(0.66, 0.86), s.u(0.48, 0.56), s.u(0.16, 0.24)
    x0, x1 = 0.5 - w / 2, 0.5 + w / 2
    back_h, aw = s.u(0.14, 0.28), s.u(0.06, 0.12)
    leg = s.pick(["dark", "metal", None])
    if leg:
        for lx in (x0 + 0.04, 0.5, x1 - 0.06)[:: 1 if s.chance(0.5) else 2]:
            s.add("back", "rect", (lx, seat_y + bh - 0.02, lx + 0.025, seat_y + bh + 0.06), leg)
    s.add("body", "rect", (x0 + aw * 0.5, seat_y - back_h, x1 - aw * 0.5, seat_y + 0.02), radius=s.u(0.01, 0.05))
    s.add("body", "rect", (x0, seat_y, x1, seat_y + bh), radius=0.02)
    arm_top = seat_y - s.u(0.03, 0.12)
    for ax in (x0, x1 - aw):
        s.add("body", "rect", (ax, arm_top, ax + aw, seat_y + bh), radius=s.u(0.01, 0.04))
    n = int(s.rng.integers(1, 5))
    inner = (x1 - aw) - (x0 + aw)
    for j in range(1, n):
        cx = x0 + aw + inner * j / n
        s.add("front", "line", [(cx, seat_y - back_h + 0.03), (cx, seat_y + 0.06)], "dark", width=0.008)
    s.add("front", "line", [(x0 + aw, seat_y + 0.06), (x1 - aw, seat_y + 0.06)], "dark", width=0.008)
    if s.chance(0.5):
        for px in [x0 + aw + 0.02] + ([x1 - aw - 0.14] if s.chance(0.6) else []):
            s.add("front", "rect", (px, seat_y - 0.12, px + 0.12, seat_y + 0.01), "accent", radius=0.02)


def _stapler(s):
    length = s.u(0.6, 0.8)
    x0, base_y = 0.5 - length / 2, s.u(0.6, 0.66)
    s.add("back", "rect", (x0, base_y, x0 + length, base_y + 0.05), s.pick(["dark", "metal"]), radius=0.01)
    back_h, front_h = s.u(0.1, 0.2), s.u(0.04, 0.09)
    front_x, bump = x0 + length * s.u(0.9, 1.0), s.u(0, 0.04)
    s.add(
        "body",
        "poly",
        [
            (x0, base_y),
            (x0, base_y - back_h),
            ((x0 + front_x) / 2, base_y - back_h * 0.7 - bump),
            (front_x, base_y - front_h),
            (front_x, base_y - 0.005),
        ],
    )
    s.add("front", "ellipse", (x0 + 0.01, base_y - 0.05, x0 + 0.06, base_y), "accent")
    if s.chance(0.5):
        s.add(
            "front",
            "line",
            [(x0 + 0.05, base_y - back_h * 0.6), (front_x - 0.04, base_y - front_h * 0.6)],
            "accent",
            width=0.015,
        )
    s.add("front", "rect", (front_x - 0.05, base_y - front_h, front_x, base_y - 0.005), "metal", radius=0.01)


def _table(s):
    w, th, top_y = s.u(0.6, 0.86), s.u(0.03, 0.07), s.u(0.32, 0.45)
    x0, x1 = 0.5 - w / 2, 0.5 + w / 2
    leg, style, lw = s.pick(["accent", "dark", "metal", "body"]), int(s.rng.integers(4)), s.u(0.025, 0.05)
    if style == 0:  # four straight legs
        for lx in (x0 + 0.06, x1 - 0.06 - lw):
            s.add("back", "rect", (lx + 0.04, top_y, lx + lw + 0.04, 0.86), leg)
        for lx in (x0 + 0.02, x1 - 0.02 - lw):
            s.add("front", "rect", (lx, top_y + th, lx + lw, 0.9), leg)
    elif style == 1:  # splayed
        for lx, d in ((x0 + 0.06, -1), (x1 - 0.06, 1)):
            s.add("front", "line", [(lx, top_y + th), (lx + d * 0.06, 0.9)], leg, width=lw)
    elif style == 2:  # pedestal
        s.add("back", "rect", (0.5 - lw, top_y, 0.5 + lw, 0.88), leg)
        s.add("back", "ellipse", (0.5 - w * 0.3, 0.85, 0.5 + w * 0.3, 0.92), leg)
    else:  # trestle
        for cx in (x0 + 0.12, x1 - 0.12):
            s.add("front", "line", [(cx - 0.07, 0.9), (cx, top_y + th), (cx + 0.07, 0.9)], leg, width=lw)
    if s.chance(0.35):
        s.add("body", "ellipse", (x0, top_y - th, x1, top_y + th))
    else:
        s.add("body", "rect", (x0, top_y, x1, top_y + th), radius=s.u(0, 0.02))
    if s.chance(0.5):
        s.add("body", "rect", (x0 + 0.04, top_y + th, x1 - 0.04, top_y + th + s.u(0.03, 0.07)))
    if s.chance(0.3):
        s.add("front", "rect", (x0 + 0.05, 0.72, x1 - 0.05, 0.75), leg)


def _toaster(s):
    w, h, bottom = s.u(0.5, 0.7), s.u(0.32, 0.46), 0.78
    x0, top = 0.5 - w / 2, bottom - h
    depth = s.u(0.05, 0.1)
    s.add("back", "poly", [(x0 + depth, top - depth), (x0 + w + depth, top - depth), (x0 + w, top), (x0, top)], "metal")
    n_slots = s.pick([1, 2, 2, 4])
    for j in range(n_slots):
        sx = x0 + w * (j + 1) / (n_slots + 1)
        s.add(
            "back",
            "line",
            [(sx - 0.06 + depth * 0.6, top - depth * 0.55), (sx + 0.06 + depth * 0.4, top - depth * 0.45)],
            "dark",
            width=0.018,
        )
    s.add("body", "rect", (x0, top, x0 + w, bottom), radius=s.u(0.03, 0.12))
    s.add("front", "rect", (x0 + w - 0.07, top + h * 0.2, x0 + w - 0.03, top + h * 0.28), "accent", radius=0.01)
    for j in range(int(s.rng.integers(1, 4))):
        cx = x0 + w - 0.05
        cy = top + h * 0.45 + j * 0.07
        s.add("front", "ellipse", (cx - 0.022, cy - 0.022, cx + 0.022, cy + 0.022), s.pick(["accent", "dark"]))
    if s.chance(0.4):
        s.add("front", "rect", (x0, top + h * 0.55, x0 + w - 0.1, top + h * 0.62), "metal")
    for fx in (x0 + 0.05, x0 + w - 0.09):
        s.add("front", "rect", (fx, bottom - 0.005, fx + 0.04, bottom + 0.02), "dark")


FAMILIES = {
    "bicycle": _bicycle,
    "cabinet": _cabinet,
    "chair": _chair,
    "coffee_maker": _coffee_maker,
    "fan": _fan,
    "kettle": _kettle,
    "lamp": _lamp,
    "mug": _mug,
    "sofa": _sofa,
    "stapler": _stapler,
    "table": _table,
    "toaster": _toaster,
}


def _pixels(points, size):
    return [(x * size, y * size) for x, y in points]


def draw_op(draw, kind, xy, fill, kw, size):
    """Draw one op of a Sketch (``kind``, unit-coordinate ``xy``, options ``kw``) with ``fill`` on
    an ImageDraw of ``size``×``size`` pixels."""
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
        draw.polygon(_pixels(xy, size), fill=fill)
    elif kind == "line":
        draw.line(_pixels(xy, size), fill=fill, width=width, joint="curve")
    else:
        raise ValueError(f"unknown drawing op {kind!r}")
