"""bench/gpu_check.py's steps: each calls the project's own entry points (train.py, torchrun,
evaluate.py, export.py, bench_throughput.py, search.engine) and checks what they wrote; the
checks shared by every training run; and execute_step, which runs one and records its result.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
import shutil
import statistics
import time

from bench.gpu_check_harness import IN_PROCESS_MEMORY_METHOD, Context, Step, StepFailed, alarm, tail
from bench.gpu_check_outputs import (
    epochs_of,
    finite,
    loss_problems,
    metrics_differences,
    optimizer_steps,
    read_csv_rows,
    scheduled_steps,
    target_report,
)
from bench.gpu_check_plan import command_text, nproc

MIN_EXPORT_COSINE = {"float32": 0.9999, "float16_autocast": 0.99}


def _need_data(ctx: Context) -> None:
    from dataio import fileio

    if not fileio.is_complete(ctx.sop):
        raise StepFailed(
            f"the synthetic dataset {ctx.sop} is missing or incomplete: the "
            "synthetic_data step did not finish (see its error)"
        )


def _load_ckpt(path: Path) -> dict:
    import checkpoints

    if not path.is_file():
        raise StepFailed(f"checkpoint {path} was not written")
    return checkpoints.load_checkpoint(path)


def _run_figures(step: Step, prefix: str, rows: list[dict]) -> None:
    """The last epoch's main figures, as ``<run>_<column>``."""
    last = rows[-1] if rows else {}
    for key in ("train_loss", "val_loss", "val_recall@1", "images_per_sec", "epoch_time"):
        if key in last:
            step.figures[f"{prefix}_{key}"] = float(last[key]) if finite(last[key]) else last[key]


def _check_training(step: Step, run: str, epochs: int, world: int = 1) -> tuple[list[dict], dict]:
    """Checks common to every train.py run: metrics.csv rows 0..epochs with finite losses,
    last.pth of the last epoch, args.json's device / AMP / world size. Returns (rows, ckpt)."""
    w = step.ctx.workdir
    run_dir, ckpt_path = w / "runs" / run, w / "checkpoints" / run / "last.pth"
    csv_path = run_dir / "metrics.csv"
    if not csv_path.is_file():
        raise StepFailed(f"{run}: {csv_path} was not written")
    rows = read_csv_rows(csv_path)
    step.check(
        f"{run}_epochs",
        epochs_of(rows) == list(range(epochs + 1)),
        f"metrics.csv epochs {epochs_of(rows)}, expected 0..{epochs}",
    )
    problems = loss_problems(rows)
    step.check(f"{run}_finite_losses", not problems, "; ".join(problems[:5]))
    ckpt = _load_ckpt(ckpt_path)
    step.check(
        f"{run}_checkpoint_epoch", ckpt.get("epoch") == epochs, f"last.pth epoch {ckpt.get('epoch')}, expected {epochs}"
    )
    info = json.loads((run_dir / "args.json").read_text())
    step.check(
        f"{run}_world_size",
        info.get("world_size") == world,
        f"args.json world_size {info.get('world_size')}, expected {world}",
    )
    if step.ctx.cuda:
        step.check(
            f"{run}_on_cuda",
            str(info.get("resolved_device", "")).startswith("cuda"),
            f"resolved_device {info.get('resolved_device')}",
        )
        step.check(f"{run}_amp_used", info.get("amp_used") is True, f"amp_used {info.get('amp_used')}")
    _run_figures(step, run, rows)
    return rows, ckpt


def _check_scaler(step: Step, run: str, ckpt: dict, rows: list[dict], world: int = 1) -> None:
    """GradScaler state in the checkpoint: a finite positive scale, and optimizer steps taken."""
    scaler = ckpt.get("scaler") or {}
    taken = optimizer_steps(ckpt.get("optimizer"))
    scheduled = scheduled_steps(rows, step.ctx.args.batch_size, world)
    step.figures.update(
        {
            f"{run}_scaler_scale": scaler.get("scale"),
            f"{run}_scaler_growth_tracker": scaler.get("_growth_tracker"),
            f"{run}_optimizer_steps_taken": taken,
            f"{run}_training_steps_run": scheduled,
            f"{run}_steps_skipped_by_scaler": None if taken is None else scheduled - taken,
        }
    )
    if step.ctx.cuda:  # the scaler is disabled (empty state) off CUDA, by design of train.py
        scale = scaler.get("scale")
        step.check(
            f"{run}_scaler_scale_recorded",
            isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0,
            f"checkpoint scaler state {scaler!r}",
        )
    step.check(f"{run}_optimizer_steps_taken", bool(taken), f"{taken} optimizer steps taken of {scheduled} run")


