"""GPU readiness check: one command runs the CUDA paths users meet first and prints ONE JSON
object (stdout) with a pass/fail, figures and peak GPU memory for every step.

    python bench/gpu_check.py                  # on a CUDA machine: runs everything (~4-8 min)
    python bench/gpu_check.py --dry_run        # the plan: every step and its exact commands
    python bench/gpu_check.py --steps bench_throughput,search_query --workdir /tmp/gc

Steps (each one calls the project's own entry points; none has training code of its own):

  synthetic_data         synthetic_sop.ensure_synthetic_sop: a small synthetic SOP (default 240
                         products of 256 px JPEGs) under <workdir>/sop, used by the steps below
  train_amp_resume_eval  `python train.py` 2 epochs at 224 px with AMP and channels_last
                         (finite losses in metrics.csv, last.pth written, GradScaler state with
                         its scale and the optimizer steps it let through), then the same
                         command with --epochs 3 --resume auto, then `python evaluate.py` on
                         the result (on CUDA, retrieval.extract_embeddings autocasts to float16
                         by itself: evaluate.py passes amp=None and reports the device)
  train_default_recipe   `python train.py --recipe pretrained` (the default recipe of --weights
                         imagenet, from random weights: no download) with AMP and channels_last:
                         PCA-whitened head, head-only warm-up ending inside epoch 1, frozen
                         BatchNorm statistics (checked unchanged), then the whole network
  torchrun_ddp           `torchrun --standalone --nproc_per_node N train.py`, N = the GPUs up to 2
                         (--nproc_per_node): the default recipe for 2 epochs (DDP rebuilt when the
                         warm-up ends), then Proxy-Anchor with --gather_embeddings for 1 (proxies'
                         gradients and gathered embeddings through NCCL). With N = 1 train.py
                         creates no process group (training.distributed.init_distributed), so
                         NCCL is exercised only with 2 GPUs; the JSON says which
  deterministic_twice    the same training with --deterministic, twice: metrics.csv identical
                         except training.runs.TIMING_COLUMNS, and bit-identical weights in
                         last.pth
  bench_throughput       `python bench/bench_throughput.py` (random weights, AMP): images/s of
                         extraction from JPEG files and of training, extract_vs_ceiling and
                         train_vs_ceiling; the issue's targets are recorded, not asserted
  search_query           in this process: search.engine.SearchEngine over a gallery embedded on
                         the GPU (search.index.build_gallery_index): milliseconds per query, end to
                         end (file decode + forward + exact top-k). The demo itself
                         (app_stanford.main) loads its model on the CPU; this step shows what
                         the same engine does on the GPU
  export_serving         `python export.py` on the trained checkpoint (the ONNX model the CPU
                         demo serves), then in this process the torch model on the GPU (float32,
                         and float16 autocast as retrieval.extract_embeddings runs it) against the
                         ONNX runtime on the CPU on the same images: cosine of each pair, and
                         which runtime the engine picks on the GPU (inference.default_runtime)

Peak GPU memory (``peak_gpu_memory_mb`` of each step and command): for subprocess steps the
device-wide memory in use (``torch.cuda.mem_get_info``: total - free, what nvidia-smi shows as
used) sampled every 0.1 s, peak minus the reading just before the command: the command's CUDA
contexts plus its caching-allocator reserve (any other process on that GPU would count too).
For the in-process step ``torch.cuda.max_memory_allocated`` (tensors only). Both are in MiB.

Every output goes under ``--workdir`` (default a new folder in the system temp dir, kept after
the run so a failed step's logs can be read: ``<workdir>/logs/<step>-<command>.log``; the
report is also written to ``<workdir>/report.json``; ``--cleanup`` removes the folder when
every step passed). A step that fails or exceeds ``--step_timeout`` records the error and the
tail of its log, and the next step runs. Exit code: 0 when every step passed (and for
``--dry_run`` / a machine without CUDA, where nothing runs and the plan is printed with status
"skipped: no CUDA"), 1 otherwise, 2 for bad arguments.

``--device cpu`` runs the same steps on the CPU, only to test this script itself (pick a small
--backbone / --image_size; AMP checks then do not apply and the figures describe no GPU).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train.py"
EVALUATE = REPO / "evaluate.py"
BENCH = REPO / "bench" / "bench_throughput.py"

STEPS = ("synthetic_data", "train_amp_resume_eval", "train_default_recipe", "torchrun_ddp",
         "deterministic_twice", "bench_throughput", "search_query", "export_serving")
# Steps that read <workdir>/sop; synthetic_data is run first whenever one of them is selected.
NEEDS_DATA = {"train_amp_resume_eval", "train_default_recipe", "torchrun_ddp", "deterministic_twice",
              "search_query", "export_serving"}
# The default recipe of --weights imagenet from random weights (no download); its warm-up ends
# inside epoch 1, so DDP changes phase within an epoch.
RECIPE_FLAGS = ("--recipe", "pretrained", "--warmup_epochs", "0.5")
EXPORT = REPO / "export.py"
MIN_EXPORT_COSINE = {"float32": 0.9999, "float16_autocast": 0.99}
# The targets (the same numbers as bench_throughput.TARGETS); recorded, not asserted.
# They are defined for EfficientNet-B0 at 224 px with AMP on CUDA.
TARGET_EXTRACT_IMAGES_PER_S = 3000.0
TARGET_TRAIN_VS_CEILING = 0.8
TIME_BUDGET_S = 480  # the "under 8 minutes" on an H100/H200-class GPU
ERROR_TAIL_CHARS = 3000

SUBPROCESS_MEMORY_METHOD = (
    "device-wide memory in use (torch.cuda.mem_get_info: total - free) sampled every 0.1 s "
    "while the command ran, peak minus the reading just before it: CUDA contexts + caching "
    "allocator reserve of the command's processes (other processes on the GPU would count too)")
IN_PROCESS_MEMORY_METHOD = "torch.cuda.max_memory_allocated in this process over the step (tensors only)"


class StepFailed(RuntimeError):
    """A step cannot go on; the message names what failed."""


class StepTimeout(StepFailed):
    """The step ran past --step_timeout."""


# ============ arguments ============

def default_workdir() -> Path:
    """<tmp>/gpu_check-<YYYYmmdd-HHMMSS>-<pid>: computed, not created (a dry run creates nothing)."""
    return Path(tempfile.gettempdir()) / f"gpu_check-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry_run", action="store_true",
                   help="print the plan (steps and exact commands, status 'planned') and exit 0")
    p.add_argument("--workdir", default=None,
                   help="folder for every output (data, checkpoints, logs, report.json); "
                        "default: a new <tmp>/gpu_check-<time>-<pid>")
    p.add_argument("--steps", default=",".join(STEPS),
                   help=f"comma-separated subset of {','.join(STEPS)} (synthetic_data is added "
                        "when a selected step needs the dataset)")
    p.add_argument("--step_timeout", type=float, default=300.0,
                   help="seconds one step may take, all its commands together")
    p.add_argument("--cleanup", action="store_true",
                   help="remove --workdir at the end when every step passed")
    p.add_argument("--device", default="cuda",
                   help="cuda or cuda:N; cpu runs the steps on the CPU to test this script only")
    g = p.add_argument_group("training runs (train.py, evaluate.py, torchrun)")
    g.add_argument("--backbone", default="efficientnet_b0", help="train.py --backbone (and the bench's)")
    g.add_argument("--image_size", type=int, default=224, help="train.py --image_size (and the bench's)")
    g.add_argument("--num_products", type=int, default=240,
                   help="products of the synthetic SOP: 240 gives ~600 training images, 9 P x K "
                        "steps of 64 per epoch, ~700 test images")
    g.add_argument("--data_image_size", type=int, default=256,
                   help="side in px of the synthetic JPEGs (the 224 px transform resizes to 256)")
    g.add_argument("--batch_size", type=int, default=64, help="train.py --batch_size (16 products x 4)")
    g.add_argument("--max_steps_per_epoch", type=int, default=20,
                   help="train.py --max_steps_per_epoch: bounds each epoch's time")
    g.add_argument("--nproc_per_node", type=int, default=0,
                   help="torchrun processes (one GPU each; NCCL is used only when >= 2); 0: the "
                        "GPUs up to 2, 1 without CUDA")
    g.add_argument("--embedding_size", type=int, default=128,
                   help="train.py --embedding_size (the default recipe's PCA head needs at least "
                        "as many training images)")
    g = p.add_argument_group("throughput (bench/bench_throughput.py)")
    g.add_argument("--bench_num_images", type=int, default=2048, help="bench --num_images per part")
    g.add_argument("--bench_batch_size", type=int, default=128, help="bench --batch_size")
    g.add_argument("--bench_repeats", type=int, default=3, help="bench --repeats (medians reported)")
    g.add_argument("--bench_synthetic_size", default="300-600",
                   help="bench --synthetic_size: photo sides of its JPEGs, SOP-like by default")
    g = p.add_argument_group("search (search.engine.SearchEngine)")
    g.add_argument("--search_queries", type=int, default=20,
                   help="warm queries timed after the first one (median reported)")
    return p


def selected_steps(spec: str) -> list[str]:
    """The --steps list in STEPS order, with synthetic_data added when a step needs the data."""
    names = {s.strip() for s in spec.split(",") if s.strip()}
    unknown = sorted(names - set(STEPS))
    if unknown or not names:
        raise ValueError(f"--steps: unknown {unknown or 'empty list'}; choose from {', '.join(STEPS)}")
    if names & NEEDS_DATA:
        names.add("synthetic_data")
    return [s for s in STEPS if s in names]


# ============ the plan (pure: paths and command lines only, nothing touches the disk) ============

def train_argv(args, workdir: Path, run: str, epochs: int, *extra: str) -> list[str]:
    """`python train.py ...` on the synthetic SOP with AMP and channels_last, outputs under workdir."""
    return [sys.executable, str(TRAIN), "--dataset", "synthetic", "--data_root", str(workdir / "sop"),
            "--backbone", args.backbone, "--weights", "none", "--image_size", str(args.image_size),
            "--batch_size", str(args.batch_size), "--epochs", str(epochs),
            "--embedding_size", str(args.embedding_size),
            "--max_steps_per_epoch", str(args.max_steps_per_epoch), "--amp", "--channels_last",
            "--device", args.device, "--run_name", run,
            "--checkpoint_dir", str(workdir / "checkpoints"), "--log_dir", str(workdir / "runs"),
            # no TensorBoard projector: thumbnails are CPU work that tests nothing on the GPU
            "--projector_samples", "0", "--no-progress", *extra]


def nproc(args) -> int:
    """--nproc_per_node, 0 resolved: the CUDA devices up to 2 (1 without CUDA)."""
    if args.nproc_per_node:
        return args.nproc_per_node
    import torch
    return max(1, min(2, torch.cuda.device_count())) if args.device.startswith("cuda") else 1


def torchrun_argv(args, workdir: Path, run: str, epochs: int, *extra: str) -> list[str]:
    """torchrun as tests/test_ddp.py starts it (python -m torch.distributed.run = the torchrun
    script, without depending on PATH)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(nproc(args)),
            *train_argv(args, workdir, run, epochs, "--overwrite", *extra)[1:]]


