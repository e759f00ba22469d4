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
                         the result (on CUDA, extraction.extract_embeddings autocasts to float16
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
                         and float16 autocast as extraction.extract_embeddings runs it) against the
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

The script is the command line; the plan is bench/gpu_check_plan.py, the steps
bench/gpu_check_steps.py, how a step runs bench/gpu_check_harness.py, and the judging of the
runs' outputs bench/gpu_check_outputs.py.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import shutil
import sys
import tempfile
import time

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the project's flat modules and bench's helpers
    sys.path.insert(0, str(REPO))

from bench.gpu_check_harness import (
    IN_PROCESS_MEMORY_METHOD,
    SUBPROCESS_MEMORY_METHOD,
    Context,
    environment_info,
    say,
    tail,
)
from bench.gpu_check_outputs import json_safe
from bench.gpu_check_plan import STEPS, build_plan, plan_report, selected_steps
from bench.gpu_check_steps import execute_step

TIME_BUDGET_S = 480  # the "under 8 minutes" on an H100/H200-class GPU
MEMORY_METHODS = {"subprocess_steps": SUBPROCESS_MEMORY_METHOD, "in_process_steps": IN_PROCESS_MEMORY_METHOD}


# ============ arguments ============


def default_workdir() -> Path:
    """<tmp>/gpu_check-<YYYYmmdd-HHMMSS>-<pid>: computed, not created (a dry run creates nothing)."""
    return Path(tempfile.gettempdir()) / f"gpu_check-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("gpu_check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--dry_run", action="store_true", help="print the plan (steps and exact commands, status 'planned') and exit 0"
    )
    p.add_argument(
        "--workdir",
        default=None,
        help="folder for every output (data, checkpoints, logs, report.json); "
        "default: a new <tmp>/gpu_check-<time>-<pid>",
    )
    p.add_argument(
        "--steps",
        default=",".join(STEPS),
        help=f"comma-separated subset of {','.join(STEPS)} (synthetic_data is added "
        "when a selected step needs the dataset)",
    )
    p.add_argument(
        "--step_timeout", type=float, default=300.0, help="seconds one step may take, all its commands together"
    )
    p.add_argument("--cleanup", action="store_true", help="remove --workdir at the end when every step passed")
    p.add_argument(
        "--device", default="cuda", help="cuda or cuda:N; cpu runs the steps on the CPU to test this script only"
    )
    g = p.add_argument_group("training runs (train.py, evaluate.py, torchrun)")
    g.add_argument("--backbone", default="efficientnet_b0", help="train.py --backbone (and the bench's)")
    g.add_argument("--image_size", type=int, default=224, help="train.py --image_size (and the bench's)")
    g.add_argument(
        "--num_products",
        type=int,
        default=240,
        help="products of the synthetic SOP: 240 gives ~600 training images, 9 P x K "
        "steps of 64 per epoch, ~700 test images",
    )
    g.add_argument(
        "--data_image_size",
        type=int,
        default=256,
        help="side in px of the synthetic JPEGs (the 224 px transform resizes to 256)",
    )
    g.add_argument("--batch_size", type=int, default=64, help="train.py --batch_size (16 products x 4)")
    g.add_argument(
        "--max_steps_per_epoch", type=int, default=20, help="train.py --max_steps_per_epoch: bounds each epoch's time"
    )
    g.add_argument(
        "--nproc_per_node",
        type=int,
        default=0,
        help="torchrun processes (one GPU each; NCCL is used only when >= 2); 0: the GPUs up to 2, 1 without CUDA",
    )
    g.add_argument(
        "--embedding_size",
        type=int,
        default=128,
        help="train.py --embedding_size (the default recipe's PCA head needs at least as many training images)",
    )
    g = p.add_argument_group("throughput (bench/bench_throughput.py)")
    g.add_argument("--bench_num_images", type=int, default=2048, help="bench --num_images per part")
    g.add_argument("--bench_batch_size", type=int, default=128, help="bench --batch_size")
    g.add_argument("--bench_repeats", type=int, default=3, help="bench --repeats (medians reported)")
    g.add_argument(
        "--bench_synthetic_size",
        default="300-600",
        help="bench --synthetic_size: photo sides of its JPEGs, SOP-like by default",
    )
    g = p.add_argument_group("search (search.engine.SearchEngine)")
    g.add_argument(
        "--search_queries", type=int, default=20, help="warm queries timed after the first one (median reported)"
    )
    return p


