"""ONNX export of an embedding network: a fixed-size fp32 graph (or static int8), with the
metadata that makes the file self-describing (inference.py's docstring lists it).

The graph has input ``images`` and outputs ``embeddings`` (``EmbeddingNet.forward_head``) and
``features`` (``EmbeddingNet.forward_features``: the grid similarity maps decompose).
onnx and onnxruntime are imported inside the functions that need them (``import_onnx``,
``import_onnxruntime``): the rest of the repository works without them.
"""

from __future__ import annotations

from collections.abc import Iterable
import copy
import errno
import functools
import importlib
import io
import json
import logging
import os
from pathlib import Path
import sys
import tempfile
import warnings

import numpy as np
import torch
import torch.nn as nn

import checkpoints
from dataio import catalogue, fileio
import datasets
import models
import preprocessing

PRECISIONS = ("fp32", "int8")
FORMAT = "visual-product-search.embedding"
FORMAT_VERSION = 1
INPUT_NAME, OUTPUT_NAME = "images", "embeddings"
# Second output: the backbone's last feature map (the global pooling's input), what similarity
# maps (explain.py) decompose. onnxruntime computes it anyway on the way to the embedding; it is
# copied out only when asked for. Exports made before it have one output (has_features False).
FEATURES_NAME = "features"
# 17: supported by every onnxruntime since 1.14 and by most other runtimes (deploy anywhere).
OPSET = 17
# Keep in step with requirements.txt (a test checks).
ONNXRUNTIME_PIN = "onnxruntime==1.32.0"
ONNX_PIN = "onnx==1.23.2"
METADATA_KEYS = (
    "format",
    "format_version",
    "model_key",
    "checkpoint_sha256",
    "backbone",
    "head",
    "embedding_size",
    "image_size",
    "parameters",
    "resize_size",
    "crop_size",
    "resize",
    "mean",
    "std",
    "input",
    "output",
    "precision",
    "calibration",
    "model_args",
    "checkpoint_info",
    "torch_version",
    "opset",
)
# Calibration: 64 training images measured as good as 128 (GroZi-120, Lite0 at 224 px).
CALIBRATION_IMAGES = 64
CALIBRATION_BATCH = 8


class OnnxModelError(RuntimeError):
    """An ONNX file exists but is refused: unreadable, not ours, another format version, or
    exported from another checkpoint than the one beside it."""


# ============ optional dependencies ============


def _import(module: str, pin: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"runtime 'onnx' (ONNX export and onnxruntime inference) needs the package "
            f"{pin.split('==')[0]}, which is not installed: pip install {pin} "
            f"(it is in requirements.txt), or use runtime 'torch'"
        ) from e


def import_onnxruntime():
    """The onnxruntime module, or ImportError saying what to install."""
    return _import("onnxruntime", ONNXRUNTIME_PIN)


def import_onnx():
    """The onnx module, or ImportError saying what to install."""
    return _import("onnx", ONNX_PIN)


# ============ export: a fixed-size graph ============


def _record_input_size(sizes: dict, module: nn.Module, inputs: tuple) -> None:
    sizes[module] = tuple(int(v) for v in inputs[0].shape[-2:])


def _static_same_conv(conv: nn.Conv2d, input_size: tuple[int, int]) -> nn.Module:
    """timm's Conv2dSame as a plain convolution with the padding it computes for ``input_size``:
    symmetric padding goes into the convolution, asymmetric TF padding becomes a ZeroPad2d."""
    from timm.layers.padding import pad_same_arg

    left, right, top, bottom = pad_same_arg(input_size, conv.weight.shape[-2:], conv.stride, conv.dilation)
    symmetric = left == right and top == bottom
    plain = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        (top, left) if symmetric else 0,
        conv.dilation,
        conv.groups,
        conv.bias is not None,
    )
    plain.load_state_dict(conv.state_dict())
    return plain if symmetric else nn.Sequential(nn.ZeroPad2d((left, right, top, bottom)), plain)


