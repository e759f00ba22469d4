"""gallery.py: scanning a folder and its incremental index, on tiny images and an untrained
ResNet-18 at 32 px (what is tested does not depend on the weights)."""

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image
import pytest
import torch

from dataio import photos
import extraction
import models
import preprocessing
from search import ann, gallery
from search.index import GalleryIndex

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMAGE_SIZE = 32
KEY = "sha256-of-a-checkpoint"


# ============ helpers ============


def write_image(path, seed, fmt=None):
    """A random 40-80 px image (noise plus a coloured block), so each seed embeds differently."""
    rng = np.random.default_rng(seed)
    h, w = rng.integers(40, 81, size=2)
    pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    pixels[: h // 2, : w // 2] = rng.integers(0, 256, size=3, dtype=np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def bump_mtime(path, seconds=10):
    """Move the mtime forward: a rewrite within the same clock tick could keep the old one."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


def make_folder(root):
    """cats/a.jpg, cats/b.png, dogs/sub/c.jpg, top.jpg plus non-images: 4 images."""
    root = Path(root)
    write_image(root / "cats" / "a.jpg", 1)
    write_image(root / "cats" / "b.png", 2)
    write_image(root / "dogs" / "sub" / "c.jpg", 3)
    write_image(root / "top.jpg", 4)
    return root


def update(model, root, index_path, key=KEY, **kwargs):
    kwargs.setdefault("progress", False)
    kwargs.setdefault("workers", 0)
    kwargs.setdefault("batch_size", 3)  # several batches even for a handful of images
    return gallery.update_gallery_index(model, root, index_path, key, **kwargs)


def reference_embedding(model, path):
    """The model's embedding of one file, computed directly (one image per batch)."""
    transform = preprocessing.build_transform(IMAGE_SIZE, train=False)
    image = transform(photos.load_image(path, preprocessing.draft_size(transform)))
    with torch.inference_mode():
        out = model.eval()(image.unsqueeze(0))
    return torch.nn.functional.normalize(out, dim=1)[0].numpy()


def rows_by_path(index):
    return {p: index.embeddings[i] for i, p in enumerate(index.paths)}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return models.build_model("resnet18", weights="none", image_size=IMAGE_SIZE).eval()


@pytest.fixture
def spy_embed(monkeypatch):
    """Records the files each embed_files call receives (rel to nothing: absolute paths)."""
    calls = []
    real = gallery.embed_files

    def spy(model, paths, **kwargs):
        calls.append([Path(p).name for p in paths])
        return real(model, paths, **kwargs)

    monkeypatch.setattr(gallery, "embed_files", spy)
    return calls


# ============ scanning ============


def test_scan_lists_images_sorted_and_skips_the_rest(tmp_path):
    root = make_folder(tmp_path / "g")
    (root / "notes.txt").write_text("not a photo")
    (root / "cats" / ".hidden.jpg").write_bytes(b"x")
    (root / ".DS_Store").write_bytes(b"x")
    write_image(root / ".thumbnails" / "t.jpg", 9)  # hidden folder: not entered
    scan = gallery.scan_gallery(root)
    assert scan.root == root.resolve()
    assert scan.paths == ["cats/a.jpg", "cats/b.png", "dogs/sub/c.jpg", "top.jpg"]
    assert scan.skipped == [".DS_Store", ".thumbnails/", "cats/.hidden.jpg", "notes.txt"]
    st = os.stat(root / "cats" / "a.jpg")
    assert scan.files[0] == ("cats/a.jpg", st.st_size, st.st_mtime_ns)


def test_scan_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        gallery.scan_gallery(tmp_path / "missing")
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        gallery.scan_gallery(tmp_path / "file.jpg")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="the folder is empty"):
        gallery.scan_gallery(tmp_path / "empty")
    texts = tmp_path / "texts"
    texts.mkdir()
    for name in ("a.txt", "b.csv", ".c.jpg"):
        (texts / name).write_text("x")
    with pytest.raises(ValueError, match=r"3 files, none an image \(\.jpg, \.jpeg, \.png"):
        gallery.scan_gallery(texts)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_symlinks_outside_the_root_are_not_indexed(tmp_path):
    root = make_folder(tmp_path / "g")
    secret = write_image(tmp_path / "outside" / "secret.jpg", 5)
    os.symlink(secret, root / "cats" / "link_out.jpg")
    os.symlink(tmp_path / "outside", root / "linked_dir")
    os.symlink(root / "top.jpg", root / "dogs" / "link_in.jpg")  # stays inside: indexed
    scan = gallery.scan_gallery(root)
    assert "cats/link_out.jpg" in scan.skipped and "linked_dir/" in scan.skipped
    assert not any("secret" in p or "link_out" in p for p in scan.paths)
    assert "dogs/link_in.jpg" in scan.paths


