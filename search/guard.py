"""What the demo's web server lets in: which query files a request may name, which files the
file route may serve, and which pages may call the API.

* `is_uploaded_file`: a query path is one of this server's own uploads (Gradio's upload /
  cache folders), never any other server path;
* `ServedFiles`: the file route's rule, exactly the photos the served index holds, decided at
  request time by one set lookup (the cost does not grow with other files in the folder);
* `RequestGuard`: the ASGI middleware that applies both rules before Gradio sees a request,
  and refuses requests sent by pages of another origin.

Every refusal carries one fixed message that does not depend on whether the path exists.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from urllib.parse import urlsplit

REFUSED_QUERY = (
    "The query must be a photo sent with this request (an upload or a data URL); "
    "server paths and web addresses are not accepted."
)
REFUSED_FILE = b"File not allowed."
REFUSED_ORIGIN = (
    b"Cross-origin request refused: this demo answers only its own page. "
    b"Start it with --allow_origin ORIGIN to let another site call it."
)
# Gradio's routes that read a file named in the URL (its API prefix, and the deprecated form).
FILE_ROUTES = ("/gradio_api/file=", "/gradio_api/file/", "/file=", "/file/")


def is_web_address(path: str) -> bool:
    """Whether ``path`` names a remote resource (any ``scheme://``), not a local file."""
    return "://" in str(path)[:16]


def is_inside(path, roots) -> bool:
    """Whether ``path``, every symlink resolved, is one of ``roots`` (resolved) or below one."""
    real = os.path.realpath(path)
    for root in roots:
        root = os.path.realpath(root)
        if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
            return True
    return False


def is_uploaded_file(path, upload_roots) -> bool:
    """A query path the server may open: a local path whose real location lies in one of
    ``upload_roots`` (the folders Gradio writes this process's uploads to)."""
    return bool(path) and not is_web_address(path) and is_inside(path, upload_roots)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server on this machine."""
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ServedFiles:
    """The gallery photos the file route may serve: ``root`` / each of ``rel_paths``.

    ``allows(path)``: ``path`` (absolute, as the URL names it) is, after normalising ``..``,
    exactly one of them, and its real location (symlinks resolved) is still inside ``root``.
    One set lookup and one realpath per request."""

    def __init__(self, root, rel_paths):
        self.root = os.path.realpath(root)
        base = os.path.abspath(root)
        self._paths = frozenset(os.path.normpath(os.path.join(base, p)) for p in rel_paths)

    def __len__(self):
        return len(self._paths)

    def allows(self, path: str) -> bool:
        if not path or is_web_address(path) or "\x00" in path:
            return False
        return os.path.normpath(os.path.abspath(path)) in self._paths and is_inside(path, [self.root])


def origin_allowed(origin: str | None, host: str | None, extra=()) -> bool:
    """A request may drive the API when it carries no ``Origin`` (not sent by a web page:
    curl, gradio_client), comes from the server's own origin (same host and port as ``Host``),
    or from one of ``extra`` (``--allow_origin``)."""
    if origin is None:
        return True
    if origin.rstrip("/") in {o.rstrip("/") for o in extra}:
        return True
    netloc = urlsplit(origin).netloc
    return bool(host) and netloc.lower() == host.lower()


class RequestGuard:
    """ASGI middleware in front of Gradio.

    ``served``: a callable returning the current `ServedFiles` (the index may change under
    ``--watch``); ``upload_roots``: a callable returning Gradio's upload / cache folders, whose
    files Gradio itself checks and serves; ``allow_origins``: origins besides the server's own
    that may call it. File-route requests for anything else, web addresses included, get 403
    with `REFUSED_FILE`; requests from other origins get 403 with `REFUSED_ORIGIN`."""

    def __init__(self, app, served, upload_roots, allow_origins=()):
        self.app = app
        self.served = served
        self.upload_roots = upload_roots
        self.allow_origins = tuple(allow_origins)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            if not origin_allowed(headers.get("origin"), headers.get("host"), self.allow_origins):
                return await _refuse(send, REFUSED_ORIGIN)
            named = file_route_target(scope.get("path", ""))
            if named is not None and not self.file_allowed(named):
                return await _refuse(send, REFUSED_FILE)
        await self.app(scope, receive, send)

    def file_allowed(self, path: str) -> bool:
        if is_web_address(path) or "\x00" in path:
            return False
        if self.served().allows(path):
            return True
        return os.path.isabs(path) and is_inside(path, self.upload_roots())


def file_route_target(url_path: str) -> str | None:
    """The file a file-route URL path names (already percent-decoded by the server), else None."""
    for route in FILE_ROUTES:
        if url_path.startswith(route):
            return url_path[len(route) :]
    return None


async def _refuse(send, body: bytes):
    await send(
        {
            "type": "http.response.start",
            "status": 403,
            "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def upload_roots():
    """Gradio's folder of this process's uploads and of the files it made for its answers
    (``GRADIO_TEMP_DIR``, see ``app_stanford.use_private_gradio_temp_dir``)."""
    from gradio import utils

    return [utils.get_upload_folder()]


def parse_auth(value: str) -> tuple[str, str]:
    """``USER:PASSWORD`` → (user, password); ValueError naming the problem otherwise."""
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ValueError("expected USER:PASSWORD (both non-empty)")
    return user, password


def read_auth_file(path) -> list[tuple[str, str]]:
    """The ``USER:PASSWORD`` lines of ``path`` (blank lines and ``#`` comments skipped);
    ValueError naming the file and line of a bad one."""
    pairs = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            pairs.append(parse_auth(line))
        except ValueError as e:
            raise ValueError(f"{path}, line {n}: {e}") from None
    if not pairs:
        raise ValueError(f"{path} holds no USER:PASSWORD line")
    return pairs
