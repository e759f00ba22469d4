"""search/vectordb.py against a real Milvus server (Milvus Standalone 2.3.5, `tests/milvus_server.py`,
one per module): ``kill -9`` of the server while a gallery serves searches and a ``--watch``
refresher updates it, then the server started again on the same data and ports: no row lost or
doubled, searches answer again within 30 s without a new gallery, the refresher resumes; two
galleries on one collection (one updating, one searching in another process) agree. Skipped
where the server cannot start. The backend's own suite runs against this server too
(tests/test_vectordb.py, ``db_uri`` "standalone")."""

import json
from pathlib import Path
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("pymilvus")

from gallery_photos import IMAGE_SIZE, KEY, make_folder, write_image

import models
from search import gallery, vectordb, watch

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 3.0  # --db_timeout of the galleries here: a dead server is noticed quickly
RECOVERY_S = 30.0  # searches answer again within this long after the server is back


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return models.build_model("resnet18", weights="none", image_size=IMAGE_SIZE).eval()


def file_index(model, root, tmp_path):
    index, _ = gallery.update_gallery_index(
        model, root, tmp_path / "gallery.npz", KEY, batch_size=4, workers=0, progress=False
    )
    return index


def wait_for(condition, seconds, what):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {seconds} s"
        time.sleep(0.2)


class Searcher(threading.Thread):
    """Searches ``store`` in a loop, as the demo's worker does; records (time, ok / error text)."""

    def __init__(self, store, query):
        super().__init__(daemon=True)
        self.store, self.query, self.log, self.done = store, query, [], threading.Event()

    def run(self):
        while not self.done.is_set():
            try:
                self.store.search(self.query, 5)
                self.log.append((time.monotonic(), None))
            except vectordb.DatabaseError as e:
                self.log.append((time.monotonic(), str(e)))
            time.sleep(0.1)

    def first_ok_after(self, t):
        return next((at for at, err in list(self.log) if at > t and err is None), None)


def test_kill_9_while_serving_and_updating_then_restart_loses_and_doubles_nothing(model, tmp_path, milvus_standalone):
    server = milvus_standalone
    root = make_folder(tmp_path / "photos", n=16)
    store, _ = vectordb.folder_gallery(model, KEY, root, server.uri, batch_size=4, workers=0, progress=False)
    store.timeout = TIMEOUT_S
    watcher = watch.GalleryWatcher(
        watch.database_refresher(store, model, batch_size=4),
        apply=lambda index: index.adopt(),
        interval=0.5,
        niceness=0,
    )
    searcher = Searcher(store, np.ones(128, np.float32))
    watcher.start()
    searcher.start()
    try:
        for i in range(6):  # new photos and a removed one: the watcher is updating when the server dies
            write_image(root / "mugs" / "late" / f"new{i}.png", 500 + i)
        (root / "mugs" / "p0" / "img0004.png").unlink()
        time.sleep(1.0)
        server.kill()
        killed = time.monotonic()
        wait_for(lambda: any(err for at, err in searcher.log if at > killed), 2 * TIMEOUT_S + 10, "a failed search")
        failure = next(err for at, err in searcher.log if at > killed and err)
        assert server.uri in failure
        errors_before = watcher.errors
        server.start()
        back = time.monotonic()
        wait_for(lambda: searcher.first_ok_after(back), RECOVERY_S, "a search after the server came back")
        recovered_in = searcher.first_ok_after(back) - back
        expected = gallery.scan_gallery(root).paths
        wait_for(lambda: store.paths == expected, 60, "the watcher applying the folder after the restart")
    finally:
        searcher.done.set()
        watcher.stop(timeout=60)
        searcher.join(timeout=60)
    index = file_index(model, root, tmp_path)
    assert store.paths == index.paths and store.count() == len(store) == len(set(store.paths)) == 21
    assert np.array_equal(store.search(index.embeddings[:4], 5)[1], index.search(index.embeddings[:4], 5)[1])
    assert watcher.errors > errors_before and watcher.updates >= 1  # ticks failed while it was down, then applied
    print(f"searches answered again {recovered_in:.1f} s after the server was back")


SEARCHER = """
import json, sys, time
import numpy as np
from search import vectordb
uri, root, key, args, queries = sys.argv[1:6]
store = vectordb.MilvusGallery.open(uri, root, key, json.loads(args), timeout=10)
for line in sys.stdin:  # one line per round: re-read the rows, search, answer
    store.refresh()
    scores, rows = store.search(np.load(queries), 5)
    print(json.dumps({"paths": store.paths, "found": [[store.paths[r] for r in row if r >= 0] for row in rows]}),
          flush=True)
"""


def test_two_galleries_on_one_collection_one_updating_one_searching_agree(model, tmp_path, milvus_standalone):
    """An updating gallery in this process and a searching one in another: after each update, the
    searcher's rows and top-5 are those of the updater (and of the file index)."""
    milvus_standalone.ensure_running()  # whatever the kill -9 test left
    uri = milvus_standalone.uri
    root = make_folder(tmp_path / "photos", n=10)
    writer, _ = vectordb.folder_gallery(model, KEY, root, uri, batch_size=4, workers=0, progress=False)
    index = file_index(model, root, tmp_path)
    np.save(tmp_path / "q.npy", index.embeddings[:3])
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SEARCHER,
            uri,
            str(root),
            KEY,
            json.dumps(dict(model.model_args)),
            str(tmp_path / "q.npy"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
    )
    try:
        for step in range(3):
            if step:
                write_image(root / "mugs" / "more" / f"s{step}.png", 900 + step)
                (root / sorted(p for p in writer.paths if p.startswith("mugs"))[0]).unlink()
                writer.update(model, batch_size=4, workers=0, progress=False)
                writer.adopt()
            proc.stdin.write("go\n")
            proc.stdin.flush()
            seen = json.loads(proc.stdout.readline())
            index = file_index(model, root, tmp_path)
            queries = np.load(tmp_path / "q.npy")
            expected = [[index.paths[r] for r in row] for row in index.search(queries, 5)[1]]
            mine = [[writer.paths[r] for r in row] for row in writer.search(queries, 5)[1]]
            assert seen["paths"] == writer.paths == index.paths, step
            assert seen["found"] == mine == expected, step
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
