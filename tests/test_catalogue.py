"""The three catalogue layouts of catalogue.py (SOP's Ebay files, catalogue.csv, a folder tree):
detection, parsing, the seeded split, every bad input the README promises a clear error (or a
counted skip) for, `datasets.py convert`, and the same images giving identical metrics in
every layout."""

import json
import logging
from pathlib import Path
import shutil

from hypothesis import assume, given, settings
from hypothesis import strategies as st
import numpy as np
from PIL import Image
import pytest
from support import jpeg
import torch

import checkpoints
import data_stats
from dataio import catalogue, prepare_data, splits
import datasets
import models
import preprocessing
from training import evaluation


def write_csv(folder, text):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "catalogue.csv").write_text(text)
    return folder / "catalogue.csv"


def tree(folder, spec, seed=0):
    """spec: {"category/product": n_images} (or "product": n) → JPEGs under folder."""
    for j, (product, n) in enumerate(spec.items()):
        for i in range(n):
            jpeg(folder / product / f"{i}.jpg", seed=seed + 100 * j + i)
    return folder


# ============ detection and parsing ============


def test_detect_layout(tmp_path, tiny_synthetic_root):
    assert catalogue.detect_layout(tiny_synthetic_root) == (Path(tiny_synthetic_root).resolve(), "sop")
    write_csv(tmp_path / "c", "path,product_id,category\n")
    assert catalogue.detect_layout(tmp_path / "c")[1] == "csv"
    tree(tmp_path / "t", {"mugs/a": 2})
    assert catalogue.detect_layout(tmp_path / "t")[1] == "folder"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        catalogue.detect_layout(tmp_path / "nowhere")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        catalogue.detect_layout(tmp_path / "file.txt")


def test_csv_free_names_and_explicit_split(tmp_path):
    root = tmp_path / "shop"
    for i in range(6):
        jpeg(root / "img" / f"{i}.jpg", seed=i)
    write_csv(
        root,
        "path,product_id,category,split,price\n"
        "img/0.jpg,SKU-1,Kitchen & Dining,train,3\n"
        "img/1.jpg,SKU-1,Kitchen & Dining,train,3\n"
        "img/2.jpg,Bürostuhl 7,Office,train,9\n"
        "img/3.jpg,Bürostuhl 7,Office,train,9\n"
        "img/4.jpg,SKU-9,Office,test,1\n"
        "img/5.jpg,SKU-9,Office,test,1\n",
    )
    test = datasets.SOPDataset(root, "test")
    trainval = datasets.SOPDataset(root, "trainval")
    assert test.layout == "csv" and test.categories == ["Kitchen & Dining", "Office"]
    assert test.rel_paths == ["img/4.jpg", "img/5.jpg"] and test.product_ids == ["SKU-9", "SKU-9"]
    assert [test.categories[s - 1] for s in test.super_ids] == ["Office", "Office"]
    assert set(trainval.product_ids) == {"SKU-1", "Bürostuhl 7"}
    # class ids number the products of the whole catalogue, the same in every split
    assert len(set(trainval.class_ids.tolist()) | set(test.class_ids.tolist())) == 3


def test_folder_tree_with_and_without_categories(tmp_path):
    with_cats = tree(tmp_path / "a", {"Lamps/l1": 2, "Lamps/l2": 3, "Sofas/s1": 2, "Sofas/s2": 2})
    table = catalogue.scan_folder_tree(with_cats)
    assert table.categories == ["Lamps", "Sofas"]
    assert sorted(set(table.product_ids)) == ["Lamps/l1", "Lamps/l2", "Sofas/s1", "Sofas/s2"]
    flat = tree(tmp_path / "b", {"p1": 2, "p2": 2, "p3": 2})
    table = catalogue.scan_folder_tree(flat)
    assert table.categories == [catalogue.NO_CATEGORY] and set(table.super_ids.tolist()) == {1}


