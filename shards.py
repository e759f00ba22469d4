"""Sharded, resumable gallery embedding, split across processes with torchrun.

    python shards.py --checkpoint checkpoints/<run>/best.pth --out gallery_shards/
    torchrun --nproc_per_node 4 shards.py --checkpoint ... --out gallery_shards/ --device cuda
    python shards.py ... --gallery_index gallery_test.npz --index_type ivf   # then serve it

The gallery (``dataset`` order) is cut into fixed-size shards of ``shard_size`` images
(a multiple of ``batch_size``). Shard i is embedded by rank ``i % world_size`` and written
as ``shard_00000i.npy`` (float32 [rows, D]) atomically (`fileio.atomic_write`): after a
kill, a shard file is either complete or absent, so a rerun skips the finished shards and
redoes only the rest. ``manifest.json`` records what the shards are embeddings of
(checkpoint hash, image-list hash, shard and batch size); a folder made for anything else is
refused. When every shard exists, rank 0 streams them in order into ``embeddings.npy``
(memory-mapped, never the whole matrix in RAM) and, with ``--gallery_index``, saves a
`retrieval.GalleryIndex` the demo serves.

Determinism: every shard is cut into the same batches a single process would use (shard
boundaries fall on batch boundaries), so on CPU the merged result equals the single-process
embedding bit for bit, whatever the number of processes.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from dataio import fileio
import retrieval

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
                f"{path} describes other shards ({', '.join(f'{k}: {found.get(k)!r} != {expected.get(k)!r}' for k in diff)}); "
                "pass another --out folder or delete this one to start over")
        return
    fileio.atomic_write(path, lambda f: f.write(json.dumps(expected, indent=1, sort_keys=True).encode()))


def job_manifest(dataset, shard_size, batch_size, checkpoint_hash, normalize=True) -> dict:
    return {"num_images": len(dataset), "shard_size": int(shard_size), "batch_size": int(batch_size),
            "checkpoint_hash": checkpoint_hash, "normalize": bool(normalize),
            "image_list_hash": retrieval.hash_paths(getattr(dataset, "rel_paths", range(len(dataset))))}


def embed_shards(model, dataset, out_dir, shard_size=8192, batch_size=64, device="cpu", rank=0,
                 world_size=1, checkpoint_hash="", workers=0, progress=True, normalize=True) -> list[int]:
    """Embed this rank's missing shards of ``dataset`` into ``out_dir``; returns the
    shard numbers it embedded (finished shards are skipped, see the module docstring)."""
    import torch

    if shard_size % batch_size:
        raise ValueError(f"shard_size {shard_size} must be a multiple of batch_size {batch_size}, "
                         "so shards cut the same batches as one process (identical embeddings)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    expected = job_manifest(dataset, shard_size, batch_size, checkpoint_hash, normalize)
    # every rank checks (identical manifests written atomically by two ranks: no harm)
    check_manifest(out_dir, expected)
    done = []
    for i, (start, stop) in enumerate(shard_ranges(len(dataset), shard_size)):
        if i % world_size != rank or read_shard(shard_path(out_dir, i), stop - start) is not None:
            continue
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(start, stop)),
                                             batch_size=batch_size, shuffle=False, num_workers=workers)
        emb, _ = retrieval.extract_embeddings(model, loader, device=device, progress=progress,
                                              desc=f"shard {i} (rank {rank})", normalize=normalize)
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
            raise FileNotFoundError(f"shard {shard_path(out_dir, i)} is missing or damaged: rerun the "
                                    "extraction (finished shards are kept)")
        shards.append(x)
    dim = shards[0].shape[1]

    def write(f):
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                "shape": (num_images, dim)})
        for x in shards:
            f.write(np.ascontiguousarray(x).tobytes())

    path = fileio.atomic_write(out_dir / MERGED, write)
    return np.load(path, mmap_mode="r")


# ============ command line (torchrun) ============

def get_args_parser():
    parser = argparse.ArgumentParser("shards.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint of train.py")
    parser.add_argument("--data_root", default=None, help="dataset folder; default: the checkpoint's")
    parser.add_argument("--split", default="test", choices=["test", "val", "train", "trainval"])
    parser.add_argument("--out", required=True, help="folder for the shards, manifest and embeddings.npy")
    parser.add_argument("--shard_size", default=8192, type=int, help="images per shard (multiple of --batch_size)")
    parser.add_argument("--batch_size", default=64, type=int)
    parser.add_argument("--workers", default=0, type=int, help="DataLoader workers per process")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (each rank takes cuda:LOCAL_RANK)")
    parser.add_argument("--gallery_index", default=None,
                        help="also save a GalleryIndex here (rank 0), e.g. gallery_test.npz for the demo")
    parser.add_argument("--index_type", default="exact", choices=["exact", "ivf", "hnsw"])
    return parser


def main(args):
    import torch
    import torch.distributed as dist

    import datasets
    import models

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        model = models.load_model(args.checkpoint, device=device)
        data_root = args.data_root or model.checkpoint_info["args"]["data_root"]
        dataset = datasets.SOPDataset(data_root, args.split, transform=datasets.build_transform(
            int(model.model_args["image_size"]), train=False),
            **datasets.split_options(model.checkpoint_info.get("args")))
        ckpt_hash = models.checkpoint_hash(args.checkpoint)
        done = embed_shards(model, dataset, args.out, args.shard_size, args.batch_size, device, rank, world,
                            ckpt_hash, workers=args.workers, progress=rank == 0)
        print(f"rank {rank}: embedded shards {done}", flush=True)
        if world > 1:
            dist.barrier()  # every shard written before rank 0 merges
        if rank == 0:
            emb = merge_shards(args.out, len(dataset), args.shard_size)
            print(f"merged {len(emb)} x {emb.shape[1]} into {Path(args.out) / MERGED}", flush=True)
            if args.gallery_index:
                index = retrieval.GalleryIndex(
                    embeddings=emb, paths=list(dataset.rel_paths), class_ids=dataset.class_ids,
                    super_ids=dataset.super_ids, categories=dataset.categories,
                    product_ids=dataset.product_ids, checkpoint_hash=ckpt_hash, index_type=args.index_type,
                    meta={"split": args.split, "data_root": str(dataset.root),
                          "model_args": dict(model.model_args), "checkpoint": str(args.checkpoint)})
                index.save(args.gallery_index)
                print(f"saved gallery index {args.gallery_index} ({args.index_type})", flush=True)
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
