"""Tests for datasets.py: SOP parsing, splits, transforms, samplers, corrupt images, the
synthetic generator, download, resize and the command line. CPU only, tiny data."""

import collections
import hashlib
import io
import logging
from pathlib import Path
import re
import shutil
import socket
import time
import urllib.error
import zipfile

import numpy as np
from PIL import Image
import pytest
import torch
import torchvision.transforms as T

from dataio import catalogue, fileio, photos, prepare_data, splits, synthetic_sop
import datasets
import loaders
import preprocessing
import samplers

HEADER = "image_id class_id super_class_id path\n"


def run_cli(*argv):
    return datasets.main(datasets.get_args_parser().parse_args([str(a) for a in argv]))


def tree_digest(root):
    """{relative path: sha256} of every file under root."""
    root = Path(root)
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ============ parsing and errors for bad input ============


def test_read_ebay_file(synthetic_root):
    train = catalogue.read_ebay_file(synthetic_root / "Ebay_train.txt")
    test = catalogue.read_ebay_file(synthetic_root / "Ebay_test.txt")
    assert train.image_ids.tolist() == list(range(1, len(train.image_ids) + 1))
    assert train.class_ids.dtype == np.int64 and train.super_ids.dtype == np.int64
    assert set(np.unique(train.class_ids)) == set(range(1, 31))  # 60 products: 30 + 30
    assert set(np.unique(test.class_ids)) == set(range(31, 61))
    for sid, rel in zip(train.super_ids, train.rel_paths):
        assert rel.startswith(catalogue.SOP_CATEGORIES[sid - 1] + "_final/")


