"""The demo's query components (Gradio): the query photo (`query_image_class`) and more photos of
the same item (`query_files_class`). Each hands its uploads over undecoded (`search.query` decodes
them) and refuses anything but this request's own upload (`search.guard.is_uploaded_file`) and
any web address (`RefuseWebAddresses`: Gradio would fetch it before any handler)."""

import base64
import binascii
import hashlib
from pathlib import Path

from search import guard


def refused():
    """The error for a query file that is not this request's own upload, or a web address."""
    import gradio as gr

    return gr.Error(guard.REFUSED_QUERY, title="Cannot search with this image", print_exception=False)


class RefuseWebAddresses:
    """Mixin of a query component: Gradio would download a payload's web address, unbounded,
    before any handler; refused instead. The browser renders the component with the frontend of
    the Gradio component it extends (Gradio would take the first base's name: this mixin's)."""

    def get_block_name(self):
        return next(c for c in type(self).__mro__ if c.__module__.startswith("gradio.")).__name__.lower()

    get_block_class = get_block_name

    async def async_move_resource_to_block_cache(self, url_or_file_path):
        if url_or_file_path is not None and guard.is_web_address(str(url_or_file_path)):
            raise refused()
        return await super().async_move_resource_to_block_cache(url_or_file_path)

    def move_resource_to_block_cache(self, url_or_file_path):
        if url_or_file_path is not None and guard.is_web_address(str(url_or_file_path)):
            raise refused()
        return super().move_resource_to_block_cache(url_or_file_path)


def query_image_class():
    """The QueryImage component class (a gr.Image subclass; gradio imported on call)."""
    import gradio as gr

    class QueryImage(RefuseWebAddresses, gr.Image):
        """gr.Image whose preprocessing hands the uploaded file's path over *undecoded*.

        gr.Image would open the upload itself (type="filepath" still calls PIL.Image.open),
        so a non-image or a decompression bomb would fail inside Gradio with a blank error.
        Here every byte is decoded by `search.query.load_query_image`, which refuses with a
        reason.
        ``is_template``: the browser renders it with gr.Image's own frontend.
        """

        is_template = True

        def preprocess(self, payload):
            if payload is None:
                return None
            if payload.url and payload.url.startswith("data:"):  # base64 through the API
                return self._save_data_url(payload.url)
            if payload.path is None:
                raise gr.Error("The upload carries no file; upload the photo again.")
            # a payload may name any path (without Gradio's "meta" marker Gradio passes it on
            # unchecked): only files in this process's upload folder are opened
            if not guard.is_uploaded_file(str(payload.path), guard.upload_roots()):
                raise refused()
            return str(payload.path)

        def _save_data_url(self, url):
            max_bytes = getattr(self, "max_data_url_bytes", 10 << 20)
            header, _, data = url.partition(",")
            if len(data) > max_bytes * 4 // 3 + 4:
                raise gr.Error(f"The image is larger than {max_bytes >> 20} MB.")
            try:
                raw = base64.b64decode(data, validate=True) if header.endswith(";base64") else b""
            except (binascii.Error, ValueError):
                raise gr.Error("The data URL is not valid base64.") from None
            folder = Path(self.GRADIO_CACHE) / hashlib.sha256(raw).hexdigest()[:32]
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / "query"
            path.write_bytes(raw)
            self.temp_files.add(str(path))  # deleted with Gradio's own files (delete_cache, shutdown)
            return str(path)

    return QueryImage


def query_files_class():
    """The QueryFiles component class (a gr.File subclass; gradio imported on call)."""
    import gradio as gr

    class QueryFiles(RefuseWebAddresses, gr.File):
        """gr.File (several files) for more photos of the query's item: like QueryImage, every path
        must be this request's own upload (`search.guard.is_uploaded_file`) and no web address is
        fetched; the files are handed over undecoded (`search.query.load_query_image` decodes them).
        ``is_template``: the browser renders it with gr.File's own frontend."""

        is_template = True

        def preprocess(self, payload):
            if payload is None:
                return None
            files = list(payload.root) if hasattr(payload, "root") and isinstance(payload.root, list) else [payload]
            paths = []
            for f in files:
                if f.path is None or not guard.is_uploaded_file(str(f.path), guard.upload_roots()):
                    raise refused()
                paths.append(str(f.path))
            return paths

    return QueryFiles
