"""Exact resume (--deterministic, CPU): a run resumed from last.pth ends with the same weights,
optimizer / scheduler state and metrics.csv (timing columns aside) as an uninterrupted run;
also after SIGKILLs mid-epoch and during checkpoint writes, none of which leaves a checkpoint
that fails to load; a checkpoint and a metrics.csv in the format of earlier code load and resume.
"""

import csv
import io
import os
from pathlib import Path
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
from support import assert_checkpoint_loads, model_rows, parse, read_rows, tiny_argv
import torch

import checkpoints
import models
import train
from training import flags, runs

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

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


CONFIG = (*EXACT, "--epochs", "3", "--max_steps_per_epoch", "3", "--workers", "1")


@pytest.fixture(scope="module")
def reference(tiny_sop, tmp_path_factory):
    """An uninterrupted run (in-process, one thread like the subprocesses below)."""
    out = tmp_path_factory.mktemp("reference")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.main(parse(tiny_argv(tiny_sop, out, *CONFIG)))
    finally:
        torch.set_num_threads(previous)
    return out


def test_resume_in_process_matches_uninterrupted(tiny_sop, reference, tmp_path):
    train.main(parse(tiny_argv(tiny_sop, tmp_path, *CONFIG, "--epochs", "1")))
    final = train.main(parse(tiny_argv(tiny_sop, tmp_path, *CONFIG, "--resume", "auto")))
    assert final["epoch"] == 3
    assert_same_state(reference / "checkpoints/t/last.pth", tmp_path / "checkpoints/t/last.pth")
    assert model_rows(reference / "runs/t/metrics.csv") == model_rows(tmp_path / "runs/t/metrics.csv")
    # an explicit path (a run folder) resumes too; a finished run just reports its last row
    again = train.main(parse(tiny_argv(tiny_sop, tmp_path, *CONFIG, "--resume", str(tmp_path / "checkpoints/t"))))
    assert again["epoch"] == 3 and again["val_recall@1"] == final["val_recall@1"]


class _Run:
    """train.py in a subprocess; stdout lines collected by a thread so we can react to them."""

    def __init__(self, argv, cwd):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, str(TRAIN), *argv],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
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
                raise AssertionError(f"train.py exited ({self.proc.returncode}) before {prefix!r}:\n" + self.output())
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


def test_sigkill_mid_epoch_and_during_checkpoint_write_then_resume(tiny_sop, reference, tmp_path):
    """Three SIGKILLs at seeded random points, resuming after each, then a final resume."""
    seed = int(os.environ.get("TEST_RESUME_SEED", "0"))
    rng = random.Random(seed)
    argv = tiny_argv(tiny_sop, tmp_path, *CONFIG, "--resume", "auto")
    ckpt_dir = tmp_path / "checkpoints" / "t"
    kills = []

    # 1. mid-epoch 2: a random moment after epoch 1 was checkpointed and logged
    run = _Run(argv, tmp_path)
    run.wait_for_line("epoch 1/3 |")
    delay = rng.uniform(0.0, 0.5)
    time.sleep(delay)
    run.kill()
    kills.append(f"after 'epoch 1/3' + {delay:.2f}s")
    _all_checkpoints_load(ckpt_dir)

    # 2. during the first checkpoint write of the resumed run (epoch 2's last.pth)
    run = _Run(argv, tmp_path)
    run.wait_for_line("run t:")  # printed after leftovers of earlier kills were cleaned up
    run.wait_for_file(ckpt_dir, ".last.pth.*.tmp")
    run.kill()
    kills.append("while writing epoch 2's last.pth")
    assert "resuming from" in run.output() and "(finished epoch 1)" in run.output(), run.output()
    _all_checkpoints_load(ckpt_dir)

    # 3. mid-epoch 3 (or in its validation / checkpoint write: the delay is random)
    run = _Run(argv, tmp_path)
    run.wait_for_line("epoch 2/3 |")
    delay = rng.uniform(0.0, 1.0)
    time.sleep(delay)
    run.kill()
    kills.append(f"after 'epoch 2/3' + {delay:.2f}s")
    _all_checkpoints_load(ckpt_dir)

    run = _Run(argv, tmp_path)
    run.finish()
    context = f"seed {seed}, kills: {kills}"
    assert_same_state(reference / "checkpoints/t/last.pth", ckpt_dir / "last.pth")
    assert_same_state(reference / "checkpoints/t/best.pth", ckpt_dir / "best.pth")
    ref_rows = model_rows(reference / "runs/t/metrics.csv")
    assert [r["epoch"] for r in ref_rows] == ["0", "1", "2", "3"]
    assert model_rows(tmp_path / "runs/t/metrics.csv") == ref_rows, context
    assert not list(ckpt_dir.glob(".*tmp")), "leftovers of the killed writes were not cleaned up"


