"""Passage retrieval for search-agent environments: in-process BM25, an HTTP client, a server.

Every backend implements `Retriever.search(queries, top_k) -> list[list[str]]`: one list of
passage strings per query, best first. A passage string is Search-R1's `contents` format,
the title in double quotes on the first line and the text after it, so that passages from
our BM25 index and from a Search-R1 (dense, wiki-18) server read the same way.

A corpus is JSONL, one document per line, with `id`, `title` and `text` (Search-R1's
`{"id", "contents"}` rows are read too). One worked example:

    corpus line : {"id": "p17", "title": "Zorvak Telim", "text": "Zorvak Telim was born in Quessara."}
    query       : "Where was Zorvak Telim born?"
    passage     : '"Zorvak Telim"\\nZorvak Telim was born in Quessara.'

The HTTP contract is Search-R1's (`search_r1/search/retrieval_server.py`):

    POST {url}/retrieve  {"queries": ["q1", "q2"], "topk": 3, "return_scores": false}
    -> {"result": [[{"id": "p17", "contents": "\\"Zorvak Telim\\"\\n..."}, ...], [...]]}

with `return_scores: true` each item is `{"document": {...}, "score": 1.3}` instead. Our
server also accepts `top_k` for `topk`, answers `GET /health`, and enforces request limits
(4xx with `{"error": "..."}`): queries per request, `topk`, body size (refused from its
`Content-Length` before any of it is read) and JSON nesting depth; it serves on a bounded pool
of threads and closes new connections while the pool and its queue are full. Our client reads all of the
above plus a bare list of lists and plain-string or `{"title", "text"}` items; a search can
carry a deadline, past which it gives up with `SearchTimeout` instead of retrying.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import re
import shutil
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, Protocol

import bm25s

from wapo.cache import cache_dir

INDEX_VERSION = 1
"""Bumped when tokenisation or index parameters change, so stale caches are not reused."""


class Retriever(Protocol):
    """Anything that maps queries to ranked passage strings."""

    def search(self, queries: list[str], top_k: int, *, deadline: float | None = None) -> list[list[str]]:
        """One list of at most `top_k` passages per query, best first.

        `deadline` (a `time.monotonic()` value): a backend that waits on something (a server)
        gives up at that moment with `SearchTimeout`; in-process ones may ignore it.
        """
        ...


class RetrieverError(RuntimeError):
    """The retriever could not be reached, or kept failing after bounded retries."""


class SearchTimeout(RetrieverError):
    """The search's deadline passed before the retriever answered."""


# ---------------------------------------------------------------------------------------
# Documents and corpora


@dataclass(frozen=True)
class Doc:
    """One retrievable document (a Wikipedia paragraph, an entity page)."""

    id: str
    title: str
    text: str

    def contents(self) -> str:
        """The passage string: Search-R1's `"Title"\\ntext` layout."""
        return f'"{self.title}"\n{self.text}'


def split_passage(passage: str) -> tuple[str, str]:
    """(title, text) of a passage string; a passage without a title line has title ""."""
    first, sep, rest = passage.partition("\n")
    if not sep:
        return "", passage.strip()
    return first.strip().strip('"'), rest.strip()


def load_corpus(path: str | Path) -> list[Doc]:
    """Read a JSONL corpus of `{"id", "title", "text"}` (or Search-R1 `{"id", "contents"}`)."""
    docs = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                docs.append(_doc_from_row(json.loads(line), f"{path}:{line_no}"))
    if not docs:
        raise ValueError(f"corpus {path} has no documents")
    return docs


def _doc_from_row(row: dict[str, Any], where: str) -> Doc:
    if "contents" in row and "title" not in row:
        title, text = split_passage(row["contents"])
        return Doc(id=str(row["id"]), title=title, text=text)
    missing = {"id", "title", "text"} - row.keys()
    if missing:
        raise ValueError(f"{where}: corpus row lacks {sorted(missing)}")
    return Doc(id=str(row["id"]), title=row["title"], text=row["text"])


