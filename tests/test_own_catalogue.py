"""Your own photos end to end, the way the README tells users to do it: a folder tree with free
category names through train.py → evaluate.py → the demo's category filter over the API, and
`app_stanford.py --gallery DIR` (checkpoint or --zero_shot) indexing any folder incrementally
and serving it to gradio_client with its default settings, nothing else of the folder served."""

import contextlib
import os
from pathlib import Path
import shutil

import numpy as np
import pytest
from support import jpeg, raw_get, reference_embedding
import torch

import app_stanford
import checkpoints
from dataio import catalogue
import datasets
import models
from search import loading as search_loading
from search import webapp
from search.tiny_demo import free_port
import train
from training import arg_checks, evaluation

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

FREE_NAMES = ["Kitchen & Dining", "Gartenmöbel", "Office chairs"]


def free_name_tree(src, dst):
    """The images of the SOP-layout ``src`` as ``dst/<free category>/<product>/<image>``:
    SOP's 12 categories folded onto FREE_NAMES."""
    table = catalogue.read_catalogue(src)
    for rel, product, sid in zip(table.rel_paths, table.product_ids, table.super_ids.tolist()):
        target = dst / FREE_NAMES[(sid - 1) % 3] / f"item {product}" / Path(rel).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, target)
    return dst


