"""`wapo sft` on the tiny model: demonstrations are the episodes a rollout would produce and
earn full credit, never show a held-out question or entity; chat transcripts train on assistant
tokens only; the loss is the token-mean NLL; the run folder, resume, and the model folder that
`wapo train` and `wapo eval` start from."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import wapo.sampling as sampling
from wapo import config as cfg
from wapo.cli import main
from wapo.envs import make_env
from wapo.models import load_policy, load_tokenizer
from wapo.sampling import Generation, rollout
from wapo.sft import (
    SFTConfig,
    accumulate_gradients,
    batch_indices,
    build_examples,
    chat_episode,
    demonstration_episodes,
    read_transcripts,
)

SMALL_WORLD = {"n_entities": 40, "n_train": 12, "n_eval": 6, "max_observation_words": 30}
ROLE_TEMPLATE = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}a:{% endif %}")
CHAT = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "ciao"}]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WAPO_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def chat_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny model with a chat template that writes each message's role ("u:hi")."""
    path = tmp_path_factory.mktemp("tiny-chat")
    shutil.copytree(tiny_model_dir, path, dirs_exist_ok=True)
    tokenizer = load_tokenizer(tiny_model_dir)
    tokenizer.chat_template = ROLE_TEMPLATE
    tokenizer.save_pretrained(path)
    return str(path)


# --- demonstrations ----------------------------------------------------------------------


def test_demonstrations_are_the_episodes_a_rollout_of_their_tokens_produces(tiny_model_dir, tok, monkeypatch):
    env = make_env("multihop", SMALL_WORLD)
    samples = list(env.train_set())
    pairs = demonstration_episodes(tok, env, samples, max_observation_tokens=60)
    assert [s["id"] for s, _ in pairs] == [s["id"] for s in samples]  # every sample has one, in order
    # each earns full credit under the environment's own reward
    assert all(env.reward(s, e.text).score == 1.0 and env.reward(s, e.text).correct for s, e in pairs)
    assert any(60 < len(e.completion_ids) - e.model_tokens for _, e in pairs)  # replies were cut

    # a policy that writes exactly the demonstration's turns gets exactly the same episode
    turns = {s["id"]: env.demonstration(s) for s in samples}
    calls = []

    def scripted(model, tokenizer, prompts, *, max_new_tokens, stop_strings=(), **kwargs):
        active = [s for s in samples if len(turns[s["id"]]) > len(calls)]
        texts = [turns[s["id"]][len(calls)] for s in active]
        calls.append(len(prompts))
        tokens = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
        return Generation(tokens=tokens, stopped=[True] * len(tokens),
                          stats=[sampling._blank_stats(len(t)) for t in tokens])

    monkeypatch.setattr(sampling, "generate", scripted)
    model = load_policy(tiny_model_dir, device="cpu")
    episodes = rollout(model, tok, env, samples, samples_per_prompt=1, max_new_tokens=10_000, temperature=1.0,
                       max_observation_tokens=60)
    for (_, demo), played in zip(pairs, episodes):
        assert (demo.prompt_ids, demo.completion_ids, demo.completion_mask, demo.text, demo.turns) == (
            played.prompt_ids, played.completion_ids, played.completion_mask, played.text, played.turns)
        assert played.finished


def test_demonstrations_never_include_a_held_out_question_or_entity(tok) -> None:
    options = {"n_train": 150, "n_eval": 50}
    examples = build_examples(SFTConfig(env_options=options, max_length=10_000), tok)  # one token a character
    env = make_env("multihop", options)
    assert len(examples.episodes) == 150 and examples.skipped_not_correct == 0
    texts = [tok.decode(e.prompt_ids) + e.text for e in examples.episodes]
    held_questions = [s["question"] for s in env.eval_set()]
    held_words = {w for d in env.corpora["heldout"] for w in d.title.split()} - {"of", "Guild", "Company",
                  "Institute", "Society", "Foundry", "Press", "Bank", "Academy"}
    seen = set(" ".join(texts).replace("(", " ").replace(")", " ").replace("?", " ").replace(",", " ").split())
    assert not any(q in text for q in held_questions for text in texts)
    assert not held_words & seen
    train_words = {w for d in env.corpora["train"] for w in d.title.split()}
    assert len(train_words & seen) > 100  # the check looks at the words that are there


def test_hotpotqa_writes_demonstrations_from_its_supporting_facts(tok) -> None:
    examples = build_examples(SFTConfig(env="hotpotqa", max_length=10_000), tok)
    env = make_env("hotpotqa")
    assert len(examples.episodes) == len(env.train_set()) == 3
    assert all("<search>" in e.text and e.text.endswith("</answer>") for e in examples.episodes)


def test_an_environment_without_demonstrations_says_to_use_a_file(tiny_model_dir, tmp_path, capsys) -> None:
    code = main(["sft", "--model", tiny_model_dir, "--env", "test_digit", "--output-dir", str(tmp_path / "r")])
    assert code == 2
    assert "does not write demonstrations; give chat transcripts with --data FILE.jsonl" in capsys.readouterr().err


