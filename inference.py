"""Deployable embedding models: ONNX export (fp32 or static int8) and an onnxruntime embedder
that stands in for the PyTorch network wherever one embeds images.

An exported file is self-describing: input ``images`` (float32, N x 3 x S x S, S the model's
fixed image size, dynamic batch N: ImageNet-normalised RGB), output ``embeddings`` (float32,
N x D, L2-normalised inside the graph), output ``features`` (float32, N x C x H x W: the feature
map that is average-pooled, for similarity maps), and ``metadata_props`` (all strings; lists and dicts as
JSON; ``METADATA_KEYS``)::

    format, format_version  "visual-product-search.embedding", FORMAT_VERSION
    model_key               the checkpoint's sha256, or models.zero_shot_model_key(...)
    checkpoint_sha256       the checkpoint's sha256 ("" for a zero-shot model)
    backbone, head, embedding_size, image_size, parameters
    resize_size, crop_size  preprocessing: PIL Resize((r, r), bilinear) -> CenterCrop(s)
    resize                  that rule in words
    mean, std               per RGB channel, on pixels / 255: x = (pixel / 255 - mean) / std
    input, output           "images", "embeddings"
    precision               "fp32" or "int8"
    calibration             int8 only: {"root", "split", "num_images", "seed"} (JSON)
    model_args              the checkpoint's model_args (JSON)
    checkpoint_info         its epoch, metrics, args, git_commit (JSON; {} for zero-shot)
    torch_version, opset    what exported it

API (onnxruntime and onnx are imported inside the functions that need them: the rest of the
repository works without them)::

    RUNTIMES = ("torch", "onnx")
    default_runtime(device="cpu") -> str     "onnx" on the CPU when onnxruntime and onnx import
    load_embedder(checkpoint=None, runtime="torch", device="cpu", zero_shot=None,
                  precision="fp32") -> torch.nn.Module
        zero_shot = (backbone, weights, image_size) instead of a checkpoint
    ensure_onnx(checkpoint, precision="fp32", calibration_root=None) -> Path
        best.pth -> best.onnx (best.int8.onnx), exported on first use, re-exported when the
        checkpoint's sha256 no longer matches the file's
    onnx_path_for(checkpoint, precision="fp32") -> Path
    export_checkpoint(checkpoint, output, precision="fp32", calibration_root=None) -> Path
    export_onnx(model, output, *, model_key, checkpoint_sha256="", checkpoint_info=None,
                precision="fp32", calibration=None, calibration_info=None) -> Path
    export_zero_shot(backbone, weights, image_size, output, precision="fp32",
                     calibration_root=None) -> Path
    calibration_set(root, image_size, num_images=64, seed=0, splits=None)
        -> (list of NCHW float32 batches, info dict)
    OnnxEmbedder(source, checkpoint=None, num_threads=None)    torch.nn.Module
        .embed_with_features(images) -> (embeddings, feature grid)  (has_features: the export has it)
    read_metadata(path) -> dict
    verify_export(model, embedder, num_images=2, seed=0) -> dict
    OnnxModelError

Wiring a runtime flag into a script (the demo, evaluate.py, shards.py)::

    p.add_argument("--runtime", choices=inference.RUNTIMES, default=None)   # None: the default
    runtime = args.runtime or inference.default_runtime(device)
    model = inference.load_embedder(args.checkpoint, runtime=runtime, device=device)
    embeddings, labels = extraction.extract_embeddings(model, loader)   # unchanged

``OnnxEmbedder`` carries what the code reads from an EmbeddingNet (``model_args``,
``checkpoint_info``, ``embedding_size``, ``parameters()`` for the device: the CPU), so
``extraction.extract_embeddings(embedder, loader)`` and the demo's engine take it unchanged.
``models.count_parameters(embedder)`` is 0: the real count is ``embedder.num_parameters``.

int8 is static quantisation (QDQ: per-channel int8 weights, uint8 activations whose ranges
come from min-max calibration on training images). Measured on GroZi-120 with
EfficientNet-Lite0 at 224 px (2 threads): 1.6x faster than fp32 at batch 1 for 0.3 points of
MAP@R; dynamic quantisation (ConvInteger) was over 50x slower than fp32 and lost 3 points.
"""
from __future__ import annotations

