"""Run logs on resume: rows after the checkpoint's step dropped from every log, a torn last
line dropped, and a kill during the rewrite leaves the old file whole."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from wapo.runlog import RunLog, read_metrics


def _write_rows(path, rows) -> bytes:
    """Write `rows` as RunLog does (one `json.dumps` per line); returns the bytes written."""
    data = b"".join(json.dumps(row).encode() + b"\n" for row in rows)
    path.write_bytes(data)
    return data


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def run(tmp_path):
    """A run folder whose logs reach step 4, with evaluations before, at steps 2 and 4, and after."""
    _write_rows(tmp_path / "metrics.jsonl", [{"step": s, "loss": s / 10} for s in (1, 2, 3, 4)])
    _write_rows(tmp_path / "completions.jsonl", [{"step": s, "completion": f"c{s}{i}"} for s in (1, 2, 3, 4)
                                                 for i in (0, 1)])
    _write_rows(tmp_path / "eval.jsonl", [{"step": 0, "when": "before", "accuracy": 0.1},
                                          {"step": 2, "when": "step 2", "accuracy": 0.2},
                                          {"step": 4, "when": "step 4", "accuracy": 0.4},
                                          {"step": 4, "when": "after", "accuracy": 0.4}])
    return tmp_path


def test_resume_drops_the_rows_after_the_step_from_every_log(run):
    RunLog(run, resume_step=2, tensorboard=False)
    assert [r["step"] for r in _rows(run / "metrics.jsonl")] == [1, 2]
    assert [r["completion"] for r in _rows(run / "completions.jsonl")] == ["c10", "c11", "c20", "c21"]
    assert [(r["step"], r["when"]) for r in _rows(run / "eval.jsonl")] == [(0, "before"), (2, "step 2")]


def test_resume_from_the_last_step_drops_only_the_after_evaluation(run):
    RunLog(run, resume_step=4, tensorboard=False)  # the run goes on: it evaluates "after" again at its end
    assert [(r["step"], r["when"]) for r in _rows(run / "eval.jsonl")] == [(0, "before"), (2, "step 2"),
                                                                             (4, "step 4")]
    assert [r["step"] for r in _rows(run / "metrics.jsonl")] == [1, 2, 3, 4]


def test_a_torn_last_line_is_dropped_and_kept_rows_stay_byte_for_byte(tmp_path):
    # killed while writing step 3's metrics, and inside an escape of step 2's completion
    metrics = _write_rows(tmp_path / "metrics.jsonl", [{"step": 1, "loss": 0.25}, {"step": 2, "loss": None}])
    completions = _write_rows(tmp_path / "completions.jsonl", [{"step": 1, "completion": "caf\u00e9"}])
    with (tmp_path / "metrics.jsonl").open("ab") as f:
        f.write(b'{"step": 3, "lo')
    with (tmp_path / "completions.jsonl").open("ab") as f:
        f.write(b'{"step": 2, "completion": "caf\\u00')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]  # reading tolerates it too

    RunLog(tmp_path, resume_step=5, tensorboard=False)
    assert (tmp_path / "metrics.jsonl").read_bytes() == metrics
    assert (tmp_path / "completions.jsonl").read_bytes() == completions


def test_a_bad_line_before_the_last_is_an_error_naming_it(tmp_path):
    (tmp_path / "metrics.jsonl").write_bytes(b'{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not JSON"):
        RunLog(tmp_path, resume_step=3, tensorboard=False)


def test_a_kill_while_truncating_leaves_the_old_log_whole(tmp_path):
    path = tmp_path / "metrics.jsonl"
    original = _write_rows(path, [{"step": s, "loss": 0.5} for s in range(1, 101)])
    first_50 = b"".join(original.splitlines(keepends=True)[:50])  # 1291 bytes
    # The child may write at most 512 bytes to any file, and dies of SIGXFSZ on the write that
    # passes them: a hard kill in the middle of writing the 50 rows it keeps.
    child = textwrap.dedent(f"""
        import resource, signal
        from pathlib import Path
        from wapo.runlog import RunLog
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it by default
        resource.setrlimit(resource.RLIMIT_FSIZE, (512, 512))
        RunLog(Path({str(tmp_path)!r}), resume_step=50, tensorboard=False)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    killed = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, timeout=120)
    assert killed.returncode == -signal.SIGXFSZ, killed.stderr.decode()[-2000:]
    assert path.read_bytes() == original

    RunLog(tmp_path, resume_step=50, tensorboard=False)  # the resume that follows
    assert path.read_bytes() == first_50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # the killed one's temp file is gone
