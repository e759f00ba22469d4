"""bench/gpu_check.py on a CPU machine: the plan (--dry_run, and the automatic one without
CUDA) names every step with its exact commands and exits 0 without running anything; the pure
helpers that judge the runs' outputs (metrics.csv comparison, loss check, GradScaler steps,
targets). The GPU run itself is not tested here: it needs a CUDA device."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load()


def run_script(*argv, timeout=60):
    proc = subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    return proc


def _plan_checks(report, workdir, status):
    assert [s["name"] for s in report["steps"]] == list(gpu_check.STEPS)
    assert report["passed"] is None
    assert report["workdir"] == str(workdir)
    for step in report["steps"]:
        assert step["status"] == status
        assert step["commands"] and all(isinstance(c, str) and c for c in step["commands"])
    cmds = {s["name"]: s["commands"] for s in report["steps"]}
    train_cmd, resume_cmd, eval_cmd = cmds["train_amp_resume_eval"]
    for c in (train_cmd, resume_cmd, *cmds["torchrun_ddp"], *cmds["deterministic_twice"]):
        assert str(REPO / "train.py") in c
        assert "--weights none" in c and "--image_size 224" in c and "--amp" in c
        assert "--channels_last" in c and "--max_steps_per_epoch" in c
        assert f"--data_root {workdir / 'sop'}" in c and f"--checkpoint_dir {workdir / 'checkpoints'}" in c
    assert "--epochs 2" in train_cmd
    assert "--epochs 3" in resume_cmd and "--resume auto" in resume_cmd
    assert str(REPO / "evaluate.py") in eval_cmd and "--device cuda" in eval_cmd
    assert "torch.distributed.run" in cmds["torchrun_ddp"][0]
    assert "--nproc_per_node 1" in cmds["torchrun_ddp"][0]
    assert "--epochs 1" in cmds["torchrun_ddp"][0]
    det = cmds["deterministic_twice"]
    assert len(det) == 2 and all("--deterministic" in c for c in det)
    bench = cmds["bench_throughput"][0]
    assert str(REPO / "bench" / "bench_throughput.py") in bench
    assert "--backbone efficientnet_b0" in bench and "--amp" in bench and "--device cuda" in bench
    assert "app_stanford.SearchEngine" in cmds["search_query"][0]
    assert "ensure_synthetic_sop" in cmds["synthetic_data"][0]
    methods = report["peak_gpu_memory_method"]
    assert "mem_get_info" in methods["subprocess_steps"]
    assert "max_memory_allocated" in methods["in_process_steps"]


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path):
    workdir = tmp_path / "work"
    proc = run_script("--dry_run", "--workdir", str(workdir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # one JSON object, nothing else on stdout
    assert report["mode"] == "dry_run"
    _plan_checks(report, workdir, "planned")
    for key in ("torch", "torch_cuda", "cuda_available", "python"):
        assert key in report["environment"]
    assert not workdir.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the run would start")
def test_without_cuda_a_plain_run_prints_the_plan_and_exits_0(tmp_path):
    workdir = tmp_path / "work"
    proc = run_script("--workdir", str(workdir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["mode"] == "no_cuda"
    assert "no CUDA" in report["note"]
    _plan_checks(report, workdir, "skipped: no CUDA")
    assert report["environment"]["cuda_available"] is False
    assert not workdir.exists()


def test_bad_steps_argument_exits_2():
    proc = run_script("--dry_run", "--steps", "train,nonsense")
    assert proc.returncode == 2
    assert "nonsense" in proc.stderr


def test_selected_steps_adds_the_dataset_when_needed():
    assert gpu_check.selected_steps("bench_throughput") == ["bench_throughput"]
    assert gpu_check.selected_steps("search_query,torchrun_ddp") == [
        "synthetic_data", "torchrun_ddp", "search_query"]
    with pytest.raises(ValueError, match="unknown"):
        gpu_check.selected_steps("gpu")


def _rows():
    header = ["epoch", "train_loss", "val_loss", "val_recall@1", *train.TIMING_COLUMNS]
    cells = [["0", "", "0.61", "0.25", "", "", "1.5"],
             ["1", "0.5512", "0.58", "0.3", "812.4", "9.1", "1.4"]]
    return [dict(zip(header, row)) for row in cells]


def test_metrics_comparison_ignores_only_the_timing_columns():
    a, b = _rows(), _rows()
    assert gpu_check.metrics_differences(a, b, ignore=train.TIMING_COLUMNS) == []
    for col in train.TIMING_COLUMNS:  # the machine's speed differs between two runs
        b[1][col] = "1.0"
    assert gpu_check.metrics_differences(a, b, ignore=train.TIMING_COLUMNS) == []
    assert gpu_check.metrics_differences(a, b) != []  # not ignored: they count

    b[1]["train_loss"] = "0.5513"
    diffs = gpu_check.metrics_differences(a, b, ignore=train.TIMING_COLUMNS)
    assert len(diffs) == 1 and "train_loss" in diffs[0] and "epoch 1" in diffs[0]
    assert gpu_check.metrics_differences(a, a[:1], ignore=train.TIMING_COLUMNS)  # a row lost


def test_metrics_comparison_reads_metrics_csv_as_train_writes_it(tmp_path):
    history = [{"epoch": 0, "val_loss": 0.6, "val_time": 1.0},
               {"epoch": 1, "train_loss": 0.1 + 0.2, "val_loss": 0.5, "val_time": 2.0}]
    train.write_metrics_csv(tmp_path / "a.csv", history)
    history[1]["val_time"] = 3.0
    train.write_metrics_csv(tmp_path / "b.csv", history)
    a, b = gpu_check.read_csv_rows(tmp_path / "a.csv"), gpu_check.read_csv_rows(tmp_path / "b.csv")
    assert gpu_check.metrics_differences(a, b, ignore=train.TIMING_COLUMNS) == []
    history[1]["train_loss"] = 0.3  # 0.1 + 0.2 != 0.3: full precision is compared
    train.write_metrics_csv(tmp_path / "c.csv", history)
    c = gpu_check.read_csv_rows(tmp_path / "c.csv")
    assert gpu_check.metrics_differences(a, c, ignore=train.TIMING_COLUMNS)
    assert gpu_check.loss_problems(a) == []
    assert gpu_check.epochs_of(a) == [0, 1]


def test_loss_problems_flags_non_finite_and_missing_losses():
    rows = _rows()
    assert gpu_check.loss_problems(rows) == []  # epoch 0 has no training loss: fine
    rows[1]["train_loss"] = "nan"
    rows[0]["val_loss"] = ""
    problems = gpu_check.loss_problems(rows)
    assert len(problems) == 2 and any("train_loss" in p for p in problems)
    assert gpu_check.loss_problems([]) == ["metrics.csv has no rows"]


def test_optimizer_steps_and_scheduled_steps():
    state = {"state": {0: {"step": torch.tensor(7.0)}, 1: {"step": torch.tensor(7.0)}}, "param_groups": []}
    assert gpu_check.optimizer_steps(state) == 7
    assert gpu_check.optimizer_steps({"state": {}}) is None
    assert gpu_check.optimizer_steps(None) is None
    rows = [{"epoch": "0", "images": ""}, {"epoch": "1", "images": "576.0"},
            {"epoch": "2", "images": "576.0"}]
    assert gpu_check.scheduled_steps(rows, batch_size=64) == 18
    assert gpu_check.scheduled_steps(rows, batch_size=32, world_size=2) == 18


def test_target_report():
    bench = {"extract_images_per_s": 3500.0, "train_vs_ceiling": 0.7}
    t = gpu_check.target_report(bench, "efficientnet_b0", 224, cuda=True)
    assert t["extract_images_per_s"]["met"] is True and t["train_vs_ceiling"]["met"] is False
    assert t["extract_images_per_s"]["value"] == 3500.0 and "note" not in t
    other = gpu_check.target_report(bench, "resnet18", 64, cuda=True)
    assert other["extract_images_per_s"]["met"] is None and "note" in other
    assert gpu_check.target_report({}, "efficientnet_b0", 224, cuda=True)["train_vs_ceiling"]["met"] is None


def test_json_safe_removes_non_finite_numbers():
    out = gpu_check.json_safe({"a": float("nan"), "b": [1.0, float("inf")], "c": Path("/x")})
    assert out == {"a": None, "b": [1.0, None], "c": "/x"}
    json.dumps(out, allow_nan=False)
