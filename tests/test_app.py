"""app_stanford.py and search/engine.py: the search against brute force, bad uploads over the
real API (gradio_client against a loopback server), the file route's limits, checkpoint
discovery, and the gallery index's reuse / rebuild / failed-write rules.

The demo under test is `search.tiny_demo`'s (also what bench/load_app.py serves);
its fixtures (tiny, server) are conftest.py's, shared with the browser and explanation tests.
"""

import errno
import os
from pathlib import Path
import shutil
import sys
import tempfile
import uuid

import numpy as np
from PIL import Image
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from support import raw_get, reference_embedding, search

import app_stanford
import checkpoints
from dataio import catalogue, photos
import datasets
import models
import preprocessing
from search import engine as search_engine
from search import guard, webapp
from search import loading as search_loading
from search import query as search_query
from search.tiny_demo import free_port, write_untrained_checkpoint

TOL = 1e-5  # score tolerance between the app's embedding and the reference computation


# ============ shared helpers ============

# ============ reference computations ============


def brute_force(index, query, k, super_id=None, exclude=None):
    """(indices, scores) of the top k by cosine score, ties by lower index, as numpy does."""
    scores = index.embeddings @ query
    rows = np.arange(len(index))
    keep = np.ones(len(index), bool) if super_id is None else index.super_ids == super_id
    if exclude is not None:
        keep[exclude] = False
    rows = rows[keep]
    order = np.lexsort((rows, -scores[rows]))[:k]
    return rows[order], scores[rows][order]


def assert_same_ranking(results, ref_idx, ref_scores):
    """The app's ranked results equal the brute-force ranking; neighbours whose reference
    scores differ by less than TOL may come in either order (float summation order)."""
    got_idx = np.array([r["index"] for r in results])
    got_scores = np.array([r["score"] for r in results])
    assert len(got_idx) == len(ref_idx)
    assert np.all(np.diff(got_scores) <= 0), "scores must be non-increasing"
    np.testing.assert_allclose(got_scores, ref_scores, atol=TOL)
    for pos in np.flatnonzero(got_idx != ref_idx):
        assert abs(ref_scores[pos] - got_scores[pos]) < TOL, (pos, got_idx, ref_idx)
    assert len(set(got_idx.tolist())) == len(got_idx)


# ============ fixtures ============