# ============ the steps ============


def step_synthetic_data(step: Step) -> None:
    from dataio import fileio, synthetic_sop

    args = step.ctx.args
    start = time.perf_counter()
    with alarm(step.time_left()):
        root = synthetic_sop.ensure_synthetic_sop(
            step.ctx.sop, num_products=args.num_products, image_size=args.data_image_size, replace=True
        )
    marker = fileio.read_marker(root) or {}
    step.check("complete", fileio.is_complete(root), f"{root} has no completion marker")
    step.figures.update(
        {
            "root": str(root),
            "num_products": marker.get("num_products"),
            "image_size": marker.get("image_size"),
            "train_images": marker.get("train_images"),
            "test_images": marker.get("test_images"),
            "generate_s": round(time.perf_counter() - start, 2),
        }
    )


def step_train_amp_resume_eval(step: Step) -> None:
    _need_data(step.ctx)
    w = step.ctx.workdir
    step.run("train")
    rows2, ckpt2 = _check_training(step, "gpu_amp", 2)
    _check_scaler(step, "gpu_amp", ckpt2, rows2)
    steps_before = optimizer_steps(ckpt2.get("optimizer")) or 0
    del ckpt2

    out = step.run("resume")
    step.check(
        "resume_said_resuming",
        "resuming from" in out["output"],
        "train.py did not print 'resuming from' with --resume auto",
    )
    resumed_from = json.loads((w / "runs" / "gpu_amp" / "args.json").read_text()).get("resumed_from")
    step.check(
        "resume_from_last_pth", str(resumed_from).endswith("last.pth"), f"args.json resumed_from {resumed_from!r}"
    )
    rows3, ckpt3 = _check_training(step, "gpu_amp", 3)
    # the resumed metrics.csv is rebuilt from the checkpoint's history: epochs 0-2 unchanged
    diffs = metrics_differences(rows2, rows3[: len(rows2)], ignore=())
    step.check("resume_kept_history", not diffs, "; ".join(diffs[:3]))
    steps_after = optimizer_steps(ckpt3.get("optimizer")) or 0
    step.check(
        "resume_took_steps",
        steps_after > steps_before,
        f"optimizer steps {steps_before} before resuming, {steps_after} after",
    )
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
    step.check("evaluate_finite_recall", finite(recall), f"product recall@1 {recall!r}")
    step.check("evaluate_unit_embeddings", finite(norm) and abs(float(norm) - 1) < 1e-2, f"mean norm {norm}")
    if step.ctx.cuda:
        step.check("evaluate_on_cuda", device.startswith("cuda"), f"timing.device {device!r}")
    extract_s = res.get("timing", {}).get("extract_s")
    n = res.get("num_queries")
    step.figures.update(
        {
            "evaluate_device": device,
            # extraction.extract_embeddings(amp=None) autocasts to float16 exactly when the device is
            # CUDA, and evaluate.py passes no amp: so AMP was used iff the device is cuda
            "evaluate_amp": device.startswith("cuda"),
            "evaluate_num_queries": n,
            "evaluate_product_recall@1": recall,
            "evaluate_map@r": (res.get("product") or {}).get("map@r"),
            "evaluate_extract_s": extract_s,
            "evaluate_images_per_s": round(n / extract_s, 1) if n and extract_s else None,
        }
    )


def _check_warmup(step: Step, run: str, rows: list[dict]) -> None:
    """The recipe's warm-up: epoch 1 began with head-only steps, epoch 2 had none."""
    frozen = [float(r.get("train_frozen_steps") or "nan") for r in rows[1:]]
    step.check(
        f"{run}_warmup_then_backbone",
        len(frozen) >= 2 and frozen[0] > 0 and frozen[1] == 0,
        f"train_frozen_steps per epoch {frozen}",
    )


