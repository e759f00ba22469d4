"""Match or none, and one row per product, in the demo's engine and its /search API."""

import numpy as np
import pytest

from search import products


def hit(rank, product, score, path=None):
    return {
        "rank": rank,
        "index": rank - 1,
        "catalogue_path": path or f"{product}_{rank}.jpg",
        "product_id": product,
        "category": "c",
        "score": score,
    }


def test_product_rows_one_per_product_best_photo_and_counts():
    hits = [
        hit(1, "a", 0.9),
        hit(2, "b", 0.8),
        hit(3, "a", 0.7),
        hit(4, None, 0.6),
        hit(5, "b", 0.5),
        hit(6, None, 0.4),
        hit(7, "c", 0.3),
    ]
    rows = products.shape_results(hits, k=4, mode="products", threshold=0.65)
    assert [r["product_id"] for r in rows] == ["a", "b", None, None]  # unlabelled hits stay rows
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["catalogue_path"] == "a_1.jpg" and rows[0]["score"] == 0.9  # the best photo
    assert (rows[0]["photos"], rows[0]["matched_photos"]) == (2, 2)
    assert (rows[1]["photos"], rows[1]["matched_photos"]) == (2, 1)
    assert [r["match"] for r in rows] == [True, True, False, False]


def test_photos_mode_keeps_every_hit_and_no_threshold_means_no_verdict():
    hits = [hit(1, "a", 0.9), hit(2, "a", 0.8), hit(3, "b", 0.7)]
    rows = products.shape_results(hits, k=2, mode="photos", threshold=None)
    assert [r["catalogue_path"] for r in rows] == ["a_1.jpg", "a_2.jpg"] and rows[0]["match"] is None
    assert "No calibrated threshold" in products.verdict(rows, None)
    with pytest.raises(ValueError, match="results mode"):
        products.shape_results(hits, k=2, mode="rows", threshold=None)


def test_verdict_says_plainly_when_nothing_matches():
    rows = products.mark_matches([hit(1, "a", 0.5)], 0.6)
    assert "No catalogue product matches" in products.verdict(rows, 0.6)
    rows = products.mark_matches([hit(1, "a", 0.7), hit(2, "b", 0.65)], 0.6)
    assert "Match: product #a" in products.verdict(rows, 0.6)


def test_threshold_of_takes_the_first_known():
    assert products.threshold_of(None, {"match": None}, {"match": {"threshold": 0.4}}) == 0.4
    assert products.threshold_of({"threshold": 0.2}, {"match": {"threshold": 0.4}}) == 0.2
    assert products.threshold_of(None, {}) is None


def test_engine_product_rows_and_matches(tiny):
    """A SearchEngine in products mode over the tiny gallery: one row per product, each its best
    photo among the candidates; ``match`` against the given threshold."""
    from search.engine import SearchEngine

    index = tiny["index"]
    photos = SearchEngine(tiny["model"], index, tiny["data_root"], results_mode="photos")
    rows = SearchEngine(tiny["model"], index, tiny["data_root"], results_mode="products", threshold=0.5)
    query = tiny["gallery"].paths[3]
    by_photo = photos.search_file(query, k=50)["results"]
    out = rows.search_file(query, k=5)
    ids = [r["product_id"] for r in out["results"]]
    assert len(ids) == len(set(ids)) == 5 and out["results_mode"] == "products" and out["threshold"] == 0.5
    first_seen = list(dict.fromkeys(r["product_id"] for r in by_photo))[:5]
    assert ids == first_seen
    for r in out["results"]:
        assert r["catalogue_path"] == next(h["catalogue_path"] for h in by_photo if h["product_id"] == r["product_id"])
        assert r["photos"] == sum(h["product_id"] == r["product_id"] for h in by_photo)
        assert r["match"] == (r["score"] >= 0.5)
    assert out["match_found"] == any(r["match"] for r in out["results"])
    assert photos.search_file(query, k=5)["threshold"] is None  # the untrained checkpoint has none


