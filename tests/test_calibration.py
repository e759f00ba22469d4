"""calibration.py: pair scores, the threshold at a target false-match rate (against a brute-force
reference), the carry-over rule, and the match record's round trips (checkpoint, ONNX, index)."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st
import numpy as np
import pytest

import calibration


def brute_force_threshold(impostor, target):
    """The smallest candidate t (every score, and the next float above each) with FMR(t) <= target."""
    s = np.asarray(impostor, dtype=np.float64)
    candidates = np.unique(np.concatenate([s, np.nextafter(s, np.inf)]))
    ok = [t for t in candidates if (s >= t).mean() <= target]
    return min(ok)


@settings(max_examples=200, deadline=None)
@given(
    scores=st.lists(
        st.sampled_from([-0.5, 0.0, 0.1, 0.2, 0.2, 0.7, 0.9, 1.0]) | st.floats(-1, 1), min_size=1, max_size=60
    ),
    target=st.floats(0.001, 0.999),
)
def test_threshold_matches_brute_force(scores, target):
    t = calibration.threshold_at_fmr(scores, target)
    s = np.asarray(scores)
    assert (s >= t).mean() <= target  # holds the target
    assert t == brute_force_threshold(scores, target)  # and is the smallest that does (FMR maximal)


def test_threshold_on_random_pairs_is_maximal():
    rng = np.random.default_rng(0)
    s = rng.normal(size=5000)
    t = calibration.threshold_at_fmr(s, 0.01)
    assert (s >= t).mean() <= 0.01
    assert (s >= np.nextafter(t, -np.inf)).mean() > 0.01  # one step lower breaks the target


def test_threshold_refuses_what_it_cannot_fit():
    with pytest.raises(ValueError, match="impostor"):
        calibration.threshold_at_fmr([], 0.01)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        calibration.threshold_at_fmr([0.1], 0.0)


def test_pair_scores_exact_against_all_pairs():
    rng = np.random.default_rng(1)
    e = rng.normal(size=(30, 8))
    labels = rng.integers(0, 6, 30)
    genuine, impostor = calibration.pair_scores(e, labels)
    u = e / np.linalg.norm(e, axis=1, keepdims=True)
    s = u @ u.T
    i, j = np.triu_indices(30, 1)
    same = labels[i] == labels[j]
    np.testing.assert_allclose(np.sort(genuine), np.sort(s[i, j][same]))
    np.testing.assert_allclose(np.sort(impostor), np.sort(s[i, j][~same]))


def test_impostor_pairs_subsampled_with_a_seed():
    labels = np.arange(3000) % 100
    a = calibration.impostor_pairs(labels, max_pairs=1000, seed=3)
    b = calibration.impostor_pairs(labels, max_pairs=1000, seed=3)
    assert len(a[0]) == 1000 and np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert (labels[a[0]] != labels[a[1]]).all()


def clustered(rng, products, photos, spread, dim=16, offset=0):
    centres = rng.normal(size=(products, dim))
    labels = np.repeat(np.arange(products) + offset, photos)
    return centres[labels - offset] + spread * rng.normal(size=(len(labels), dim)), labels


def test_few_products_carry_over_and_bootstrap_raise_the_threshold():
    """Four validation products: the carry-over pairs are added and the bootstrap threshold is at
    least the plain estimate; the held-out FMR of many unseen products stays near the target."""
    rng = np.random.default_rng(2)
    val, val_labels = clustered(rng, 4, 5, 0.6)
    train, _ = clustered(rng, 40, 5, 0.6, offset=100)
    fit = calibration.fit_threshold(val, val_labels, target_fmr=0.05, other_embeddings=train)
    assert fit["fitted_on"]["carry_over_pairs"] == 20 * 200
    assert fit["threshold"] >= fit["fitted_on"]["point_threshold"]
    plain = calibration.fit_threshold(val, val_labels, target_fmr=0.05, draws=0)
    assert plain["fitted_on"]["carry_over_pairs"] == 0 and plain["threshold"] == plain["fitted_on"]["point_threshold"]
    test, test_labels = clustered(rng, 200, 4, 0.6)
    _, impostor = calibration.pair_scores(test, test_labels)
    assert calibration.rates([], impostor, fit["threshold"])["fmr"] <= 2 * 0.05


def test_many_products_take_no_carry_over():
    rng = np.random.default_rng(4)
    val, labels = clustered(rng, calibration.MIN_PRODUCTS, 3, 0.5)
    other, _ = clustered(rng, 10, 3, 0.5, offset=1000)
    fit = calibration.fit_threshold(val, labels, other_embeddings=other, draws=20)
    assert fit["fitted_on"]["carry_over_pairs"] == 0
    assert fit["fitted_on"]["products"] == calibration.MIN_PRODUCTS


def test_roc_curve_ends_and_rates():
    fmr, tmr = calibration.roc_curve([0.9, 0.8, 0.3], [0.5, 0.1, 0.85, 0.0])
    assert fmr[0] == 0 and tmr[0] == pytest.approx(1 / 3)
    assert fmr[-1] == 1 and tmr[-1] == 1
    assert calibration.rates([0.9, 0.8, 0.3], [0.5, 0.1, 0.85, 0.0], 0.8) == {"fmr": 0.25, "tmr": 2 / 3}


def test_threshold_travels_from_training_to_onnx_and_index(tiny_sop, tmp_path):
    """train.py fits best.pth's threshold on the validation products (2: carry-over pairs added);
    the loaded model, the exported ONNX model's metadata and a gallery index built with it carry
    the same record, and evaluate.py reports it on the test split."""
    from support import parse, tiny_argv

    import datasets
    import inference
    import models
    import onnx_export
    import preprocessing
    from search import vectordb
    from search.index import GalleryIndex, build_gallery_index
    import train
    from training import evaluation

    train.main(parse(tiny_argv(tiny_sop, tmp_path, "--target_fmr", "0.05")))
    best = tmp_path / "checkpoints" / "t" / "best.pth"
    record = models.load_model(best).checkpoint_info["match"]
    assert record["target_fmr"] == 0.05 and -1 <= record["threshold"] <= 1.0001
    assert record["fitted_on"]["split"] == "val" and record["fitted_on"]["carry_over_pairs"] > 0

    onnx_path = onnx_export.export_checkpoint(best, tmp_path / "best.onnx")
    assert inference.OnnxEmbedder(onnx_path, checkpoint=best).checkpoint_info["match"] == record
    assert json.loads(inference.read_metadata(onnx_path)["match"]) == record  # for any ONNX runtime

    model = models.load_model(best)
    test = datasets.SOPDataset(tiny_sop, "test", transform=preprocessing.build_transform(32, train=False))
    gallery = build_gallery_index(model, test, workers=0, progress=False)
    gallery.save(tmp_path / "g.npz")
    assert GalleryIndex.load(tmp_path / "g.npz").meta["match"] == record
    uri = str(tmp_path / "g.db")  # a database gallery carries it too, read back on opening
    args = (uri, tiny_sop, "test", "key", dict(model.model_args), test.rel_paths, lambda: gallery)
    vectordb.split_gallery(*args, match=record)
    assert vectordb.split_gallery(*args).meta["match"] == record

    results = evaluation.evaluate_checkpoint(
        best, output=tmp_path / "eval", workers=0, progress=False, num_examples=0, zero_shot_row=False, runtime="torch"
    )
    assert results["match"]["threshold"] == record["threshold"]
    assert 0 <= results["match"]["fmr"] <= 1 and (tmp_path / "eval" / "match_curve.png").exists()


def test_query_photos_by_hand():
    """Product 0 has 3 photos, product 1 has 3: with max_n 2 each product is a query of 1, then 2
    photos; the 2-photo mean query of product 0 finds its third photo first."""
    from training import matching

    e = np.array(
        [
            [1, 0.0],
            [0.6, 0.8],
            [0.8, 0.6],  # product 0
            [0.7, 0.71],
            [0, 1],
            [0.1, 1],
        ]
    )  # product 1 (its first photo near product 0)
    labels = np.array([0, 0, 0, 1, 1, 1])
    groups = matching.query_groups(labels, 2, seed=0)
    assert len(groups) == 2 and all(len(g) == 3 for g in groups)
    out = matching.query_photo_metrics(e, labels, max_n=2, fusion="mean", seed=0)
    assert set(out) == {"1", "2"} and out["1"]["queries"] == out["2"]["queries"] == 2
    # by hand, for the drawn order: each query's metrics from its own ranking
    unit = e / np.linalg.norm(e, axis=1, keepdims=True)
    for n in (1, 2):
        maps, r1 = [], []
        for g in groups:
            centre = unit[g[:n]].mean(0)
            s = unit @ (centre / np.linalg.norm(centre))
            cand = [i for i in np.argsort(-s, kind="stable") if i not in g[:n]]
            rel = set(g[n:])
            hits = [c in rel for c in cand[: len(rel)]]
            maps.append(sum(np.cumsum(hits)[k] / (k + 1) for k in range(len(hits)) if hits[k]) / len(rel))
            r1.append(float(cand[0] in rel))
        assert out[str(n)]["map@r"] == pytest.approx(np.mean(maps))
        assert out[str(n)]["recall@1"] == pytest.approx(np.mean(r1))


def test_more_query_photos_help_on_noisy_views():
    from training import matching

    rng = np.random.default_rng(5)
    e, labels = clustered(rng, 40, 6, 1.2)
    for fusion in matching.FUSIONS:
        out = matching.query_photo_metrics(e, labels, max_n=3, fusion=fusion, seed=1)
        assert out["3"]["map@r"] > out["1"]["map@r"]


def test_evaluate_calibrate_zero_shot_writes_match_json(tiny_sop, tmp_path, monkeypatch):
    """evaluate.py --calibrate --zero_shot: the refit record in <output>/match.json, reported in
    results.json's match (in-sample: at most the target), with --query_photos' table."""
    import json

    import evaluate

    parser = evaluate.get_args_parser()
    args = parser.parse_args(
        [
            "--zero_shot",
            "--backbone",
            "resnet18",
            "--weights",
            "none",
            "--image_size",
            "32",
            "--data_root",
            str(tiny_sop),
            "--calibrate",
            "--target_fmr",
            "0.02",
            "--query_photos",
            "2",
            "--num_examples",
            "0",
            "--workers",
            "0",
            "--no-progress",
            "--output",
            str(tmp_path / "eval"),
        ]
    )
    evaluate.check_args(parser, args)
    evaluate.main(args)
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    stored = json.loads((tmp_path / "eval" / "match.json").read_text())
    assert saved["match"]["threshold"] == stored["threshold"] and stored["target_fmr"] == 0.02
    assert saved["match"]["fmr"] <= 0.02 and saved["match"]["fitted_on"]["split"] == "test"
    assert set(saved["query_photos"]) == {"1", "2"} and saved["query_photos"]["1"]["map@r"] is not None
    report = (tmp_path / "eval" / "results.md").read_text()  # both said in results.md too
    assert "## Which product, or none" in report and f"threshold {saved['match']['threshold']:.4f}" in report
    assert "## Several photos a query (mean fusion)" in report and "| 2 |" in report
