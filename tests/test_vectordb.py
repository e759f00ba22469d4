"""search/vectordb.py: a gallery in Milvus (Milvus Lite through its local database and through its
gRPC server on 127.0.0.1, and a real Milvus Standalone server), against the file index; the view
past one page; names of any Unicode in filters and deletes (hypothesis); timeouts and a released
collection; resumable indexing after a SIGKILL with both backends; the errors that name what is
wrong. Tiny images, an untrained ResNet-18 at 32 px. The server's crash and restart, and two
galleries on one collection: tests/test_milvus_server.py."""

import os
from pathlib import Path
import re
import signal
import socket
import subprocess
import sys
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import numpy as np
import pytest
import torch

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from gallery_photos import ADVERSARIAL, IMAGE_SIZE, KEY, make_folder, write_image

import checkpoints
import models
from search import ann, collection, gallery, milvus, row_view, tiny_demo, vectordb
from search.index import GalleryIndex

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
# names that broke the filter before: raw newline / CR end a Milvus literal
BREAKING = ["new\nline", "carriage\rreturn", "tab\there", "\\n", "é日本 😀", "\u2028sep\x85", "\x00nul\x7f", "'single'"]
MODEL_ARGS = {"backbone": "resnet18", "image_size": IMAGE_SIZE, "embedding_size": 128}


# ============ helpers and fixtures ============


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return models.build_model("resnet18", weights="none", image_size=IMAGE_SIZE).eval()


def start_lite_server(cmd, port):
    """Start Milvus Lite's gRPC server ``cmd``; return the process once ``port`` accepts."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if proc.poll() is not None:
                pytest.fail("the Milvus Lite server exited at start")
            time.sleep(0.2)
    proc.kill()
    pytest.fail("the Milvus Lite server did not listen within 60 s")


@pytest.fixture(scope="module")
def milvus_server(tmp_path_factory):
    """Milvus Lite's gRPC server (``python -m milvus_lite server``) on a free 127.0.0.1 port."""
    port = tiny_demo.free_port()
    data = tmp_path_factory.mktemp("milvus_server") / "server.db"
    proc = start_lite_server(
        [
            sys.executable,
            "-m",
            "milvus_lite",
            "server",
            "--data-dir",
            str(data),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        port,
    )
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(params=["lite", "server", "standalone"])
def db_uri(request, tmp_path):
    """A Milvus Lite database: a local .db (in this process), or the gRPC server's; or a real
    Milvus Standalone server (tests/milvus_server.py; skipped where it cannot start)."""
    if request.param == "lite":
        return str(tmp_path / "gallery.db")
    if request.param == "standalone":
        return request.getfixturevalue("milvus_standalone").uri
    return request.getfixturevalue("milvus_server")


def file_and_db(model, root, uri, tmp_path, index_type="exact", **kwargs):
    index, _ = gallery.update_gallery_index(
        model, root, tmp_path / "gallery.npz", KEY, batch_size=4, workers=0, progress=False
    )
    store, report = vectordb.folder_gallery(
        model, KEY, root, uri, index_type=index_type, batch_size=4, workers=0, progress=False, **kwargs
    )
    return index, store, report


# ============ the filter: values are literals ============


def test_quote_escapes_what_ends_or_escapes_a_literal():
    assert vectordb.quote('A" or category != "') == '"A\\" or category != \\""'
    assert vectordb.quote("a\\b") == '"a\\\\b"'
    assert vectordb.quote("a\nb\rc\td") == '"a\\nb\\rc\\td"'
    assert vectordb.quote("é\u2028😀") == '"é\u2028😀"'  # as it is: Lite's parser knows no \\u escape
    assert milvus.key_range() == "" and milvus.key_range(None, 'a"') == 'path <= "a\\""'


def name_collection(client, name="c"):
    from pymilvus import DataType

    schema = client.create_schema(auto_id=False)
    schema.add_field("path", DataType.VARCHAR, is_primary=True, max_length=1024)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=2)
    schema.add_field("category", DataType.VARCHAR, max_length=1024)
    params = client.prepare_index_params()
    params.add_index(field_name="vector", index_type="FLAT", metric_type="IP")
    if client.has_collection(name):
        client.drop_collection(name)
    client.create_collection(name, schema=schema, index_params=params, consistency_level="Strong")
    return name