# --- chat transcripts --------------------------------------------------------------------


def test_chat_transcripts_train_on_assistant_tokens_only(chat_model_dir) -> None:
    tokenizer = load_tokenizer(chat_model_dir)
    episode = chat_episode(tokenizer, CHAT)
    # template: "s:be nice\nu:hi\na:hello\nu:bye\na:ciao\n"; one token per character
    assert tokenizer.decode(episode.prompt_ids) == "s:be nice\nu:hi\na:"
    assert episode.text == "hello\nu:bye\na:ciao\n"
    assert episode.completion_mask == [True] * 6 + [False] * 8 + [True] * 5  # "hello\n", "u:bye\na:", "ciao\n"

    tokenizer.chat_template = None  # no template: each message's content and a newline
    plain = chat_episode(tokenizer, CHAT)
    assert tokenizer.decode(plain.prompt_ids) == "be nice\nhi\n" and plain.text == "hello\nbye\nciao\n"
    assert plain.completion_mask == [True] * 6 + [False] * 4 + [True] * 5


def test_a_template_that_does_not_extend_its_prefixes_fails_clearly(tok) -> None:
    # the tiny model's template ends a prompt with "A:" but writes every message as "Q:...",
    # so the prompt before an answer is not a prefix of the conversation
    with pytest.raises(ValueError, match="does not render each prefix of a conversation as a prefix"):
        chat_episode(tok, CHAT)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "x"}', r'c.jsonl:2: expected an object with "messages"'),
        ('{"messages": [{"role": "assistant", "content": "x"}]}', "c.jsonl:2: a transcript needs an assistant"),
        ('{"messages": [{"role": "user"}]}', 'c.jsonl:2: "messages" must be a list of'),
    ],
)
def test_read_transcripts_names_the_bad_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        read_transcripts(path)


# --- the loss ----------------------------------------------------------------------------


def test_the_loss_is_the_token_mean_nll_of_the_trained_tokens(chat_model_dir) -> None:
    tokenizer = load_tokenizer(chat_model_dir)
    rows = [chat_episode(tokenizer, CHAT), chat_episode(tokenizer, CHAT[:3])]  # 11 + 6 trained tokens
    model = load_policy(chat_model_dir, device="cpu")
    optimizer = torch.optim.AdamW(model.parameters())
    metrics = accumulate_gradients(model, optimizer, rows, SFTConfig(micro_batch_size=1, max_grad_norm=1e9))
    assert metrics["tokens"] == 17
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    # reference: full sequences, float64 log-softmax, mean over all 17 trained tokens of the batch
    model.zero_grad()
    total = torch.zeros((), dtype=torch.float64)
    for e in rows:
        ids = torch.tensor([e.prompt_ids + e.completion_ids])
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        start = len(e.prompt_ids)
        for j, trained in enumerate(e.completion_mask):
            if trained:
                total = total - logp[start + j - 1, e.completion_ids[j]]
    (total / 17).backward()
    assert metrics["loss"] == pytest.approx((total / 17).item(), rel=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad.to(grads[name].dtype), rtol=1e-4, atol=1e-6)


def test_batches_cover_each_epoch_once_in_a_seeded_order() -> None:
    steps = [batch_indices(step, 4, 10, seed=0) for step in range(5)]  # 20 positions = 2 epochs of 10
    flat = [i for step in steps for i in step]
    assert sorted(flat[:10]) == list(range(10)) == sorted(flat[10:])
    assert flat[:10] != flat[10:]  # reshuffled
    assert batch_indices(3, 4, 10, seed=0) == steps[3] and batch_indices(3, 4, 10, seed=1) != steps[3]


# --- the command, its run folder, resume ---------------------------------------------------


def _sft_argv(model_dir: str, run: Path, *extra: str) -> list[str]:
    return ["sft", "--model", model_dir, "--env", "multihop", "--env-options",
            *[f"{k}={v}" for k, v in SMALL_WORLD.items()], "--max-length", "4000", "--batch-size", "3",
            "--micro-batch-size", "2", "--lr", "1e-3", "--warmup-steps", "0", "--output-dir", str(run),
            "--progress", "false", *extra]


