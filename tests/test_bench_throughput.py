"""Smoke test of bench/bench_throughput.py at a tiny size: it runs end to end (real JPEGs,
DataLoader workers, extract_embeddings, train_one_epoch) and reports every key as a positive
number. No timing assertion: the benchmark measures the machine, the test only the plumbing."""

import importlib.util
import json
from pathlib import Path
import subprocess
import sys

import pytest
import torch

from dataio import fileio, synthetic_sop
import preprocessing

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "bench_throughput.py"
RATES = (
    "forward_images_per_s",
    "extract_images_per_s",
    "train_step_images_per_s",
    "train_loader_images_per_s",
    "extract_vs_ceiling",
    "train_vs_ceiling",
)


pytestmark = pytest.mark.slow  # end to end


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load_bench()


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    # 64-96 px photos: drafting to the 73 px resize of a 64 px transform halves the larger ones
    return synthetic_sop.make_synthetic_sop(
        tmp_path_factory.mktemp("bench_sop") / "sop", num_products=24, image_size="64-96", workers=0
    )


def _args(bench, root, *extra):
    return bench.get_args_parser().parse_args(
        [
            "--backbone",
            "resnet18",
            "--image_size",
            "64",
            "--batch_size",
            "8",
            "--num_images",
            "24",
            "--data_root",
            str(root),
            "--device",
            "cpu",
            *extra,
        ]
    )


def test_all_parts_in_process_with_one_worker(bench, tiny_root):
    threads = torch.get_num_threads()
    try:
        out = bench.main(_args(bench, tiny_root, "--workers", "1", "--threads", "1"))
    finally:
        torch.set_num_threads(threads)
    for key in RATES:
        assert isinstance(out[key], float) and out[key] > 0, key
    assert out["workers"] == 1 and out["torch_threads"] == 1
    assert out["device"] == "cpu" and out["cpu_count"] >= 1 and out["cpus_available"] >= 1
    assert out["draft"] is True and out["decode_size"] == preprocessing.resize_size(64)
    assert out["timed_images"] == {"forward": 16, "extract": 16, "train_step": 16, "train_loader": 16}
    assert "not measured" in out["cuda"]


def test_cli_prints_json_no_draft_resized_copy(tmp_path, tiny_root):
    """The script as a user runs it: JSON on stdout; --no-draft, --workers 0, a resized copy
    made on the fly, two interleaved repeats with per-run lists."""
    resized = tmp_path / "resized"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--backbone",
            "resnet18",
            "--image_size",
            "64",
            "--batch_size",
            "8",
            "--num_images",
            "16",
            "--data_root",
            str(tiny_root),
            "--device",
            "cpu",
            "--workers",
            "0",
            "--no-draft",
            "--resized_root",
            str(resized),
            "--repeats",
            "2",
            "--parts",
            "forward,extract",
            "--output",
            str(tmp_path / "out.json"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out == json.loads((tmp_path / "out.json").read_text())
    assert out["workers"] == 0 and out["draft"] is False and out["decode_size"] is None
    assert out["resized"] is True and fileio.read_marker(resized)["size"] == preprocessing.resize_size(64)
    assert out["forward_images_per_s"] > 0 and out["extract_images_per_s"] > 0 and out["extract_vs_ceiling"] > 0
    assert len(out["extract_vs_ceiling_runs"]) == 2
    assert "train_vs_ceiling" not in out


def test_bad_arguments(bench, tiny_root):
    with pytest.raises(ValueError, match="--parts"):
        bench.main(_args(bench, tiny_root, "--parts", "forward,nope"))
    with pytest.raises(ValueError, match="multiple of 4"):
        bench.main(_args(bench, tiny_root, "--batch_size", "6"))
    with pytest.raises(ValueError, match="warmup_batches"):
        bench.main(_args(bench, tiny_root, "--num_images", "8"))
