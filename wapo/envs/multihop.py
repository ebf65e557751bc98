"""Multi-hop question answering with a search tool (Search-R1's protocol).

The model may write `<search>query</search>`; the environment answers with the top-k
passages of a retriever inside `<information>...</information>`; the model ends with
`<answer>...</answer>`, graded by exact match or token F1 against the gold answers.
One episode of the offline default (`"multihop"`, a generated world), as the trainer
builds it (model turns end at a stop string, environment text is masked out of the loss):

    question : In which city was the founder of Brintel Guild born?
    model    : <search>Brintel Guild</search>
    env      : <information>Doc 1 (Brintel Guild): Brintel Guild is a printing organisation
               founded by Odo Vaskir in 1841. Brintel Guild is headquartered in Quessara.
               </information>
    model    : <search>Odo Vaskir</search>
    env      : <information>Doc 1 (Odo Vaskir): Odo Vaskir is a clockmaker who was born in
               Tarrimon in 1802. ...</information>
    model    : <answer>Tarrimon</answer>                      -> EM 1, reason "correct"

Sample keys: `id`, `question`, `answer` (str), `golds` (accepted answers), `chain` (the ids
of the documents that must be read, in order) and `hops` (= len(chain)).

Environments:
- `"multihop"`: a seeded world of fictional people, cities and organisations (generated
  syllable names, so lexical search works), one document per entity, 2- and 3-hop questions.
- `"hotpotqa"`: a HotpotQA JSON file (default: the shipped 4-question sample); the corpus is
  the union of the questions' context paragraphs (the distractor setting). For open-domain
  search over Wikipedia, point `retriever` at a Search-R1 server.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wapo.envs.base import ENVIRONMENTS, Environment, Messages, RewardResult, Sample
from wapo.retrieval import (
    BM25Retriever,
    Doc,
    HttpRetriever,
    Retriever,
    RetrieverError,
    file_sha256,
    split_passage,
)
from wapo.rewards import qa_exact_match, qa_f1

HOTPOTQA_SAMPLE = Path(__file__).resolve().parent.parent / "data" / "hotpotqa_sample.json"
MAX_QUERY_CHARS = 300
"""Longer search queries are cut: a runaway model turn must not become a huge request."""

METRICS = {"em": qa_exact_match, "f1": qa_f1}

PROMPT = """Answer the question. You may search a collection of documents first.
To search, write <search>query</search>; the results come back inside <information>...</information>.
Search at most {searches} times, then write only the final answer inside <answer>...</answer>.

Example:
Question: Where was the founder of Velto Works born?
<search>Velto Works</search>
<information>Doc 1 (Velto Works): Velto Works was founded by Odo Sarn.</information>
<search>Odo Sarn</search>
<information>Doc 1 (Odo Sarn): Odo Sarn was born in Tarrin.</information>
<answer>Tarrin</answer>

Question: {question}"""

# A tag left open at the very end counts as closed: generators differ on whether the stop
# string that ended the turn (`</search>`, `</answer>`) is kept in the text.
_SEARCH = re.compile(r"<search>(.*?)(?:</search>|\Z)", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)(?:</answer>|\Z)", re.DOTALL)
_INFORMATION = re.compile(r"<information>.*?</information>", re.DOTALL)


# ---------------------------------------------------------------------------------------
# Parsing the model's text


def last_turn(completion: str) -> str:
    """The model's latest turn: the text after the last `</information>`."""
    return completion.rpartition("</information>")[2]


def parse_search(turn: str) -> str | None:
    """The query of the last `<search>...</search>` in `turn` (open at the end too), or None."""
    queries = _SEARCH.findall(turn)
    return queries[-1].strip() if queries else None


def parse_answer(completion: str) -> str | None:
    """The last `<answer>...</answer>` written by the model (observations are ignored)."""
    answers = _ANSWER.findall(_INFORMATION.sub("", completion))
    return answers[-1].strip() if answers else None


def format_information(passages: list[str], max_words: int) -> str:
    """`<information>Doc 1 (Title): text ...</information>`, at most `max_words` text words.

    Passages are kept in rank order; the one that crosses the budget is cut (ending in
    "...") and later ones are dropped, so the best passage survives a small budget.
    """
    lines, budget = [], max_words
    for rank, passage in enumerate(passages, 1):
        if budget <= 0:
            break
        title, text = split_passage(passage)
        words = text.split()
        shown = " ".join(words[:budget]) + (" ..." if len(words) > budget else "")
        budget -= len(words)
        lines.append(f"Doc {rank} ({title}): {shown}" if title else f"Doc {rank}: {shown}")
    return "<information>" + ("\n".join(lines) or "No results.") + "</information>"


# ---------------------------------------------------------------------------------------
# The shared environment


