"""Sharded, resumable gallery embedding, split across processes with torchrun (entry script;
the library is `search.shards`).

    python shards.py --checkpoint checkpoints/<run>/best.pth --out gallery_shards/
    torchrun --nproc_per_node 4 shards.py --checkpoint ... --out gallery_shards/ --device cuda
    python shards.py ... --gallery_index gallery_test.npz --index_type ivf   # then serve it
    python shards.py ... --index_backend milvus [--db_uri http://HOST:19530]  # into a database

Shard i of the gallery (``--split`` of ``--data_root``, default the checkpoint's) is embedded
by rank ``i % world_size`` into ``--out``; a rerun after a kill redoes only the missing
shards. When every shard exists, rank 0 streams them into ``embeddings.npy`` and, with
``--gallery_index``, saves a `search.index.GalleryIndex` the demo serves. On CPU the result
equals the single-process embedding bit for bit, whatever the number of processes.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import datasets
from search import ann, shards, vectordb


def get_args_parser():
    import inference  # its --runtime flag

    parser = argparse.ArgumentParser(
        "shards.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="a checkpoint of train.py")
    parser.add_argument("--data_root", default=None, help="dataset folder; default: the checkpoint's")
    parser.add_argument("--split", default="test", choices=datasets.SPLITS)
    parser.add_argument("--out", required=True, help="folder for the shards, manifest and embeddings.npy")
    parser.add_argument("--shard_size", default=8192, type=int, help="images per shard (multiple of --batch_size)")
    parser.add_argument("--batch_size", default=64, type=int)
    parser.add_argument("--workers", default=0, type=int, help="DataLoader workers per process")
    parser.add_argument("--device", default="cpu", help="cpu, cuda (each rank takes cuda:LOCAL_RANK) or auto")
    inference.add_runtime_arg(parser)
    parser.add_argument(
        "--gallery_index",
        default=None,
        help="also save a GalleryIndex here (rank 0), e.g. gallery_test.npz for the demo",
    )
    parser.add_argument("--index_type", default="exact", choices=ann.INDEX_TYPES)
    vectordb.add_backend_args(parser)
    return parser


def load_gallery(args, device):
    """(model, its checkpoint hash, the gallery dataset with the eval transform)."""
    import checkpoints
    from dataio import catalogue
    import datasets
    import inference
    import preprocessing

    model = inference.load_embedder(
        args.checkpoint, runtime=inference.resolve_runtime(args.runtime, device), device=device
    )
    train_args = model.checkpoint_info.get("args")
    # a run of --dataset synthetic without --data_root stored data_root: null
    data_root = args.data_root or catalogue.default_data_root(train_args)
    dataset = datasets.SOPDataset(
        data_root,
        args.split,
        transform=preprocessing.build_transform(int(model.model_args["image_size"]), train=False),
        **datasets.split_options(train_args),
    )
    return model, checkpoints.checkpoint_hash(args.checkpoint), dataset


def save_gallery_index(args, model, ckpt_hash, dataset, embeddings):
    """The merged embeddings as a GalleryIndex at --gallery_index and / or, with
    --index_backend milvus, the split's collection in --db_uri (what app_stanford.py
    --data_root ... --index_backend milvus then serves without embedding again)."""
    from search.index import GalleryIndex

    index = GalleryIndex(
        embeddings=embeddings,
        paths=list(dataset.rel_paths),
        class_ids=dataset.class_ids,
        super_ids=dataset.super_ids,
        categories=dataset.categories,
        product_ids=dataset.product_ids,
        checkpoint_hash=ckpt_hash,
        index_type=args.index_type,
        meta={
            "split": args.split,
            "data_root": str(dataset.root),
            "model_args": dict(model.model_args),
            "checkpoint": str(args.checkpoint),
        },
    )
    if args.gallery_index:
        index.save(args.gallery_index)
        print(f"saved gallery index {args.gallery_index} ({args.index_type})", flush=True)
    if args.index_backend == "milvus":
        uri = args.db_uri or vectordb.default_db_path(args.checkpoint)
        store = vectordb.split_gallery(
            uri,
            dataset.root,
            args.split,
            ckpt_hash,
            dict(model.model_args),
            dataset.rel_paths,
            lambda: index,
            collection=args.collection,
            index_type=args.index_type,
            match=(getattr(model, "checkpoint_info", None) or {}).get("match"),
        )
        print(f"published {len(store)} rows to {uri}, collection {store.name} ({args.index_type})", flush=True)


def main(args):
    import torch
    import torch.distributed as dist

    vectordb.apply_backend_args(args)  # --db_timeout: every database call of this process

    import devices
    from training import distributed

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = devices.resolve_device(args.device, int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group(distributed.process_group_backend(device.type == "cuda"))  # CPU tensors too
    try:
        model, ckpt_hash, dataset = load_gallery(args, device)
        if args.index_backend == "milvus" and rank == 0:  # unreachable: fail now, not after embedding
            vectordb.connect(args.db_uri or vectordb.default_db_path(args.checkpoint))
        done = shards.embed_shards(
            model,
            dataset,
            args.out,
            args.shard_size,
            args.batch_size,
            device,
            rank,
            world,
            ckpt_hash,
            workers=args.workers,
            progress=rank == 0,
        )
        print(f"rank {rank}: embedded shards {done}", flush=True)
        if world > 1:
            dist.barrier()  # every shard written before rank 0 merges
        if rank == 0:
            emb = shards.merge_shards(args.out, len(dataset), args.shard_size)
            print(f"merged {len(emb)} x {emb.shape[1]} into {Path(args.out) / shards.MERGED}", flush=True)
            if args.gallery_index or args.index_backend == "milvus":
                save_gallery_index(args, model, ckpt_hash, dataset, emb)
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except vectordb.DatabaseError as e:
        raise SystemExit(f"shards.py: {e}") from None
