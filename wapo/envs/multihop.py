"""Multi-hop question answering with a search tool (Search-R1's protocol), over a generated world.

The model may write `<search>query</search>`; the environment answers with the top-k
passages of a retriever inside `<information>...</information>`; the model ends with
`<answer>...</answer>`, graded by exact match or token F1 against the gold answers.
One episode of `"multihop"`, as the trainer builds it (model turns end at a stop string,
environment text is masked out of the loss) and as `demonstration()` writes it for `wapo sft`:

    question : Where is the head office of the organisation that employs Odo Vaskir?
    model    : <search>Odo Vaskir</search>
    env      : <information>Doc 1 (Vaskir Odo): Vaskir Odo is a weaver who was born in Lunar ...
               Doc 2 (Odo Vaskir): Odo Vaskir is a clockmaker, born in 1802 in Tarrimon. He is
               employed by Guild of Brintel. He was trained by Lira Sorn.</information>
    model    : <search>Guild of Brintel</search>
    env      : <information>Doc 1 (Brintel Guild): Brintel Guild is a mining organisation ...
               Doc 2 (Guild of Brintel): Guild of Brintel, a printing organisation set up by
               Lira Sorn in 1841, is based in Quessara.</information>
    model    : <answer>Quessara</answer>                      -> EM 1, reason "correct"

Sample keys: `id`, `question`, `answer` (str), `golds` (accepted answers), `chain` (the ids
of the documents that must be read, in order), `hops` (= len(chain)) and `corpus` (the name
of the document collection its searches go to).

What makes the world hard, each an option of `MultihopEnv`:
- `twin_names`: people and organisations come in pairs named with the same words in another
  order ("Odo Vaskir" / "Vaskir Odo", "Vaskir Guild" / "Guild of Vaskir"): a bag-of-words
  retriever ranks both pages alike for either name, so the policy must read the titles;
- `paraphrase`: questions and documents state each relation in several wordings ("founded
  by", "set up by", "established by"), so question words need not occur in the document;
- `three_hop_fraction`: the share of 3-hop questions among 2-hop ones;
- `held_out_world`: held-out questions are about a second world, searched in its own corpus,
  whose entities (and name words) never occur in training questions, demonstrations or the
  training corpus.
`python benchmarks/multihop_retrieval.py` prints how often BM25, given the whole question,
ranks the first-hop document first (recall@1/3/5) for any of these settings.

`wapo/envs/hotpotqa.py` applies the same protocol to HotpotQA files.
"""

from __future__ import annotations

import random
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from wapo.envs.base import ENVIRONMENTS, Environment, Messages, RewardResult, Sample
from wapo.retrieval import (
    BM25Retriever,
    Doc,
    HttpRetriever,
    Retriever,
    RetrieverError,
    SearchTimeout,
    split_passage,
)
from wapo.rewards import qa_exact_match, qa_f1

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

EMPTY_QUERY = "<information>Empty search query.</information>"
SEARCH_FAILED = "<information>Search failed: the retriever is unavailable.</information>"
SEARCH_CAPPED = "<information>Search failed: this step's search time is used up.</information>"

# A tag left open at the very end counts as closed: generators differ on whether the stop
# string that ended the turn (`</search>`, `</answer>`) is kept in the text.
_SEARCH = re.compile(r"<search>(.*?)(?:</search>|\Z)", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)(?:</answer>|\Z)", re.DOTALL)
_INFORMATION = re.compile(r"<information>.*?</information>", re.DOTALL)
_TAG = re.compile(r"<(/?)(search|answer)>")


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


def well_formed(completion: str) -> bool:
    """True when the model's text (observations removed) follows the protocol's tags.

    Every `<search>` and `<answer>` is closed before the next tag opens (a tag still open at
    the very end counts as closed: the stop string may be cut), none is empty, and there is
    exactly one answer: the last tag, with nothing but whitespace after it. Free text between
    tags is allowed (a model may think aloud).

        "<search>A</search> <answer>B</answer>"  -> True
        "<answer>B</answer><search>A</search>"   -> False (the answer is not last)
        "<search><answer>B</answer></search>"    -> False (nested)
    """
    text = _INFORMATION.sub("", completion)
    open_tag, opened_at, answered, end = None, 0, False, 0
    for tag in _TAG.finditer(text):
        closing, name = tag.group(1) == "/", tag.group(2)
        if closing:
            if name != open_tag or not text[opened_at : tag.start()].strip():
                return False
            open_tag, end = None, tag.end()
        else:
            if open_tag is not None or answered:  # nested, or a tag after the answer
                return False
            open_tag, opened_at, answered = name, tag.end(), name == "answer"
    if open_tag is not None:
        return answered and bool(text[opened_at:].strip())
    return answered and not text[end:].strip()


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

