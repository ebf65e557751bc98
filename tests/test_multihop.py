"""Multi-hop search QA: HotpotQA loading, the generated world, BM25 recall, the multi-turn
protocol and the reward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wapo.envs.base import ENVIRONMENTS, RewardResult
from wapo.envs.multihop import (
    HOTPOTQA_SAMPLE,
    MultihopEnv,
    format_information,
    last_turn,
    load_hotpotqa,
    parse_answer,
    parse_search,
)
from wapo.retrieval import RetrieverError


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep index caches out of the home directory."""
    monkeypatch.setenv("WAPO_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def world() -> MultihopEnv:
    return MultihopEnv(seed=0)


# --- HotpotQA ------------------------------------------------------------------------


def test_load_hotpotqa_sample() -> None:
    samples, docs = load_hotpotqa(HOTPOTQA_SAMPLE)
    assert [s["id"] for s in samples] == [f"wapo-sample-{i}" for i in range(1, 5)]
    # 12 context paragraphs, 7 distinct titles (Idris Pellow x3, Vennick x2, ...).
    assert len(docs) == 7 and len({d.id for d in docs}) == 7
    first = samples[0]
    assert first["golds"] == ["Carrowdale"]
    assert first["chain"] == ["Saltmere Lighthouse", "Idris Pellow"] and first["hops"] == 2
    assert (first["type"], first["level"]) == ("bridge", "medium")
    lighthouse = next(d for d in docs if d.title == "Saltmere Lighthouse")
    # HotpotQA sentences carry their own leading space; it is stripped, then joined by one.
    assert lighthouse.text == (
        "The Saltmere Lighthouse is a fictional lighthouse on the Orvane coast. "
        "It was designed by the architect Idris Pellow in 1861."
    )


def test_load_hotpotqa_names_the_incomplete_question(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"_id": "q9", "question": "?", "answer": "x", "context": []}]))
    with pytest.raises(ValueError, match=r"question q9 lacks \['supporting_facts'\]"):
        load_hotpotqa(path)


def test_hotpotqa_env_split_is_disjoint_and_complete() -> None:
    env = ENVIRONMENTS["hotpotqa"](seed=3)
    train, held_out = {s["id"] for s in env.train_set()}, {s["id"] for s in env.eval_set()}
    assert len(held_out) == 1  # round(0.25 * 4)
    assert not train & held_out and len(train | held_out) == 4
    sample = next(s for s in env.train_set() + env.eval_set() if s["id"] == "wapo-sample-3")
    observation = env.observe(sample, "<search>Vennick Choir founder</search>")
    assert observation.startswith("\n<information>Doc 1 (Vennick Choir): The Vennick Choir is")


# --- the generated world -------------------------------------------------------------


def test_every_question_is_answerable_by_following_its_chain(world: MultihopEnv) -> None:
    docs = {d.id: d for d in world.docs}
    for sample in world.train_set() + world.eval_set():
        chain = [docs[i] for i in sample["chain"]]
        assert len(chain) == sample["hops"] in (2, 3)
        assert chain[0].title in sample["question"]
        for previous, doc in zip(chain, chain[1:]):
            assert doc.title in previous.text, (sample, previous, doc)
        assert sample["answer"] in chain[-1].text, sample
        assert sample["golds"] == [sample["answer"]]


def test_world_is_seeded_and_splits_are_disjoint(world: MultihopEnv) -> None:
    train = {s["question"] for s in world.train_set()}
    held_out = {s["question"] for s in world.eval_set()}
    assert (len(train), len(held_out)) == (1000, 200) and not train & held_out
    again = MultihopEnv(seed=0, n_train=10)
    assert again.eval_set() == world.eval_set()  # held out first: independent of n_train
    assert again.docs == world.docs
    assert MultihopEnv(seed=1, n_train=10).eval_set() != world.eval_set()
    # Names are fictional syllable words, distinct across entities.
    assert len({d.title for d in world.docs}) == len(world.docs) == 300


def test_hop_mix_follows_the_option() -> None:
    only_two = MultihopEnv(three_hop_fraction=0.0, n_train=50, n_eval=10)
    only_three = MultihopEnv(three_hop_fraction=1.0, n_train=50, n_eval=10)
    assert {s["hops"] for s in only_two.train_set()} == {2}
    assert {s["hops"] for s in only_three.train_set()} == {3}


