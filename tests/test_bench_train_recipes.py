"""Smoke test of bench/train_recipes.py: a recipe runs end to end on tiny data and reports the
validation Recall@1 before training and after each epoch, and one training loss per epoch."""

import importlib.util
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "train_recipes.py"


pytestmark = pytest.mark.slow  # end to end


@pytest.fixture(scope="module")
def recipes():
    spec = importlib.util.spec_from_file_location("train_recipes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "extra",
    [
        ["--loss", "multi_similarity"],
        ["--model", "small_cnn", "--schedule", "onecycle"],
        ["--loss", "proxy_anchor", "--optimizer", "sgd"],
    ],
)
def test_recipe_runs_and_reports(recipes, synthetic_root, extra, capsys, one_torch_thread):
    out = recipes.main(
        recipes.get_args_parser().parse_args(
            [
                "--data_root",
                str(synthetic_root),
                "--image_size",
                "32",
                "--batch_size",
                "16",
                "--epochs",
                "2",
                "--workers",
                "0",
                "--lr",
                "1e-3",
                *extra,
            ]
        )
    )
    assert len(out["val_recall@1"]) == 3 and all(0 <= r <= 100 for r in out["val_recall@1"])
    assert len(out["train_loss"]) == 2 and all(math.isfinite(v) for v in out["train_loss"])
    assert '"val_recall@1"' in capsys.readouterr().out  # the JSON line