def step_train_default_recipe(step: Step) -> None:
    _need_data(step.ctx)
    import torch

    out = step.run("train")
    step.check(
        "pca_head_initialised",
        "head initialised with the PCA" in out["output"],
        "train.py did not print 'head initialised with the PCA'",
    )
    rows, ckpt = _check_training(step, "gpu_recipe", 2)
    _check_scaler(step, "gpu_recipe", ckpt, rows)
    _check_warmup(step, "gpu_recipe", rows)
    # --weights none starts every BatchNorm at mean 0, variance 1: frozen, they are still there
    model = ckpt["model"]
    means = [k for k in model if k.startswith("backbone.") and k.endswith("running_mean")]
    moved = [k for k in means if not (torch.all(model[k] == 0) and torch.all(model[k.replace("mean", "var")] == 1))]
    step.check(
        "batchnorm_statistics_frozen",
        bool(means) and not moved,
        f"{len(moved)} of {len(means)} BatchNorm layers' statistics moved",
    )
    step.figures.update(
        {
            "gpu_recipe_batchnorm_layers": len(means),
            "gpu_recipe_frozen_steps": [r.get("train_frozen_steps") for r in rows[1:]],
        }
    )


def step_torchrun_ddp(step: Step) -> None:
    _need_data(step.ctx)
    from training import distributed

    n = nproc(step.ctx.args)
    step.run("torchrun")
    rows, ckpt = _check_training(step, "gpu_ddp", 2, world=n)
    _check_scaler(step, "gpu_ddp", ckpt, rows, world=n)
    _check_warmup(step, "gpu_ddp", rows)
    step.check(
        "gpu_ddp_unwrapped_state_dict",
        not any(k.startswith("module.") for k in ckpt["model"]),
        "state dict keys carry DDP's 'module.' prefix",
    )
    del ckpt
    step.run("torchrun_proxy_gather")
    rows, ckpt = _check_training(step, "gpu_ddp_proxy", 1, world=n)
    step.check(
        "gpu_ddp_proxy_proxies_saved",
        "proxies" in (ckpt.get("criterion") or {}),
        "last.pth has no Proxy-Anchor proxies",
    )
    step.figures["world_size"] = n
    step.figures["process_group"] = (
        distributed.process_group_backend(step.ctx.cuda)
        if n > 1
        else "none: with 1 process training.distributed.init_distributed creates no process group "
        "(WORLD_SIZE 1); NCCL needs 2 processes on as many GPUs"
    )


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
    step.check(
        "identical_weights",
        not differing and set(wa) == set(wb),
        f"{len(differing)} tensors differ, e.g. {differing[:3]}",
    )
    compared = sorted({c for r in rows_a for c in r} - set(runs.TIMING_COLUMNS))
    step.figures.update(
        {
            "compared_columns": compared,
            "ignored_columns": list(runs.TIMING_COLUMNS),
            "metric_differences": diffs[:10],
            "weight_tensors_differing": len(differing),
        }
    )


BENCH_KEYS = (
    "forward_images_per_s",
    "extract_images_per_s",
    "train_step_images_per_s",
    "train_loader_images_per_s",
    "extract_vs_ceiling",
    "train_vs_ceiling",
)


def step_bench_throughput(step: Step) -> None:
    path = step.ctx.workdir / "bench.json"
    path.unlink(missing_ok=True)  # never read a previous run's figures
    step.run("bench")
    if not path.is_file():
        raise StepFailed(f"bench_throughput.py exited 0 but wrote no {path}")
    bench = json.loads(path.read_text())
    for key in BENCH_KEYS:
        v = bench.get(key)
        step.check(key, finite(v) and float(v) > 0, f"{key} = {v!r}")
    if step.ctx.cuda:
        step.check("bench_on_cuda", str(bench.get("device", "")).startswith("cuda"), f"device {bench.get('device')}")
        step.check("bench_amp", bench.get("amp") is True, f"amp {bench.get('amp')}")
    step.figures.update(
        {
            k: bench.get(k)
            for k in (
                *BENCH_KEYS,
                "device",
                "device_name",
                "amp",
                "channels_last",
                "batch_size",
                "workers",
                "decode_size",
                "extract_data_wait_frac",
                "train_loader_data_wait_frac",
                "extract_first_batch_s",
                "train_loader_first_batch_s",
                "timed_images",
            )
            if k in bench
        }
    )
    step.ctx.targets = target_report(bench, step.ctx.args.backbone, step.ctx.args.image_size, step.ctx.cuda)


