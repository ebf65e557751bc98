"""Where wapo keeps what it builds once: converted models, BM25 indexes."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$WAPO_CACHE`, default `~/.cache/wapo`."""
    return Path(os.environ.get("WAPO_CACHE", "~/.cache/wapo")).expanduser()
