"""Untrained baselines on the synthetic SOP test split (product protocol), printed as JSON.

Shows how much of the synthetic retrieval problem is solvable without learning:
  * mean colour   : each image reduced to its 1×1 mean RGB;
  * raw pixels    : each image resized to 16×16 RGB, flattened, L2-normalised;
  * resnet18      : torchvision resnet18(weights=None) (random init, seed 0), fc removed,
                    eval transform at 64 px (datasets.build_transform(64)).
Product protocol: queries = every test image, gallery = every other test image,
relevant = same class_id; cosine similarity; Recall@1, ties to the lower index.

    python bench/synthetic_baselines.py --root data/synthetic_sop
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import datasets  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser("synthetic_baselines", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data/synthetic_sop", help="generated if missing")
    parser.add_argument("--num_products", type=int, default=1200)
    parser.add_argument("--image_size", default="96")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pixels", type=int, default=16, help="side of the raw-pixel baseline")
    parser.add_argument("--resnet_size", type=int, default=64, help="eval image size for resnet18")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    return parser


def recall_at_1(features, class_ids):
    """Share of queries whose nearest other image (cosine) has the same class id.
    Brute force in numpy: a few thousand images fit in one similarity matrix."""
    x = features / np.linalg.norm(features, axis=1, keepdims=True).clip(1e-12)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)          # the query is never its own result
    nearest = sim.argmax(axis=1)            # argmax: ties go to the lower index
    return float(np.mean(class_ids[nearest] == class_ids))


def pixel_features(paths, side):
    return np.stack([np.asarray(datasets.load_image(p).resize((side, side), Image.BILINEAR),
                                np.float32).ravel() for p in paths])


@torch.inference_mode()
def resnet18_features(root, image_size, batch_size, workers):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    model.fc = torch.nn.Identity()
    model.eval()
    ds = datasets.SOPDataset(root, "test", transform=datasets.build_transform(image_size))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers)
    return torch.cat([model(x) for x, _ in loader]).numpy()


def main(args):
    t0 = time.perf_counter()
    root = datasets.ensure_synthetic_sop(args.root, args.num_products, args.image_size, args.seed,
                                         progress=True)
    ds = datasets.SOPDataset(root, "test")
    cls, sup = ds.class_ids, ds.super_ids
    results = {"root": str(root), "num_queries": len(ds), "num_products": int(len(np.unique(cls))),
               "chance_recall@1": float(np.mean([(np.sum(cls == c) - 1) / (len(cls) - 1) for c in cls]))}
    for name, feats in (("mean_colour", lambda: pixel_features(ds.paths, 1)),
                        (f"raw_pixels_{args.pixels}", lambda: pixel_features(ds.paths, args.pixels)),
                        (f"resnet18_untrained_{args.resnet_size}px",
                         lambda: resnet18_features(root, args.resnet_size, args.batch_size, args.workers))):
        t = time.perf_counter()
        f = feats()
        results[name] = {"product_recall@1": recall_at_1(f, cls),
                         "category_recall@1": recall_at_1(f, sup),
                         "seconds": round(time.perf_counter() - t, 1)}
    results["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
