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
    SearchTimeout,
    add_serve_parser,
    json_nesting_exceeds,
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
    write_corpus(local.corpora["heldout"], tmp_path / "world.jsonl")
    sample = local.eval_set()[0]
    turns = [f"<search>{sample['question']}</search>", "<search>Nobody Here</search>"]
    with serving(make_server(tmp_path / "world.jsonl", port=0)) as url:
        remote = MultihopEnv(n_entities=40, n_train=20, n_eval=10, retriever=url)
        assert remote.observe_batch([sample] * 2, turns) == local.observe_batch([sample] * 2, turns)
        assert remote.metrics()["searches"] == 2


# --- time limits and the server's guards ---------------------------------------------


def slow_server(delay_s: float) -> tuple[ThreadingHTTPServer, threading.Event]:
    """Answers the health check at once and, once `slow` is set, every later query after `delay_s`."""
    slow = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if slow.is_set():
                time.sleep(delay_s)
            data = json.dumps({"result": [['"A"\na'] for _ in body["queries"]]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                self.wfile.write(data)
            except OSError:
                pass  # the client gave up

        def log_message(self, *args: object) -> None:
            pass

    return ThreadingHTTPServer(("127.0.0.1", 0), Handler), slow


def test_a_search_gives_up_at_its_deadline() -> None:
    server, slow = slow_server(delay_s=3.0)
    with serving(server) as url:
        client = HttpRetriever(url, backoff_s=0.01)
        slow.set()
        start = time.monotonic()
        with pytest.raises(SearchTimeout, match="deadline passed"):
            client.search(["q"], 1, deadline=time.monotonic() + 0.4)
        assert time.monotonic() - start < 1.5  # not 4 attempts x 30 s
        assert client.failures == 0  # a timeout is not a retriever failure


def test_a_slow_server_cannot_stall_a_rollout_turn() -> None:
    from wapo.envs.multihop import SEARCH_CAPPED, MultihopEnv

    server, slow = slow_server(delay_s=3.0)
    with serving(server) as url:
        env = MultihopEnv(n_entities=40, n_train=20, n_eval=10, retriever=url, max_turns=3, search_time_s=0.6)
        slow.set()
        start = time.monotonic()
        replies = env.observe_batch(env.eval_set()[:3], ["<search>a</search>"] * 3)
        assert time.monotonic() - start < 1.5  # the turn's share: 0.6 / 2 = 0.3 s
    assert replies == ["\n" + SEARCH_CAPPED + "\n"] * 3
    assert env.metrics()["search_capped"] == 3


def test_an_oversized_body_is_refused_without_being_read(corpus_file: Path) -> None:
    with serving(make_server(corpus_file, port=0, max_body_bytes=200)) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            # announce a gigabyte, send a few bytes: the answer must not wait for the rest
            conn.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000000000\r\n\r\n{\"queries\"")
            start = time.monotonic()
            answer = conn.makefile("rb").read()
        assert time.monotonic() - start < 2
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 413") and b"Connection: close" in head
    assert json.loads(body) == {"error": "body of 1000000000 bytes exceeds 200"}


@pytest.mark.parametrize(
    "body, status, error",
    [
        ('{"queries": ' + "[" * 9 + '"a"' + "]" * 9 + "}", 400, "JSON nested deeper than 8 levels"),
        # a hundred thousand levels would exhaust json.loads' recursion in the server thread
        ("[" * 100_000, 400, "JSON nested deeper than 8 levels"),
        ('{"queries": ["[[[[[[[[[[ {{{{{{{{{ \\" [[[["]}', 200, None),  # brackets inside a string do not count
    ],
)
def test_deeply_nested_json_is_refused_before_parsing(corpus_file: Path, body: str, status: int,
                                                      error: str | None) -> None:
    assert json_nesting_exceeds(body.encode(), 8) is (status == 400)
    with serving(make_server(corpus_file, port=0)) as url:
        got_status, got_body = post(url + "/retrieve", body.encode())
    assert got_status == status
    if error:
        assert got_body == {"error": error}


def test_the_server_serves_on_a_bounded_pool_and_turns_away_the_overflow(corpus_file: Path) -> None:
    server = make_server(corpus_file, port=0, max_threads=2, max_pending=1)
    release, inside, lock = threading.Event(), [], threading.Lock()
    busiest = [0]
    search = server.retriever.search_docs

    def blocking_search(queries, top_k):
        with lock:
            inside.append(1)
            busiest[0] = max(busiest[0], len(inside))
        release.wait(10)
        with lock:
            inside.pop()
        return search(queries, top_k)

    server.retriever.search_docs = blocking_search
    statuses: list[int] = []
    body = json.dumps({"queries": ["Quessara"]}).encode()
    with serving(server) as url:
        first = [threading.Thread(target=lambda: statuses.append(post(url + "/retrieve", body)[0]))
                 for _ in range(3)]
        for thread in first:
            thread.start()
        deadline = time.monotonic() + 5
        while len(inside) < 2 and time.monotonic() < deadline:  # two served, the third waiting
            time.sleep(0.01)
        time.sleep(0.2)
        start = time.monotonic()
        with pytest.raises(OSError):  # no slot left: closed at once (HttpRetriever retries such errors)
            post(url + "/retrieve", body)
        assert time.monotonic() - start < 1
        release.set()
        for thread in first:
            thread.join(10)
    assert sorted(statuses) == [200, 200, 200] and busiest[0] == 2