def write_corpus(docs: Sequence[Doc], path: str | Path) -> None:
    """Write `docs` as a JSONL corpus that `load_corpus` and `serve` read."""
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"id": doc.id, "title": doc.title, "text": doc.text}) + "\n")


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (the cache key of an index built from it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------
# BM25 (in process)


def _tokenize(texts: list[str]) -> list[list[str]]:
    """Lower-cased word tokens without English stop words (bm25s' scikit-learn pattern)."""
    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


class BM25Retriever:
    """BM25 (Robertson et al., Lucene variant as in `bm25s`) over an in-memory document list.

    Built from `docs` directly, or with `from_jsonl(path)`, which caches the index under
    `cache_dir()/bm25/<sha256 of the file>-v<INDEX_VERSION>` so later runs load it instead
    of re-indexing. Queries with no known word return no passages rather than arbitrary ones.
    """

    def __init__(self, docs: Sequence[Doc], *, cache_key: str | None = None):
        if not docs:
            raise ValueError("BM25Retriever needs at least one document")
        self.docs = list(docs)
        index_dir = cache_dir() / "bm25" / f"{cache_key}-v{INDEX_VERSION}" if cache_key else None
        if index_dir is not None and index_dir.is_dir():
            self._bm25 = bm25s.BM25.load(str(index_dir))
            if self._bm25.scores["num_docs"] != len(self.docs):
                raise ValueError(f"cached index {index_dir} does not match the corpus; delete it")
        else:
            tokens = _tokenize([f"{d.title} {d.text}" for d in self.docs])
            if not any(tokens):
                raise ValueError("the corpus has no indexable word (two letters or more, not a stop word)")
            self._bm25 = bm25s.BM25()
            self._bm25.index(tokens, show_progress=False)
            if index_dir is not None:
                _save_atomically(self._bm25, index_dir)
        # bm25s does not document thread safety; the HTTP server calls us from many threads.
        self._lock = threading.Lock()

    @classmethod
    def from_jsonl(cls, path: str | Path, *, cache: bool = True) -> BM25Retriever:
        """Index a JSONL corpus, reusing the on-disk index cached for the same file content."""
        return cls(load_corpus(path), cache_key=file_sha256(path) if cache else None)

    def search_docs(self, queries: list[str], top_k: int) -> list[list[tuple[Doc, float]]]:
        """(document, score) pairs per query, best first, zero-score documents left out."""
        if not queries:
            return []
        k = min(top_k, len(self.docs))
        with self._lock:
            ids, scores = self._bm25.retrieve(
                _tokenize(queries), k=k, show_progress=False, backend_selection="numpy"
            )
        return [
            [(self.docs[int(i)], float(s)) for i, s in zip(row_ids, row_scores) if s > 0]
            for row_ids, row_scores in zip(ids, scores)
        ]

    def search(self, queries: list[str], top_k: int, *, deadline: float | None = None) -> list[list[str]]:
        """Passage strings per query, best first (see `Retriever`); one batched BM25 call,
        which is not interrupted, so `deadline` is ignored."""
        return [[doc.contents() for doc, _ in hits] for hits in self.search_docs(queries, top_k)]


def _save_atomically(bm25: Any, index_dir: Path) -> None:
    """Save into a temporary sibling, then rename: concurrent builders never see half an index."""
    index_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=index_dir.parent, prefix=index_dir.name + ".tmp"))
    bm25.save(str(tmp))
    try:
        tmp.rename(index_dir)
    except OSError:  # another process finished first; its index is identical
        shutil.rmtree(tmp)


# ---------------------------------------------------------------------------------------
# HTTP client


