"""evaluate.py --explain: retrieval.png with the similarity maps over every image and
retrieval_worst.png with the queries whose true match ranked lowest; the maps are those of the
embeddings evaluated."""

import json

import numpy as np
from PIL import Image
import pytest
import torch

import checkpoints
import datasets
import evaluate
import explain
import knn
import models
import preprocessing
import retrieval
from training import reporting

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def save_checkpoint(path, data_root):
    torch.manual_seed(0)
    model = models.build_model("resnet18", embedding_size=32, weights="none", image_size=64, head="linear")
    args = {"dataset": "synthetic", "data_root": str(data_root)}
    checkpoints.atomic_save(checkpoints.make_checkpoint(model, args=args, epoch=1, metrics={}), path)
    return path


def test_worst_queries_are_the_lowest_ranked_true_matches_worst_first():
    ranks = np.array([0, 5, 2, 5, 1, 9])  # 0: no relevant item, never a worst query
    assert reporting.worst_queries(ranks, 3).tolist() == [5, 1, 3]
    assert reporting.worst_queries(np.zeros(4, int), 3).tolist() == []


def test_dataset_explainer_maps_sum_to_the_evaluated_scores(synthetic_root):
    torch.manual_seed(0)
    model = models.build_model("resnet18", embedding_size=32, weights="none", image_size=64, head="linear").eval()
    dataset = datasets.SOPDataset(synthetic_root, "test", transform=preprocessing.build_transform(64, train=False))
    with torch.no_grad():
        e = model(torch.stack([dataset[i][0] for i in range(4)])).numpy()
    maps = explain.dataset_explainer(model, dataset)(0, [1, 2, 3])
    for k, m in enumerate(maps, start=1):
        assert m["score"] == pytest.approx(float(e[0] @ e[k]), abs=1e-5)
        assert float(m["query_map"].sum()) == pytest.approx(m["score"], abs=1e-5)
        assert float(m["result_map"].sum()) == pytest.approx(m["score"], abs=1e-5)
        assert m["result_view"].size == m["query_view"].size == (64, 64)
    # the view is the model's input, de-normalised (to 8-bit rounding)
    x = dataset[0][0]
    mean = torch.tensor(preprocessing.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(preprocessing.IMAGENET_STD).view(3, 1, 1)
    back = (torch.from_numpy(np.asarray(explain.view_of(x), np.float32) / 255).permute(2, 0, 1) - mean) / std
    assert torch.allclose(back, x, atol=0.01)


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_evaluate_explain_draws_maps_and_the_worst_queries(synthetic_root, tmp_path, runtime, monkeypatch):
    ckpt = save_checkpoint(tmp_path / "checkpoints" / "run" / "best.pth", synthetic_root)
    common = [
        "--checkpoint",
        str(ckpt),
        "--workers",
        "0",
        "--device",
        "cpu",
        "--no_progress",
        "--num_examples",
        "3",
        "--runtime",
        runtime,
        "--seed",
        "1",
    ]
    plain = evaluate.main(evaluate.get_args_parser().parse_args(common + ["--output", str(tmp_path / "plain")]))
    assert "worst_figure" not in plain and not (tmp_path / "plain" / "retrieval_worst.png").exists()

    calls, made = [], explain.dataset_explainer

    def recording(model, dataset, device="cpu"):
        assert isinstance(model, models.EmbeddingNet)  # the torch network, also behind an onnx run
        inner = made(model, dataset, device)

        def explainer(query, results):
            maps = inner(query, results)
            calls.append((query, list(results), [m["score"] for m in maps]))
            return maps

        return explainer

    monkeypatch.setattr(explain, "dataset_explainer", recording)
    results = evaluate.main(
        evaluate.get_args_parser().parse_args(common + ["--explain", "--output", str(tmp_path / "why")])
    )
    out = tmp_path / "why"
    assert results["figure"] == "retrieval.png" and results["worst_figure"] == "retrieval_worst.png"
    md = (out / "results.md").read_text()
    assert "![retrieval examples](retrieval.png)" in md and "![worst queries](retrieval_worst.png)" in md
    assert json.loads((out / "results.json").read_text())["worst_figure"] == "retrieval_worst.png"
    for name in ("retrieval.png", "retrieval_worst.png"):
        assert Image.open(out / name).size[0] > 0
    # every row of both figures was explained: 3 example queries with their top 5, then the
    # 3 worst queries with their top 4 and their best true match
    assert [len(r) for _, r, _ in calls] == [5, 5, 5, 5, 5, 5]
    dataset = datasets.SOPDataset(synthetic_root, "test")
    worst_rows = calls[3:]
    cls = np.asarray(dataset.class_ids)
    for query, res, scores in worst_rows:
        assert cls[res[-1]] == cls[query] and res[-1] != query  # the true match comes last
        assert scores[-1] <= min(scores[:-1]) + 1e-5  # ranked below the top 4


def test_worst_queries_follow_the_retrieval_details(synthetic_root):
    dataset = datasets.SOPDataset(synthetic_root, "test")
    rng = np.random.default_rng(0)
    x = knn.l2_normalize(rng.normal(size=(len(dataset), 16)).astype(np.float32))
    details = retrieval.retrieval_details(x, dataset.class_ids, dataset.super_ids)
    worst = reporting.worst_queries(details["best_relevant_rank"], 2)
    # brute force: the rank of the best true match of each query among all other images
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    cls = np.asarray(dataset.class_ids)
    ranks = []
    for q in range(len(x)):
        same = np.flatnonzero((cls == cls[q]) & (np.arange(len(x)) != q))
        ranks.append(0 if len(same) == 0 else int((s[q] > s[q, same].max()).sum()) + 1)
    ranks = np.array(ranks)
    assert details["best_relevant_rank"].tolist() == ranks.tolist()
    assert ranks[worst].tolist() == sorted(ranks[ranks > 0])[::-1][:2]