@pytest.fixture(autouse=True, scope="module")
def cpu_settings():
    """One intra-op thread while these tests run: on a shared or oversubscribed CI machine
    two spinning OpenMP threads can turn a 5 ms forward pass into a second (what is tested
    here does not depend on the thread count).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ============ the search itself (no server) ============


@pytest.mark.parametrize("category", ["All", "chair", "mug"])
def test_engine_matches_brute_force(tiny, category):
    engine, index, model = tiny["engine"], tiny["index"], tiny["model"]
    super_id = search_query.category_to_super_id(category, index.categories)
    for path in tiny["gallery"].paths[::50]:
        out = engine.search_file(path, k=7, category=category)
        ref_idx, ref_scores = brute_force(index, reference_embedding(model, path), 7, super_id)
        assert_same_ranking(out["results"], ref_idx, ref_scores)
        for r in out["results"]:
            assert r["catalogue_path"] == index.paths[r["index"]]
            assert r["product_id"] == str(index.class_ids[r["index"]])  # SOP: the class id as a string
            assert r["category"] == catalogue.SOP_CATEGORIES[index.super_ids[r["index"]] - 1]
            if category != "All":
                assert r["category"] == category


def test_k_larger_than_category_returns_what_exists(tiny):
    engine, index = tiny["engine"], tiny["index"]
    n_mugs = int((index.super_ids == catalogue.SOP_CATEGORIES.index("mug") + 1).sum())
    out = engine.search_file(tiny["gallery"].paths[0], k=search_query.MAX_K, category="mug")
    assert len(out["results"]) == min(n_mugs, search_query.MAX_K)
    assert all(r["index"] >= 0 for r in out["results"])


def test_clicked_result_searches_with_its_stored_vector(tiny):
    engine, index = tiny["engine"], tiny["index"]
    for i in (0, 5, len(index) - 1):
        out = engine.search_gallery_item(i, k=6)
        ref_idx, ref_scores = brute_force(index, index.embeddings[i], 6, exclude=i)
        assert_same_ranking(out["results"], ref_idx, ref_scores)
        assert i not in [r["index"] for r in out["results"]]


@pytest.mark.parametrize("size", [(48, 48), (300, 200), (37, 90)])
@pytest.mark.parametrize("image_size", [48, 224])
def test_prepare_matches_the_eval_transform(tiny, size, image_size):
    """The lean preprocessing gives the numbers of preprocessing.build_transform(train=False)."""
    model = models.build_model("resnet18", weights="none", image_size=image_size)
    engine = search_engine.SearchEngine(model, tiny["index"], tiny["data_root"])
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    expected = preprocessing.build_transform(image_size, train=False)(image)
    got = engine.prepare(image)[0]
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_odd_modes_decode_to_sensible_rgb(tiny):
    queries, base = tiny["queries"], photos.load_image(tiny["gallery"].paths[0])
    grey = np.asarray(base.convert("L"), np.float64)
    got = np.asarray(search_query.load_query_image(queries["grey16.png"][0]).convert("L"), np.float64)
    assert abs(got.mean() - grey.mean()) < 2, "16-bit grey must be rescaled, not clipped to white"
    rgba = search_query.load_query_image(queries["rgba.png"][0])
    assert rgba.mode == "RGB" and rgba.getpixel((0, 0)) == (255, 255, 255)  # transparent → white
    assert rgba.getpixel((0, base.height - 1)) == base.getpixel((0, base.height - 1))  # opaque kept
    for name in ("palette.png", "la.png", "cmyk.jpg", "one_pixel.png", "photo.webp"):
        im = search_query.load_query_image(queries[name][0])
        assert im.mode == "RGB" and im.width >= 1


def test_exif_rotated_photo_is_searched_upright(tiny):
    queries, engine = tiny["queries"], tiny["engine"]
    upright = search_query.load_query_image(queries["upright.jpg"][0])
    rotated = search_query.load_query_image(queries["exif_rotated.jpg"][0])
    assert rotated.size == upright.size  # (w, h), not (h, w)
    diff = np.abs(np.asarray(rotated, np.float64) - np.asarray(upright, np.float64)).mean()
    assert diff < 8, diff  # the same picture up to JPEG re-encoding
    a = engine.search_file(queries["exif_rotated.jpg"][0], k=5)["results"]
    b = engine.search_file(queries["upright.jpg"][0], k=5)["results"]
    np.testing.assert_allclose([r["score"] for r in a], [r["score"] for r in b], atol=2e-2)


@pytest.mark.parametrize(
    "name,fragment",
    [
        ("not_an_image.jpg", "not an image"),
        ("empty.jpg", "empty"),
        ("truncated.jpg", "truncated"),
        ("bomb.png", "megapixels"),
        ("big_dims.png", "megapixels"),
    ],
)
def test_bad_files_are_refused_with_a_reason(tiny, name, fragment):
    with pytest.raises(search_query.QueryError, match=fragment):
        tiny["engine"].search_file(tiny["queries"][name][0])


def test_bad_k_and_category(tiny):
    engine, path = tiny["engine"], tiny["gallery"].paths[0]
    assert len(engine.search_file(path, k=10_000)["results"]) == search_query.MAX_K
    assert len(engine.search_file(path, k=0)["results"]) == 1
    for bad in ("ten", float("nan"), None):
        with pytest.raises(search_query.QueryError, match="K must be"):
            engine.search_file(path, k=bad)
    with pytest.raises(search_query.QueryError, match="Unknown category"):
        engine.search_file(path, category="spaceship")


# ============ over the API (gradio_client, loopback server) ============


def test_api_returns_k_ranked_results(server, tiny):
    gallery_paths, model, index = tiny["gallery"].paths, tiny["model"], tiny["index"]
    for path, k, category in [
        (gallery_paths[3], 5, "All"),
        (gallery_paths[60], 6, "chair"),
        (tiny["queries"]["cmyk.jpg"][0], 3, "All"),
    ]:
        gallery, ranked, timing = search(server["client"], path, k, category)
        assert len(gallery) == len(ranked["results"]) == k
        ref_idx, ref_scores = brute_force(
            index, reference_embedding(model, path), k, search_query.category_to_super_id(category, index.categories)
        )
        assert_same_ranking(ranked["results"], ref_idx, ref_scores)
        for item, r in zip(gallery, ranked["results"]):
            assert item["caption"] == f"{r['score']:.3f} · {r['category']} · #{r['product_id']}"
            # downloaded through the file route: a local copy of that gallery image
            assert Path(item["image"]).name == Path(r["catalogue_path"]).name
            assert Path(item["image"]).read_bytes() == (tiny["data_root"] / r["catalogue_path"]).read_bytes()
        assert ranked["gallery_size"] == len(index)
        assert {"decode", "embed", "search", "total"} <= set(ranked["timing_ms"])
        assert "search" in timing and "ms" in timing


def test_api_category_is_optional(server, tiny):
    from gradio_client import handle_file

    gallery, ranked, _ = server["client"].predict(handle_file(tiny["gallery"].paths[1]), 4, api_name="/search")
    assert len(gallery) == 4 and ranked["category"] == "All"


@pytest.mark.slow
def test_every_bad_upload_is_answered_and_the_server_keeps_serving(server, tiny):
    from gradio_client.exceptions import AppError

    good = tiny["gallery"].paths[2]
    for name, (path, accepted) in tiny["queries"].items():
        if accepted:
            gallery, ranked, _ = search(server["client"], path, 4)
            assert len(gallery) == 4, name
            continue
        with pytest.raises(AppError) as err:
            search(server["client"], path, 4)
        message = str(err.value)
        assert "Traceback" not in message and 'File "' not in message, message
        assert len(message) > 20, message  # a reason, not a bare "Error"
        gallery, _, _ = search(server["client"], good, 3)  # and the next good query works
        assert len(gallery) == 3, name


def test_upload_size_cap(server, tiny):
    big = tiny["folder"] / "big.png"
    big.write_bytes(os.urandom(int(1.5 * (1 << 20))))  # server started with max_upload_mb=1
    with pytest.raises(Exception) as err:  # refused by the upload route (HTTP 413)
        search(server["client"], big, 3)
    assert "413" in str(err.value) or "size" in str(err.value).lower(), err.value
    gallery, _, _ = search(server["client"], tiny["gallery"].paths[0], 3)
    assert len(gallery) == 3


def test_public_endpoints_are_search_and_explain(server):
    info = server["client"].view_api(return_format="dict", print_info=False)
    assert sorted(info["named_endpoints"]) == ["/explain", "/search"]
    params = info["named_endpoints"]["/search"]["parameters"]
    assert [p["parameter_name"] for p in params] == ["image", "k", "category", "more_photos"]
    assert [p["parameter_has_default"] for p in params] == [False, True, True, True]


def test_file_route_serves_only_gallery_images(server, tiny):
    data_root, folder = tiny["data_root"], tiny["folder"]
    image = Path(tiny["gallery"].paths[0])
    status, body = raw_get(server["url"], f"/gradio_api/file={image}")
    assert status == 200 and body == image.read_bytes()  # the positive control

    link = image.parent / "passwd_link.JPG"
    link.symlink_to("/etc/passwd")
    secret = folder / "secret.txt"
    secret.write_text("not for the web\n")
    # another Gradio app's upload in the machine-wide default folder: this demo has its own
    other_app = Path(tempfile.gettempdir()) / "gradio" / f"other-app-{uuid.uuid4().hex}"
    other_app.mkdir(parents=True)
    (other_app / "upload.txt").write_text("not for the web\n")
    try:
        refused = [
            "/etc/passwd",
            "/etc/hostname",
            str(secret),
            str(tiny["checkpoint"]),
            str(search_loading.default_index_path(tiny["checkpoint"], "test")),
            str(data_root / "Ebay_test.txt"),  # inside the root, not an image folder
            str(link),  # symlink out of the image folder
            f"{image.parent}/../../secret.txt",
            f"{image.parent}/../../../../../etc/passwd",
            f"{image.parent}/%2e%2e/%2e%2e/secret.txt",
            str(REPO / "app_stanford.py"),
            str(other_app / "upload.txt"),
        ]
        for target in refused:
            for route in ("/gradio_api/file=", "/gradio_api/file/", "/file="):
                status, body = raw_get(server["url"], route + target)
                assert status in (400, 403, 404), (route, target, status)
                assert b"root:" not in body and b"not for the web" not in body
    finally:
        link.unlink()
        shutil.rmtree(other_app, ignore_errors=True)


def test_api_refuses_server_paths_that_were_not_uploaded(server, tiny):
    """A caller naming a file on the server instead of uploading one gets an error: Gradio
    accepts only paths in its upload folder as inputs, so the app never opens them."""
    import httpx

    for target in ["/etc/passwd", tiny["gallery"].paths[0], str(tiny["checkpoint"])]:
        data = [{"path": target, "meta": {"_type": "gradio.FileData"}}, 3, "All", None]
        r = httpx.post(server["url"] + "gradio_api/call/search", json={"data": data}, timeout=30)
        r.raise_for_status()
        stream = httpx.get(server["url"] + f"gradio_api/call/search/{r.json()['event_id']}", timeout=30)
        assert "event: error" in stream.text and "event: complete" not in stream.text, target
        assert "root:" not in stream.text
    gallery, _, _ = search(server["client"], tiny["gallery"].paths[0], 3)
    assert len(gallery) == 3


def _raw_call(url, api, data, headers=None):
    """POST ``data`` to Gradio's raw HTTP API (``/gradio_api/call/<api>``) as an attacker would
    send it, then read the event stream; returns (status of the POST, stream text)."""
    import httpx

    r = httpx.post(url + f"gradio_api/call/{api}", json={"data": data}, headers=headers or {}, timeout=30)
    if r.status_code != 200:
        return r.status_code, r.text
    stream = httpx.get(url + f"gradio_api/call/{api}/{r.json()['event_id']}", timeout=30)
    return r.status_code, stream.text


def _error_message(stream):
    """The message of an error event (None when the call completed)."""
    import json

    if "event: complete" in stream:
        return None
    for line in stream.splitlines():
        if line.startswith("data:") and line[5:].strip() not in ("", "null"):
            return json.dumps(json.loads(line[5:]), sort_keys=True)
    return ""


def test_raw_api_opens_no_server_path_and_does_not_tell_which_exist(server, tiny):
    """Payloads naming a server file (no Gradio "meta" marker, or with one), a web address, or a
    path escaping the upload folder are refused, /search and /explain alike, with one message
    that does not depend on whether the path exists."""
    from search import guard

    gallery_image = str(tiny["gallery"].paths[0])
    upload_dir = guard.upload_roots()[0]
    targets = [
        "/etc/passwd",
        "/etc/hostname",
        "/no/such/file.png",
        gallery_image,
        str(tiny["checkpoint"]),
        f"{upload_dir}/../../etc/passwd",
        f"{upload_dir}/../no/such.png",
        "https://example.com/q.png",
        "http://127.0.0.1:1/q.png",
        "file:///etc/passwd",
    ]
    messages = set()
    for target in targets:
        for payload in (
            {"path": target},
            {"path": target, "meta": {"_type": "gradio.FileData"}},
            {"path": target, "url": target},
        ):
            for api, rest in (("search", [3, "All", None]), ("explain", [tiny["index"].paths[0]])):
                status, stream = _raw_call(server["url"], api, [payload, *rest])
                assert status == 200, (target, status)
                message = _error_message(stream)
                assert message is not None, ("served", api, payload)
                assert "root:" not in stream and "No such file" not in stream, stream
                if "meta" not in payload:  # the app's own check (Gradio's answers the others)
                    assert guard.REFUSED_QUERY in message, (payload, message)
                kind = "web" if target.startswith("http") else "path"  # Gradio's is_http_url_like
                messages.add((api, tuple(sorted(payload)), kind, message))
    # per endpoint, payload form and kind of target (a server path, a web address), one message
    # whatever the target, existing or not: nothing to probe the server's files with
    forms = {m[:3] for m in messages}
    assert len(messages) == len(forms), sorted(messages)
    # the same among /search's more photos of the item (its fourth input, a list): refused (by
    # Gradio's own checks here), one answer per payload form whether the file exists or not
    listed = set()
    for target in ("/etc/passwd", "/no/such/file.png", gallery_image):
        for payload in ({"path": target}, {"path": target, "meta": {"_type": "gradio.FileData"}}):
            status, stream = _raw_call(server["url"], "search", [None, 3, "All", [payload]])
            assert status == 200 and "event: error" in stream and "event: complete" not in stream, stream
            assert "root:" not in stream and "No such file" not in stream, stream
            listed.add((tuple(sorted(payload)), (_error_message(stream) or "").replace(target, "<path>")))
    assert len(listed) == 2, listed
    gallery, _, _ = search(server["client"], tiny["gallery"].paths[0], 3)  # and the server still serves
    assert len(gallery) == 3


def test_data_url_query_is_searched_and_deleted_like_gradios_own_files(server, tiny):
    import base64

    raw = Path(tiny["gallery"].paths[4]).read_bytes()
    payload = {"url": "data:image/jpeg;base64," + base64.b64encode(raw).decode(), "path": None}
    status, stream = _raw_call(server["url"], "search", [payload, 3, "All", None])
    assert status == 200 and "event: complete" in stream, stream[-500:]
    import hashlib

    saved = [
        str(p)
        for p in Path(guard.upload_roots()[0]).glob("*/query")
        if hashlib.sha256(p.read_bytes()).hexdigest() == hashlib.sha256(raw).hexdigest()
    ]
    assert saved, "the data URL was not written to the upload folder"
    demo = server["demo"]
    assert any(saved[0] in files for files in demo.temp_file_sets), "not registered for deletion"


def test_file_route_serves_exactly_the_served_index_decided_per_request(server, tiny):
    """Files put into a served folder after start (a notes file, a new photo the index does not
    hold), a web address and a symlink out are refused; the index's photos are served; after
    the engine's index changes, its photos (and only they) are served."""
    demo, url = server["demo"], server["url"]
    image = Path(tiny["gallery"].paths[0])
    assert raw_get(url, f"/gradio_api/file={image}")[0] == 200
    late = [image.parent / "passwords.txt", image.parent / "not_indexed.JPG", image.parent / "notes.xmp"]
    late[0].write_text("not for the web\n")
    shutil.copy(image, late[1])
    late[2].write_text("not for the web\n")
    try:
        for target in [*map(str, late), "https://example.com/a.png", "http://127.0.0.1:9/a.png"]:
            for route in ("/gradio_api/file=", "/gradio_api/file/", "/file="):
                status, body = raw_get(url, route + target)
                assert status in (403, 404), (route, target, status)
                assert b"not for the web" not in body and body != image.read_bytes()
        engine = demo.engine
        before = engine.index
        from search.index import GalleryIndex

        assert before.paths[0] == image.relative_to(tiny["data_root"]).as_posix()
        smaller = GalleryIndex(
            embeddings=before.embeddings[1:],
            paths=before.paths[1:],
            class_ids=before.class_ids[1:],
            super_ids=before.super_ids[1:],
            categories=before.categories,
            product_ids=before.product_ids[1:],
            checkpoint_hash=before.checkpoint_hash,
            meta=dict(before.meta),
        )
        engine.replace_index(smaller)
        try:
            assert raw_get(url, f"/gradio_api/file={image}")[0] == 403  # no longer in the index
            assert raw_get(url, f"/gradio_api/file={tiny['data_root'] / before.paths[1]}")[0] == 200
        finally:
            engine.replace_index(before)
        assert raw_get(url, f"/gradio_api/file={image}")[0] == 200
    finally:
        for f in late:
            f.unlink()


