"""Held out means held out: the checkpoint records the products it trained and validated on,
evaluate.py refuses a test split holding any of them (unless --allow_overlap, then results say
"held_out": false), a run trained with --test_fraction 0 has no test split to score, and the
deploy gate (--baseline) exits with code 3 when the new checkpoint is worse."""

import json
from pathlib import Path
import shutil
import subprocess
import sys

import pytest
from support import QUIET_EVAL
import torch

import checkpoints
from dataio import prepare_data
import datasets
import evaluate
import models
from search import loading as search_loading
import train
from training import arg_checks, heldout

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shop(tiny_synthetic_root, tmp_path_factory):
    """The tiny synthetic SOP (24 products) as a <category>/<product>/<image> tree: its test
    split is drawn. Read-only."""
    out = tmp_path_factory.mktemp("shop") / "shop"
    prepare_data.convert_catalogue(tiny_synthetic_root, out, "folder", progress=False)
    return out


def train_epoch_zero(root, out, *extra):
    """checkpoints/<run>/last.pth of a run that only validated (epoch 0), run named ``r``."""
    argv = [
        "--data_root",
        str(root),
        "--backbone",
        "resnet18",
        "--weights",
        "none",
        "--image_size",
        "32",
        "--batch_size",
        "8",
        "--images_per_class",
        "2",
        "--epochs",
        "0",
        "--workers",
        "0",
        "--projector_samples",
        "0",
        "--no-progress",
        "--val_fraction",
        "0.2",
        "--run_name",
        "r",
        "--checkpoint_dir",
        str(out / "checkpoints"),
        "--log_dir",
        str(out / "runs"),
        *extra,
    ]
    parser = train.get_args_parser()
    args = parser.parse_args(argv)
    arg_checks.validate_args(args, parser)
    train.main(args)
    return out / "checkpoints" / "r" / "last.pth"


def evaluate_cli(*argv):
    return evaluate.main(
        evaluate.get_args_parser().parse_args(
            [
                *map(str, argv),
                *QUIET_EVAL,
                "--runtime",
                "torch",
            ]
        )
    )


def test_checkpoint_records_its_products_and_a_grown_catalogue_stays_held_out(shop, tmp_path):
    ckpt = train_epoch_zero(shop, tmp_path)
    record = torch.load(ckpt, weights_only=True)["products"]
    train_set = datasets.SOPDataset(shop, "train", val_fraction=0.2, check_files=False)
    val_set = datasets.SOPDataset(shop, "val", val_fraction=0.2, check_files=False)
    assert record == {"train": sorted(set(train_set.product_ids)), "val": sorted(set(val_set.product_ids))}
    assert models.load_model(ckpt).checkpoint_info["epoch"] == 0  # the new field loads everywhere

    grown = tmp_path / "grown"
    shutil.copytree(shop, grown)
    for folder in sorted(p for p in shop.glob("*/*") if p.is_dir())[:6]:  # 6 new products
        shutil.copytree(folder, grown / folder.parent.name / f"new_{folder.name}")
    results = evaluate_cli("--checkpoint", ckpt, "--data_root", grown, "--output", tmp_path / "ev")
    assert results["held_out"] is True and results["held_out_why"] is None
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["held_out"] is True


def test_overlapping_test_split_is_refused_unless_allowed(shop, tmp_path, capsys):
    ckpt = train_epoch_zero(shop, tmp_path)
    # another draw of the same catalogue: its test split holds products the run trained on
    with pytest.raises(SystemExit) as e:
        evaluate_cli("--checkpoint", ckpt, "--test_fraction", "0.9", "--output", tmp_path / "ev")
    message = str(e.value.code)
    assert "were trained or validated on by r" in message and "--allow_overlap" in message
    record = torch.load(ckpt, weights_only=True)["products"]
    test_ids = set(datasets.SOPDataset(shop, "test", test_fraction=0.9, check_files=False).product_ids)
    shared = sorted(test_ids & set(record["train"] + record["val"]))
    assert f"{len(shared)} of the {len(test_ids)} products" in message and shared[0] in message

    results = evaluate_cli(
        "--checkpoint", ckpt, "--test_fraction", "0.9", "--allow_overlap", "--output", tmp_path / "ev"
    )
    assert results["held_out"] is False and f"{len(shared)} of the" in results["held_out_why"]
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["held_out"] is False
    assert "figures are not held out" in (tmp_path / "ev" / "results.md").read_text()
    assert "not held out" in capsys.readouterr().out


def test_a_run_validated_on_the_test_split_is_not_held_out(shop, tmp_path):
    ckpt = train_epoch_zero(shop, tmp_path, "--val_split", "test")
    with pytest.raises(SystemExit, match="--allow_overlap"):
        evaluate_cli("--checkpoint", ckpt, "--output", tmp_path / "ev")
    results = evaluate_cli("--checkpoint", ckpt, "--allow_overlap", "--output", tmp_path / "ev")
    assert results["held_out"] is False
    # an older checkpoint (no record) that validated on test is marked from its args alone
    state = torch.load(ckpt, weights_only=True)
    del state["products"]
    checkpoints.atomic_save(state, ckpt)
    results = evaluate_cli("--checkpoint", ckpt, "--output", tmp_path / "ev")
    assert results["held_out"] is False and "--val_split test" in results["held_out_why"]
    assert "figures are not held out" in (tmp_path / "ev" / "results.md").read_text()


