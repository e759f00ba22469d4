"""export.py / inference.py: ONNX export (every backbone, fp32 parity with PyTorch, dynamic
batch, TF-SAME padding frozen at the export size), metadata, retrieval metrics through
extraction.extract_embeddings unchanged, the command line, refusal of bad inputs without partial
files, ensure_onnx's reuse and re-export, static int8, load_embedder / default_runtime, and the
standalone example docs/onnx_example.py (onnxruntime + PIL + numpy) against the repository."""

import json
import os
from pathlib import Path
import re
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import torch
import torchvision.transforms as T

pytest.importorskip("onnxruntime", reason="runtime onnx: pip install -r requirements.txt")
pytest.importorskip("onnx", reason="ONNX export: pip install -r requirements.txt")

import backbones
import checkpoints
from dataio.photos import load_image
import datasets
import explain
import export
import extraction
import inference
import models
import onnx_export
import preprocessing
import retrieval

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "docs" / "onnx_example.py"
# 40 px: every backbone downsamples it, and TF-SAME padding is asymmetric at each stride-2
# EfficientNet-Lite layer (40 -> 20 -> 10 -> 5 -> 3 -> 2), so parity covers the padding freeze.
SIZE = 40
TOL = 1e-4

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def images(n, size=SIZE, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def torch_embed(model, x):
    with torch.inference_mode():
        return model.eval()(x)


def save_checkpoint(path, seed=0, data_root=None, backbone="efficientnet_lite0"):
    """A small random-weight checkpoint (mlp head, 16-d) at ``path``; returns its model."""
    torch.manual_seed(seed)
    model = models.build_model(backbone, embedding_size=16, image_size=SIZE)
    args = {"data_root": str(data_root)} if data_root else {}
    checkpoints.atomic_save(checkpoints.make_checkpoint(model, args=args, epoch=3, metrics={"map@r": 0.5}), path)
    return model.eval()


def files_in(folder):
    return sorted(p.name for p in Path(folder).iterdir())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, synthetic_root):
    path = tmp_path_factory.mktemp("ckpt") / "best.pth"
    save_checkpoint(path, data_root=synthetic_root)
    return path


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    return onnx_export.export_checkpoint(checkpoint, tmp_path_factory.mktemp("onnx") / "model.onnx")


# ============ parity ============


@pytest.mark.parametrize("backbone", sorted(backbones.BACKBONES))
def test_fp32_matches_torch_every_backbone_any_batch(backbone, tmp_path):
    torch.manual_seed(0)
    model = models.build_model(backbone, embedding_size=16, image_size=SIZE).eval()
    path = onnx_export.export_onnx(model, tmp_path / "m.onnx", model_key="test")
    embedder = inference.OnnxEmbedder(path)
    for batch in (1, 5):  # the batch axis is dynamic
        x = images(batch, seed=batch)
        out, ref = embedder(x), torch_embed(model, x)
        assert out.shape == (batch, 16) and out.dtype == torch.float32
        assert (out - ref).abs().max().item() < TOL
        assert torch.allclose(out.norm(dim=1), torch.ones(batch), atol=1e-5)  # normalised inside


@pytest.mark.parametrize("size", [57, 64])
def test_same_padding_frozen_at_export_size(size):
    model = models.build_model("efficientnet_lite0", embedding_size=8, image_size=size).eval()
    frozen = onnx_export.freeze_same_padding(model, size)
    from timm.layers import Conv2dSame

    assert any(isinstance(m, Conv2dSame) for m in model.modules())
    assert not any(isinstance(m, Conv2dSame) for m in frozen.modules())
    x = images(2, size)
    assert torch.equal(torch_embed(frozen, x), torch_embed(model, x))


def test_exported_graph_has_constant_padding(exported):
    import onnx

    ops = {n.op_type for n in onnx.load(str(exported)).graph.node}
    assert "Conv" in ops and "Ceil" not in ops  # no per-call SAME-padding arithmetic


