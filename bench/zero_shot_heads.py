"""How much does a 128-d head lose before any training? Prints JSON.

    python bench/zero_shot_heads.py --data_root DIR [--backbone efficientnet_lite0] [--image_size 128]

The backbone's raw pooled features of the training and test splits are extracted once (ImageNet
weights, eval transform); then the test split's product protocol (retrieval.evaluate_embeddings)
is computed for what a head could start from: the raw features, the features centred on the
training mean, their PCA projection to ``--dim`` dimensions fitted on the training split
(models.pca_projection), its whitened version, and a randomly initialised Linear (PyTorch's
default init, seeded). This is what ``--head_init pca / pca_whiten / random`` give at epoch 0.
"""

import argparse
import json
from pathlib import Path
import sys

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import datasets
import extraction
import knn
import models
import preprocessing
import retrieval


def get_args_parser():
    p = argparse.ArgumentParser(
        "zero_shot_heads", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data_root", required=True, help="a folder in the SOP layout")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--dim", type=int, default=128, help="embedding size of the head")
    p.add_argument("--seed", type=int, default=0, help="seed of the random head")
    return p


def features(model, root, split, image_size):
    ds = datasets.SOPDataset(root, split, transform=preprocessing.build_transform(image_size, train=False))
    feats, _ = extraction.extract_embeddings(
        model.backbone, DataLoader(ds, batch_size=64), progress=False, normalize=False
    )
    return feats, ds


def product_metrics(emb, ds) -> dict:
    p = retrieval.evaluate_embeddings(knn.l2_normalize(emb.astype(np.float32)), ds.class_ids, ds.super_ids)["product"]
    return {"recall@1": round(100 * p["recall@1"], 2), "map@r": round(100 * p["map@r"], 2)}


def main(args) -> dict:
    model = models.zero_shot_model(args.backbone, "imagenet", args.image_size)
    train, _ = features(model, args.data_root, "train", args.image_size)
    test, test_set = features(model, args.data_root, "test", args.image_size)
    fit = torch.from_numpy(train)
    out = {"backbone": args.backbone, "image_size": args.image_size, "dim": args.dim, "heads": {}}
    heads = out["heads"]
    heads["raw features"] = product_metrics(test, test_set)
    heads["centred on the training mean"] = product_metrics(test - train.mean(axis=0), test_set)
    for name, whiten in (("pca", False), ("pca_whiten", True)):
        p, mu = models.pca_projection(fit, args.dim, whiten=whiten)
        heads[name] = product_metrics((test - mu.numpy()) @ p.numpy().T, test_set)
    torch.manual_seed(args.seed)
    linear = torch.nn.Linear(train.shape[1], args.dim)
    with torch.no_grad():
        heads["random linear"] = product_metrics(linear(torch.from_numpy(test)).numpy(), test_set)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main(get_args_parser().parse_args())