def _search_checkpoint(ctx: Context) -> tuple[Path, str]:
    """The trained run's best.pth, or (when that step did not run) an untrained checkpoint
    (`search.tiny_demo.write_untrained_checkpoint`)."""
    trained = ctx.workdir / "checkpoints" / "gpu_amp" / "best.pth"
    if trained.is_file():
        return trained, "gpu_amp/best.pth (train_amp_resume_eval)"
    from search.tiny_demo import write_untrained_checkpoint

    path = write_untrained_checkpoint(
        ctx.workdir / "checkpoints" / "search_untrained" / "best.pth", ctx.sop, ctx.args.backbone, ctx.args.image_size
    )
    return path, "untrained (no gpu_amp/best.pth)"


def step_search_query(step: Step) -> None:
    _need_data(step.ctx)
    import numpy as np
    import torch

    import checkpoints
    import datasets
    import models
    import preprocessing
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
        gallery = datasets.SOPDataset(
            ctx.sop, "test", transform=preprocessing.build_transform(int(model.model_args["image_size"]), train=False)
        )
        t0 = time.perf_counter()
        # search.engine.load_or_build_index embeds on the CPU (the demo serves on the CPU); the
        # same project function with the model's device builds the gallery on the GPU
        index = build_gallery_index(
            model, gallery, device=device, progress=False, checkpoint_hash=checkpoints.checkpoint_hash(checkpoint)
        )
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
            step.peak_gpu_memory_mb = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            step.memory_method = IN_PROCESS_MEMORY_METHOD
    last = warm[-1][0]
    scores = np.array([r["score"] for r in last["results"]], dtype=np.float64)
    step.check("results_returned", len(last["results"]) == k, f"{len(last['results'])} results for k={k}")
    step.check("finite_scores", bool(np.isfinite(scores).all()), f"scores {scores.tolist()}")
    if ctx.cuda:
        step.check("engine_on_cuda", engine.device.type == "cuda", f"engine device {engine.device}")
    step.figures.update(
        {
            "checkpoint": source,
            "engine_device": str(engine.device),
            "gallery_images": len(index),
            "gallery_index_build_s": round(index_s, 2),
            "first_query_ms": round(first_ms, 2),
            "warm_query_ms_median": round(statistics.median(ms for _, ms in warm), 2),
            "warm_queries": len(warm),
            "timing_ms_breakdown": last["timing_ms"],
            "top1_is_the_query_image": bool(last["results"] and last["results"][0]["catalogue_path"] == index.paths[0]),
            "top1_score": float(scores[0]) if len(scores) else None,
        }
    )
    if ctx.cuda:
        del engine, model, index
        torch.cuda.empty_cache()  # leave later readings (if any) a clean device


def step_export_serving(step: Step) -> None:
    _need_data(step.ctx)
    import torch

    import datasets
    import inference
    import models
    import preprocessing

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
        test = datasets.SOPDataset(
            ctx.sop, "test", transform=preprocessing.build_transform(int(model.model_args["image_size"]), train=False)
        )
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
        step.check(
            f"{name}_matches_onnx",
            cosine >= MIN_EXPORT_COSINE[name],
            f"min cosine {cosine:.6f} < {MIN_EXPORT_COSINE[name]}",
        )
    step.figures.update(
        {
            "checkpoint": source,
            "images_compared": len(images),
            "torch_device": str(device),
            "engine_default_runtime_on_device": inference.default_runtime(device),
            "onnx_bytes": onnx_path.stat().st_size,
        }
    )


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

        error = f"{type(e).__name__}: {e}\n{tail(traceback.format_exc())}"
    seconds = time.perf_counter() - start
    if error is None and seconds > ctx.args.step_timeout:  # in-process steps without an alarm
        error = f"took {seconds:.1f} s, over --step_timeout {ctx.args.step_timeout:.1f} s"
    passed = error is None
    return {
        "name": step.name,
        "what": plan["what"],
        "status": "passed" if passed else "failed",
        "passed": passed,
        "seconds": round(seconds, 2),
        "commands": [command_text(c) for c in plan["commands"]],
        "checks": step.checks,
        "figures": step.figures,
        "peak_gpu_memory_mb": step.peak_gpu_memory_mb,
        "peak_gpu_memory_method": step.memory_method if step.peak_gpu_memory_mb is not None else None,
        "runs": step.runs,
        "error": error,
    }