import copy
import errno
import functools
import importlib
import io
import json
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn as nn

import datasets
import checkpoints
import models
import preprocessing
from dataio import catalogue, fileio

logger = logging.getLogger("inference")

RUNTIMES = ("torch", "onnx")
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
METADATA_KEYS = ("format", "format_version", "model_key", "checkpoint_sha256", "backbone", "head",
                 "embedding_size", "image_size", "parameters", "resize_size", "crop_size", "resize",
                 "mean", "std", "input", "output", "precision", "calibration", "model_args",
                 "checkpoint_info", "torch_version", "opset")
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
        raise ImportError(f"runtime 'onnx' (ONNX export and onnxruntime inference) needs the package "
                          f"{pin.split('==')[0]}, which is not installed: pip install {pin} "
                          f"(it is in requirements.txt), or use runtime 'torch'") from e


def _onnxruntime():
    return _import("onnxruntime", ONNXRUNTIME_PIN)


def _onnx():
    return _import("onnx", ONNX_PIN)


RUNTIME_HELP = ("where the network runs: torch (eager PyTorch) or onnx (onnxruntime, CPU only: the "
                "checkpoint is exported beside it on first use, e.g. best.pth -> best.onnx, and "
                "reused while the checkpoint is unchanged). Default: onnx when onnxruntime is "
                "installed and the device is the CPU (several times faster there), else torch")


def add_runtime_arg(parser) -> None:
    """The ``--runtime torch|onnx`` flag of every script that embeds images (default None:
    `resolve_runtime` picks)."""
    parser.add_argument("--runtime", choices=RUNTIMES, default=None, help=RUNTIME_HELP)


def resolve_runtime(runtime, device="cpu") -> str:
    """``runtime`` as asked, or the default for ``device`` (`default_runtime`)."""
    return runtime or default_runtime(device)


def default_runtime(device="cpu") -> str:
    """"onnx" when onnxruntime and onnx (which exporting needs) import and ``device`` is the
    CPU (onnxruntime runs there), else "torch"."""
    if torch.device(device).type != "cpu":
        return "torch"
    try:
        _onnxruntime()
        _onnx()
    except ImportError:
        return "torch"
    return "onnx"


# ============ export: a fixed-size graph ============

def _record_input_size(sizes: dict, module: nn.Module, inputs: tuple) -> None:
    sizes[module] = tuple(int(v) for v in inputs[0].shape[-2:])


def _static_same_conv(conv: nn.Conv2d, input_size: tuple[int, int]) -> nn.Module:
    """timm's Conv2dSame as a plain convolution with the padding it computes for ``input_size``:
    symmetric padding goes into the convolution, asymmetric TF padding becomes a ZeroPad2d."""
    from timm.layers.padding import pad_same_arg
    left, right, top, bottom = pad_same_arg(input_size, conv.weight.shape[-2:], conv.stride,
                                            conv.dilation)
    symmetric = left == right and top == bottom
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      (top, left) if symmetric else 0, conv.dilation, conv.groups,
                      conv.bias is not None)
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
        torch.onnx.export(frozen, (torch.zeros(2, 3, size, size),), buffer,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME, FEATURES_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"},
                                        FEATURES_NAME: {0: "batch"}},
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)
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
    _onnxruntime()
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
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
            quantize_static(pre, dst, _BatchReader(batches), quant_format=QuantFormat.QDQ,
                            per_channel=True, weight_type=QuantType.QInt8,
                            activation_type=QuantType.QUInt8,
                            calibrate_method=CalibrationMethod.MinMax)
        finally:
            logging.getLogger().setLevel(quiet)
        return Path(dst).read_bytes()