def export_argv(checkpoint: Path, output: Path) -> list[str]:
    return [sys.executable, str(EXPORT), "--checkpoint", str(checkpoint), "--output", str(output)]


def evaluate_argv(args, workdir: Path, checkpoint: Path) -> list[str]:
    return [sys.executable, str(EVALUATE), "--checkpoint", str(checkpoint),
            "--data_root", str(workdir / "sop"), "--output", str(workdir / "eval"),
            "--device", args.device, "--num_examples", "0", "--no-progress"]


def bench_argv(args, workdir: Path) -> list[str]:
    # bench_throughput builds its model with random weights (models.build_model(weights="none")),
    # so it needs no download; --amp is its CUDA default, passed to make the plan explicit.
    return [sys.executable, str(BENCH), "--backbone", args.backbone, "--image_size", str(args.image_size),
            "--batch_size", str(args.bench_batch_size), "--num_images", str(args.bench_num_images),
            "--warmup_batches", "2", "--repeats", str(args.bench_repeats), "--device", args.device,
            "--amp", "--channels_last", "--synthetic_size", args.bench_synthetic_size,
            "--cache_dir", str(workdir / "bench_data"), "--output", str(workdir / "bench.json")]


def build_plan(args, workdir: Path) -> list[dict]:
    """Every step: name, what it proves, and its commands as ``{"label", "argv"}`` (in-process
    steps have a descriptive ``call`` instead of an argv)."""
    w = Path(workdir)
    amp_ckpt = w / "checkpoints" / "gpu_amp" / "last.pth"
    steps = {
        "synthetic_data": ("a small synthetic SOP for the training, evaluation and search steps", [
            {"label": "generate", "call": f"in-process: synthetic_sop.ensure_synthetic_sop({str(w / 'sop')!r}, "
                                          f"num_products={args.num_products}, "
                                          f"image_size={args.data_image_size}, replace=True)"}]),
        "train_amp_resume_eval": ("train 2 epochs with AMP + channels_last, resume for a 3rd, evaluate", [
            {"label": "train", "argv": train_argv(args, w, "gpu_amp", 2, "--overwrite")},
            {"label": "resume", "argv": train_argv(args, w, "gpu_amp", 3, "--resume", "auto")},
            {"label": "evaluate", "argv": evaluate_argv(args, w, amp_ckpt)}]),
        "train_default_recipe": ("the default recipe (PCA head, warm-up, frozen BatchNorm) with AMP", [
            {"label": "train", "argv": train_argv(args, w, "gpu_recipe", 2, "--overwrite", *RECIPE_FLAGS)}]),
        "torchrun_ddp": (f"train.py under torchrun, {nproc(args)} process(es): the default recipe, "
                         "then Proxy-Anchor with gathered embeddings", [
            {"label": "torchrun", "argv": torchrun_argv(args, w, "gpu_ddp", 2, *RECIPE_FLAGS)},
            {"label": "torchrun_proxy_gather", "argv": torchrun_argv(
                args, w, "gpu_ddp_proxy", 1, *RECIPE_FLAGS, "--loss", "proxy_anchor", "--gather_embeddings")}]),
        "deterministic_twice": ("two --deterministic runs: identical metrics.csv (timing aside) "
                                "and weights", [
            {"label": label, "argv": train_argv(args, w, f"gpu_det_{label[-1]}", 1, "--deterministic",
                                                "--overwrite")} for label in ("run_a", "run_b")]),
        "bench_throughput": ("extraction / training images per second and their ceilings", [
            {"label": "bench", "argv": bench_argv(args, w)}]),
        "search_query": ("queries through search.engine.SearchEngine on the GPU, end to end", [
            {"label": "search", "call": f"in-process: SearchEngine(models.load_model("
                                        f"{str(amp_ckpt.with_name('best.pth'))!r}, device={args.device!r}), "
                                        "build_gallery_index(<test split>, device), <sop>)"
                                        ".search_file(<a test image>, k=10)"}]),
        "export_serving": ("ONNX export of the trained checkpoint; the GPU's torch model against "
                           "the CPU's ONNX runtime", [
            {"label": "source", "call": "in-process: copy gpu_amp/best.pth (an untrained checkpoint "
                                        f"without it) to {str(w / 'export' / 'source.pth')!r}"},
            {"label": "export", "argv": export_argv(w / "export" / "source.pth", w / "export" / "source.onnx")},
            {"label": "compare", "call": "in-process: models.load_model(<source.pth>, device) vs "
                                         "inference.OnnxEmbedder(<source.onnx>) on test images"}]),
    }
    return [{"name": name, "what": steps[name][0], "commands": steps[name][1]}
            for name in selected_steps(args.steps)]


