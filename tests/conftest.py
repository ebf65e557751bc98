"""Shared fixtures: tiny random causal LMs with a character-level tokenizer, built offline."""

from __future__ import annotations

import os
import string
from dataclasses import dataclass

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# cuBLAS reads this when it starts; `torch.use_deterministic_algorithms` needs it on a GPU.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def char_tokenizer():
    """A char-level tokenizer (75 ids: <pad>=0, <eos>=1, then characters) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(string.digits + string.ascii_letters + " +-=?.:<>/\n")
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
        chat_template="{% for m in messages %}Q:{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}",
    )


@pytest.fixture(scope="session")
def benchmark_script():
    """`load(name) -> module`: benchmarks/<name>.py imported as a module (benchmarks/ is no package)."""
    import importlib.util
    from pathlib import Path

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parent.parent / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def deterministic_kernels():
    """`torch.use_deterministic_algorithms(True)` for one test.

    CPU kernels are deterministic at a fixed thread count; CUDA's default ones are not (on an
    H200 two uninterrupted 2-step SFT runs of the tiny model ended with weights up to 1.3e-8
    apart, `benchmarks/cuda_check.sh`), so a test that compares a resumed run with an uninterrupted
    one bit for bit asks for deterministic kernels, which make the two equal on a GPU too.
    """
    import torch

    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.fixture(scope="session")
def save_tiny_model(tmp_path_factory):
    """`save(config_class, **fields) -> folder`: a random 2-layer, 32-wide causal LM of that
    family (seed 0) and the char-level tokenizer, saved to a fresh folder.

    `fields` override the shared ones (sizes, vocabulary, special ids) or add the family's own.
    """
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = char_tokenizer()

    def save(config_class, **fields) -> str:
        shared = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=None, eos_token_id=1, pad_token_id=0)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config_class(**{**shared, **fields}))
        path = tmp_path_factory.mktemp(model.config.model_type)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        return str(path)

    return save


@pytest.fixture(scope="session")
def tiny_model_dir(save_tiny_model):
    """A 2-layer, 32-wide Llama with tied embeddings and the char-level tokenizer, saved to disk."""
    from transformers import LlamaConfig

    return save_tiny_model(LlamaConfig, tie_word_embeddings=True)


def _register_test_envs():
    from wapo.envs.base import ENVIRONMENTS, Environment, RewardResult

    if "test_digit" in ENVIRONMENTS:
        return

    @dataclass
    class DigitEnv(Environment):
        """Reward 1 when the completion starts with a lowercase letter or a digit.

        A random tiny model at a high temperature does that about half of the time, so
        groups have mixed rewards and every objective has rows to train on.
        """

        raise_every: int = 0
        """Raise in reward() for every n-th call (0 = never)."""
        raise_on: str = ""
        """Raise in reward() when the completion starts with one of these characters (stateless)."""

        def __post_init__(self):
            self.calls = 0

        def train_set(self):
            return [{"question": f"say {d}", "answer": str(d)} for d in range(10)]

        def eval_set(self):
            return [{"question": f"say {d}", "answer": str(d)} for d in range(3)]

        def prompt(self, sample):
            return [{"role": "user", "content": sample["question"]}]

        def reward(self, sample, completion):
            self.calls += 1
            if self.raise_every and self.calls % self.raise_every == 0:
                raise ZeroDivisionError("grader bug")
            if completion[:1] and completion[:1] in self.raise_on:
                raise ZeroDivisionError("grader bug on " + completion[:1])
            ok = completion[:1] in string.ascii_lowercase + string.digits
            return RewardResult(float(ok), ok, "correct" if ok else "wrong answer")

    ENVIRONMENTS.register("test_digit")(DigitEnv)


_register_test_envs()