# ============ building and updating ============


def test_from_scratch_build(model, tmp_path):
    root = make_folder(tmp_path / "g")
    (root / "notes.txt").write_text("x")
    index_path = tmp_path / "gallery.npz"
    index, report = update(model, root, index_path)
    assert report["added"] == report["embedded"] == 4 and report["written"]
    assert (report["changed"], report["removed"], report["unchanged"], report["unreadable"]) == (0, 0, 0, 0)
    assert report["skipped_non_images"] == 1 and report["skipped"] == ["notes.txt"]
    assert index.paths == ["cats/a.jpg", "cats/b.png", "dogs/sub/c.jpg", "top.jpg"]
    # categories from the first folder level; an image directly in root: "(top level)"
    assert index.categories == ["(top level)", "cats", "dogs"]
    assert index.super_ids.tolist() == [2, 2, 3, 1]
    # the product only two levels down (<category>/<product>/<image>), as a training tree has it
    assert index.product_ids == ["", "", "dogs/sub", ""] and index.class_ids.tolist() == [0, 1, 2, 3]
    assert index.checkpoint_hash == KEY
    assert index.meta["gallery"]["root"] == str(root.resolve())
    for i, rel in enumerate(index.paths):
        st = os.stat(root / rel)
        assert index.file_stats[i].tolist() == [st.st_size, st.st_mtime_ns]
        np.testing.assert_allclose(index.embeddings[i], reference_embedding(model, root / rel), atol=1e-5)
    loaded = GalleryIndex.load(index_path)
    assert loaded.paths == index.paths and loaded.categories == index.categories
    np.testing.assert_array_equal(loaded.file_stats, index.file_stats)
    np.testing.assert_array_equal(loaded.embeddings, index.embeddings)
    # searchable: each image finds itself first
    _, idx = loaded.search(loaded.embeddings, k=1)
    assert idx[:, 0].tolist() == [0, 1, 2, 3]


def test_added_files_alone_are_embedded(model, tmp_path, spy_embed):
    root = make_folder(tmp_path / "g")
    index_path = tmp_path / "gallery.npz"
    before, _ = update(model, root, index_path)
    write_image(root / "cats" / "new1.jpg", 11)
    write_image(root / "birds" / "new2.jpg", 12)
    after, report = update(model, root, index_path)
    assert spy_embed[-1] == ["new2.jpg", "new1.jpg"]  # in path order: birds/ < cats/
    assert (report["added"], report["embedded"], report["unchanged"], report["changed"]) == (2, 2, 4, 0)
    assert after.paths == sorted(before.paths + ["cats/new1.jpg", "birds/new2.jpg"])
    assert after.categories == ["(top level)", "birds", "cats", "dogs"]
    old, new = rows_by_path(before), rows_by_path(after)
    for rel in before.paths:
        assert new[rel].tobytes() == old[rel].tobytes()