def command_text(cmd: dict) -> str:
    """The shell line of a subprocess command, or the description of an in-process call."""
    return shlex.join(cmd["argv"]) if "argv" in cmd else cmd["call"]


# ============ pure helpers on the runs' outputs ============

def read_csv_rows(path) -> list[dict]:
    """metrics.csv as a list of {column: cell string} (cells compared as written: train.py
    writes floats with repr, so equal strings are equal floats)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def metrics_differences(rows_a: list[dict], rows_b: list[dict], ignore=()) -> list[str]:
    """What differs between two metrics tables, leaving out the ``ignore`` columns (the timing
    columns); an empty list means equal."""
    ignore = set(ignore)
    diffs = []
    if len(rows_a) != len(rows_b):
        diffs.append(f"row count {len(rows_a)} vs {len(rows_b)}")
    cols_a = {c for row in rows_a for c in row} - ignore
    cols_b = {c for row in rows_b for c in row} - ignore
    if cols_a != cols_b:
        diffs.append(f"columns only in a: {sorted(cols_a - cols_b)}, only in b: {sorted(cols_b - cols_a)}")
    for i, (a, b) in enumerate(zip(rows_a, rows_b)):
        for col in sorted(cols_a & cols_b):
            if a.get(col) != b.get(col):
                diffs.append(f"row {i} (epoch {a.get('epoch')}) {col}: {a.get(col)!r} vs {b.get(col)!r}")
    return diffs


def _finite(cell) -> bool:
    try:
        return math.isfinite(float(cell))
    except (TypeError, ValueError):
        return False


def loss_problems(rows: list[dict]) -> list[str]:
    """Loss cells that are not finite numbers: val_loss in every row, train_loss in every row
    after epoch 0 (epoch 0 is the validation before training: its training cells are empty).
    A table without a val_loss column (Proxy-Anchor: validation products have no proxy) is
    checked on train_loss alone."""
    problems = []
    if not rows:
        return ["metrics.csv has no rows"]
    val = ["val_loss"] if any("val_loss" in row for row in rows) else []
    for row in rows:
        wanted = val + (["train_loss"] if str(row.get("epoch")) not in ("0", "0.0") else [])
        for col in wanted:
            if not _finite(row.get(col)):
                problems.append(f"epoch {row.get('epoch')} {col} = {row.get(col)!r}")
    return problems


def epochs_of(rows: list[dict]) -> list[int]:
    return [int(float(r["epoch"])) for r in rows]


def optimizer_steps(optimizer_state: dict | None) -> int | None:
    """Optimizer steps actually taken: Adam's per-parameter ``step`` count (GradScaler.step
    skips optimizer.step when the scaled gradients overflowed, so this counts what it let
    through); the maximum over parameters."""
    state = (optimizer_state or {}).get("state") or {}
    steps = [float(s["step"]) for s in state.values() if isinstance(s, dict) and "step" in s]
    return int(max(steps)) if steps else None


def scheduled_steps(rows: list[dict], batch_size: int, world_size: int = 1) -> int:
    """Training steps the epochs ran: the ``images`` column (all ranks) / (batch x ranks)."""
    images = sum(float(r["images"]) for r in rows if _finite(r.get("images")))
    return int(round(images / (batch_size * world_size)))


def target_report(bench: dict, backbone: str, image_size: int, cuda: bool) -> dict:
    """The issue's targets against the bench figures; ``met`` is None where the target does not
    apply (another backbone or size, no CUDA) or the figure is missing."""
    applies = cuda and backbone == "efficientnet_b0" and image_size == 224

    def one(key, target, what):
        value = bench.get(key)
        met = (value >= target) if applies and isinstance(value, (int, float)) else None
        return {"what": what, "target": f">= {target:g}", "value": value, "met": met}

    out = {
        "extract_images_per_s": one("extract_images_per_s", TARGET_EXTRACT_IMAGES_PER_S,
                                    "EfficientNet-B0 extraction, 224 px, AMP, JPEG files on disk"),
        "train_vs_ceiling": one("train_vs_ceiling", TARGET_TRAIN_VS_CEILING,
                                "training fed by the real loader / training on an in-memory batch"),
    }
    if not applies:
        out["note"] = ("targets are defined for efficientnet_b0 at 224 px on CUDA; "
                       f"this run: {backbone} at {image_size} px, {'CUDA' if cuda else 'no CUDA'}")
    return out


def json_safe(obj):
    """NaN / inf become None (JSON has no such numbers); Paths become strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _tail(text: str, chars: int = ERROR_TAIL_CHARS) -> str:
    return text if len(text) <= chars else "..." + text[-chars:]