def freeze_same_padding(model: nn.Module, image_size: int) -> nn.Module:
    """A CPU float32 eval-mode copy of ``model`` in which every TF-"SAME" convolution (timm's
    Conv2dSame, used by EfficientNet-Lite) has the constant padding it computes for an
    ``image_size`` input. Same outputs at that size; the exported graph then holds constant pads
    instead of shape arithmetic on every call: faster, and int8 calibration sees plain
    convolutions (quantised with the shape arithmetic in place, Lite0 lost 2 points of MAP@R)."""
    model = copy.deepcopy(checkpoints.unwrap_model(model)).cpu().float().eval()
    if "timm" not in sys.modules:  # only timm builds SAME convolutions: no timm, none to freeze
        return model
    from timm.layers import Conv2dSame

    same = [m for m in model.modules() if isinstance(m, Conv2dSame)]
    if not same:
        return model
    sizes: dict = {}
    hooks = [m.register_forward_pre_hook(functools.partial(_record_input_size, sizes)) for m in same]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size))
    finally:
        for hook in hooks:
            hook.remove()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv2dSame):
                setattr(parent, name, _static_same_conv(child, sizes[child]))
    return model


class _WithFeatures(nn.Module):
    """An EmbeddingNet that also returns its feature grid: x -> (embedding, pooling input)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        grid = self.model.forward_features(x)
        return self.model.forward_head(grid), grid


def onnx_bytes(model: nn.Module) -> bytes:
    """The fp32 ONNX graph of ``model`` (an EmbeddingNet) at its model_args' image size, batch
    axis dynamic, without metadata: outputs ``embeddings`` and ``features``."""
    size = int(model.model_args["image_size"])
    frozen = _WithFeatures(freeze_same_padding(model, size))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter (dynamo=False) is deprecated in favour of torch.export, which
        # needs onnxscript and took 7x longer for Lite0; this one exports the same graph and
        # parity is tested. Its deprecation notices would only alarm users.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*feature will be removed.*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # ZeroPad2d's pads pass through a reversing Slice that torch does not fold;
        # onnxruntime folds it when it loads the model
        warnings.filterwarnings("ignore", message=".*Only steps=1 can be constant folded.*")
        # batch 2, not 1: nothing in the trace may specialise on a batch of one
        torch.onnx.export(
            frozen,
            (torch.zeros(2, 3, size, size),),
            buffer,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME, FEATURES_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}, FEATURES_NAME: {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    return buffer.getvalue()


# ============ export: int8 ============


class _BatchReader:
    """onnxruntime's CalibrationDataReader protocol over a list of NCHW float32 batches."""

    def __init__(self, batches: Iterable[np.ndarray]):
        self._batches = iter(batches)

    def get_next(self):
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: np.ascontiguousarray(batch, np.float32)}


