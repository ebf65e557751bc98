"""Multi-hop search QA: the generated world and its difficulty options, HotpotQA as published,
the multi-turn protocol, batched and time-capped search, the reward and its format part."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

import wapo.sampling as sampling
from wapo.envs.base import ENVIRONMENTS, RewardResult
from wapo.envs.hotpotqa import HOTPOTQA_SAMPLE, HotpotQAEnv, load_hotpotqa
from wapo.envs.multihop import (
    SEARCH_CAPPED,
    SEARCH_FAILED,
    QUESTIONS,
    MultihopEnv,
    format_information,
    last_turn,
    parse_answer,
    parse_search,
    well_formed,
)
from wapo.retrieval import RetrieverError
from wapo.sampling import Generation, rollout


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep index caches out of the home directory."""
    monkeypatch.setenv("WAPO_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def world() -> MultihopEnv:
    return MultihopEnv(seed=0)


def doc_of(env: MultihopEnv, sample: dict, index: int):
    return env._documents(sample["corpus"])[sample["chain"][index]]


def name_words(env: MultihopEnv, corpus: str) -> set[str]:
    """Every word of every entity name in `corpus` ("of" and organisation kinds aside)."""
    kinds = {"of", "Guild", "Company", "Institute", "Society", "Foundry", "Press", "Bank", "Academy"}
    return {word for doc in env.corpora[corpus] for word in doc.title.split()} - kinds


# --- HotpotQA ------------------------------------------------------------------------

PUBLISHED = [  # two rows as hotpot_dev_distractor_v1.json holds them (sentences keep their space)
    {"_id": "5a8b57f25542995d1e6f1371", "question": "Were Scott Derrickson and Ed Wood of the same nationality?",
     "answer": "yes", "type": "comparison", "level": "hard",
     "supporting_facts": [["Scott Derrickson", 0], ["Ed Wood", 0]],
     "context": [["Ed Wood (film)", ["Ed Wood is a 1994 American biographical film.", " It stars Johnny Depp."]],
                 ["Scott Derrickson", ["Scott Derrickson is an American director.", " He lives in Los Angeles."]],
                 ["Ed Wood", ["Edward Davis Wood Jr. was an American filmmaker."]]]},
    {"_id": "5a8c7595554299585d9e36b6", "question": "What government position was held by the woman who "
     "portrayed Corliss Archer in the film Kiss and Tell?", "answer": "Chief of Protocol", "type": "bridge",
     "level": "medium", "supporting_facts": [["Kiss and Tell (1945 film)", 0], ["Shirley Temple", 0],
                                             ["Shirley Temple", 1]],
     "context": [["Kiss and Tell (1945 film)", ["Kiss and Tell is a 1945 film starring Shirley Temple as "
                                                "Corliss Archer."]],
                 ["Shirley Temple", ["Shirley Temple Black was an American actress.",
                                     " She served as Chief of Protocol of the United States."]],
                 ["Meet Corliss Archer", ["Meet Corliss Archer is a radio sitcom."]]]},
]


@pytest.fixture
def published(tmp_path: Path) -> Path:
    path = tmp_path / "hotpot_dev_distractor_v1.json"
    path.write_text(json.dumps(PUBLISHED))
    return path


def test_load_hotpotqa_reads_the_published_format(published: Path) -> None:
    samples, contexts = load_hotpotqa(published)
    first, second = samples
    assert (first["id"], first["golds"], first["type"], first["level"]) == (
        "5a8b57f25542995d1e6f1371", ["yes"], "comparison", "hard")
    assert first["chain"] == ["Scott Derrickson", "Ed Wood"] and first["hops"] == 2
    assert second["chain"] == ["Kiss and Tell (1945 film)", "Shirley Temple"]  # each title once
    shirley = contexts[second["id"]][1]
    # sentences carry their own leading space; stripped, then joined by one
    assert (shirley.id, shirley.title) == ("Shirley Temple", "Shirley Temple")
    assert shirley.text == ("Shirley Temple Black was an American actress. "
                            "She served as Chief of Protocol of the United States.")
    assert [d.title for d in contexts[first["id"]]] == ["Ed Wood (film)", "Scott Derrickson", "Ed Wood"]


def test_load_hotpotqa_sample() -> None:
    samples, contexts = load_hotpotqa(HOTPOTQA_SAMPLE)
    assert [s["id"] for s in samples] == [f"wapo-sample-{i}" for i in range(1, 5)]
    assert sum(map(len, contexts.values())) == 12
    assert samples[0]["chain"] == ["Saltmere Lighthouse", "Idris Pellow"]


def test_load_hotpotqa_names_the_incomplete_question(tmp_path: Path) -> None:
    path = tmp_path / "hotpot_test_fullwiki_v1.json"  # the test files have no answers
    path.write_text(json.dumps([{"_id": "q9", "question": "?", "context": []}]))
    with pytest.raises(ValueError, match=r"question q9 lacks \['answer', 'supporting_facts'\].*use train or dev"):
        load_hotpotqa(path)


def test_hotpotqa_holds_out_part_of_one_file() -> None:
    env = ENVIRONMENTS["hotpotqa"](seed=3)
    train, held_out = {s["id"] for s in env.train_set()}, {s["id"] for s in env.eval_set()}
    assert len(held_out) == 1  # round(0.25 * 4)
    assert not train & held_out and len(train | held_out) == 4
    sample = next(s for s in env.train_set() + env.eval_set() if s["id"] == "wapo-sample-3")
    observation = env.observe(sample, "<search>Vennick Choir founder</search>")
    assert observation.startswith("\n<information>Doc 1 (Vennick Choir): The Vennick Choir is")


def test_hotpotqa_corpus_per_question_or_pooled(published: Path, tmp_path: Path) -> None:
    dev = tmp_path / "dev.json"
    dev.write_text(json.dumps(PUBLISHED[1:]))
    train = tmp_path / "train.json"
    train.write_text(json.dumps(PUBLISHED[:1]))
    own = HotpotQAEnv(path=str(train), eval_path=str(dev))
    (sample,) = own.train_set()
    assert [s["id"] for s in own.eval_set()] == [PUBLISHED[1]["_id"]]
    assert sorted(own.corpora) == sorted(p["_id"] for p in PUBLISHED)
    # per question: only its own three paragraphs can come back
    info = own.observe(sample, "<search>Shirley Temple Corliss Archer</search>")
    assert "Shirley" not in info and "Corliss" not in info and info.count("Doc ") <= 3
    pooled = HotpotQAEnv(path=str(train), eval_path=str(dev), corpus="pooled")
    assert sorted(pooled.corpora) == ["heldout", "train"]
    # pooled per split: the training corpus holds no held-out paragraph
    assert {d.title for d in pooled.corpora["train"]} == {"Ed Wood (film)", "Scott Derrickson", "Ed Wood"}
    (held,) = pooled.eval_set()
    assert pooled.observe(held, "<search>Shirley Temple</search>").startswith("\n<information>Doc 1 (Shirley Temple)")
    with pytest.raises(ValueError, match="corpus must be one of question, pooled"):
        HotpotQAEnv(path=str(train), corpus="wiki")


def test_hotpotqa_demonstrations_search_the_supporting_titles(published: Path) -> None:
    env = HotpotQAEnv(path=str(published), eval_fraction=0.5, seed=0)
    by_id = {s["id"]: s for s in env.train_set() + env.eval_set()}
    bridge = by_id["5a8c7595554299585d9e36b6"]
    assert env.demonstration(bridge) == ["<search>Kiss and Tell (1945 film)</search>",
                                         "<search>Shirley Temple</search>", "<answer>Chief of Protocol</answer>"]
    # a supporting title the corpus lacks (as in fullwiki files) leaves no demonstration
    assert env.demonstration({**bridge, "chain": ["Kiss and Tell (1945 film)", "Temple Black"]}) is None


# --- the generated world -------------------------------------------------------------


def test_every_question_is_answerable_by_following_its_chain(world: MultihopEnv) -> None:
    for sample in world.train_set() + world.eval_set():
        chain = [doc_of(world, sample, i) for i in range(sample["hops"])]
        assert len(chain) == sample["hops"] in (2, 3)
        assert chain[0].title in sample["question"]
        for previous, doc in zip(chain, chain[1:]):
            assert doc.title in previous.text, (sample, previous, doc)
        assert sample["answer"] in chain[-1].text, sample
        assert sample["golds"] == [sample["answer"]]


def test_world_is_seeded_and_the_held_out_world_shares_no_name(world: MultihopEnv) -> None:
    train = {s["question"] for s in world.train_set()}
    held_out = {s["question"] for s in world.eval_set()}
    assert (len(train), len(held_out)) == (1000, 200) and not train & held_out
    assert {s["corpus"] for s in world.train_set()} == {"train"}
    assert {s["corpus"] for s in world.eval_set()} == {"heldout"}
    assert len(world.corpora["train"]) == len(world.corpora["heldout"]) == 300
    # No name word of the held-out world occurs in the training world's pages or questions.
    held_words = name_words(world, "heldout")
    train_text = " ".join([f"{d.title} {d.text}" for d in world.corpora["train"]] + sorted(train))
    assert len(held_words) > 200 and not held_words & set(train_text.replace("?", " ").replace(",", " ").split())
    again = MultihopEnv(seed=0, n_train=10)
    assert again.eval_set() == world.eval_set() and again.corpora == world.corpora  # independent of n_train
    assert MultihopEnv(seed=1, n_train=10).eval_set() != world.eval_set()


def test_without_a_held_out_world_both_splits_search_one_world() -> None:
    env = MultihopEnv(held_out_world=False, n_train=30, n_eval=10)
    assert list(env.corpora) == ["world"]
    assert {s["corpus"] for s in env.train_set() + env.eval_set()} == {"world"}
    assert not {s["question"] for s in env.train_set()} & {s["question"] for s in env.eval_set()}


def test_hop_mix_follows_the_option() -> None:
    only_two = MultihopEnv(three_hop_fraction=0.0, n_train=50, n_eval=10)
    only_three = MultihopEnv(three_hop_fraction=1.0, n_train=50, n_eval=10)
    assert {s["hops"] for s in only_two.train_set()} == {2}
    assert {s["hops"] for s in only_three.train_set()} == {3}


def test_twin_names_pair_entities_with_the_same_words() -> None:
    def word_sets(env: MultihopEnv) -> list[frozenset[str]]:
        return [frozenset(d.title.split()) - {"of"} for d in env.corpora["train"] if not d.id.startswith("city")]

    twins = word_sets(MultihopEnv(twin_names=1.0, n_train=10, n_eval=10))
    # 150 people and 75 organisations, each named with its twin's words: every set twice
    assert len(twins) == 225 and all(twins.count(s) == 2 for s in twins[:-1])
    env = MultihopEnv(twin_names=1.0, n_train=10, n_eval=10)
    titles = [d.title for d in env.corpora["train"]]
    assert titles[75:77] == [" ".join(reversed(titles[76].split())), titles[76]]  # Odo Vaskir / Vaskir Odo
    unique = word_sets(MultihopEnv(twin_names=0.0, n_train=10, n_eval=10))
    assert len(set(unique)) == len(unique)


def test_paraphrase_varies_questions_and_pages() -> None:
    plain = MultihopEnv(paraphrase=False, n_train=200, n_eval=10)
    varied = MultihopEnv(paraphrase=True, n_train=200, n_eval=10)
    first_wordings = [re.escape(facts[fact][0]).replace(r"\{\}", ".+")
                      for facts in QUESTIONS.values() for fact in facts]
    plain_form = re.compile("|".join(first_wordings))
    assert all(plain_form.fullmatch(s["question"]) for s in plain.train_set())
    assert sum(not plain_form.fullmatch(s["question"]) for s in varied.train_set()) > 100
    # person -> person is the mentor relation, in its plain wording only
    mentored = [s for s in plain.train_set() if all(i.startswith("person") for i in s["chain"][:2])]
    assert mentored and all("the mentor of" in s["question"] for s in mentored)
    assert not any("set up by" in d.text for d in plain.corpora["train"])
    assert any("set up by" in d.text for d in varied.corpora["train"])
    assert not any(" a a" in d.text or " a e" in d.text for d in varied.docs)  # "an apothecary"


def first_hop_recall(env: MultihopEnv, k: int) -> float:
    questions = env.eval_set()
    hits = env.backend("heldout").search_docs([q["question"] for q in questions], top_k=k)
    return sum(q["chain"][0] in [doc.id for doc, _ in h] for q, h in zip(questions, hits)) / len(questions)


def test_bm25_recall_of_the_first_hop_document_is_set_by_the_options() -> None:
    # The whole question as the query (benchmarks/multihop_retrieval.py prints the table).
    # Measured, seed 0, 200 held-out questions: the default world 0.55 at rank 1 and 0.985 in
    # the top 3 (twins are a coin flip for BM25, and both come back); without twins or
    # paraphrases 1.0 and 1.0. The bounds leave room for another seed.
    default = MultihopEnv(n_train=10)
    assert 0.4 <= first_hop_recall(default, 1) <= 0.7 and first_hop_recall(default, 3) >= 0.95
    easy = MultihopEnv(n_train=10, twin_names=0.0, paraphrase=False)
    assert first_hop_recall(easy, 1) >= 0.95


# --- the multi-turn protocol ---------------------------------------------------------


def test_options_and_registration() -> None:
    env = ENVIRONMENTS["multihop"](max_turns=3, top_k=2, n_train=5, n_eval=5)
    assert isinstance(env, MultihopEnv)
    assert env.max_turns == 3 and env.stop_strings == ("</search>", "</answer>")
    content = env.prompt(env.eval_set()[0])[0]["content"]
    assert "Search at most 2 times" in content and content.endswith(env.eval_set()[0]["question"])


@pytest.mark.parametrize(
    "options, message",
    [
        ({"metric": "bleu"}, "unknown metric 'bleu'; known: em, f1"),
        ({"max_turns": 1}, "max_turns must be >= 2"),
        ({"retriever": "faiss"}, 'retriever must be "bm25" or an http'),
        ({"format_weight": 1.5}, "format_weight must be in"),
        ({"search_time_s": 0}, "search_time_s must be > 0"),
        ({"twin_names": 1.5}, r"twin_names must be in \[0, 1\]"),
        ({"three_hop_fraction": -0.1}, "three_hop_fraction must be in"),
    ],
)
def test_bad_options_fail_with_a_clear_message(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MultihopEnv(n_train=5, n_eval=5, **options)


@pytest.mark.parametrize(
    "completion, search, answer",
    [
        ("I will look. <search> Odo Sarn </search>", "Odo Sarn", None),
        ("<search>Odo Sarn", "Odo Sarn", None),  # stop string not kept by the generator
        ("<search>a</search>\n<information>Doc 1 (A): x</information>\n<answer>Tarrin</answer>", None, "Tarrin"),
        ("<answer>Odo</answer> then <answer>Tarrin", None, "Tarrin"),
        ("<search>a</search>\n<information>Doc 1: <answer>Tarrin</answer></information>\n", None, None),
        ("no tags at all", None, None),
    ],
)
def test_parsing(completion: str, search: str | None, answer: str | None) -> None:
    assert parse_search(last_turn(completion)) == search
    assert parse_answer(completion) == answer


def test_observe_answers_searches_and_stops_after_an_answer(world: MultihopEnv) -> None:
    sample = next(s for s in world.eval_set() if s["hops"] == 2)
    first, second = doc_of(world, sample, 0), doc_of(world, sample, 1)
    turn1 = f"<search>{first.title}</search>"
    info1 = world.observe(sample, turn1)
    assert info1.startswith("\n<information>Doc 1 (") and f"({first.title}): {first.text}" in info1
    assert info1.endswith("</information>\n") and info1.count("\nDoc ") == world.top_k - 1
    turn2 = turn1 + info1 + f"<search>{second.title}</search>"
    assert f"({second.title}): {second.text}" in world.observe(sample, turn2)
    assert world.observe(sample, turn2 + "\n<information>...</information>\n<answer>x</answer>") is None
    assert world.observe(sample, turn1 + info1 + "I give up.") is None  # a turn without a search
    assert world.observe(sample, "<search>  </search>") == "\n<information>Empty search query.</information>\n"
    assert world.observe(sample, "<search>qqqq zzzz</search>") == "\n<information>No results.</information>\n"


def test_held_out_questions_search_only_the_held_out_world(world: MultihopEnv) -> None:
    train_sample, held_sample = world.train_set()[0], world.eval_set()[0]
    train_title = doc_of(world, train_sample, 0).title
    assert train_title in world.observe(train_sample, f"<search>{train_title}</search>")
    assert train_title not in world.observe(held_sample, f"<search>{train_title}</search>")


def test_format_information_truncates_to_the_word_budget() -> None:
    passages = ['"A"\none two three', '"B"\nfour five', '"C"\nsix']
    # budget 4: A keeps its 3 words, B is cut after 1 word, C is dropped.
    assert format_information(passages, 4) == "<information>Doc 1 (A): one two three\nDoc 2 (B): four ...</information>"
    assert format_information(passages, 2) == "<information>Doc 1 (A): one two ...</information>"
    assert format_information(["untitled text"], 9) == "<information>Doc 1: untitled text</information>"


# --- batched, time-capped search ----------------------------------------------------


class Recording:
    """A backend that answers every query with one passage after `delay_s`, recording calls."""

    def __init__(self, delay_s: float = 0.0, fail: bool = False):
        self.calls: list[list[str]] = []
        self.delay_s, self.fail = delay_s, fail

    def search(self, queries: list[str], top_k: int, *, deadline: float | None = None) -> list[list[str]]:
        self.calls.append(list(queries))
        time.sleep(self.delay_s)
        if self.fail:
            raise RetrieverError("gave up after retries")
        return [[f'"{q}"\nfound'] for q in queries]


def test_observe_batch_sends_one_request_per_corpus_and_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    env = MultihopEnv(n_train=5, n_eval=5)
    backends = {"train": Recording(), "heldout": Recording()}
    monkeypatch.setattr(env, "backend", backends.__getitem__)
    train, held = env.train_set()[0], env.eval_set()[0]
    completions = ["<search>a</search>", "<answer>x</answer>", "<search>b</search>", "<search> </search>",
                   "<search>c</search>"]
    replies = env.observe_batch([train, train, held, train, train], completions)
    assert replies == ["\n<information>Doc 1 (a): found</information>\n", None,
                       "\n<information>Doc 1 (b): found</information>\n",
                       "\n<information>Empty search query.</information>\n",
                       "\n<information>Doc 1 (c): found</information>\n"]
    assert backends["train"].calls == [["a", "c"]] and backends["heldout"].calls == [["b"]]
    assert env.metrics() == {"searches": 3, "search_failures": 0, "search_capped": 0, "search_retries": 0}


def test_searches_past_the_time_cap_fail_and_are_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    # max_turns 3 -> each turn may search for 0.3 / 2 = 0.15 s; a request takes 0.2 s, so the
    # first batch of 2 is answered (it started in time) and the next two batches are not sent.
    env = MultihopEnv(n_train=5, n_eval=5, max_turns=3, search_time_s=0.3, search_batch_size=2)
    slow = Recording(delay_s=0.2)
    monkeypatch.setattr(env, "backend", lambda corpus: slow)
    sample = env.train_set()[0]
    start = time.monotonic()
    replies = env.observe_batch([sample] * 6, [f"<search>q{i}</search>" for i in range(6)])
    assert time.monotonic() - start < 0.35
    assert slow.calls == [["q0", "q1"]]
    assert replies[2:] == ["\n" + SEARCH_CAPPED + "\n"] * 4 and "found" in replies[0] and "found" in replies[1]
    assert env.metrics()["search_capped"] == 4 and env.metrics()["searches"] == 2


def test_a_retriever_that_stays_down_yields_a_failed_search(monkeypatch: pytest.MonkeyPatch) -> None:
    env = MultihopEnv(n_train=5, n_eval=5)
    monkeypatch.setattr(env, "backend", lambda corpus: Recording(fail=True))
    observation = env.observe(env.eval_set()[0], "<search>x</search>")
    assert observation == "\n" + SEARCH_FAILED + "\n"
    assert env.metrics()["search_failures"] == 1


def test_rollout_searches_all_rows_of_a_turn_in_one_request(tiny_model_dir, monkeypatch) -> None:
    from wapo.models import load_policy, load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    model = load_policy(tiny_model_dir, device="cpu")
    env = MultihopEnv(n_train=5, n_eval=5)
    recording = Recording()
    monkeypatch.setattr(env, "backend", lambda corpus: recording)
    # 2 prompts x 2 samples; turn 1: three rows search, one answers; turn 2: two search again
    turns = [["<search>a</search>", "<search>b</search>", "<answer>x</answer>", "<search>c</search>"],
             ["<search>d</search>", "<answer>y</answer>", "<search>e</search>"],
             ["<answer>z</answer>", "<answer>z</answer>"]]
    calls = []

    def scripted(model, tokenizer, prompts, *, max_new_tokens, stop_strings=(), **kwargs):
        texts = turns[len(calls)]
        calls.append(len(prompts))
        tokens = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
        return Generation(tokens=tokens, stopped=[True] * len(texts),
                          stats=[sampling._blank_stats(len(t)) for t in tokens])

    monkeypatch.setattr(sampling, "generate", scripted)
    episodes = rollout(model, tok, env, env.train_set()[:2], samples_per_prompt=2, max_new_tokens=200,
                       temperature=1.0)
    assert calls == [4, 3, 2]
    assert recording.calls == [["a", "b", "c"], ["d", "e"]]
    assert [e.turns for e in episodes] == [3, 2, 1, 3]


# --- the reward ----------------------------------------------------------------------

GOLDS = {"golds": ["Tarrin Vale"]}


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<search>A</search>\n<information>Doc 1 (A): x</information>\n<answer>B</answer>", True),
        ("thinking first <search>A</search> then <answer>B</answer>\n", True),
        ("<answer>B", True),  # the stop string was cut: an open tag at the very end counts as closed
        ("<answer>B</answer><search>A</search>", False),  # the answer is not last
        ("<search><answer>B</answer></search>", False),  # nested
        ("<answer>B</answer> and more text", False),
        ("<answer>B</answer><answer>C</answer>", False),  # two answers
        ("<search></search><answer>B</answer>", False),  # an empty search
        ("<search>A</search>", False),  # no answer
        ("</search><answer>B</answer>", False),  # closes what was never opened
        ("<information><answer>B</answer></information>", False),  # the environment's text does not count
    ],
)
def test_well_formed(completion: str, expected: bool) -> None:
    assert well_formed(completion) is expected


