"""Exact resume (--deterministic, CPU): a run resumed from last.pth ends with the same weights,
optimizer / scheduler state and metrics.csv (timing columns aside) as an uninterrupted run;
also after SIGKILLs mid-epoch and during checkpoint writes, none of which leaves a checkpoint
that fails to load.
"""
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import train
from test_train import assert_checkpoint_loads, model_rows, one_thread, parse, tiny_argv, tiny_sop  # noqa: F401

TRAIN = Path(train.__file__).resolve()
# --lr_patience 0: the plateau schedule halves the LR on every epoch without a new best, so the
# scheduler's state matters for the comparison.
EXACT = ("--deterministic", "--lr_patience", "0", "--projector_samples", "0")


def assert_same_state(a_path, b_path):
    a, b = (torch.load(p, map_location="cpu", weights_only=True) for p in (a_path, b_path))
    assert a["epoch"] == b["epoch"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for name in pa:
            assert torch.equal(pa[name], pb[name]), name
    assert a["scheduler"] == b["scheduler"]
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]


def test_resume_in_process_matches_uninterrupted(tiny_sop, tmp_path):
    full = tmp_path / "full"
    train.main(parse(tiny_argv(tiny_sop, full, *EXACT, "--epochs", "3")))
    part = tmp_path / "part"
    train.main(parse(tiny_argv(tiny_sop, part, *EXACT, "--epochs", "1")))
    final = train.main(parse(tiny_argv(tiny_sop, part, *EXACT, "--epochs", "3", "--resume", "auto")))
    assert final["epoch"] == 3
    assert_same_state(full / "checkpoints/t/last.pth", part / "checkpoints/t/last.pth")
    assert model_rows(full / "runs/t/metrics.csv") == model_rows(part / "runs/t/metrics.csv")
    # an explicit path (a run folder) resumes too; a finished run just reports its last row
    again = train.main(parse(tiny_argv(tiny_sop, part, *EXACT, "--epochs", "3", "--resume",
                                       str(part / "checkpoints/t"))))
    assert again["epoch"] == 3 and again["val_recall@1"] == final["val_recall@1"]


class _Run:
    """train.py in a subprocess; stdout lines collected by a thread so we can react to them."""

    def __init__(self, argv, cwd):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, str(TRAIN), *argv], cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def output(self):
        return "".join(self.lines)

    def wait_for_line(self, prefix, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(line.startswith(prefix) for line in self.lines):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"train.py exited ({self.proc.returncode}) before {prefix!r}:\n"
                                     + self.output())
            time.sleep(0.005)
        raise AssertionError(f"no line {prefix!r} within {timeout}s:\n{self.output()}")

    def wait_for_file(self, folder, pattern, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if list(Path(folder).glob(pattern)):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"train.py exited before {pattern} appeared:\n{self.output()}")
            time.sleep(0.001)  # a checkpoint write takes ~0.1-1 s: polling this fast catches it
        raise AssertionError(f"no {pattern} in {folder} within {timeout}s")

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)
        self._reader.join(timeout=10)
        assert self.proc.returncode == -signal.SIGKILL, self.output()

    def finish(self, timeout=300):
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        assert self.proc.returncode == 0, self.output()


def _all_checkpoints_load(ckpt_dir):
    for path in Path(ckpt_dir).glob("*.pth"):
        assert_checkpoint_loads(path)


def test_sigkill_mid_epoch_and_during_checkpoint_write_then_resume(tiny_sop, tmp_path):
    seed = int(os.environ.get("TEST_RESUME_SEED", "0"))
    rng = random.Random(seed)
    argv = lambda out: tiny_argv(tiny_sop, out, *EXACT, "--epochs", "4", "--max_steps_per_epoch",  # noqa: E731
                                 "3", "--workers", "1", "--resume", "auto")
    reference = _Run(argv(tmp_path / "ref"), tmp_path)
    reference.finish()

    out = tmp_path / "killed"
    ckpt_dir = out / "checkpoints" / "t"
    kills = []

    # 1. mid-epoch 2: shortly after epoch 1 was checkpointed and logged
    run = _Run(argv(out), tmp_path)
    run.wait_for_line("epoch 1/4 |")
    delay = rng.uniform(0.0, 0.5)
    time.sleep(delay)
    run.kill()
    kills.append(f"after 'epoch 1/4' + {delay:.2f}s")
    _all_checkpoints_load(ckpt_dir)

    # 2. during the first checkpoint write of the resumed run (epoch 2's last.pth)
    run = _Run(argv(out), tmp_path)
    run.wait_for_line("run t:")  # printed after leftovers of earlier kills were cleaned up
    run.wait_for_file(ckpt_dir, ".last.pth.*.tmp")
    run.kill()
    kills.append("while writing last.pth")
    assert "resuming from" in run.output()
    _all_checkpoints_load(ckpt_dir)

    # 3. mid-epoch again, one epoch later
    run = _Run(argv(out), tmp_path)
    run.wait_for_line("epoch 2/4 |")
    delay = rng.uniform(0.0, 0.5)
    time.sleep(delay)
    run.kill()
    kills.append(f"after 'epoch 2/4' + {delay:.2f}s")
    _all_checkpoints_load(ckpt_dir)

    # 4. during a later write: the next checkpoint after epoch 3 is logged (epoch 4's)
    run = _Run(argv(out), tmp_path)
    run.wait_for_line("epoch 3/4 |")
    run.wait_for_file(ckpt_dir, ".last.pth.*.tmp")
    run.kill()
    kills.append("while writing epoch 4's last.pth")
    _all_checkpoints_load(ckpt_dir)

    run = _Run(argv(out), tmp_path)
    run.finish()
    context = f"seed {seed}, kills: {kills}"
    assert len(kills) >= 3, context
    assert_same_state(tmp_path / "ref/checkpoints/t/last.pth", ckpt_dir / "last.pth")
    assert_same_state(tmp_path / "ref/checkpoints/t/best.pth", ckpt_dir / "best.pth")
    ref_rows = model_rows(tmp_path / "ref/runs/t/metrics.csv")
    assert [r["epoch"] for r in ref_rows] == ["0", "1", "2", "3", "4"]
    assert model_rows(out / "runs/t/metrics.csv") == ref_rows, context
    assert not list(ckpt_dir.glob(".*tmp")), "leftovers of the killed writes were not cleaned up"