def quantize_int8(model_bytes: bytes, batches: list[np.ndarray]) -> bytes:
    """Static int8 quantisation of an fp32 graph: QDQ format, per-channel int8 weights, uint8
    activations with min-max ranges over ``batches`` (NCHW float32 arrays, as the model takes).
    onnxruntime runs the result with integer convolutions (QLinearConv)."""
    if not batches:
        raise ValueError("int8 quantisation needs calibration images; got none")
    import_onnxruntime()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # Only file paths go in and out of the quantiser: a private folder, never the output's.
    with tempfile.TemporaryDirectory(prefix="int8-") as tmp:
        src, pre, dst = (os.path.join(tmp, n) for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        Path(src).write_bytes(model_bytes)
        quiet = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # the quantiser logs every tensor it skips
        try:
            # shape inference + graph optimisation first, as onnxruntime recommends
            quant_pre_process(src, pre, skip_symbolic_shape=True)
            quantize_static(
                pre,
                dst,
                _BatchReader(batches),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                weight_type=QuantType.QInt8,
                activation_type=QuantType.QUInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
        finally:
            logging.getLogger().setLevel(quiet)
        return Path(dst).read_bytes()


def calibration_set(
    root, image_size: int, num_images: int = CALIBRATION_IMAGES, seed: int = 0, splits: dict | None = None
) -> tuple[list[np.ndarray], dict]:
    """(batches, info): ``num_images`` images of the training split of the catalogue at ``root``
    (any layout; ``splits``: SOPDataset's split settings, datasets.split_options of the run),
    drawn at random (``seed``), through the eval transform at ``image_size``, in NCHW float32
    batches of CALIBRATION_BATCH: the calibration set of int8 quantisation. ``info`` is what the
    export records of it ({"root", "split", "num_images", "seed"})."""
    dataset = datasets.SOPDataset(root, "train", transform=preprocessing.build_transform(image_size), **(splits or {}))
    count = min(int(num_images), len(dataset))
    picks = np.sort(np.random.default_rng(seed).choice(len(dataset), count, replace=False))
    images = np.stack([dataset[int(i)][0].numpy() for i in picks])
    batches = [images[i : i + CALIBRATION_BATCH] for i in range(0, count, CALIBRATION_BATCH)]
    return batches, {"root": str(dataset.root), "split": "train", "num_images": count, "seed": seed}


# ============ export: metadata and the file ============


def _json(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)  # default: tensors, paths in args


def build_metadata(
    model: nn.Module,
    *,
    model_key: str,
    checkpoint_sha256: str = "",
    checkpoint_info: dict | None = None,
    precision: str = "fp32",
    calibration_info: dict | None = None,
) -> dict[str, str]:
    """The metadata_props of an export of ``model`` (module docstring), as strings."""
    args = {"head": "mlp", **dict(model.model_args)}
    size = int(args["image_size"])
    return {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "model_key": model_key,
        "checkpoint_sha256": checkpoint_sha256,
        "backbone": args["backbone"],
        "head": args["head"],
        "embedding_size": str(int(args["embedding_size"])),
        "image_size": str(size),
        "parameters": str(models.count_parameters(model)),
        "resize_size": str(preprocessing.resize_size(size)),
        "crop_size": str(size),
        "resize": f"PIL resize to ({preprocessing.resize_size(size)}, {preprocessing.resize_size(size)}), "
        f"bilinear (antialiased) -> center crop {size} x {size} "
        "(offset round((resize_size - crop_size) / 2)) -> RGB / 255 -> (x - mean) / std "
        "-> NCHW float32",
        "mean": _json(list(preprocessing.IMAGENET_MEAN)),
        "std": _json(list(preprocessing.IMAGENET_STD)),
        "input": INPUT_NAME,
        "output": OUTPUT_NAME,
        "precision": precision,
        "calibration": _json(calibration_info) if calibration_info else "",
        "model_args": _json(args),
        "checkpoint_info": _json(checkpoint_info or {}),
        # optional key (exports of earlier code lack it): the threshold for any ONNX runtime's user
        "match": _json((checkpoint_info or {}).get("match")) if (checkpoint_info or {}).get("match") else "",
        "torch_version": torch.__version__,
        "opset": str(OPSET),
    }


def with_metadata(model_bytes: bytes, metadata: dict[str, str]) -> bytes:
    onnx = import_onnx()
    proto = onnx.load_from_string(model_bytes)
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = FORMAT
    proto.model_version = FORMAT_VERSION
    proto.doc_string = (
        f"{metadata['backbone']} {metadata['precision']} embedding model: "
        f"{INPUT_NAME} [N, 3, {metadata['image_size']}, {metadata['image_size']}] -> "
        f"{OUTPUT_NAME} [N, {metadata['embedding_size']}] (unit vectors)"
    )
    return proto.SerializeToString()


def _check_output(output: Path) -> None:
    """Fail before the (slow) export when ``output`` cannot be written."""
    if output.is_dir():
        raise IsADirectoryError(
            errno.EISDIR, f"output {output} is a folder; pass a file name such as model.onnx", str(output)
        )
    parent = output.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(
            errno.ENOTDIR,
            f"cannot write {output}: {parent} is a file, not a folder; choose another --output",
            str(output),
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(
            errno.EACCES,
            f"cannot write {output}: no write permission in {parent}; choose another --output",
            str(output),
        )


def export_onnx(
    model: nn.Module,
    output,
    *,
    model_key: str,
    checkpoint_sha256: str = "",
    checkpoint_info: dict | None = None,
    precision: str = "fp32",
    calibration: list[np.ndarray] | None = None,
    calibration_info: dict | None = None,
) -> Path:
    """Write ``model`` (an EmbeddingNet) as a self-describing ONNX file at ``output``, atomically
    (fileio.atomic_write: no half-written file ever exists under that name). ``precision`` int8
    needs ``calibration`` (calibration_set) and records ``calibration_info``. Returns the path.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "int8" and not calibration:
        raise ValueError("precision int8 needs calibration images (calibration_set)")
    output = Path(output)
    _check_output(output)
    data = onnx_bytes(model)
    if precision == "int8":
        data = quantize_int8(data, calibration)
    data = with_metadata(
        data,
        build_metadata(
            model,
            model_key=model_key,
            checkpoint_sha256=checkpoint_sha256,
            checkpoint_info=checkpoint_info,
            precision=precision,
            calibration_info=calibration_info,
        ),
    )
    fileio.atomic_write(output, lambda f: f.write(data))
    return output


def export_checkpoint(
    checkpoint, output, precision: str = "fp32", calibration_root=None, calibration_images: int = CALIBRATION_IMAGES
) -> Path:
    """export_onnx of the network in ``checkpoint``, keyed by the checkpoint's sha256. int8
    calibrates on the training split of ``calibration_root`` (default: the data the checkpoint
    was trained on, with its split settings)."""
    checkpoint, output = Path(checkpoint), Path(output)
    _check_output(output)
    model = models.load_model(checkpoint)  # names the file when it is not a checkpoint
    digest = checkpoints.checkpoint_hash(checkpoint)
    info = dict(model.checkpoint_info)
    calibration, calibration_info = None, None
    if precision == "int8":
        train_args = info.get("args") or {}
        root = calibration_root or catalogue.default_data_root(train_args)
        calibration, calibration_info = calibration_set(
            root, int(model.model_args["image_size"]), calibration_images, splits=datasets.split_options(train_args)
        )
    return export_onnx(
        model,
        output,
        model_key=digest,
        checkpoint_sha256=digest,
        checkpoint_info=info,
        precision=precision,
        calibration=calibration,
        calibration_info=calibration_info,
    )


def export_zero_shot(
    backbone: str,
    weights: str,
    image_size: int,
    output,
    precision: str = "fp32",
    calibration_root=None,
    calibration_images: int = CALIBRATION_IMAGES,
) -> Path:
    """export_onnx of models.zero_shot_model(backbone, weights, image_size), keyed by
    models.zero_shot_model_key. int8 calibrates on the training split of ``calibration_root``."""
    output = Path(output)
    _check_output(output)
    if precision == "int8" and calibration_root is None:
        raise ValueError(
            "an int8 zero-shot export needs calibration images: pass "
            "--calibration_root DIR (a catalogue; its training split is used)"
        )
    model = models.zero_shot_model(backbone, weights, int(image_size))
    calibration, calibration_info = (
        calibration_set(calibration_root, int(image_size), calibration_images) if precision == "int8" else (None, None)
    )
    return export_onnx(
        model,
        output,
        precision=precision,
        calibration=calibration,
        model_key=models.zero_shot_model_key(backbone, str(weights), int(image_size)),
        calibration_info=calibration_info,
    )
