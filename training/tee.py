"""A child process whose output is copied as it comes (a tee): to a log file, to this process's
own stdout / stderr, and to a tail kept for the error message of a failed run.
"""

from __future__ import annotations

import os
from pathlib import Path
import re
import subprocess
import sys
import threading


def copy_stream(src, sinks: list, tail: list, lock: threading.Lock, limit: int = 20000) -> None:
    """Copy a child's pipe to ``sinks`` chunk by chunk (progress bars redraw with \\r, so no
    line buffering) and keep its last ``limit`` characters in ``tail``. ``lock``: stdout's and
    stderr's threads share the log file."""
    for chunk in iter(lambda: src.read1(65536), b""):
        text = chunk.decode("utf-8", errors="replace")
        with lock:
            for sink in sinks:
                sink.write(text)
                sink.flush()
        tail.append(text)
        if sum(map(len, tail)) > 2 * limit:
            tail[:] = ["".join(tail)[-limit:]]


def run_command(cmd: list[str], log_path: Path, echo: bool = True) -> tuple[int, str]:
    """Run ``cmd``; its stdout and stderr go to ``log_path`` (and to ours when ``echo``).
    Returns (exit code, last part of its stderr)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        out_tail: list[str] = []
        err_tail: list[str] = []
        lock = threading.Lock()
        sinks = ([log, sys.stdout], [log, sys.stderr]) if echo else ([log], [log])
        threads = [
            threading.Thread(target=copy_stream, args=(pipe, pipe_sinks, tail, lock))
            for pipe, pipe_sinks, tail in zip((proc.stdout, proc.stderr), sinks, (out_tail, err_tail))
        ]
        for t in threads:
            t.start()
        try:
            code = proc.wait()
        except BaseException:  # Ctrl-C: the child got it too; do not leave it behind
            proc.terminate()
            proc.wait()
            raise
        finally:
            for t in threads:
                t.join()
    return code, "".join(err_tail) or "".join(out_tail)


def error_summary(text: str, limit: int = 400) -> str:
    """The informative line of a failed child's output: the last line mentioning an error
    (train.py prints 'error: ...', Python a traceback's last line), else the last line."""
    lines = [seg.strip() for line in text.splitlines() for seg in line.split("\r")]
    lines = [line for line in lines if line]
    if not lines:
        return "no output"
    errorish = [i for i, line in enumerate(lines) if re.search(r"error|exception|^\w+\.py: ", line, re.IGNORECASE)]
    pick = lines[errorish[-1]] if errorish else lines[-1]
    return pick if len(pick) <= limit else pick[: limit - 3] + "..."