def test_changed_file_is_reembedded(model, tmp_path):
    root = make_folder(tmp_path / "g")
    index_path = tmp_path / "gallery.npz"
    before, _ = update(model, root, index_path)
    write_image(root / "cats" / "a.jpg", 99)
    bump_mtime(root / "cats" / "a.jpg")
    after, report = update(model, root, index_path)
    assert (report["changed"], report["embedded"], report["unchanged"], report["added"]) == (1, 1, 3, 0)
    row = after.paths.index("cats/a.jpg")
    assert not np.allclose(after.embeddings[row], before.embeddings[row], atol=1e-3)
    np.testing.assert_allclose(after.embeddings[row], reference_embedding(model, root / "cats/a.jpg"), atol=1e-5)
    assert after.file_stats[row, 1] == os.stat(root / "cats/a.jpg").st_mtime_ns


def test_removed_files_are_dropped(model, tmp_path):
    root = make_folder(tmp_path / "g")
    index_path = tmp_path / "gallery.npz"
    update(model, root, index_path)
    os.remove(root / "dogs" / "sub" / "c.jpg")
    after, report = update(model, root, index_path)
    assert (report["removed"], report["embedded"], report["unchanged"]) == (1, 0, 3)
    assert after.paths == ["cats/a.jpg", "cats/b.png", "top.jpg"]
    assert after.categories == ["(top level)", "cats"]  # no image of dogs left
    assert GalleryIndex.load(index_path).paths == after.paths


def test_incremental_equals_from_scratch(model, tmp_path):
    root = make_folder(tmp_path / "g")
    incremental = tmp_path / "incremental.npz"
    update(model, root, incremental)
    write_image(root / "dogs" / "d.jpg", 21)
    write_image(root / "aaa.png", 22)
    os.remove(root / "cats" / "b.png")
    write_image(root / "top.jpg", 23)
    bump_mtime(root / "top.jpg")
    inc, report = update(model, root, incremental)
    assert report["embedded"] == 3 and report["unchanged"] == 2
    scratch, _ = update(model, root, tmp_path / "scratch.npz", batch_size=64)
    assert inc.paths == scratch.paths == ["aaa.png", "cats/a.jpg", "dogs/d.jpg", "dogs/sub/c.jpg", "top.jpg"]
    np.testing.assert_allclose(inc.embeddings, scratch.embeddings, atol=1e-6, rtol=0)
    assert inc.categories == scratch.categories and inc.super_ids.tolist() == scratch.super_ids.tolist()
    np.testing.assert_array_equal(inc.file_stats, scratch.file_stats)


def test_no_change_rerun_embeds_nothing_and_keeps_the_file(model, tmp_path, spy_embed):
    root = make_folder(tmp_path / "g")
    index_path = root / "gallery.npz"  # inside the folder: never indexed nor counted
    update(model, root, index_path)
    data, mtime = index_path.read_bytes(), os.stat(index_path).st_mtime_ns
    index, report = update(model, root, index_path)
    assert len(spy_embed) == 1  # only the first build embedded
    assert (report["embedded"], report["unchanged"], report["skipped_non_images"]) == (0, 4, 0)
    assert not report["written"] and report["images_per_s"] == 0.0
    assert index_path.read_bytes() == data and os.stat(index_path).st_mtime_ns == mtime
    assert "gallery.npz" not in index.paths


def test_model_key_change_rebuilds_everything(model, tmp_path, caplog):
    root = make_folder(tmp_path / "g")
    index_path = tmp_path / "gallery.npz"
    update(model, root, index_path)
    torch.manual_seed(1)
    other = models.build_model("resnet18", weights="none", image_size=IMAGE_SIZE).eval()
    with caplog.at_level(logging.INFO, logger="gallery"):
        index, report = update(other, root, index_path, key="another-checkpoint")
    assert report["embedded"] == 4 and report["unchanged"] == 0
    assert "another-checkpoint" in report["rebuild"] and "Rebuilding" in caplog.text
    assert index.checkpoint_hash == "another-checkpoint"
    np.testing.assert_allclose(index.embeddings[0], reference_embedding(other, root / "cats/a.jpg"), atol=1e-5)
    # force=True embeds everything even with the same key
    _, report = update(other, root, index_path, key="another-checkpoint", force=True)
    assert report["embedded"] == 4 and report["rebuild"] == "force=True"