@dataclass
class SearchQAEnvironment(Environment):
    """Search-tool QA: the protocol, prompt and grading; subclasses supply `_load()`."""

    max_turns: int = 4
    """Model turns per episode: up to `max_turns - 1` searches, then the answer."""
    stop_strings: tuple[str, ...] = field(default=("</search>", "</answer>"), init=False)
    top_k: int = 3
    """Passages returned per search."""
    metric: str = "em"
    """Answer score: "em" (exact match, 0/1) or "f1" (token F1), SQuAD normalisation."""
    format_weight: float = 0.0
    """Share of the reward for a non-empty `<answer>`: score = (1-w)·metric + w·[answered]."""
    max_observation_words: int = 200
    """Budget of passage-text words in one `<information>` block."""
    retriever: str = "bm25"
    """"bm25" (in process, over this environment's corpus) or the URL of a retrieval server."""

    def __post_init__(self) -> None:
        self._check_options()
        self.docs, self._train, self._eval = self._load()
        self.search_backend: Retriever = self._make_retriever()

    def _check_options(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; known: {', '.join(METRICS)}")
        if self.max_turns < 2:
            raise ValueError(f"max_turns must be >= 2 (a search and an answer), got {self.max_turns}")
        if self.top_k < 1 or self.max_observation_words < 1:
            raise ValueError("top_k and max_observation_words must be >= 1")
        if not 0.0 <= self.format_weight <= 1.0:
            raise ValueError(f"format_weight must be in [0, 1], got {self.format_weight}")

    def _load(self) -> tuple[list[Doc], list[Sample], list[Sample]]:
        """(corpus, train samples, held-out samples)."""
        raise NotImplementedError

    def _index_key(self) -> str | None:
        """Key of the on-disk BM25 cache, or None to index in memory each time."""
        return None

    def _make_retriever(self) -> Retriever:
        if self.retriever == "bm25":
            return BM25Retriever(self.docs, cache_key=self._index_key())
        if self.retriever.startswith(("http://", "https://")):
            return HttpRetriever(self.retriever)
        raise ValueError(f'retriever must be "bm25" or an http(s) URL, got {self.retriever!r}')

    def prompt(self, sample: Sample) -> Messages:
        text = PROMPT.format(searches=self.max_turns - 1, question=sample["question"])
        return [{"role": "user", "content": text}]

    def observe(self, sample: Sample, completion: str) -> str | None:
        """Search results for a turn that ends in a search; None after an answer or no search."""
        turn = last_turn(completion)
        query = parse_search(turn)
        if _ANSWER.search(turn) or query is None:
            return None
        return "\n" + self.search(query) + "\n"

    def metrics(self) -> dict[str, float]:
        """Retries and failed searches of an HTTP retriever so far (0 for in-process BM25)."""
        backend = self.search_backend
        return {"search_retries": getattr(backend, "retries", 0), "search_failures": getattr(backend, "failures", 0)}

    def search(self, query: str) -> str:
        """The `<information>` block for one query.

        A retriever that stays down after its retries yields a failed-search observation
        (counted in `search_backend.failures`) instead of ending the training run.
        """
        query = query[:MAX_QUERY_CHARS].strip()
        if not query:
            return "<information>Empty search query.</information>"
        try:
            passages = self.search_backend.search([query], self.top_k)[0]
        except RetrieverError:
            return "<information>Search failed: the retriever is unavailable.</information>"
        return format_information(passages, self.max_observation_words)

    def reward(self, sample: Sample, completion: str) -> RewardResult:
        answer = parse_answer(completion)
        if answer is None:
            return RewardResult(0.0, False, "no answer found")
        if not answer:
            return RewardResult(0.0, False, "empty answer", extracted=answer)
        exact = qa_exact_match(answer, sample["golds"])
        quality = exact if self.metric == "em" else qa_f1(answer, sample["golds"])
        score = (1.0 - self.format_weight) * quality + self.format_weight
        return RewardResult(score, exact == 1.0, _reason(exact, quality), extracted=answer)


def _reason(exact: float, quality: float) -> str:
    if exact == 1.0:
        return "correct"
    return f"partial match (f1={quality:.2f})" if quality > 0 else "wrong answer"


# ---------------------------------------------------------------------------------------
# The generated world

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "kr", "tr", "th", "sh", "qu", "st"]  # fmt: skip
_VOWELS = ["a", "e", "i", "o", "u", "ae", "io", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "x"]
_PROFESSIONS = ["cartographer", "glassblower", "astronomer", "clockmaker", "botanist", "weaver",
                "shipwright", "archivist", "composer", "apothecary", "engraver", "falconer"]  # fmt: skip
_INDUSTRIES = ["shipbuilding", "textiles", "printing", "brewing", "mining", "banking",
               "glassmaking", "bookbinding", "pottery", "tanning"]  # fmt: skip