def test_adversarial_names_match_only_themselves_and_delete_only_themselves(tmp_path, db_uri):
    """Against each database: each name, quoted, matches its own rows; unquoted, the injection
    would match every row (the test proves it can tell); a delete by names removes just those."""
    client = vectordb.connect(db_uri)
    c = name_collection(client, f"names_{tmp_path.name[-12:]}".replace("-", "_"))
    names = ADVERSARIAL + BREAKING + ["", "plain"]
    client.insert(c, [{"path": n, "vector": [1.0, 0.0], "category": n} for n in names])
    for name in names:
        rows = client.query(c, filter=f"category == {vectordb.quote(name)}", output_fields=["category"])
        assert [r["category"] for r in rows] == [name]
    injected = client.query(c, filter='category == "A" or category != ""', output_fields=["category"])
    assert len(injected) == len(names) - 1  # what an unescaped value would have done
    client.delete(c, filter=vectordb.in_filter("path", BREAKING))
    left = client.query(c, filter="", output_fields=["path"], limit=100)
    assert sorted(r["path"] for r in left) == sorted(ADVERSARIAL + ["", "plain"])
    client.drop_collection(c)


@pytest.fixture(scope="module")
def lite_names(tmp_path_factory):
    """A Milvus Lite collection of (path, category) rows for the property tests."""
    client = vectordb.connect(str(tmp_path_factory.mktemp("names") / "names.db"))
    return client, name_collection(client)


NAMES = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)  # any Unicode but lone surrogates


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(NAMES, min_size=1, max_size=6, unique=True), data=st.data())
def test_any_unicode_name_filters_and_deletes_exactly_its_rows(lite_names, names, data):
    client, c = lite_names
    client.delete(c, filter='path != ""')
    client.delete(c, filter='path == ""')
    client.insert(c, [{"path": n, "vector": [1.0, 0.0], "category": n} for n in names])
    for name in names:
        rows = client.query(c, filter=f"category == {vectordb.quote(name)}", output_fields=["path"])
        assert [r["path"] for r in rows] == [name]
    gone = data.draw(st.lists(st.sampled_from(names), unique=True), label="deleted")
    if gone:
        client.delete(c, filter=vectordb.in_filter("path", gone))
    left = client.query(c, filter="", output_fields=["path"], limit=100)
    assert sorted(r["path"] for r in left) == sorted(set(names) - set(gone))


# ============ same answers as the file index ============


def test_exact_index_returns_the_file_index_top_k(model, tmp_path, db_uri, monkeypatch):
    monkeypatch.setattr(row_view, "PAGE", 7)  # rows read back over several pages, quoted keys
    root = make_folder(tmp_path / "photos")
    index, store, report = file_and_db(model, root, db_uri, tmp_path)
    assert report["embedded"] == len(index) == len(store) == store.count() == 30
    assert store.paths == index.paths and store.categories == index.categories
    assert store.product_ids == index.product_ids and np.array_equal(store.super_ids, index.super_ids)
    queries = np.concatenate([index.embeddings[:3], np.random.default_rng(0).normal(size=(2, 128))]).astype(np.float32)
    for super_id in [None, 1, 2, 3, 4]:
        for k in (1, 5, 10, 50):
            s_file, i_file = index.search(queries, k, super_id=super_id)
            s_db, i_db = store.search(queries, k, super_id=super_id)
            assert np.array_equal(i_file, i_db), (super_id, k)
            np.testing.assert_allclose(s_file, s_db, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(store.embeddings[7], index.embeddings[7])


def test_ties_break_by_the_lower_row_as_in_the_file_index(tmp_path, db_uri):
    """Four identical vectors: both backends return them in row (path) order."""
    emb = np.tile(np.eye(1, 128, dtype=np.float32), (6, 1))
    emb[4:] = np.eye(1, 128, 1, dtype=np.float32)
    files = [(f"c/p/{name}.jpg", 1, 1) for name in "fbdace"]
    files.sort()
    index = gallery.make_gallery_index(emb, files, KEY)
    store = vectordb.MilvusGallery.open(db_uri, tmp_path, KEY, MODEL_ARGS, collection="ties")
    store.publish(index)
    for k in (1, 2, 3, 6):
        assert np.array_equal(store.search(emb[0], k)[1], index.search(emb[0], k)[1])


@pytest.mark.parametrize("index_type", ["ivf", "hnsw"])
def test_approximate_indexes_recall_against_exact(tmp_path, index_type):
    # after pytorch-metric-learning patched faiss (as the reference tests do): Lite IVF uses faiss
    import pytorch_metric_learning.utils.inference  # noqa: F401

    rng = np.random.default_rng(1)  # clustered like embeddings: 400 products of 5 images
    centres = rng.normal(size=(400, 128)).astype(np.float32)
    emb = np.repeat(centres, 5, axis=0) + 0.6 * rng.normal(size=(2000, 128)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    files = sorted((f"c{i % 4}/x/{i:05d}.jpg", 1, 1) for i in range(len(emb)))
    index = gallery.make_gallery_index(emb, files, KEY)
    store = vectordb.MilvusGallery.open(
        str(tmp_path / "a.db"), tmp_path, KEY, MODEL_ARGS, index_type=index_type, expected_size=len(emb)
    )
    store.publish(index)
    queries = emb[:50] + 0.1 * rng.normal(size=(50, 128)).astype(np.float32)
    exact = index.search(queries, 10)[1]
    approx = store.search(queries, 10)[1]
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx.tolist(), exact.tolist())])
    assert recall >= 0.8, recall
    exact_cat, approx_cat = index.search(queries, 10, super_id=2)[1], store.search(queries, 10, super_id=2)[1]
    recall_cat = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx_cat.tolist(), exact_cat.tolist())])
    assert recall_cat >= 0.8, recall_cat