def test_pages_of_other_origins_cannot_drive_the_api(server, tiny):
    import httpx

    data = {"data": [None, 3, "All", None]}
    evil = httpx.post(
        server["url"] + "gradio_api/call/search", json=data, timeout=30, headers={"Origin": "https://evil.example"}
    )
    assert evil.status_code == 403 and b"Cross-origin" in evil.content
    up = httpx.post(
        server["url"] + "gradio_api/upload", files={"files": ("a.txt", b"x")}, timeout=30, headers={"Origin": "null"}
    )
    assert up.status_code == 403
    own = server["url"].rstrip("/")
    same = httpx.post(server["url"] + "gradio_api/call/search", json=data, timeout=30, headers={"Origin": own})
    assert same.status_code == 200  # the demo's own page
    assert httpx.post(server["url"] + "gradio_api/call/search", json=data, timeout=30).status_code == 200


def test_guard_rules_by_themselves(tmp_path):
    from search import guard

    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.jpg").write_bytes(b"x")
    (root / "a" / "out.jpg").symlink_to("/etc/hostname")
    served = guard.ServedFiles(root, ["a/x.jpg", "a/out.jpg"])
    assert served.allows(str(root / "a" / "x.jpg"))
    assert served.allows(f"{root}/a/../a/x.jpg")
    assert not served.allows(str(root / "a" / "out.jpg"))  # listed, but its real file is outside
    assert not served.allows(str(root / "a" / "y.jpg")) and not served.allows("/etc/passwd")
    assert not served.allows(f"{root}/a/x.jpg\x00.png")
    assert guard.origin_allowed(None, "h:1") and guard.origin_allowed("http://h:1", "h:1")
    assert not guard.origin_allowed("http://evil:1", "h:1") and not guard.origin_allowed("null", "h:1")
    assert guard.origin_allowed("https://shop.example", "h:1", ["https://shop.example/"])
    assert guard.is_loopback("127.0.0.1") and guard.is_loopback("::1") and not guard.is_loopback("0.0.0.0")
    assert guard.parse_auth("u:p:q") == ("u", "p:q")
    for bad in ("u", ":p", "u:"):
        with pytest.raises(ValueError):
            guard.parse_auth(bad)
    f = tmp_path / "users"
    f.write_text("# shop staff\nann:secret\n\nbob:pw\n")
    assert guard.read_auth_file(f) == [("ann", "secret"), ("bob", "pw")]
    f.write_text("ann:secret\nbob\n")
    with pytest.raises(ValueError, match="line 2"):
        guard.read_auth_file(f)


