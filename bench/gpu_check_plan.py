"""bench/gpu_check.py's plan: the steps, which need the synthetic data, and each step's exact
commands (train.py, torchrun, evaluate.py, export.py, bench_throughput.py) or the description
of its in-process call. Pure: paths and command lines only, nothing touches the disk.
"""

from __future__ import annotations

from pathlib import Path
import shlex
import sys

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train.py"
EVALUATE = REPO / "evaluate.py"
BENCH = REPO / "bench" / "bench_throughput.py"
EXPORT = REPO / "export.py"

STEPS = (
    "synthetic_data",
    "train_amp_resume_eval",
    "train_default_recipe",
    "torchrun_ddp",
    "deterministic_twice",
    "bench_throughput",
    "search_query",
    "export_serving",
)
# Steps that read <workdir>/sop; synthetic_data is run first whenever one of them is selected.
NEEDS_DATA = {
    "train_amp_resume_eval",
    "train_default_recipe",
    "torchrun_ddp",
    "deterministic_twice",
    "search_query",
    "export_serving",
}
# The default recipe of --weights imagenet from random weights (no download); its warm-up ends
# inside epoch 1, so DDP changes phase within an epoch.
RECIPE_FLAGS = ("--recipe", "pretrained", "--warmup_epochs", "0.5")


def selected_steps(spec: str) -> list[str]:
    """The --steps list in STEPS order, with synthetic_data added when a step needs the data."""
    names = {s.strip() for s in spec.split(",") if s.strip()}
    unknown = sorted(names - set(STEPS))
    if unknown or not names:
        raise ValueError(f"--steps: unknown {unknown or 'empty list'}; choose from {', '.join(STEPS)}")
    if names & NEEDS_DATA:
        names.add("synthetic_data")
    return [s for s in STEPS if s in names]


def train_argv(args, workdir: Path, run: str, epochs: int, *extra: str) -> list[str]:
    """`python train.py ...` on the synthetic SOP with AMP and channels_last, outputs under workdir."""
    return [
        sys.executable,
        str(TRAIN),
        "--dataset",
        "synthetic",
        "--data_root",
        str(workdir / "sop"),
        "--backbone",
        args.backbone,
        "--weights",
        "none",
        "--image_size",
        str(args.image_size),
        "--batch_size",
        str(args.batch_size),
        "--epochs",
        str(epochs),
        "--embedding_size",
        str(args.embedding_size),
        "--max_steps_per_epoch",
        str(args.max_steps_per_epoch),
        "--amp",
        "--channels_last",
        "--device",
        args.device,
        "--run_name",
        run,
        "--checkpoint_dir",
        str(workdir / "checkpoints"),
        "--log_dir",
        str(workdir / "runs"),
        # no TensorBoard projector: thumbnails are CPU work that tests nothing on the GPU
        "--projector_samples",
        "0",
        "--no-progress",
        *extra,
    ]


def nproc(args) -> int:
    """--nproc_per_node, 0 resolved: the CUDA devices up to 2 (1 without CUDA)."""
    if args.nproc_per_node:
        return args.nproc_per_node
    import torch

    return max(1, min(2, torch.cuda.device_count())) if args.device.startswith("cuda") else 1