def _params(index_type, ann_params, limit, kept):
    store = object.__new__(vectordb.MilvusGallery)  # only the search parameters: no database
    store.index_type, store.ann_params = index_type, ann_params
    return store._search_params(limit, kept)["params"]


def test_filtered_searches_widen_the_beam_by_the_filtered_out_share():
    hnsw = {"M": 24, "efSearch": 256}
    assert _params("hnsw", hnsw, 36, 1.0) == {"ef": 256}
    assert _params("hnsw", hnsw, 36, 1 / 12) == {"ef": 256 * 12}
    assert _params("hnsw", hnsw, 36, 1e-6) == {"ef": vectordb.MAX_FILTERED_EF}  # capped
    assert _params("hnsw", {"efSearch": 16}, 36, 1.0) == {"ef": 36}  # never below the candidates
    ivf = {"nlist": 512, "nprobe": 22}
    assert _params("ivf", ivf, 36, 1.0) == {"nprobe": 22}
    assert _params("ivf", ivf, 36, 1 / 4) == {"nprobe": 88}
    assert _params("ivf", ivf, 36, 1e-6) == {"nprobe": 512}  # every cell: exhaustive
    assert _params("exact", {}, 36, 1 / 4) == {}


def test_milvus_lite_defaults_differ_from_faiss_only_where_lite_does():
    lite, server = "runs/x/gallery.db", "http://localhost:19530"
    assert collection.default_params(server, "hnsw", 1_000_000) == ann.default_params("hnsw", 1_000_000)
    assert collection.default_params(lite, "hnsw", 1_000_000)["efSearch"] == 256 * collection.LITE_HNSW_EF_FACTOR
    assert collection.default_params(server, "ivf", 1_000_000) == ann.default_params("ivf", 1_000_000)
    lite_ivf = collection.default_params(lite, "ivf", 1_000_000)  # faiss: 85 of 2048 cells
    assert lite_ivf["nlist"] == collection.LITE_IVF_NLIST and lite_ivf["nprobe"] == 8  # >= 85/2048 of 128
    assert collection.default_params(lite, "ivf", 2_000)["nprobe"] == 21  # faiss: 8 of 51 cells


# ============ updates ============


def test_update_embeds_only_changes_and_a_search_sees_them(model, tmp_path, db_uri):
    root = make_folder(tmp_path / "photos", n=12)
    index, store, _ = file_and_db(model, root, db_uri, tmp_path)
    write_image(root / "mugs" / "new" / "a.png", 100)
    (root / ADVERSARIAL[0] / "p0" / "img0000.png").unlink()
    before = len(store)
    report = store.update(model, batch_size=4, workers=0, progress=False)
    assert (report["added"], report["removed"], report["embedded"], report["unchanged"]) == (1, 1, 1, 11)
    assert len(store) == before  # the new view is adopted by the next search ...
    store.search(np.ones(128, np.float32), 3)
    index, _ = gallery.update_gallery_index(
        model, root, tmp_path / "gallery.npz", KEY, batch_size=4, workers=0, progress=False
    )
    assert store.paths == index.paths and store.count() == len(index) == 12  # ... and equals the file index
    assert np.array_equal(store.search(index.embeddings[:4], 5)[1], index.search(index.embeddings[:4], 5)[1])
    again = store.update(model, batch_size=4, workers=0, progress=False)
    assert again["embedded"] == 0 and not again["written"]