def test_rows_or_photos_is_decided_again_when_the_gallery_changes(tiny):
    """A gallery without product ids is served as photos; once --watch swaps in one with product
    ids, the products mode asked for applies (and back)."""
    import dataclasses

    from search.engine import SearchEngine

    index = tiny["index"]
    unlabelled = dataclasses.replace(index, product_ids=[None] * len(index))
    engine = SearchEngine(tiny["model"], unlabelled, tiny["data_root"], results_mode="products")
    query = tiny["gallery"].paths[3]
    assert engine.search_file(query, k=3)["results_mode"] == "photos"
    engine.replace_index(index)
    assert engine.search_file(query, k=3)["results_mode"] == "products"
    engine.replace_index(unlabelled)
    assert engine.search_file(query, k=3)["results_mode"] == "photos"


def test_api_returns_threshold_and_each_match(tiny, tmp_path):
    """/search through gradio_client on a loopback demo with a threshold: the JSON says the mode,
    the threshold and each result's match; the page's text says whether anything matched."""
    from gradio_client import Client
    from support import running_demo, search

    with running_demo(tiny["data_root"], tiny["checkpoint"], threshold=2.0) as (_, url):
        _, ranked, text = search(Client(url, verbose=False), tiny["gallery"].paths[1], k=4)
    assert ranked["results_mode"] == "products" and ranked["threshold"] == 2.0
    assert [r["match"] for r in ranked["results"]] == [False] * 4 and ranked["match_found"] is False
    assert "No catalogue product matches" in text
    assert len({r["product_id"] for r in ranked["results"]}) == 4
    assert np.all(np.diff([r["score"] for r in ranked["results"]]) <= 0)


def test_several_photos_one_query_engine_and_api(tiny):
    """Three photos of one item: the engine fuses their unit embeddings (unit mean); /search takes
    one photo and a list of more (its fourth input, optional: the three-argument call keeps working),
    and a listed path that is not this request's upload is refused."""
    from gradio_client import Client, handle_file
    from support import running_demo

    engine, paths = tiny["engine"], tiny["gallery"].paths[:3]
    vectors = np.stack([engine.embed(__import__("PIL.Image").Image.open(p).convert("RGB")) for p in paths])
    centre = vectors.mean(0) / np.linalg.norm(vectors.mean(0))
    expected = tiny["index"].embeddings @ centre
    fused = engine.search_files(paths, k=3)
    assert fused["query_photos"] == 3
    np.testing.assert_allclose([r["score"] for r in fused["results"]], np.sort(expected)[::-1][:3], atol=1e-4)

    with running_demo(tiny["data_root"], tiny["checkpoint"], results_mode="photos") as (_, url):
        client = Client(url, verbose=False)
        photos = [handle_file(p) for p in paths]
        _, ranked, _ = client.predict(photos[0], 3, "All", photos[1:], api_name="/search")
        _, listed, _ = client.predict(None, 3, "All", photos, api_name="/search")  # all in the list
        _, single, _ = client.predict(handle_file(paths[0]), 3, "All", api_name="/search")
        for payload in (
            {"path": "/etc/passwd"},
            {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}},
            {"path": str(tiny["checkpoint"]), "meta": {"_type": "gradio.FileData"}},
        ):
            with pytest.raises(Exception):  # noqa: B017 (Gradio's own check or the app's: both refuse)
                client.predict(handle_file(paths[0]), 3, "All", [payload], api_name="/search")
    assert ranked["query_photos"] == listed["query_photos"] == 3 and "query_photos" not in single
    assert [r["index"] for r in ranked["results"]] == [r["index"] for r in fused["results"]]
    assert [r["index"] for r in listed["results"]] == [r["index"] for r in fused["results"]]


def test_query_components_render_with_gradios_frontends(server):
    """The page's query components are rendered by gr.Image's and gr.File's frontends (a custom
    name would leave the browser without a component to draw, and the page blank)."""
    names = {b.elem_id: b.get_block_name() for b in server["demo"].blocks.values() if getattr(b, "elem_id", None)}
    assert names["query"] == "image" and names["more_photos"] == "file"