@pytest.mark.slow
def test_auth_login_is_required_when_asked_and_exposure_warns(tiny, caplog):
    from gradio_client import Client
    import httpx

    model, index, data_root = tiny["model"], tiny["index"], tiny["data_root"]
    webapp.use_private_gradio_temp_dir()
    demo = webapp.build_app(model, index, data_root, explain_store_gb=0)
    port = free_port()
    webapp.launch_app(demo, index, data_root, port=port, prevent_thread_lock=True, quiet=True, auth=[("ann", "secret")])
    url = f"http://127.0.0.1:{port}/"
    try:
        r = httpx.post(url + "gradio_api/call/search", json={"data": [None, 3, "All", None]}, timeout=30)
        assert r.status_code in (401, 403), r.status_code
        image = tiny["gallery"].paths[0]
        assert raw_get(url, f"/gradio_api/file={image}")[0] in (401, 403)
        client = Client(url, auth=("ann", "secret"), verbose=False)
        gallery, _, _ = search(client, image, 3)
        assert len(gallery) == 3
    finally:
        demo.close()
    assert webapp.exposure_warning("0.0.0.0", False, None)
    assert webapp.exposure_warning("127.0.0.1", True, None)
    assert webapp.exposure_warning("127.0.0.1", False, None) is None
    assert webapp.exposure_warning("0.0.0.0", False, [("a", "b")]) is None


