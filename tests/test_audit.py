"""The catalogue audit (audit.py, search.audit, search.audit_run, search.audit_report).

The end-to-end tests use a tiny folder tree whose products are far apart by construction (each a
flat colour of its own under mild noise), embedded by an untrained network: what separates them
is the colour, which any network keeps, so a photo filed under the wrong colour and a byte copy
under another product are the only faults, and the audit must find exactly them.
"""

import csv
import hashlib
from pathlib import Path
import re
import shutil

import numpy as np
from PIL import Image
import pytest

import audit as audit_script
from search import audit, audit_run, loading, near_copy, tiny_demo

COLOURS = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 30), (200, 40, 210), (30, 210, 220)]


def make_tree(root: Path, colours=COLOURS, photos=5, seed=0) -> Path:
    """``root/shop/p<k>/<n>.jpg``: product k's photos are colour k with noise and a shifted square."""
    rng = np.random.default_rng(seed)
    for k, colour in enumerate(colours):
        folder = root / "shop" / f"p{k}"
        folder.mkdir(parents=True)
        for n in range(photos):
            pixels = np.clip(np.array(colour) + rng.normal(0, 12, (64, 64, 3)), 0, 255)
            x, y = rng.integers(4, 40, 2)
            pixels[y : y + 16, x : x + 16] = 255 - np.array(colour)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{n}.jpg", quality=92)
    return root