def calibration_set(root, image_size: int, num_images: int = CALIBRATION_IMAGES, seed: int = 0,
                    splits: dict | None = None) -> tuple[list[np.ndarray], dict]:
    """(batches, info): ``num_images`` images of the training split of the catalogue at ``root``
    (any layout; ``splits``: SOPDataset's split settings, datasets.split_options of the run),
    drawn at random (``seed``), through the eval transform at ``image_size``, in NCHW float32
    batches of CALIBRATION_BATCH: the calibration set of int8 quantisation. ``info`` is what the
    export records of it ({"root", "split", "num_images", "seed"})."""
    dataset = datasets.SOPDataset(root, "train", transform=preprocessing.build_transform(image_size),
                                  **(splits or {}))
    count = min(int(num_images), len(dataset))
    picks = np.sort(np.random.default_rng(seed).choice(len(dataset), count, replace=False))
    images = np.stack([dataset[int(i)][0].numpy() for i in picks])
    batches = [images[i:i + CALIBRATION_BATCH] for i in range(0, count, CALIBRATION_BATCH)]
    return batches, {"root": str(dataset.root), "split": "train", "num_images": count, "seed": seed}


# ============ export: metadata and the file ============

def _json(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)  # default: tensors, paths in args


def build_metadata(model: nn.Module, *, model_key: str, checkpoint_sha256: str = "",
                   checkpoint_info: dict | None = None, precision: str = "fp32",
                   calibration_info: dict | None = None) -> dict[str, str]:
    """The metadata_props of an export of ``model`` (module docstring), as strings."""
    args = {"head": "mlp", **dict(model.model_args)}
    size = int(args["image_size"])
    return {
        "format": FORMAT, "format_version": str(FORMAT_VERSION),
        "model_key": model_key, "checkpoint_sha256": checkpoint_sha256,
        "backbone": args["backbone"], "head": args["head"],
        "embedding_size": str(int(args["embedding_size"])), "image_size": str(size),
        "parameters": str(models.count_parameters(model)),
        "resize_size": str(preprocessing.resize_size(size)), "crop_size": str(size),
        "resize": f"PIL resize to ({preprocessing.resize_size(size)}, {preprocessing.resize_size(size)}), "
                  f"bilinear (antialiased) -> center crop {size} x {size} "
                  "(offset round((resize_size - crop_size) / 2)) -> RGB / 255 -> (x - mean) / std "
                  "-> NCHW float32",
        "mean": _json(list(preprocessing.IMAGENET_MEAN)), "std": _json(list(preprocessing.IMAGENET_STD)),
        "input": INPUT_NAME, "output": OUTPUT_NAME, "precision": precision,
        "calibration": _json(calibration_info) if calibration_info else "",
        "model_args": _json(args), "checkpoint_info": _json(checkpoint_info or {}),
        "torch_version": torch.__version__, "opset": str(OPSET),
    }


def _with_metadata(model_bytes: bytes, metadata: dict[str, str]) -> bytes:
    onnx = _onnx()
    proto = onnx.load_from_string(model_bytes)
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = FORMAT
    proto.model_version = FORMAT_VERSION
    proto.doc_string = (f"{metadata['backbone']} {metadata['precision']} embedding model: "
                        f"{INPUT_NAME} [N, 3, {metadata['image_size']}, {metadata['image_size']}] -> "
                        f"{OUTPUT_NAME} [N, {metadata['embedding_size']}] (unit vectors)")
    return proto.SerializeToString()


def _check_output(output: Path) -> None:
    """Fail before the (slow) export when ``output`` cannot be written."""
    if output.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"output {output} is a folder; pass a file name "
                                "such as model.onnx", str(output))
    parent = output.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"cannot write {output}: {parent} is a file, not "
                                 "a folder; choose another --output", str(output))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, f"cannot write {output}: no write permission in "
                              f"{parent}; choose another --output", str(output))