def test_bm25_recall_of_the_first_hop_document(world: MultihopEnv) -> None:
    questions = world.eval_set()[:200]
    hits = world.search_backend.search_docs([q["question"] for q in questions], top_k=5)
    recall = {
        k: sum(q["chain"][0] in [doc.id for doc, _ in h[:k]] for q, h in zip(questions, hits)) / len(questions)
        for k in (1, 3, 5)
    }
    print(f"\nBM25 recall of the first-hop document, question as query (200 questions): {recall}")
    # Measured 1.00 at k = 1, 3, 5 (seeds 0-3, 60 to 2000 entities). Each question names its
    # first entity with words no other entity's name uses; that entity's page holds them in
    # the title and in every sentence, a page that refers to it holds them once. The floors
    # leave room for a length-normalisation tie on another seed, and catch a broken index
    # or tokeniser (which would fall to about top_k / 300).
    assert recall[1] >= 0.95 and recall[3] >= 0.98 and recall[5] >= 0.98


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
    first, second = (next(d for d in world.docs if d.id == i) for i in sample["chain"])
    turn1 = f"<search>{sample['question']}</search>"
    info1 = world.observe(sample, turn1)
    assert info1.startswith(f"\n<information>Doc 1 ({first.title}): {first.text}\nDoc 2 (")
    assert info1.endswith("</information>\n") and info1.count("\nDoc ") == world.top_k - 1
    turn2 = turn1 + info1 + f"<search>{second.title}</search>"
    assert f"Doc 1 ({second.title}): {second.text}" in world.observe(sample, turn2)
    assert world.observe(sample, turn2 + "\n<information>...</information>\n<answer>x</answer>") is None
    assert world.observe(sample, turn1 + info1 + "I give up.") is None  # a turn without a search
    assert world.observe(sample, "<search>  </search>") == "\n<information>Empty search query.</information>\n"
    assert world.observe(sample, "<search>qqqq zzzz</search>") == "\n<information>No results.</information>\n"


def test_format_information_truncates_to_the_word_budget() -> None:
    passages = ['"A"\none two three', '"B"\nfour five', '"C"\nsix']
    # budget 4: A keeps its 3 words, B is cut after 1 word, C is dropped.
    assert format_information(passages, 4) == "<information>Doc 1 (A): one two three\nDoc 2 (B): four ...</information>"
    assert format_information(passages, 2) == "<information>Doc 1 (A): one two ...</information>"
    assert format_information(["untitled text"], 9) == "<information>Doc 1: untitled text</information>"


def test_a_retriever_that_stays_down_yields_a_failed_search() -> None:
    class Down:
        def search(self, queries: list[str], top_k: int) -> list[list[str]]:
            raise RetrieverError("gave up after retries")

    env = MultihopEnv(n_train=5, n_eval=5)
    env.search_backend = Down()
    observation = env.observe(env.eval_set()[0], "<search>x</search>")
    assert observation == "\n<information>Search failed: the retriever is unavailable.</information>\n"


# --- the reward ----------------------------------------------------------------------

GOLDS = {"golds": ["Tarrin Vale"]}


@pytest.mark.parametrize(
    "metric, weight, completion, expected",
    [
        ("em", 0.0, "<answer>Tarrin Vale</answer>", RewardResult(1.0, True, "correct", "Tarrin Vale")),
        ("em", 0.0, "<answer>the tarrin vale.</answer>", RewardResult(1.0, True, "correct", "the tarrin vale.")),
        ("em", 0.0, "<answer>Tarrin</answer>", RewardResult(0.0, False, "wrong answer", "Tarrin")),
        # P = 1/1, R = 1/2 -> F1 = 2 * 1 * 0.5 / 1.5 = 2/3
        ("f1", 0.0, "<answer>Tarrin</answer>", RewardResult(2 / 3, False, "partial match (f1=0.67)", "Tarrin")),
        # (1 - 0.2) * 2/3 + 0.2 = 0.7333...
        ("f1", 0.2, "<answer>Tarrin</answer>", RewardResult(0.8 * 2 / 3 + 0.2, False, "partial match (f1=0.67)", "Tarrin")),
        ("em", 0.2, "<answer>Odo</answer>", RewardResult(0.2, False, "wrong answer", "Odo")),
        ("em", 0.2, "<answer>Tarrin Vale</answer>", RewardResult(1.0, True, "correct", "Tarrin Vale")),
        ("em", 0.2, "It is Tarrin Vale.", RewardResult(0.0, False, "no answer found")),
        ("em", 0.2, "<answer> </answer>", RewardResult(0.0, False, "empty answer", "")),
        ("em", 0.0, "<information>Doc 1: <answer>Tarrin Vale</answer></information>", RewardResult(0.0, False, "no answer found")),
    ],
)
def test_reward(metric: str, weight: float, completion: str, expected: RewardResult) -> None:
    env = MultihopEnv(n_train=5, n_eval=5, metric=metric, format_weight=weight)
    got = env.reward(GOLDS, completion)
    assert got.score == pytest.approx(expected.score)
    assert (got.correct, got.reason, got.extracted) == (expected.correct, expected.reason, expected.extracted)