def test_engine_searches_the_database_with_a_category_filter(model, tmp_path):
    from search import engine, loading

    root = make_folder(tmp_path / "photos", n=12)
    loaded = loading.SearchModel(model, None, KEY, "tiny")
    store, folder = loading.folder_index(
        loaded, root, backend="milvus", db_uri=str(tmp_path / "g.db"), batch_size=4, workers=0
    )
    eng = engine.SearchEngine(model, store, folder)
    for category in ADVERSARIAL:
        out = eng.search_gallery_item(0, k=10, category=category)
        assert out["results"] and {r["category"] for r in out["results"]} == {category}
    assert len(eng.search_gallery_item(0, k=50)["results"]) == 11  # itself excluded


def test_a_served_query_reads_one_view_while_an_update_waits_for_the_swap(model, tmp_path):
    """Under --watch the database is updated on another thread: until the engine swaps the new
    view in (between two queries), every query reads the old one, category ids, rows and paths
    together; afterwards the new one."""
    from search import engine, loading

    root = make_folder(tmp_path / "photos", n=12)
    loaded = loading.SearchModel(model, None, KEY, "tiny")
    store, folder = loading.folder_index(
        loaded, root, backend="milvus", db_uri=str(tmp_path / "g.db"), batch_size=4, workers=0
    )
    eng = engine.SearchEngine(model, store, folder)
    old_paths, old_categories = list(store.paths), list(store.categories)
    write_image(root / "aaa_new_category" / "p" / "x.png", 7)  # sorts first: would shift every category id
    store.update(model, batch_size=4, workers=0, progress=False)  # the watcher's step, before its swap
    for category in old_categories:
        out = eng.search_gallery_item(0, k=50, category=category)
        assert {r["category"] for r in out["results"]} == {category}
        assert all(r["catalogue_path"] in old_paths for r in out["results"])
    assert store.paths == old_paths  # the search did not adopt the new rows by itself
    eng.replace_index(store)
    assert "aaa_new_category/p/x.png" in store.paths
    out = eng.search_gallery_item(0, k=50, category="aaa_new_category")
    assert [r["catalogue_path"] for r in out["results"]] == ["aaa_new_category/p/x.png"]


# ============ any size, any start ============


def test_the_view_holds_every_row_past_one_page(tmp_path, db_uri):
    """20,000 rows (the real page: 16,384), written in shuffled batches as a gallery grows
    (several segments, which Milvus Lite answers in segment order, not key order): every row
    is in the view, once; the next update finds nothing to do."""
    n, rng = 20_000, np.random.default_rng(0)
    args = {**MODEL_ARGS, "embedding_size": 4}
    store = vectordb.MilvusGallery.open(db_uri, tmp_path, KEY, args, collection="big")
    paths = [f"c{i % 7}/p{i // 5}/{i:06d}.jpg" for i in range(n)]
    order = rng.permutation(n)
    for batch in np.array_split(order, 3):
        store.client.upsert(
            store.name,
            [
                {
                    "path": paths[i],
                    "vector": rng.normal(size=4).tolist(),
                    "product_id": "p",
                    "category": "c",
                    "size": 1,
                    "mtime_ns": 1,
                }
                for i in batch.tolist()
            ],
        )
        store.client.flush(store.name)
    store.refresh()
    store.adopt()
    assert row_view.PAGE == 16384 and len(store) == store.count() == n
    assert store.paths == sorted(paths)


def test_default_database_folder_is_created(tmp_path, monkeypatch):
    """A fresh clone has no runs/<zero-shot model>/: the default database's folder is made."""
    monkeypatch.chdir(tmp_path)
    db = vectordb.default_db_path(None, "zero_shot_resnet18_32px")
    assert not db.parent.exists()
    store = vectordb.MilvusGallery.open(db, tmp_path, KEY, MODEL_ARGS)
    assert len(store) == 0 and (tmp_path / db).is_dir()