def _say(msg: str) -> None:
    print(f"gpu_check: {msg}", file=sys.stderr, flush=True)


# ============ environment ============

def _nvidia_smi(field: str) -> str | None:
    """One --query-gpu field of the first GPU, or None without nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, f"--query-gpu={field}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def environment_info(device_arg: str) -> dict:
    import platform

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "hostname": platform.node()}
    if not (torch.cuda.is_available() and device_arg.startswith("cuda")):
        return info
    dev = torch.device(device_arg)
    props = torch.cuda.get_device_properties(dev)
    info.update({
        "gpu_name": torch.cuda.get_device_name(dev), "gpu_count": torch.cuda.device_count(),
        "gpu_memory_gib": round(props.total_memory / 2 ** 30, 1),
        "compute_capability": f"{props.major}.{props.minor}",
        "cudnn": torch.backends.cudnn.version(),
        "driver_version": _nvidia_smi("driver_version") or "unknown (no nvidia-smi)",
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    })
    try:
        nccl = torch.cuda.nccl.version()
        info["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    except Exception as e:  # NCCL missing from this build: worth reporting, not fatal
        info["nccl"] = f"unavailable ({e})"
    return info


# ============ running things ============

class GpuMemorySampler:
    """Peak device-wide memory in use over a block, minus the reading before it, in MiB
    (SUBPROCESS_MEMORY_METHOD). Does nothing (peak None) when ``device`` is not CUDA."""

    def __init__(self, device: str, interval: float = 0.1):
        self.device, self.interval = device, interval
        self.peak_mb = None
        self._stop = threading.Event()
        self._thread = None

    def _used(self) -> int:
        import torch
        free, total = torch.cuda.mem_get_info(torch.device(self.device))
        return total - free

    def __enter__(self):
        if not self.device.startswith("cuda"):
            return self
        self._base = self._peak = self._used()

        def poll():
            while not self._stop.wait(self.interval):
                self._peak = max(self._peak, self._used())

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._used())
            self.peak_mb = round((self._peak - self._base) / 2 ** 20, 1)
        return False


def run_command(argv: list[str], log_path: Path, timeout: float, device: str) -> dict:
    """Run ``argv`` from the repo root, stdout + stderr into ``log_path``; its own process group,
    so that a timeout ends it with every child (torchrun ranks, DataLoader workers). Returns
    rc, timed_out, seconds, log, peak_gpu_memory_mb and the log's text as ``output``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    timed_out = False
    with open(log_path, "w") as log, GpuMemorySampler(device) as mem:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            rc = None
        finally:
            if proc.poll() is None:  # timeout or Ctrl-C here: end the whole group we started
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    return {"rc": rc if rc is not None else proc.returncode, "timed_out": timed_out,
            "seconds": round(time.perf_counter() - start, 2), "log": str(log_path),
            "peak_gpu_memory_mb": mem.peak_mb, "output": log_path.read_text(errors="replace")}


@contextlib.contextmanager
def alarm(seconds: float):
    """Raise StepTimeout in this (main) thread after ``seconds``: the in-process steps' timeout."""
    usable = hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def fire(signum, frame):
        raise StepTimeout(f"in-process step ran past --step_timeout ({seconds:.1f} s)")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Step:
    """The running record of one step: its commands' results, checks and figures."""

    def __init__(self, plan: dict, ctx: "Context"):
        self.name, self.plan, self.ctx = plan["name"], plan, ctx
        self.deadline = time.perf_counter() + ctx.args.step_timeout
        self.runs: list[dict] = []
        self.checks: dict[str, bool] = {}
        self.failed_checks: list[str] = []
        self.figures: dict = {}
        self.peak_gpu_memory_mb = None
        self.memory_method = None

    def command(self, label: str) -> dict:
        return next(c for c in self.plan["commands"] if c["label"] == label)

    def run(self, label: str) -> dict:
        """Run the planned command ``label`` (its memory is recorded either way); raises
        StepFailed on a non-zero exit or a timeout, with the tail of its log."""
        cmd = self.command(label)
        timeout = self.time_left()
        if timeout <= 0:
            raise StepTimeout(f"{label}: not started, the step used up its --step_timeout "
                              f"({self.ctx.args.step_timeout:.0f} s)")
        log = self.ctx.workdir / "logs" / f"{self.name}-{label}.log"
        _say(f"  {label}: {command_text(cmd)}")
        result = run_command(cmd["argv"], log, timeout, self.ctx.args.device)
        self.runs.append({"label": label, **{k: v for k, v in result.items() if k != "output"}})
        if result["peak_gpu_memory_mb"] is not None:
            self.peak_gpu_memory_mb = max(self.peak_gpu_memory_mb or 0.0, result["peak_gpu_memory_mb"])
            self.memory_method = SUBPROCESS_MEMORY_METHOD
        if result["timed_out"]:
            raise StepTimeout(f"{label}: killed after {timeout:.0f} s (the rest of --step_timeout); "
                              f"log {log}:\n{_tail(result['output'])}")
        if result["rc"] != 0:
            raise StepFailed(f"{label}: exit code {result['rc']}; log {log}:\n{_tail(result['output'])}")
        return result

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks[name] = bool(ok)
        if not ok:
            self.failed_checks.append(f"{name}" + (f" ({detail})" if detail else ""))
        return bool(ok)

    def time_left(self) -> float:
        return self.deadline - time.perf_counter()


