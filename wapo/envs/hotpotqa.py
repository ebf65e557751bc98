"""HotpotQA with a search tool: the multi-hop protocol of `wapo.envs.multihop` on the real data.

Reads the JSON files as published (Yang et al. 2018, https://hotpotqa.github.io):
`hotpot_train_v1.1.json`, `hotpot_dev_distractor_v1.json` and `hotpot_dev_fullwiki_v1.json`
are lists of questions, each

    {"_id": "5a8b57f2...", "question": "Which magazine was started first, ...?",
     "answer": "Arthur's Magazine", "type": "comparison", "level": "medium",
     "supporting_facts": [["Arthur's Magazine", 0], ["First for Women", 0]],
     "context": [["Arthur's Magazine", [" Arthur's Magazine (1844-1846) was ...", ...]], ...]}

(the test files, which have no answers, cannot be graded). A question's context paragraphs
become documents titled by their Wikipedia title; its `chain` is the titles of its supporting
facts in file order, which is what `demonstration()` searches for before answering.

The corpus a question searches (`corpus` option):
- "question": its own context paragraphs only — the distractor setting (2 gold paragraphs and 8
  distractors; in the fullwiki file, the 10 paragraphs the dataset's retriever found);
- "pooled": every paragraph of every question of its split (train or held-out), so held-out
  paragraphs never appear in training observations.
For open-domain search over all of Wikipedia, point `retriever` at a Search-R1 server.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wapo.envs.base import ENVIRONMENTS, Sample
from wapo.envs.multihop import SearchQAEnvironment
from wapo.retrieval import Doc, file_sha256

HOTPOTQA_SAMPLE = Path(__file__).resolve().parent.parent / "data" / "hotpotqa_sample.json"
CORPORA = ("question", "pooled")


def load_hotpotqa(path: str | Path) -> tuple[list[Sample], dict[str, list[Doc]]]:
    """The questions of a HotpotQA file, and each question's context paragraphs by `_id`.

    A paragraph's text is its sentences stripped and joined by one space; a title repeated
    within one question keeps its first paragraph. Sample keys: `id`, `question`, `answer`,
    `golds`, `chain` (supporting titles, file order, each once), `hops`, `type`, `level`.
    """
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of questions (HotpotQA's format)")
    samples, contexts = [], {}
    for row in rows:
        missing = {"_id", "question", "answer", "context", "supporting_facts"} - row.keys()
        if missing:
            raise ValueError(f"{path}: question {row.get('_id', '?')} lacks {sorted(missing)} "
                             f"(HotpotQA's test files have no answers: use train or dev files)")
        docs: dict[str, Doc] = {}
        for title, sentences in row["context"]:
            docs.setdefault(title, Doc(id=title, title=title, text=" ".join(s.strip() for s in sentences)))
        contexts[row["_id"]] = list(docs.values())
        samples.append(_sample(row))
    return samples, contexts


def _sample(row: dict[str, Any]) -> Sample:
    chain = list(dict.fromkeys(title for title, _ in row["supporting_facts"]))
    return {
        "id": row["_id"],
        "question": row["question"],
        "answer": row["answer"],
        "golds": [row["answer"]],
        "chain": chain,
        "hops": len(chain),
        "type": row.get("type"),
        "level": row.get("level"),
    }


@ENVIRONMENTS.register("hotpotqa")
@dataclass
class HotpotQAEnv(SearchQAEnvironment):
    """HotpotQA questions; BM25 over their context paragraphs, or a retrieval server."""

    path: str | None = None
    """HotpotQA JSON file (e.g. hotpot_train_v1.1.json); None: the shipped 4-question sample."""
    eval_path: str | None = None
    """Held-out file (e.g. hotpot_dev_distractor_v1.json); None: hold out part of `path`."""
    eval_fraction: float = 0.25
    """Without `eval_path`: share of the (seed-shuffled) questions held out, at least one."""
    corpus: str = "question"
    """"question": each question searches its own context paragraphs (the distractor setting);
    "pooled": the paragraphs of all questions of its split."""

    def _file(self) -> Path:
        return Path(self.path) if self.path else HOTPOTQA_SAMPLE

    def _load(self) -> tuple[dict[str, list[Doc]], list[Sample], list[Sample]]:
        if self.corpus not in CORPORA:
            raise ValueError(f"corpus must be one of {', '.join(CORPORA)}, got {self.corpus!r}")
        train, contexts = load_hotpotqa(self._file())
        if self.eval_path:
            held_out, more = load_hotpotqa(self.eval_path)
            contexts.update(more)
        else:
            if len(train) < 2:
                raise ValueError(f"{self._file()} needs at least 2 questions to split")
            random.Random(self.seed).shuffle(train)
            n_eval = min(len(train) - 1, max(1, round(self.eval_fraction * len(train))))
            held_out, train = train[:n_eval], train[n_eval:]
        if self.corpus == "question":
            corpora = {s["id"]: contexts[s["id"]] for s in train + held_out}
            return corpora, [{**s, "corpus": s["id"]} for s in train], [{**s, "corpus": s["id"]} for s in held_out]
        corpora = {"train": _pool(contexts, train), "heldout": _pool(contexts, held_out)}
        return corpora, [{**s, "corpus": "train"} for s in train], [{**s, "corpus": "heldout"} for s in held_out]

    def _index_key(self, corpus: str) -> str | None:
        """Pooled corpora are cached on disk, keyed by the files and the split; a question's
        ten paragraphs are indexed in memory."""
        if self.corpus != "pooled":
            return None
        files = [file_sha256(self._file())[:16]] + ([file_sha256(self.eval_path)[:16]] if self.eval_path else [])
        return f"hotpotqa-{'-'.join(files)}-{self.seed}-{self.eval_fraction}-{corpus}"


def _pool(contexts: dict[str, list[Doc]], samples: list[Sample]) -> list[Doc]:
    """The paragraphs of `samples`' questions, each title once (its first text)."""
    pooled: dict[str, Doc] = {}
    for sample in samples:
        for doc in contexts[sample["id"]]:
            pooled.setdefault(doc.title, doc)
    return list(pooled.values())