def test_an_older_checkpoint_without_record_is_marked_unknown(shop, tmp_path):
    ckpt = train_epoch_zero(shop, tmp_path)
    state = torch.load(ckpt, weights_only=True)
    del state["products"]
    checkpoints.atomic_save(state, ckpt)
    results = evaluate_cli("--checkpoint", ckpt, "--output", tmp_path / "ev")
    assert results["held_out"] is None and "no record" in results["held_out_why"]


def test_test_fraction_0_trains_on_every_product_and_has_no_test_split(shop, tmp_path, capsys):
    ckpt = train_epoch_zero(shop, tmp_path, "--test_fraction", "0")
    record = torch.load(ckpt, weights_only=True)["products"]
    everything = set(datasets.SOPDataset(shop, "trainval", test_fraction=0, check_files=False).product_ids)
    assert len(everything) == 24 and set(record["train"]) | set(record["val"]) == everything
    assert record["val"] and not set(record["train"]) & set(record["val"])  # validation still drawn
    with pytest.raises(SystemExit) as e:
        evaluate_cli("--checkpoint", ckpt, "--output", tmp_path / "ev")
    assert e.value.code == evaluate.EXIT_NO_TEST_SPLIT
    assert "no held-out test split" in capsys.readouterr().err
    # the demo's default split for such a run is the whole catalogue: the engine serves every image
    args = torch.load(ckpt, weights_only=True)["args"]
    assert datasets.serving_split(args, shop) == "trainval"
    assert datasets.serving_split({"test_fraction": 0.5}, shop) == "test"
    loaded = search_loading.load_search_model(ckpt, device="cpu", runtime="torch")
    with pytest.raises(search_loading.SetupError, match="no held-out test split"):
        search_loading.dataset_index(loaded, split="test", index_path=tmp_path / "test.npz", workers=0)
    # as the demo calls it (app_stanford: --split defaults to None): the serving split
    index, _ = search_loading.dataset_index(loaded, split=None, index_path=tmp_path / "all.npz", workers=0)
    assert index.meta["split"] == "trainval"
    assert len(index) == len(datasets.SOPDataset(shop, "trainval", test_fraction=0.5, check_files=False)) + len(
        datasets.SOPDataset(shop, "test", test_fraction=0.5, check_files=False)
    )


def test_heldout_check_names_a_few_of_many(shop):
    test_set = datasets.SOPDataset(shop, "test", check_files=False)
    ids = sorted(set(test_set.product_ids))
    with pytest.raises(heldout.OverlapError) as e:
        heldout.check({"train": ids, "val": []}, {}, test_set, "r")
    assert f"{len(ids)} of the {len(ids)} products" in str(e.value)
    assert f"and {len(ids) - heldout.NAMED_PRODUCTS} more" in str(e.value)


# ============ deploy gate ============


def tiny_checkpoint(path, root, seed):
    """A random resnet18 checkpoint 'trained' on the SOP-layout ``root``'s training products."""
    torch.manual_seed(seed)
    model = models.build_model("resnet18", embedding_size=16, weights="none", image_size=32)
    train_ids = sorted(set(datasets.SOPDataset(root, "trainval", check_files=False).product_ids))
    checkpoints.atomic_save(
        checkpoints.make_checkpoint(
            model,
            args={"dataset": "synthetic", "data_root": str(root), "select_metric": "recall@1"},
            products={"train": train_ids, "val": []},
        ),
        path,
    )
    return path


@pytest.mark.slow
def test_deploy_gate_exits_3_when_the_new_checkpoint_is_worse(tiny_synthetic_root, tmp_path):
    a = tiny_checkpoint(tmp_path / "checkpoints" / "a" / "best.pth", tiny_synthetic_root, seed=0)
    b = tiny_checkpoint(tmp_path / "checkpoints" / "b" / "best.pth", tiny_synthetic_root, seed=1)

    def gate(new, old, tolerance):
        out = tmp_path / f"{new.parent.name}_vs_{old.parent.name}_{tolerance}"
        done = subprocess.run(
            [
                sys.executable,
                str(REPO / "evaluate.py"),
                "--checkpoint",
                str(new),
                "--baseline",
                str(old),
                "--tolerance",
                str(tolerance),
                "--output",
                str(out),
                *QUIET_EVAL,
                "--runtime",
                "torch",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        return done, json.loads((out / "results.json").read_text()), (out / "results.md").read_text()

    done, results, md = gate(a, b, 0)
    diff = results["gate"]["difference_points"]
    assert results["gate"]["metric"] == "recall@1" and diff != 0
    assert diff == pytest.approx(100 * (results["product"]["recall@1"] - results["baseline"]["product"]["recall@1"]))
    assert results["baseline"]["num_queries"] == results["num_queries"]  # the same images
    assert "| baseline b |" in md and "Deploy gate" in md
    worse, better = (a, b) if diff < 0 else (b, a)
    done, results, md = gate(worse, better, 0)
    assert done.returncode == evaluate.EXIT_GATE_FAILED, done.stderr
    assert results["gate"]["passed"] is False and "Deploy gate FAILED" in md
    done, results, _ = gate(better, worse, 0)
    assert done.returncode == 0 and results["gate"]["passed"] is True
    done, results, _ = gate(worse, better, abs(diff) + 0.01)  # within the tolerance
    assert done.returncode == 0 and results["gate"]["passed"] is True
