"""Catalogue audit on real photos with planted faults, and its cost at SOP's size.

Three steps (each prints / writes JSON; none is part of the tests):

* ``plant``: copy a real SOP-layout catalogue (``--data_root``, e.g. GroZi-120) to ``--copy`` and
  plant faults in the copy: ``--duplicates`` photos copied under another product id (re-encoded
  at JPEG quality 70, centre crop of 90% of each side) and ``--moved`` photos moved to another
  product (their line in the Ebay file names the other product). ``--copy``/planted.json records
  them. The original is only read.
* ``score``: precision and recall of each kind of an audit's ``audit.csv`` over planted.json;
  findings that touch no planted photo are listed separately (the original catalogue's own
  faults, or false alarms: look at them before counting them either way).
* ``scale``: time and memory of the audit's neighbour search (`search.audit.neighbours`) and
  findings on ``--n`` random unit vectors of ``--dim`` dimensions in ``--products`` products, to
  set beside the embedding pass's cost (``--embed_images`` photos of ``--data_root`` embedded to
  measure the throughput).

Usage (see bench/README.md, "Catalogue audit"):

    python bench/bench_audit.py plant --data_root ../shared/realdata/grozi120 --copy /tmp/audit_grozi
    python audit.py --data_root /tmp/audit_grozi --zero_shot --backbone efficientnet_lite0 --output /tmp/audit_zs
    python bench/bench_audit.py score --copy /tmp/audit_grozi --audit /tmp/audit_zs/audit.csv
    python bench/bench_audit.py scale --n 60502 --data_root ../shared/realdata/grozi120
"""

import argparse
import csv
import io
import json
from pathlib import Path
import random
import resource
import shutil
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataio import catalogue

# ============ plant ============


def read_ebay(path):
    """(header line, rows [image_id, class_id, super_class_id, path]) of an Ebay file."""
    lines = Path(path).read_text().splitlines()
    return lines[0], [line.split() for line in lines[1:] if line.strip()]


def write_ebay(path, header, rows):
    renumbered = [[str(i + 1), *row[1:]] for i, row in enumerate(rows)]
    Path(path).write_text("\n".join([header, *(" ".join(r) for r in renumbered)]) + "\n")


def duplicate_bytes(source: Path) -> bytes:
    """The planted duplicate: centre crop of 90% of each side, re-encoded as JPEG quality 70."""
    with Image.open(source) as im:
        im = im.convert("RGB")
        w, h = im.size
        cw, ch = round(w * 0.9), round(h * 0.9)
        left, top = (w - cw) // 2, (h - ch) // 2
        buf = io.BytesIO()
        im.crop((left, top, left + cw, top + ch)).save(buf, "JPEG", quality=70)
    return buf.getvalue()


def plant(args):
    src, dst = Path(args.data_root), Path(args.copy)
    if dst.exists():
        raise SystemExit(f"{dst} exists; remove it or pass another --copy")
    shutil.copytree(src, dst)
    rng = random.Random(args.seed)
    files = {part: read_ebay(dst / f"Ebay_{part}.txt") for part in ("train", "test")}
    planted = {"duplicates": [], "mislabelled": [], "source": str(src), "seed": args.seed}
    used = set()
    for kind, count in (("duplicates", args.duplicates), ("mislabelled", args.moved)):
        for _ in range(count):
            part = rng.choice(["train", "test"])
            header, rows = files[part]
            products = sorted({r[1] for r in rows})
            while True:
                row = rng.choice(rows)
                other = rng.choice(products)
                if row[3] not in used and other != row[1]:
                    break
            used.add(row[3])
            if kind == "duplicates":
                name = f"{Path(row[3]).parent.as_posix()}/planted_dup_{len(planted[kind]):02d}.jpg"
                (dst / name).write_bytes(duplicate_bytes(dst / row[3]))
                rows.append(["0", other, row[2], name])
                used.add(name)
                planted[kind].append({"path": name, "source": row[3], "product_id": other, "source_product_id": row[1]})
            else:
                planted[kind].append({"path": row[3], "product_id": other, "true_product_id": row[1]})
                row[1] = other
    for part, (header, rows) in files.items():
        write_ebay(dst / f"Ebay_{part}.txt", header, rows)
    (dst / "planted.json").write_text(json.dumps(planted, indent=1))
    print(
        json.dumps(
            {"copy": str(dst), "duplicates": len(planted["duplicates"]), "mislabelled": len(planted["mislabelled"])}
        )
    )