MAX_CACHED_INDEXES = 4096
"""In-process BM25 indexes kept at once (one per corpus; per-question corpora are many)."""


@dataclass
class SearchQAEnvironment(Environment):
    """Search-tool QA: the protocol, prompt, searching, grading and demonstrations.

    Subclasses supply `_load()`: named corpora and the train / held-out samples, each sample
    naming its corpus in `sample["corpus"]`. Searches of one turn go out as one batch per
    corpus (`observe_batch`), and a rollout's searches are bounded in time.
    """

    max_turns: int = 4
    """Model turns per episode: up to `max_turns - 1` searches, then the answer."""
    stop_strings: tuple[str, ...] = field(default=("</search>", "</answer>"), init=False)
    final_stop_strings: tuple[str, ...] = field(default=("</answer>",), init=False)
    top_k: int = 3
    """Passages returned per search."""
    metric: str = "em"
    """Answer score: "em" (exact match, 0/1) or "f1" (token F1), SQuAD normalisation."""
    format_weight: float = 0.0
    """Share of the reward for a well-formed episode (`well_formed`: tags closed, one final
    non-empty answer): score = (1-w)·answer + w·format. Both parts are always reported in
    `RewardResult.parts`, so format learning shows apart from answer learning."""
    max_observation_words: int = 200
    """Budget of passage-text words in one `<information>` block."""
    retriever: str = "bm25"
    """"bm25" (in process, over this environment's corpora) or the URL of a retrieval server
    (it serves one corpus for every question: write `env.docs` to it)."""
    search_time_s: float = 60.0
    """Longest time one rollout spends searching, all turns together: each turn's batch gets
    search_time_s / (max_turns - 1); rows still unsearched when it is spent get a failed-search
    observation, counted as `search_capped`."""
    search_batch_size: int = 64
    """Queries per retriever request (the server's `max_queries` must allow it)."""

    def __post_init__(self) -> None:
        self._check_options()
        self.corpora, self._train, self._eval = self._load()
        self._indexes: OrderedDict[str, Retriever] = OrderedDict()
        self._by_id: dict[str, dict[str, Doc]] = {}
        self._server = self._connect()
        self.counters = {"searches": 0, "search_failures": 0, "search_capped": 0}

    def _check_options(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; known: {', '.join(METRICS)}")
        if self.max_turns < 2:
            raise ValueError(f"max_turns must be >= 2 (a search and an answer), got {self.max_turns}")
        if self.top_k < 1 or self.max_observation_words < 1 or self.search_batch_size < 1:
            raise ValueError("top_k, max_observation_words and search_batch_size must be >= 1")
        if not 0.0 <= self.format_weight <= 1.0:
            raise ValueError(f"format_weight must be in [0, 1], got {self.format_weight}")
        if not self.search_time_s > 0:
            raise ValueError(f"search_time_s must be > 0, got {self.search_time_s}")
        if self.retriever != "bm25" and not self.retriever.startswith(("http://", "https://")):
            raise ValueError(f'retriever must be "bm25" or an http(s) URL, got {self.retriever!r}')

    def _load(self) -> tuple[dict[str, list[Doc]], list[Sample], list[Sample]]:
        """(corpora by name, train samples, held-out samples)."""
        raise NotImplementedError

    def _index_key(self, corpus: str) -> str | None:
        """Key of the on-disk BM25 cache of `corpus`, or None to index it in memory."""
        return None

    def _connect(self) -> Retriever | None:
        """The retrieval server's client (checked now, before any training), or None for BM25."""
        return None if self.retriever == "bm25" else HttpRetriever(self.retriever)

    @property
    def docs(self) -> list[Doc]:
        """Every document of every corpus, each id once (e.g. to serve them over HTTP)."""
        unique = {doc.id: doc for docs in self.corpora.values() for doc in docs}
        return list(unique.values())

    def backend(self, corpus: str) -> Retriever:
        """The retriever that searches `corpus`: the server, or an in-process BM25 index."""
        if self._server is not None:
            return self._server
        if corpus not in self._indexes:
            self._indexes[corpus] = BM25Retriever(self.corpora[corpus], cache_key=self._index_key(corpus))
            if len(self._indexes) > MAX_CACHED_INDEXES:
                self._indexes.popitem(last=False)
        self._indexes.move_to_end(corpus)
        return self._indexes[corpus]

    def _documents(self, corpus: str) -> dict[str, Doc]:
        """The documents of `corpus` by id (built once per corpus)."""
        if corpus not in self._by_id:
            self._by_id[corpus] = {doc.id: doc for doc in self.corpora[corpus]}
        return self._by_id[corpus]

    def prompt(self, sample: Sample) -> Messages:
        text = PROMPT.format(searches=self.max_turns - 1, question=sample["question"])
        return [{"role": "user", "content": text}]

    def observe(self, sample: Sample, completion: str) -> str | None:
        """Search results for a turn that ends in a search; None after an answer or no search."""
        return self.observe_batch([sample], [completion])[0]

    def observe_batch(self, samples: list[Sample], completions: list[str]) -> list[str | None]:
        """One reply per row: `"\\n<information>...</information>\\n"`, or None (no search).

        The queries of all rows go to the retriever in batches of `search_batch_size`, one
        corpus at a time, within this turn's share of `search_time_s`.
        """
        replies: list[str | None] = [None] * len(samples)
        pending: dict[str, list[tuple[int, str]]] = {}
        for row, (sample, completion) in enumerate(zip(samples, completions, strict=True)):
            turn = last_turn(completion)
            query = parse_search(turn)
            if _ANSWER.search(turn) or query is None:
                continue
            query = query[:MAX_QUERY_CHARS].strip()
            if query:
                pending.setdefault(sample["corpus"], []).append((row, query))
            else:
                replies[row] = "\n" + EMPTY_QUERY + "\n"
        deadline = time.monotonic() + self.search_time_s / (self.max_turns - 1)
        for corpus, items in pending.items():
            for start in range(0, len(items), self.search_batch_size):
                chunk = items[start : start + self.search_batch_size]
                blocks = self._search(corpus, [query for _, query in chunk], deadline)
                for (row, _), block in zip(chunk, blocks):
                    replies[row] = "\n" + block + "\n"
        return replies

    def _search(self, corpus: str, queries: list[str], deadline: float) -> list[str]:
        """`<information>` blocks for `queries`; failed-search blocks past the deadline or when
        the retriever stays down after its retries (counted, the run goes on)."""
        if time.monotonic() >= deadline:
            self.counters["search_capped"] += len(queries)
            return [SEARCH_CAPPED] * len(queries)
        try:
            results = self.backend(corpus).search(queries, self.top_k, deadline=deadline)
        except SearchTimeout:
            self.counters["search_capped"] += len(queries)
            return [SEARCH_CAPPED] * len(queries)
        except RetrieverError:
            self.counters["search_failures"] += len(queries)
            return [SEARCH_FAILED] * len(queries)
        self.counters["searches"] += len(queries)
        return [format_information(passages, self.max_observation_words) for passages in results]

    def metrics(self) -> dict[str, float]:
        """Running counts: queries answered, rows whose search failed (retriever down) or was
        capped (time budget spent), and the HTTP retriever's retried requests."""
        return {**self.counters, "search_retries": getattr(self._server, "retries", 0)}

    def reward(self, sample: Sample, completion: str) -> RewardResult:
        form = float(well_formed(completion))
        answer = parse_answer(completion)
        if answer is None or not answer:
            reason = "no answer found" if answer is None else "empty answer"
            return RewardResult(0.0, False, reason, extracted=answer, parts={"answer": 0.0, "format": form})
        exact = qa_exact_match(answer, sample["golds"])
        quality = exact if self.metric == "em" else qa_f1(answer, sample["golds"])
        score = (1.0 - self.format_weight) * quality + self.format_weight * form
        return RewardResult(score, exact == 1.0, _reason(exact, quality), extracted=answer,
                            parts={"answer": quality, "format": form})

    def demonstration(self, sample: Sample) -> list[str] | None:
        """Search each document of the chain by its title, then answer with the gold answer.

        None when the chain needs more searches than `max_turns - 1` allows, or when a title
        search does not bring its document into the top `top_k` (a demonstration must show
        the evidence it answers from).
        """
        by_id = self._documents(sample["corpus"])
        if len(sample["chain"]) > self.max_turns - 1 or any(i not in by_id for i in sample["chain"]):
            return None
        titles = [by_id[i].title for i in sample["chain"]]
        results = self.backend(sample["corpus"]).search(titles, self.top_k)
        if any(title not in [split_passage(p)[0] for p in passages] for title, passages in zip(titles, results)):
            return None
        return [f"<search>{title}</search>" for title in titles] + [f"<answer>{sample['answer']}</answer>"]


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

RELATIONS: dict[str, dict[str, tuple[str, tuple[str, ...]]]] = {
    "person": {
        "birthplace": ("city", ("the birthplace of {}", "the city where {} was born", "the home town of {}")),
        "employer": ("org", ("the employer of {}", "the organisation that employs {}",
                             "the organisation {} works for")),
        "mentor": ("person", ("the mentor of {}", "the person who trained {}", "the teacher of {}")),
    },
    "org": {
        "founder": ("person", ("the founder of {}", "the person who set up {}", "the person who established {}")),
        "headquarters": ("city", ("the city where {} is headquartered", "the home city of {}",
                                  "the city where {} is based")),
    },
    "city": {},
}
"""kind -> relation -> (kind of the related entity, noun phrases that name it; the first is
the plain wording, the others paraphrases)."""

QUESTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "person": {
        "birthplace": ("In which city was {} born?", "Where was {} born?", "What is the home town of {}?"),
        "employer": ("Which organisation does {} work for?", "Who employs {}?", "Where does {} work?"),
        "mentor": ("Who was the mentor of {}?", "Who trained {}?", "Under whom did {} study?"),
        "birth_year": ("In what year was {} born?", "When was {} born?"),
        "profession": ("What is the profession of {}?", "What does {} do for a living?"),
    },
    "org": {
        "founder": ("Who founded {}?", "Who set up {}?", "Who established {}?"),
        "headquarters": ("In which city is {} headquartered?", "Where is {} based?",
                         "Where is the head office of {}?"),
        "founding_year": ("In what year was {} founded?", "When was {} established?"),
        "industry": ("In which industry does {} work?", "What business is {} in?"),
    },
    "city": {
        "country": ("In which country is {}?", "Which country is {} in?"),
        "river": ("Which river flows through {}?", "On which river does {} lie?"),
    },
}
"""kind -> fact -> questions about the entity named by the noun phrase (first: plain)."""