class Context:
    def __init__(self, args, workdir: Path, cuda: bool):
        self.args, self.workdir, self.cuda = args, Path(workdir), cuda
        self.targets: dict | None = None

    @property
    def sop(self) -> Path:
        return self.workdir / "sop"


def _need_data(ctx: Context) -> None:
    from dataio import fileio
    if not fileio.is_complete(ctx.sop):
        raise StepFailed(f"the synthetic dataset {ctx.sop} is missing or incomplete: the "
                         "synthetic_data step did not finish (see its error)")


def _load_ckpt(path: Path) -> dict:
    import models
    if not path.is_file():
        raise StepFailed(f"checkpoint {path} was not written")
    return models.load_checkpoint(path)


def _run_figures(step: Step, prefix: str, rows: list[dict]) -> None:
    """The last epoch's main figures, as ``<run>_<column>``."""
    last = rows[-1] if rows else {}
    for key in ("train_loss", "val_loss", "val_recall@1", "images_per_sec", "epoch_time"):
        if key in last:
            step.figures[f"{prefix}_{key}"] = float(last[key]) if _finite(last[key]) else last[key]


def _check_training(step: Step, run: str, epochs: int, world: int = 1) -> tuple[list[dict], dict]:
    """Checks common to every train.py run: metrics.csv rows 0..epochs with finite losses,
    last.pth of the last epoch, args.json's device / AMP / world size. Returns (rows, ckpt)."""
    w = step.ctx.workdir
    run_dir, ckpt_path = w / "runs" / run, w / "checkpoints" / run / "last.pth"
    csv_path = run_dir / "metrics.csv"
    if not csv_path.is_file():
        raise StepFailed(f"{run}: {csv_path} was not written")
    rows = read_csv_rows(csv_path)
    step.check(f"{run}_epochs", epochs_of(rows) == list(range(epochs + 1)),
               f"metrics.csv epochs {epochs_of(rows)}, expected 0..{epochs}")
    problems = loss_problems(rows)
    step.check(f"{run}_finite_losses", not problems, "; ".join(problems[:5]))
    ckpt = _load_ckpt(ckpt_path)
    step.check(f"{run}_checkpoint_epoch", ckpt.get("epoch") == epochs,
               f"last.pth epoch {ckpt.get('epoch')}, expected {epochs}")
    info = json.loads((run_dir / "args.json").read_text())
    step.check(f"{run}_world_size", info.get("world_size") == world,
               f"args.json world_size {info.get('world_size')}, expected {world}")
    if step.ctx.cuda:
        step.check(f"{run}_on_cuda", str(info.get("resolved_device", "")).startswith("cuda"),
                   f"resolved_device {info.get('resolved_device')}")
        step.check(f"{run}_amp_used", info.get("amp_used") is True, f"amp_used {info.get('amp_used')}")
    _run_figures(step, run, rows)
    return rows, ckpt


def _check_scaler(step: Step, run: str, ckpt: dict, rows: list[dict], world: int = 1) -> None:
    """GradScaler state in the checkpoint: a finite positive scale, and optimizer steps taken."""
    scaler = ckpt.get("scaler") or {}
    taken = optimizer_steps(ckpt.get("optimizer"))
    scheduled = scheduled_steps(rows, step.ctx.args.batch_size, world)
    step.figures.update({f"{run}_scaler_scale": scaler.get("scale"),
                         f"{run}_scaler_growth_tracker": scaler.get("_growth_tracker"),
                         f"{run}_optimizer_steps_taken": taken,
                         f"{run}_training_steps_run": scheduled,
                         f"{run}_steps_skipped_by_scaler": None if taken is None else scheduled - taken})
    if step.ctx.cuda:  # the scaler is disabled (empty state) off CUDA, by design of train.py
        scale = scaler.get("scale")
        step.check(f"{run}_scaler_scale_recorded", isinstance(scale, (int, float)) and math.isfinite(scale)
                   and scale > 0, f"checkpoint scaler state {scaler!r}")
    step.check(f"{run}_optimizer_steps_taken", bool(taken),
               f"{taken} optimizer steps taken of {scheduled} run")


# ============ the steps ============

def step_synthetic_data(step: Step) -> None:
    from dataio import fileio, synthetic_sop
    args = step.ctx.args
    start = time.perf_counter()
    with alarm(step.time_left()):
        root = synthetic_sop.ensure_synthetic_sop(step.ctx.sop, num_products=args.num_products,
                                             image_size=args.data_image_size, replace=True)
    marker = fileio.read_marker(root) or {}
    step.check("complete", fileio.is_complete(root), f"{root} has no completion marker")
    step.figures.update({"root": str(root), "num_products": marker.get("num_products"),
                         "image_size": marker.get("image_size"), "train_images": marker.get("train_images"),
                         "test_images": marker.get("test_images"),
                         "generate_s": round(time.perf_counter() - start, 2)})