@contextlib.contextmanager
def serving(model, index, root):
    """The demo as main() serves it, on loopback; yields a gradio_client Client with its
    defaults (result images downloaded through the file route) and the URL."""
    from gradio_client import Client

    webapp.use_private_gradio_temp_dir()
    demo = webapp.build_app(model, index, root)
    port = free_port()
    webapp.launch_app(demo, index, root, port=port, prevent_thread_lock=True, quiet=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        yield Client(url, verbose=False), url, demo
    finally:
        demo.close()


def readme_search(client, query, k, category):
    """The README's API call, verbatim apart from the arguments."""
    from gradio_client import handle_file

    return client.predict(handle_file(str(query)), k, category, api_name="/search")


def dropdown_choices(demo):
    for comp in demo.config["components"]:
        if comp.get("props", {}).get("elem_id") == "category":
            return [c[0] if isinstance(c, (list, tuple)) else c for c in comp["props"]["choices"]]
    raise AssertionError("no category dropdown")


def test_free_category_names_train_evaluate_demo(tmp_path, tiny_synthetic_root):
    root = free_name_tree(tiny_synthetic_root, tmp_path / "my photos")
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    # --dataset synthetic on a folder of photos: read as it is, never generated over
    args = train.get_args_parser().parse_args(
        [
            "--dataset",
            "synthetic",
            "--data_root",
            str(root),
            "--backbone",
            "resnet18",
            "--weights",
            "none",
            "--image_size",
            "32",
            "--batch_size",
            "8",
            "--images_per_class",
            "2",
            "--epochs",
            "1",
            "--max_steps_per_epoch",
            "2",
            "--workers",
            "0",
            "--projector_samples",
            "4",
            "--lr",
            "1e-3",
            "--no-progress",
            "--val_fraction",
            "0.25",
            "--test_fraction",
            "0.5",
            "--recipe",
            "scratch",
            "--checkpoint_dir",
            str(tmp_path / "checkpoints"),
            "--log_dir",
            str(tmp_path / "runs"),
            "--run_name",
            "own",
        ]
    )
    arg_checks.validate_args(args, train.get_args_parser())
    train.main(args)
    ckpt = tmp_path / "checkpoints" / "own" / "best.pth"
    assert ckpt.is_file()
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before

    # evaluate.py: the checkpoint alone finds the data, its split and the category names
    results = evaluation.evaluate_checkpoint(
        ckpt, output=tmp_path / "eval", workers=0, device="cpu", progress=False, num_examples=2
    )
    assert results["data"]["layout"] == "folder" and results["data"]["root"] == str(root.resolve())
    assert set(results["per_category"]) == set(FREE_NAMES)
    md = (tmp_path / "eval" / "results.md").read_text()
    assert all(f"| {name} |" in md for name in FREE_NAMES)
    test_set = datasets.SOPDataset(root, "test")
    assert results["data"]["num_images"] == len(test_set)
    trainval = datasets.SOPDataset(root, "trainval")
    assert not set(test_set.product_ids) & set(trainval.product_ids)

    # the demo: its filter offers the data's names, and a filtered search stays in one
    model = models.load_model(ckpt)
    splits = datasets.split_options(model.checkpoint_info["args"])
    index, _ = search_loading.load_or_build_index(model, ckpt, root, "test", progress=False, splits=splits)
    assert index.paths == test_set.rel_paths
    with serving(model, index, root) as (client, url, demo):
        assert dropdown_choices(demo) == ["All", *sorted(FREE_NAMES)]
        query = root / test_set.rel_paths[0]
        gallery, ranked, _ = readme_search(client, query, 4, "Gartenmöbel")
        assert len(ranked["results"]) == len(gallery) == 4
        for item, r in zip(gallery, ranked["results"]):
            assert r["category"] == "Gartenmöbel"
            assert r["product_id"] == test_set.product_ids[r["index"]]
            assert r["product_id"].startswith("Gartenmöbel/item ")
            assert Path(item["image"]).read_bytes() == (root / r["catalogue_path"]).read_bytes()
        from gradio_client.exceptions import AppError

        with pytest.raises(AppError, match="chair is not in the list of choices"):
            readme_search(client, query, 4, "chair")  # SOP's names mean nothing here


def _gallery_folder(root):
    for j, cat in enumerate(["chairs", "mugs"]):
        for i in range(4):
            jpeg(root / cat / f"{i}.jpg", seed=10 * j + i, size=(60, 45))
    jpeg(root / "loose.png", seed=99)
    (root / "chairs" / "prices.csv").write_text("secret,1\n")
    (root / "chairs" / ".env").write_text("TOKEN=x\n")
    return root


def app_main(*argv):
    parser = app_stanford.get_args_parser()
    args = parser.parse_args([str(a) for a in argv])
    app_stanford.check_args(parser, args)
    return app_stanford.main(args)


def test_gallery_folder_checkpoint_incremental_and_api(tmp_path):
    root = _gallery_folder(tmp_path / "shop")
    outside = tmp_path / "private.jpg"
    jpeg(outside, seed=5)
    (root / "mugs" / "link.jpg").symlink_to(outside)  # points out of the gallery
    torch.manual_seed(0)
    model = models.build_model("resnet18", embedding_size=16, weights="none", image_size=32)
    ckpt = tmp_path / "ck" / "best.pth"
    checkpoints.atomic_save(checkpoints.make_checkpoint(model, args={}, epoch=0, metrics={}), ckpt)
    common = ["--checkpoint", ckpt, "--gallery", root, "--build_index", "--workers", "0", "--device", "cpu"]

    index = app_main(*common)
    assert sorted(index.paths) == index.paths and len(index) == 9
    assert "mugs/link.jpg" not in index.paths and "chairs/prices.csv" not in index.paths
    assert index.categories == ["(top level)", "chairs", "mugs"]
    path = search_loading.default_gallery_index_path(root, ckpt)
    assert path.parent == ckpt.parent and path.is_file()

    jpeg(root / "mugs" / "new.jpg", seed=42)
    (root / "chairs" / "0.jpg").unlink()
    index2 = app_main(*common)
    assert len(index2) == 9 and "mugs/new.jpg" in index2.paths and "chairs/0.jpg" not in index2.paths
    kept = [index.paths.index(p) for p in index2.paths if p in index.paths]
    np.testing.assert_array_equal(
        index2.embeddings[[index2.paths.index(p) for p in index2.paths if p in index.paths]], index.embeddings[kept]
    )

    loaded = models.load_model(ckpt)
    with serving(loaded, index2, root) as (client, url, demo):
        assert dropdown_choices(demo) == ["All", "(top level)", "chairs", "mugs"]
        gallery, ranked, _ = readme_search(client, root / "mugs" / "new.jpg", 9, "All")
        assert ranked["results"][0]["catalogue_path"] == "mugs/new.jpg"
        ref = index2.embeddings @ reference_embedding(loaded, root / "mugs" / "new.jpg")
        assert ranked["results"][0]["score"] == pytest.approx(float(ref.max()), abs=1e-4)
        for item, r in zip(gallery, ranked["results"]):
            assert r["product_id"] is None  # unlabelled: the catalogue path is the identifier
            assert Path(item["image"]).read_bytes() == (root / r["catalogue_path"]).read_bytes()
        _, mugs, _ = readme_search(client, root / "mugs" / "new.jpg", 9, "mugs")
        assert {r["category"] for r in mugs["results"]} == {"mugs"} and len(mugs["results"]) == 5
        # the file route serves the gallery's images and nothing else of the folder
        assert raw_get(url, f"/gradio_api/file={root / 'mugs' / '1.jpg'}")[0] == 200
        assert raw_get(url, f"/gradio_api/file={root / 'loose.png'}")[0] == 200
        for other in (
            root / "chairs" / "prices.csv",
            root / "chairs" / ".env",
            root / "mugs" / "link.jpg",
            outside,
            path,
        ):
            status, body = raw_get(url, f"/gradio_api/file={other}")
            assert status in (403, 404), (other, status)
            assert b"secret" not in body and b"TOKEN" not in body


def test_gallery_zero_shot_and_bad_folders(tmp_path, capsys):
    root = _gallery_folder(tmp_path / "shop")
    monkey_runs = tmp_path / "cwd"
    monkey_runs.mkdir()
    cwd = os.getcwd()
    os.chdir(monkey_runs)
    try:
        zs = [
            "--zero_shot",
            "--backbone",
            "resnet18",
            "--weights",
            "none",
            "--image_size",
            "32",
            "--build_index",
            "--workers",
            "0",
            "--device",
            "cpu",
        ]
        index = app_main(*zs, "--gallery", root)
        assert len(index) == 9 and index.checkpoint_hash.startswith("zero_shot:zero_shot_resnet18_32px_none")
        assert list((monkey_runs / "runs" / "zero_shot_resnet18_32px_none").glob("gallery_shop_*.npz"))
        (tmp_path / "empty").mkdir()
        with pytest.raises(SystemExit, match=r"Cannot index the gallery .*empty"):
            app_main(*zs, "--gallery", tmp_path / "empty")
        (tmp_path / "docs").mkdir()
        (tmp_path / "docs" / "a.txt").write_text("x")
        with pytest.raises(SystemExit, match=r"Cannot index the gallery .*docs"):
            app_main(*zs, "--gallery", tmp_path / "docs")
        with pytest.raises(SystemExit, match=r"Cannot index the gallery .*nowhere"):
            app_main(*zs, "--gallery", tmp_path / "nowhere")
        for bad in (
            ["--zero_shot", "--gallery", str(root)],  # no backbone
            ["--zero_shot", "--backbone", "resnet18"],  # nothing to search
            ["--gallery", str(root), "--data_root", str(root)],
        ):  # both
            with pytest.raises(SystemExit):
                app_main(*bad)
        assert "--zero_shot needs" in capsys.readouterr().err
    finally:
        os.chdir(cwd)
