"""bench/gpu_check.py, run for real on the CPU (``--device cpu``, tiny data): the steps that need
no GPU run, the JSON report (stdout and report.json) has every step with its status, checks,
figures and commands, and a step fails, with its reason, when its command fails or times out,
its checkpoint does not load, or one of its checks does not hold, while the other steps still
run. Without CUDA a plain run only prints the plan. The helpers that judge training runs'
outputs (metrics.csv comparison, losses, GradScaler steps, targets) are tested on hand-made
rows. The GPU run itself needs a CUDA device."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from bench import gpu_check_outputs, gpu_check_plan, gpu_check_steps
from search import engine as search_engine
from training import runs

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"
# small enough for seconds on a CPU: 12 products of 48 px JPEGs, a resnet18 at 32 px
TINY = [
    "--device",
    "cpu",
    "--num_products",
    "12",
    "--data_image_size",
    "48",
    "--backbone",
    "resnet18",
    "--image_size",
    "32",
    "--search_queries",
    "2",
]


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load()


def run_check(capsys, *argv):
    """gpu_check.main in this process: (exit code, the one JSON object it printed)."""
    rc = gpu_check.main(gpu_check.get_args_parser().parse_args([str(a) for a in argv]))
    return rc, json.loads(capsys.readouterr().out)


def steps_of(report):
    return {s["name"]: s for s in report["steps"]}


def fake_bench(tmp_path, body):
    """A stand-in for bench_throughput.py: ``body`` runs with ``output``, the --output path."""
    path = tmp_path / "fake_bench.py"
    path.write_text("import json, sys, time\noutput = sys.argv[sys.argv.index('--output') + 1]\n" + body)
    return path


# ============ steps that run on the CPU ============


def test_search_step_runs_and_the_report_says_so(tmp_path, capsys):
    work = tmp_path / "work"
    rc, report = run_check(capsys, *TINY, "--steps", "search_query", "--workdir", work)
    assert rc == 0
    assert json.loads((work / "report.json").read_text()) == report  # stdout and the file agree
    json.dumps(report, allow_nan=False)  # strict JSON: no NaN / inf
    assert report["mode"] == "run" and report["passed"] is True and report["failed_steps"] == []
    steps = steps_of(report)
    assert list(steps) == ["synthetic_data", "search_query"]  # the data step is added first
    for s in steps.values():
        assert s["status"] == "passed" and s["passed"] is True and s["error"] is None
        assert s["checks"] and all(s["checks"].values()) and s["commands"] and s["seconds"] >= 0
    data, search = steps["synthetic_data"]["figures"], steps["search_query"]["figures"]
    assert data["num_products"] == 12 and data["image_size"] == [48, 48]
    assert search["gallery_images"] == data["test_images"] > 0
    assert search["checkpoint"].startswith("untrained") and search["engine_device"] == "cpu"
    assert search["warm_queries"] == 2 and search["warm_query_ms_median"] > 0
    # the query is the gallery's first image: it finds itself first, at cosine 1
    assert search["top1_is_the_query_image"] is True and math.isclose(search["top1_score"], 1, abs_tol=1e-4)
    assert {"decode", "embed", "search", "total"} <= set(search["timing_ms_breakdown"])
    assert (work / "checkpoints" / "search_untrained" / "best.pth").is_file()
    assert "note" in report["targets"]  # no bench ran: no figures to hold against the targets


def test_a_checkpoint_that_does_not_load_fails_its_step_only(tmp_path, capsys):
    work = tmp_path / "work"
    broken = work / "checkpoints" / "gpu_amp" / "best.pth"  # as if training had written it
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a checkpoint")
    rc, report = run_check(capsys, *TINY, "--steps", "search_query", "--workdir", work)
    assert rc == 1 and report["passed"] is False and report["failed_steps"] == ["search_query"]
    steps = steps_of(report)
    assert steps["synthetic_data"]["status"] == "passed"
    failed = steps["search_query"]
    assert failed["status"] == "failed" and failed["passed"] is False
    assert str(broken) in failed["error"]


def test_a_check_that_does_not_hold_fails_the_step(tmp_path, capsys, monkeypatch):
    real = search_engine.SearchEngine.search_file

    def nan_scores(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        out["results"][0]["score"] = float("nan")
        return out

    monkeypatch.setattr(search_engine.SearchEngine, "search_file", nan_scores)
    rc, report = run_check(capsys, *TINY, "--steps", "search_query", "--workdir", tmp_path / "work")
    assert rc == 1
    failed = steps_of(report)["search_query"]
    assert failed["checks"] == {"results_returned": True, "finite_scores": False}
    assert failed["error"].startswith("checks failed: finite_scores")


@pytest.mark.slow
def test_default_recipe_ddp_and_export_steps_run_on_the_cpu(tmp_path, capsys):
    """The steps a GPU run adds for the default recipe, DDP (2 gloo processes here, NCCL on 2 GPUs)
    and export/serving, run end to end on the CPU."""
    rc, report = run_check(
        capsys,
        *TINY,
        "--num_products",
        "40",
        "--batch_size",
        "16",
        "--max_steps_per_epoch",
        "2",
        "--embedding_size",
        "16",
        "--nproc_per_node",
        "2",
        "--workdir",
        tmp_path / "work",
        "--steps",
        "train_default_recipe,torchrun_ddp,export_serving",
    )
    steps = steps_of(report)
    assert rc == 0, {name: s["error"] for name, s in steps.items()}
    assert list(steps) == ["synthetic_data", "train_default_recipe", "torchrun_ddp", "export_serving"]
    recipe, ddp, export = steps["train_default_recipe"], steps["torchrun_ddp"], steps["export_serving"]
    assert recipe["checks"]["batchnorm_statistics_frozen"] and recipe["checks"]["gpu_recipe_warmup_then_backbone"]
    assert recipe["checks"]["pca_head_initialised"]
    assert [r["label"] for r in ddp["runs"]] == ["torchrun", "torchrun_proxy_gather"]
    assert ddp["figures"]["world_size"] == 2 and ddp["figures"]["process_group"] == "gloo"
    assert ddp["checks"]["gpu_ddp_warmup_then_backbone"] and ddp["checks"]["gpu_ddp_proxy_proxies_saved"]
    assert export["figures"]["min_cosine_float32_vs_onnx"] >= 0.9999
    assert export["figures"]["engine_default_runtime_on_device"] in ("onnx", "torch")


# ============ steps that run a command ============


def test_command_step_records_its_run_and_figures(tmp_path, capsys, monkeypatch):
    figures = {key: 100.0 for key in gpu_check_steps.BENCH_KEYS}
    monkeypatch.setattr(
        gpu_check_plan,
        "BENCH",
        fake_bench(tmp_path, f"print('benchmarking')\nopen(output, 'w').write(json.dumps({figures!r}))\n"),
    )
    rc, report = run_check(capsys, *TINY, "--steps", "bench_throughput", "--workdir", tmp_path / "work")
    assert rc == 0
    step = steps_of(report)["bench_throughput"]
    assert step["status"] == "passed" and all(step["checks"].values())
    assert set(step["checks"]) == set(gpu_check_steps.BENCH_KEYS)
    assert {k: step["figures"][k] for k in gpu_check_steps.BENCH_KEYS} == figures
    [run] = step["runs"]
    assert run["label"] == "bench" and run["rc"] == 0 and run["timed_out"] is False
    assert Path(run["log"]).read_text() == "benchmarking\n"
    assert report["targets"]["extract_images_per_s"]["met"] is None  # a CPU run meets no GPU target


@pytest.mark.parametrize(
    "body,timeout,reason",
    [
        ("print('out of memory')\nsys.exit(3)\n", 60, "exit code 3"),
        ("open(output, 'w').write(json.dumps({'extract_images_per_s': float('nan')}))\n", 60, "checks failed"),
        ("time.sleep(60)\n", 1, "killed after"),
    ],
)
def test_command_step_fails_with_its_reason(tmp_path, capsys, monkeypatch, body, timeout, reason):
    monkeypatch.setattr(gpu_check_plan, "BENCH", fake_bench(tmp_path, body))
    rc, report = run_check(
        capsys, *TINY, "--steps", "bench_throughput", "--workdir", tmp_path / "work", "--step_timeout", timeout
    )
    assert rc == 1 and report["failed_steps"] == ["bench_throughput"]
    step = steps_of(report)["bench_throughput"]
    assert step["status"] == "failed" and reason in step["error"]
    if "exit code" in reason:
        assert "out of memory" in step["error"] and step["runs"][0]["rc"] == 3  # the log's tail
    if "killed" in reason:
        assert step["runs"][0]["timed_out"] is True


# ============ the plan ============


def test_dry_run_prints_the_plan_and_creates_nothing(tmp_path, capsys):
    work = tmp_path / "work"
    rc, report = run_check(capsys, "--dry_run", "--workdir", work)
    assert rc == 0 and report["mode"] == "dry_run" and report["passed"] is None
    assert [s["name"] for s in report["steps"]] == list(gpu_check.STEPS)
    for step in report["steps"]:
        assert step["status"] == "planned" and step["what"]
        assert step["commands"] and all(isinstance(c, str) and c for c in step["commands"])
    assert {"torch", "cuda_available", "python"} <= set(report["environment"])
    assert not work.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the run would start")
def test_without_cuda_a_plain_run_prints_the_plan_and_exits_0(tmp_path, capsys):
    rc, report = run_check(capsys, "--workdir", tmp_path / "work")
    assert rc == 0 and report["mode"] == "no_cuda" and "no CUDA" in report["note"]
    assert {s["status"] for s in report["steps"]} == {"skipped: no CUDA"}
    assert not (tmp_path / "work").exists()


def test_bad_arguments_exit_2(capsys):
    for argv in (["--dry_run", "--steps", "train,nonsense"], ["--step_timeout", "0"]):
        with pytest.raises(SystemExit) as err:
            run_check(capsys, *argv)
        assert err.value.code == 2
    assert "nonsense" in capsys.readouterr().err


def test_selected_steps_adds_the_dataset_when_needed():
    assert gpu_check.selected_steps("bench_throughput") == ["bench_throughput"]
    assert gpu_check.selected_steps("search_query,torchrun_ddp") == ["synthetic_data", "torchrun_ddp", "search_query"]
    assert gpu_check.selected_steps("export_serving,train_default_recipe") == [
        "synthetic_data",
        "train_default_recipe",
        "export_serving",
    ]
    with pytest.raises(ValueError, match="unknown"):
        gpu_check.selected_steps("gpu")


def test_torchrun_processes_default_to_the_gpus_up_to_two():
    parse = gpu_check.get_args_parser().parse_args
    assert gpu_check_plan.nproc(parse(["--device", "cpu"])) == 1
    assert gpu_check_plan.nproc(parse(["--device", "cpu", "--nproc_per_node", "2"])) == 2
    expected = max(1, min(2, torch.cuda.device_count()))
    assert gpu_check_plan.nproc(parse([])) == expected


# ============ judging training runs' outputs ============


def _rows():
    header = ["epoch", "train_loss", "val_loss", "val_recall@1", *runs.TIMING_COLUMNS]
    cells = [["0", "", "0.61", "0.25", "", "", "1.5"], ["1", "0.5512", "0.58", "0.3", "812.4", "9.1", "1.4"]]
    return [dict(zip(header, row)) for row in cells]


def test_metrics_comparison_ignores_only_the_timing_columns():
    a, b = _rows(), _rows()
    assert gpu_check_outputs.metrics_differences(a, b, ignore=runs.TIMING_COLUMNS) == []
    for col in runs.TIMING_COLUMNS:  # the machine's speed differs between two runs
        b[1][col] = "1.0"
    assert gpu_check_outputs.metrics_differences(a, b, ignore=runs.TIMING_COLUMNS) == []
    assert gpu_check_outputs.metrics_differences(a, b) != []  # not ignored: they count

    b[1]["train_loss"] = "0.5513"
    diffs = gpu_check_outputs.metrics_differences(a, b, ignore=runs.TIMING_COLUMNS)
    assert len(diffs) == 1 and "train_loss" in diffs[0] and "epoch 1" in diffs[0]
    assert gpu_check_outputs.metrics_differences(a, a[:1], ignore=runs.TIMING_COLUMNS)  # a row lost


def test_metrics_comparison_reads_metrics_csv_as_training_writes_it(tmp_path):
    history = [
        {"epoch": 0, "val_loss": 0.6, "val_time": 1.0},
        {"epoch": 1, "train_loss": 0.1 + 0.2, "val_loss": 0.5, "val_time": 2.0},
    ]
    runs.write_metrics_csv(tmp_path / "a.csv", history)
    history[1]["val_time"] = 3.0
    runs.write_metrics_csv(tmp_path / "b.csv", history)
    a, b = gpu_check_outputs.read_csv_rows(tmp_path / "a.csv"), gpu_check_outputs.read_csv_rows(tmp_path / "b.csv")
    assert gpu_check_outputs.metrics_differences(a, b, ignore=runs.TIMING_COLUMNS) == []
    history[1]["train_loss"] = 0.3  # 0.1 + 0.2 != 0.3: full precision is compared
    runs.write_metrics_csv(tmp_path / "c.csv", history)
    c = gpu_check_outputs.read_csv_rows(tmp_path / "c.csv")
    assert gpu_check_outputs.metrics_differences(a, c, ignore=runs.TIMING_COLUMNS)
    assert gpu_check_outputs.loss_problems(a) == []
    assert gpu_check_outputs.epochs_of(a) == [0, 1]


def test_loss_problems_flags_non_finite_and_missing_losses():
    rows = _rows()
    assert gpu_check_outputs.loss_problems(rows) == []  # epoch 0 has no training loss: fine
    rows[1]["train_loss"] = "nan"
    rows[0]["val_loss"] = ""
    problems = gpu_check_outputs.loss_problems(rows)
    assert len(problems) == 2 and any("train_loss" in p for p in problems)
    assert gpu_check_outputs.loss_problems([]) == ["metrics.csv has no rows"]
    # Proxy-Anchor writes no val_loss column (no proxy for validation products): train_loss only
    no_val = [{k: v for k, v in row.items() if k != "val_loss"} for row in _rows()]
    assert gpu_check_outputs.loss_problems(no_val) == []
    no_val[1]["train_loss"] = "inf"
    assert gpu_check_outputs.loss_problems(no_val) == ["epoch 1 train_loss = 'inf'"]


def test_optimizer_steps_and_scheduled_steps():
    state = {"state": {0: {"step": torch.tensor(7.0)}, 1: {"step": torch.tensor(7.0)}}, "param_groups": []}
    assert gpu_check_outputs.optimizer_steps(state) == 7
    assert gpu_check_outputs.optimizer_steps({"state": {}}) is None
    assert gpu_check_outputs.optimizer_steps(None) is None
    rows = [{"epoch": "0", "images": ""}, {"epoch": "1", "images": "576.0"}, {"epoch": "2", "images": "576.0"}]
    assert gpu_check_outputs.scheduled_steps(rows, batch_size=64) == 18
    assert gpu_check_outputs.scheduled_steps(rows, batch_size=32, world_size=2) == 18


def test_target_report():
    bench = {"extract_images_per_s": 3500.0, "train_vs_ceiling": 0.7}
    t = gpu_check_outputs.target_report(bench, "efficientnet_b0", 224, cuda=True)
    assert t["extract_images_per_s"]["met"] is True and t["train_vs_ceiling"]["met"] is False
    assert t["extract_images_per_s"]["value"] == 3500.0 and "note" not in t
    other = gpu_check_outputs.target_report(bench, "resnet18", 64, cuda=True)
    assert other["extract_images_per_s"]["met"] is None and "note" in other
    assert gpu_check_outputs.target_report({}, "efficientnet_b0", 224, cuda=True)["train_vs_ceiling"]["met"] is None


def test_json_safe_removes_non_finite_numbers():
    out = gpu_check_outputs.json_safe({"a": float("nan"), "b": [1.0, float("inf")], "c": Path("/x")})
    assert out == {"a": None, "b": [1.0, None], "c": "/x"}
    json.dumps(out, allow_nan=False)