def step_train_amp_resume_eval(step: Step) -> None:
    _need_data(step.ctx)
    w = step.ctx.workdir
    step.run("train")
    rows2, ckpt2 = _check_training(step, "gpu_amp", 2)
    _check_scaler(step, "gpu_amp", ckpt2, rows2)
    steps_before = optimizer_steps(ckpt2.get("optimizer")) or 0
    del ckpt2

    out = step.run("resume")
    step.check("resume_said_resuming", "resuming from" in out["output"],
               "train.py did not print 'resuming from' with --resume auto")
    resumed_from = json.loads((w / "runs" / "gpu_amp" / "args.json").read_text()).get("resumed_from")
    step.check("resume_from_last_pth", str(resumed_from).endswith("last.pth"),
               f"args.json resumed_from {resumed_from!r}")
    rows3, ckpt3 = _check_training(step, "gpu_amp", 3)
    # the resumed metrics.csv is rebuilt from the checkpoint's history: epochs 0-2 unchanged
    diffs = metrics_differences(rows2, rows3[:len(rows2)], ignore=())
    step.check("resume_kept_history", not diffs, "; ".join(diffs[:3]))
    steps_after = optimizer_steps(ckpt3.get("optimizer")) or 0
    step.check("resume_took_steps", steps_after > steps_before,
               f"optimizer steps {steps_before} before resuming, {steps_after} after")
    step.figures["resumed_optimizer_steps"] = steps_after
    step.figures["resumed_scaler_scale"] = (ckpt3.get("scaler") or {}).get("scale")
    del ckpt3

    step.run("evaluate")
    results_path = w / "eval" / "results.json"
    if not results_path.is_file():
        raise StepFailed(f"evaluate.py exited 0 but wrote no {results_path}")
    res = json.loads(results_path.read_text())
    device = str(res.get("timing", {}).get("device", ""))
    recall = (res.get("product") or {}).get("recall@1")
    norm = (res.get("embedding_stats") or {}).get("norm_mean")
    step.check("evaluate_finite_recall", _finite(recall), f"product recall@1 {recall!r}")
    step.check("evaluate_unit_embeddings", _finite(norm) and abs(float(norm) - 1) < 1e-2, f"mean norm {norm}")
    if step.ctx.cuda:
        step.check("evaluate_on_cuda", device.startswith("cuda"), f"timing.device {device!r}")
    extract_s = res.get("timing", {}).get("extract_s")
    n = res.get("num_queries")
    step.figures.update({
        "evaluate_device": device,
        # retrieval.extract_embeddings(amp=None) autocasts to float16 exactly when the device is
        # CUDA, and evaluate.py passes no amp: so AMP was used iff the device is cuda
        "evaluate_amp": device.startswith("cuda"),
        "evaluate_num_queries": n, "evaluate_product_recall@1": recall,
        "evaluate_map@r": (res.get("product") or {}).get("map@r"), "evaluate_extract_s": extract_s,
        "evaluate_images_per_s": round(n / extract_s, 1) if n and extract_s else None})


def _check_warmup(step: Step, run: str, rows: list[dict]) -> None:
    """The recipe's warm-up: epoch 1 began with head-only steps, epoch 2 had none."""
    frozen = [float(r.get("train_frozen_steps") or "nan") for r in rows[1:]]
    step.check(f"{run}_warmup_then_backbone", len(frozen) >= 2 and frozen[0] > 0 and frozen[1] == 0,
               f"train_frozen_steps per epoch {frozen}")


def step_train_default_recipe(step: Step) -> None:
    _need_data(step.ctx)
    import torch
    out = step.run("train")
    step.check("pca_head_initialised", "head initialised with the PCA" in out["output"],
               "train.py did not print 'head initialised with the PCA'")
    rows, ckpt = _check_training(step, "gpu_recipe", 2)
    _check_scaler(step, "gpu_recipe", ckpt, rows)
    _check_warmup(step, "gpu_recipe", rows)
    # --weights none starts every BatchNorm at mean 0, variance 1: frozen, they are still there
    model = ckpt["model"]
    means = [k for k in model if k.startswith("backbone.") and k.endswith("running_mean")]
    moved = [k for k in means if not (torch.all(model[k] == 0) and torch.all(model[k.replace("mean", "var")] == 1))]
    step.check("batchnorm_statistics_frozen", bool(means) and not moved,
               f"{len(moved)} of {len(means)} BatchNorm layers' statistics moved")
    step.figures.update({"gpu_recipe_batchnorm_layers": len(means),
                         "gpu_recipe_frozen_steps": [r.get("train_frozen_steps") for r in rows[1:]]})


def step_torchrun_ddp(step: Step) -> None:
    _need_data(step.ctx)
    from training import distributed
    n = nproc(step.ctx.args)
    step.run("torchrun")
    rows, ckpt = _check_training(step, "gpu_ddp", 2, world=n)
    _check_scaler(step, "gpu_ddp", ckpt, rows, world=n)
    _check_warmup(step, "gpu_ddp", rows)
    step.check("gpu_ddp_unwrapped_state_dict", not any(k.startswith("module.") for k in ckpt["model"]),
               "state dict keys carry DDP's 'module.' prefix")
    del ckpt
    step.run("torchrun_proxy_gather")
    rows, ckpt = _check_training(step, "gpu_ddp_proxy", 1, world=n)
    step.check("gpu_ddp_proxy_proxies_saved", "proxies" in (ckpt.get("criterion") or {}),
               "last.pth has no Proxy-Anchor proxies")
    step.figures["world_size"] = n
    step.figures["process_group"] = (
        distributed.process_group_backend(step.ctx.cuda) if n > 1 else
        "none: with 1 process training.distributed.init_distributed creates no process group "
        "(WORLD_SIZE 1); NCCL needs 2 processes on as many GPUs")


def step_deterministic_twice(step: Step) -> None:
    _need_data(step.ctx)
    import torch
    from training import runs
    step.run("run_a")
    rows_a, ckpt_a = _check_training(step, "gpu_det_a", 1)
    step.run("run_b")
    rows_b, ckpt_b = _check_training(step, "gpu_det_b", 1)
    diffs = metrics_differences(rows_a, rows_b, ignore=runs.TIMING_COLUMNS)
    step.check("identical_metrics", not diffs, "; ".join(diffs[:5]))
    wa, wb = ckpt_a["model"], ckpt_b["model"]
    differing = sorted(k for k in wa if k not in wb or not torch.equal(wa[k], wb[k]))
    step.check("identical_weights", not differing and set(wa) == set(wb),
               f"{len(differing)} tensors differ, e.g. {differing[:3]}")
    compared = sorted({c for r in rows_a for c in r} - set(runs.TIMING_COLUMNS))
    step.figures.update({"compared_columns": compared, "ignored_columns": list(runs.TIMING_COLUMNS),
                         "metric_differences": diffs[:10], "weight_tensors_differing": len(differing)})


