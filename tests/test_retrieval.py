"""Retrieval backends: corpus reading, BM25 and its cache, the HTTP server's limits, the
client's round trip, health check and retries. Everything talks over 127.0.0.1 only."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import bm25s
import pytest

from wapo.retrieval import (
    BM25Retriever,
    Doc,
    HttpRetriever,
    RetrieverError,
    add_serve_parser,
    load_corpus,
    make_server,
    parse_response,
    split_passage,
    write_corpus,
)

DOCS = [
    Doc("p1", "Zorvak Telim", "Zorvak Telim was born in Quessara."),
    Doc("c1", "Quessara", "Quessara is a city on the Blemish coast."),
    Doc("o1", "Ostravi Guild", "The Ostravi Guild was founded by Zorvak Telim."),
]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep index caches out of the home directory."""
    monkeypatch.setenv("WAPO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.jsonl"
    write_corpus(DOCS, path)
    return path


@contextlib.contextmanager
def serving(server: ThreadingHTTPServer):
    """Run `server` in a thread; yield its loopback URL; stop it afterwards."""
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- corpus and passages -------------------------------------------------------------


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"id": 7, "title": "Quessara", "text": "A city."}, Doc("7", "Quessara", "A city.")),
        # Search-R1's wiki-18 rows: the quoted title on the first line of `contents`.
        ({"id": "3", "contents": '"Quessara"\nA city.\nBy the sea.'}, Doc("3", "Quessara", "A city.\nBy the sea.")),
    ],
)
def test_load_corpus_reads_both_row_formats(tmp_path: Path, row: dict, expected: Doc) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(row) + "\n\n")
    assert load_corpus(path) == [expected]


def test_load_corpus_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "1", "title": "A", "text": "a"}\n{"id": "2", "title": "B"}\n')
    with pytest.raises(ValueError, match=r"c.jsonl:2: corpus row lacks \['text'\]"):
        load_corpus(path)


@pytest.mark.parametrize(
    "passage, expected",
    [
        ('"Zorvak Telim"\nBorn in Quessara.', ("Zorvak Telim", "Born in Quessara.")),
        ("Title\nline one\nline two", ("Title", "line one\nline two")),
        ("no title at all", ("", "no title at all")),
    ],
)
def test_split_passage(passage: str, expected: tuple[str, str]) -> None:
    assert split_passage(passage) == expected


# --- BM25 ----------------------------------------------------------------------------


def test_bm25_ranks_matching_documents_and_drops_non_matches() -> None:
    retriever = BM25Retriever(DOCS)
    hits = retriever.search(["who founded the Ostravi Guild", "xyzzy", ""], top_k=5)
    # "ostravi", "guild" and "founded" occur only in o1: it is the single non-zero hit.
    assert hits == [[DOCS[2].contents()], [], []]
    # "zorvak telim" occurs in p1 (title + text: tf 2) and o1 (tf 1): p1 first.
    assert [d.id for d, _ in retriever.search_docs(["Zorvak Telim"], top_k=5)[0]] == ["p1", "o1"]


