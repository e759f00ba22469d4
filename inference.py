"""Deployable embedding models: an onnxruntime embedder that stands in for the PyTorch network
wherever one embeds images, the runtime flag, and the export kept beside a checkpoint.

An exported file is self-describing: input ``images`` (float32, N x 3 x S x S, S the model's
fixed image size, dynamic batch N: ImageNet-normalised RGB), output ``embeddings`` (float32,
N x D, L2-normalised inside the graph), output ``features`` (float32, N x C x H x W: the feature
map that is average-pooled, for similarity maps), and ``metadata_props`` (all strings; lists and dicts as
JSON; ``onnx_export.METADATA_KEYS``)::

    format, format_version  "visual-product-search.embedding", onnx_export.FORMAT_VERSION
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
    match                   the same-product threshold record {"threshold", "target_fmr",
                            "fitted_on"} (JSON; "" when the checkpoint has none; optional)
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
    OnnxEmbedder(source, checkpoint=None, num_threads=None)    torch.nn.Module
        .embed_with_features(images) -> (embeddings, feature grid)  (has_features: the export has it)
    read_metadata(path) -> dict
    verify_export(model, embedder, num_images=2, seed=0) -> dict

Writing an export (export_checkpoint, export_onnx, export_zero_shot, calibration_set, the
format's constants and OnnxModelError) is ``onnx_export``'s.

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

import errno
import json
import logging
from pathlib import Path

import torch
import torch.nn as nn

import checkpoints
import models
import onnx_export

logger = logging.getLogger("inference")

RUNTIMES = ("torch", "onnx")


RUNTIME_HELP = (
    "where the network runs: torch (eager PyTorch) or onnx (onnxruntime, CPU only: the "
    "checkpoint is exported beside it on first use, e.g. best.pth -> best.onnx, and "
    "reused while the checkpoint is unchanged). Default: onnx when onnxruntime is "
    "installed and the device is the CPU (several times faster there), else torch"
)


def add_runtime_arg(parser) -> None:
    """The ``--runtime torch|onnx`` flag of every script that embeds images (default None:
    `resolve_runtime` picks)."""
    parser.add_argument("--runtime", choices=RUNTIMES, default=None, help=RUNTIME_HELP)


def resolve_runtime(runtime, device="cpu") -> str:
    """``runtime`` as asked, or the default for ``device`` (`default_runtime`)."""
    return runtime or default_runtime(device)


def default_runtime(device="cpu") -> str:
    """ "onnx" when onnxruntime and onnx (which exporting needs) import and ``device`` is the
    CPU (onnxruntime runs there), else "torch"."""
    if torch.device(device).type != "cpu":
        return "torch"
    try:
        onnx_export.import_onnxruntime()
        onnx_export.import_onnx()
    except ImportError:
        return "torch"
    return "onnx"


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
    except onnx_export.OnnxModelError as e:
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
    return onnx_export.export_checkpoint(checkpoint, path, precision=precision, calibration_root=calibration_root)


# ============ loading ============


def _check_metadata(meta: dict[str, str], where: str) -> dict[str, str]:
    if meta.get("format") != onnx_export.FORMAT:
        raise onnx_export.OnnxModelError(
            f"{where} is an ONNX model but not an export of this project (no "
            f"{onnx_export.FORMAT!r} metadata); export one with python export.py"
        )
    if meta.get("format_version") != str(onnx_export.FORMAT_VERSION):
        raise onnx_export.OnnxModelError(
            f"{where} has format_version {meta.get('format_version')!r}; this code "
            f"reads {onnx_export.FORMAT_VERSION}: export it again with python export.py"
        )
    missing = [k for k in onnx_export.METADATA_KEYS if k not in meta]
    if missing:
        raise onnx_export.OnnxModelError(f"{where} lacks metadata {missing}; export it again with python export.py")
    return meta


def read_metadata(path) -> dict[str, str]:
    """The metadata_props of an exported file, checked (format, version, keys). Raises
    FileNotFoundError or onnx_export.OnnxModelError naming ``path`` (unreadable, truncated, not ours)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, f"ONNX model not found: {path}", str(path))
    onnx = onnx_export.import_onnx()
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends: the file is not a whole model
        raise onnx_export.OnnxModelError(
            f"{path} is not a readable ONNX model ({type(e).__name__}: {e}); it "
            "may be truncated: export it again with python export.py"
        ) from e
    return _check_metadata({p.key: p.value for p in proto.metadata_props}, str(path))


def _session(source, where: str, num_threads: int):
    ort = onnx_export.import_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(num_threads)
    options.inter_op_num_threads = 1  # one chain of operators: a second pool would only spin
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail / InvalidProtobuf / InvalidGraph
        raise onnx_export.OnnxModelError(
            f"{where} is not a readable ONNX model ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no detail'}); "
            "it may be truncated: export it again with python export.py"
        ) from e