class HttpRetriever:
    """Client of a Search-R1-style retrieval server (ours, from `serve`, or Search-R1's own).

    The constructor sends one small query, so a server that is down or speaks another
    protocol fails here, before any training, with the URL in the message. During a run,
    connection errors, timeouts, HTTP 429 and 5xx are retried with exponential backoff
    (`backoff_s · 2^attempt`, at most `max_backoff_s`, `max_retries` times); `retries` counts
    the retried attempts and `failures` the calls that gave up with `RetrieverError`. Other
    4xx answers mean our request is wrong and raise `ValueError` at once. A search with a
    `deadline` waits at most until then, retries included, and then raises `SearchTimeout`.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 30.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
    ):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.retries = 0
        self.failures = 0
        self._check()

    def _check(self) -> None:
        """One query without retries: Search-R1's server has no /health, so probe /retrieve."""
        try:
            parse_response(self._post({"queries": ["health check"], "topk": 1}), n_queries=1)
        except _TRANSIENT as err:
            raise RetrieverError(
                f"retriever at {self.url} is not reachable ({err}); start one with "
                f"`wapo serve-retriever --corpus FILE --port PORT` or pass another URL"
            ) from None
        except ValueError as err:
            raise RetrieverError(f"{self.url} does not answer like a retriever: {err}") from None

    def search(self, queries: list[str], top_k: int, *, deadline: float | None = None) -> list[list[str]]:
        """Passage strings per query, best first (see `Retriever`), in one request."""
        if not queries:
            return []
        body = self._post_with_retries({"queries": queries, "topk": top_k}, deadline)
        return parse_response(body, n_queries=len(queries))

    def _post_with_retries(self, payload: dict[str, Any], deadline: float | None = None) -> Any:
        last_error: Exception | None = None
        for attempt in range(self.max_retries + 1):
            timeout = self.timeout_s if deadline is None else min(self.timeout_s, deadline - time.monotonic())
            if timeout <= 0:
                raise SearchTimeout(f"retriever at {self.url}: deadline passed after {attempt} attempt(s) "
                                    f"(last error: {last_error})")
            try:
                return self._post(payload, timeout)
            except _TRANSIENT as err:
                last_error = err
            if attempt < self.max_retries:
                self.retries += 1
                pause = min(self.backoff_s * 2**attempt, self.max_backoff_s)
                time.sleep(pause if deadline is None else max(0.0, min(pause, deadline - time.monotonic())))
        if deadline is not None and time.monotonic() >= deadline:  # the last attempt ran into it
            raise SearchTimeout(f"retriever at {self.url}: deadline passed ({last_error})")
        self.failures += 1
        raise RetrieverError(
            f"retriever at {self.url} failed {self.max_retries + 1} times: {last_error}"
        )

    def _post(self, payload: dict[str, Any], timeout: float | None = None) -> Any:
        """One POST /retrieve; transient failures raise one of `_TRANSIENT`."""
        request = urllib.request.Request(
            f"{self.url}/retrieve",
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:300]
            if err.code == 429 or err.code >= 500:
                raise _Transient(f"HTTP {err.code}: {detail}") from None
            raise ValueError(f"retriever at {self.url} refused the request: HTTP {err.code} {detail}") from None


class _Transient(Exception):
    """An HTTP answer worth retrying (429, 5xx)."""


_TRANSIENT = (_Transient, OSError, http.client.HTTPException)
"""Worth retrying: bad status, refused/reset connections and timeouts (OSError), broken replies."""


def parse_response(body: Any, *, n_queries: int) -> list[list[str]]:
    """Passage strings from a `/retrieve` answer (any shape listed in the module docstring)."""
    results = body["result"] if isinstance(body, dict) else body
    if not isinstance(results, list) or len(results) != n_queries:
        raise ValueError(f"retriever answered {str(body)[:200]!r}, expected {n_queries} result lists")
    return [[_passage(item) for item in hits] for hits in results]


def _passage(item: Any) -> str:
    if isinstance(item, dict) and "document" in item:
        item = item["document"]
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and "contents" in item:
        return item["contents"]
    if isinstance(item, dict) and "text" in item:
        return Doc(id="", title=item.get("title", ""), text=item["text"]).contents()
    raise ValueError(f"cannot read a passage from {str(item)[:200]!r}")


# ---------------------------------------------------------------------------------------
# HTTP server


@dataclass(frozen=True)
class ServerLimits:
    """Per-request limits; requests beyond them get 4xx with a JSON error."""

    max_queries: int = 64
    """Queries per request."""
    max_top_k: int = 50
    """Largest `topk`."""
    max_body_bytes: int = 1_000_000
    """Largest request body (413 beyond, without reading it)."""
    max_json_depth: int = 8
    """Deepest nesting of JSON arrays and objects in a body (a request needs 2)."""
    max_threads: int = 8
    """Worker threads: requests served at once."""
    max_pending: int = 64
    """Connections waiting for a worker; beyond them a new connection is closed at once."""