# ============ files of earlier code ============


def legacy_checkpoint(path, args, epochs=1):
    """A last.pth as train.py wrote it before training/ existed, built by hand from the keys
    models.py documents (CHECKPOINT_KEYS) plus the ones train.py adds (history, best_score,
    select_metric, criterion, bad_paths); the tiny_argv model (resnet18, mlp head, 32 px)."""
    torch.manual_seed(0)
    model = models.build_model("resnet18", 128, weights="none", dropout=0.2, image_size=32)
    optimizer = torch.optim.Adam(
        [
            {"name": "backbone", "params": list(model.backbone.parameters()), "lr": 1e-3},
            {"name": "head", "params": list(model.head.parameters()), "lr": 1e-3},
        ],
        lr=1e-3,
        weight_decay=1e-5,
    )
    model.train()
    for _ in range(2):  # a few real steps: Adam's moments are in the state, as after training
        optimizer.zero_grad()
        model(torch.randn(4, 3, 32, 32)).sum().backward()
        optimizer.step()
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=3)
    history = [
        {
            "epoch": e,
            "val_recall@1": 0.1 * (e + 1),
            "val_map@r": 0.05 * (e + 1),
            "lr": 1e-3,
            "bad_images": 0.0,
            **({"train_loss": 0.3} if e else {}),
        }
        for e in range(epochs + 1)
    ]
    ckpt = {
        "format_version": 1,
        "model": model.state_dict(),
        "model_args": {"backbone": "resnet18", "embedding_size": 128, "dropout": 0.2, "image_size": 32, "head": "mlp"},
        "args": dict(args),
        "epoch": epochs,
        "metrics": dict(history[-1]),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": {},
        "rng": checkpoints.capture_rng_state(),
        "git_commit": "3bbb246",
        "history": history,
        "best_score": history[-1]["val_map@r"],
        "select_metric": "map@r",
        "criterion": None,
        "bad_paths": {"train": [], "val": []},
    }
    assert set(checkpoints.CHECKPOINT_KEYS) <= set(ckpt)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return ckpt


def test_checkpoint_of_earlier_code_loads_and_resumes(tiny_sop, tmp_path):
    argv = tiny_argv(tiny_sop, tmp_path, "--epochs", "2", "--projector_samples", "0")
    last = tmp_path / "checkpoints" / "t" / "last.pth"
    old = legacy_checkpoint(last, vars(flags.resolve_recipe(parse(argv))))
    model = models.load_model(last)  # evaluate.py / the demo
    assert model.model_args == old["model_args"] and model.checkpoint_info["epoch"] == 1
    for key, value in old["model"].items():
        assert torch.equal(model.state_dict()[key], value), key
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 128)

    final = train.main(parse(argv + ["--resume", "auto"]))  # train.py --resume
    assert final["epoch"] == 2
    rows = read_rows(tmp_path / "runs" / "t" / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]  # the old history, then the new epoch
    assert float(rows[1]["val_recall@1"]) == old["history"][1]["val_recall@1"]
    new = assert_checkpoint_loads(last)
    assert new["epoch"] == 2 and [h["epoch"] for h in new["history"]] == [0, 1, 2]
    assert len(new["optimizer"]["param_groups"]) == 2


def test_metrics_csv_of_earlier_code_reads_back_exactly(tmp_path):
    """metrics.csv as the csv module wrote it (before pandas): CRLF rows, repr floats, empty
    cells, an inf, columns of an older run; read back value for value, and written again
    byte for byte."""
    header = ["epoch", "train_loss", "val_recall@1", "lr", "images_per_sec"]
    rows = [["0", "", "0.30000000000000004", "0.0001", ""], ["1", "0.123456789012345", "1e-17", "5e-05", "inf"]]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    path = tmp_path / "metrics.csv"
    path.write_bytes(buf.getvalue().encode())
    back = runs.read_metrics_csv(path)
    assert back == [
        {"epoch": 0.0, "train_loss": None, "val_recall@1": 0.30000000000000004, "lr": 1e-4, "images_per_sec": None},
        {
            "epoch": 1.0,
            "train_loss": 0.123456789012345,
            "val_recall@1": 1e-17,
            "lr": 5e-5,
            "images_per_sec": float("inf"),
        },
    ]
    history = [{k: (int(v) if k == "epoch" else v) for k, v in row.items() if v is not None} for row in back]
    runs.write_metrics_csv(tmp_path / "again.csv", history)
    assert (tmp_path / "again.csv").read_bytes() == path.read_bytes()
    empty = tmp_path / "empty.csv"  # a file cut before its header: no epoch recorded
    empty.write_text("")
    assert runs.read_metrics_csv(empty) == []