def test_foreign_or_damaged_index_or_other_root_rebuilds(model, tmp_path):
    root = make_folder(tmp_path / "g")
    index_path = tmp_path / "gallery.npz"
    index_path.write_bytes(b"not an npz file")
    index, report = update(model, root, index_path)
    assert report["embedded"] == 4 and "could not be read" in report["rebuild"]
    # an SOP-style index (no file stats, no gallery record): rebuilt, not trusted
    GalleryIndex(
        index.embeddings,
        index.paths,
        index.class_ids,
        index.super_ids,
        checkpoint_hash=KEY,
        categories=index.categories,
    ).save(index_path)
    _, report = update(model, root, index_path)
    assert report["embedded"] == 4 and "not a folder-gallery index" in report["rebuild"]
    # the same index file used for a copy of the folder elsewhere
    copy = make_folder(tmp_path / "copy")
    _, report = update(model, copy, index_path)
    assert report["embedded"] == 4 and "built for folder" in report["rebuild"]


def test_unreadable_images_are_skipped_counted_and_not_retried(model, tmp_path, spy_embed, caplog):
    root = make_folder(tmp_path / "g")
    (root / "cats" / "zero.jpg").write_bytes(b"")
    good = (root / "top.jpg").read_bytes()
    (root / "cats" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    write_image(root / "dogs" / "truncated.jpg", 7, fmt="JPEG")
    data = (root / "dogs" / "truncated.jpg").read_bytes()
    (root / "dogs" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "fake.png").write_text("this is not a PNG")
    index_path = tmp_path / "gallery.npz"
    with caplog.at_level(logging.WARNING, logger="gallery"):
        index, report = update(model, root, index_path)
    bad = ["cats/truncated.jpg", "cats/zero.jpg", "dogs/truncated.jpg", "fake.png"]
    assert report["unreadable"] == 4 and report["unreadable_paths"] == bad
    assert report["embedded"] == 4 and index.paths == ["cats/a.jpg", "cats/b.png", "dogs/sub/c.jpg", "top.jpg"]
    assert all(b in caplog.text for b in bad) and "zero-byte" in caplog.text
    # unchanged bad files: not retried, still reported
    _, report = update(model, root, index_path)
    assert len(spy_embed) == 1 and report["unreadable"] == 4 and not report["written"]
    # a bad file repaired: retried (and indexed) because its size / mtime changed
    write_image(root / "cats" / "zero.jpg", 8, fmt="JPEG")
    bump_mtime(root / "cats" / "zero.jpg")
    index, report = update(model, root, index_path)
    assert spy_embed[-1] == ["zero.jpg"] and report["embedded"] == 1 and report["unreadable"] == 3
    assert "cats/zero.jpg" in index.paths


def test_no_readable_image_raises_and_writes_nothing(model, tmp_path):
    root = tmp_path / "g"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"")
    (root / "b.png").write_text("not a png")
    index_path = tmp_path / "gallery.npz"
    with pytest.raises(ValueError, match="none of its 2 images could be read"):
        update(model, root, index_path)
    assert not index_path.exists()
    (root / "a.jpg").unlink()
    (root / "b.png").unlink()
    with pytest.raises(ValueError, match="the folder is empty"):
        update(model, root, index_path)
    (root / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="none an image"):
        update(model, root, index_path)
    assert not index_path.exists() and os.listdir(tmp_path) == ["g"]


@pytest.mark.parametrize("error", [RuntimeError("out of memory"), KeyboardInterrupt()])
def test_failure_while_embedding_leaves_the_previous_index(model, tmp_path, monkeypatch, error):
    root = make_folder(tmp_path / "g")
    index_path = tmp_path / "gallery.npz"
    update(model, root, index_path)
    data = index_path.read_bytes()
    write_image(root / "cats" / "new.jpg", 31)

    def crash(*args, **kwargs):
        raise error

    monkeypatch.setattr(extraction, "extract_embeddings", crash)
    with pytest.raises(type(error)):
        update(model, root, index_path)
    assert index_path.read_bytes() == data
    assert sorted(os.listdir(tmp_path)) == ["g", "gallery.npz"]  # no temporary file left