@pytest.mark.parametrize(
    "lines, match",
    [
        (["1 1 1 bicycle_final/a_0.JPG", "2 1 1"], r"Ebay_train\.txt:3: expected 4 fields"),
        (["1 1 1 bicycle_final/a_0.JPG", "2 x 1 bicycle_final/a_1.JPG"], r"Ebay_train\.txt:3: .*integers"),
        (["1 1 13 bicycle_final/a_0.JPG"], r"Ebay_train\.txt:2: super_class_id 13"),
        (["1 1 1 bicycle_final/a_0.JPG", "2 1 1 bicycle_final/a_0.JPG"], r"listed more than once"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, lines, match):
    (tmp_path / "Ebay_train.txt").write_text(HEADER + "\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=match):
        catalogue.read_ebay_file(tmp_path / "Ebay_train.txt")
    with pytest.raises(ValueError, match=match):
        datasets.SOPDataset(tmp_path, "train", check_files=False)


def test_wrong_header(tmp_path):
    (tmp_path / "Ebay_train.txt").write_text("id class path\n1 1 a.JPG\n")
    with pytest.raises(ValueError, match=r"Ebay_train\.txt:1: expected the header"):
        catalogue.read_ebay_file(tmp_path / "Ebay_train.txt")


def test_missing_root_names_path_and_command(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        datasets.SOPDataset(missing, "train")
    assert str(missing) in str(err.value)
    assert "python datasets.py download --root data/" in str(err.value)
    assert "python datasets.py synthetic --root data/synthetic_sop" in str(err.value)


def test_missing_ebay_files(tmp_path):
    # an empty folder is no catalogue of any layout: the error says which layouts it could be
    with pytest.raises(
        ValueError,
        match=r"holds no catalogue: nothing.*<category>/<product>/<image>"
        r".*catalogue\.csv.*datasets\.py download",
    ):
        datasets.SOPDataset(tmp_path, "train")
    (tmp_path / "Ebay_train.txt").write_text(HEADER)
    with pytest.raises(FileNotFoundError, match=r"Ebay_test\.txt not found.*datasets\.py download"):
        datasets.SOPDataset(tmp_path, "test")


def test_missing_images_counted_and_listed(synthetic_copy):
    ds = datasets.SOPDataset(synthetic_copy, "test")
    for p in ds.paths[:3]:
        Path(p).unlink()
    with pytest.raises(FileNotFoundError) as err:
        datasets.SOPDataset(synthetic_copy, "test")
    msg = str(err.value)
    assert f"3 of {len(ds)} images" in msg and Path(ds.paths[0]).name in msg


def test_root_may_be_parent_of_stanford_online_products(synthetic_root, tmp_path):
    (tmp_path / "Stanford_Online_Products").symlink_to(synthetic_root)
    ds = datasets.SOPDataset(tmp_path, "test")
    assert len(ds) == len(datasets.SOPDataset(synthetic_root, "test"))


def test_unknown_split(synthetic_root):
    with pytest.raises(ValueError, match="train, val, test, trainval"):
        datasets.SOPDataset(synthetic_root, "validation")


# ============ splits ============


def test_validation_split_product_disjoint_seeded(synthetic_root):
    trainval = datasets.SOPDataset(synthetic_root, "trainval")
    train = datasets.SOPDataset(synthetic_root, "train")
    val = datasets.SOPDataset(synthetic_root, "val")
    test = datasets.SOPDataset(synthetic_root, "test")
    assert len(train) + len(val) == len(trainval)
    assert sorted(train.paths + val.paths) == sorted(trainval.paths)
    assert not set(train.class_ids) & set(val.class_ids)
    assert not set(trainval.class_ids) & set(test.class_ids)
    drawn = {p for p in set(trainval.product_ids) if splits.split_draw(p, 0, "val") < 0.1}
    assert set(val.product_ids) == drawn and len(drawn) == 2  # the val draw of 30 products
    again = datasets.SOPDataset(synthetic_root, "val")
    other = datasets.SOPDataset(synthetic_root, "val", split_seed=1)
    assert again.paths == val.paths and set(other.class_ids) != set(val.class_ids)


def test_split_validation_fraction_on_sop_sized_ids():
    rng = np.random.default_rng(0)
    class_ids = np.repeat(np.arange(1, 11319), rng.integers(2, 10, 11318))
    is_val = splits.split_validation(class_ids, 0.1, seed=0)
    # a Bernoulli draw per product: Binomial(11318, 0.1) = 1,132 +- 32 (the original project's 1,132)
    assert abs(len(np.unique(class_ids[is_val])) - 1132) < 4 * 32
    assert not set(class_ids[is_val]) & set(class_ids[~is_val])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        splits.split_validation(class_ids, 1.5)


# ============ images and transforms ============


def test_build_transform_matches_spec():
    train = preprocessing.build_transform(224, train=True).transforms
    assert [type(t) for t in train] == [
        T.Resize,
        T.RandomResizedCrop,
        T.RandomHorizontalFlip,
        T.ColorJitter,
        T.RandomRotation,
        T.ToTensor,
        T.Normalize,
    ]
    assert tuple(train[0].size) == (256, 256) and train[1].scale == (0.8, 1.0)
    assert train[3].brightness == (0.8, 1.2) and train[4].degrees == [-15.0, 15.0]
    ev = preprocessing.build_transform(224).transforms
    assert [type(t) for t in ev] == [T.Resize, T.CenterCrop, T.ToTensor, T.Normalize]
    assert tuple(ev[0].size) == (256, 256)
    assert tuple(preprocessing.build_transform(64).transforms[0].size) == (73, 73)  # round(64*256/224)
    img = Image.new("RGB", (90, 50), (200, 10, 10))
    assert preprocessing.build_transform(48)(img).shape == (3, 48, 48)
    assert preprocessing.build_transform(48, train=True)(img).shape == (3, 48, 48)


def test_load_image_modes_and_exif(tmp_path):
    Image.new("P", (20, 10)).save(tmp_path / "p.png")
    rgba = Image.new("RGBA", (20, 10), (255, 0, 0, 0))
    rgba.save(tmp_path / "rgba.png")
    Image.new("LA", (20, 10), (50, 128)).save(tmp_path / "la.png")
    Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    Image.fromarray(np.full((10, 20), 65535, np.uint16)).save(tmp_path / "i16.png")
    for name in ("p.png", "rgba.png", "la.png", "cmyk.jpg", "i16.png"):
        im = photos.load_image(tmp_path / name)
        assert im.mode == "RGB" and im.size == (20, 10), name
    assert photos.load_image(tmp_path / "rgba.png").getpixel((0, 0)) == (255, 255, 255)  # onto white
    assert photos.load_image(tmp_path / "i16.png").getpixel((0, 0)) == (255, 255, 255)  # rescaled
    r, g, b = photos.load_image(tmp_path / "cmyk.jpg").getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    Image.new("RGB", (40, 20)).save(tmp_path / "rot.jpg", exif=exif)
    assert photos.load_image(tmp_path / "rot.jpg").size == (20, 40)


def test_load_image_draft_decodes_at_reduced_scale(tmp_path):
    Image.new("RGB", (1200, 800), (10, 200, 30)).save(tmp_path / "big.jpg")
    assert photos.load_image(tmp_path / "big.jpg").size == (1200, 800)
    small = photos.load_image(tmp_path / "big.jpg", size=256)
    assert small.size == (600, 400)  # min(1200 // 256, 800 // 256) = 3 → 1/2 scale
    assert min(small.size) >= 256  # never below the resize target
    assert photos.load_image(tmp_path / "big.jpg", size=100).size == (150, 100)  # 1/8


def test_dataset_items_and_draft_size(synthetic_root):
    ds = datasets.SOPDataset(synthetic_root, "train", transform=preprocessing.build_transform(32))
    assert ds.load_size == preprocessing.resize_size(32) == 37
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and isinstance(y, int) and y == ds.class_ids[0]
    raw = datasets.SOPDataset(synthetic_root, "train")
    img, _ = raw[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and raw.load_size is None
    assert all(Path(p).is_absolute() for p in ds.paths) and len(ds.rel_paths) == len(ds)


# ============ corrupt images ============


def _damage(paths):
    """Zero-byte, truncated and not-an-image files with a .JPG name."""
    Path(paths[0]).write_bytes(b"")
    data = Path(paths[1]).read_bytes()
    Path(paths[1]).write_bytes(data[: len(data) // 2])
    Path(paths[2]).write_text("<html>404 not found</html>")


def _first_images_of_distinct_products(ds, n):
    out, seen = [], set()
    for i, c in enumerate(ds.class_ids):
        if c not in seen:
            seen.add(c)
            out.append(i)
    return out[:n]


def test_corrupt_images_substituted_logged_counted(synthetic_copy, caplog):
    ds = datasets.SOPDataset(synthetic_copy, "trainval", max_bad_fraction=0.05)
    bad = _first_images_of_distinct_products(ds, 3)
    _damage([ds.paths[i] for i in bad])
    with caplog.at_level(logging.WARNING, logger="datasets"):
        for i in bad:
            img, cls = ds[i]
            sibling = i + 1  # next image of the same product (file order)
            assert ds.class_ids[sibling] == cls
            expected = photos.load_image(ds.paths[sibling])
            assert np.array_equal(np.asarray(img), np.asarray(expected))
    assert ds.num_bad_images == 3
    assert ds.bad_paths == [ds.paths[i] for i in bad]
    for i in bad:
        assert ds.paths[i] in caplog.text
    scanned = photos.scan_bad_images(ds.paths, workers=0, progress=False)
    assert [p for p, _ in scanned] == ds.bad_paths
    assert [reason.split(":")[0] for _, reason in scanned] == ["zero-byte file", "OSError", "UnidentifiedImageError"]


def test_bad_image_count_visible_with_dataloader_workers(synthetic_copy):
    ds = datasets.SOPDataset(synthetic_copy, "test", transform=preprocessing.build_transform(32), max_bad_fraction=0.05)
    bad = _first_images_of_distinct_products(ds, 2)
    _damage([ds.paths[i] for i in bad] + [ds.paths[-1]])  # third one unused
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(ds, list(range(len(ds) - 1))), batch_size=32, num_workers=2
    )
    labels = torch.cat([y for _, y in loader])
    assert labels.tolist() == ds.class_ids[:-1].tolist()
    assert ds.num_bad_images == 2 and set(ds.bad_paths) == {ds.paths[i] for i in bad}


def test_more_than_one_percent_bad_raises_listing_them(synthetic_copy):
    ds = datasets.SOPDataset(synthetic_copy, "trainval")
    bad = _first_images_of_distinct_products(ds, 6)  # ~3.5% of ~170 images
    for i in bad:
        Path(ds.paths[i]).write_bytes(b"")
    with pytest.raises(datasets.CorruptImagesError) as err:
        for i in range(len(ds)):
            ds[i]
    assert ds.paths[bad[0]] in str(err.value) and "datasets.py verify" in str(err.value)
    with pytest.raises(datasets.CorruptImagesError, match=r"6 of \d+ images"):
        datasets.SOPDataset(synthetic_copy, "trainval", check_images=True)


def test_all_images_of_a_product_bad(synthetic_copy):
    ds = datasets.SOPDataset(synthetic_copy, "test", max_bad_fraction=0.5)
    members = np.flatnonzero(ds.class_ids == ds.class_ids[0])
    for i in members:
        Path(ds.paths[i]).write_bytes(b"")
    with pytest.raises(datasets.CorruptImagesError, match=f"every image of product {ds.class_ids[0]}"):
        ds[0]


# ============ samplers ============


def _class_ids(sizes):
    return np.repeat(np.arange(1, len(sizes) + 1), sizes)


def test_pk_sampler_batches_are_p_products_by_k_images():
    rng = np.random.default_rng(0)
    class_ids = _class_ids(rng.integers(2, 13, 200))
    sampler = samplers.PKSampler(class_ids, p=8, k=4, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == len(class_ids) // 32
    for batch in batches:
        counts = collections.Counter(class_ids[batch].tolist())
        assert len(batch) == 32 and len(counts) == 8 and set(counts.values()) == {4}
    seen = {i for b in batches for i in b}
    assert len(seen) > 0.8 * len(class_ids)  # about one pass over the images


def test_pk_sampler_small_classes_with_replacement():
    class_ids = _class_ids([2, 3, 2, 3, 2, 3, 8, 9])
    sampler = samplers.PKSampler(class_ids, p=4, k=4, seed=3)
    for batch in sampler.batches(0) + sampler.batches(1):
        counts = collections.Counter(class_ids[batch].tolist())
        assert len(counts) == 4 and set(counts.values()) == {4}
        for c in counts:
            members = [i for i in batch if class_ids[i] == c]
            if (class_ids == c).sum() < 4:
                assert len(set(members)) == (class_ids == c).sum()  # all of them, then repeats


def test_pk_sampler_deterministic_per_seed_and_epoch():
    class_ids = _class_ids(np.random.default_rng(1).integers(2, 13, 100))
    a, b = samplers.PKSampler(class_ids, 4, 4, seed=0), samplers.PKSampler(class_ids, 4, 4, seed=0)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)
    b.set_epoch(4)
    assert list(a) != list(b)
    assert list(a) != list(samplers.PKSampler(class_ids, 4, 4, seed=1).batches(3))
    a.set_epoch(3, start_batch=5)
    assert list(a) == b.batches(3)[5:] and len(a) == a.num_batches - 5


def test_pk_sampler_sharded_across_ranks():
    class_ids = _class_ids(np.random.default_rng(2).integers(2, 13, 120))
    shards = [samplers.PKSampler(class_ids, 4, 4, seed=0, num_replicas=3, rank=r) for r in range(3)]
    for s in shards:
        s.set_epoch(2)
    per_rank = [list(s) for s in shards]
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == len(class_ids) // 16 // 3
    as_tuples = [tuple(b) for rank in per_rank for b in rank]
    assert len(set(as_tuples)) == len(as_tuples)  # distinct batches on every rank
    with pytest.raises(ValueError, match="rank"):
        samplers.PKSampler(class_ids, 4, 4, num_replicas=2, rank=2)


def test_random_batch_sampler_reproduces_shuffled_batches():
    s = samplers.RandomBatchSampler(100, 16, seed=0)
    batches = list(s)
    assert len(batches) == len(s) == 7 and [len(b) for b in batches][-1] == 4
    assert sorted(i for b in batches for i in b) == list(range(100))
    assert batches == samplers.RandomBatchSampler(100, 16, seed=0).batches(0)
    s.set_epoch(1)
    assert list(s) != batches
    ranks = [samplers.RandomBatchSampler(100, 16, 0, num_replicas=2, rank=r) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 4
    assert {i for r in ranks for b in r for i in b} == set(range(100))


def test_build_batch_sampler_arguments():
    class_ids = _class_ids([2, 5, 7, 3] * 10)
    pk = samplers.build_batch_sampler("pk", class_ids, batch_size=16, images_per_class=4)
    assert isinstance(pk, samplers.PKSampler) and (pk.p, pk.k) == (4, 4)
    assert isinstance(samplers.build_batch_sampler("random", class_ids, 16, 4), samplers.RandomBatchSampler)
    with pytest.raises(ValueError, match="divisible by images_per_class=5"):
        samplers.build_batch_sampler("pk", class_ids, batch_size=16, images_per_class=5)
    with pytest.raises(ValueError, match=r"allowed range 2\.\.7"):
        samplers.build_batch_sampler("pk", class_ids, batch_size=16, images_per_class=8)
    with pytest.raises(ValueError, match="pk, random"):
        samplers.build_batch_sampler("balanced", class_ids, 16, 4)
    with pytest.raises(ValueError, match="needs P=100 products"):
        samplers.build_batch_sampler("pk", class_ids, batch_size=200, images_per_class=2)


def test_pk_sampler_in_dataloader(synthetic_root):
    ds = datasets.SOPDataset(synthetic_root, "train", transform=preprocessing.build_transform(32))
    sampler = samplers.build_batch_sampler("pk", ds.class_ids, 16, 4, seed=0)
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_sampler=sampler)))
    assert x.shape == (16, 3, 32, 32)
    assert sorted(collections.Counter(y.tolist()).values()) == [4, 4, 4, 4]


# ============ synthetic SOP ============


def test_synthetic_layout(synthetic_root):
    names = {p.name for p in synthetic_root.iterdir()}
    assert {"Ebay_train.txt", "Ebay_test.txt", "Ebay_info.txt", ".complete"} <= names
    assert {f"{c}_final" for c in catalogue.SOP_CATEGORIES} <= names
    assert (synthetic_root / "Ebay_train.txt").read_text().startswith(HEADER)
    info = catalogue.read_ebay_file(synthetic_root / "Ebay_info.txt")
    for split, ids in (("trainval", range(1, 31)), ("test", range(31, 61))):
        ds = datasets.SOPDataset(synthetic_root, split)
        assert set(ds.class_ids) == set(ids)
        assert set(ds.super_ids) == set(range(1, 13))  # every category in each split
        _, per_product = np.unique(ds.class_ids, return_counts=True)
        assert per_product.min() >= 2 and per_product.max() <= 12
        for rel, sid in zip(ds.rel_paths, ds.super_ids):
            assert re.fullmatch(rf"{catalogue.SOP_CATEGORIES[sid - 1]}_final/\d{{12}}_\d+\.JPG", rel)
        img = Image.open(ds.paths[0])
        assert img.format == "JPEG" and img.size == (48, 48)
    assert len(info.rel_paths) == len(list(synthetic_root.glob("*_final/*.JPG")))


def test_synthetic_deterministic_byte_identical(tmp_path):
    a = synthetic_sop.make_synthetic_sop(tmp_path / "a", num_products=24, image_size=32, seed=5, workers=0)
    b = synthetic_sop.make_synthetic_sop(tmp_path / "b", num_products=24, image_size=32, seed=5, workers=2)
    c = synthetic_sop.make_synthetic_sop(tmp_path / "c", num_products=24, image_size=32, seed=6, workers=0)
    assert tree_digest(a) == tree_digest(b)
    assert tree_digest(a) != tree_digest(c)


def test_synthetic_views_differ_and_sizes_range(tmp_path):
    root = synthetic_sop.make_synthetic_sop(tmp_path / "r", num_products=4, image_size="40-64", seed=0, workers=0)
    ds = datasets.SOPDataset(root, "trainval")
    sizes = {Image.open(p).size for p in ds.paths}
    assert all(40 <= w <= 64 and 40 <= h <= 64 for w, h in sizes) and len(sizes) > 1
    digests = {hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in ds.paths}
    assert len(digests) == len(ds)  # every photo a new view


def test_interrupted_generation_never_passes_for_complete(tmp_path, monkeypatch):
    calls = []
    real = synthetic_sop._write_product

    def dying(job):
        calls.append(job)
        if len(calls) == 5:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-generation
        return real(job)

    monkeypatch.setattr(synthetic_sop, "_write_product", dying)
    root = tmp_path / "syn"
    with pytest.raises(KeyboardInterrupt):
        synthetic_sop.make_synthetic_sop(root, num_products=12, image_size=32, workers=0)
    assert not root.exists() and list(tmp_path.iterdir()) == []  # temp folder removed
    # a SIGKILL leaves the temporary folder behind: it is not at root and not complete
    monkeypatch.setattr(synthetic_sop, "publish_dir", lambda tmp, final: None)
    synthetic_sop.make_synthetic_sop(root, num_products=12, image_size=32, workers=0)
    leftovers = list(tmp_path.iterdir())
    assert not root.exists() and len(leftovers) == 1 and leftovers[0].name.startswith(".syn.tmp-")
    monkeypatch.undo()
    assert not fileio.is_complete(root)
    assert fileio.is_complete(synthetic_sop.ensure_synthetic_sop(root, num_products=12, image_size=32, workers=0))


def test_ensure_synthetic_reuses_and_refuses_foreign_data(tmp_path, monkeypatch):
    root = synthetic_sop.ensure_synthetic_sop(tmp_path / "s", num_products=12, image_size=32, workers=0)
    monkeypatch.setattr(synthetic_sop, "make_synthetic_sop", lambda *a, **k: pytest.fail("regenerated"))
    assert synthetic_sop.ensure_synthetic_sop(root, num_products=12, image_size=32) == root
    monkeypatch.undo()
    # made with other settings: refused (named), the dataset stays; replace=True regenerates
    before = (root / "Ebay_train.txt").read_text()
    with pytest.raises(FileExistsError, match=r"other settings: num_products 12 \(wanted 10\)"):
        synthetic_sop.ensure_synthetic_sop(root, num_products=10, image_size=32, workers=0)
    assert (root / "Ebay_train.txt").read_text() == before and fileio.is_complete(root)
    synthetic_sop.ensure_synthetic_sop(root, num_products=10, image_size=32, workers=0, replace=True)
    assert fileio.read_marker(root)["num_products"] == 10
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a synthetic SOP"):
        synthetic_sop.make_synthetic_sop(foreign, num_products=4, image_size=32, workers=0)
    # an empty existing folder (e.g. pytest's tmp_path) is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    assert fileio.is_complete(synthetic_sop.make_synthetic_sop(empty, num_products=4, image_size=32, workers=0))


# ============ download ============


def _fake_sop_zip(src, path):
    with zipfile.ZipFile(path, "w") as zf:
        for f in sorted(Path(src).rglob("*")):
            if f.is_file() and f.name != ".complete":
                zf.write(f, f"Stanford_Online_Products/{f.relative_to(src)}")
    return path


def _check_offline_error(err, root):
    msg = str(err.value)
    assert str(root / "Stanford_Online_Products.zip") in msg and "by hand" in msg and "rerun" in msg
    assert not (root / "Stanford_Online_Products").exists()


def test_download_offline_fails_fast_with_instructions(tmp_path, monkeypatch):
    def no_dns(host, port, *a, **k):
        raise socket.gaierror(-3, "Temporary failure in name resolution")

    monkeypatch.setattr(prepare_data.socket, "getaddrinfo", no_dns)
    t0 = time.perf_counter()
    with pytest.raises(prepare_data.DownloadError) as err:
        prepare_data.download_sop(tmp_path, progress=False)
    assert time.perf_counter() - t0 < 5
    _check_offline_error(err, tmp_path)
    assert run_cli("download", "--root", tmp_path) == 1


def test_download_unreachable_server(tmp_path, monkeypatch):
    def refused(request, timeout=None):
        assert timeout == 10.0  # the short default
        raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))

    monkeypatch.setattr(prepare_data.socket, "getaddrinfo", lambda *a, **k: [("addr",)])
    monkeypatch.setattr(prepare_data.urllib.request, "urlopen", refused)
    with pytest.raises(prepare_data.DownloadError) as err:
        prepare_data.download_sop(tmp_path, progress=False)
    _check_offline_error(err, tmp_path)


def test_download_hanging_dns_times_out(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_data.socket, "getaddrinfo", lambda *a, **k: time.sleep(3))
    t0 = time.perf_counter()
    with pytest.raises(prepare_data.DownloadError, match="no answer .* within 0.3 s"):
        prepare_data.download_sop(tmp_path, timeout=0.3, progress=False)
    assert time.perf_counter() - t0 < 2


def test_download_extracts_hand_placed_archive_and_checks_counts(tiny_synthetic_root, tmp_path):
    _fake_sop_zip(tiny_synthetic_root, tmp_path / "Stanford_Online_Products.zip")
    with pytest.raises(catalogue.DatasetError, match=r"Ebay_train\.txt has \d+ rows, expected 59,551"):
        prepare_data.download_sop(tmp_path, progress=False)
    assert not (tmp_path / "Stanford_Online_Products").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["Stanford_Online_Products.zip"]
    tv = datasets.SOPDataset(tiny_synthetic_root, "trainval", check_files=False)
    te = datasets.SOPDataset(tiny_synthetic_root, "test", check_files=False)
    expected = {"images": len(tv) + len(te), "train_rows": len(tv), "test_rows": len(te)}
    target = prepare_data.download_sop(tmp_path, expected=expected, progress=False)
    assert target == tmp_path / "Stanford_Online_Products" and fileio.is_complete(target)
    assert len(datasets.SOPDataset(tmp_path, "test")) == len(te)
    assert prepare_data.download_sop(tmp_path, expected=expected, progress=False) == target  # no-op


def _expected_counts(root):
    tv = catalogue.read_ebay_file(root / "Ebay_train.txt")
    te = catalogue.read_ebay_file(root / "Ebay_test.txt")
    return {
        "images": len(tv.rel_paths) + len(te.rel_paths),
        "train_rows": len(tv.rel_paths),
        "test_rows": len(te.rel_paths),
    }


def test_download_broken_off_then_resumed_with_range(tiny_synthetic_root, tmp_path, monkeypatch):
    payload = _fake_sop_zip(tiny_synthetic_root, tmp_path / "src.zip").read_bytes()
    root = tmp_path / "data"
    requests = []

    class Response(io.BytesIO):
        def __init__(self, body, status, break_after=None):
            super().__init__(body)
            self.status, self.headers = status, {"Content-Length": str(len(body))}
            self.break_after = break_after

        def read(self, n=-1):
            if self.break_after is not None and self.tell() >= self.break_after:
                raise ConnectionResetError("connection reset by peer")
            return super().read(min(n, 1000))

    def fake_urlopen(request, timeout=None):
        requests.append(request.get_header("Range"))
        start = int(request.get_header("Range")[6:-1]) if request.get_header("Range") else 0
        return Response(payload[start:], 206 if start else 200, 3000 if not start else None)

    monkeypatch.setattr(prepare_data, "_resolve_host", lambda url, timeout: None)
    monkeypatch.setattr(prepare_data.urllib.request, "urlopen", fake_urlopen)
    expected = _expected_counts(tiny_synthetic_root)
    with pytest.raises(prepare_data.DownloadError, match="rerun the same command to resume"):
        prepare_data.download_sop(root, expected=expected, progress=False)
    assert (root / "Stanford_Online_Products.zip.part").stat().st_size == 3000
    assert not (root / "Stanford_Online_Products.zip").exists()
    assert not (root / "Stanford_Online_Products").exists()
    prepare_data.download_sop(root, expected=expected, progress=False)
    assert requests == [None, "bytes=3000-"]
    assert (root / "Stanford_Online_Products.zip").read_bytes() == payload
    assert fileio.is_complete(root / "Stanford_Online_Products")


def test_download_accepts_folder_extracted_by_hand(tiny_synthetic_root, tmp_path):
    shutil.copytree(tiny_synthetic_root, tmp_path / "Stanford_Online_Products")
    (tmp_path / "Stanford_Online_Products" / ".complete").unlink()
    with pytest.raises(catalogue.DatasetError, match="exists but is incomplete.*expected 60,502"):
        prepare_data.download_sop(tmp_path, progress=False)
    target = prepare_data.download_sop(tmp_path, expected=_expected_counts(tiny_synthetic_root), progress=False)
    assert fileio.is_complete(target)


def test_download_rejects_damaged_archive(tmp_path):
    (tmp_path / "Stanford_Online_Products.zip").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(prepare_data.DownloadError, match="not a valid zip.*download it again"):
        prepare_data.download_sop(tmp_path, progress=False)


# ============ command line: stats, verify, resize, synthetic ============


def test_stats_cli_prints_table_and_saves_figure(synthetic_root, tmp_path, capsys):
    fig = tmp_path / "figs" / "stats.png"
    assert run_cli("stats", "--root", synthetic_root, "--output", fig) == 0
    out = capsys.readouterr().out
    assert "| Split | Images | Products | Categories | Avg. Images/Product |" in out
    rows, _ = datasets.dataset_stats(synthetic_root)
    assert rows["train"]["products"] == 28 and rows["val"]["products"] == 2  # the val draw of 30
    assert rows["total"]["products"] == 60 and rows["total"]["categories"] == 12
    assert rows["total"]["images"] == rows["train"]["images"] + rows["val"]["images"] + rows["test"]["images"]
    assert f"| Test | {rows['test']['images']:,} | 30 | 12 |" in out
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_verify_cli(synthetic_copy, capsys):
    assert run_cli("verify", "--root", synthetic_copy, "--workers", "0") == 0
    ds = datasets.SOPDataset(synthetic_copy, "test")
    _damage(ds.paths[:3])
    assert run_cli("verify", "--root", synthetic_copy, "--split", "test", "--workers", "2") == 1
    out = capsys.readouterr().out
    assert f"BAD {ds.paths[0]}: zero-byte file" in out
    assert ds.paths[1] in out and ds.paths[2] in out and "3 bad" in out


def test_resize_copy(tiny_synthetic_root, tmp_path):
    dst = tmp_path / "sop_40"
    assert run_cli("resize", "--root", tiny_synthetic_root, "--output", dst, "--size", 40, "--workers", 0) == 0
    assert fileio.is_complete(dst)
    for name in ("Ebay_train.txt", "Ebay_test.txt"):
        assert (dst / name).read_bytes() == (tiny_synthetic_root / name).read_bytes()
    ds = datasets.SOPDataset(dst, "test")
    assert {Image.open(p).size for p in ds.paths} == {(40, 40)}
    with pytest.raises(FileExistsError):
        prepare_data.resize_dataset(tiny_synthetic_root, tiny_synthetic_root.parent, size=40)


def test_synthetic_cli_and_help(tmp_path, capsys):
    assert run_cli("synthetic", "--root", tmp_path / "s", "--num_products", 12, "--image_size", 32, "--workers", 0) == 0
    assert "train +" in capsys.readouterr().out and fileio.is_complete(tmp_path / "s")
    with pytest.raises(SystemExit):
        datasets.get_args_parser().parse_args(["synthetic", "--help"])
    assert "--num_products" in capsys.readouterr().out


def test_loader_settings_follow_device_and_cpus():
    """The defaults train.py, evaluate.py and the demo use (measured in bench/bench_throughput)."""
    assert loaders.loader_settings("cpu", cpus=2) == {
        "num_workers": 1,
        "pin_memory": False,
        "persistent_workers": False,
        "prefetch_factor": 2,
    }
    assert loaders.loader_settings("cpu", cpus=16)["num_workers"] == 4
    gpu = loaders.loader_settings("cuda", cpus=64)
    assert gpu == {"num_workers": 16, "pin_memory": True, "persistent_workers": True, "prefetch_factor": 4}
    # explicit values win; no worker options without workers (DataLoader rejects them)
    assert loaders.loader_settings("cuda", cpus=8, workers=0) == {"num_workers": 0, "pin_memory": True}
    assert loaders.loader_settings("cuda", cpus=8, persistent_workers=False)["persistent_workers"] is False
    assert loaders.loader_settings("cpu", cpus=8, pin_memory=True)["pin_memory"] is False  # CPU: no pinning
    # (moved from tests/test_bench_throughput.py, where these settings used to live)
    assert loaders.loader_settings("cuda", cpus=16) == {
        "num_workers": 16,
        "pin_memory": True,
        "persistent_workers": True,
        "prefetch_factor": 4,
    }
    assert loaders.loader_settings("cpu", cpus=2, workers=0) == {"num_workers": 0, "pin_memory": False}


# ============ P×K batches on few products ============


def test_few_large_products_keep_the_batch_size_and_raise_k():
    """7 products of 500 images: batches of 64 need P=16 at K=4; K is raised to fit instead."""
    class_ids = np.repeat(np.arange(7), 500)
    for k in (4, 8):
        fitted, note = samplers.fit_images_per_class(class_ids, 64, k)
        assert fitted == 16 and "P=4 × K=16" in note and "batch size kept" in note
        sampler = samplers.build_batch_sampler("pk", class_ids, 64, fitted)
        batches = sampler.batches()
        assert all(len(b) == 64 and len(np.unique(class_ids[b])) == 4 for b in batches)
    assert samplers.fit_images_per_class(np.repeat(np.arange(30), 5), 64, 4) == (4, None)  # enough


@pytest.mark.parametrize(
    "class_ids, batch_size, match",
    [
        (np.repeat([3], 50), 64, "at least 2 products"),
        (np.repeat(np.arange(3), 3), 64, r"too few for batches of 64 .* use batch_size <= 9"),
        (np.repeat(np.arange(5), 40), 7, "no divisor P in 2..5"),
    ],
)
def test_a_pk_batch_that_cannot_be_made_says_why(class_ids, batch_size, match):
    with pytest.raises(ValueError, match=match):
        samplers.fit_images_per_class(class_ids, batch_size, 4)