# ============ score ============


def score(args):
    planted = json.loads((Path(args.copy) / "planted.json").read_text())
    with open(args.audit, newline="") as f:
        findings = list(csv.DictReader(f))
    dup_pairs = {frozenset((d["path"], d["source"])) for d in planted["duplicates"]}
    dup_paths = {d["path"] for d in planted["duplicates"]}
    moved = {d["path"]: d for d in planted["mislabelled"]}
    planted_paths = dup_paths | set(moved) | {d["source"] for d in planted["duplicates"]}
    out = {"audit": str(args.audit)}
    for kind, truth in (("duplicate", dup_pairs), ("mislabelled", moved)):
        rows = [r for r in findings if r["kind"] == kind]
        if kind == "duplicate":
            hits = {frozenset((r["path"], r["other_path"])) for r in rows} & truth
            # the listing is found when the copy is paired with any photo of its source's product
            listing = {d["path"]: d["source_product_id"] for d in planted["duplicates"]}
            found_listing = {
                p
                for r in rows
                for p, q in ((r["path"], r["other_product_id"]), (r["other_path"], r["product_id"]))
                if listing.get(p) == q
            }
        else:
            hits = {r["path"] for r in rows} & set(truth)
        on_planted = [r for r in rows if {r["path"], r["other_path"]} & planted_paths]
        other_kind = moved if kind == "duplicate" else dup_paths
        cross = [r for r in rows if {r["path"], r["other_path"]} & set(other_kind)]
        unplanted = [r for r in rows if not {r["path"], r["other_path"]} & planted_paths]
        out[kind] = {
            "planted": len(truth),
            "findings": len(rows),
            "found": len(hits),
            "recall": round(len(hits) / max(1, len(truth)), 3),
            "precision": round(len(hits) / max(1, len(rows)), 3),
            "precision_planted_only": round(len(hits) / max(1, len(on_planted)), 3),
            "other_kind_fault": len(cross),  # a planted fault of the other kind, seen as this one
            "precision_any_planted_fault": round(len(on_planted) / max(1, len(rows)), 3),
            "unplanted_findings": len(unplanted),
            "unplanted_examples": [[r["path"], r["other_path"], r["score"]] for r in unplanted[:8]],
        }
        if kind == "duplicate":
            out[kind].update(
                listings_found=len(found_listing),
                recall_listing=round(len(found_listing) / max(1, len(truth)), 3),
                precision_listing=round(len(found_listing) / max(1, len(rows)), 3),
            )
        if kind == "mislabelled":
            out[kind]["right_product_named"] = sum(
                r["other_product_id"] == truth[r["path"]]["true_product_id"] for r in rows if r["path"] in truth
            )
    out["missed_duplicates"] = [
        sorted(p)
        for p in dup_pairs - {frozenset((r["path"], r["other_path"])) for r in findings if r["kind"] == "duplicate"}
    ]
    out["missed_mislabelled"] = sorted(set(moved) - {r["path"] for r in findings if r["kind"] == "mislabelled"})
    out["pixels"] = pixel_separation(Path(args.copy), planted)
    summary = Path(args.audit).with_name("summary.json")
    if summary.exists():
        out["pixels"]["audit_pixel_threshold"] = json.loads(summary.read_text()).get("pixel_threshold")
    text = json.dumps(out, indent=1)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


