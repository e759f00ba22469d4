"""Milvus access: the connection, the call timeout, the expression grammar's literals and
Milvus's errors, shared by every database gallery (`search.vectordb`).

`connect` opens a Milvus Lite database (a local folder, made if missing, held by one process) or
a server (``http://HOST:19530``), each client on a channel of its own so that a reconnect after
a failure starts afresh; `call_timeout` is the seconds one call may take (``--db_timeout``);
`quote` / `in_filter` / `key_range` write values as literals of Milvus's boolean expressions
(tested with any Unicode against Milvus Lite and Milvus Standalone 2.3.5).
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
import sys
import threading

DEFAULT_TIMEOUT_S = 10.0  # seconds one database call may take (--db_timeout)
_SETTINGS = {"timeout": DEFAULT_TIMEOUT_S}  # this process's --db_timeout (set_call_timeout)
# pymilvus pings an idle connection every 10 s; a gRPC server with default settings (Milvus
# Lite's, local or served) answers the third such ping with GOAWAY "too many pings" and the
# connection is lost. Ping only while a call is in flight.
GRPC_OPTIONS = {"grpc.keepalive_permit_without_calls": 0, "grpc.keepalive_time_ms": 60000}
INSTALL_HINT = "pip install pymilvus==3.0.2 milvus-lite==3.2.2"
SERVER_HINT = (
    "start one: Milvus Standalone (docker, or pip's milvus package: milvus-server --data DIR), or "
    "this machine's Milvus Lite as a server: "
    "python -m milvus_lite server --data-dir gallery.db --port 19530"
)


class DatabaseError(RuntimeError):
    """The database cannot be used; the message names it and says what to do."""


# The escapes a Milvus string literal takes, on Milvus Lite and Milvus 2.3 servers alike (Lite's
# parser knows no \u, \x or octal escapes); every other character stands for itself.
_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"})


def quote(value) -> str:
    """``value`` as a double-quoted string literal of a Milvus boolean expression: backslash,
    double quote, newline, carriage return and tab escaped (a raw newline or CR ends the
    literal), every other character as it is (``category == {quote(name)}`` matches ``name``
    and nothing else, whatever Unicode it holds)."""
    return '"' + str(value).translate(_ESCAPES) + '"'


def in_filter(field: str, values) -> str:
    """``field in ["a", "b"]`` with every value quoted by `quote` (pymilvus's own ``ids=``
    arguments of delete / get do not escape quotes: a path like ``Kid's "B"/x.jpg`` breaks them)."""
    return f"{field} in [{', '.join(quote(v) for v in values)}]"


def key_range(low=None, high=None) -> str:
    """The filter ``low < path <= high`` (an open end: None); "" for every row."""
    bounds = ([] if low is None else [f"path > {quote(low)}"]) + ([] if high is None else [f"path <= {quote(high)}"])
    return " and ".join(bounds)


def is_server_uri(uri) -> bool:
    """True for a Milvus server address (``http(s)://``, ``tcp://``, ``grpc://``); False for a
    local Milvus Lite database path."""
    return str(uri).split("://", 1)[0].lower() in ("http", "https", "tcp", "grpc", "unix") and "://" in str(uri)


def call_timeout() -> float:
    """Seconds one database call may take: ``--db_timeout`` (`set_call_timeout`), else
    `DEFAULT_TIMEOUT_S`."""
    return _SETTINGS["timeout"]


def set_call_timeout(seconds: float) -> None:
    """Make ``seconds`` the timeout of this process's database calls (those that pass none).
    ValueError for a timeout that is not > 0."""
    if not seconds > 0:
        raise ValueError(f"--db_timeout must be > 0 seconds, got {seconds}")
    _SETTINGS["timeout"] = float(seconds)


def is_milvus_error(e) -> bool:
    """An error of the database or of the way to it: pymilvus's, or gRPC's own (some pymilvus
    calls let a dropped connection's RpcError through)."""
    try:
        import grpc
        from pymilvus.exceptions import MilvusException
    except ImportError:
        return False
    return isinstance(e, (MilvusException, grpc.RpcError))


def is_released(e) -> bool:
    """A Milvus error saying the collection is not loaded (code 101 on 2.3+ servers; Milvus Lite:
    "in state 'released'")."""
    text = message(e).lower()
    return getattr(e, "code", None) == 101 or "not loaded" in text or "released" in text


def message(e) -> str:
    """A pymilvus / gRPC error's text without its traceback noise."""
    details = getattr(e, "details", None)
    return str(getattr(e, "message", None) or (details() if callable(details) else None) or e)


def keep_faiss_search_params() -> None:
    """Undo what ``faiss.contrib.torch_utils`` (imported by pytorch-metric-learning) does to
    Milvus Lite, which searches its IVF cells with faiss in this process: the torch wrapper it
    puts on every ``Index.search`` drops the ``params`` keyword (``nprobe``), so Lite's IVF
    search fails. Numpy calls with ``params`` go back to faiss's own numpy method; once per class."""
    if "faiss.contrib.torch_utils" not in sys.modules:
        return
    faiss = sys.modules["faiss"]
    for name in dir(faiss):
        cls = getattr(faiss, name, None)
        wrapped = isinstance(cls, type) and cls.__dict__.get("search")
        if not wrapped or "search_numpy" not in cls.__dict__ or getattr(wrapped, "_keeps_params", False):
            continue

        def search(self, x, k, *args, params=None, _torch=wrapped, **kwargs):
            if params is not None:
                return self.search_numpy(x, k, *args, params=params, **kwargs)
            return _torch(self, x, k, *args, **kwargs)

        search._keeps_params = True
        cls.search = search


# ============ connecting ============

_OPENED = {}  # Milvus Lite paths this process opened (pymilvus keeps one server per path)
_LOCK = threading.Lock()


def check_local_db(path) -> Path:
    """Refuse, naming it, a Milvus Lite path that is a file, a folder that is not a Milvus Lite
    database, or a database another process holds. Returns the absolute path."""
    path = Path(path).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise DatabaseError(
            f"{path} is not a Milvus Lite database (it is a file; a Milvus Lite database is a folder "
            "that Milvus Lite creates). Pass another --db_uri (a new name such as gallery.db), or "
            "move this file away"
        )
    if path.is_dir() and any(path.iterdir()) and not (path / "LOCK").exists():
        raise DatabaseError(
            f"{path} is not a Milvus Lite database (a folder without Milvus Lite's LOCK file). Pass "
            "another --db_uri (a new name such as gallery.db)"
        )
    if path.is_dir() and str(path) not in _OPENED:
        try:
            fd = os.open(path / "LOCK", os.O_RDWR)
        except OSError:
            return path
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise DatabaseError(
                f"the Milvus Lite database {path} is open in another process (indexing or serving "
                "it); Milvus Lite admits one process per database. Wait for that process or stop "
                "it, or serve the database to several processes: python -m milvus_lite server "
                f"--data-dir {path} --port 19530, then --db_uri http://127.0.0.1:19530"
            ) from None
        finally:
            os.close(fd)
    return path


def connect(uri, timeout=None):
    """A pymilvus ``MilvusClient`` for ``uri``: a Milvus Lite path (checked by
    `check_local_db`; its folder is created) or a server URI. DatabaseError naming the URI when
    pymilvus is missing or the database does not answer within ``timeout`` seconds (default
    `call_timeout`)."""
    timeout = call_timeout() if timeout is None else float(timeout)
    try:
        from pymilvus import MilvusClient
        from pymilvus.exceptions import MilvusException
    except ImportError as e:
        raise DatabaseError(f"--index_backend milvus needs pymilvus and milvus-lite ({e}): {INSTALL_HINT}") from e
    uri = str(uri)
    local = not is_server_uri(uri)
    if local:
        path = check_local_db(uri)
        uri = str(path)
        try:  # Milvus Lite makes the database, not the folder it lives in (runs/<model>/ on a fresh clone)
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DatabaseError(
                f"cannot create the folder of the Milvus Lite database {uri} ({e}); "
                "pass a --db_uri in a writable folder"
            ) from e
    with _LOCK:
        try:
            # dedicated: a channel of its own, so that a reconnect after a failure is a fresh one
            # (pymilvus shares one per address, and a broken one waits out gRPC's backoff)
            client = MilvusClient(uri=uri, timeout=timeout, grpc_options=GRPC_OPTIONS, dedicated=True)
            client.list_collections(timeout=timeout)
        except MilvusException as e:
            if local:
                raise DatabaseError(
                    f"cannot open the Milvus Lite database {uri} ({type(e).__name__}: "
                    f"{e.message if hasattr(e, 'message') else e}); check that it is one "
                    "and that no other process holds it, or pass another --db_uri"
                ) from e
            raise DatabaseError(
                f"cannot reach the Milvus server at {uri} within {timeout:g} s ({type(e).__name__}: "
                f"{getattr(e, 'message', e)}). Check the address (http://HOST:19530) and that the server "
                f"runs - {SERVER_HINT} - or use a local Milvus Lite database: --db_uri gallery.db"
            ) from e
        if local:
            _OPENED[uri] = True
    return client
