"""Similarity maps in the demo: SearchEngine.explain / explain_results, the /explain endpoint
(gradio_client, as the README calls /search) and the "Show why" switch's function."""

import numpy as np
from PIL import Image
import pytest
from support import search
import torch

import app_stanford
import datasets
import explain
import models
import preprocessing
from search import engine as search_engine
from search import explain_store, webapp
from search import loading as search_loading
from search import query as search_query
from search.index import build_gallery_index

ATOL = 1e-4
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the demo fixtures are conftest.py's


def test_engine_explain_maps_sum_to_the_score(tiny):
    engine, path = tiny["engine"], tiny["gallery"].paths[3]
    results = engine.search_file(path, k=3)["results"]
    for r in results:
        e = engine.explain(path, r["index"])
        assert e["index"] == r["index"]
        assert abs(e["score"] - r["score"]) < ATOL  # the torch model is the engine's model here
        assert abs(np.sum(e["query_map"]) - e["score"]) < ATOL
        assert abs(np.sum(e["result_map"]) - e["score"]) < ATOL
        assert e["exact"] is (tiny["model"].model_args["head"] in ("linear", "none"))
        s = engine.image_size
        assert e["query_overlay"].size == e["result_overlay"].size == (s, s)
    with pytest.raises(search_query.QueryError):
        engine.explain(path, len(tiny["index"]))


def linear_engine(tiny):
    """An engine over the tiny gallery with a linear-head network and that network's own index."""
    if "linear" not in tiny:
        torch.manual_seed(0)
        model = models.build_model("resnet18", weights="none", image_size=48, head="linear").eval()
        dataset = datasets.SOPDataset(tiny["data_root"], "test", transform=preprocessing.build_transform(48))
        index = build_gallery_index(model, dataset, workers=0, progress=False)
        tiny["linear"] = search_engine.SearchEngine(model, index, tiny["data_root"])
    return tiny["linear"]


def test_linear_head_is_exact(tiny):
    engine = linear_engine(tiny)
    e = engine.explain(Image.open(tiny["gallery"].paths[0]).convert("RGB"), 7)
    assert e["exact"] and e["label"] == "exact decomposition"
    assert abs(np.sum(e["query_map"]) - e["score"]) < ATOL
    assert abs(np.sum(e["result_map"]) - e["score"]) < ATOL


def test_api_explain(server, tiny):
    from gradio_client import Client, handle_file

    path = tiny["gallery"].paths[5]
    _, ranked, _ = search(server["client"], path, 3)
    client = Client(server["url"], verbose=False)  # the client's defaults, as in the README
    for r in ranked["results"]:
        q_overlay, r_overlay, why = client.predict(handle_file(str(path)), r["catalogue_path"], api_name="/explain")
        assert Image.open(q_overlay).size == Image.open(r_overlay).size
        assert why["index"] == r["index"] and why["catalogue_path"] == r["catalogue_path"]
        assert abs(why["score"] - r["score"]) < ATOL
        assert abs(np.sum(why["query_map"]) - why["score"]) < ATOL
        assert abs(np.sum(why["result_map"]) - why["score"]) < ATOL
        assert why["exact"] is False and why["label"].startswith("approximation")  # tiny: MLP head


def test_explain_names_its_result_by_path_in_one_gallery_snapshot(tiny):
    """An explanation refers to a result by its catalogue path: after the gallery changed
    (--watch) it explains that same photo at its new row, or says the photo is gone, instead
    of drawing another image found at the old row."""
    from search.index import GalleryIndex

    engine, path = tiny["engine"], tiny["gallery"].paths[5]
    before = engine.index
    ranked = engine.search_file(path, k=3)
    first, second = ranked["results"][0], ranked["results"][1]
    keep = np.array([i for i in range(len(before)) if i != first["index"]])[::-1]  # gone, the rest reordered
    changed = GalleryIndex(
        embeddings=before.embeddings[keep],
        paths=[before.paths[i] for i in keep],
        class_ids=before.class_ids[keep],
        super_ids=before.super_ids[keep],
        categories=before.categories,
        product_ids=[before.product_ids[i] for i in keep],
        checkpoint_hash=before.checkpoint_hash,
        meta=dict(before.meta),
    )
    engine.replace_index(changed)
    try:
        e = engine.explain(path, second["catalogue_path"])
        assert e["catalogue_path"] == second["catalogue_path"] and e["index"] != second["index"]
        assert abs(e["score"] - second["score"]) < ATOL
        with pytest.raises(search_query.QueryError, match="no longer in the gallery"):
            engine.explain(path, first["catalogue_path"])
    finally:
        engine.replace_index(before)