def test_demo_starts_with_corrupt_vanished_and_unreadable_gallery_photos(tiny, tmp_path, caplog):
    """Photos broken before indexing are left out of the index (counted, listed in its meta);
    photos broken after it are skipped by the explanation store; the demo starts either way."""
    import logging

    root = tmp_path / "root"
    shutil.copytree(tiny["data_root"], root)
    model, checkpoint = tiny["model"], tiny["checkpoint"]
    test_paths = datasets.SOPDataset(root, "test").rel_paths
    (root / test_paths[0]).write_bytes(b"not an image")  # corrupt before indexing
    (root / test_paths[1]).unlink()  # vanished before indexing
    index, built = search_loading.load_or_build_index(
        model, checkpoint, root, "test", tmp_path / "g.npz", progress=False
    )
    assert built and len(index) == len(test_paths) - 2
    assert set(index.meta["unreadable"]) == {test_paths[0], test_paths[1]}
    again, built = search_loading.load_or_build_index(
        model, checkpoint, root, "test", tmp_path / "g.npz", progress=False
    )
    assert not built and len(again) == len(index)  # reused, not rebuilt at every start
    data = (root / index.paths[0]).read_bytes()
    (root / index.paths[0]).write_bytes(data[: len(data) // 3])  # truncated after indexing
    (root / index.paths[1]).unlink()  # vanished after indexing
    os.chmod(root / index.paths[2], 0)  # unreadable (unless root)
    with caplog.at_level(logging.WARNING, logger="app_stanford"):
        demo = webapp.build_app(model, index, root, explain_store_gb=1)
    store = demo.engine.explain_store
    assert store is not None and len(store) <= len(index) - 2
    assert "could not be read" in caplog.text
    ranked = demo.engine.search_file(tiny["gallery"].paths[3], k=3)
    assert len(ranked["results"]) == 3


def test_binds_loopback_by_default(server):
    args = app_stanford.get_args_parser().parse_args([])
    assert args.host == "127.0.0.1" and not args.share
    assert server["demo"].server_name == "127.0.0.1"
    assert not server["demo"].share


# ============ checkpoint discovery and the gallery index ============


def test_no_checkpoint_says_how_to_train_one(tmp_path):
    args = app_stanford.get_args_parser().parse_args(["--checkpoint_dir", str(tmp_path / "none")])
    with pytest.raises(SystemExit) as err:
        app_stanford.main(args)
    assert "python train.py --dataset synthetic" in str(err.value.code)


def test_newest_best_checkpoint_is_found(tmp_path, tiny):
    for i, run in enumerate(["old", "new", "mid"]):
        p = tmp_path / run / "best.pth"
        p.parent.mkdir()
        shutil.copy(tiny["checkpoint"], p)
        os.utime(p, (1_000_000 + 10 * [0, 2, 1][i],) * 2)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "last.pth").write_bytes(b"")  # only best.pth counts
    assert search_loading.find_checkpoint(tmp_path) == tmp_path / "new" / "best.pth"
    assert search_loading.find_checkpoint(tmp_path / "empty") is None


def test_data_root_defaults_to_the_checkpoints(tiny):
    assert Path(catalogue.default_data_root(tiny["model"].checkpoint_info["args"])) == tiny["data_root"]


def test_index_is_reused_then_rebuilt_when_checkpoint_or_images_change(tmp_path, tiny):
    data_root = tmp_path / "sop"
    shutil.copytree(tiny["data_root"], data_root)
    ckpt = tmp_path / "run" / "best.pth"
    ckpt.parent.mkdir()
    shutil.copy(tiny["checkpoint"], ckpt)
    model = models.load_model(ckpt)
    kw = dict(progress=False, workers=0)

    index, built = search_loading.load_or_build_index(model, ckpt, data_root, **kw)
    assert built and search_loading.default_index_path(ckpt, "test").is_file()
    index2, built = search_loading.load_or_build_index(model, ckpt, data_root, **kw)
    assert not built and index2.checkpoint_hash == index.checkpoint_hash
    np.testing.assert_array_equal(index2.embeddings, index.embeddings)

    # another checkpoint (other weights) at the same path → rebuilt
    write_untrained_checkpoint(ckpt, data_root, seed=1)
    model = models.load_model(ckpt)
    index3, built = search_loading.load_or_build_index(model, ckpt, data_root, **kw)
    assert built and index3.checkpoint_hash == checkpoints.checkpoint_hash(ckpt) != index.checkpoint_hash
    assert not np.allclose(index3.embeddings, index.embeddings)

    # the image list changed (one line dropped) → rebuilt
    lines = (data_root / "Ebay_test.txt").read_text().splitlines(keepends=True)
    (data_root / "Ebay_test.txt").write_text("".join(lines[:-1]))
    index4, built = search_loading.load_or_build_index(model, ckpt, data_root, **kw)
    assert built and len(index4) == len(index3) - 1

    # a corrupt index file → rebuilt, not a crash
    search_loading.default_index_path(ckpt, "test").write_bytes(b"garbage")
    _, built = search_loading.load_or_build_index(model, ckpt, data_root, **kw)
    assert built


def test_failed_index_write_keeps_the_previous_file(tmp_path, tiny, monkeypatch):
    ckpt = tmp_path / "run" / "best.pth"
    ckpt.parent.mkdir()
    shutil.copy(tiny["checkpoint"], ckpt)
    index_path = tmp_path / "index.npz"
    model = models.load_model(ckpt)
    search_loading.load_or_build_index(model, ckpt, tiny["data_root"], index_path=index_path, progress=False, workers=0)
    before = index_path.read_bytes()

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError) as err:
        search_loading.load_or_build_index(
            model, ckpt, tiny["data_root"], index_path=index_path, progress=False, workers=0, force=True
        )
    assert str(index_path) in str(err.value)
    assert index_path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left

    args = app_stanford.get_args_parser().parse_args(
        [
            "--checkpoint",
            str(ckpt),
            "--runtime",
            "torch",
            "--data_root",
            str(tiny["data_root"]),
            "--index",
            str(index_path),
            "--rebuild_index",
            "--workers",
            "0",
        ]
    )
    with pytest.raises(SystemExit) as err:
        app_stanford.main(args)
    assert str(index_path) in str(err.value.code) and "--index" in str(err.value.code)
    assert index_path.read_bytes() == before
