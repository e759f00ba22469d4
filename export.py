"""Export a trained model (or a pretrained backbone alone) to a self-describing ONNX file.

    python export.py --checkpoint checkpoints/<run>/best.pth [--output best.onnx]
    python export.py --checkpoint checkpoints/<run>/best.pth --int8 [--calibration_root DIR]
    python export.py --zero_shot --backbone efficientnet_lite0 [--weights imagenet|none]
                     [--image_size 224] --output lite0.onnx

The file takes ``images`` (float32 [N, 3, S, S], ImageNet-normalised RGB, N any) and returns
``embeddings`` ([N, D] unit vectors); its metadata holds the preprocessing (resize side, crop,
mean, std), the model's arguments and the checkpoint's sha256 (inference.py's docstring lists
every key). onnxruntime, PIL and numpy are then enough to embed photos: docs/onnx_example.py.

``--int8``: static int8 quantisation, calibrated on training images (default: the data the
checkpoint was trained on). The file is written atomically: no half-written .onnx ever exists.
After writing, the export is compared with the PyTorch model on random inputs and the
difference printed.
"""

from __future__ import annotations

import argparse
import logging
import sys

import backbones
import checkpoints
from dataio import catalogue
import inference
import models
import onnx_export
from training import evaluation


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    src = p.add_argument_group("model (one of)")
    src.add_argument(
        "--checkpoint",
        default=None,
        help="checkpoints/<run>/best.pth (or last.pth): it holds everything to rebuild the network",
    )
    evaluation.add_zero_shot_args(
        src, "export --backbone's pooled, L2-normalised features (no head) instead; the graph is fixed to --image_size"
    )
    p.add_argument(
        "--output",
        default=None,
        help="the .onnx file to write (default with --checkpoint: beside it, best.pth -> "
        "best.onnx, or best.int8.onnx with --int8)",
    )
    q = p.add_argument_group("int8 quantisation")
    q.add_argument(
        "--int8",
        action="store_true",
        help="static int8 quantisation (about 1.6x faster on CPU, a few tenths of a point of MAP@R); off by default",
    )
    q.add_argument(
        "--calibration_root",
        default=None,
        help="catalogue whose training split calibrates --int8 (default: the "
        "checkpoint's training data; required with --zero_shot)",
    )
    q.add_argument(
        "--calibration_images",
        type=int,
        default=onnx_export.CALIBRATION_IMAGES,
        help="training images to calibrate on (default %(default)s)",
    )
    return p


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if bool(args.checkpoint) == bool(args.zero_shot):
        parser.error("pass --checkpoint PATH or --zero_shot --backbone NAME (one of them)")
    if args.zero_shot and not args.backbone:
        parser.error("--zero_shot needs --backbone")
    if args.zero_shot and not args.output:
        parser.error("--zero_shot needs --output (there is no checkpoint to write beside)")
    if args.zero_shot and args.int8 and not args.calibration_root:
        parser.error("--zero_shot --int8 needs --calibration_root DIR (calibration images)")
    if args.calibration_images < 1:
        parser.error("--calibration_images must be >= 1")


def export(args: argparse.Namespace):
    """Write the export args ask for; returns (path, the torch model it came from)."""
    precision = "int8" if args.int8 else "fp32"
    common = dict(
        precision=precision, calibration_root=args.calibration_root, calibration_images=args.calibration_images
    )
    if args.zero_shot:
        path = onnx_export.export_zero_shot(args.backbone, args.weights, args.image_size, args.output, **common)
        return path, models.zero_shot_model(args.backbone, args.weights, args.image_size)
    output = args.output or inference.onnx_path_for(args.checkpoint, precision)
    path = onnx_export.export_checkpoint(args.checkpoint, output, **common)
    return path, models.load_model(args.checkpoint)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        path, model = export(args)
        embedder = inference.OnnxEmbedder(path)
    except (
        OSError,
        ImportError,
        ValueError,
        checkpoints.CheckpointError,
        onnx_export.OnnxModelError,
        backbones.WeightsUnavailableError,
        catalogue.DatasetError,
    ) as e:
        # OSError: a missing checkpoint, an unwritable output; every message names the file
        # and says what to do next
        raise SystemExit(f"export.py: {e}") from None
    check = inference.verify_export(model, embedder)
    meta = embedder.metadata
    print(
        f"Wrote {path} ({path.stat().st_size / 2**20:.1f} MB): {meta['backbone']}, "
        f"{meta['image_size']} px -> {meta['embedding_size']}-d, {meta['precision']}, "
        f"model key {meta['model_key'][:24]}"
    )
    print(
        f"onnxruntime vs PyTorch on random inputs: max |difference| {check['max_abs_diff']:.2e}, "
        f"min cosine {check['min_cosine']:.6f}"
    )
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