def export_onnx(model: nn.Module, output, *, model_key: str, checkpoint_sha256: str = "",
                checkpoint_info: dict | None = None, precision: str = "fp32",
                calibration: list[np.ndarray] | None = None,
                calibration_info: dict | None = None) -> Path:
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
    data = _with_metadata(data, build_metadata(
        model, model_key=model_key, checkpoint_sha256=checkpoint_sha256,
        checkpoint_info=checkpoint_info, precision=precision, calibration_info=calibration_info))
    fileio.atomic_write(output, lambda f: f.write(data))
    return output


def export_checkpoint(checkpoint, output, precision: str = "fp32", calibration_root=None,
                      calibration_images: int = CALIBRATION_IMAGES) -> Path:
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
            root, int(model.model_args["image_size"]), calibration_images,
            splits=datasets.split_options(train_args))
    return export_onnx(model, output, model_key=digest, checkpoint_sha256=digest,
                       checkpoint_info=info, precision=precision, calibration=calibration,
                       calibration_info=calibration_info)


def export_zero_shot(backbone: str, weights: str, image_size: int, output,
                     precision: str = "fp32", calibration_root=None,
                     calibration_images: int = CALIBRATION_IMAGES) -> Path:
    """export_onnx of models.zero_shot_model(backbone, weights, image_size), keyed by
    models.zero_shot_model_key. int8 calibrates on the training split of ``calibration_root``."""
    output = Path(output)
    _check_output(output)
    if precision == "int8" and calibration_root is None:
        raise ValueError("an int8 zero-shot export needs calibration images: pass "
                         "--calibration_root DIR (a catalogue; its training split is used)")
    model = models.zero_shot_model(backbone, weights, int(image_size))
    calibration, calibration_info = (calibration_set(calibration_root, int(image_size),
                                                     calibration_images)
                                     if precision == "int8" else (None, None))
    return export_onnx(model, output, precision=precision, calibration=calibration,
                       model_key=models.zero_shot_model_key(backbone, str(weights), int(image_size)),
                       calibration_info=calibration_info)


def onnx_path_for(checkpoint, precision: str = "fp32") -> Path:
    """Where ensure_onnx keeps the export of ``checkpoint``: beside it, ``best.pth`` ->
    ``best.onnx`` (``best.int8.onnx`` for int8)."""
    checkpoint = Path(checkpoint)
    suffix = ".onnx" if precision == "fp32" else f".{precision}.onnx"
    return checkpoint.with_name(checkpoint.stem + suffix)


def _stale_reason(path: Path, digest: str, precision: str) -> str | None:
    """Why the export at ``path`` cannot serve the checkpoint of sha256 ``digest``, or None."""
    try:
        meta = read_metadata(path)
    except OnnxModelError as e:
        return f"unusable ({e})"
    if meta["checkpoint_sha256"] != digest:
        return "exported from another version of the checkpoint (sha256 differs)"
    if meta["precision"] != precision:
        return f"precision {meta['precision']}, not {precision}"
    return None


def ensure_onnx(checkpoint, precision: str = "fp32", calibration_root=None) -> Path:
    """The ONNX export of ``checkpoint`` beside it (onnx_path_for): reused while its stored
    sha256 is the checkpoint's, exported (atomically) when missing, unreadable or stale."""
    checkpoint = Path(checkpoint)
    path = onnx_path_for(checkpoint, precision)
    if not checkpoint.is_file():
        checkpoints.load_checkpoint(checkpoint)  # raises the error that names the problem
    if path.exists():
        why = _stale_reason(path, checkpoints.checkpoint_hash(checkpoint), precision)
        if why is None:
            return path
        logger.info("%s: %s; exporting it again", path, why)
    else:
        logger.info("Exporting %s to %s (first use)", checkpoint, path)
    return export_checkpoint(checkpoint, path, precision=precision,
                             calibration_root=calibration_root)


# ============ loading ============

