"""The math grader's child process: compares answers with math-verify for `wapo.rewards`.

`wapo.rewards._GraderProcess` runs this file as a script,

    python grader_child.py FD MEMORY_BYTES [MODULE:FUNCTION]

and talks to it over the socket FD: it sends (pred, gold) and receives ("ok", equal),
("out of memory", None) or ("error", error text), one comparison at a time, until it closes
the socket. The comparison is `verify` unless MODULE:FUNCTION names another (tests do).

A script that imports nothing from `wapo`, so that starting it loads math-verify but not torch:
a (re)start after a timeout takes 1.6 s instead of 6.4 s, and the process holds 60 MB instead
of 320 MB (measured on a busy 2-core machine).
"""

import importlib
import logging
import re
import sys
from multiprocessing.connection import Connection
from pathlib import Path


def verify(pred: str, gold: str) -> bool:
    """math-verify's parse of both sides as LaTeX math, then its asymmetric verify(gold, pred).

    Wrapping in `$...$` makes math-verify read `x^2+1` or `\\sqrt{2}` as math rather than
    looking for a number inside prose. Its signal-based timeouts are off (None): the parent
    bounds the time by killing this process.
    """
    import math_verify  # deferred: importing it loads SymPy and ANTLR (about a second)

    gold_parsed = math_verify.parse(f"${gold}$", parsing_timeout=None)
    pred_parsed = math_verify.parse(f"${pred}$", parsing_timeout=None)
    return bool(math_verify.verify(gold_parsed, pred_parsed, timeout_seconds=None))


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once that its timeout is off; we bound time ourselves, so drop it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


def serve(fd: int, memory_bytes: int, target: str | None = None) -> None:
    """Answer comparisons on socket `fd` until the parent closes it (module docstring).

    The comparison is called once on ("1", "1") before saying "ready", so that its imports
    (SymPy and ANTLR for `verify`) happen at start-up; then the address space is capped at
    its size by then plus `memory_bytes`. A MemoryError (an answer that made SymPy allocate
    past the cap) is answered "out of memory", and the process goes on: the allocation that
    failed is gone.
    """
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_DropTimeoutDisabledWarning())
    compare = verify
    if target:
        module, name = target.split(":")
        compare = getattr(importlib.import_module(module), name)
    conn = Connection(fd)
    compare("1", "1")
    cap_address_space(memory_bytes)
    conn.send("ready")
    while True:
        try:
            pred, gold = conn.recv()
        except EOFError:
            return
        try:
            reply = ("ok", bool(compare(pred, gold)))
        except MemoryError:
            reply = ("out of memory", None)
        except Exception as error:  # reported to the parent, which raises it
            reply = ("error", f"{type(error).__name__}: {error}")
        conn.send(reply)


def cap_address_space(extra_bytes: int) -> None:
    """Cap this process's address space (RLIMIT_AS) at its current size plus `extra_bytes`.

    Relative to the current size because what the imports map differs between machines. The
    size comes from /proc/self/status (Linux); where there is none, no cap.
    """
    status = Path("/proc/self/status")
    size = re.search(r"VmSize:\s*(\d+) kB", status.read_text()) if status.exists() else None
    if size is None:
        return
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = int(size.group(1)) * 1024 + extra_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


if __name__ == "__main__":
    # Python put this file's folder on the path; wapo's modules there (config, models, ...)
    # must not shadow others' of the same name.
    here = Path(__file__).resolve().parent
    sys.path[:] = [path for path in sys.path if Path(path or ".").resolve() != here]
    serve(int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:])
