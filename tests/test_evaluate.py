"""evaluate.py end to end on a tiny synthetic SOP: the checkpoint alone drives it, the outputs
have the retrieval.evaluate_embeddings shape, the embeddings cache is reused only while it is valid; --zero_shot
evaluates a pretrained backbone alone, and a checkpoint trained from ImageNet weights reports
its backbone's zero-shot row beside its own."""

import json
from pathlib import Path

import numpy as np
import pytest
from support import QUIET_EVAL
import torch

import backbones
import checkpoints
from dataio import catalogue
import datasets
import evaluate
import models
import preprocessing
import retrieval
from search.index import GalleryIndex
from training import evaluation, runs

SPEC_PRODUCT = ["recall@1", "recall@10", "recall@100", "recall@1000", "map@r", "r_precision"]
SPEC_CATEGORY = [
    "recall@1",
    "recall@5",
    "recall@10",
    "recall@20",
    "precision@1",
    "precision@5",
    "precision@10",
    "precision@20",
    "map@10",
]


def save_checkpoint(path, data_root, seed=0):
    torch.manual_seed(seed)
    model = models.build_model("resnet18", embedding_size=32, weights="none", image_size=48)
    ckpt = checkpoints.make_checkpoint(
        model, args={"dataset": "synthetic", "data_root": str(data_root)}, epoch=3, metrics={"recall@1": 0.5}
    )
    checkpoints.atomic_save(ckpt, path)
    return path


def run(argv):
    return evaluate.main(evaluate.get_args_parser().parse_args(argv))