_ORG_KINDS = ["Guild", "Company", "Institute", "Society", "Foundry", "Press", "Bank", "Academy"]

RELATIONS: dict[str, dict[str, tuple[str, str]]] = {
    "person": {
        "birthplace": ("city", "the birthplace of {}"),
        "employer": ("org", "the employer of {}"),
        "mentor": ("person", "the mentor of {}"),
    },
    "org": {
        "founder": ("person", "the founder of {}"),
        "headquarters": ("city", "the city where {} is headquartered"),
    },
    "city": {},
}
"""kind -> relation -> (kind of the related entity, noun phrase that names it)."""

QUESTIONS: dict[str, dict[str, str]] = {
    "person": {
        "birthplace": "In which city was {} born?",
        "employer": "Which organisation does {} work for?",
        "mentor": "Who was the mentor of {}?",
        "birth_year": "In what year was {} born?",
        "profession": "What is the profession of {}?",
    },
    "org": {
        "founder": "Who founded {}?",
        "headquarters": "In which city is {} headquartered?",
        "founding_year": "In what year was {} founded?",
        "industry": "In which industry does {} work?",
    },
    "city": {
        "country": "In which country is {}?",
        "river": "Which river flows through {}?",
    },
}
"""kind -> fact -> question about the entity named by the noun phrase."""


@dataclass(frozen=True)
class Entity:
    """One person, city or organisation; relation facts hold entity ids, the others text."""

    id: str
    kind: str
    name: str
    facts: dict[str, str]


class _Names:
    """Unique capitalised syllable words: no two entities share a name word."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def word(self, syllables: int) -> str:
        while True:
            word = "".join(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) for _ in range(syllables))
            word = (word + self.rng.choice(_CODAS)).capitalize()
            if word not in self.used:
                self.used.add(word)
                return word


def generate_world(seed: int, n_entities: int) -> dict[str, Entity]:
    """A seeded world: half people, a quarter cities, a quarter organisations, by id."""
    if n_entities < 12:
        raise ValueError(f"n_entities must be >= 12, got {n_entities}")
    rng = random.Random(seed)
    names = _Names(rng)
    n_people, n_cities = n_entities // 2, n_entities // 4
    n_orgs = n_entities - n_people - n_cities
    countries = [names.word(2) for _ in range(max(3, n_cities // 4))]
    rivers = [names.word(2) for _ in range(max(3, n_cities // 3))]
    city_ids = [f"city-{i:04d}" for i in range(n_cities)]
    person_ids = [f"person-{i:04d}" for i in range(n_people)]
    org_ids = [f"org-{i:04d}" for i in range(n_orgs)]
    world = {}
    for cid in city_ids:
        facts = {"country": rng.choice(countries), "river": rng.choice(rivers)}
        world[cid] = Entity(cid, "city", names.word(rng.choice([2, 3])), facts)
    for i, pid in enumerate(person_ids):
        mentor = rng.randrange(n_people - 1)  # anyone but themselves
        facts = {
            "birthplace": rng.choice(city_ids),
            "employer": rng.choice(org_ids),
            "mentor": person_ids[mentor + (mentor >= i)],
            "birth_year": str(rng.randint(1700, 1900)),
            "profession": rng.choice(_PROFESSIONS),
        }
        world[pid] = Entity(pid, "person", f"{names.word(2)} {names.word(rng.choice([2, 3]))}", facts)
    for oid in org_ids:
        facts = {
            "founder": rng.choice(person_ids),
            "headquarters": rng.choice(city_ids),
            "founding_year": str(rng.randint(1750, 1950)),
            "industry": rng.choice(_INDUSTRIES),
        }
        world[oid] = Entity(oid, "org", f"{names.word(2)} {rng.choice(_ORG_KINDS)}", facts)
    return world


def entity_doc(entity: Entity, world: dict[str, Entity]) -> Doc:
    """The entity's page: every fact stated in one sentence that names both ends."""
    n, f = entity.name, entity.facts
    name = {rel: world[f[rel]].name for rel in RELATIONS[entity.kind]}
    if entity.kind == "person":
        text = (f"{n} is a {f['profession']} who was born in {name['birthplace']} in "
                f"{f['birth_year']}. {n} works for {name['employer']}. "
                f"The mentor of {n} was {name['mentor']}.")  # fmt: skip
    elif entity.kind == "org":
        text = (f"{n} is a {f['industry']} organisation founded by {name['founder']} in "
                f"{f['founding_year']}. {n} is headquartered in {name['headquarters']}.")  # fmt: skip
    else:
        text = f"{n} is a city in {f['country']}. The river {f['river']} flows through {n}."
    return Doc(id=entity.id, title=n, text=text)


