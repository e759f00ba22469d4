"""train.py under torchrun: 2 CPU processes, gloo backend, rank-sharded P x K batches, rank 0 alone
validates / logs / saves; a DDP run resumes from its own last.pth."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import train
from test_train import assert_checkpoint_loads, read_rows, tiny_argv, tiny_sop  # noqa: F401

TRAIN = Path(train.__file__).resolve()

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="torch.distributed with gloo is not available")]


def torchrun(argv, cwd, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # --standalone: a local rendezvous on a free port, so parallel test runs do not collide.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(TRAIN), *argv]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def test_ddp_two_processes_gloo_and_resume(tiny_sop, tmp_path):
    argv = tiny_argv(tiny_sop, tmp_path, "--epochs", "1", "--device", "cpu", "--projector_samples", "4")
    out = torchrun(argv, tmp_path)
    log_dir, ckpt_dir = tmp_path / "runs" / "t", tmp_path / "checkpoints" / "t"
    assert out.count("epoch 1/1 |") == 1  # only rank 0 logs

    info = json.loads((log_dir / "args.json").read_text())
    assert info["world_size"] == 2 and info["resolved_device"] == "cpu"
    rows = read_rows(log_dir / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["0", "1"]
    # 2 steps x 16 images on each of the 2 ranks, every batch P x K (16 valid triplets)
    assert float(rows[1]["images"]) == 2 * 2 * 16
    assert float(rows[1]["train_valid_triplets"]) == 16.0
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 1
    last = assert_checkpoint_loads(ckpt_dir / "last.pth")
    assert last["epoch"] == 1
    # saved from the unwrapped model: no DistributedDataParallel "module." prefix
    assert not any(k.startswith("module.") for k in last["model"])

    # every rank resumes from last.pth and the run continues
    out = torchrun(tiny_argv(tiny_sop, tmp_path, "--epochs", "2", "--device", "cpu",
                             "--projector_samples", "0", "--resume", "auto"), tmp_path)
    assert "resuming from" in out
    rows = read_rows(log_dir / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    assert assert_checkpoint_loads(ckpt_dir / "last.pth")["epoch"] == 2


def test_ddp_ranks_get_disjoint_batches(tiny_sop):
    """The sampler train.py builds for rank r of 2: other batches on each rank, the same count
    (DDP needs equal step counts), each batch 4 products x 4 images."""
    import datasets
    class_ids = datasets.SOPDataset(tiny_sop, "train").class_ids
    batches = []
    for rank in range(2):
        sampler = datasets.build_batch_sampler("pk", class_ids, 16, 4, seed=0, num_replicas=2,
                                               rank=rank)
        sampler.set_epoch(1)
        batches.append(list(sampler))
    assert len(batches[0]) == len(batches[1]) > 0
    assert all(a != b for a, b in zip(*batches))
    for batch in batches[0] + batches[1]:
        _, counts = torch.unique(torch.as_tensor(class_ids[batch]), return_counts=True)
        assert counts.tolist() == [4, 4, 4, 4]