# ============ main ============


def settings_of(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("dry_run",)}


def check_arguments(args) -> None:
    """argparse errors (exit 2) for an unknown step or a step timeout that is not positive."""
    try:
        selected_steps(args.steps)
    except ValueError as e:
        get_args_parser().error(str(e))
    if args.step_timeout <= 0:
        get_args_parser().error(f"--step_timeout must be > 0 (got {args.step_timeout})")


def plan_only(report: dict, plan: list[dict], dry_run: bool, no_cuda: bool) -> dict:
    """The report of a run that runs nothing: --dry_run, or CUDA wanted on a machine without it."""
    no_cuda_note = "no CUDA device here (torch.cuda.is_available() is False)" if no_cuda else ""
    if dry_run:
        mode, status = "dry_run", "planned"
        note = "dry run: nothing was run; this is the plan"
        if no_cuda_note:
            note += f". Note: {no_cuda_note}"
    else:
        mode, status = "no_cuda", "skipped: no CUDA"
        note = f"{no_cuda_note}: nothing was run; this is the plan a CUDA machine would run"
    return {
        **report,
        "mode": mode,
        "passed": None,
        "note": note,
        "steps": plan_report(plan, status),
        "peak_gpu_memory_method": MEMORY_METHODS,
    }


def run_steps(plan: list[dict], ctx: Context) -> list[dict]:
    """Every planned step in order, each recorded (a failed step does not stop the next)."""
    results = []
    for i, s in enumerate(plan, 1):
        say(f"[{i}/{len(plan)}] {s['name']}: {s['what']}")
        r = execute_step(s, ctx)
        results.append(r)
        say(
            f"[{i}/{len(plan)}] {s['name']}: {r['status']} ({r['seconds']:.1f} s)"
            + (f"\n{tail(r['error'], 1500)}" if r["error"] else "")
        )
    return results


def run_report(report: dict, results: list[dict], total: float, targets: dict | None) -> dict:
    """The report of a run: pass/fail, time against the budget, every step, peak memory, targets."""
    return {
        **report,
        "mode": "run",
        "passed": all(r["passed"] for r in results),
        "total_s": round(total, 1),
        "time_budget_s": TIME_BUDGET_S,
        "within_time_budget": total <= TIME_BUDGET_S,
        "failed_steps": [r["name"] for r in results if not r["passed"]],
        "steps": results,
        "peak_gpu_memory_mb": {r["name"]: r["peak_gpu_memory_mb"] for r in results},
        "peak_gpu_memory_method": MEMORY_METHODS,
        "targets": targets or {"note": "bench_throughput did not produce figures"},
    }


def main(args) -> int:
    """Run (or plan) the check; prints the JSON report and returns the exit code."""
    check_arguments(args)
    import torch

    workdir = Path(args.workdir).expanduser().resolve() if args.workdir else default_workdir()
    plan = build_plan(args, workdir)
    wants_cuda = args.device.startswith("cuda")
    cuda = wants_cuda and torch.cuda.is_available()
    report = {
        "tool": "bench/gpu_check.py",
        "workdir": str(workdir),
        "settings": settings_of(args),
        "environment": environment_info(args.device),
    }
    if args.dry_run or (wants_cuda and not cuda):
        print(json.dumps(json_safe(plan_only(report, plan, args.dry_run, wants_cuda and not cuda)), indent=1))
        return 0

    workdir.mkdir(parents=True, exist_ok=True)
    ctx = Context(args, workdir, cuda)
    if not cuda:
        report["note"] = (
            f"device {args.device}: a test of this script on the CPU; AMP checks do not "
            "apply and the figures describe no GPU"
        )
    say(f"workdir {workdir}; steps {', '.join(s['name'] for s in plan)}")
    start = time.perf_counter()
    results = run_steps(plan, ctx)
    total = time.perf_counter() - start
    report = run_report(report, results, total, ctx.targets)
    text = json.dumps(json_safe(report), indent=1)
    (workdir / "report.json").write_text(text + "\n")
    print(text)
    if report["passed"] and args.cleanup:
        shutil.rmtree(workdir, ignore_errors=True)
    say(
        f"{'all steps passed' if report['passed'] else 'FAILED: ' + ', '.join(report['failed_steps'])} "
        f"in {total:.0f} s; report {workdir / 'report.json'}"
    )
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