def test_seeded_split_is_product_disjoint_and_order_free(tmp_path):
    root = tree(tmp_path / "t", {f"c{j % 3}/p{j:02d}": 2 + j % 3 for j in range(20)})
    a = catalogue.scan_folder_tree(root, test_fraction=0.3)
    drawn = {p for p in set(a.product_ids) if splits.split_draw(p, catalogue.TEST_SPLIT_SEED, "test") < 0.3}
    assert set(np.asarray(a.product_ids)[a.is_test]) == drawn and 0 < len(drawn) < 20
    assert not set(np.asarray(a.product_ids)[a.is_test]) & set(np.asarray(a.product_ids)[~a.is_test])
    # the same products listed in another order draw the same test products
    rows = np.random.default_rng(0).permutation(len(a.rel_paths))
    b = catalogue.table_from_labels(
        [a.rel_paths[i] for i in rows],
        [a.product_ids[i] for i in rows],
        [a.categories[a.super_ids[i] - 1] for i in rows],
        None,
        0.3,
        "csv",
    )
    assert {p for p, t in zip(b.product_ids, b.is_test) if t} == {p for p, t in zip(a.product_ids, a.is_test) if t}
    c = catalogue.scan_folder_tree(root, test_fraction=0.6)
    assert c.is_test.sum() != a.is_test.sum()  # the flag is used


# ============ stable splits: a product's side depends on its id and the seed only ============