def test_metadata(exported, checkpoint):
    meta = inference.read_metadata(exported)
    ckpt = checkpoints.load_checkpoint(checkpoint)
    digest = checkpoints.checkpoint_hash(checkpoint)
    assert meta["format"] == onnx_export.FORMAT
    assert meta["format_version"] == str(onnx_export.FORMAT_VERSION)
    assert meta["checkpoint_sha256"] == meta["model_key"] == digest
    assert (meta["backbone"], meta["head"]) == ("efficientnet_lite0", "mlp")
    assert (int(meta["image_size"]), int(meta["crop_size"])) == (SIZE, SIZE)
    assert int(meta["resize_size"]) == preprocessing.resize_size(SIZE)
    assert json.loads(meta["mean"]) == list(preprocessing.IMAGENET_MEAN)
    assert json.loads(meta["std"]) == list(preprocessing.IMAGENET_STD)
    assert int(meta["embedding_size"]) == 16 and meta["precision"] == "fp32"
    assert json.loads(meta["model_args"]) == ckpt["model_args"]
    assert (meta["input"], meta["output"]) == ("images", "embeddings")
    embedder = inference.OnnxEmbedder(exported, checkpoint=checkpoint)
    model = models.load_model(checkpoint)
    assert embedder.model_args == model.model_args
    assert embedder.checkpoint_info["epoch"] == 3
    assert embedder.checkpoint_info["metrics"] == {"map@r": 0.5}
    assert embedder.num_parameters == models.count_parameters(model)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    (inp,), (out, features) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("images", "tensor(float)", [3, SIZE, SIZE])
    assert isinstance(inp.shape[0], str)  # dynamic batch
    assert (out.name, out.shape[1]) == ("embeddings", 16)
    # the feature map that similarity maps decompose, as the torch network's pooling sees it
    x = torch.randn(2, 3, SIZE, SIZE)
    ref_grid, ref_emb = explain.feature_grid(model, x)
    assert (features.name, features.shape[1:]) == ("features", list(ref_grid.shape[1:]))
    emb, grid = embedder.embed_with_features(x)
    assert torch.allclose(grid, ref_grid, atol=1e-4) and torch.allclose(emb, ref_emb, atol=1e-5)


def test_retrieval_metrics_equal_through_extract_embeddings(exported, checkpoint, tiny_synthetic_root):
    test = datasets.SOPDataset(tiny_synthetic_root, "test", transform=preprocessing.build_transform(SIZE))
    loader = torch.utils.data.DataLoader(test, batch_size=16)
    results = []
    for model in (models.load_model(checkpoint), inference.OnnxEmbedder(exported)):
        embeddings, labels = extraction.extract_embeddings(model, loader, progress=False)
        assert np.array_equal(labels, test.class_ids)
        results.append((embeddings, retrieval.evaluate_embeddings(embeddings, test.class_ids, test.super_ids)))
    (ref, ref_metrics), (out, out_metrics) = results
    assert np.abs(out - ref).max() < TOL
    assert out_metrics == ref_metrics


def test_embedder_stands_in_for_the_network(exported):
    embedder = inference.OnnxEmbedder(exported)
    # what the demo's engine and the gallery code do with a model
    same = embedder.eval().to(memory_format=torch.channels_last)
    assert same is embedder and next(embedder.parameters()).device == torch.device("cpu")
    assert models.count_parameters(embedder) == 0  # the weights live in the session
    x = images(3).contiguous(memory_format=torch.channels_last)
    assert embedder(x).shape == (3, 16)
    with pytest.raises(ValueError, match=rf"\[N, 3, {SIZE}, {SIZE}\].*got \[1, 3, 32, 32\]"):
        embedder(images(1, 32))


# ============ command line and bad inputs ============