LINGER_S = 1.0
LINGER_BYTES = 16 << 20
"""After refusing a body unread: how long, and how much, in-flight input is dropped before closing."""


class _Handler(BaseHTTPRequestHandler):
    """`GET /health` and `POST /retrieve` over a `BM25Retriever` (set on the server)."""

    server: _RetrievalServer
    timeout = 30  # seconds a slow client may hold a connection thread

    def do_GET(self) -> None:
        if self.path != "/health":
            return self._send(404, {"error": f"no route GET {self.path}"})
        self._send(200, {"status": "ok", "docs": len(self.server.retriever.docs)})

    def do_POST(self) -> None:
        if self.path != "/retrieve":
            return self._send(404, {"error": f"no route POST {self.path}"})
        try:
            request = self._read_request()
        except _BadRequest as err:
            return self._send(err.status, {"error": str(err)})
        hits = self.server.retriever.search_docs(request["queries"], request["topk"])
        result = [[_hit_json(doc, score, request["return_scores"]) for doc, score in h] for h in hits]
        self._send(200, {"result": result})

    def _read_request(self) -> dict[str, Any]:
        limits = self.server.limits
        header = self.headers.get("Content-Length", "")
        if not header.isdigit():
            raise _BadRequest(411, "a Content-Length header is required")
        length = int(header)
        if length > limits.max_body_bytes:  # refused unread: the connection closes after the answer
            self.close_connection = True
            raise _BadRequest(413, f"body of {length} bytes exceeds {limits.max_body_bytes}")
        data = self.rfile.read(length)
        if json_nesting_exceeds(data, limits.max_json_depth):
            raise _BadRequest(400, f"JSON nested deeper than {limits.max_json_depth} levels")
        try:
            body = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise _BadRequest(400, f"body is not JSON: {err}") from None
        return validate_request(body, limits)

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        if self.close_connection:
            self._linger()

    def _linger(self) -> None:
        """Close our side after the answer, then drop what the client still sends for a moment.

        The body was never read; closing a socket with unread input would reset the
        connection and could destroy the answer before the client reads it. So our side
        ends first (the client sees the answer, then EOF) and in-flight bytes are discarded
        for at most `LINGER_S` seconds and `LINGER_BYTES` bytes.
        """
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_WR)
        self.connection.settimeout(LINGER_S)
        end, left = time.monotonic() + LINGER_S, LINGER_BYTES
        while left > 0 and time.monotonic() < end:
            try:
                chunk = self.connection.recv(min(left, 1 << 16))
            except OSError:
                break
            if not chunk:
                break
            left -= len(chunk)

    def log_message(self, format: str, *args: Any) -> None:
        """Silence per-request logs; errors reach the client as JSON."""


class _BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_JSON_BRACKET = re.compile(rb"[\[\]{}]")


def json_nesting_exceeds(data: bytes, limit: int) -> bool:
    """True when arrays and objects in the JSON text `data` nest deeper than `limit`.

    Checked before parsing: `json.loads` recurses once per level, so a body of a million
    `[` would exhaust the stack of the thread serving it. Brackets inside strings do not
    count (`{"queries": ["[[["]}` has depth 2).
    """
    depth = 0
    for bracket in _JSON_BRACKET.finditer(_JSON_STRING.sub(b"", data)):
        depth += 1 if bracket.group() in (b"[", b"{") else -1
        if depth > limit:
            return True
    return False