def test_a_result_photo_that_vanished_is_a_clear_error(tiny, tmp_path):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(tiny["data_root"], root)
    engine = search_engine.SearchEngine(tiny["model"], tiny["index"], root)
    ranked = engine.search_file(tiny["gallery"].paths[5], k=2)
    (root / ranked["results"][0]["catalogue_path"]).unlink()
    with pytest.raises(search_query.QueryError, match="can no longer be read"):
        engine.explain(tiny["gallery"].paths[5], ranked["results"][0]["catalogue_path"])


def test_search_endpoint_unchanged(server):
    info = server["client"].view_api(return_format="dict", print_info=False)
    params = [p["parameter_name"] for p in info["named_endpoints"]["/search"]["parameters"]]
    assert params == ["image", "k", "category", "more_photos"]
    assert len(info["named_endpoints"]["/search"]["returns"]) == 3
    assert [p["parameter_name"] for p in info["named_endpoints"]["/explain"]["parameters"]] == ["image", "result"]


def test_show_why(tiny):
    engine, path = tiny["engine"], tiny["gallery"].paths[4]
    ranked = engine.search_file(path, k=7)
    captions = [webapp._caption(r) for r in ranked["results"]]
    plain, queries, visible = webapp.why_outputs(engine, path, ranked, False)
    assert [c for _, c in plain] == captions and queries == [] and not visible
    shown, queries, visible = webapp.why_outputs(engine, path, ranked, True)
    k = webapp.WHY_K
    assert visible and len(shown) == 7 and len(queries) == k
    assert [c for _, c in shown[:k]] == [c + " · why" for c in captions[:k]]
    assert [c for _, c in shown[k:]] == captions[k:]
    assert all(isinstance(im, Image.Image) for im, _ in shown[:k] + queries)
    assert shown[k][0] == engine.abs_paths[ranked["results"][k]["index"]]


def test_onnx_runtime_explains_with_the_checkpoint_it_was_exported_from(tiny, tmp_path):
    import shutil

    ckpt = tmp_path / "run" / "best.pth"
    ckpt.parent.mkdir()
    shutil.copy(tiny["checkpoint"], ckpt)
    loaded = search_loading.load_search_model(ckpt, runtime="onnx", device="cpu")
    assert not isinstance(loaded.model, models.EmbeddingNet)  # the onnxruntime embedder
    path = tiny["gallery"].paths[3]
    torch_engine = search_engine.SearchEngine(tiny["model"], tiny["index"], tiny["data_root"])
    reference = torch_engine.explain(path, 5)
    # found through the export's recorded sha256 (best.onnx beside best.pth), then given explicitly
    for source in (None, ckpt):
        engine = search_engine.SearchEngine(loaded.model, tiny["index"], tiny["data_root"], explain_source=source)
        e = engine.explain(path, 5)
        assert isinstance(engine.explain_model(), models.EmbeddingNet)
        assert abs(e["score"] - reference["score"]) < ATOL
        assert np.allclose(e["result_map"], reference["result_map"], atol=ATOL)
    # an export without its checkpoint: a message that says what to do, not a traceback
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.move(ckpt.with_suffix(".onnx"), alone / "best.onnx")
    ckpt.unlink()
    from inference import OnnxEmbedder

    lonely = OnnxEmbedder(alone / "best.onnx")
    engine = search_engine.SearchEngine(lonely, tiny["index"], tiny["data_root"])
    with pytest.raises(search_query.QueryError, match="--runtime torch"):
        engine.explain(path, 5)


def forbid_forward(monkeypatch):
    """Make any forward pass for a feature grid fail (explain.feature_grid and the onnx export's)."""

    def fail(*args, **kwargs):
        raise AssertionError("a forward pass ran")

    monkeypatch.setattr(explain, "feature_grid", fail)
    monkeypatch.setattr("inference.OnnxEmbedder.embed_with_features", fail)


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_show_why_after_a_search_runs_no_forward_with_a_store(tiny, tmp_path, runtime, monkeypatch):
    """With the store, "Show why" after a search reads the query's grid from that search and the
    results' projections from the store: no forward pass at all, and the same maps (within the
    store's float16 rounding) as computed from the images."""
    if runtime == "onnx":
        pytest.importorskip("onnxruntime")
        import shutil

        ckpt = tmp_path / "run" / "best.pth"
        ckpt.parent.mkdir()
        shutil.copy(tiny["checkpoint"], ckpt)
        model = search_loading.load_search_model(ckpt, runtime="onnx", device="cpu").model
        assert model.has_features
    else:
        model = tiny["model"]
    engine = search_engine.SearchEngine(model, tiny["index"], tiny["data_root"], explain_source=tiny["checkpoint"])
    path = tiny["gallery"].paths[4]
    ranked = engine.search_file(path, k=7)
    indices = [r["index"] for r in ranked["results"][: webapp.WHY_K]]
    live = engine.explain_results(path, indices)  # no store yet: results run the network
    store = engine.attach_explain_store(tmp_path / "gallery.why.npy", progress=False)
    assert len(store) == len(set(explain_store.row_key(v) for v in tiny["index"].embeddings))
    engine.search_file(path, k=7)
    with monkeypatch.context() as m:
        forbid_forward(m)
        shown, queries, visible = webapp.why_outputs(engine, path, ranked, True)
        stored = engine.explain_results(path, indices)
    assert visible and len(queries) == webapp.WHY_K
    for a, b, r in zip(live, stored, ranked["results"]):
        assert a["index"] == b["index"] == r["index"]
        assert abs(b["score"] - r["score"]) < ATOL
        assert np.allclose(a["query_map"], b["query_map"], atol=1e-6)
        # float16 projections: each location within 1e-3 of the score's scale, sums within 2e-3
        assert np.allclose(a["result_map"], b["result_map"], atol=1e-3)
        assert abs(np.sum(b["result_map"]) - b["score"]) < 2e-3
        assert abs(np.sum(b["query_map"]) - b["score"]) < ATOL
    # another query (not the last search's): its own forward pass, still exact sums
    other = tiny["gallery"].paths[9]
    e = engine.explain(other, indices[0])
    assert abs(np.sum(e["query_map"]) - e["score"]) < ATOL