def _check_metadata(meta: dict[str, str], where: str) -> dict[str, str]:
    if meta.get("format") != FORMAT:
        raise OnnxModelError(f"{where} is an ONNX model but not an export of this project (no "
                             f"{FORMAT!r} metadata); export one with python export.py")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise OnnxModelError(f"{where} has format_version {meta.get('format_version')!r}; this code "
                             f"reads {FORMAT_VERSION}: export it again with python export.py")
    missing = [k for k in METADATA_KEYS if k not in meta]
    if missing:
        raise OnnxModelError(f"{where} lacks metadata {missing}; export it again with python export.py")
    return meta


def read_metadata(path) -> dict[str, str]:
    """The metadata_props of an exported file, checked (format, version, keys). Raises
    FileNotFoundError or OnnxModelError naming ``path`` (unreadable, truncated, not ours)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, f"ONNX model not found: {path}", str(path))
    onnx = _onnx()
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends: the file is not a whole model
        raise OnnxModelError(f"{path} is not a readable ONNX model ({type(e).__name__}: {e}); it "
                             "may be truncated: export it again with python export.py") from e
    return _check_metadata({p.key: p.value for p in proto.metadata_props}, str(path))


def _session(source, where: str, num_threads: int):
    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(num_threads)
    options.inter_op_num_threads = 1  # one chain of operators: a second pool would only spin
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail / InvalidProtobuf / InvalidGraph
        raise OnnxModelError(f"{where} is not a readable ONNX model ({type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no detail'}); "
                             "it may be truncated: export it again with python export.py") from e


class OnnxEmbedder(nn.Module):
    """An exported embedding model run by onnxruntime (CPUExecutionProvider), as a torch module:
    ``forward(images: float tensor [N, 3, S, S], ImageNet-normalised) -> tensor [N, D]`` of unit
    vectors, on the input's device.

    ``source``: the path of an export (or its bytes). ``checkpoint``: when given, the file must
    have been exported from it (same sha256), else OnnxModelError names both. ``num_threads``:
    onnxruntime's intra-op threads, default torch's thread count (as the torch runtime uses).

    Attributes read elsewhere from an EmbeddingNet: ``model_args``, ``checkpoint_info``,
    ``embedding_size``; also ``metadata`` (read_metadata's dict), ``model_key``, ``precision``,
    ``image_size``, ``num_parameters``, ``path`` (None for bytes).
    """

    def __init__(self, source, checkpoint=None, num_threads: int | None = None):
        super().__init__()
        self.path = None if isinstance(source, (bytes, bytearray)) else Path(source)
        where = "the ONNX model (bytes)" if self.path is None else str(self.path)
        if self.path is not None and not self.path.is_file():
            raise FileNotFoundError(errno.ENOENT, f"ONNX model not found: {self.path}; export it "
                                    "with python export.py", str(self.path))
        self.session = _session(bytes(source) if self.path is None else str(self.path), where,
                                num_threads or torch.get_num_threads())
        self.metadata = _check_metadata(dict(self.session.get_modelmeta().custom_metadata_map), where)
        if checkpoint is not None:
            digest = checkpoints.checkpoint_hash(checkpoint)
            if self.metadata["checkpoint_sha256"] != digest:
                raise OnnxModelError(
                    f"{where} was exported from another checkpoint (sha256 "
                    f"{self.metadata['checkpoint_sha256'][:12] or 'none: zero-shot'}...), not from "
                    f"{checkpoint} ({digest[:12]}...): export it again with python export.py "
                    f"--checkpoint {checkpoint} --output {where}, or pass the matching checkpoint")
        self.model_args = json.loads(self.metadata["model_args"])
        self.checkpoint_info = json.loads(self.metadata["checkpoint_info"])
        self.embedding_size = int(self.metadata["embedding_size"])
        self.image_size = int(self.metadata["image_size"])
        self.model_key = self.metadata["model_key"]
        self.precision = self.metadata["precision"]
        self.num_parameters = int(self.metadata["parameters"])
        self.has_features = FEATURES_NAME in {o.name for o in self.session.get_outputs()}
        # An empty parameter: code that finds the device with next(model.parameters()) sees the
        # CPU, where onnxruntime runs; it holds nothing (the weights live in the session).
        self._device_anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    def _run(self, images: torch.Tensor, outputs: list) -> list:
        s = self.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(f"{self.path or 'this ONNX model'} takes images [N, 3, {s}, {s}] (its "
                             f"export size), got {list(images.shape)}; resize with "
                             f"preprocessing.build_transform({s})")
        # NCHW contiguous float32: extract_embeddings hands over channels_last tensors
        x = images.detach().to("cpu", torch.float32).contiguous().numpy()
        return [torch.from_numpy(out).to(images.device) for out in self.session.run(outputs, {INPUT_NAME: x})]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._run(images, [OUTPUT_NAME])[0]

    def embed_with_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings [N, D], feature grid [N, C, H, W]) in one run; exports without the
        ``features`` output (``has_features`` False) raise OnnxModelError."""
        if not self.has_features:
            raise OnnxModelError(f"{self.path or 'this ONNX model'} was exported without its feature "
                                 "map output; export it again with python export.py")
        embedding, grid = self._run(images, [OUTPUT_NAME, FEATURES_NAME])
        return embedding, grid

    def extra_repr(self) -> str:
        return (f"{self.metadata['backbone']} {self.image_size}px -> {self.embedding_size}-d, "
                f"{self.precision}, {self.path or 'in memory'}")


def _cpu_only(device) -> None:
    if torch.device(device).type != "cpu":
        raise ValueError(f"runtime 'onnx' runs on the CPU (onnxruntime's CPUExecutionProvider), "
                         f"not {device}; use runtime 'torch' for {device}")


def load_embedder(checkpoint=None, runtime: str = "torch", device="cpu", zero_shot=None,
                  precision: str = "fp32") -> nn.Module:
    """The embedding model of ``checkpoint``, or of ``zero_shot`` = (backbone, weights,
    image_size) (models.zero_shot_model), in eval mode, on ``runtime``:

    torch  the EmbeddingNet (models.load_model / models.zero_shot_model) on ``device``;
    onnx   an OnnxEmbedder (CPU only): a checkpoint's export beside it (ensure_onnx; int8
           calibrates on the checkpoint's training data); a zero-shot model is exported in
           memory at each call (about a second; there is no file to key a cache on), fp32 only.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if (checkpoint is None) == (zero_shot is None):
        raise ValueError("pass a checkpoint or zero_shot=(backbone, weights, image_size), not both")
    if runtime == "torch":
        if checkpoint is not None:
            return models.load_model(checkpoint, device=device)
        return models.zero_shot_model(*zero_shot, device=device)
    _onnxruntime()  # the ImportError that says what to install, before any slow work
    _onnx()
    _cpu_only(device)
    if checkpoint is not None:
        return OnnxEmbedder(ensure_onnx(checkpoint, precision=precision))
    if precision != "fp32":
        raise ValueError("an int8 zero-shot model needs calibration images: export it with "
                         "python export.py --zero_shot ... --int8 --calibration_root DIR and load "
                         "it with inference.OnnxEmbedder(path)")
    backbone, weights, image_size = zero_shot
    model = models.zero_shot_model(backbone, weights, int(image_size))
    key = models.zero_shot_model_key(backbone, str(weights), int(image_size))
    data = _with_metadata(onnx_bytes(model), build_metadata(model, model_key=key))
    return OnnxEmbedder(data)


def verify_export(model: nn.Module, embedder: OnnxEmbedder, num_images: int = 2,
                  seed: int = 0) -> dict:
    """Compare ``embedder`` with the torch ``model`` it was exported from on random inputs:
    {"max_abs_diff", "min_cosine"} (fp32 exports: ~1e-6 and 1.0)."""
    size = embedder.image_size
    x = torch.randn(num_images, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        ref = checkpoints.unwrap_model(model).cpu().float().eval()(x)
        out = embedder(x)
    return {"max_abs_diff": float((out - ref).abs().max()),
            "min_cosine": float((out * ref).sum(1).min())}
