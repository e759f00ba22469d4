"""Small and unusual catalogues: few large products (P×K batches keep their size and raise K),
a validation split too small to select on, protocols that are undefined (category-level labels)
or trivial (one category), and every entry script on the quick start's checkpoint.
"""

import json
import os
from pathlib import Path
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
from support import parse, tiny_argv
import torch

import models
import train
from training import comparison_report, evaluation, flags, runs, setup

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def photos(folder: Path, spec: dict, size=40) -> Path:
    """spec: {"relative/product/folder": number of images} → small distinct JPEGs."""
    rng = np.random.default_rng(0)
    for product, n in spec.items():
        base = rng.integers(0, 255, 3)
        for i in range(n):
            pixels = np.clip(base + rng.integers(-40, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            (folder / product).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / product / f"{i}.jpg")
    return folder


def tiny_train(root, out, *extra):
    """One tiny training epoch on ``root`` with a quarter of its training products in validation."""
    argv = tiny_argv(
        root, out, "--epochs", "1", "--projector_samples", "0", "--val_fraction", "0.25", *extra, run="small"
    )
    return train.main(parse(argv))


@pytest.mark.slow
def test_few_large_products_train_with_a_larger_k_said_once(tmp_path, capsys):
    """8 products of 10 photos, half drawn into test, a quarter of the rest into validation: 3
    training products, fewer than the P = 16 / 4 a batch needs. K is raised to 8 (P = 2); the
    run says so once and records it; the one-product validation split is warned about."""
    root = photos(tmp_path / "shop", {f"item{i}": 10 for i in range(8)})
    tiny_train(root, tmp_path)
    log = capsys.readouterr().out
    assert log.count("batches are P=2 × K=8") == 1 and "batch size kept" in log
    saved = json.loads((tmp_path / "runs" / "small" / "args.json").read_text())
    assert saved["images_per_class"] == 4 and saved["images_per_class_used"] == 8
    assert "P=2 × K=8" in saved["pk_batches"]
    assert "1 products" in saved["val_warning"] and "--val_fraction" in saved["val_warning"]
    assert (tmp_path / "checkpoints" / "small" / "best.pth").is_file()


def test_one_training_product_is_an_error_that_says_why(tmp_path):
    root = photos(tmp_path / "shop", {f"item{i}": 6 for i in range(3)})
    with pytest.raises(flags.ArgumentCheckError, match="at least 2 products"):
        tiny_train(root, tmp_path, "--test_fraction", "0.34")


def test_validation_too_small_to_select_warns_and_without_a_query_keeps_the_last_epoch(capsys):
    args = train.get_args_parser().parse_args([])
    args.select_metric, args.val_fraction = "map@r", 0.1
    setup.check_validation_split(args, np.repeat(np.arange(3), 4), rank=0)
    assert "3 products and 12 queries" in args.val_warning and args.select_metric == "map@r"
    assert "--select_metric last" in capsys.readouterr().out
    setup.check_validation_split(args, np.arange(5), rank=0)  # 5 products of one image each
    assert args.select_metric == flags.SELECT_LAST and "no query" in args.val_warning
    big = np.repeat(np.arange(setup.MIN_VAL_PRODUCTS), 6)
    del args.val_warning
    setup.check_validation_split(args, big, rank=0)
    assert not hasattr(args, "val_warning")


def test_select_last_keeps_the_last_epoch():
    row = {"epoch": 3, "val_map@r": 0.1}
    assert runs.selection_score(row, "last") == 3.0 and runs.selection_score(row, "map@r") == 0.1


def evaluate_folder(root, tmp_path):
    torch.manual_seed(0)
    model = models.build_model("resnet18", embedding_size=16, weights="none", image_size=32).eval()
    dataset = evaluation.eval_dataset(root, "test", 32, {"data_root": str(root), "test_fraction": 0.5})
    results = evaluation.evaluate_model(
        model,
        dataset,
        model_info={"run": "r", "checkpoint": None, "weights": "none"},
        output=tmp_path / "eval",
        workers=0,
        progress=False,
        num_examples=0,
    )
    evaluation.write_results(results, tmp_path / "eval")
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    return saved, (tmp_path / "eval" / "results.md").read_text()


def test_category_level_labels_print_na_with_the_reason(tmp_path):
    """Labels that are categories (a product per category): the category protocol has no
    relevant item for any query. results.json: null and why; results.md: n/a, never 0.00."""
    root = tmp_path / "clothes"
    photos(root, {f"{g}/{g}": 4 for g in ("shirt", "skirt", "coat", "scarf", "sock", "hat")})
    saved, md = evaluate_folder(root, tmp_path)
    assert saved["category"]["recall@1"] is None and "single product" in saved["category"]["why"]
    assert saved["product"]["recall@1"] is not None
    category_table = md.split("## Category protocol")[1].split("## Per category")[0]
    assert "| n/a | n/a |" in category_table and "0.00" not in category_table
    assert "every category here holds a single product" in category_table
    assert all(m["category"]["why"] for m in saved["per_category"].values())


def test_a_single_category_is_trivial_not_100(tmp_path):
    root = photos(tmp_path / "grocery", {f"grocery/item{i}": 3 for i in range(6)})
    saved, md = evaluate_folder(root, tmp_path)
    assert saved["category"]["recall@1"] is None and saved["category"]["why"].startswith("trivial: one category")
    category_table = md.split("## Category protocol")[1].split("## Per category")[0]
    assert "| trivial |" in category_table and "100.00" not in category_table


def test_comparison_tables_say_na_with_the_reason():
    row = {c: None for c in comparison_report.CSV_COLUMNS}
    row.update(
        run="r",
        backbone="resnet18",
        loss="triplet",
        sampler="pk",
        status="done",
        **{
            "product_recall@1": 0.5,
            "product_map@r": 0.25,
            "category_why": "trivial: one category, so every other product is relevant",
        },
    )
    md = comparison_report.format_markdown([row])
    category = md.split("## Category protocol")[1]
    assert "| r | trivial | trivial |" in category and "`r`: trivial: one category" in category
    assert "| r | resnet18 | triplet | pk | done | 50.00 | 25.00 | trivial | trivial |" in md


@pytest.mark.slow
def test_every_entry_script_runs_on_the_quick_start_checkpoint(tiny_synthetic_root, tmp_path):
    """The quick start trains with --dataset synthetic and no --data_root (data_root null in the
    checkpoint): evaluate.py, shards.py, export.py and the demo's index build all find its data."""
    (tmp_path / "data").mkdir()
    os.symlink(tiny_synthetic_root, tmp_path / "data" / "synthetic_sop")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def run(script, *argv):
        done = subprocess.run(
            [sys.executable, str(REPO / script), *argv],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"{script}: {done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        return done.stdout

    run(
        "train.py",
        "--dataset",
        "synthetic",
        "--backbone",
        "resnet18",
        "--weights",
        "none",
        "--image_size",
        "32",
        "--epochs",
        "1",
        "--max_steps_per_epoch",
        "1",
        "--batch_size",
        "8",
        "--images_per_class",
        "2",
        "--workers",
        "0",
        "--projector_samples",
        "0",
        "--no-progress",
        "--run_name",
        "quickstart",
    )
    ckpt = "checkpoints/quickstart/best.pth"
    assert torch.load(tmp_path / ckpt, weights_only=True)["args"]["data_root"] is None
    run("evaluate.py", "--checkpoint", ckpt, "--workers", "0", "--no_progress", "--num_examples", "0")
    assert (tmp_path / "runs" / "quickstart" / "eval" / "results.json").is_file()
    run("shards.py", "--checkpoint", ckpt, "--out", "shards", "--workers", "0")
    assert (tmp_path / "shards" / "embeddings.npy").is_file()
    run("export.py", "--checkpoint", ckpt)
    assert (tmp_path / "checkpoints" / "quickstart" / "best.onnx").is_file()
    run("app_stanford.py", "--checkpoint", ckpt, "--build_index", "--workers", "0")
