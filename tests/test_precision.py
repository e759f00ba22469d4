"""The CUDA-first switches where the CPU allows them: ``--amp`` on the CPU trains under bfloat16
autocast (no gradient scaler), ``--channels_last`` on the CPU feeds channels-last images to a
channels-last network; left out, both are on for CUDA only. Tiny runs as in test_train.py."""

import argparse
import json
import math

import pytest
from support import parse, read_rows, tiny_argv
import torch

import models
import train
from training import distributed

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(
    "flag, device, used", [(None, "cuda", True), (None, "cpu", False), (True, "cpu", True), (False, "cuda", False)]
)
def test_switches_default_to_cuda_and_follow_the_flag(flag, device, used):
    assert distributed.device_switch(flag, torch.device(device)) is used


def test_process_on_the_cpu_uses_amp_and_channels_last_when_asked():
    args = argparse.Namespace(device="cpu", amp=True, channels_last=True, progress=False)
    proc = distributed.Process.of(args, 0, 1, 0)
    assert proc.amp and proc.channels_last
    args.amp = args.channels_last = None
    proc = distributed.Process.of(args, 0, 1, 0)
    assert not proc.amp and not proc.channels_last


def watch_training_forwards(monkeypatch):
    """Record, for every forward of the backbone (`forward_features`) in train mode, (input is channels-last, output
    dtype); returns the list it fills."""
    seen = []
    build = models.build_model

    def build_and_watch(*args, **kwargs):
        model = build(*args, **kwargs)
        features = model.forward_features

        def watched(x):
            grid = features(x)
            if model.training:
                seen.append((x.is_contiguous(memory_format=torch.channels_last), grid.dtype))
            return grid

        model.forward_features = watched  # the backbone's pass (forward = forward_head(forward_features))
        return model

    monkeypatch.setattr(models, "build_model", build_and_watch)
    return seen


@pytest.mark.parametrize(
    "extra, channels_last, dtype",
    [
        (["--amp", "--channels_last"], True, torch.bfloat16),
        ([], False, torch.float32),
    ],
)
def test_cpu_training_with_and_without_amp_and_channels_last(
    tiny_sop, tmp_path, monkeypatch, extra, channels_last, dtype
):
    seen = watch_training_forwards(monkeypatch)
    start = tmp_path / "start"
    train.main(parse(tiny_argv(tiny_sop, start, "--epochs", "0", "--projector_samples", "0", "--device", "cpu")))
    seen.clear()
    out = tmp_path / "run"
    train.main(parse(tiny_argv(tiny_sop, out, "--epochs", "1", "--projector_samples", "0", "--device", "cpu", *extra)))
    assert seen and set(seen) == {(channels_last, dtype)}  # 2 training steps, each as asked
    info = json.loads((out / "runs" / "t" / "args.json").read_text())
    assert info["amp_used"] is (dtype == torch.bfloat16)
    rows = read_rows(out / "runs" / "t" / "metrics.csv")
    assert math.isfinite(float(rows[1]["train_loss"])) and math.isfinite(float(rows[1]["val_map@r"]))
    before = torch.load(start / "checkpoints" / "t" / "last.pth", weights_only=True)
    after = torch.load(out / "checkpoints" / "t" / "last.pth", weights_only=True)
    for key in ("backbone.conv1.weight", "head.0.weight"):
        assert not torch.equal(before["model"][key], after["model"][key]), key
        assert after["model"][key].dtype == torch.float32  # autocast leaves the weights in float32
    assert not after["scaler"] or after["scaler"].get("scale") is None  # bfloat16 needs no scaler
