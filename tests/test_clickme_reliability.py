"""ClickMe reliability through `harmonization.data`: a manual directory the user names must hold the
shards, whichever entry point builds the dataset. (The builder's own reliability tests are in
`tfds_clickme/clickme/clickme_dataset_builder_test.py`.)"""

from __future__ import annotations

import contextlib
import functools
import http.server
import threading
from pathlib import Path

import pytest

from harmonization import data


@contextlib.contextmanager
def not_found_server(root: Path):
    """An HTTP server on 127.0.0.1 serving the empty folder `root` (every shard: 404); yields (url, GET paths)."""

    requested: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            requested.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requested
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("state", ["missing", "empty"])
def test_harmonization_data_passes_a_named_manual_directory_through(tmp_path, monkeypatch, state):
    # `load_clickme(manual_dir=...)` hands the folder to TFDS: a missing or empty one is an error, not a download.
    manual = tmp_path / "manual"
    if state == "empty":
        manual.mkdir()
    (tmp_path / "server").mkdir()
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    with not_found_server(tmp_path / "server") as (base_url, requested):
        monkeypatch.setenv("HARMONIZATION_CLICKME_URL", base_url)  # A download would get 404s, fast.
        expected = "does not exist" if state == "missing" else "is empty"
        with pytest.raises(FileNotFoundError, match=rf"{manual} \(`manual_dir`\) {expected}(?s:.*)train-\*\.tfrecords"):
            data.load_clickme("validation", 8, data_dir=tmp_path / "data", manual_dir=manual)
    assert requested == []
