"""search/shards.py and the shards.py entry script: sharded gallery embedding resumes after a
kill without redoing finished shards, equals the single-process embedding exactly, splits
across torchrun processes (gloo), and finds the data of a checkpoint that stored none."""

import os
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist

import checkpoints
from dataio import catalogue
import datasets
import extraction
import models
import preprocessing
from search import shards
from search.index import load_fresh_index
import shards as shards_script  # the entry script

SHARDS = Path(shards_script.__file__).resolve()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def gallery(tiny_synthetic_root):
    torch.manual_seed(0)
    model = models.build_model("resnet18", weights="none", image_size=32).eval()
    dataset = datasets.SOPDataset(tiny_synthetic_root, "test", transform=preprocessing.build_transform(32))
    return model, dataset


class Killed(Exception):
    pass


class Counting(torch.nn.Module):
    """The model, counting forward calls; raises Killed at call ``kill_at`` (a kill)."""

    def __init__(self, model, kill_at=None):
        super().__init__()
        self.model, self.kill_at, self.calls = model, kill_at, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.kill_at:
            raise Killed
        return self.model(x)


def reference(model, dataset, batch_size):
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    return extraction.extract_embeddings(model, loader, progress=False)[0]


def test_killed_extraction_resumes_to_identical_embeddings(gallery, tmp_path):
    model, dataset = gallery
    n, shard, batch = len(dataset), 16, 8
    ranges = shards.shard_ranges(n, shard)
    assert len(ranges) >= 3
    out = tmp_path / "shards"
    killed = Counting(model, kill_at=5)  # mid-way through the third shard (2 batches a shard)
    with pytest.raises(Killed):
        shards.embed_shards(killed, dataset, out, shard, batch, checkpoint_hash="ab", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard_000000.npy", "shard_000001.npy"]

    resumed = Counting(model)
    done = shards.embed_shards(resumed, dataset, out, shard, batch, checkpoint_hash="ab", progress=False)
    assert done == list(range(2, len(ranges)))  # finished shards are not redone
    assert resumed.calls == sum(-(-(b - a) // batch) for a, b in ranges[2:])
    merged = shards.merge_shards(out, n, shard)
    assert isinstance(merged, np.memmap)
    np.testing.assert_array_equal(merged, reference(model, dataset, batch))
    # a damaged shard is redone; a finished job redoes nothing
    shards.shard_path(out, 1).write_bytes(b"half a shard")
    assert shards.embed_shards(model, dataset, out, shard, batch, checkpoint_hash="ab", progress=False) == [1]
    np.testing.assert_array_equal(shards.merge_shards(out, n, shard), merged)


def test_foreign_shard_folder_and_bad_sizes_are_refused(gallery, tmp_path):
    model, dataset = gallery
    out = tmp_path / "shards"
    shards.embed_shards(model, dataset, out, 16, 8, checkpoint_hash="ab", progress=False)
    with pytest.raises(ValueError, match="manifest.json describes other shards .*checkpoint_hash"):
        shards.embed_shards(model, dataset, out, 16, 8, checkpoint_hash="cd", progress=False)
    with pytest.raises(ValueError, match="multiple of batch_size"):
        shards.embed_shards(model, dataset, tmp_path / "b", 12, 8, progress=False)
    shards.shard_path(out, 0).unlink()
    with pytest.raises(FileNotFoundError, match="shard_000000.npy"):
        shards.merge_shards(out, len(dataset), 16)


@pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available"
)
@pytest.mark.slow
def test_torchrun_two_processes_equal_one(gallery, tiny_synthetic_root, tmp_path):
    model, dataset = gallery
    ckpt = tmp_path / "best.pth"
    checkpoints.atomic_save(
        checkpoints.make_checkpoint(model, args={"data_root": str(tiny_synthetic_root)}, epoch=0, metrics={}), ckpt
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    argv = ["--checkpoint", str(ckpt), "--shard_size", "16", "--batch_size", "8"]
    one = [sys.executable, str(SHARDS), *argv, "--out", str(tmp_path / "one")]
    two = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(SHARDS),
        *argv,
        "--out",
        str(tmp_path / "two"),
        "--gallery_index",
        str(tmp_path / "gallery.npz"),
    ]
    for cmd in (one, two):
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 0: embedded shards [0, 2" in proc.stdout and "rank 1: embedded shards [1, 3" in proc.stdout
    merged = np.load(tmp_path / "two" / "embeddings.npy")
    np.testing.assert_array_equal(merged, np.load(tmp_path / "one" / "embeddings.npy"))
    index, why = load_fresh_index(
        tmp_path / "gallery.npz", checkpoints.checkpoint_hash(ckpt), dataset.rel_paths, index_type="exact"
    )
    assert why is None
    np.testing.assert_array_equal(index.embeddings, merged)


def test_checkpoint_without_data_root_uses_its_datasets_folder(gallery, tiny_synthetic_root, tmp_path, monkeypatch):
    """train.py --dataset synthetic without --data_root stores data_root: null; the gallery is
    then the dataset's default folder (catalogue.DATASET_ROOTS), not a TypeError."""
    model, dataset = gallery
    ckpt = tmp_path / "best.pth"
    checkpoints.atomic_save(
        checkpoints.make_checkpoint(model, args={"dataset": "synthetic", "data_root": None}, epoch=0, metrics={}), ckpt
    )
    monkeypatch.setitem(catalogue.DATASET_ROOTS, "synthetic", str(tiny_synthetic_root))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "shards"
    shards_script.main(
        shards_script.get_args_parser().parse_args(
            [
                "--checkpoint",
                str(ckpt),
                "--out",
                str(out),
                "--shard_size",
                "16",
                "--batch_size",
                "8",
                "--runtime",
                "torch",
            ]
        )
    )  # the reference embeds with torch
    np.testing.assert_array_equal(np.load(out / shards.MERGED), reference(model, dataset, 8))
