"""Held-out evaluation shows its progress, and can be silenced."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from wapo.envs.base import ENVIRONMENTS
from wapo.evaluate import evaluate
from wapo.models import load_tokenizer


def test_evaluation_shows_a_progress_bar_unless_told_not_to(tiny_model_dir, capsys):
    model, tok = AutoModelForCausalLM.from_pretrained(tiny_model_dir), load_tokenizer(tiny_model_dir)
    env = ENVIRONMENTS["test_digit"]()
    samples = list(env.eval_set())  # 3 problems
    runs = {}
    for progress in (True, False):
        torch.manual_seed(0)
        scores = evaluate(model, tok, env, samples, k=2, temperature=1.0, max_new_tokens=3, batch_prompts=2,
                          progress=progress, desc="eval before")
        runs[progress] = scores, capsys.readouterr().err
    (scores_shown, shown), (scores_silent, silent) = runs[True], runs[False]
    # 3 problems x (1 greedy + 2 sampled) = 9 answers, in batches of 2 then 1 problems
    assert "eval before" in shown and "9/9" in shown and "greedy_accuracy=" in shown
    assert silent == ""
    assert scores_shown == scores_silent  # the bar changes no number