def test_store_is_reused_follows_the_gallery_and_survives_a_damaged_file(tiny, tmp_path):
    engine = linear_engine(tiny)
    path = tmp_path / "g.why.npy"
    store = engine.attach_explain_store(path, progress=False)
    stamp = path.stat().st_mtime_ns
    # up to date: read as it is, not rewritten
    again = engine.attach_explain_store(path, progress=False)
    assert path.stat().st_mtime_ns == stamp and len(again) == len(store)
    # each record sums over its locations to the index's unit embedding
    for i in (0, 5, len(engine.index) - 1):
        p = store.get(engine.index.embeddings[i])
        assert np.allclose(p.sum((0, 1)), engine.index.embeddings[i], atol=2e-3)
    # a row whose vector is not in the store (another image / other weights) is not found
    assert store.get(np.roll(engine.index.embeddings[0], 1)) is None
    # a truncated file is rebuilt, with the same records
    path.write_bytes(path.read_bytes()[:1000])
    rebuilt = engine.attach_explain_store(path, progress=False)
    assert len(rebuilt) == len(store)
    assert np.allclose(rebuilt.get(engine.index.embeddings[3]), store.get(engine.index.embeddings[3]), atol=1e-3)
    # too big for the limit: no store, and Show why still works by running the network
    assert engine.attach_explain_store(tmp_path / "none.why.npy", max_bytes=10, progress=False) is None
    assert engine.explain_store is None and not (tmp_path / "none.why.npy").exists()
    e = engine.explain(tiny["gallery"].paths[2], 4)
    assert abs(np.sum(e["result_map"]) - e["score"]) < ATOL


def test_exact_head_store_records_are_the_papers_decomposition(tiny, tmp_path):
    """Linear head: a stored record is (W f_ij + b) / (HW ||W f̄ + b||) of the image's grid."""
    engine = linear_engine(tiny)
    store = engine.attach_explain_store(tmp_path / "lin.why.npy", progress=False)
    image = Image.open(tiny["gallery"].paths[6]).convert("RGB")
    grid, _ = explain.feature_grid(engine.model, engine.prepare(image).clone())
    linear = engine.model.head[1]
    f = grid[0].flatten(1).t()  # [HW, C]
    expected = linear(f) / (f.shape[0] * linear(f.mean(0)).norm())
    got = store.get(engine.index.embeddings[6]).reshape(-1, expected.shape[1])
    assert np.allclose(got, expected.detach().numpy(), atol=1e-3)


def test_build_index_also_writes_the_explanation_store(tiny, tmp_path):
    """As a user prepares a demo: --build_index writes the store beside the index; 0 GB: none;
    a negative size is an argparse error."""

    def main(*extra):
        parser = app_stanford.get_args_parser()
        args = parser.parse_args(
            [
                "--checkpoint",
                str(tiny["checkpoint"]),
                "--data_root",
                str(tiny["data_root"]),
                "--build_index",
                "--workers",
                "0",
                "--device",
                "cpu",
                "--runtime",
                "torch",
                *map(str, extra),
            ]
        )
        app_stanford.check_args(parser, args)
        return app_stanford.main(args)

    index = main("--index", tmp_path / "g.npz")
    store = explain_store.ExplainStore.load(tmp_path / "g.why.npy")
    assert len(store) == len({explain_store.row_key(v) for v in index.embeddings})
    main("--index", tmp_path / "none.npz", "--explain_store_gb", 0)
    assert (tmp_path / "none.npz").exists() and not (tmp_path / "none.why.npy").exists()
    with pytest.raises(SystemExit) as exit_info:
        main("--index", tmp_path / "x.npz", "--explain_store_gb", -1)
    assert exit_info.value.code == 2