@pytest.mark.slow
def test_evaluate_end_to_end_with_cache(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default output: runs/<run>/eval relative to the working dir
    ckpt = save_checkpoint(tmp_path / "checkpoints" / "tiny_run" / "best.pth", synthetic_root)
    cache = tmp_path / "cache" / "emb.npz"
    argv = [
        "--checkpoint",
        str(ckpt),
        "--workers",
        "0",
        "--device",
        "cpu",
        "--no_progress",
        "--embeddings_cache",
        str(cache),
        "--num_examples",
        "3",
        "--batch_size",
        "32",
    ]
    results = run(argv)

    out = tmp_path / "runs" / "tiny_run" / "eval"
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["product"]) == SPEC_PRODUCT and list(saved["category"]) == SPEC_CATEGORY
    assert all(0 <= v <= 1 for p in ("product", "category") for v in saved[p].values())
    test_set = datasets.SOPDataset(synthetic_root, "test")
    assert saved["num_queries"] == len(test_set)
    assert saved["model"]["backbone"] == "resnet18" and saved["model"]["embedding_size"] == 32
    assert saved["model"]["parameters"] > 1e6 and saved["model"]["checkpoint_size_mb"] > 1
    assert set(saved["embedding_stats"]) == {"mean", "std", "norm_mean", "dim_std_mean", "mean_cosine"}
    assert saved["embedding_stats"]["norm_mean"] == pytest.approx(1, abs=1e-5)
    assert saved["timing"]["extract_s"] > 0 and saved["timing"]["cached"] is False
    cats = {catalogue.SOP_CATEGORIES[s - 1] for s in np.unique(test_set.super_ids)}
    assert set(saved["per_category"]) == cats
    assert sum(c["num_queries"] for c in saved["per_category"].values()) == len(test_set)

    # the metrics are those of retrieval.evaluate_embeddings on the cached embeddings
    index = GalleryIndex.load(cache)
    assert index.paths == test_set.rel_paths and index.checkpoint_hash == checkpoints.checkpoint_hash(ckpt)
    direct = retrieval.evaluate_embeddings(index.embeddings, test_set.class_ids, test_set.super_ids)
    assert {k: saved[k] for k in direct} == direct

    md = (out / "results.md").read_text()
    for header in (
        "| Model | Recall@1 | Recall@5 | Recall@10 | Recall@20 | P@1 | P@5 | P@10 | P@20 | mAP@10 |",
        "| Model | Recall@1 | Recall@10 | Recall@100 | Recall@1000 | MAP@R | R-Precision |",
        "| Category | Queries |",
    ):
        assert header in md
    assert (out / "retrieval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["output_dir"] == str(Path("runs") / "tiny_run" / "eval")

    # second run: embeddings from the cache, same numbers
    again = run(argv + ["--num_examples", "0", "--output", str(tmp_path / "second")])
    assert again["timing"]["cached"] is True and again["timing"]["extract_s"] == 0
    assert {k: again[k] for k in direct} == direct
    assert not (tmp_path / "second" / "retrieval.png").exists()

    # another checkpoint at the same path: the cache is stale, embeddings are extracted again
    save_checkpoint(ckpt, synthetic_root, seed=1)
    third = evaluation.evaluate_checkpoint(
        ckpt,
        split="test",
        output=tmp_path / "third",
        workers=0,
        device="cpu",
        embed=evaluate.cached_embeddings(cache),
        num_examples=0,
        progress=False,
    )
    assert third["timing"]["cached"] is False
    assert GalleryIndex.load(cache).checkpoint_hash == checkpoints.checkpoint_hash(ckpt)
    assert json.loads((tmp_path / "third" / "results.json").read_text())["model"]["epoch"] == 3


def test_default_output_is_the_runs_eval_folder():
    """runs/<run>/eval (training.runs' layout), under the run's own --log_dir when it had one."""
    ckpt = Path("checkpoints") / "r1" / "best.pth"
    assert evaluation.default_output(ckpt, {}) == runs.RunPaths.named("r1").eval_dir == Path("runs/r1/eval")
    assert evaluation.default_output(ckpt, {"log_dir": "elsewhere"}) == Path("elsewhere/r1/eval")
    assert runs.RunPaths.of_checkpoint(ckpt).results == Path("runs/r1/eval") / runs.RESULTS_NAME


def test_evaluate_reports_a_missing_checkpoint(tmp_path):
    missing = tmp_path / "checkpoints" / "nope" / "best.pth"
    with pytest.raises(SystemExit) as err:
        run(["--checkpoint", str(missing), "--device", "cpu"])
    assert str(missing) in str(err.value.code)


def test_evaluate_reports_a_missing_dataset(tmp_path):
    ckpt = save_checkpoint(tmp_path / "run" / "best.pth", tmp_path / "no_data_here")
    with pytest.raises(SystemExit) as err:
        run(["--checkpoint", str(ckpt), "--device", "cpu", "--output", str(tmp_path / "out")])
    assert "no_data_here" in str(err.value.code)


@pytest.mark.parametrize(
    "flags, expected", [([], True), (["--no-progress"], False), (["--no_progress"], False), (["--progress"], True)]
)
def test_progress_flag_spellings(flags, expected):
    """train.py's --progress/--no-progress, and the earlier --no_progress."""
    args = evaluate.get_args_parser().parse_args(["--checkpoint", "c.pth", *flags])
    assert args.progress is expected


def test_embedding_stats_show_collapse():
    rng = np.random.default_rng(0)
    spread = rng.normal(size=(500, 16))
    spread /= np.linalg.norm(spread, axis=1, keepdims=True)
    collapsed = np.repeat(spread[:1], 500, axis=0)
    a, b = evaluation.embedding_stats(spread), evaluation.embedding_stats(collapsed)
    # the overall std cannot tell them apart; the two collapse measures can
    assert b["std"] > 0.1 and b["dim_std_mean"] == pytest.approx(0, abs=1e-12)
    assert b["mean_cosine"] == pytest.approx(1) and a["mean_cosine"] < 0.05
    assert a["dim_std_mean"] > 0.2
    # mean_cosine is the mean over all ordered pairs of the cosine
    assert a["mean_cosine"] == pytest.approx(float((spread @ spread.T).mean()))


def test_compile_flag_extracts_with_the_compiled_model(synthetic_root, tmp_path, monkeypatch):
    """--compile hands torch.compile's module to the extraction and gives the same metrics.
    (torch.compile is replaced by a wrapper here: inductor needs a C++ toolchain CI may lack.)"""
    ckpt = save_checkpoint(tmp_path / "checkpoints" / "c" / "best.pth", synthetic_root)
    seen = []

    class Compiled(torch.nn.Module):  # what torch.compile returns: a module wrapping the model
        def __init__(self, model):
            super().__init__()
            self._orig_mod = model

        def forward(self, x):
            seen.append(x.shape[0])
            return self._orig_mod(x)

    monkeypatch.setattr(torch, "compile", Compiled)
    base = ["--checkpoint", str(ckpt), *QUIET_EVAL]
    plain = run(base + ["--output", str(tmp_path / "plain")])
    assert not seen
    compiled = run(base + ["--output", str(tmp_path / "compiled"), "--compile"])
    assert sum(seen) == compiled["num_queries"]  # every image went through the compiled module
    assert compiled["product"] == pytest.approx(plain["product"])


# ============ zero-shot ============


def direct_zero_shot(root, size=32):
    """The backbone's L2-normalised pooled features, by hand: the reference for --zero_shot."""
    net = models.build_model("efficientnet_lite0", weights="imagenet").backbone.eval()
    test_set = datasets.SOPDataset(root, "test", transform=preprocessing.build_transform(size, train=False))
    with torch.no_grad():
        feats = torch.cat(
            [
                net(torch.stack([test_set[i][0] for i in range(j, min(j + 64, len(test_set)))]))
                for j in range(0, len(test_set), 64)
            ]
        )
    emb = torch.nn.functional.normalize(feats, dim=1).numpy()
    return retrieval.evaluate_embeddings(emb, test_set.class_ids, test_set.super_ids)


def test_zero_shot_cli_equals_the_backbone_features_by_hand(synthetic_root, tmp_path):
    out = tmp_path / "zs"
    results = run(
        [
            "--zero_shot",
            "--backbone",
            "efficientnet_lite0",
            "--data_root",
            str(synthetic_root),
            "--image_size",
            "32",
            *QUIET_EVAL,
            "--output",
            str(out),
        ]
    )
    expected = direct_zero_shot(synthetic_root)
    assert results["product"] == pytest.approx(expected["product"], abs=1e-6)
    assert results["category"] == pytest.approx(expected["category"], abs=1e-6)
    saved = json.loads((out / "results.json").read_text())
    assert saved["model"]["zero_shot"] is True and saved["model"]["embedding_size"] == 1280
    assert saved["model"]["checkpoint"] is None and saved["model"]["head"] == "none"
    assert saved["held_out"] is True  # nothing was trained on any catalogue
    assert "Zero-shot evaluation of `efficientnet_lite0`" in (out / "results.md").read_text()


def test_checkpoint_from_imagenet_weights_reports_its_zero_shot_row(synthetic_root, tmp_path, capsys):
    torch.manual_seed(0)
    model = models.build_model("efficientnet_lite0", embedding_size=16, weights="imagenet", image_size=32)
    ckpt = tmp_path / "checkpoints" / "lite" / "best.pth"
    checkpoints.atomic_save(
        checkpoints.make_checkpoint(
            model, args={"dataset": "synthetic", "weights": "imagenet", "data_root": str(synthetic_root)}
        ),
        ckpt,
    )
    base = [
        "--checkpoint",
        str(ckpt),
        *QUIET_EVAL,
        "--output",
        str(tmp_path / "out"),
    ]
    results = run(base)
    expected = direct_zero_shot(synthetic_root)
    assert results["zero_shot"]["product"] == pytest.approx(expected["product"], abs=1e-6)
    assert results["product"] != results["zero_shot"]["product"]  # the 16-d head differs
    printed = capsys.readouterr().out
    assert "zero-shot backbone" in printed and "lite" in printed
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| zero-shot efficientnet_lite0 (ImageNet features, no training) |" in md
    assert "zero_shot" not in run(base + ["--no-zero_shot_row"])


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "either --checkpoint"),
        (["--checkpoint", "a.pth", "--zero_shot", "--backbone", "resnet18", "--data_root", "d"], "either --checkpoint"),
        (["--zero_shot", "--data_root", "d"], "--zero_shot needs --backbone"),
        (
            ["--zero_shot", "--backbone", "resnet18", "--data_root", "d", "--image_size", "8"],
            "--image_size must be >= 32",
        ),
    ],
)
def test_bad_argument_combinations_exit_2(argv, message, capsys):
    parser = evaluate.get_args_parser()
    with pytest.raises(SystemExit) as exc:
        evaluate.check_args(parser, parser.parse_args(argv))
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_zero_shot_row_is_skipped_when_the_imagenet_weights_are_unavailable(synthetic_root, tmp_path, monkeypatch):
    """Offline and without cached weights, the checkpoint is still evaluated; only the zero-shot
    row is left out (with a warning)."""
    ckpt = save_checkpoint(tmp_path / "checkpoints" / "r" / "best.pth", synthetic_root)
    state = torch.load(ckpt, weights_only=True)
    state["args"]["weights"] = "imagenet"
    checkpoints.atomic_save(state, ckpt)

    def unavailable(*a, **k):
        raise backbones.WeightsUnavailableError("offline")

    monkeypatch.setattr(models, "zero_shot_model", unavailable)
    results = run(
        [
            "--checkpoint",
            str(ckpt),
            *QUIET_EVAL,
            "--output",
            str(tmp_path / "out"),
        ]
    )
    assert "zero_shot" not in results and 0 <= results["product"]["recall@1"] <= 1