def pixel_separation(root: Path, planted: dict) -> dict:
    """How the near-copy similarity (`search.near_copy`) tells the planted copies from the moved
    photos: each copy against its source, and each moved photo against its old product's most
    similar photo (in GroZi-120 a nearby frame of the same video)."""
    from search import near_copy

    products = {}
    for part in ("train", "test"):
        for row in read_ebay(root / f"Ebay_{part}.txt")[1]:
            products.setdefault(row[1], []).append(row[3])
    grey = {}

    def sim(a, b):
        for p in (a, b):
            grey.setdefault(p, near_copy.load_grey(root / p))
        return near_copy.similarity(grey[a], grey[b])

    copies = [sim(d["path"], d["source"]) for d in planted["duplicates"]]
    moved = [
        max(sim(d["path"], p) for p in products[d["true_product_id"]] if p != d["path"]) for d in planted["mislabelled"]
    ]
    return {
        "copy_vs_source_min": round(min(copies), 4),
        "copy_vs_source_max": round(max(copies), 4),
        "moved_vs_old_product_max": round(max(moved), 4),
        "moved_vs_old_product_median": round(float(np.median(moved)), 4),
    }


# ============ scale ============


def max_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def scale(args):
    from search import audit

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((args.n, args.dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    products = np.sort(rng.integers(0, args.products, args.n)).astype(str).tolist()
    out = {"n": args.n, "dim": args.dim, "products": args.products, "rss_mb_before": round(max_rss_mb())}
    t0 = time.perf_counter()
    scores, idx = audit.neighbours(vectors, audit.neighbour_count(products), progress=False)
    out["neighbour_search_s"] = round(time.perf_counter() - t0, 2)
    t1 = time.perf_counter()
    audit.find_mislabelled(vectors, products, scores, idx)
    audit.find_duplicates(products, scores, idx, threshold=0.9)
    out["findings_s"] = round(time.perf_counter() - t1, 2)
    out["peak_rss_mb"] = round(max_rss_mb())
    if args.data_root and args.embed_images:
        out["embedding"] = embed_throughput(args)
        per_s = out["embedding"]["images_per_s"]
        out["embedding_pass_s_extrapolated"] = round(args.n / per_s, 1)
    text = json.dumps(out, indent=1)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


def embed_throughput(args):
    """Images per second of the audit's embedding pass (search.gallery.embed_files, the zero-shot
    backbone) over the first ``--embed_images`` photos of ``--data_root``."""
    import models
    from search import gallery

    table = catalogue.read_catalogue(args.data_root)
    root = Path(table.root) if hasattr(table, "root") else Path(args.data_root)
    paths = [root / p for p in table.rel_paths[: args.embed_images]]
    model = models.zero_shot_model(args.backbone, "imagenet", args.image_size)
    gallery.embed_files(model, paths[:16], batch_size=16, workers=0, progress=False)  # warm-up
    t0 = time.perf_counter()
    gallery.embed_files(model, paths, batch_size=64, progress=False)
    seconds = time.perf_counter() - t0
    return {
        "backbone": args.backbone,
        "image_size": args.image_size,
        "images": len(paths),
        "seconds": round(seconds, 2),
        "images_per_s": round(len(paths) / seconds, 2),
    }


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("plant", help="copy a catalogue and plant duplicates and moved photos in the copy")
    p.add_argument("--data_root", required=True, help="an SOP-layout catalogue (read only)")
    p.add_argument("--copy", required=True, help="where the copy goes (must not exist)")
    p.add_argument("--duplicates", type=int, default=20)
    p.add_argument("--moved", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("score", help="precision / recall of an audit.csv over the planted faults")
    s.add_argument("--copy", required=True, help="the planted copy (holds planted.json)")
    s.add_argument("--audit", required=True, help="the audit's audit.csv")
    s.add_argument("--output", default=None, help="also write the JSON here")
    c = sub.add_parser("scale", help="neighbour search and findings at SOP's size; embedding throughput")
    c.add_argument("--n", type=int, default=60502)
    c.add_argument("--dim", type=int, default=128)
    c.add_argument("--products", type=int, default=11316)
    c.add_argument("--data_root", default=None, help="photos to measure the embedding throughput on")
    c.add_argument("--embed_images", type=int, default=256)
    c.add_argument("--backbone", default="efficientnet_lite0")
    c.add_argument("--image_size", type=int, default=224)
    c.add_argument("--output", default=None, help="also write the JSON here")
    return parser


def main(args):
    {"plant": plant, "score": score, "scale": scale}[args.step](args)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
