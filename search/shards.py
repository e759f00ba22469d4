"""Sharded, resumable gallery embedding: the library behind ``shards.py`` (torchrun entry).

The gallery (``dataset`` order) is cut into fixed-size shards of ``shard_size`` images
(a multiple of ``batch_size``). Shard i is embedded by rank ``i % world_size`` and written
as ``shard_00000i.npy`` (float32 [rows, D]) atomically (`fileio.atomic_write`): after a
kill, a shard file is either complete or absent, so a rerun skips the finished shards and
redoes only the rest. ``manifest.json`` records what the shards are embeddings of
(checkpoint hash, image-list hash, shard and batch size); a folder made for anything else is
refused. `merge_shards` streams them in order into ``embeddings.npy`` (memory-mapped, never
the whole matrix in RAM).

Determinism: every shard is cut into the same batches a single process would use (shard
boundaries fall on batch boundaries), so on CPU the merged result equals the single-process
embedding bit for bit, whatever the number of processes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dataio import fileio
import extraction
from search.index import hash_paths

MANIFEST = "manifest.json"
MERGED = "embeddings.npy"


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) of every shard of a gallery of ``n`` images."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [(s, min(n, s + shard_size)) for s in range(0, n, shard_size)]


def shard_path(out_dir, i: int) -> Path:
    return Path(out_dir) / f"shard_{i:06d}.npy"


def read_shard(path, rows: int):
    """The shard at ``path`` memory-mapped, or None when it is missing or not ``rows`` rows
    of float32 (a foreign file: redone)."""
    try:
        x = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if x.dtype != np.float32 or x.ndim != 2 or len(x) != rows:
        return None
    return x


def check_manifest(out_dir, expected: dict) -> None:
    """Write ``manifest.json`` in a new folder; in an existing one, refuse a different job."""
    path = Path(out_dir) / MANIFEST
    if path.is_file():
        found = json.loads(path.read_text())
        diff = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
        if diff:
            raise ValueError(
                f"{path} describes other shards "
                f"({', '.join(f'{k}: {found.get(k)!r} != {expected.get(k)!r}' for k in diff)}); "
                "pass another --out folder or delete this one to start over"
            )
        return
    fileio.atomic_write(path, lambda f: f.write(json.dumps(expected, indent=1, sort_keys=True).encode()))


def job_manifest(dataset, shard_size, batch_size, checkpoint_hash, normalize=True) -> dict:
    return {
        "num_images": len(dataset),
        "shard_size": int(shard_size),
        "batch_size": int(batch_size),
        "checkpoint_hash": checkpoint_hash,
        "normalize": bool(normalize),
        "image_list_hash": hash_paths(getattr(dataset, "rel_paths", range(len(dataset)))),
    }


def embed_shards(
    model,
    dataset,
    out_dir,
    shard_size=8192,
    batch_size=64,
    device="cpu",
    rank=0,
    world_size=1,
    checkpoint_hash="",
    workers=0,
    progress=True,
    normalize=True,
) -> list[int]:
    """Embed this rank's missing shards of ``dataset`` into ``out_dir``; returns the
    shard numbers it embedded (finished shards are skipped, see the module docstring)."""
    import torch

    if shard_size % batch_size:
        raise ValueError(
            f"shard_size {shard_size} must be a multiple of batch_size {batch_size}, "
            "so shards cut the same batches as one process (identical embeddings)"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    expected = job_manifest(dataset, shard_size, batch_size, checkpoint_hash, normalize)
    # every rank checks (identical manifests written atomically by two ranks: no harm)
    check_manifest(out_dir, expected)
    done = []
    for i, (start, stop) in enumerate(shard_ranges(len(dataset), shard_size)):
        if i % world_size != rank or read_shard(shard_path(out_dir, i), stop - start) is not None:
            continue
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, range(start, stop)),
            batch_size=batch_size,
            shuffle=False,
            num_workers=workers,
        )
        emb, _ = extraction.extract_embeddings(
            model, loader, device=device, progress=progress, desc=f"shard {i} (rank {rank})", normalize=normalize
        )
        fileio.atomic_write(shard_path(out_dir, i), lambda f, x=emb: np.save(f, x))
        done.append(i)
    return done


def merge_shards(out_dir, num_images: int, shard_size: int) -> np.ndarray:
    """Stream every shard, in order, into ``out_dir/embeddings.npy`` (atomically); returns it
    memory-mapped. Raises FileNotFoundError naming the first missing shard."""
    out_dir = Path(out_dir)
    ranges = shard_ranges(num_images, shard_size)
    shards = []
    for i, (start, stop) in enumerate(ranges):
        x = read_shard(shard_path(out_dir, i), stop - start)
        if x is None:
            raise FileNotFoundError(
                f"shard {shard_path(out_dir, i)} is missing or damaged: rerun the extraction (finished shards are kept)"
            )
        shards.append(x)
    dim = shards[0].shape[1]

    def write(f):
        np.lib.format.write_array_header_1_0(
            f,
            {
                "descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                "fortran_order": False,
                "shape": (num_images, dim),
            },
        )
        for x in shards:
            f.write(np.ascontiguousarray(x).tobytes())

    path = fileio.atomic_write(out_dir / MERGED, write)
    return np.load(path, mmap_mode="r")