def test_db_timeout_flag_bounds_every_call(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    vectordb.add_backend_args(parser)
    args = parser.parse_args([])
    assert 0 < args.db_timeout <= 10
    try:
        vectordb.apply_backend_args(parser.parse_args(["--db_timeout", "3.5"]))
        assert vectordb.MilvusGallery.open(str(tmp_path / "g.db"), tmp_path, KEY, MODEL_ARGS).timeout == 3.5
        with pytest.raises(ValueError, match="--db_timeout must be > 0"):
            vectordb.apply_backend_args(parser.parse_args(["--db_timeout", "0"]))
    finally:
        vectordb.apply_backend_args(args)


def test_a_released_collection_is_loaded_again_by_the_next_search(tmp_path, db_uri):
    """A restarted server's collections come back released: the search loads it itself."""
    emb = np.eye(3, 128, dtype=np.float32)
    index = gallery.make_gallery_index(emb, [(f"c/p/{i}.jpg", 1, 1) for i in range(3)], KEY)
    store = vectordb.MilvusGallery.open(db_uri, tmp_path, KEY, MODEL_ARGS, collection="released")
    store.publish(index)
    store.client.release_collection(store.name)
    assert np.array_equal(store.search(emb[1], 1)[1], [[1]])


def test_a_database_that_goes_away_fails_in_time_naming_it_then_recovers(tmp_path):
    """Milvus Lite's server killed under a gallery: a search fails within the timeout with a
    DatabaseError naming the URI; started again on the same data, the next searches answer
    without a new gallery."""
    port = tiny_demo.free_port()
    data = tmp_path / "served.db"
    cmd = [
        sys.executable,
        "-m",
        "milvus_lite",
        "server",
        "--data-dir",
        str(data),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    uri = f"http://127.0.0.1:{port}"
    proc = start_lite_server(cmd, port)
    try:
        emb = np.eye(3, 128, dtype=np.float32)
        store = vectordb.MilvusGallery.open(uri, tmp_path, KEY, MODEL_ARGS, collection="away", timeout=2)
        store.publish(gallery.make_gallery_index(emb, [(f"c/p/{i}.jpg", 1, 1) for i in range(3)], KEY))
        proc.kill()
        proc.wait(timeout=30)
        t0 = time.perf_counter()
        with pytest.raises(vectordb.DatabaseError, match=re.escape(uri)):
            store.search(emb[0], 1)
        assert time.perf_counter() - t0 < 2 * 2 + 3  # one call and one reconnect at most
        proc = start_lite_server(cmd, port)
        deadline = time.monotonic() + 30
        while True:
            try:
                assert np.array_equal(store.search(emb[2], 1)[1], [[2]])
                break
            except vectordb.DatabaseError:
                assert time.monotonic() < deadline, "no search answered within 30 s of the database's return"
                time.sleep(0.5)
        assert store.count() == 3
    finally:
        proc.kill()
        proc.wait(timeout=30)


# ============ bad inputs ============


def test_unreachable_server_fails_fast_naming_it():
    port = tiny_demo.free_port()
    t0 = time.perf_counter()
    with pytest.raises(vectordb.DatabaseError, match=f"http://127.0.0.1:{port}.*(runs|server)"):
        vectordb.connect(f"http://127.0.0.1:{port}", timeout=2)
    assert time.perf_counter() - t0 < 15


def test_a_file_or_a_foreign_folder_is_not_a_database(tmp_path):
    (tmp_path / "notes.db").write_text("hello")
    with pytest.raises(vectordb.DatabaseError, match=r"notes\.db is not a Milvus Lite database.*file"):
        vectordb.connect(str(tmp_path / "notes.db"))
    (tmp_path / "photos.db").mkdir()
    (tmp_path / "photos.db" / "a.jpg").write_bytes(b"x")
    with pytest.raises(vectordb.DatabaseError, match=r"photos\.db is not a Milvus Lite database"):
        vectordb.connect(str(tmp_path / "photos.db"))


def test_collection_of_another_model_or_folder_is_refused(tmp_path):
    uri = str(tmp_path / "g.db")
    vectordb.MilvusGallery.open(uri, tmp_path, KEY, MODEL_ARGS, collection="shared")
    with pytest.raises(vectordb.DatabaseError, match="shared.*another model.*--collection"):
        vectordb.MilvusGallery.open(uri, tmp_path, "other-key", MODEL_ARGS, collection="shared")
    with pytest.raises(vectordb.DatabaseError, match="shared.*another model"):
        vectordb.MilvusGallery.open(uri, tmp_path, KEY, {**MODEL_ARGS, "image_size": 64}, collection="shared")
    with pytest.raises(vectordb.DatabaseError, match="holds the gallery of folder"):
        vectordb.MilvusGallery.open(uri, tmp_path / "elsewhere", KEY, MODEL_ARGS, collection="shared")
    with pytest.raises(vectordb.DatabaseError, match="'exact' index, not 'hnsw'"):
        vectordb.MilvusGallery.open(uri, tmp_path, KEY, MODEL_ARGS, collection="shared", index_type="hnsw")
    # rebuild: dropped and made for the new model
    store = vectordb.MilvusGallery.open(uri, tmp_path, "other-key", MODEL_ARGS, collection="shared", rebuild=True)
    assert store.properties["model_key"] == "other-key"


# ============ a SIGKILL while indexing; two indexers ============


def index_command(ckpt, root, backend, *extra):
    cmd = [
        sys.executable,
        str(REPO / "app_stanford.py"),
        "--checkpoint",
        str(ckpt),
        "--gallery",
        str(root),
        "--build_index",
        "--device",
        "cpu",
        "--workers",
        "0",
        "--batch_size",
        "8",
        "--threads",
        "1",
        "--checkpoint_every",
        "32",
        "--index_backend",
        backend,
        *extra,
    ]
    return cmd


def run_until_killed(cmd, at_least):
    """Start ``cmd``, SIGKILL it once its log says ``at_least`` images are checkpointed;
    returns that count."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO)
    done = None
    for line in proc.stderr:
        m = re.search(r"embedded (\d+)/(\d+) images \(checkpointed\)", line)
        if m and int(m.group(1)) >= at_least:
            os.kill(proc.pid, signal.SIGKILL)
            done = int(m.group(1))
            break
    proc.wait(timeout=120)
    assert done is not None and proc.returncode == -signal.SIGKILL, "the run ended before it was killed"
    return done


def rerun(cmd):
    out = subprocess.run(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    m = re.search(r"Gallery .*: (\d+) images \(.*?(\d+) unchanged, (\d+) embedded, (\d+) resumed", out.stderr)
    return [int(x) for x in m.groups()]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["file", "milvus"])
def test_sigkill_during_indexing_then_rerun_converges(tmp_path, backend):
    n = 400
    root = make_folder(tmp_path / "photos", n=n)
    ckpt = tiny_demo.write_untrained_checkpoint(tmp_path / "ck" / "best.pth", root, image_size=IMAGE_SIZE)
    extra = ["--db_uri", str(tmp_path / "g.db")] if backend == "milvus" else ["--index", str(tmp_path / "g.npz")]
    cmd = index_command(ckpt, root, backend, *extra)
    done = run_until_killed(cmd, at_least=64)
    images, unchanged, embedded, resumed = rerun(cmd)
    assert rerun(cmd)[2] == 0  # a third run embeds nothing
    assert images == n
    assert unchanged + resumed >= done  # what was checkpointed before the kill is kept
    assert embedded <= n - done and embedded < n
    if backend == "file":
        index = GalleryIndex.load(tmp_path / "g.npz")
        paths = index.paths
        assert not list(tmp_path.glob(".g.npz.partial"))
    else:
        store = vectordb.MilvusGallery.open(
            str(tmp_path / "g.db"), root, checkpoints.checkpoint_hash(ckpt), models.load_model(ckpt).model_args
        )
        paths = store.paths
        assert store.count() == n
    assert len(paths) == len(set(paths)) == n


@pytest.mark.slow
def test_two_indexers_into_one_server_do_not_double_rows(tmp_path, milvus_server):
    n = 120
    root = make_folder(tmp_path / "photos", n=n)
    ckpt = tiny_demo.write_untrained_checkpoint(tmp_path / "ck" / "best.pth", root, image_size=IMAGE_SIZE)
    cmd = index_command(ckpt, root, "milvus", "--db_uri", milvus_server, "--collection", "twice")
    procs = [
        subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO) for _ in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    store = vectordb.MilvusGallery.open(
        milvus_server, root, checkpoints.checkpoint_hash(ckpt), models.load_model(ckpt).model_args, collection="twice"
    )
    assert store.count() == len(store) == len(set(store.paths)) == n


@pytest.mark.slow
def test_second_process_on_a_lite_database_is_refused_saying_why(tmp_path):
    root = make_folder(tmp_path / "photos", n=4)
    ckpt = tiny_demo.write_untrained_checkpoint(tmp_path / "ck" / "best.pth", root, image_size=IMAGE_SIZE)
    db = tmp_path / "held.db"
    vectordb.connect(str(db))  # this process holds it now
    out = subprocess.run(
        index_command(ckpt, root, "milvus", "--db_uri", str(db)),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert out.returncode != 0
    assert "open in another process" in out.stderr and "milvus_lite server" in out.stderr