BENCH_KEYS = ("forward_images_per_s", "extract_images_per_s", "train_step_images_per_s",
              "train_loader_images_per_s", "extract_vs_ceiling", "train_vs_ceiling")


def step_bench_throughput(step: Step) -> None:
    path = step.ctx.workdir / "bench.json"
    path.unlink(missing_ok=True)  # never read a previous run's figures
    step.run("bench")
    if not path.is_file():
        raise StepFailed(f"bench_throughput.py exited 0 but wrote no {path}")
    bench = json.loads(path.read_text())
    for key in BENCH_KEYS:
        v = bench.get(key)
        step.check(key, _finite(v) and float(v) > 0, f"{key} = {v!r}")
    if step.ctx.cuda:
        step.check("bench_on_cuda", str(bench.get("device", "")).startswith("cuda"),
                   f"device {bench.get('device')}")
        step.check("bench_amp", bench.get("amp") is True, f"amp {bench.get('amp')}")
    step.figures.update({k: bench.get(k) for k in (
        *BENCH_KEYS, "device", "device_name", "amp", "channels_last", "batch_size", "workers",
        "decode_size", "extract_data_wait_frac", "train_loader_data_wait_frac",
        "extract_first_batch_s", "train_loader_first_batch_s", "timed_images") if k in bench})
    step.ctx.targets = target_report(bench, step.ctx.args.backbone, step.ctx.args.image_size, step.ctx.cuda)


def _search_checkpoint(ctx: Context) -> tuple[Path, str]:
    """The trained run's best.pth, or (when that step did not run) an untrained checkpoint
    (`search.tiny_demo.write_untrained_checkpoint`)."""
    trained = ctx.workdir / "checkpoints" / "gpu_amp" / "best.pth"
    if trained.is_file():
        return trained, "gpu_amp/best.pth (train_amp_resume_eval)"
    from search.tiny_demo import write_untrained_checkpoint

    path = write_untrained_checkpoint(ctx.workdir / "checkpoints" / "search_untrained" / "best.pth",
                                      ctx.sop, ctx.args.backbone, ctx.args.image_size)
    return path, "untrained (no gpu_amp/best.pth)"


def step_search_query(step: Step) -> None:
    _need_data(step.ctx)
    import numpy as np
    import torch

    import datasets
    import models
    from search.engine import SearchEngine
    from search.index import build_gallery_index

    ctx = step.ctx
    device = torch.device(ctx.args.device)
    with alarm(step.time_left()):
        checkpoint, source = _search_checkpoint(ctx)
        if ctx.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        model = models.load_model(checkpoint, device=device)
        gallery = datasets.SOPDataset(ctx.sop, "test", transform=datasets.build_transform(
            int(model.model_args["image_size"]), train=False))
        t0 = time.perf_counter()
        # search.engine.load_or_build_index embeds on the CPU (the demo serves on the CPU); the
        # same project function with the model's device builds the gallery on the GPU
        index = build_gallery_index(model, gallery, device=device, progress=False,
                                    checkpoint_hash=models.checkpoint_hash(checkpoint))
        index_s = time.perf_counter() - t0
        engine = SearchEngine(model, index, ctx.sop)
        query = gallery.paths[0]
        k = min(10, len(index))

        def timed():
            start = time.perf_counter()
            out = engine.search_file(query, k=k)
            if engine.device.type == "cuda":
                torch.cuda.synchronize(engine.device)
            return out, (time.perf_counter() - start) * 1e3

        first, first_ms = timed()  # cold: the first user's query (kernel selection, allocator)
        warm = [timed() for _ in range(max(1, ctx.args.search_queries))]
        if ctx.cuda:
            step.peak_gpu_memory_mb = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
            step.memory_method = IN_PROCESS_MEMORY_METHOD
    last = warm[-1][0]
    scores = np.array([r["score"] for r in last["results"]], dtype=np.float64)
    step.check("results_returned", len(last["results"]) == k, f"{len(last['results'])} results for k={k}")
    step.check("finite_scores", bool(np.isfinite(scores).all()), f"scores {scores.tolist()}")
    if ctx.cuda:
        step.check("engine_on_cuda", engine.device.type == "cuda", f"engine device {engine.device}")
    step.figures.update({
        "checkpoint": source, "engine_device": str(engine.device), "gallery_images": len(index),
        "gallery_index_build_s": round(index_s, 2), "first_query_ms": round(first_ms, 2),
        "warm_query_ms_median": round(statistics.median(ms for _, ms in warm), 2),
        "warm_queries": len(warm), "timing_ms_breakdown": last["timing_ms"],
        "top1_is_the_query_image": bool(last["results"] and last["results"][0]["catalogue_path"] == index.paths[0]),
        "top1_score": float(scores[0]) if len(scores) else None})
    if ctx.cuda:
        del engine, model, index
        torch.cuda.empty_cache()  # leave later readings (if any) a clean device


def step_export_serving(step: Step) -> None:
    _need_data(step.ctx)
    import torch

    import datasets
    import inference
    import models

    ctx = step.ctx
    device = torch.device(ctx.args.device)
    checkpoint, source = _search_checkpoint(ctx)
    planned = ctx.workdir / "export" / "source.pth"
    planned.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(checkpoint, planned)
    step.run("export")
    onnx_path = planned.with_suffix(".onnx")
    if not onnx_path.is_file():
        raise StepFailed(f"export.py exited 0 but wrote no {onnx_path}")
    with alarm(step.time_left()):
        model = models.load_model(planned, device=device).eval()
        embedder = inference.OnnxEmbedder(onnx_path)
        test = datasets.SOPDataset(ctx.sop, "test", transform=datasets.build_transform(
            int(model.model_args["image_size"]), train=False))
        images = torch.stack([test[i][0] for i in range(min(16, len(test)))])
        with torch.inference_mode():
            onnx_out = embedder(images)
            outs = {"float32": model(images.to(device)).float().cpu()}
            with torch.autocast(device.type, dtype=torch.float16, enabled=ctx.cuda):
                outs["float16_autocast"] = model(images.to(device)).float().cpu()
    for name, out in outs.items():
        if name != "float32" and not ctx.cuda:
            continue  # autocast to float16 is CUDA's
        cosine = float(torch.nn.functional.cosine_similarity(out, onnx_out, dim=1).min())
        step.figures[f"min_cosine_{name}_vs_onnx"] = round(cosine, 6)
        step.check(f"{name}_matches_onnx", cosine >= MIN_EXPORT_COSINE[name],
                   f"min cosine {cosine:.6f} < {MIN_EXPORT_COSINE[name]}")
    step.figures.update({"checkpoint": source, "images_compared": len(images), "torch_device": str(device),
                         "engine_default_runtime_on_device": inference.default_runtime(device),
                         "onnx_bytes": onnx_path.stat().st_size})