def make_question(
    world: dict[str, Entity], starts: list[Entity], rng: random.Random, hops: int
) -> Sample | None:
    """A random `hops`-document question, or None when the walk dead-ends or loops."""
    entity = rng.choice(starts)
    chain, phrase = [entity.id], entity.name
    for _ in range(hops - 1):
        if not RELATIONS[entity.kind]:
            return None
        relation = rng.choice(list(RELATIONS[entity.kind]))
        phrase = RELATIONS[entity.kind][relation][1].format(phrase)
        entity = world[entity.facts[relation]]
        chain.append(entity.id)
    fact = rng.choice(list(QUESTIONS[entity.kind]))
    value = entity.facts[fact]
    if fact in RELATIONS[entity.kind]:
        if value in chain:  # "the mentor of the mentor of X" may be X itself
            return None
        value = world[value].name
    if len(set(chain)) < len(chain):
        return None
    question = QUESTIONS[entity.kind][fact].format(phrase)
    return {"question": question, "answer": value, "golds": [value], "chain": chain, "hops": hops}


def generate_questions(
    world: dict[str, Entity], seed: int, n: int, three_hop_fraction: float
) -> list[Sample]:
    """`n` distinct questions, each 3-hop with probability `three_hop_fraction`, else 2-hop."""
    rng = random.Random(f"questions-{seed}")
    questions: dict[str, Sample] = {}
    starts = list(world.values())
    hops = 0
    for _ in range(50 * n):
        if len(questions) == n:
            break
        # Draw the hop count once per question (not per walk), as 3-hop walks fail more often.
        hops = hops or (3 if rng.random() < three_hop_fraction else 2)
        sample = make_question(world, starts, rng, hops)
        if sample is not None and sample["question"] not in questions:
            questions[sample["question"]] = {"id": f"multihop-{seed}-{len(questions)}", **sample}
            hops = 0
    if len(questions) < n:
        raise ValueError(f"only {len(questions)} distinct questions for {n}; raise n_entities")
    return list(questions.values())


@ENVIRONMENTS.register("multihop")
@dataclass
class MultihopEnv(SearchQAEnvironment):
    """2- and 3-hop questions over a generated world; needs nothing but this package."""

    n_entities: int = 300
    """Entities in the world (half people, a quarter cities, a quarter organisations)."""
    three_hop_fraction: float = 0.5
    """Share of 3-hop questions; the rest are 2-hop."""
    n_train: int = 1000
    """Training questions."""
    n_eval: int = 200
    """Held-out questions (generated first, so they do not change with `n_train`)."""

    def _load(self) -> tuple[list[Doc], list[Sample], list[Sample]]:
        world = generate_world(self.seed, self.n_entities)
        questions = generate_questions(world, self.seed, self.n_eval + self.n_train, self.three_hop_fraction)
        docs = [entity_doc(e, world) for e in world.values()]
        return docs, questions[self.n_eval :], questions[: self.n_eval]


# ---------------------------------------------------------------------------------------
# HotpotQA


def load_hotpotqa(path: str | Path) -> tuple[list[Sample], list[Doc]]:
    """Questions and the deduplicated corpus of their context paragraphs from a HotpotQA file.

    A row: `{"_id", "question", "answer", "context": [[title, [sentence, ...]], ...],
    "supporting_facts": [[title, sentence_index], ...], "type", "level"}`. A paragraph
    title seen twice keeps its first text; `chain` lists the supporting titles in file order.
    """
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)
    samples, docs = [], {}
    for row in rows:
        missing = {"_id", "question", "answer", "context", "supporting_facts"} - row.keys()
        if missing:
            raise ValueError(f"{path}: question {row.get('_id', '?')} lacks {sorted(missing)}")
        for title, sentences in row["context"]:
            text = " ".join(s.strip() for s in sentences)
            docs.setdefault(title, Doc(id=title, title=title, text=text))
        chain = list(dict.fromkeys(title for title, _ in row["supporting_facts"]))
        samples.append(_hotpot_sample(row, chain))
    return samples, list(docs.values())


def _hotpot_sample(row: dict[str, Any], chain: list[str]) -> Sample:
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
    """HotpotQA JSON file; None: the shipped 4-question sample."""
    eval_fraction: float = 0.25
    """Share of the (seed-shuffled) questions held out, at least one."""

    def _file(self) -> Path:
        return Path(self.path) if self.path else HOTPOTQA_SAMPLE

    def _load(self) -> tuple[list[Doc], list[Sample], list[Sample]]:
        samples, docs = load_hotpotqa(self._file())
        if len(samples) < 2:
            raise ValueError(f"{self._file()} needs at least 2 questions to split")
        random.Random(self.seed).shuffle(samples)
        n_eval = min(len(samples) - 1, max(1, round(self.eval_fraction * len(samples))))
        return docs, samples[n_eval:], samples[:n_eval]

    def _index_key(self) -> str:
        return "hotpotqa-" + file_sha256(self._file())
