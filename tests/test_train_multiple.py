"""train_multiple.py: the parser reuses train.py's flags, grid and run names, --quick defaults,
tables and plots built from fake run folders (values equal results.json's), the run states
behind resuming, and an end-to-end grid (in-process and subprocess launchers) with a failing
run, a rerun that skips finished runs, and a resume to more epochs.

Tiny on purpose: 40 synthetic products at 48 px, random weights at 32 px, 1 step per epoch.
"""

import argparse
import json
import os

from PIL import Image
import pytest
import torch

import checkpoints
from dataio import synthetic_sop
import datasets
import models
import train
import train_multiple as tm
from training import comparison, comparison_report, evaluation, flags, grid, reporting, runs, tee


@pytest.fixture(scope="module")
def tiny_sop(tmp_path_factory):
    return synthetic_sop.make_synthetic_sop(tmp_path_factory.mktemp("sop") / "sop", num_products=40, image_size=48)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_argv(root, out, *extra):
    return [
        "--dataset",
        "synthetic",
        "--data_root",
        str(root),
        "--weights",
        "none",
        "--image_size",
        "32",
        "--batch_size",
        "8",
        "--images_per_class",
        "4",
        "--epochs",
        "1",
        "--max_steps_per_epoch",
        "1",
        "--workers",
        "0",
        "--projector_samples",
        "0",
        "--lr",
        "1e-3",
        "--no-progress",
        "--val_batch_size",
        "64",
        "--checkpoint_dir",
        str(out / "checkpoints"),
        "--log_dir",
        str(out / "runs"),
        "--prefix",
        "t",
        "--eval_examples",
        "0",
        *map(str, extra),
    ]


# ============ arguments ============


def test_every_train_flag_passes_through_and_none_is_defined_twice():
    ours = tm.get_args_parser()
    train_flags = {o for a in train.get_args_parser()._actions for o in a.option_strings}
    our_flags = [o for a in ours._actions for o in a.option_strings]
    assert train_flags <= set(our_flags)
    assert len(our_flags) == len(set(our_flags))  # argparse would raise on a clash; be explicit
    seeds = (
        "--dataset stanford --backbone efficientnet_b0 --batch_size 64 --epochs 10 "
        "--lr 0.0001 --margin 0.5 --embedding_size 128"
    ).split()
    args = tm.parse_args(seeds)
    assert [p.backbone for p in grid.build_grid(args)] == ["efficientnet_b0"]
    assert (args.batch_size, args.epochs, args.lr, args.margin) == (64, 10, 1e-4, 0.5)


def test_default_grid_is_the_original_three_backbones_and_grid_flags_widen_it():
    args = tm.parse_args([])
    names = [p.run_name(args.prefix) for p in grid.build_grid(args)]
    loss, sampler = (flags.RECIPES["pretrained"][k] for k in ("loss", "sampler"))  # ImageNet weights
    assert names == [f"cmp_{b}_{loss}_{sampler}" for b in ("efficientnet_b0", "resnet18", "resnet50")]
    args = tm.parse_args(
        [
            "--backbones",
            "resnet18",
            "resnet50",
            "--samplers",
            "random",
            "pk",
            "--losses",
            "triplet",
            "multi_similarity",
            "--prefix",
            "sw",
        ]
    )
    points = grid.build_grid(args)
    assert len(points) == 8 and points[0].run_name("sw") == "sw_resnet18_triplet_random"
    assert tm.parse_args(["--sampler", "random"]).sampler == "random"
    assert {p.sampler for p in grid.build_grid(tm.parse_args(["--sampler", "random"]))} == {"random"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--backbone", "resnet18", "--backbones", "resnet50"], "either --backbone or --backbones"),
        (["--run_name", "x"], "use --prefix"),
        (["--resume", "checkpoints/x/last.pth"], "resume from their own last.pth"),
        (["--lr", "0"], "--lr must be"),  # train.py's own range check, shared by every run
    ],
)
def test_bad_arguments_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        tm.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_quick_defaults_yield_to_explicit_flags():
    args = tm.parse_args(["--quick"])
    assert (args.dataset, args.weights, args.prefix) == ("synthetic", "none", "quick")
    assert args.image_size == grid.QUICK_DEFAULTS["image_size"] and args.data_root == grid.QUICK_DATASET["root"]
    args = tm.parse_args(["--quick", "--image_size", "48", "--prefix", "mine", "--weights", "imagenet"])
    assert (args.image_size, args.prefix, args.weights, args.dataset) == (48, "mine", "imagenet", "synthetic")