STEP_FUNCTIONS = {
    "synthetic_data": step_synthetic_data,
    "train_amp_resume_eval": step_train_amp_resume_eval,
    "train_default_recipe": step_train_default_recipe,
    "torchrun_ddp": step_torchrun_ddp,
    "deterministic_twice": step_deterministic_twice,
    "bench_throughput": step_bench_throughput,
    "search_query": step_search_query,
    "export_serving": step_export_serving,
}


def execute_step(plan: dict, ctx: Context) -> dict:
    """Run one step; never raises (but KeyboardInterrupt): a failure is recorded with its error."""
    step = Step(plan, ctx)
    start = time.perf_counter()
    error = None
    try:
        STEP_FUNCTIONS[step.name](step)
        if step.failed_checks:
            error = "checks failed: " + "; ".join(step.failed_checks)
    except StepFailed as e:
        error = str(e)
    except Exception as e:  # an unexpected error in a step must not stop the other steps
        import traceback
        error = f"{type(e).__name__}: {e}\n{_tail(traceback.format_exc())}"
    seconds = time.perf_counter() - start
    if error is None and seconds > ctx.args.step_timeout:  # in-process steps without an alarm
        error = f"took {seconds:.1f} s, over --step_timeout {ctx.args.step_timeout:.1f} s"
    passed = error is None
    return {"name": step.name, "what": plan["what"], "status": "passed" if passed else "failed",
            "passed": passed, "seconds": round(seconds, 2),
            "commands": [command_text(c) for c in plan["commands"]],
            "checks": step.checks, "figures": step.figures,
            "peak_gpu_memory_mb": step.peak_gpu_memory_mb,
            "peak_gpu_memory_method": step.memory_method if step.peak_gpu_memory_mb is not None else None,
            "runs": step.runs, "error": error}


# ============ main ============

def plan_report(plan: list[dict], status: str) -> list[dict]:
    return [{"name": s["name"], "what": s["what"], "status": status,
             "commands": [command_text(c) for c in s["commands"]]} for s in plan]


def settings_of(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("dry_run",)}


def main(args) -> int:
    """Run (or plan) the check; prints the JSON report and returns the exit code."""
    try:
        selected_steps(args.steps)
    except ValueError as e:
        get_args_parser().error(str(e))
    if args.step_timeout <= 0:
        get_args_parser().error(f"--step_timeout must be > 0 (got {args.step_timeout})")
    if str(REPO) not in sys.path:  # the project's flat modules (datasets, train, ...)
        sys.path.insert(0, str(REPO))
    import torch

    workdir = Path(args.workdir).expanduser().resolve() if args.workdir else default_workdir()
    plan = build_plan(args, workdir)
    wants_cuda = args.device.startswith("cuda")
    cuda = wants_cuda and torch.cuda.is_available()
    report = {"tool": "bench/gpu_check.py", "workdir": str(workdir), "settings": settings_of(args),
              "environment": environment_info(args.device)}

    if args.dry_run or (wants_cuda and not cuda):
        no_cuda_note = ("no CUDA device here (torch.cuda.is_available() is False)"
                        if wants_cuda and not cuda else "")
        if args.dry_run:
            mode, status = "dry_run", "planned"
            note = "dry run: nothing was run; this is the plan"
            if no_cuda_note:
                note += f". Note: {no_cuda_note}"
        else:
            mode, status = "no_cuda", "skipped: no CUDA"
            note = f"{no_cuda_note}: nothing was run; this is the plan a CUDA machine would run"
        report.update({
            "mode": mode, "passed": None, "note": note,
            "steps": plan_report(plan, status),
            "peak_gpu_memory_method": {"subprocess_steps": SUBPROCESS_MEMORY_METHOD,
                                       "in_process_steps": IN_PROCESS_MEMORY_METHOD}})
        print(json.dumps(json_safe(report), indent=1))
        return 0

    workdir.mkdir(parents=True, exist_ok=True)
    ctx = Context(args, workdir, cuda)
    if not cuda:
        report["note"] = (f"device {args.device}: a test of this script on the CPU; AMP checks do not "
                          "apply and the figures describe no GPU")
    _say(f"workdir {workdir}; steps {', '.join(s['name'] for s in plan)}")
    start = time.perf_counter()
    results = []
    for i, s in enumerate(plan, 1):
        _say(f"[{i}/{len(plan)}] {s['name']}: {s['what']}")
        r = execute_step(s, ctx)
        results.append(r)
        _say(f"[{i}/{len(plan)}] {s['name']}: {r['status']} ({r['seconds']:.1f} s)"
             + (f"\n{_tail(r['error'], 1500)}" if r["error"] else ""))
    total = time.perf_counter() - start
    passed = all(r["passed"] for r in results)
    report.update({
        "mode": "run", "passed": passed, "total_s": round(total, 1),
        "time_budget_s": TIME_BUDGET_S, "within_time_budget": total <= TIME_BUDGET_S,
        "failed_steps": [r["name"] for r in results if not r["passed"]],
        "steps": results,
        "peak_gpu_memory_mb": {r["name"]: r["peak_gpu_memory_mb"] for r in results},
        "peak_gpu_memory_method": {"subprocess_steps": SUBPROCESS_MEMORY_METHOD,
                                   "in_process_steps": IN_PROCESS_MEMORY_METHOD},
        "targets": ctx.targets or {"note": "bench_throughput did not produce figures"},
    })
    text = json.dumps(json_safe(report), indent=1)
    (workdir / "report.json").write_text(text + "\n")
    print(text)
    if passed and args.cleanup:
        shutil.rmtree(workdir, ignore_errors=True)
    _say(f"{'all steps passed' if passed else 'FAILED: ' + ', '.join(report['failed_steps'])} "
         f"in {total:.0f} s; report {workdir / 'report.json'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