def test_bm25_index_is_cached_by_file_content(
    corpus_file: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = BM25Retriever.from_jsonl(corpus_file)
    (index_dir,) = (cache_dir / "bm25").iterdir()
    assert index_dir.name.endswith("-v1") and (index_dir / "params.index.json").exists()

    def no_indexing(*args, **kwargs):
        raise AssertionError("the cached index should have been loaded")

    monkeypatch.setattr(bm25s.BM25, "index", no_indexing)
    second = BM25Retriever.from_jsonl(corpus_file)
    assert second.search(["Quessara coast"], 3) == first.search(["Quessara coast"], 3)


def test_bm25_from_memory_writes_no_cache(cache_dir: Path) -> None:
    BM25Retriever(DOCS)
    assert not cache_dir.exists()


# --- server --------------------------------------------------------------------------


def test_server_health_and_round_trip_through_http_retriever(corpus_file: Path) -> None:
    queries = ["Zorvak Telim", "Blemish coast", "nothing matches xyzzy"]
    with serving(make_server(corpus_file, port=0)) as url:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            assert json.loads(response.read()) == {"status": "ok", "docs": 3}
        client = HttpRetriever(url)
        assert client.search(queries, top_k=2) == BM25Retriever(DOCS).search(queries, top_k=2)
        assert (client.retries, client.failures) == (0, 0)
        # Search-R1's `return_scores` shape, and our `top_k` alias of `topk`.
        status, body = post(f"{url}/retrieve", b'{"queries": ["Quessara"], "top_k": 1, "return_scores": true}')
        assert status == 200
        assert body["result"][0][0]["document"] == {"id": "c1", "contents": DOCS[1].contents()}
        assert body["result"][0][0]["score"] > 0


@pytest.mark.parametrize(
    "path, body, status, error",
    [
        ("/retrieve", json.dumps({"queries": ["a"] * 5}), 400, "5 queries exceed the limit of 4"),
        ("/retrieve", json.dumps({"queries": ["a"], "topk": 11}), 400, "[1, 10], got 11"),
        ("/retrieve", json.dumps({"queries": ["a"], "topk": 0}), 400, "[1, 10], got 0"),
        ("/retrieve", json.dumps({"queries": "a"}), 400, "list of strings"),
        ("/retrieve", "not json", 400, "not JSON"),
        # Far past the limit: the server drains the body so the client reads the 413, not a reset.
        ("/retrieve", json.dumps({"queries": ["a" * 1_000_000]}), 413, "exceeds 200"),
        ("/search", "{}", 404, "no route"),
    ],
)
def test_server_limits_answer_4xx_with_json_error(
    corpus_file: Path, path: str, body: str, status: int, error: str
) -> None:
    server = make_server(corpus_file, port=0, max_queries=4, max_top_k=10, max_body_bytes=200)
    with serving(server) as url:
        got_status, got_body = post(url + path, body.encode())
    assert got_status == status
    assert error in got_body["error"]


def test_serve_parser_and_module_entry_point(corpus_file: Path, cache_dir: Path) -> None:
    subparsers = argparse.ArgumentParser(prog="wapo").add_subparsers()
    add_serve_parser(subparsers)
    args = subparsers.choices["serve-retriever"].parse_args(["--corpus", str(corpus_file), "--max-top-k", "7"])
    assert (args.host, args.port, args.max_queries, args.max_top_k) == ("127.0.0.1", 8000, 64, 7)
    assert callable(args.func)

    url = f"http://127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "wapo.retrieval", "--corpus", str(corpus_file), "--port", url.split(":")[-1]]
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    try:
        wait_healthy(url, process, timeout_s=20)
        assert HttpRetriever(url).search(["Ostravi"], 1) == [[DOCS[2].contents()]]
    finally:
        process.terminate()
        process.wait(timeout=10)


def wait_healthy(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "the server exited"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"no healthy server at {url} after {timeout_s} s")


# --- client: response shapes, health check, retries -----------------------------------


@pytest.mark.parametrize(
    "body, expected",
    [
        ({"result": [['"A"\na']]}, [['"A"\na']]),
        ([['"A"\na'], []], [['"A"\na'], []]),
        ({"result": [[{"document": {"id": "1", "contents": '"A"\na'}, "score": 2.0}]]}, [['"A"\na']]),
        ({"result": [[{"title": "A", "text": "a"}, {"text": "b"}]]}, [['"A"\na', '""\nb']]),
    ],
)
def test_parse_response_shapes(body: object, expected: list[list[str]]) -> None:
    assert parse_response(body, n_queries=len(expected)) == expected


def test_parse_response_rejects_a_wrong_count() -> None:
    with pytest.raises(ValueError, match="expected 2 result lists"):
        parse_response({"result": [[]]}, n_queries=2)


def test_down_retriever_fails_at_construction_with_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(RetrieverError, match=f"retriever at {url} is not reachable.*serve-retriever"):
        HttpRetriever(url, timeout_s=2)


def scripted_server(statuses: list[int]) -> ThreadingHTTPServer:
    """Answers successive POSTs with `statuses` (the last one repeats); 200 carries one hit."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            status = statuses.pop(0) if len(statuses) > 1 else statuses[0]
            data = json.dumps({"result": [['"A"\na']]} if status == 200 else {"error": "busy"})
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data.encode())

        def log_message(self, *args: object) -> None:
            pass

    return ThreadingHTTPServer(("127.0.0.1", 0), Handler)


def test_transient_errors_are_retried_and_counted() -> None:
    # health check 200, then 503, 500, then 200: two retries, no failure.
    with serving(scripted_server([200, 503, 500, 200])) as url:
        client = HttpRetriever(url, backoff_s=0.01)
        assert client.search(["q"], 1) == [['"A"\na']]
    assert (client.retries, client.failures) == (2, 0)


def test_retries_are_bounded_then_fail() -> None:
    with serving(scripted_server([200, 503])) as url:
        client = HttpRetriever(url, max_retries=2, backoff_s=0.01)
        with pytest.raises(RetrieverError, match="failed 3 times: HTTP 503"):
            client.search(["q"], 1)
    assert (client.retries, client.failures) == (2, 1)


def test_client_errors_are_not_retried() -> None:
    with serving(scripted_server([200, 400])) as url:
        client = HttpRetriever(url, backoff_s=0.01)
        with pytest.raises(ValueError, match="refused the request: HTTP 400"):
            client.search(["q"], 1)
    assert (client.retries, client.failures) == (0, 0)


def test_multihop_env_searches_through_a_server(tmp_path: Path) -> None:
    from wapo.envs.multihop import MultihopEnv

    local = MultihopEnv(n_entities=40, n_train=20, n_eval=10)
    write_corpus(local.docs, tmp_path / "world.jsonl")
    sample = local.eval_set()[0]
    turn = f"<search>{sample['question']}</search>"
    with serving(make_server(tmp_path / "world.jsonl", port=0)) as url:
        remote = MultihopEnv(n_entities=40, n_train=20, n_eval=10, retriever=url)
        assert remote.observe(sample, turn) == local.observe(sample, turn)