def test_namespace_to_argv_round_trips_through_train_parser():
    parser = train.get_args_parser()
    ns = parser.parse_args(
        [
            "--backbone",
            "resnet50",
            "--lr",
            "0.000123456789",
            "--no-amp",
            "--deterministic",
            "--max_steps_per_epoch",
            "7",
            "--sampler",
            "random",
            "--weight_decay",
            "0",
            "--run_name",
            "a_b",
            "--resume",
            "auto",
        ]
    )
    argv = grid.namespace_to_argv(parser, ns)
    assert parser.parse_args(argv) == ns
    assert grid.namespace_to_argv(parser, parser.parse_args([])) == []


# ============ tables and plots from fake run folders ============


def fake_results(seed: float) -> dict:
    product = {k: round(seed + 0.01 * i, 6) for i, k in enumerate(reporting.PRODUCT_KEYS)}
    category = {k: round(seed / 2 + 0.01 * i, 6) for i, k in enumerate(reporting.CATEGORY_KEYS)}
    return {
        "product": product,
        "category": category,
        "num_queries": 123,
        "model": {"parameters": 4_700_000 + int(seed * 1000), "checkpoint_sha256": "0" * 64},
        "timing": {"extract_s": 1.5, "eval_s": 0.25, "cached": True, "device": "cpu"},
    }