def validate_request(body: Any, limits: ServerLimits) -> dict[str, Any]:
    """Normalise a `/retrieve` body to {queries, topk, return_scores}, or raise `_BadRequest`."""
    if not isinstance(body, dict):
        raise _BadRequest(400, "body must be a JSON object")
    queries = body.get("queries")
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise _BadRequest(400, '"queries" must be a list of strings')
    if len(queries) > limits.max_queries:
        raise _BadRequest(400, f"{len(queries)} queries exceed the limit of {limits.max_queries}")
    topk = body.get("topk", body.get("top_k", 3))
    if not isinstance(topk, int) or isinstance(topk, bool) or not 1 <= topk <= limits.max_top_k:
        raise _BadRequest(400, f'"topk" must be an integer in [1, {limits.max_top_k}], got {topk!r}')
    return {"queries": queries, "topk": topk, "return_scores": bool(body.get("return_scores"))}


def _hit_json(doc: Doc, score: float, with_score: bool) -> dict[str, Any]:
    """One hit as Search-R1 sends it: the corpus row, wrapped with its score if asked."""
    document = {"id": doc.id, "contents": doc.contents()}
    return {"document": document, "score": score} if with_score else document


class _RetrievalServer(HTTPServer):
    """An HTTP server whose connections are served by a bounded pool of threads.

    At most `max_threads` requests run at once and `max_pending` more wait; a connection
    beyond those is closed at once, unread (our client retries it with backoff), so a burst
    of connections can neither spawn threads nor queue without bound.
    """

    def __init__(self, address: tuple[str, int], retriever: BM25Retriever, limits: ServerLimits):
        super().__init__(address, _Handler)
        self.retriever = retriever
        self.limits = limits
        self._pool = ThreadPoolExecutor(limits.max_threads, thread_name_prefix="retriever")
        self._slots = threading.BoundedSemaphore(limits.max_threads + limits.max_pending)

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        self._pool.submit(self._serve, request, client_address)

    def _serve(self, request: socket.socket, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001 - as socketserver's threads do: log it, keep serving
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._slots.release()

    def server_close(self) -> None:
        super().server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)


def make_server(corpus_path: str | Path, host: str = "127.0.0.1", port: int = 8000, **limits: int) -> HTTPServer:
    """A BM25 retrieval server over a JSONL corpus, bound but not yet serving.

    `limits`: fields of `ServerLimits` (e.g. `max_queries=16`). Port 0 picks a free port
    (`server.server_address[1]`). Call `serve_forever()` (e.g. in a thread), `shutdown()` and
    `server_close()`; the default host keeps it on loopback.
    """
    retriever = BM25Retriever.from_jsonl(corpus_path)
    return _RetrievalServer((host, port), retriever, ServerLimits(**limits))


def serve(corpus_path: str | Path, host: str = "127.0.0.1", port: int = 8000, **limits: int) -> None:
    """Serve `corpus_path` until interrupted (blocking); `limits` as for `make_server`."""
    server = make_server(corpus_path, host, port, **limits)
    bound_host, bound_port = server.server_address[:2]
    print(f"serving {len(server.retriever.docs)} documents on http://{bound_host}:{bound_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `serve-retriever` subcommand to an argparse subparsers object."""
    parser = subparsers.add_parser("serve-retriever", help=_SERVE_HELP, description=_SERVE_HELP)
    _add_serve_arguments(parser)
    return parser


_SERVE_HELP = "serve a JSONL corpus with BM25 over HTTP (Search-R1's POST /retrieve contract)"


_LIMIT_HELP = {
    "max_queries": "queries per request",
    "max_top_k": "largest topk",
    "max_body_bytes": "largest body (refused unread beyond)",
    "max_json_depth": "deepest JSON nesting of a body",
    "max_threads": "requests served at once",
    "max_pending": "connections waiting for a thread (closed beyond)",
}


def _add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", required=True, help="JSONL corpus: id, title, text per line")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (loopback by default)")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    for name, text in _LIMIT_HELP.items():
        default = getattr(ServerLimits, name)
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=default,
                            help=f"{text} (default: {default})")
    parser.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> None:
    serve(args.corpus, args.host, args.port, **{name: getattr(args, name) for name in _LIMIT_HELP})


if __name__ == "__main__":
    main_parser = argparse.ArgumentParser(prog="python -m wapo.retrieval", description=_SERVE_HELP)
    _add_serve_arguments(main_parser)
    cli_args = main_parser.parse_args()
    cli_args.func(cli_args)
