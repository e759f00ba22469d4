"""A real Milvus server for the tests (the fixture ``milvus_standalone`` of conftest.py): Milvus
Standalone 2.3.5 as the ``milvus`` package's ``milvus-server`` runs it (embedded etcd, local
storage, no Docker), on 127.0.0.1.

`MilvusStandalone` starts it on free ports with a data folder, waits (bounded) until it answers a
client, and stops it with its whole process group (``milvus-server`` is a Python wrapper whose
child, the ``milvus`` binary, would outlive it): at `stop`, at interpreter exit (atexit) and when
the object is collected (a finalizer), whatever the test did. `kill` is ``kill -9`` of that group;
`start` again serves the same data on the same ports (it first waits until they can be bound).
"""

import atexit
import os
from pathlib import Path
import shutil
import signal
import socket
import subprocess
import sys
import time
import weakref

START_TIMEOUT_S = 180  # a cold start takes ~10 s on 2 shared cores
# After a kill -9 the restarted server loads no collection until the dead one's etcd sessions
# expire (Milvus's default ttl, 30 s, measured: ~28 s to load): the tests' server keeps them shorter.
SESSION_TTL_S = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bindable(port: int) -> bool:
    """Whether a listening socket can bind ``port`` now *without* SO_REUSEADDR, as
    ``milvus-server`` tries it: a killed server's connections keep the port in TIME_WAIT for up to
    a minute, and ``milvus-server`` then silently serves on the next free port instead."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def executable():
    """The ``milvus-server`` beside this Python, or on PATH; None without the ``milvus`` package."""
    here = Path(sys.executable).parent / "milvus-server"
    return str(here) if here.exists() else shutil.which("milvus-server")


def _kill_group(pgid, sig) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


class MilvusStandalone:
    """One Milvus Standalone server; ``uri`` is its address (``http://127.0.0.1:PORT``)."""

    def __init__(self, data_dir):
        self.data_dir = Path(data_dir)
        self.proxy_port, self.etcd_port = free_port(), free_port()
        self.uri = f"http://127.0.0.1:{self.proxy_port}"
        self.log = self.data_dir / "milvus-server.log"
        self.proc = None
        self._groups = []  # every process group started: the finalizer stops them all
        self._finalizer = weakref.finalize(self, _stop_groups, self._groups)
        atexit.register(self._finalizer)

    def start(self, timeout=START_TIMEOUT_S) -> float:
        """Start the server (same data, same ports as before) and wait until a client's call
        succeeds; returns the seconds that took. RuntimeError (with the log's tail) when it
        exits or does not answer within ``timeout`` s."""
        exe = executable()
        if exe is None:
            raise RuntimeError("milvus-server not found: pip install milvus==2.3.5 (a test requirement)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        while not (bindable(self.proxy_port) and bindable(self.etcd_port)):  # the same ports, or none
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"ports {self.proxy_port} / {self.etcd_port} still in use after {timeout} s")
            time.sleep(0.5)
        with open(self.log, "ab") as log:
            # its own session: the group holds the wrapper and the milvus binary it starts
            cmd = [
                exe,
                "--data",
                str(self.data_dir),
                "--proxy-port",
                str(self.proxy_port),
                "--etcd-port",
                str(self.etcd_port),
                "--extra-config",
                f"common.session.ttl={SESSION_TTL_S}",
            ]
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        self._groups.append(self.proc.pid)
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"milvus-server exited at start (code {self.proc.returncode}):\n{self.log_tail()}")
            if self.answers():
                return time.monotonic() - t0
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"milvus-server did not answer within {timeout} s:\n{self.log_tail()}")

    def answers(self, timeout=2.0) -> bool:
        """True when a client can list the collections within ``timeout`` s."""
        try:
            socket.create_connection(("127.0.0.1", self.proxy_port), timeout=timeout).close()
            from pymilvus import MilvusClient

            client = MilvusClient(uri=self.uri, timeout=timeout, dedicated=True)  # not a broken shared channel
            try:
                client.list_collections(timeout=timeout)
            finally:
                client.close()
        except Exception:  # refused, or pymilvus's MilvusException: not yet
            return False
        return True

    def ensure_running(self) -> None:
        """Start the server again when it does not answer (an earlier test killed it and failed)."""
        if self.proc is None or self.proc.poll() is not None or not self.answers():
            self.stop()
            self.start()

    def kill(self) -> None:
        """``kill -9`` the server and its children, as a crash would."""
        if self.proc is not None:
            _kill_group(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
            self.proc = None

    def stop(self, grace_s=3.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after ``grace_s``."""
        if self.proc is None:
            return
        _kill_group(self.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _group_alive(self.proc.pid):
            time.sleep(0.2)
        _kill_group(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = None

    def close(self) -> None:
        """Stop the server and every process group it ever had."""
        self.stop()
        self._finalizer()

    def log_tail(self, chars=3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


def _stop_groups(groups) -> None:
    for pgid in groups:
        _kill_group(pgid, signal.SIGKILL)
    groups.clear()