DOC_SENTENCES: dict[str, tuple[str, ...]] = {
    "person": (
        "{n} is a {profession} who was born in {birthplace} in {birth_year}. {n} works for {employer}. "
        "The mentor of {n} was {mentor}.",
        "{n} is a {profession}, born in {birth_year} in {birthplace}. {He} is employed by {employer}. "
        "{He} was trained by {mentor}.",
        "Born in {birthplace} in {birth_year}, {n} became a {profession}. {He} studied under {mentor} "
        "and is on the staff of {employer}.",
    ),
    "org": (
        "{n} is a {industry} organisation founded by {founder} in {founding_year}. "
        "{n} is headquartered in {headquarters}.",
        "{n}, a {industry} organisation set up by {founder} in {founding_year}, is based in {headquarters}.",
        "{founder} established {n} in {founding_year}. It works in {industry} and has its head office "
        "in {headquarters}.",
    ),
    "city": (
        "{n} is a city in {country}. The river {river} flows through {n}.",
        "{n} is a city of {country} on the river {river}.",
        "The river {river} runs through {n}, a city in {country}.",
    ),
}
"""kind -> the entity's page; the first wording states every fact with the entity's name,
the paraphrases name it once and use a pronoun after (its page matches its name less)."""


@dataclass(frozen=True)
class Entity:
    """One person, city or organisation; relation facts hold entity ids, the others text."""

    id: str
    kind: str
    name: str
    facts: dict[str, str]
    style: int = 0
    """Index of the page's wording in `DOC_SENTENCES[kind]`."""
    pronoun: str = "It"