def test_command_line_export(checkpoint, tmp_path):
    out = tmp_path / "cli" / "model.onnx"
    run = subprocess.run(
        [sys.executable, str(REPO / "export.py"), "--checkpoint", str(checkpoint), "--output", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert f"Wrote {out}" in run.stdout and "max |difference|" in run.stdout
    assert inference.read_metadata(out)["checkpoint_sha256"] == checkpoints.checkpoint_hash(checkpoint)
    assert files_in(out.parent) == ["model.onnx"]  # no temporary file left


def test_zero_shot_export(tmp_path):
    out = export.main(
        [
            "--zero_shot",
            "--backbone",
            "resnet18",
            "--weights",
            "none",
            "--image_size",
            "32",
            "--output",
            str(tmp_path / "z.onnx"),
        ]
    )
    meta = inference.read_metadata(out)
    assert meta["model_key"] == models.zero_shot_model_key("resnet18", "none", 32)
    assert (meta["checkpoint_sha256"], meta["head"], meta["embedding_size"]) == ("", "none", "512")


def test_not_a_checkpoint(tmp_path, capsys):
    bad = tmp_path / "notes.pth"
    bad.write_text("not a checkpoint")
    out = tmp_path / "model.onnx"
    with pytest.raises(SystemExit, match=re.escape(str(bad))):
        export.main(["--checkpoint", str(bad), "--output", str(out)])
    assert files_in(tmp_path) == ["notes.pth"]
    with pytest.raises(SystemExit, match="not found.*missing.pth"):
        export.main(["--checkpoint", str(tmp_path / "missing.pth"), "--output", str(out)])


def test_unwritable_output(checkpoint, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = blocker / "model.onnx"
    with pytest.raises(SystemExit, match=re.escape(str(out)) + ".*is a file"):
        export.main(["--checkpoint", str(checkpoint), "--output", str(out)])
    assert files_in(tmp_path) == ["a_file"]
    with pytest.raises(SystemExit, match=re.escape(str(tmp_path)) + ".*is a folder"):
        export.main(["--checkpoint", str(checkpoint), "--output", str(tmp_path)])


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(checkpoint, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(SystemExit, match=re.escape(str(folder / "m.onnx"))):
            export.main(["--checkpoint", str(checkpoint), "--output", str(folder / "m.onnx")])
        assert files_in(folder) == []
    finally:
        folder.chmod(0o700)


def test_write_failure_leaves_no_partial_file(checkpoint, tmp_path, monkeypatch):
    def full_disk(data):
        raise OSError(28, "No space left on device")

    class Half:
        """A file object that writes half the bytes, then fails like a full disk."""

        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            full_disk(data)

    real = onnx_export.fileio.atomic_write
    monkeypatch.setattr(onnx_export.fileio, "atomic_write", lambda path, fn: real(path, lambda f: fn(Half(f))))
    out = tmp_path / "model.onnx"
    with pytest.raises(OSError, match=re.escape(str(out))):
        onnx_export.export_checkpoint(checkpoint, out)
    assert files_in(tmp_path) == []


def test_corrupt_onnx(exported, tmp_path):
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(exported.read_bytes()[: exported.stat().st_size // 2])
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\xffnot a model")
    for bad in (truncated, garbage):
        with pytest.raises(onnx_export.OnnxModelError, match=re.escape(str(bad))):
            inference.OnnxEmbedder(bad)
        with pytest.raises(onnx_export.OnnxModelError, match=re.escape(str(bad))):
            inference.read_metadata(bad)
    with pytest.raises(FileNotFoundError, match="nothing.onnx"):
        inference.OnnxEmbedder(tmp_path / "nothing.onnx")


def test_foreign_onnx_model(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["images"], ["embeddings"])],
        "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, [1])],
    )
    path = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(onnx_export.OnnxModelError, match=re.escape(str(path)) + ".*not an export"):
        inference.OnnxEmbedder(path)


def test_onnx_from_another_checkpoint(exported, checkpoint, tmp_path):
    other = tmp_path / "other.pth"
    save_checkpoint(other, seed=1)
    with pytest.raises(
        onnx_export.OnnxModelError, match=re.escape(str(exported)) + ".*another checkpoint.*" + re.escape(str(other))
    ):
        inference.OnnxEmbedder(exported, checkpoint=other)
    inference.OnnxEmbedder(exported, checkpoint=checkpoint)  # its own: accepted


# ============ ensure_onnx, load_embedder, runtimes ============


def test_ensure_onnx_reuses_then_reexports(checkpoint, tmp_path, monkeypatch):
    ckpt = tmp_path / "best.pth"
    shutil.copy(checkpoint, ckpt)
    path = inference.ensure_onnx(ckpt)
    assert path == tmp_path / "best.onnx"
    first = path.stat().st_mtime_ns, path.read_bytes()

    real_export = onnx_export.export_checkpoint
    calls = []
    monkeypatch.setattr(onnx_export, "export_checkpoint", lambda *a, **k: calls.append(a) or real_export(*a, **k))
    assert inference.ensure_onnx(ckpt) == path and not calls  # unchanged checkpoint: reused
    assert (path.stat().st_mtime_ns, path.read_bytes()) == first

    model = save_checkpoint(ckpt, seed=2)  # retrained: the file must follow
    assert inference.ensure_onnx(ckpt) == path and len(calls) == 1
    assert inference.read_metadata(path)["checkpoint_sha256"] == checkpoints.checkpoint_hash(ckpt)
    x = images(2)
    assert (inference.OnnxEmbedder(path)(x) - torch_embed(model, x)).abs().max() < TOL

    path.write_bytes(b"half a file")  # an unreadable cached file is exported again too
    inference.ensure_onnx(ckpt)
    assert len(calls) == 2 and inference.read_metadata(path)["precision"] == "fp32"
    assert files_in(tmp_path) == ["best.onnx", "best.pth"]


def test_load_embedder(checkpoint, tmp_path):
    ckpt = tmp_path / "best.pth"
    shutil.copy(checkpoint, ckpt)
    x = images(2)
    ref = inference.load_embedder(ckpt, runtime="torch")
    onnx_model = inference.load_embedder(ckpt, runtime="onnx")
    assert isinstance(ref, models.EmbeddingNet) and isinstance(onnx_model, inference.OnnxEmbedder)
    assert (tmp_path / "best.onnx").is_file()
    assert (onnx_model(x) - torch_embed(ref, x)).abs().max() < TOL
    assert onnx_model.checkpoint_info["epoch"] == ref.checkpoint_info["epoch"]

    zero_shot = ("resnet18", "none", 32)
    torch.manual_seed(0)  # weights "none" are random: the same seed gives the same network
    ref = inference.load_embedder(zero_shot=zero_shot, runtime="torch")
    torch.manual_seed(0)
    onnx_model = inference.load_embedder(zero_shot=zero_shot, runtime="onnx")
    assert onnx_model.model_key == models.zero_shot_model_key(*zero_shot)
    assert (onnx_model(images(2, 32)) - torch_embed(ref, images(2, 32))).abs().max() < TOL

    with pytest.raises(ValueError, match="runtime must be one of"):
        inference.load_embedder(ckpt, runtime="tensorrt")
    with pytest.raises(ValueError, match="runs on the CPU"):
        inference.load_embedder(ckpt, runtime="onnx", device="cuda")
    with pytest.raises(ValueError, match="not both"):
        inference.load_embedder(ckpt, zero_shot=zero_shot)


def test_without_onnxruntime(checkpoint, monkeypatch):
    assert inference.RUNTIMES == ("torch", "onnx") and inference.default_runtime() == "onnx"
    assert inference.default_runtime("cuda") == "torch"  # onnxruntime runs on the CPU here
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now fails
    assert inference.default_runtime() == "torch"
    with pytest.raises(ImportError, match=re.escape(f"pip install {onnx_export.ONNXRUNTIME_PIN}")):
        inference.load_embedder(checkpoint, runtime="onnx")
    assert isinstance(inference.load_embedder(checkpoint, runtime="torch"), models.EmbeddingNet)


def test_pins_match_requirements():
    pins = (REPO / "requirements.txt").read_text().split()
    assert onnx_export.ONNXRUNTIME_PIN in pins and onnx_export.ONNX_PIN in pins


# ============ int8 ============


def test_int8_runs_and_stays_close(checkpoint, synthetic_root, tmp_path):
    out = onnx_export.export_checkpoint(
        checkpoint, tmp_path / "m.int8.onnx", precision="int8", calibration_images=32
    )  # calibrates on the run's data
    meta = inference.read_metadata(out)
    assert meta["precision"] == "int8"
    calibration = json.loads(meta["calibration"])
    assert calibration["num_images"] == 32 and Path(calibration["root"]) == Path(synthetic_root)
    test = datasets.SOPDataset(synthetic_root, "test", transform=preprocessing.build_transform(SIZE))
    loader = torch.utils.data.DataLoader(test, batch_size=32)
    fp32, _ = extraction.extract_embeddings(models.load_model(checkpoint), loader, progress=False)
    int8, _ = extraction.extract_embeddings(inference.OnnxEmbedder(out), loader, progress=False)
    assert (fp32 * int8).sum(1).min() > 0.9
    fp32_size = len(onnx_export.onnx_bytes(models.load_model(checkpoint)))
    assert out.stat().st_size < 0.5 * fp32_size  # int8 weights


def test_int8_needs_calibration_images(tmp_path):
    with pytest.raises(SystemExit):  # argparse: --zero_shot --int8 without --calibration_root
        export.main(["--zero_shot", "--backbone", "resnet18", "--int8", "--output", str(tmp_path / "z.onnx")])
    with pytest.raises(ValueError, match="calibration"):
        onnx_export.export_zero_shot("resnet18", "none", 32, tmp_path / "z.onnx", precision="int8")
    assert files_in(tmp_path) == []


# ============ the standalone example ============


def photo(path, size, seed):
    """A JPEG photo of ``size`` px: big enough that JPEG draft decoding applies."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)  # smooth blocks, like a photo
    Image.fromarray(small).resize(size, Image.BICUBIC).save(path, quality=90)
    return path


def test_standalone_example_matches_repository(tmp_path):
    code = EXAMPLE.read_text()
    assert len(code.splitlines()) <= 20
    assert not re.search(r"^\s*(import|from)\s+(torch|models|datasets|inference)\b", code, re.M)
    size = 64
    model = models.zero_shot_model("efficientnet_lite0", "imagenet", size)  # offline weights
    path = onnx_export.export_zero_shot("efficientnet_lite0", "imagenet", size, tmp_path / "m.onnx")
    photos = [photo(tmp_path / "a.jpg", (320, 240), 0), photo(tmp_path / "b.jpg", (200, 300), 1)]
    # run it as a user would, and check that it never needed torch
    runner = (
        "import runpy, sys; sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__'); "
        "assert 'torch' not in sys.modules, 'the example imported torch'"
    )
    run = subprocess.run(
        [sys.executable, "-c", runner, str(EXAMPLE), str(path), *map(str, photos)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    cosine = float(re.search(r"cosine similarity: (\S+)", run.stdout).group(1))
    transform = preprocessing.build_transform(size)
    x = torch.stack([transform(load_image(p, preprocessing.draft_size(transform))) for p in photos])
    a, b = ref = torch_embed(model, x)
    assert abs(cosine - float(a @ b)) < TOL
    # real ImageNet weights (realistic activations through the frozen SAME padding): parity too
    assert (inference.OnnxEmbedder(path)(x) - ref).abs().max() < TOL


def test_the_deploy_guide_shows_the_tested_example_verbatim():
    """docs/deploy.md's standalone example is docs/onnx_example.py, the file the test above runs."""
    code = EXAMPLE.read_text().strip()
    assert f"```python\n{code}\n```" in (REPO / "docs" / "deploy.md").read_text()
    assert len(code.splitlines()) <= 20


def test_the_example_crops_as_the_owner_of_the_preprocessing():
    """docs/onnx_example.py keeps its own copy of the centre-crop offset (it needs no repository
    code): it equals preprocessing.crop_offset, which is where torchvision's CenterCrop cuts."""
    (expression,) = re.findall(r"^\s*c = (.+?)\s*$", EXAMPLE.read_text(), re.M)
    for s in (32, 40, 64, 96, 200, 224, 240, 255, 260, 384):
        r = preprocessing.resize_size(s)
        grid = torch.arange(r * r, dtype=torch.float32).reshape(1, r, r)
        cropped = T.CenterCrop(s)(grid)
        c = preprocessing.crop_offset(s)
        assert eval(expression, {"round": round, "int": int}, {"r": r, "s": s}) == c
        assert torch.equal(cropped, grid[:, c : c + s, c : c + s]), s
