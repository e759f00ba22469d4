"""How bench/gpu_check.py runs a step: the machine's description, a command in its own process
group with its log, timeout and peak GPU memory, an in-process timeout (SIGALRM), and the
running record of a step (Step: its commands' results, checks and figures).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
import shutil
import signal
import subprocess
import sys
import threading
import time

from bench.gpu_check_plan import REPO, command_text

ERROR_TAIL_CHARS = 3000
SUBPROCESS_MEMORY_METHOD = (
    "device-wide memory in use (torch.cuda.mem_get_info: total - free) sampled every 0.1 s "
    "while the command ran, peak minus the reading just before it: CUDA contexts + caching "
    "allocator reserve of the command's processes (other processes on the GPU would count too)"
)
IN_PROCESS_MEMORY_METHOD = "torch.cuda.max_memory_allocated in this process over the step (tensors only)"


class StepFailed(RuntimeError):
    """A step cannot go on; the message names what failed."""


class StepTimeout(StepFailed):
    """The step ran past --step_timeout."""


def tail(text: str, chars: int = ERROR_TAIL_CHARS) -> str:
    return text if len(text) <= chars else "..." + text[-chars:]


def say(msg: str) -> None:
    print(f"gpu_check: {msg}", file=sys.stderr, flush=True)


# ============ environment ============


def _nvidia_smi(field: str) -> str | None:
    """One --query-gpu field of the first GPU, or None without nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run(
            [exe, f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def environment_info(device_arg: str) -> dict:
    import platform

    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "hostname": platform.node(),
    }
    if not (torch.cuda.is_available() and device_arg.startswith("cuda")):
        return info
    dev = torch.device(device_arg)
    props = torch.cuda.get_device_properties(dev)
    info.update(
        {
            "gpu_name": torch.cuda.get_device_name(dev),
            "gpu_count": torch.cuda.device_count(),
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "compute_capability": f"{props.major}.{props.minor}",
            "cudnn": torch.backends.cudnn.version(),
            "driver_version": _nvidia_smi("driver_version") or "unknown (no nvidia-smi)",
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }
    )
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
            self.peak_mb = round((self._peak - self._base) / 2**20, 1)
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
        proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
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
    return {
        "rc": rc if rc is not None else proc.returncode,
        "timed_out": timed_out,
        "seconds": round(time.perf_counter() - start, 2),
        "log": str(log_path),
        "peak_gpu_memory_mb": mem.peak_mb,
        "output": log_path.read_text(errors="replace"),
    }


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

    def __init__(self, plan: dict, ctx: Context):
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
            raise StepTimeout(
                f"{label}: not started, the step used up its --step_timeout ({self.ctx.args.step_timeout:.0f} s)"
            )
        log = self.ctx.workdir / "logs" / f"{self.name}-{label}.log"
        say(f"  {label}: {command_text(cmd)}")
        result = run_command(cmd["argv"], log, timeout, self.ctx.args.device)
        self.runs.append({"label": label, **{k: v for k, v in result.items() if k != "output"}})
        if result["peak_gpu_memory_mb"] is not None:
            self.peak_gpu_memory_mb = max(self.peak_gpu_memory_mb or 0.0, result["peak_gpu_memory_mb"])
            self.memory_method = SUBPROCESS_MEMORY_METHOD
        if result["timed_out"]:
            raise StepTimeout(
                f"{label}: killed after {timeout:.0f} s (the rest of --step_timeout); "
                f"log {log}:\n{tail(result['output'])}"
            )
        if result["rc"] != 0:
            raise StepFailed(f"{label}: exit code {result['rc']}; log {log}:\n{tail(result['output'])}")
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