def tree_hash(root: Path) -> str:
    """sha256 over every file's path, bytes and mtime, and every folder's path, under ``root``."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
            h.update(str(p.stat().st_mtime_ns).encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    checkpoint = tiny_demo.write_untrained_checkpoint(folder / "best.pth", folder, head="linear")
    return loading.load_search_model(checkpoint, device="cpu", runtime="torch")


@pytest.fixture
def faulty_tree(tmp_path):
    """The tree with p0/1.jpg moved to p2 and p3/2.jpg copied byte for byte into p5."""
    root = make_tree(tmp_path / "data")
    shop = root / "shop"
    shutil.move(shop / "p0" / "1.jpg", shop / "p2" / "moved.jpg")
    shutil.copy(shop / "p3" / "2.jpg", shop / "p5" / "copy.jpg")
    return root


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def run(model, out, **kw):
    return audit_run.run_audit(model, out, progress=False, **kw)


# ============ end to end ============


def test_planted_faults_are_found_and_nothing_else(model, faulty_tree, tmp_path):
    before = tree_hash(faulty_tree)
    summary = run(model, tmp_path / "out", gallery_dir=faulty_tree)
    rows = read_csv(tmp_path / "out" / "audit.csv")
    assert rows[0] == ["kind", "path", "other_path", "product_id", "other_product_id", "score"]
    found = {(r[0], r[1], r[2]) for r in rows[1:]}
    # the copy is reported once, as a duplicate of its source (p3 claims it: the duplicate row says
    # so); its source is not mislabelled (its copy, its duplicate partner, is no claim of p5's)
    assert {(k, p) for k, p, _ in found} == {
        ("duplicate", "shop/p5/copy.jpg"),
        ("mislabelled", "shop/p2/moved.jpg"),
    }
    assert ("duplicate", "shop/p5/copy.jpg", "shop/p3/2.jpg") in found
    mis = next(r for r in rows[1:] if r[0] == "mislabelled" and r[1] == "shop/p2/moved.jpg")
    assert mis[3:5] == ["shop/p2", "shop/p0"]  # filed under p2, belongs to p0
    assert summary["counts"] == {"duplicate": 1, "mislabelled": 1, "unreadable": 0}
    assert tree_hash(faulty_tree) == before


def test_html_shows_every_finding_and_links_no_file(model, faulty_tree, tmp_path):
    run(model, tmp_path / "out", gallery_dir=faulty_tree)
    page = (tmp_path / "out" / "audit.html").read_text()
    sources = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
    assert len(sources) == 2 * 4  # two findings, four images each
    assert all(s.startswith("data:image/jpeg;base64,") for s in sources)
    assert "file:" not in page and "shop/p5/copy.jpg" in page  # named as text, relative to DIR


def test_unreadable_photo_is_counted_and_listed(model, tmp_path):
    root = make_tree(tmp_path / "data")
    (root / "shop" / "p1" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    before = tree_hash(root)
    summary = run(model, tmp_path / "out", gallery_dir=root)
    rows = read_csv(tmp_path / "out" / "audit.csv")
    assert ["unreadable", "shop/p1/broken.jpg", "", "shop/p1", "", ""] in rows
    assert summary["unreadable"] == 1 and summary["counts"]["unreadable"] == 1
    assert tree_hash(root) == before


def test_one_product_says_there_is_nothing_to_compare(model, tmp_path, capsys):
    root = make_tree(tmp_path / "data", colours=COLOURS[:1])
    args = audit_script.get_args_parser().parse_args(
        [
            "--gallery",
            str(root),
            "--checkpoint",
            str(model.checkpoint),
            "--output",
            str(tmp_path / "out"),
            "--no_progress",
            "--device",
            "cpu",
        ]
    )
    assert audit_script.main(args) == 0
    assert "nothing to compare" in capsys.readouterr().out
    assert read_csv(tmp_path / "out" / "audit.csv") == [list(audit_run.audit_report.CSV_COLUMNS)]


def test_labelled_catalogue_and_resume(model, faulty_tree, tmp_path):
    """--data_root reads the tree as a catalogue (product ids are its folders); a second run reuses
    the embeddings in OUT and gives the same findings."""
    first = run(model, tmp_path / "out", data_root=faulty_tree)
    again = run(model, tmp_path / "out", data_root=faulty_tree)
    assert again["embed"]["embedded"] == 0 and again["embed"]["unchanged"] == first["photos"]
    assert first["counts"] == again["counts"] == {"duplicate": 1, "mislabelled": 1, "unreadable": 0}


def test_output_inside_the_catalogue_is_refused(model, faulty_tree):
    with pytest.raises(audit_run.AuditError, match="inside the audited folder"):
        run(model, faulty_tree / "report", gallery_dir=faulty_tree)
    assert not (faulty_tree / "report").exists()


# ============ the findings on hand-built vectors ============


def unit(rows):
    rows = np.asarray(rows, np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_neighbours_leave_each_photo_out_even_when_tied():
    vectors = unit([[1, 0], [1, 0], [0, 1], [1, 1]])
    scores, idx = audit.neighbours(vectors, 3, progress=False)
    assert idx.tolist() == [[1, 3, 2], [0, 3, 2], [3, 0, 1], [0, 1, 2]]
    assert scores[0, 0] == pytest.approx(1.0)


def test_duplicates_are_pairs_across_products_above_the_threshold():
    vectors = unit([[1, 0, 0], [1, 0.01, 0], [0, 1, 0], [0, 1, 0.02], [0, 0, 1]])
    products = ["a", "b", "c", "c", "d"]
    scores, idx = audit.neighbours(vectors, 4, progress=False)
    found = audit.find_duplicates(products, scores, idx, threshold=0.99)
    assert [(f.row, f.other_row) for f in found] == [(1, 0)]  # 2, 3: same product, not a duplicate listing


def test_mislabelled_is_an_outlier_margin():
    rng = np.random.default_rng(0)
    centres = unit(rng.standard_normal((10, 16)))
    vectors = unit(np.repeat(centres, 6, axis=0) + 0.05 * rng.standard_normal((60, 16)))
    products = np.repeat(np.arange(10), 6).astype(str).tolist()
    products[7] = "5"  # a photo of product 1 filed under product 5
    scores, idx = audit.neighbours(vectors, audit.neighbour_count(products), progress=False)
    found, info = audit.find_mislabelled(vectors, products, scores, idx)
    assert [f.row for f in found] == [7] and products[found[0].other_row] == "1"
    assert 0 <= info["margin_threshold"] < found[0].score


def test_mutual_best_keeps_a_copy_with_its_source_only():
    f = audit.Finding
    pairs = [
        f("duplicate", 9, 3, 0.99),
        f("duplicate", 9, 4, 0.98),
        f("duplicate", 5, 3, 0.97),
        f("duplicate", 7, 6, 0.9),
    ]
    assert audit.mutual_best(pairs) == [pairs[0], pairs[3]]


def test_near_copy_tells_a_cropped_reencoded_copy_from_another_photo(tmp_path):
    rng = np.random.default_rng(1)
    photo = Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).resize((120, 120), Image.BILINEAR)
    other = Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).resize((120, 120), Image.BILINEAR)
    photo.save(tmp_path / "a.png")
    copy = audit.edited_copy(photo, __import__("random").Random(0))
    loaded = near_copy.load_grey(tmp_path / "a.png")
    assert near_copy.similarity(loaded, copy) > 0.95
    assert near_copy.similarity(loaded, other) < 0.5
    assert near_copy.similarity(loaded, photo) == pytest.approx(1.0)


def test_near_copy_tells_a_copy_from_the_same_scene_moved_a_little():
    # two frames of one video: the same scene shifted and turned slightly, then both cropped
    rng = np.random.default_rng(2)
    scene = Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).resize((400, 400), Image.BILINEAR)
    frame = scene.crop((100, 100, 300, 300))
    next_frame = scene.rotate(3, center=(205, 203)).crop((104, 102, 304, 302))
    copy = audit.edited_copy(frame, __import__("random").Random(3))
    assert near_copy.similarity(frame, copy) > near_copy.similarity(frame, next_frame) + 0.01
    assert near_copy.similarity(frame, frame.crop((20, 0, 200, 180))) > 0.99  # a crop aligns at any place


def test_thresholds_are_derived_from_the_scores():
    assert audit.duplicate_threshold(np.linspace(0.9, 1.0, 101)) == pytest.approx(0.905)
    margins = np.r_[np.full(50, -0.2), np.full(50, -0.1)]  # median -0.15, MAD 0.05
    assert audit.margin_threshold(margins) == pytest.approx(-0.15 + 3.5 * 1.4826 * 0.05)
    assert audit.margin_threshold(np.full(10, -0.5)) == 0.0  # another product must beat the own one
    with pytest.raises(ValueError, match="duplicate threshold"):
        audit.duplicate_threshold([])


def test_a_duplicate_is_not_listed_again_as_mislabelled_by_its_sources_product():
    rng = np.random.default_rng(0)
    centres = unit(rng.standard_normal((10, 16)))
    vectors = unit(np.repeat(centres, 6, axis=0) + 0.05 * rng.standard_normal((60, 16)))
    products = np.repeat(np.arange(10), 6).astype(str).tolist()
    vectors = np.vstack([vectors, vectors[7:8], vectors[20:21]])  # a copy of a photo of product 1 ...
    products += ["5", "9"]  # ... filed under 5, and of product 3 under 9
    scores, idx = audit.neighbours(vectors, audit.neighbour_count(products), progress=False)
    dup = [audit.Finding("duplicate", 60, 7, 1.0)]  # only the first pair found as a duplicate
    found, _ = audit.find_mislabelled(vectors, products, scores, idx, duplicates=dup)
    assert [(f.row, products[f.other_row]) for f in found] == [(61, "3")]


def test_reciprocal_rank_by_hand():
    idx = np.array([[1, 2], [2, 0], [0, 1]])
    assert audit.reciprocal_rank(idx, np.array([1, 0, -1])).tolist() == [1, 0, 2]  # 2: no one claims it
    assert audit.reciprocal_bound([0, 0, 1, 3], quantile=0.5) == 0.5 and audit.reciprocal_bound([]) == np.inf


def test_a_claim_that_is_not_mutual_is_no_mislabel():
    """Photo 60 (product "x") is closest to photo 0 of product 0, by a wide margin over its own
    product, but photo 0 has its own product's photos and others nearer than it: a look-alike of
    a crowd (a blurred frame near another blurred frame), not a photo of product 0."""
    rng = np.random.default_rng(0)
    centres = unit(rng.standard_normal((10, 16)))
    vectors = unit(np.repeat(centres, 6, axis=0) + 0.05 * rng.standard_normal((60, 16)))
    products = np.repeat(np.arange(10), 6).astype(str).tolist()
    lone = unit(vectors[:1] + 0.9 * unit(rng.standard_normal((1, 16))))  # near 0, not among its nearest
    far = unit(rng.standard_normal((1, 16)))  # its own product's other photo, unlike it
    vectors = np.vstack([vectors, lone, far])
    products += ["x", "x"]
    scores, idx = audit.neighbours(vectors, audit.neighbour_count(products), progress=False)
    found, info = audit.find_mislabelled(vectors, products, scores, idx, threshold=0.0)
    claimed_by = idx[60, 0]
    assert claimed_by < 6 and scores[60, 0] > vectors[60] @ vectors[61]  # product 0 claims it ...
    assert audit.reciprocal_rank(idx, np.full(62, claimed_by))[60] > info["reciprocal_rank_bound"]  # ... alone
    assert 60 not in [f.row for f in found]
    products[7] = "5"  # a photo of product 1 filed under 5: mutual with product 1's photos, still found
    scores, idx = audit.neighbours(vectors, audit.neighbour_count(products), progress=False)
    assert 7 in [f.row for f in audit.find_mislabelled(vectors, products, scores, idx, threshold=0.0)[0]]


def test_near_copy_loads_a_large_photo_bounded_and_still_matches_it(tmp_path):
    rng = np.random.default_rng(4)
    photo = Image.fromarray(rng.integers(0, 255, (30, 45, 3), dtype=np.uint8)).resize((1200, 800), Image.BILINEAR)
    photo.save(tmp_path / "big.png")  # not a JPEG: no reduced decoding, resized after it
    loaded = near_copy.load_grey(tmp_path / "big.png")
    assert min(loaded.size) == 4 * near_copy.SIDE and loaded.size[0] > loaded.size[1]
    assert near_copy.similarity(loaded, photo) > 0.99
