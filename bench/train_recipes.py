"""Which training recipe lifts a randomly initialised network in a few CPU epochs? Prints JSON.

A stripped-down train.py loop for comparing recipes quickly: the same data, P x K sampler,
network, losses and validation metric as train.py (datasets.SOPDataset, build_batch_sampler,
models.build_model, losses.build_loss, retrieval.evaluate_embeddings on the validation split),
without checkpoints, logging or the plateau schedule. Prints one JSON line per recipe with the
validation product Recall@1 (percent) before training and after each epoch, and the mean
training loss of each epoch. Its seeding differs from train.py's, so the same recipe gives
other (noisy: one validation query = 0.31 points) numbers than train.py.

    python bench/train_recipes.py --loss multi_similarity --lr 1e-3 --batch_size 32 --dropout 0
    python bench/train_recipes.py --loss triplet --lr 1e-3 --image_size 96
    python bench/train_recipes.py --model small_cnn --loss multi_similarity --lr 2e-3 --schedule onecycle
    python bench/train_recipes.py --loss proxy_anchor --lr 1e-3

``--model small_cnn`` is bench/synthetic_baselines.py's 6-layer probe (no stride-4 stem), for
scale. ``--loss proxy_anchor`` is losses.ProxyAnchorLoss (margin 0.1, alpha 32; proxies at
``--proxy_lr_mult`` x lr).
"""

import argparse
import json
from pathlib import Path
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import datasets
import extraction
import losses
import models
import preprocessing
import retrieval
import samplers


def get_args_parser():
    p = argparse.ArgumentParser(
        "train_recipes", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data_root", default="data/synthetic_sop", help="a (synthetic) SOP folder")
    p.add_argument("--model", default="resnet18", help="a backbones.BACKBONES name (random weights) or small_cnn")
    p.add_argument("--loss", default="triplet", help="triplet, multi_similarity or proxy_anchor")
    p.add_argument("--mining", default="semihard", choices=losses.MINING_MODES)
    p.add_argument("--optimizer", default="adam", choices=("adam", "sgd"))
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--schedule", default="none", choices=("none", "onecycle"))
    p.add_argument("--proxy_lr_mult", type=float, default=100.0)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--images_per_class", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--no_augment", action="store_true", help="train on the eval transform")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p


class _Normalized(torch.nn.Module):
    """Unit-norm outputs, as models.EmbeddingNet gives."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return F.normalize(self.net(x), dim=1)


def build_network(args):
    if args.model == "small_cnn":
        import synthetic_baselines

        return _Normalized(synthetic_baselines.small_cnn())
    return models.build_model(args.model, 128, weights="none", dropout=args.dropout, image_size=args.image_size)


def build_criterion(args, class_ids):
    """(callable(embeddings, labels) -> loss, its parameters)."""
    # losses.build_loss passes margin/mining/classes only to the losses that take them
    crit = losses.build_loss(
        args.loss,
        margin=0.5 if args.loss == "triplet" else None,
        mining=args.mining,
        classes=np.unique(class_ids),
        embedding_size=128,
    )
    return (lambda e, y: crit(e, y)[0]), list(crit.parameters())


def main(args):
    torch.manual_seed(args.seed)
    train_set = datasets.SOPDataset(
        args.data_root, "train", transform=preprocessing.build_transform(args.image_size, train=not args.no_augment)
    )
    val_set = datasets.SOPDataset(
        args.data_root, "val", transform=preprocessing.build_transform(args.image_size, train=False)
    )
    sampler = samplers.build_batch_sampler(
        "pk", train_set.class_ids, batch_size=args.batch_size, images_per_class=args.images_per_class, seed=args.seed
    )
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=args.workers)
    val_loader = DataLoader(val_set, batch_size=128, num_workers=args.workers)
    model = build_network(args)
    loss_fn, loss_params = build_criterion(args, train_set.class_ids)
    groups = [{"params": list(model.parameters()), "lr": args.lr}]
    if loss_params:
        groups.append({"params": loss_params, "lr": args.lr * args.proxy_lr_mult})
    if args.optimizer == "adam":
        optimizer = torch.optim.Adam(groups, lr=args.lr, weight_decay=1e-5)
    else:
        optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    schedule = None
    if args.schedule == "onecycle":
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, [g["lr"] for g in groups], total_steps=args.epochs * len(sampler), pct_start=0.2
        )

    def val_recall():
        emb, _ = extraction.extract_embeddings(model, val_loader, progress=False)
        return round(
            100 * retrieval.evaluate_embeddings(emb, val_set.class_ids, val_set.super_ids)["product"]["recall@1"], 2
        )

    recall, train_loss = [val_recall()], []
    start = time.perf_counter()
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        model.train()
        total = 0.0
        for images, labels in loader:
            loss = loss_fn(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
            total += loss.item()
        train_loss.append(round(total / len(sampler), 4))
        recall.append(val_recall())
    out = {
        **vars(args),
        "val_recall@1": recall,
        "train_loss": train_loss,
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main(get_args_parser().parse_args())
