"""How much of the synthetic SOP is solvable without learning, and that learning helps.

Prints JSON with the retrieval metrics (retrieval.evaluate_embeddings: product protocol —
query = every test image, gallery = every other test image, relevant = same class_id — and
the category protocol) of these embeddings of the synthetic test split:
  * mean_colour         : each image reduced to its 1×1 mean RGB;
  * raw_pixels_16       : each image resized to 16×16 RGB, flattened (cosine = L2-normalised);
  * resnet18_untrained  : torchvision resnet18(weights=None), random init (seed 0), fc removed,
                          eval transform at 64 px (preprocessing.build_transform(64));
  * small_cnn_trained   : with --train_epochs N > 0, a learnability probe: a 6-layer CNN trained
                          from scratch on trainval for N epochs (P×K 16×4 batches, train
                          augmentations at --train_size px, Multi-Similarity loss, Adam with a
                          one-cycle schedule), then the same evaluation. Slow on CPU
                          (~2–4 min an epoch at 48 px on 2 busy cores).

    python bench/synthetic_baselines.py --root data/synthetic_sop
    python bench/synthetic_baselines.py --root data/synthetic_sop --train_epochs 12
"""

import argparse
import json
from pathlib import Path
import sys
import time

import numpy as np
from PIL import Image
import torch
import torch.nn as nn
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataio import photos, synthetic_sop
import datasets
import losses
import preprocessing
import retrieval
import samplers


def get_args_parser():
    parser = argparse.ArgumentParser(
        "synthetic_baselines", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--root",
        default="data/synthetic_sop",
        help="synthetic SOP; generated (ensure_synthetic_sop) if missing; one made with other settings is refused",
    )
    parser.add_argument("--num_products", type=int, default=1200)
    parser.add_argument("--image_size", default="96")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pixels", type=int, default=16, help="side of the raw-pixel baseline")
    parser.add_argument("--resnet_size", type=int, default=64, help="eval image size for resnet18")
    parser.add_argument("--batch_size", type=int, default=128, help="for embedding extraction")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    parser.add_argument("--train_epochs", type=int, default=0, help="learnability probe epochs (0: skip)")
    parser.add_argument("--train_size", type=int, default=48, help="image size of the probe")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the probe")
    return parser


def summarize(embeddings, dataset, seconds):
    m = retrieval.evaluate_embeddings(
        np.ascontiguousarray(embeddings, dtype=np.float32), dataset.class_ids, dataset.super_ids
    )
    return {
        "product_recall@1": m["product"]["recall@1"],
        "product_recall@10": m["product"]["recall@10"],
        "product_map@r": m["product"]["map@r"],
        "category_recall@1": m["category"]["recall@1"],
        "seconds": round(seconds, 1),
    }


def pixel_features(paths, side):
    return np.stack(
        [np.asarray(photos.load_image(p).resize((side, side), Image.BILINEAR), np.float32).ravel() for p in paths]
    )


@torch.inference_mode()
def embed(model, dataset, batch_size, workers):
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    return torch.cat([model(x) for x, _ in loader]).numpy()


def small_cnn(embedding_size=128):
    """~0.5 M parameters: cheap enough to train from scratch on 2 CPU cores."""

    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(3, 32),
        nn.MaxPool2d(2),
        *block(32, 64),
        nn.MaxPool2d(2),
        *block(64, 128),
        *block(128, 128),
        nn.MaxPool2d(2),
        *block(128, 256),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(256, embedding_size),
    )


def train_probe(root, args):
    """Train small_cnn on trainval; returns (model, per-epoch log)."""
    torch.manual_seed(args.seed)
    train_set = datasets.SOPDataset(
        root, "trainval", transform=preprocessing.build_transform(args.train_size, train=True)
    )
    sampler = samplers.PKSampler(train_set.class_ids, p=16, k=4, seed=args.seed)
    loader = torch.utils.data.DataLoader(
        train_set, batch_sampler=sampler, num_workers=args.workers, persistent_workers=args.workers > 0
    )
    model = small_cnn()
    criterion = losses.build_loss("multi_similarity")
    optimizer = torch.optim.Adam(model.parameters(), args.lr, weight_decay=1e-5)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.train_epochs * len(sampler))
    log = []
    for epoch in range(args.train_epochs):
        model.train()
        sampler.set_epoch(epoch)
        total, t0 = 0.0, time.perf_counter()
        for images, labels in loader:
            loss, _ = criterion(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
        log.append(
            {"epoch": epoch, "loss": round(total / len(sampler), 4), "seconds": round(time.perf_counter() - t0, 1)}
        )
        print(json.dumps(log[-1]), file=sys.stderr, flush=True)
    return model, log


def main(args):
    t0 = time.perf_counter()
    root = synthetic_sop.ensure_synthetic_sop(args.root, args.num_products, args.image_size, args.seed, progress=True)
    test = datasets.SOPDataset(root, "test")
    cls = test.class_ids
    _, inverse, counts = np.unique(cls, return_inverse=True, return_counts=True)
    same = counts[inverse]  # images of each query's product, the query included
    results = {
        "root": str(root),
        "num_queries": len(test),
        "num_products": int(len(np.unique(cls))),
        "chance_product_recall@1": float(np.mean((same - 1) / (len(cls) - 1))),
    }

    t = time.perf_counter()
    results["mean_colour"] = summarize(pixel_features(test.paths, 1), test, time.perf_counter() - t)
    t = time.perf_counter()
    results[f"raw_pixels_{args.pixels}"] = summarize(
        pixel_features(test.paths, args.pixels), test, time.perf_counter() - t
    )

    t = time.perf_counter()
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None)
    resnet.fc = nn.Identity()
    test_64 = datasets.SOPDataset(root, "test", transform=preprocessing.build_transform(args.resnet_size))
    results[f"resnet18_untrained_{args.resnet_size}px"] = summarize(
        embed(resnet, test_64, args.batch_size, args.workers), test, time.perf_counter() - t
    )

    if args.train_epochs > 0:
        t = time.perf_counter()
        model, log = train_probe(root, args)
        test_small = datasets.SOPDataset(root, "test", transform=preprocessing.build_transform(args.train_size))
        probe = summarize(embed(model, test_small, args.batch_size, args.workers), test, time.perf_counter() - t)
        probe.update(epochs=args.train_epochs, image_size=args.train_size, final_loss=log[-1]["loss"])
        results[f"small_cnn_trained_{args.train_epochs}ep_{args.train_size}px"] = probe
    results["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