class OnnxEmbedder(nn.Module):
    """An exported embedding model run by onnxruntime (CPUExecutionProvider), as a torch module:
    ``forward(images: float tensor [N, 3, S, S], ImageNet-normalised) -> tensor [N, D]`` of unit
    vectors, on the input's device.

    ``source``: the path of an export (or its bytes). ``checkpoint``: when given, the file must
    have been exported from it (same sha256), else onnx_export.OnnxModelError names both. ``num_threads``:
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
            raise FileNotFoundError(
                errno.ENOENT, f"ONNX model not found: {self.path}; export it with python export.py", str(self.path)
            )
        self.session = _session(
            bytes(source) if self.path is None else str(self.path), where, num_threads or torch.get_num_threads()
        )
        self.metadata = _check_metadata(dict(self.session.get_modelmeta().custom_metadata_map), where)
        if checkpoint is not None:
            digest = checkpoints.checkpoint_hash(checkpoint)
            if self.metadata["checkpoint_sha256"] != digest:
                raise onnx_export.OnnxModelError(
                    f"{where} was exported from another checkpoint (sha256 "
                    f"{self.metadata['checkpoint_sha256'][:12] or 'none: zero-shot'}...), not from "
                    f"{checkpoint} ({digest[:12]}...): export it again with python export.py "
                    f"--checkpoint {checkpoint} --output {where}, or pass the matching checkpoint"
                )
        self.model_args = json.loads(self.metadata["model_args"])
        self.checkpoint_info = json.loads(self.metadata["checkpoint_info"])
        self.embedding_size = int(self.metadata["embedding_size"])
        self.image_size = int(self.metadata["image_size"])
        self.model_key = self.metadata["model_key"]
        self.precision = self.metadata["precision"]
        self.num_parameters = int(self.metadata["parameters"])
        self.has_features = onnx_export.FEATURES_NAME in {o.name for o in self.session.get_outputs()}
        # An empty parameter: code that finds the device with next(model.parameters()) sees the
        # CPU, where onnxruntime runs; it holds nothing (the weights live in the session).
        self._device_anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    def _run(self, images: torch.Tensor, outputs: list) -> list:
        s = self.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(
                f"{self.path or 'this ONNX model'} takes images [N, 3, {s}, {s}] (its "
                f"export size), got {list(images.shape)}; resize with "
                f"preprocessing.build_transform({s})"
            )
        # NCHW contiguous float32: extract_embeddings hands over channels_last tensors
        x = images.detach().to("cpu", torch.float32).contiguous().numpy()
        results = self.session.run(outputs, {onnx_export.INPUT_NAME: x})
        return [torch.from_numpy(out).to(images.device) for out in results]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._run(images, [onnx_export.OUTPUT_NAME])[0]

    def embed_with_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings [N, D], feature grid [N, C, H, W]) in one run; exports without the
        ``features`` output (``has_features`` False) raise onnx_export.OnnxModelError."""
        if not self.has_features:
            raise onnx_export.OnnxModelError(
                f"{self.path or 'this ONNX model'} was exported without its feature "
                "map output; export it again with python export.py"
            )
        embedding, grid = self._run(images, [onnx_export.OUTPUT_NAME, onnx_export.FEATURES_NAME])
        return embedding, grid

    def extra_repr(self) -> str:
        return (
            f"{self.metadata['backbone']} {self.image_size}px -> {self.embedding_size}-d, "
            f"{self.precision}, {self.path or 'in memory'}"
        )


def _cpu_only(device) -> None:
    if torch.device(device).type != "cpu":
        raise ValueError(
            f"runtime 'onnx' runs on the CPU (onnxruntime's CPUExecutionProvider), "
            f"not {device}; use runtime 'torch' for {device}"
        )


def load_embedder(
    checkpoint=None, runtime: str = "torch", device="cpu", zero_shot=None, precision: str = "fp32"
) -> nn.Module:
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
    onnx_export.import_onnxruntime()  # the ImportError that says what to install, before any slow work
    onnx_export.import_onnx()
    _cpu_only(device)
    if checkpoint is not None:
        return OnnxEmbedder(ensure_onnx(checkpoint, precision=precision))
    if precision != "fp32":
        raise ValueError(
            "an int8 zero-shot model needs calibration images: export it with "
            "python export.py --zero_shot ... --int8 --calibration_root DIR and load "
            "it with inference.OnnxEmbedder(path)"
        )
    backbone, weights, image_size = zero_shot
    model = models.zero_shot_model(backbone, weights, int(image_size))
    key = models.zero_shot_model_key(backbone, str(weights), int(image_size))
    data = onnx_export.with_metadata(onnx_export.onnx_bytes(model), onnx_export.build_metadata(model, model_key=key))
    return OnnxEmbedder(data)


def verify_export(model: nn.Module, embedder: OnnxEmbedder, num_images: int = 2, seed: int = 0) -> dict:
    """Compare ``embedder`` with the torch ``model`` it was exported from on random inputs:
    {"max_abs_diff", "min_cosine"} (fp32 exports: ~1e-6 and 1.0)."""
    size = embedder.image_size
    x = torch.randn(num_images, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        ref = checkpoints.unwrap_model(model).cpu().float().eval()(x)
        out = embedder(x)
    return {"max_abs_diff": float((out - ref).abs().max()), "min_cosine": float((out * ref).sum(1).min())}
