"""search/index.py: the gallery index file (round trip, failed writes, corrupt and foreign
files, staleness) and its search against brute force; files written before search/ existed
(tests/fixtures/gallery_v1_*.npz, by retrieval.GalleryIndex) still load and search the same."""

import errno
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from dataio import fileio
from search.index import GalleryIndex, hash_paths, load_fresh_index

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def make_index(n=500, dim=16, seed=0, **kw):
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return GalleryIndex(
        embeddings=emb,
        paths=[f"mug_final/{i}_0.JPG" for i in range(n)],
        class_ids=np.arange(n) // 4,
        super_ids=rng.integers(1, 13, n),
        checkpoint_hash="ab" * 32,
        meta={"split": "test"},
        **kw,
    )


def test_gallery_index_round_trip_and_search(tmp_path):
    index = make_index()
    path = index.save(tmp_path / "sub" / "gallery.npz")
    loaded = GalleryIndex.load(path)
    np.testing.assert_array_equal(loaded.embeddings, index.embeddings)
    assert loaded.paths == index.paths and loaded.meta == {"split": "test"}
    np.testing.assert_array_equal(loaded.class_ids, index.class_ids)
    np.testing.assert_array_equal(loaded.super_ids, index.super_ids)
    assert loaded.checkpoint_hash == index.checkpoint_hash
    assert loaded.image_list_hash == hash_paths(index.paths)
    assert loaded.stale_reason("ab" * 32, index.paths) is None
    assert "checkpoint" in loaded.stale_reason("cd" * 32, index.paths)
    assert "image list" in loaded.stale_reason("ab" * 32, index.paths[::-1])

    q = index.embeddings[7] + 0.1
    scores, idx = loaded.search(q, k=10)
    ref = np.argsort(-(index.embeddings @ (q / np.linalg.norm(q))), kind="stable")[:10]
    np.testing.assert_array_equal(idx[0], ref)
    _, idx_cat = loaded.search(q, k=5, super_id=3)
    members = np.flatnonzero(index.super_ids == 3)
    ref_cat = members[np.argsort(-(index.embeddings[members] @ (q / np.linalg.norm(q))), kind="stable")[:5]]
    np.testing.assert_array_equal(idx_cat[0], ref_cat)
    s_all, i_all = loaded.search(np.stack([q, q]), k=len(index) + 3)  # more than the gallery
    assert (i_all[:, -3:] == -1).all() and np.isneginf(s_all[:, -3:]).all()


@pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="faiss is not installed (pip install faiss-cpu)")
def test_faiss_kernel_ranks_as_the_exact_scan(tmp_path):
    index = make_index()
    path = index.save(tmp_path / "gallery.npz")
    q = index.embeddings[7] + 0.1
    exact = GalleryIndex.load(path)
    faiss_index = GalleryIndex.load(path, kernel="faiss")
    np.testing.assert_array_equal(faiss_index.search(q, 10)[1], exact.search(q, 10)[1])
    np.testing.assert_array_equal(faiss_index.search(q, 5, super_id=3)[1], exact.search(q, 5, super_id=3)[1])


def test_gallery_index_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "gallery.npz"
    make_index(seed=1).save(path)
    before = path.read_bytes()

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", full_disk)
    with pytest.raises(OSError) as err:
        make_index(seed=2).save(path)
    assert err.value.errno == errno.ENOSPC
    assert str(path) in str(err.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gallery.npz"]  # no temporary file left
    monkeypatch.undo()
    GalleryIndex.load(path)


def test_gallery_index_corrupt_files_are_refused(tmp_path):
    path = tmp_path / "gallery.npz"
    make_index().save(path)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not an index at all")
    flipped = tmp_path / "flipped.npz"
    flipped.write_bytes(data[:2000] + bytes([data[2000] ^ 0xFF]) + data[2001:])  # CRC mismatch
    for bad in (truncated, garbage, flipped):
        with pytest.raises(ValueError, match="corrupt") as err:
            GalleryIndex.load(bad)
        assert str(bad) in str(err.value)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        GalleryIndex.load(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", embeddings=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="other.npz"):
        GalleryIndex.load(tmp_path / "other.npz")


def test_gallery_index_rejects_inconsistent_parts():
    with pytest.raises(ValueError, match="disagree"):
        GalleryIndex(np.zeros((3, 4)), ["a", "b"], [1, 2, 3], [1, 1, 1])
    with pytest.raises(ValueError, match="kernel"):
        make_index(kernel="annoy")


def test_load_fresh_index_says_why_not(tmp_path):
    index = make_index(n=8)
    path = tmp_path / "index.npz"
    assert load_fresh_index(path, "ab" * 32, index.paths) == (None, "missing")
    index.save(path)
    fresh, why = load_fresh_index(path, "ab" * 32, index.paths)
    assert why is None and fresh.paths == index.paths
    assert load_fresh_index(path, "cd" * 32, index.paths)[1].startswith("stale (built from checkpoint")
    assert "image list" in load_fresh_index(path, "ab" * 32, index.paths[::-1])[1]
    path.write_bytes(b"not an index")
    fresh, why = load_fresh_index(path, "ab" * 32, index.paths)
    assert fresh is None and why != "missing" and not why.startswith("stale")


@pytest.mark.parametrize("kind", ["exact", "hnsw"])
def test_index_files_of_the_previous_layout_load_and_search_the_same(kind):
    """Written by `retrieval.GalleryIndex.save` before the index moved to search/index.py: the
    file holds plain arrays and JSON (no pickled class paths), so the move cannot break it."""
    if kind != "exact":
        pytest.importorskip("faiss")
    expected = json.loads((FIXTURES / "gallery_v1_results.json").read_text())
    index = GalleryIndex.load(FIXTURES / f"gallery_v1_{kind}.npz")
    assert index.index_type == kind and len(index) == 30 and index.categories == ["mug", "chair", "lamp"]
    assert index.product_ids[:3] == ["p0", "p0", "p1"] and index.meta == {"split": "test"}
    assert index.stale_reason("ab" * 32, index.paths, kind) is None
    if kind == "exact":
        assert index.file_stats.shape == (30, 2) and index.file_stats[1].tolist() == [101, 10**9]
    queries = np.array(expected["queries"], dtype=np.float32)
    for super_id, want in expected[kind].items():
        scores, idx = index.search(queries, k=5, super_id=None if super_id == "None" else int(super_id))
        np.testing.assert_array_equal(idx, want["indices"])
        np.testing.assert_array_equal(scores, np.array(want["scores"], dtype=np.float32))