def torchrun_argv(args, workdir: Path, run: str, epochs: int, *extra: str) -> list[str]:
    """torchrun as tests/test_ddp.py starts it (python -m torch.distributed.run = the torchrun
    script, without depending on PATH)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc(args)),
        *train_argv(args, workdir, run, epochs, "--overwrite", *extra)[1:],
    ]


def export_argv(checkpoint: Path, output: Path) -> list[str]:
    return [sys.executable, str(EXPORT), "--checkpoint", str(checkpoint), "--output", str(output)]


def evaluate_argv(args, workdir: Path, checkpoint: Path) -> list[str]:
    return [
        sys.executable,
        str(EVALUATE),
        "--checkpoint",
        str(checkpoint),
        "--data_root",
        str(workdir / "sop"),
        "--output",
        str(workdir / "eval"),
        "--device",
        args.device,
        "--num_examples",
        "0",
        "--no-progress",
    ]


def bench_argv(args, workdir: Path) -> list[str]:
    # bench_throughput builds its model with random weights (models.build_model(weights="none")),
    # so it needs no download; --amp is its CUDA default, passed to make the plan explicit.
    return [
        sys.executable,
        str(BENCH),
        "--backbone",
        args.backbone,
        "--image_size",
        str(args.image_size),
        "--batch_size",
        str(args.bench_batch_size),
        "--num_images",
        str(args.bench_num_images),
        "--warmup_batches",
        "2",
        "--repeats",
        str(args.bench_repeats),
        "--device",
        args.device,
        "--amp",
        "--channels_last",
        "--synthetic_size",
        args.bench_synthetic_size,
        "--cache_dir",
        str(workdir / "bench_data"),
        "--output",
        str(workdir / "bench.json"),
    ]


def build_plan(args, workdir: Path) -> list[dict]:
    """Every step: name, what it proves, and its commands as ``{"label", "argv"}`` (in-process
    steps have a descriptive ``call`` instead of an argv)."""
    w = Path(workdir)
    amp_ckpt = w / "checkpoints" / "gpu_amp" / "last.pth"
    steps = {
        "synthetic_data": (
            "a small synthetic SOP for the training, evaluation and search steps",
            [
                {
                    "label": "generate",
                    "call": f"in-process: synthetic_sop.ensure_synthetic_sop({str(w / 'sop')!r}, "
                    f"num_products={args.num_products}, "
                    f"image_size={args.data_image_size}, replace=True)",
                }
            ],
        ),
        "train_amp_resume_eval": (
            "train 2 epochs with AMP + channels_last, resume for a 3rd, evaluate",
            [
                {"label": "train", "argv": train_argv(args, w, "gpu_amp", 2, "--overwrite")},
                {"label": "resume", "argv": train_argv(args, w, "gpu_amp", 3, "--resume", "auto")},
                {"label": "evaluate", "argv": evaluate_argv(args, w, amp_ckpt)},
            ],
        ),
        "train_default_recipe": (
            "the default recipe (PCA head, warm-up, frozen BatchNorm) with AMP",
            [{"label": "train", "argv": train_argv(args, w, "gpu_recipe", 2, "--overwrite", *RECIPE_FLAGS)}],
        ),
        "torchrun_ddp": (
            f"train.py under torchrun, {nproc(args)} process(es): the default recipe, "
            "then Proxy-Anchor with gathered embeddings",
            [
                {"label": "torchrun", "argv": torchrun_argv(args, w, "gpu_ddp", 2, *RECIPE_FLAGS)},
                {
                    "label": "torchrun_proxy_gather",
                    "argv": torchrun_argv(
                        args, w, "gpu_ddp_proxy", 1, *RECIPE_FLAGS, "--loss", "proxy_anchor", "--gather_embeddings"
                    ),
                },
            ],
        ),
        "deterministic_twice": (
            "two --deterministic runs: identical metrics.csv (timing aside) and weights",
            [
                {
                    "label": label,
                    "argv": train_argv(args, w, f"gpu_det_{label[-1]}", 1, "--deterministic", "--overwrite"),
                }
                for label in ("run_a", "run_b")
            ],
        ),
        "bench_throughput": (
            "extraction / training images per second and their ceilings",
            [{"label": "bench", "argv": bench_argv(args, w)}],
        ),
        "search_query": (
            "queries through search.engine.SearchEngine on the GPU, end to end",
            [
                {
                    "label": "search",
                    "call": f"in-process: SearchEngine(models.load_model("
                    f"{str(amp_ckpt.with_name('best.pth'))!r}, device={args.device!r}), "
                    "build_gallery_index(<test split>, device), <sop>)"
                    ".search_file(<a test image>, k=10)",
                }
            ],
        ),
        "export_serving": (
            "ONNX export of the trained checkpoint; the GPU's torch model against the CPU's ONNX runtime",
            [
                {
                    "label": "source",
                    "call": "in-process: copy gpu_amp/best.pth (an untrained checkpoint "
                    f"without it) to {str(w / 'export' / 'source.pth')!r}",
                },
                {"label": "export", "argv": export_argv(w / "export" / "source.pth", w / "export" / "source.onnx")},
                {
                    "label": "compare",
                    "call": "in-process: models.load_model(<source.pth>, device) vs "
                    "inference.OnnxEmbedder(<source.onnx>) on test images",
                },
            ],
        ),
    }
    return [{"name": name, "what": steps[name][0], "commands": steps[name][1]} for name in selected_steps(args.steps)]


def command_text(cmd: dict) -> str:
    """The shell line of a subprocess command, or the description of an in-process call."""
    return shlex.join(cmd["argv"]) if "argv" in cmd else cmd["call"]


def plan_report(plan: list[dict], status: str) -> list[dict]:
    return [
        {"name": s["name"], "what": s["what"], "status": status, "commands": [command_text(c) for c in s["commands"]]}
        for s in plan
    ]
