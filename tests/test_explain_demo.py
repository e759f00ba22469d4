"""Similarity maps in the demo: SearchEngine.explain / explain_results, the /explain endpoint
(gradio_client, as the README calls /search) and the "Show why" switch's function."""
import numpy as np
import pytest
import torch
from PIL import Image

from tests import test_app
import app_stanford
import models
from search import engine as search_engine

ATOL = 1e-4
cpu_settings, server, tiny, search = test_app.cpu_settings, test_app.server, test_app.tiny, test_app.search


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
    with pytest.raises(search_engine.QueryError):
        engine.explain(path, len(tiny["index"]))


def test_linear_head_is_exact(tiny):
    torch.manual_seed(0)
    model = models.build_model("resnet18", weights="none", image_size=48, head="linear")
    engine = search_engine.SearchEngine(model, tiny["index"], tiny["data_root"])
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
        q_overlay, r_overlay, why = client.predict(handle_file(str(path)), r["index"], api_name="/explain")
        assert Image.open(q_overlay).size == Image.open(r_overlay).size
        assert why["index"] == r["index"]
        assert abs(why["score"] - r["score"]) < ATOL
        assert abs(np.sum(why["query_map"]) - why["score"]) < ATOL
        assert abs(np.sum(why["result_map"]) - why["score"]) < ATOL
        assert why["exact"] is False and why["label"].startswith("approximation")  # tiny: MLP head


def test_search_endpoint_unchanged(server):
    info = server["client"].view_api(return_format="dict", print_info=False)
    params = [p["parameter_name"] for p in info["named_endpoints"]["/search"]["parameters"]]
    assert params == ["image", "k", "category"]
    assert len(info["named_endpoints"]["/search"]["returns"]) == 3
    assert [p["parameter_name"] for p in info["named_endpoints"]["/explain"]["parameters"]] == ["image", "index"]


def test_show_why(tiny):
    engine, path = tiny["engine"], tiny["gallery"].paths[4]
    ranked = engine.search_file(path, k=7)
    captions = [app_stanford._caption(r) for r in ranked["results"]]
    plain, queries, visible = app_stanford.why_outputs(engine, path, ranked, False)
    assert [c for _, c in plain] == captions and queries == [] and not visible
    shown, queries, visible = app_stanford.why_outputs(engine, path, ranked, True)
    k = app_stanford.WHY_K
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
    loaded = search_engine.load_search_model(ckpt, runtime="onnx", device="cpu")
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
    with pytest.raises(search_engine.QueryError, match="--runtime torch"):
        engine.explain(path, 5)