@pytest.mark.parametrize(
    "metric, weight, completion, expected, parts",
    [
        ("em", 0.0, "<answer>Tarrin Vale</answer>", RewardResult(1.0, True, "correct", "Tarrin Vale"), (1.0, 1.0)),
        ("em", 0.0, "<answer>the tarrin vale.</answer>", RewardResult(1.0, True, "correct", "the tarrin vale."),
         (1.0, 1.0)),
        ("em", 0.0, "<answer>Tarrin</answer>", RewardResult(0.0, False, "wrong answer", "Tarrin"), (0.0, 1.0)),
        # P = 1/1, R = 1/2 -> F1 = 2 * 1 * 0.5 / 1.5 = 2/3
        ("f1", 0.0, "<answer>Tarrin</answer>", RewardResult(2 / 3, False, "partial match (f1=0.67)", "Tarrin"),
         (2 / 3, 1.0)),
        # (1 - 0.2) * 2/3 + 0.2 * 1 = 0.7333...
        ("f1", 0.2, "<answer>Tarrin</answer>",
         RewardResult(0.8 * 2 / 3 + 0.2, False, "partial match (f1=0.67)", "Tarrin"), (2 / 3, 1.0)),
        ("em", 0.2, "<answer>Odo</answer>", RewardResult(0.2, False, "wrong answer", "Odo"), (0.0, 1.0)),
        ("em", 0.2, "<answer>Tarrin Vale</answer>", RewardResult(1.0, True, "correct", "Tarrin Vale"), (1.0, 1.0)),
        # right answer, ill-formed (text after it): 0.8 * 1 + 0.2 * 0 = 0.8
        ("em", 0.2, "<answer>Tarrin Vale</answer> ok?", RewardResult(0.8, True, "correct", "Tarrin Vale"),
         (1.0, 0.0)),
        ("em", 0.2, "It is Tarrin Vale.", RewardResult(0.0, False, "no answer found"), (0.0, 0.0)),
        ("em", 0.2, "<answer> </answer>", RewardResult(0.0, False, "empty answer", ""), (0.0, 0.0)),
        ("em", 0.0, "<information>Doc 1: <answer>Tarrin Vale</answer></information>",
         RewardResult(0.0, False, "no answer found"), (0.0, 0.0)),
    ],
)
def test_reward(metric: str, weight: float, completion: str, expected: RewardResult,
                parts: tuple[float, float]) -> None:
    env = MultihopEnv(n_train=5, n_eval=5, metric=metric, format_weight=weight)
    got = env.reward(GOLDS, completion)
    assert got.score == pytest.approx(expected.score)
    assert (got.correct, got.reason, got.extracted) == (expected.correct, expected.reason, expected.extracted)
    assert got.parts == pytest.approx({"answer": parts[0], "format": parts[1]})