def test_approximate_index_needs_faiss_before_embedding(model, tmp_path, monkeypatch, spy_embed):
    root = make_folder(tmp_path / "g")

    def missing(what="an approximate index"):
        raise ImportError(f"{what} needs faiss, which is not installed")

    monkeypatch.setattr(ann, "require_faiss", missing)
    with pytest.raises(ImportError, match="'ivf' needs faiss"):
        update(model, root, tmp_path / "gallery.npz", index_type="ivf")
    assert spy_embed == [] and not (tmp_path / "gallery.npz").exists()


def test_approximate_index_type_reuses_embeddings(model, tmp_path, spy_embed):
    pytest.importorskip("faiss")
    root = make_folder(tmp_path / "g")
    index_path = tmp_path / "gallery.npz"
    exact, _ = update(model, root, index_path)
    _, report = update(model, root, index_path, index_type="hnsw")
    assert report["embedded"] == 0 and report["written"] and len(spy_embed) == 1
    loaded = GalleryIndex.load(index_path)
    assert loaded.index_type == "hnsw"
    np.testing.assert_array_equal(loaded.embeddings, exact.embeddings)
    _, idx = loaded.search(loaded.embeddings, k=1)
    assert idx[:, 0].tolist() == [0, 1, 2, 3]


def test_gallery_index_file_stats_shape_is_checked():
    with pytest.raises(ValueError, match=r"file_stats must be \[2, 2\]"):
        GalleryIndex(
            np.eye(2, dtype=np.float32), ["a", "b"], [0, 1], [1, 1], categories=["x"], file_stats=np.zeros((3, 2))
        )


def test_zero_shot_model_key():
    assert (
        models.zero_shot_model_key("efficientnet_lite0", "imagenet", 224)
        == "zero_shot:zero_shot_efficientnet_lite0_224px"
    )


def test_loader_workers_give_the_same_index(model, tmp_path):
    """The dataset is pickled into worker processes (the app's default on any machine)."""
    root = make_folder(tmp_path / "g")
    (root / "bad.jpg").write_bytes(b"")
    serial, _ = update(model, root, tmp_path / "serial.npz")
    parallel, report = update(model, root, tmp_path / "parallel.npz", workers=1)
    assert parallel.paths == serial.paths and report["unreadable_paths"] == ["bad.jpg"]
    np.testing.assert_allclose(parallel.embeddings, serial.embeddings, atol=1e-6, rtol=0)


def test_two_level_folder_gives_each_result_its_product(model, tmp_path):
    """DIR/<category>/<product>/<image>, the layout of a training tree: the product id is the
    product folder's path, as training names it, and the search results carry it."""
    from search import engine as search_engine

    root = tmp_path / "shop"
    for i, rel in enumerate(["chairs/sku-1/front.jpg", "chairs/sku-1/side.jpg", "lamps/l 2/a.jpg"]):
        write_image(root / rel, i)
    index, _ = update(model, root, tmp_path / "shop.npz")
    assert index.product_ids == ["chairs/sku-1", "chairs/sku-1", "lamps/l 2"]
    engine = search_engine.SearchEngine(model, index, root)
    out = engine.search_file(root / "chairs/sku-1/front.jpg", k=3)
    by_path = {r["catalogue_path"]: r["product_id"] for r in out["results"]}
    assert by_path == {
        "chairs/sku-1/front.jpg": "chairs/sku-1",
        "chairs/sku-1/side.jpg": "chairs/sku-1",
        "lamps/l 2/a.jpg": "lamps/l 2",
    }
    assert gallery.product_of("a/b/c/d.jpg") == "" and gallery.product_of("top.jpg") == ""