class _Names:
    """Capitalised syllable words, each new one unused by any earlier entity (of any world)."""

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


def generate_world(seed: int, n_entities: int, *, twin_names: float = 0.0, paraphrase: bool = False,
                   names: _Names | None = None, prefix: str = "") -> dict[str, Entity]:
    """A seeded world: half people, a quarter cities, a quarter organisations, by id.

    `twin_names` is the chance that a new person or organisation is named with the words of
    an earlier one in another order ("Odo Vaskir" and "Vaskir Odo", "Vaskir Guild" and
    "Guild of Vaskir"): a bag-of-words retriever ranks the two pages alike for either name,
    so the policy has to read the titles. Every other name word is new. With `paraphrase`,
    each page uses one of the wordings of `DOC_SENTENCES` (else the first). `names` shares
    the word generator between worlds, so two worlds built with it share no name word;
    `prefix` starts every entity id.
    """
    if n_entities < 12:
        raise ValueError(f"n_entities must be >= 12, got {n_entities}")
    if not 0.0 <= twin_names <= 1.0:
        raise ValueError(f"twin_names must be in [0, 1], got {twin_names}")
    rng = random.Random(f"world-{seed}-{prefix}")
    names = names or _Names(rng)
    n_people, n_cities = n_entities // 2, n_entities // 4
    n_orgs = n_entities - n_people - n_cities
    countries = [names.word(2) for _ in range(max(3, n_cities // 4))]
    rivers = [names.word(2) for _ in range(max(3, n_cities // 3))]
    city_ids = [f"{prefix}city-{i:04d}" for i in range(n_cities)]
    person_ids = [f"{prefix}person-{i:04d}" for i in range(n_people)]
    org_ids = [f"{prefix}org-{i:04d}" for i in range(n_orgs)]
    style = (lambda: rng.randrange(3)) if paraphrase else (lambda: 0)
    world: dict[str, Entity] = {}
    for cid in city_ids:
        facts = {"country": rng.choice(countries), "river": rng.choice(rivers)}
        world[cid] = Entity(cid, "city", names.word(rng.choice([2, 3])), facts, style())

    def named(count: int, fresh, twin_of) -> list[str]:
        """`count` names: fresh ones, each followed by its twin with probability `twin_names`."""
        out: list[str] = []
        while len(out) < count:
            out.append(fresh())
            if len(out) < count and rng.random() < twin_names:
                out.append(twin_of(out[-1]))
        return out

    people = named(n_people, lambda: f"{names.word(2)} {names.word(rng.choice([2, 3]))}",
                   lambda name: " ".join(reversed(name.split())))
    for i, (pid, name) in enumerate(zip(person_ids, people)):
        mentor = rng.randrange(n_people - 1)  # anyone but themselves
        facts = {
            "birthplace": rng.choice(city_ids),
            "employer": rng.choice(org_ids),
            "mentor": person_ids[mentor + (mentor >= i)],
            "birth_year": str(rng.randint(1700, 1900)),
            "profession": rng.choice(_PROFESSIONS),
        }
        world[pid] = Entity(pid, "person", name, facts, style(), rng.choice(["He", "She"]))
    orgs = named(n_orgs, lambda: f"{names.word(2)} {rng.choice(_ORG_KINDS)}",
                 lambda name: "{1} of {0}".format(*name.split()))
    for oid, name in zip(org_ids, orgs):
        facts = {
            "founder": rng.choice(person_ids),
            "headquarters": rng.choice(city_ids),
            "founding_year": str(rng.randint(1750, 1950)),
            "industry": rng.choice(_INDUSTRIES),
        }
        world[oid] = Entity(oid, "org", name, facts, style())
    return world


def entity_doc(entity: Entity, world: dict[str, Entity]) -> Doc:
    """The entity's page: every fact stated once, in the entity's wording (`Entity.style`)."""
    values = {key: world[value].name if key in RELATIONS[entity.kind] else value
              for key, value in entity.facts.items()}
    template = DOC_SENTENCES[entity.kind][entity.style]
    text = template.format(n=entity.name, He=entity.pronoun, **values)
    return Doc(id=entity.id, title=entity.name, text=re.sub(r"\ba ([aeiou])", r"an \1", text))


def make_question(world: dict[str, Entity], starts: list[Entity], rng: random.Random, hops: int,
                  paraphrase: bool = False) -> Sample | None:
    """A random `hops`-document question, or None when the walk dead-ends or loops."""
    pick = rng.choice if paraphrase else (lambda options: options[0])
    entity = rng.choice(starts)
    chain, phrase = [entity.id], entity.name
    for _ in range(hops - 1):
        if not RELATIONS[entity.kind]:
            return None
        relation = rng.choice(list(RELATIONS[entity.kind]))
        phrase = pick(RELATIONS[entity.kind][relation][1]).format(phrase)
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
    question = pick(QUESTIONS[entity.kind][fact]).format(phrase)
    return {"question": question, "answer": value, "golds": [value], "chain": chain, "hops": hops}


def generate_questions(world: dict[str, Entity], seed: int, n: int, three_hop_fraction: float, *,
                       paraphrase: bool = False, name: str = "") -> list[Sample]:
    """`n` distinct questions, each 3-hop with probability `three_hop_fraction`, else 2-hop."""
    rng = random.Random(f"questions-{seed}{name}")
    questions: dict[str, Sample] = {}
    starts = list(world.values())
    hops = 0
    for _ in range(50 * n):
        if len(questions) == n:
            break
        # Draw the hop count once per question (not per walk), as 3-hop walks fail more often.
        hops = hops or (3 if rng.random() < three_hop_fraction else 2)
        sample = make_question(world, starts, rng, hops, paraphrase)
        if sample is not None and sample["question"] not in questions:
            questions[sample["question"]] = {"id": f"multihop-{seed}{name}-{len(questions)}", **sample}
            hops = 0
    if len(questions) < n:
        raise ValueError(f"only {len(questions)} distinct questions for {n}; raise n_entities")
    return list(questions.values())


@ENVIRONMENTS.register("multihop")
@dataclass
class MultihopEnv(SearchQAEnvironment):
    """2- and 3-hop questions over a generated world; needs nothing but this package.

    With the defaults BM25, given the whole question, ranks the first document first for
    63% of the questions and within the top 3 for 98% (benchmarks/multihop_retrieval.py,
    seeds 0-2): the policy must learn what to search for and which result to read.
    """

    n_entities: int = 300
    """Entities in each world (half people, a quarter cities, a quarter organisations)."""
    three_hop_fraction: float = 0.5
    """Share of 3-hop questions; the rest are 2-hop."""
    twin_names: float = 0.5
    """Chance that a new person or organisation gets a twin named with its words in another
    order (0: every name word unique)."""
    paraphrase: bool = True
    """Questions and pages use varied wordings of each relation (False: one wording each)."""
    held_out_world: bool = True
    """Held-out questions ask about a second world with its own corpus and names (False:
    about the training world, other questions only)."""
    n_train: int = 1000
    """Training questions."""
    n_eval: int = 200
    """Held-out questions (generated first, so they do not change with `n_train`)."""

    def _load(self) -> tuple[dict[str, list[Doc]], list[Sample], list[Sample]]:
        if not 0.0 <= self.three_hop_fraction <= 1.0:
            raise ValueError(f"three_hop_fraction must be in [0, 1], got {self.three_hop_fraction}")
        names = _Names(random.Random(f"names-{self.seed}"))
        options = dict(twin_names=self.twin_names, paraphrase=self.paraphrase, names=names)
        # The held-out world is built first, so it does not change with n_train either.
        held_out = generate_world(self.seed, self.n_entities, prefix="heldout-", **options) \
            if self.held_out_world else None
        world = generate_world(self.seed, self.n_entities, **options)
        ask = dict(three_hop_fraction=self.three_hop_fraction, paraphrase=self.paraphrase)
        if held_out is None:
            questions = generate_questions(world, self.seed, self.n_eval + self.n_train, **ask)
            train, held = questions[self.n_eval :], questions[: self.n_eval]
            corpora = {"world": [entity_doc(e, world) for e in world.values()]}
            return corpora, _in(train, "world"), _in(held, "world")
        held = generate_questions(held_out, self.seed, self.n_eval, **ask, name="-heldout")
        train = generate_questions(world, self.seed, self.n_train, **ask)
        corpora = {"train": [entity_doc(e, world) for e in world.values()],
                   "heldout": [entity_doc(e, held_out) for e in held_out.values()]}
        return corpora, _in(train, "train"), _in(held, "heldout")


def _in(samples: list[Sample], corpus: str) -> list[Sample]:
    return [{**sample, "corpus": corpus} for sample in samples]