def test_sft_writes_a_run_folder_and_a_model_that_train_and_eval_start_from(tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "sft"
    assert main(_sft_argv(tiny_model_dir, run, "--steps", "3")) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["loss"] < rows[0]["loss"]
    assert {"loss", "tokens", "lr", "grad_norm", "entropy", "epoch", "time_step"} <= set(rows[0])
    saved = cfg.load_file(run / "config.toml")["sft"]
    assert saved["steps"] == 3 and saved["env_options"]["n_entities"] == 40
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000003"]
    model_dir = run / "model"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in model_dir.iterdir()}
    trained = AutoModelForCausalLM.from_pretrained(model_dir)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(trained.model.embed_tokens.weight, original.model.embed_tokens.weight)
    capsys.readouterr()

    world = ["--env", "multihop", "--env-options", *[f"{k}={v}" for k, v in SMALL_WORLD.items()]]
    assert main(["eval", "--model", str(model_dir), *world, "--eval-size", "2", "--eval-samples", "1",
                 "--max-new-tokens", "8"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == str(model_dir)
    assert main(["train", "--model", str(model_dir), *world, "--steps", "1", "--prompts-per-step", "2",
                 "--samples-per-prompt", "2", "--max-new-tokens", "8", "--eval-size", "0",
                 "--output-dir", str(tmp_path / "rl"), "--progress", "false"]) == 0


def test_resume_gives_the_weights_and_logs_of_an_uninterrupted_run(tiny_model_dir, tmp_path, capsys,
                                                                     deterministic_kernels):
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    assert main(_sft_argv(tiny_model_dir, whole, "--steps", "2")) == 0
    assert main(_sft_argv(tiny_model_dir, halves, "--steps", "1")) == 0
    assert main(_sft_argv(tiny_model_dir, halves, "--steps", "2")) == 2  # never silently reused
    assert f"{halves} already holds a run: continue it with `wapo sft --resume {halves}`" in capsys.readouterr().err
    assert main(["sft", "--resume", str(halves), "--steps", "2"]) == 0
    a, b = load_file(str(whole / "model" / "model.safetensors")), load_file(str(halves / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def logged(run):
        return [{k: v for k, v in json.loads(line).items() if k != "time_step"}
                for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert logged(whole) == logged(halves)


def test_the_thread_count_is_recorded_and_a_failed_resume_leaves_the_record(tiny_model_dir, tmp_path, capsys):
    default = torch.get_num_threads()
    run = tmp_path / "sft"
    try:
        # on the CPU: on an accelerator the thread count changes no number, so nothing warns
        assert main(_sft_argv(tiny_model_dir, run, "--steps", "1", "--device", "cpu")) == 0
        record = (run / "config.toml").read_text()
        assert cfg.load_file(run / "config.toml")["sft"]["threads"] == default  # 0: torch's default, resolved
        shutil.rmtree(run / "checkpoints")
        assert main(["sft", "--resume", str(run), "--steps", "2", "--lr", "5e-3"]) == 2  # nothing to resume from
        assert "no checkpoint" in capsys.readouterr().err
        assert (run / "config.toml").read_text() == record  # steps 1, lr 1e-3: as the run was
        assert main(_sft_argv(tiny_model_dir, tmp_path / "two", "--steps", "1", "--threads", "2", "--device", "cpu")) == 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(["sft", "--resume", str(tmp_path / "two"), "--steps", "2"]) == 0  # the recorded 2
        assert not [w for w in caught if "thread" in str(w.message)]
        assert cfg.load_file(tmp_path / "two" / "config.toml")["sft"]["threads"] == 2
        with pytest.warns(UserWarning, match=r"resumed with 1 CPU thread\(s\) where the run used 2.*--threads 2"):
            assert main(["sft", "--resume", str(tmp_path / "two"), "--steps", "3", "--threads", "1"]) == 0
        assert cfg.load_file(tmp_path / "two" / "config.toml")["sft"]["threads"] == 1
    finally:
        torch.set_num_threads(default)


def test_sft_from_a_file_of_chat_transcripts(chat_model_dir, tmp_path):
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(json.dumps({"messages": CHAT[: 3 + 2 * (i % 2)]}) for i in range(4)) + "\n")
    run = tmp_path / "run"
    assert main(["sft", "--model", chat_model_dir, "--data", str(data), "--steps", "2", "--batch-size", "2",
                 "--output-dir", str(run), "--progress", "false"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # steps 1 and 2 take a seeded permutation of the 4 transcripts: 6 or 11 trained tokens each
    assert sum(r["tokens"] for r in rows) == 6 + 11 + 6 + 11


def test_sft_help_lists_every_field_with_its_docstring(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--n-demos INT Demonstrations used: the first N of the environment's training set" in text
    assert "--env-options KEY=VALUE [KEY=VALUE ...]" in text and "(default: 'multihop')" in text


def test_config_file_then_flags_and_clear_errors(tiny_model_dir, tmp_path, capsys):
    config = tmp_path / "sft.toml"
    config.write_text('[sft]\nsteps = 7\nlr = 0.001\nenv_options = { n_train = 3 }\n')
    from wapo.sft import config_from_args

    parser = __import__("wapo.cli", fromlist=["build_parser"]).build_parser()
    got = config_from_args(parser.parse_args(["sft", "--config", str(config), "--lr", "0.01"]))
    assert (got.steps, got.lr, got.env_options) == (7, 0.01, {"n_train": 3})
    config.write_text("[sft]\nstep = 7\n")
    assert main(["sft", "--config", str(config)]) == 2
    assert "unknown sft key(s) ['step']; valid:" in capsys.readouterr().err
    assert main(["sft", "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