product_names = st.text(min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(
    kept=st.sets(product_names, min_size=0, max_size=40),
    changed=st.sets(product_names, min_size=1, max_size=20),
    fraction=st.sampled_from([0.1, 0.3, 0.5, 0.9]),
    seed=st.integers(0, 3),
    purpose=st.sampled_from(["test", "val"]),
)
def test_adding_or_removing_products_moves_no_other(kept, changed, fraction, seed, purpose):
    """The catalogue ``kept``, then grown by ``changed`` (or, read backwards, shrunk by it):
    every product of ``kept`` stays on its side. Only the tiny-catalogue guards (an empty or
    full draw) may depend on other products; both draws are checked without them."""

    def sides(products):
        ids = sorted(products)
        mask = (
            splits.split_products(ids, fraction, seed, purpose)
            if purpose == "test"
            else splits.split_validation(ids, fraction, seed)
        )
        return dict(zip(ids, mask.tolist()))

    def guarded(products):  # the raw draw is empty (2+ products) or takes every product
        raw = [splits.split_draw(p, seed, purpose) < fraction for p in products]
        return bool(raw) and (all(raw) or (len(raw) >= 2 and not any(raw)))

    assume(not guarded(kept) and not guarded(kept | changed))
    before, after = sides(kept), sides(kept | changed)
    assert all(before[p] == after[p] for p in kept)


def test_split_draw_is_the_documented_hash():
    import hashlib

    digest = hashlib.blake2b(b"val:7:chair/sku 1", digest_size=8).digest()
    assert splits.split_draw("chair/sku 1", 7, "val") == int.from_bytes(digest, "big") / 2**64
    # test and validation draws of one product are independent (not one threshold on one number)
    ids = [str(i) for i in range(2000)]
    test = splits.split_products(ids, 0.5, 0, "test")
    val = splits.split_validation(ids, 0.1, 0)
    assert 0.05 < val[test].mean() < 0.15 and 0.05 < val[~test].mean() < 0.15


def test_split_guards_for_tiny_catalogues():
    assert splits.split_products(["a", "b"], 0.001).sum() == 1  # never empty with fraction > 0
    assert splits.split_products(["a", "b", "c"], 0.999).sum() == 2  # never every product
    assert not splits.split_products(["a", "b", "c"], 0.0).any()  # 0: nothing drawn
    assert splits.split_products([], 0.5).shape == (0,)


def test_sop_validation_split_is_the_val_draw_of_its_product_ids(synthetic_root):
    trainval = datasets.SOPDataset(synthetic_root, "trainval")
    val = datasets.SOPDataset(synthetic_root, "val")
    expected = {p for p in set(trainval.product_ids) if splits.split_draw(p, 0, "val") < 0.1}
    assert set(val.product_ids) == (expected or set(val.product_ids)) and len(set(val.product_ids)) >= 1


def test_growing_a_folder_tree_keeps_every_products_split(tmp_path):
    root = tree(tmp_path / "t", {f"c{j % 2}/p{j:02d}": 2 for j in range(16)})
    before = datasets.SOPDataset(root, "test", check_files=False)
    val_before = datasets.SOPDataset(root, "val", check_files=False, val_fraction=0.3)
    tree(root, {f"c{j % 2}/new{j:02d}": 2 for j in range(10)}, seed=5000)
    after = datasets.SOPDataset(root, "test", check_files=False)
    val_after = datasets.SOPDataset(root, "val", check_files=False, val_fraction=0.3)
    old = {f"c{j % 2}/p{j:02d}" for j in range(16)}
    assert set(before.product_ids) == set(after.product_ids) & old
    assert set(val_before.product_ids) == set(val_after.product_ids) & old


# ============ bad input: a clear error naming file and line, or a counted skip ============


@pytest.mark.parametrize(
    "text, match",
    [
        ("path,category\na.jpg,x\n", r"catalogue\.csv:1: missing column\(s\) product_id"),
        ("path,product_id,category\na.jpg,,mugs\n", r"catalogue\.csv:2: empty product_id"),
        ("path,product_id,category\na.jpg,p,mugs\nb.jpg,p,\n", r"catalogue\.csv:3: empty category"),
        ("path,product_id,category\n../outside.jpg,p,mugs\n", r"catalogue\.csv:2: path '\.\./outside\.jpg' leaves"),
        ("path,product_id,category\n/etc/passwd,p,mugs\n", r"catalogue\.csv:2: path '/etc/passwd' leaves"),
        ("path,product_id,category\nimg/../../x.jpg,p,mugs\n", r"catalogue\.csv:2: path .* leaves"),
        (
            "path,product_id,category\na.jpg,p,mugs\nb.jpg,p,mugs\na.jpg,q,mugs\n",
            r"catalogue\.csv:4: image a\.jpg is listed again \(first on line 2\)",
        ),
        (
            "path,product_id,category\na.jpg,p,mugs\nb.jpg,p,lamps\n",
            r"catalogue\.csv:3: product 'p' has category 'lamps' here but 'mugs' on line 2",
        ),
        (
            "path,product_id,category,split\na.jpg,p,mugs,train\nb.jpg,p,mugs,test\n",
            r"catalogue\.csv:3: product 'p' has split 'test'",
        ),
        ("path,product_id,category,split\na.jpg,p,mugs,validation\n", r"catalogue\.csv:2: split 'validation'"),
        ("path,product_id,category\n", r"no images listed"),
    ],
)
def test_malformed_csv_names_file_and_line(tmp_path, text, match):
    write_csv(tmp_path, text)
    with pytest.raises(ValueError, match=match):
        datasets.SOPDataset(tmp_path, "test", check_files=False)


# ============ paths from label files and walks stay inside the data root ============

ATTACKS = ("dotdot", "absolute", "file_link", "folder_link")


def attack_catalogue(tmp_path, layout, attack):
    """A catalogue of ``layout`` at tmp_path/root whose one bad entry makes ``attack``, and the
    text its error must name (file:line for label files, the path for a tree)."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    jpeg(outside / "p" / "x.jpg", seed=9)
    for j in range(2):
        for i in range(2):
            jpeg(root / "mug_final" / f"m{j}" / f"{i}.jpg", seed=10 * j + i)
    bad = {
        "dotdot": "../outside/p/x.jpg",
        "absolute": str(outside / "p" / "x.jpg"),
        "file_link": "mug_final/m1/link.jpg",
        "folder_link": "linked_final/p/x.jpg",
    }[attack]
    if attack == "file_link":
        (root / "mug_final" / "m1" / "link.jpg").symlink_to(outside / "p" / "x.jpg")
    if attack == "folder_link":
        (root / "linked_final").symlink_to(outside, target_is_directory=True)
    good = [f"mug_final/m{j}/{i}.jpg" for j in range(2) for i in range(2)]
    if layout in ("sop_train", "sop_test"):
        name = "Ebay_train.txt" if layout == "sop_train" else "Ebay_test.txt"
        lines = [f"{k + 1} {1 + k // 2} 8 {p}" for k, p in enumerate(good)] + [f"5 3 8 {bad}"]
        (root / name).write_text("image_id class_id super_class_id path\n" + "\n".join(lines) + "\n")
        return root, rf"{name}:6: path '{bad}' "
    if layout == "csv":
        rows = [f"{p},m{k // 2},mugs" for k, p in enumerate(good)] + [f"{bad},evil,mugs"]
        write_csv(root, "path,product_id,category\n" + "\n".join(rows) + "\n")
        return root, rf"catalogue\.csv:6: path '{bad}' "
    return root, {"file_link": r"mug_final/m1/link\.jpg", "folder_link": r"linked_final"}[attack]


# a walked tree names no path of its own: only links can lead out of it
@pytest.mark.parametrize(
    "layout, attack",
    [
        (layout, attack)
        for layout in ("sop_train", "sop_test", "csv", "folder")
        for attack in ATTACKS
        if layout != "folder" or "link" in attack
    ],
)
def test_every_reader_refuses_paths_leading_out_of_the_data_root(tmp_path, layout, attack):
    root, where = attack_catalogue(tmp_path, layout, attack)
    split = "test" if layout == "sop_test" else "trainval"
    with pytest.raises(ValueError, match=where) as e:
        datasets.SOPDataset(root, split, check_files=False, test_fraction=0.5)
    assert "data root" in str(e.value) and "Copy the photos into the data root" in str(e.value)


def test_links_inside_the_data_root_are_allowed(tmp_path):
    root = tree(tmp_path / "t", {"mugs/a": 2, "mugs/b": 2})
    (root / "mugs" / "b" / "2.jpg").symlink_to(root / "mugs" / "a" / "0.jpg")
    table = catalogue.scan_folder_tree(root)
    assert "mugs/b/2.jpg" in table.rel_paths


def test_csv_not_utf8_names_file_line_and_byte(tmp_path):
    """A catalogue saved as Windows-1252 (Excel's plain "CSV") stops with the file, the line, the
    byte offset and what encoding is expected, not a bare codec error."""
    (tmp_path / "catalogue.csv").write_bytes(
        "path,product_id,category\na.jpg,p,mugs\nb.jpg,p,caf\u00e9\n".encode("cp1252")
    )
    offset = len(b"path,product_id,category\na.jpg,p,mugs\nb.jpg,p,caf")
    with pytest.raises(ValueError) as e:
        datasets.SOPDataset(tmp_path, "test", check_files=False)
    msg = str(e.value)
    assert f"{tmp_path / 'catalogue.csv'}:3: not UTF-8" in msg
    assert f"byte 0xe9 at offset {offset}" in msg and "UTF-8" in msg


def test_ebay_file_not_utf8_names_the_file(tmp_path):
    (tmp_path / "Ebay_train.txt").write_bytes(b"image_id class_id super_class_id path\n1 1 1 x\xff.jpg\n")
    with pytest.raises(ValueError, match=r"Ebay_train\.txt:2: not UTF-8 text \(byte 0xff at offset 45\)"):
        catalogue.read_ebay_file(tmp_path / "Ebay_train.txt")


def test_a_single_product_names_the_catalogue(tmp_path):
    write_csv(tmp_path, "path,product_id,category\na.jpg,p,mugs\nb.jpg,p,mugs\n")
    with pytest.raises(ValueError, match=r"catalogue\.csv: a catalogue needs at least 2 products"):
        datasets.SOPDataset(tmp_path, "test", check_files=False)
    tree(tmp_path / "t", {"mugs/p": 2})
    with pytest.raises(ValueError, match=rf"{tmp_path / 't'}: a catalogue needs at least 2 products"):
        datasets.SOPDataset(tmp_path / "t", "test", check_files=False)


def test_csv_listed_images_missing_are_counted(tmp_path):
    lines = ["path,product_id,category"] + [f"img/{i}.jpg,p{i // 2},mugs" for i in range(8)]
    write_csv(tmp_path, "\n".join(lines) + "\n")
    for i in range(8):
        jpeg(tmp_path / "img" / f"{i}.jpg", seed=i)
    ds = datasets.SOPDataset(tmp_path, "trainval")
    (tmp_path / ds.rel_paths[0]).unlink()
    (tmp_path / ds.rel_paths[1]).unlink()
    with pytest.raises(
        FileNotFoundError,
        match=r"2 of 4 images listed for split 'trainval' are missing"
        r".*img/",
    ):
        datasets.SOPDataset(tmp_path, "trainval")


def test_tree_skips_non_images_counted_and_listed_with_verbose(tmp_path, caplog):
    root = tree(tmp_path / "t", {"mugs/m1": 2, "mugs/m2": 2, "lamps/l1": 2, "lamps/l2": 2})
    (root / "mugs" / "m1" / "notes.txt").write_text("not a photo")
    (root / "mugs" / ".DS_Store").write_bytes(b"\0")
    jpeg(root / "stray.jpg")  # an image outside any product folder
    (root / ".hidden").mkdir()
    jpeg(root / ".hidden" / "x" / "y.jpg")  # hidden folders are not entered
    table = catalogue.scan_folder_tree(root)
    assert sorted(table.skipped) == ["mugs/.DS_Store", "mugs/m1/notes.txt", "stray.jpg"]
    assert len(table.rel_paths) == 8
    catalogue.set_verbose(False)
    with caplog.at_level(logging.INFO, logger="catalogue"):
        datasets.SOPDataset(root, "trainval")
    assert "skipped 3 files" in caplog.text and "stray.jpg" not in caplog.text.split("(--verbose")[1]
    caplog.clear()
    catalogue.set_verbose(True)
    try:
        datasets.SOPDataset(root, "trainval")
    finally:
        catalogue.set_verbose(False)
    assert all(f"skipped {rel}" in caplog.text for rel in table.skipped)


def test_tree_mixed_depths_and_empty(tmp_path):
    root = tree(tmp_path / "t", {"mugs/m1": 2, "p2": 2})
    with pytest.raises(
        ValueError,
        match=r"images lie at different depths \(2 levels: p2/0\.jpg; "
        r"3 levels: mugs/m1/0\.jpg\)",
    ):
        datasets.SOPDataset(root, "test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no catalogue: nothing"):
        datasets.SOPDataset(tmp_path / "empty", "test")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=r"holds no catalogue: 1 files, none an image"):
        datasets.SOPDataset(tmp_path / "docs", "test")


def test_single_image_product_kept_never_a_query(tmp_path):
    lines = ["path,product_id,category,split"]
    lines += [f"img/{i}.jpg,p{i // 2},mugs,test" for i in range(6)] + ["img/6.jpg,lonely,mugs,test"]
    lines += [f"img/t{i}.jpg,t{i // 2},mugs,train" for i in range(4)]
    write_csv(tmp_path, "\n".join(lines) + "\n")
    for name in [f"{i}" for i in range(7)] + [f"t{i}" for i in range(4)]:
        jpeg(tmp_path / "img" / f"{name}.jpg", seed=hash(name) % 1000)
    ds = datasets.SOPDataset(tmp_path, "test", transform=preprocessing.build_transform(32, train=False))
    assert len(ds) == 7 and ds.num_single_image_products == 1
    torch.manual_seed(0)
    model = models.build_model("resnet18", embedding_size=16, weights="none", image_size=32)
    results = evaluation.evaluate_model(
        model,
        ds,
        model_info={"run": "t"},
        write=True,
        workers=0,
        progress=False,
        num_examples=0,
        output=tmp_path / "eval",
    )
    evaluation.write_results(results, tmp_path / "eval")
    assert "1 products with a single image" in (tmp_path / "eval" / "results.md").read_text()
    assert results["data"]["single_image_products"] == 1
    assert results["data"]["num_images"] == 7
    assert results["num_queries"] == 7  # the category protocol queries with every image
    assert results["num_product_queries"] == 6  # the lonely image is in the gallery only


# ============ convert ============


def test_convert_sop_to_csv_and_folder(tmp_path, tiny_synthetic_root):
    csv_root = prepare_data.convert_catalogue(
        tiny_synthetic_root, tmp_path / "csv", "csv", from_layout="sop", progress=False
    )
    assert catalogue.detect_layout(csv_root)[1] == "csv"
    a, b = (datasets.SOPDataset(r, "test") for r in (tiny_synthetic_root, csv_root))
    assert a.rel_paths == b.rel_paths and a.product_ids == b.product_ids
    assert [a.categories[s - 1] for s in a.super_ids] == [b.categories[s - 1] for s in b.super_ids]
    folder = prepare_data.convert_catalogue(csv_root, tmp_path / "tree", "folder", progress=False)
    table = catalogue.scan_folder_tree(folder)
    assert len(table.rel_paths) == len(catalogue.read_catalogue(tiny_synthetic_root).rel_paths)
    assert set(table.categories) == set(catalogue.SOP_CATEGORIES)
    with pytest.raises(ValueError, match=r"holds a folder catalogue, not sop \(--from\)"):
        prepare_data.convert_catalogue(folder, tmp_path / "x", "csv", from_layout="sop")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        prepare_data.convert_catalogue(tiny_synthetic_root, tmp_path / "csv", "csv")


def test_convert_in_place_writes_only_the_csv(tmp_path):
    root = tree(tmp_path / "t", {"mugs/m1": 2, "mugs/m2": 2, "lamps/l1": 2, "lamps/l2": 2})
    before = catalogue.scan_folder_tree(root)
    rc = datasets.main(
        datasets.get_args_parser().parse_args(
            ["convert", "--root", str(root), "--to", "csv", "--output", str(root), "--no-split"]
        )
    )
    assert rc == 0 and (root / "catalogue.csv").read_text().startswith("path,product_id,category\n")
    after = datasets.SOPDataset(root, "test")  # now read as a CSV, the same split drawn
    assert after.layout == "csv"
    assert after.rel_paths == [p for p, t in zip(before.rel_paths, before.is_test) if t]


def test_convert_failure_leaves_nothing(tmp_path):
    root = tree(tmp_path / "t", {"mugs/m1": 2, "mugs/m2": 2})
    write_csv(root, "path,product_id,category\nmugs/m1/0.jpg,a,mugs\nmugs/m2/9.jpg,b,mugs\n")
    with pytest.raises(FileNotFoundError, match=r"m2/9\.jpg is listed .* but missing"):
        prepare_data.convert_catalogue(root, tmp_path / "out", "folder", progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_stats_on_free_categories(tmp_path):
    root = tree(tmp_path / "t", {f"{c}/p{j}": 2 + j % 2 for c in ("Gartenmöbel", "Kitchen & Dining") for j in range(4)})
    rows, sets = datasets.dataset_stats(root, val_fraction=0.25)
    assert rows["total"]["images"] == 20 and rows["total"]["categories"] == 2
    out = data_stats.plot_stats(sets, tmp_path / "stats.png")
    assert out.stat().st_size > 1000


# ============ the same images in each layout give identical metrics ============


def _metrics(ckpt, root, tmp_path, name):
    r = evaluation.evaluate_checkpoint(
        ckpt, data_root=root, output=tmp_path / name, workers=0, device="cpu", progress=False, num_examples=0
    )
    return {k: r[k] for k in ("product", "category", "num_queries", "per_category")}, r


@pytest.mark.slow
def test_identical_metrics_in_every_layout(tmp_path, synthetic_root):
    torch.manual_seed(0)
    model = models.build_model("resnet18", embedding_size=32, weights="none", image_size=48)
    ckpt = tmp_path / "ck" / "best.pth"
    checkpoints.atomic_save(
        checkpoints.make_checkpoint(model, args={"data_root": str(synthetic_root)}, epoch=1, metrics={}), ckpt
    )
    csv_root = prepare_data.convert_catalogue(synthetic_root, tmp_path / "as_csv", "csv", progress=False)
    sop, _ = _metrics(ckpt, synthetic_root, tmp_path, "sop")
    from_csv, r = _metrics(ckpt, csv_root, tmp_path, "csv")
    assert r["data"]["layout"] == "csv"
    assert from_csv == sop
    # a tree and a CSV without a split draw the same test products from the same product ids
    folder = prepare_data.convert_catalogue(csv_root, tmp_path / "as_tree", "folder", progress=False)
    csv_nosplit = prepare_data.convert_catalogue(
        folder, tmp_path / "tree_csv", "csv", write_split=False, progress=False
    )
    from_tree, r1 = _metrics(ckpt, folder, tmp_path, "tree")
    from_csv2, r2 = _metrics(ckpt, csv_nosplit, tmp_path, "csv2")
    assert r1["data"]["layout"] == "folder" and r2["data"]["layout"] == "csv"
    assert from_tree == from_csv2
    assert set(from_tree["per_category"]) <= set(catalogue.SOP_CATEGORIES)
    json.dumps(from_tree)  # results stay JSON


def test_sop_files_still_reject_categories_outside_sop(tmp_path):
    (tmp_path / "Ebay_train.txt").write_text("image_id class_id super_class_id path\n1 1 13 x/a.JPG\n")
    with pytest.raises(ValueError, match="outside 1..12 .*catalogue.csv or a folder tree"):
        datasets.SOPDataset(tmp_path, "train", check_files=False)
    shutil.rmtree(tmp_path)


@pytest.mark.parametrize("to_csv", [False, True])
def test_resize_copy_of_a_tree_or_csv(tmp_path, to_csv):
    root = tree(tmp_path / "t", {"mugs/m1": 2, "mugs/m2": 2, "lamps/l1": 3})
    if to_csv:
        prepare_data.convert_catalogue(root, root, "csv", progress=False)
    out = prepare_data.resize_dataset(root, tmp_path / "small", size=24, workers=0, progress=False)
    a, b = catalogue.read_catalogue(root), catalogue.read_catalogue(out)
    assert b.layout == ("csv" if to_csv else "folder")
    assert a.rel_paths == b.rel_paths and a.product_ids == b.product_ids
    assert (a.is_test == b.is_test).all()
    assert all(Image.open(out / p).size == (24, 24) for p in b.rel_paths)


def test_sop_layout_names_categories_after_their_folders(tmp_path, synthetic_root):
    # SOP itself: the folders are SOP's names
    assert datasets.SOPDataset(synthetic_root, "test").categories == catalogue.SOP_CATEGORIES
    # a folder of groceries in SOP's layout (super_class_id 1 under grocery_final/)
    (tmp_path / "Ebay_test.txt").write_text(
        "image_id class_id super_class_id path\n"
        "1 1 1 grocery_final/1_0.JPG\n2 1 1 grocery_final/1_1.JPG\n"
        "3 2 3 misc/2_0.JPG\n4 2 3 other/2_1.JPG\n"
    )
    ds = datasets.SOPDataset(tmp_path, "test", check_files=False)
    assert ds.categories[0] == "grocery"
    assert ds.categories[2] == catalogue.SOP_CATEGORIES[2]  # two folders: SOP's name stays
    assert ds.categories[1:] == catalogue.SOP_CATEGORIES[1:]


def test_tree_to_tree_keeps_folder_names_and_run_is_named_after_the_folder(tmp_path):
    import train
    from training import runs

    root = tree(tmp_path / "My Shop", {"mugs/m1": 2, "mugs/m 2": 2, "lamps/l1": 2})
    out = prepare_data.convert_catalogue(root, tmp_path / "copy", "folder", progress=False)
    assert sorted(set(catalogue.scan_folder_tree(out).product_ids)) == ["lamps/l1", "mugs/m 2", "mugs/m1"]
    args = train.get_args_parser().parse_args(["--data_root", str(root), "--backbone", "resnet18"])
    assert runs.default_run_name(args).startswith("My_Shop_resnet18_")
    sop = train.get_args_parser().parse_args(["--backbone", "resnet18"])
    assert runs.default_run_name(sop).startswith("stanford_resnet18_")


def test_csv_without_test_rows_says_so(tmp_path):
    write_csv(tmp_path, "path,product_id,category,split\na.jpg,p,mugs,train\nb.jpg,p,mugs,train\n")
    with pytest.raises(
        catalogue.DatasetError,
        match=r"split 'test' of .* \(csv\) is empty: no image is in "
        r"the test split",
    ):
        datasets.SOPDataset(tmp_path, "test", check_files=False)