def save_fake_checkpoint(path, epoch, args, weights=10):
    """A checkpoint checkpoints.load_checkpoint accepts, with ``weights`` float32 numbers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "format_version": checkpoints.CHECKPOINT_FORMAT_VERSION,
            "model": {"w": torch.zeros(weights), "n": torch.zeros((), dtype=torch.int64)},
            "model_args": {"backbone": "resnet18", "embedding_size": 8},
            "epoch": epoch,
            "args": dict(args),
        },
        path,
    )


def make_fake_run(root, name, results, history, weights=10):
    paths = runs.RunPaths(name, root / "checkpoints" / name, root / "runs" / name)
    paths.eval_dir.mkdir(parents=True)
    paths.results.write_text(json.dumps(results))
    runs.write_metrics_csv(paths.metrics_csv, history)
    save_fake_checkpoint(paths.best, 1, {}, weights)
    return paths


HISTORY = [
    {"epoch": 0, "val_loss": 0.5, "val_recall@1": 0.1, "lr": 1e-3, "val_time": 2.0},
    {
        "epoch": 1,
        "train_loss": 0.4,
        "train_valid_triplets": 16.0,
        "train_active_triplets": 9.0,
        "val_loss": 0.45,
        "val_recall@1": 0.3,
        "lr": 1e-3,
        "epoch_time": 10.0,
        "val_time": 2.0,
    },
    {
        "epoch": 2,
        "train_loss": 0.3,
        "train_valid_triplets": 16.0,
        "train_active_triplets": 5.0,
        "val_loss": 0.44,
        "val_recall@1": 0.3,
        "lr": 5e-4,
        "epoch_time": 11.0,
        "val_time": 2.0,
    },
]


def test_report_values_come_from_the_runs_files(tmp_path):
    points = [
        grid.GridPoint("efficientnet_b0", "triplet", "pk"),
        grid.GridPoint("resnet18", "triplet", "pk"),
        grid.GridPoint("resnet50", "triplet", "pk"),
    ]
    results = [fake_results(0.6), fake_results(0.4)]
    rows, histories = [], {}
    for i, point in enumerate(points):
        name = point.run_name("f")
        if i < 2:
            paths = make_fake_run(tmp_path, name, results[i], HISTORY, weights=10 + i)
            histories[point.backbone] = runs.read_metrics_csv(paths.metrics_csv)
        else:  # a failed run: no files at all
            paths = runs.RunPaths(name, tmp_path / "checkpoints" / name, tmp_path / "runs" / name)
        status, error = ("trained", "") if i < 2 else ("failed (train)", "ValueError: boom")
        rows.append(comparison.collect_row(point, paths, status, error))
    files = comparison_report.write_report(rows, histories, tmp_path / "cmp", notes="fake")

    table = comparison_report.read_csv(files["csv"])
    assert [r["run"] for r in table] == [p.run_name("f") for p in points]
    for row, res in zip(table, results):
        for k in reporting.PRODUCT_KEYS:
            assert row[f"product_{k}"] == res["product"][k]
        for k in reporting.CATEGORY_KEYS:
            assert row[f"category_{k}"] == res["category"][k]
        assert row["parameters"] == res["model"]["parameters"]
        assert row["eval_time_s"] == 1.75  # extract_s + eval_s (the bool 'cached' is no time)
        assert row["train_time_s"] == 2.0 + 10.0 + 11.0  # epoch 0's validation + epoch times
        assert row["best_epoch"] == 1 and row["epochs"] == 2  # first of equal Recall@1
    assert table[1]["weights_bytes"] == 11 * 4 + 8  # float32 w + the int64 buffer n
    best = tmp_path / "checkpoints" / "f_resnet18_triplet_pk" / "best.pth"
    assert table[1]["checkpoint_bytes"] == best.stat().st_size and table[1]["checkpoint_epoch"] == 1
    assert table[2]["status"] == "failed (train)" and table[2]["product_recall@1"] is None

    md = files["md"].read_text()
    assert "| f_efficientnet_b0_triplet_pk | efficientnet_b0 | triplet | pk | trained | 60.00 |" in md
    assert "## Failures" in md and "ValueError: boom" in md
    for key in ("recall_plot", "curves_plot"):
        with Image.open(files[key]) as im:
            assert im.format == "PNG" and im.size[0] > 300


@pytest.mark.parametrize("select_metric, epoch", [("recall@1", 1), ("map@r", 2), ("last", 2), (None, 1)])
def test_best_epoch_is_the_one_best_pth_holds(tmp_path, select_metric, epoch):
    """The row's best epoch follows the run's own --select_metric (recorded in its checkpoint;
    none recorded: Recall@1), ties kept at the earlier epoch, as train.py keeps best.pth."""
    history = [{**row, "val_map@r": 0.1 * row["epoch"]} for row in HISTORY]
    paths = make_fake_run(tmp_path, "sel", fake_results(0.5), history)
    state = torch.load(paths.best, weights_only=False)
    if select_metric is not None:
        torch.save({**state, "select_metric": select_metric}, paths.best)
    point = grid.GridPoint("resnet18", "triplet", "pk")
    assert comparison.collect_row(point, paths)["best_epoch"] == epoch


def test_run_state_decides_skip_resume_evaluate_or_conflict(tmp_path):
    args = tm.parse_args(
        [
            "--backbones",
            "resnet18",
            "--epochs",
            "3",
            "--prefix",
            "s",
            "--checkpoint_dir",
            str(tmp_path / "c"),
            "--log_dir",
            str(tmp_path / "r"),
        ]
    )
    ns = grid.train_namespace(args, grid.build_grid(args)[0])
    paths = grid.run_paths(ns)
    assert grid.run_state(paths, ns)[0] == "new"
    save_fake_checkpoint(paths.last, 1, vars(ns))
    assert grid.run_state(paths, ns) == ("resume", "at epoch 1/3")
    save_fake_checkpoint(paths.last, 3, vars(ns))
    assert grid.run_state(paths, ns)[0] == "evaluate"  # no best.pth / results.json yet
    os.link(paths.last, paths.best)
    paths.eval_dir.mkdir(parents=True)
    paths.results.write_text(json.dumps({"model": {"checkpoint_sha256": "f" * 64}}))
    assert grid.run_state(paths, ns)[0] == "evaluate"  # results of another checkpoint
    paths.results.write_text(json.dumps({"model": {"checkpoint_sha256": checkpoints.checkpoint_hash(paths.best)}}))
    assert grid.run_state(paths, ns)[0] == "done"
    assert grid.run_state(paths, argparse.Namespace(**{**vars(ns), "overwrite": True}))[0] == "new"
    state, detail = grid.run_state(paths, argparse.Namespace(**{**vars(ns), "image_size": 96}))
    assert state == "conflict" and "image_size 224 -> 96" in detail
    state, detail = grid.run_state(paths, argparse.Namespace(**{**vars(ns), "epochs": 2}))
    assert state == "conflict" and "--epochs 3" in detail
    # more epochs than before: the same run goes on; workers / device may change freely
    assert grid.run_state(paths, argparse.Namespace(**{**vars(ns), "epochs": 5, "workers": 7}))[0] == "resume"


def test_error_summary_picks_the_error_line():
    text = "epoch 1\rprogress 50%\nTraceback (most recent call last):\n  File x\nValueError: bad thing\n"
    assert tee.error_summary(text) == "ValueError: bad thing"
    assert tee.error_summary("evaluate.py: checkpoint not found: x.pth\n") == "evaluate.py: checkpoint not found: x.pth"
    assert tee.error_summary("") == "no output"


# ============ end to end ============


@pytest.mark.slow
def test_grid_runs_reports_failures_skips_finished_runs_and_resumes(tiny_sop, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    real_grid = grid.build_grid
    bogus = grid.GridPoint("no_such_net", "triplet", "pk")
    monkeypatch.setattr(grid, "build_grid", lambda args: real_grid(args) + [bogus])
    argv = tiny_argv(tiny_sop, tmp_path, "--backbones", "resnet18", "efficientnet_b0", "--launcher", "inprocess")

    # ---- first pass: two runs train and evaluate, the bogus one fails, the others still run
    rows = tm.main(tm.parse_args(argv))
    assert [r["status"] for r in rows] == ["trained", "trained", "failed (train)"]
    assert "no_such_net" in rows[2]["error"]
    out = tmp_path / "runs" / "comparison"
    for name in ("comparison.md", "comparison.csv", "recall_at_1.png", "training_curves.png"):
        assert (out / name).is_file(), name
    table = {r["run"]: r for r in comparison_report.read_csv(out / "comparison.csv")}
    for backbone in ("resnet18", "efficientnet_b0"):
        run = f"t_{backbone}_triplet_pk"
        results = json.loads((tmp_path / "runs" / run / "eval" / "results.json").read_text())
        for k in reporting.PRODUCT_KEYS:
            assert table[run][f"product_{k}"] == results["product"][k]
        for k in reporting.CATEGORY_KEYS:
            assert table[run][f"category_{k}"] == results["category"][k]
        assert table[run]["parameters"] == results["model"]["parameters"]
        assert table[run]["checkpoint_bytes"] == (tmp_path / "checkpoints" / run / "best.pth").stat().st_size
        assert table[run]["epochs"] == 1 and table[run]["train_time_s"] > 0
    assert "no_such_net" in (out / "comparison.md").read_text()

    # ---- rerun: finished runs are skipped (checkpoints untouched), the failure is reported again
    last = tmp_path / "checkpoints" / "t_resnet18_triplet_pk" / "last.pth"
    stamp = last.stat().st_mtime_ns
    rows = tm.main(tm.parse_args(argv))
    assert [r["status"] for r in rows] == ["skipped (done)", "skipped (done)", "failed (train)"]
    assert last.stat().st_mtime_ns == stamp
    first = comparison_report.read_csv(out / "comparison.csv")[0]
    assert first["product_recall@1"] == table["t_resnet18_triplet_pk"]["product_recall@1"]

    # ---- subprocess launcher, one more epoch: resnet18 resumes from its last.pth; the bogus
    # backbone now fails in its child process (train.py's argparse), exit code 1
    argv = tiny_argv(tiny_sop, tmp_path, "--backbones", "resnet18", "--epochs", "2")
    assert tm.cli(argv) == 1
    row, failed = comparison_report.read_csv(out / "comparison.csv")
    assert row["status"] == "resumed" and row["epochs"] == 2
    assert failed["status"] == "failed (train)" and "invalid choice" in failed["error"]
    history = runs.read_metrics_csv(tmp_path / "runs" / "t_resnet18_triplet_pk" / "metrics.csv")
    assert [int(r["epoch"]) for r in history] == [0, 1, 2]
    assert "resuming from" in (out / "logs" / "t_resnet18_triplet_pk.train.log").read_text()


def test_dry_run_prints_commands_and_report_only_trains_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--backbones", "resnet18", "resnet50", "--samplers", "random", "--epochs", "2"]
    assert tm.cli(argv + ["--dry_run"]) == 0
    out = capsys.readouterr().out
    loss = flags.RECIPES["pretrained"]["loss"]  # the recipe of the default --weights imagenet
    assert f"[1/2] cmp_resnet18_{loss}_random: new" in out
    # the recipe resolved: its every value on the command line
    assert "train.py --backbone resnet18 " in out and "--recipe pretrained" in out
    assert f"--loss {loss} --sampler random --epochs 2" in out
    assert f"evaluate.py --checkpoint checkpoints/cmp_resnet18_{loss}_random/best.pth" in out
    # one zero-shot evaluation per backbone
    assert "cmp_zero_shot_resnet50_224px: new" in out
    assert (
        "evaluate.py --zero_shot --backbone resnet50 --image_size 224 --data_root data/Stanford_Online_Products"
    ) in out
    assert not (tmp_path / "runs").exists() and not (tmp_path / "checkpoints").exists()
    assert tm.cli(argv + ["--report_only"]) == 0
    rows = comparison_report.read_csv(tmp_path / "runs" / "comparison" / "comparison.csv")
    assert [(r["backbone"], r["loss"], r["status"]) for r in rows] == [
        ("resnet18", "zero-shot", "not run"),
        ("resnet18", loss, "not run"),
        ("resnet50", "zero-shot", "not run"),
        ("resnet50", loss, "not run"),
    ]
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_zero_shot_row_per_backbone_from_imagenet_weights(tiny_sop, tmp_path, monkeypatch):
    """--weights imagenet: each backbone gets a zero-shot row (evaluate.py --zero_shot on the
    test split at the grid's image size) before its trained rows; reruns reuse it."""
    monkeypatch.chdir(tmp_path)
    argv = tiny_argv(
        tiny_sop,
        tmp_path,
        "--backbones",
        "efficientnet_lite0",
        "--weights",
        "imagenet",
        "--launcher",
        "inprocess",
        "--embedding_size",
        "16",
    )
    rows = tm.main(tm.parse_args(argv))
    assert [(r["loss"], r["status"]) for r in rows] == [
        ("zero-shot", "evaluated"),
        (flags.RECIPES["pretrained"]["loss"], "trained"),
    ]
    direct = evaluation.evaluate_zero_shot(
        "efficientnet_lite0", str(tiny_sop), image_size=32, write=False, workers=0, num_examples=0, progress=False
    )
    assert rows[0]["product_map@r"] == direct["product"]["map@r"]
    assert rows[0]["run"] == "t_" + models.zero_shot_name("efficientnet_lite0", 32)
    md = (tmp_path / "runs" / "comparison" / "comparison.md").read_text()
    assert "| t_zero_shot_efficientnet_lite0_32px | efficientnet_lite0 | zero-shot |" in md
    again = tm.main(tm.parse_args(argv))
    assert [r["status"] for r in again] == ["skipped (done)", "skipped (done)"]


@pytest.mark.slow
def test_grid_on_a_folder_tree_uses_its_split_for_every_row(tiny_sop, tmp_path, monkeypatch):
    """train_multiple.py on your own photos (a <category>/<product>/<image> tree): the zero-shot
    and the trained rows evaluate the same drawn test split (--test_fraction), named by the
    tree's categories."""
    import json

    from dataio import prepare_data

    monkeypatch.chdir(tmp_path)
    root = prepare_data.convert_catalogue(tiny_sop, tmp_path / "tree", "folder", progress=False)
    argv = tiny_argv(
        root,
        tmp_path,
        "--backbones",
        "efficientnet_lite0",
        "--weights",
        "imagenet",
        "--launcher",
        "inprocess",
        "--embedding_size",
        "16",
        "--test_fraction",
        "0.4",
    )
    rows = tm.main(tm.parse_args(argv))
    assert [r["status"] for r in rows] == ["evaluated", "trained"]
    test_set = datasets.SOPDataset(root, "test", test_fraction=0.4)
    assert len(test_set) != len(datasets.SOPDataset(root, "test"))  # the flag matters here
    results = [json.loads(p.read_text()) for p in sorted((tmp_path / "runs").glob("t_*/eval/results.json"))]
    assert len(results) == 2
    for r in results:
        assert r["data"]["layout"] == "folder" and r["data"]["num_images"] == len(test_set)
        assert set(r["per_category"]) <= set(test_set.categories)
