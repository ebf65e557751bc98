"""Output heads of other model families: the trainer's log p is the sampler's, or the model is refused.

The sampler draws from `log_softmax(model(...).logits / T)`; the trainer computes log p from
the final hidden states through `wapo.models.output_head` (the output layer, Cohere's and
Granite's logit scaling, Gemma 2's soft-capping). Tiny random models of each family, built
offline, check the two agree, in a direct comparison and through one training step.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from wapo import config as cfg
from wapo.batch import RolloutBatch, row_token_stats
from wapo.models import check_output_head, decoder, load_policy, output_head
from wapo.sampling import Episode
from wapo.taxonomy import OutputHead, chunked_token_stats
from wapo.trainer import build_trainer

FAMILIES = {  # name: (config class, its fields); weights of std 0.2, so the distributions are not flat
    "llama": ("LlamaConfig", {}),  # untied head (the shared tiny Llama is tied)
    "qwen2": ("Qwen2Config", {}),  # biases on q, k, v
    "qwen3": ("Qwen3Config", {"head_dim": 8}),  # q/k norms
    "gemma2": ("Gemma2Config", {"head_dim": 8, "final_logit_softcapping": 2.0}),  # logits of std ~1: the cap bites
    "mistral": ("MistralConfig", {}),
    "phi3": ("Phi3Config", {}),  # fused qkv and gate/up projections
    "phi": ("PhiConfig", {}),  # a bias on the output layer
    "cohere": ("CohereConfig", {"logit_scale": 4.0}),  # logits × 4
    "granite": ("GraniteConfig", {"logits_scaling": 0.25}),  # logits ÷ 0.25
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, save_tiny_model):
    """(name, folder) of a tiny random model of each family with the char-level tokenizer."""
    config_name, fields = FAMILIES[request.param]
    return request.param, save_tiny_model(getattr(transformers, config_name), initializer_range=0.2, **fields)


def _sampled_batch(model, temperature: float) -> RolloutBatch:
    """Two prompts × two completions of 3-5 tokens drawn from softmax(model(...).logits / T)."""
    gen = torch.Generator().manual_seed(0)
    episodes = []
    for prompt in ([40, 12, 5, 33, 7, 21], [9, 60, 2]):
        for length in (5, 3):
            seq = list(prompt)
            with torch.no_grad():
                for _ in range(length):
                    logits = model(input_ids=torch.tensor([seq])).logits[0, -1]
                    seq.append(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen).item())
            episodes.append(Episode(prompt_ids=prompt, completion_ids=seq[len(prompt):],
                                    completion_mask=[True] * length, behaviour_logprobs=[0.0] * length))
    return RolloutBatch.from_episodes(episodes, torch.ones(len(episodes)))


def _reference_logp(model, batch: RolloutBatch, temperature: float) -> torch.Tensor:
    """(B, T) log_softmax(model(...).logits / T) at each completion token, one full sequence a row."""
    out = torch.zeros(batch.completion_ids.shape)
    for i, prompt in enumerate(batch.prompt_ids):
        completion = batch.completion_ids[i, : batch.lengths[i]]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + completion.tolist()])).logits[0].float()
        predicting = logits[len(prompt) - 1: -1]  # position p + j − 1 predicts completion token j
        out[i, : len(completion)] = torch.log_softmax(predicting / temperature, -1).gather(-1, completion[:, None])[:, 0]
    return out


@pytest.mark.parametrize("share_prompts", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_trainer_logp_equals_the_models_logits(family, temperature, share_prompts):
    _, path = family
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    batch = _sampled_batch(model, temperature)
    stats = row_token_stats(model, batch, [0, 1, 2, 3], temperature=temperature, chunk_size=5,
                            share_prompts=share_prompts)
    want = _reference_logp(model, batch, temperature)
    torch.testing.assert_close(stats.logp[batch.mask], want[batch.mask], rtol=0, atol=1e-5)
    # the entropy too is the model's: H of softmax(logits / T) at the first completion position
    with torch.no_grad():
        z = model(input_ids=torch.tensor([batch.prompt_ids[0]])).logits[0, -1] / temperature
    entropy = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum()
    assert stats.entropy[0, 0].item() == pytest.approx(entropy.item(), abs=1e-5)


def test_scaled_and_capped_heads_need_their_transform(family):
    # guards the test above: where a family transforms its logits, the bare output layer is far off
    name, path = family
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    head = output_head(model)
    assert (head.scale, head.softcap) == {"gemma2": (1.0, 2.0), "cohere": (4.0, None),
                                          "granite": (4.0, None)}.get(name, (1.0, None))
    assert (head.bias is not None) == (name == "phi")
    ids = torch.tensor([[40, 12, 5, 33, 7, 21]])
    with torch.no_grad():
        hidden = decoder(model)(input_ids=ids).last_hidden_state[0]
        want = torch.log_softmax(model(input_ids=ids).logits[0], -1).gather(-1, ids[0][:, None])[:, 0]
    bare = chunked_token_stats(hidden, OutputHead(head.weight, head.bias), ids[0]).logp
    assert ((bare - want).abs().max() > 0.1) == (name in ("gemma2", "cohere", "granite"))


def test_one_training_step_has_ratio_one(family, tmp_path):
    _, path = family
    config = cfg.from_dict({
        "model": {"model": path, "bf16": "false", "bf16_sampling": "false"},  # float32 sampler and trainer
        "env": {"env": "test_digit"},
        "sampling": {"prompts_per_step": 2, "samples_per_prompt": 4, "max_new_tokens": 6, "temperature": 3.0},
        "algorithm": {"updates_per_batch": 1, "ratio_against": "sampler"},  # ρ = π/μ with μ the sampler's
        "optim": {"lr": 1e-2, "micro_batch_size": 3},
        "run": {"steps": 1, "eval_size": 0, "progress": False, "output_dir": str(tmp_path / "run"),
                "checkpoint_every": 1, "taxonomy_chunk_size": 5, "seed": 1},
    })
    trainer = build_trainer(config)
    trainer.fit()
    (row,) = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert row["backward_rows"] > 0  # the ratios below were measured on trained rows
    # before the first update the trainer's π is the sampler's μ: ρ = 1 and KL(μ‖π) = 0
    assert abs(row["ratio_mean"] - 1) <= 1e-4 and abs(row["ratio_max"] - 1) <= 1e-4
    assert abs(row["kl_behaviour"]) <= 1e-5


# ---------------------------------------------------------------------------------------------
# refusing what the chunked path does not reproduce
# ---------------------------------------------------------------------------------------------


def _patched_logits(monkeypatch, model_class, edit):
    """Make `model_class.forward` return `edit(logits)`, as a model with an unknown head would."""
    real = model_class.forward

    def forward(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        out.logits = edit(out.logits)
        return out

    monkeypatch.setattr(model_class, "forward", forward)


def test_an_unknown_logit_transform_is_refused_when_loading(tiny_model_dir, monkeypatch):
    from transformers import LlamaForCausalLM

    load_policy(tiny_model_dir, device=torch.device("cpu"))  # the plain model passes
    # logits + 1·logits²: not a shift (softmax ignores those), so every distribution changes
    _patched_logits(monkeypatch, LlamaForCausalLM, lambda z: z + z.square())
    with pytest.raises(ValueError, match=r"cannot train a 'llama' model: .* differs from "
                                         r"log_softmax\(model\(\.\.\.\)\.logits / T\) by up to"):
        load_policy(tiny_model_dir, device=torch.device("cpu"))


def test_a_constant_shift_of_the_logits_is_accepted(tiny_model_dir, monkeypatch):
    from transformers import LlamaForCausalLM

    _patched_logits(monkeypatch, LlamaForCausalLM, lambda z: z + 5.0)  # softmax is blind to it
    check_output_head(load_policy(tiny_model_dir, device=torch.device("cpu")))


def test_logits_narrower_than_the_output_layer_are_refused(tiny_model_dir, monkeypatch):
    from transformers import LlamaForCausalLM

    model = load_policy(tiny_model_dir, device=torch.device("cpu"))
    _patched_logits(monkeypatch, LlamaForCausalLM, lambda z: z[..., :-1])  # e.g. a padded vocabulary cut off
    with pytest.raises(ValueError, match="its logits have 74 entries but its output layer has 75 rows"):
        check_output_head(model)


def test_softcapped_head_passes_the_check_under_lora(save_tiny_model):
    path = save_tiny_model(transformers.Gemma2Config, head_dim=8, final_logit_softcapping=2.0, initializer_range=0.2)
    model = load_policy(path, device=torch.device("cpu"), lora_rank=2)  # checks the PeftModel
    head = output_head(model)
    assert head.softcap == 2.0 and head.weight is model.get_base_model().lm_head.weight


def test_attention_dropout_in_the_config_is_switched_off(save_tiny_model):
    # Llama applies `attention_dropout` functionally in train mode (no nn.Dropout module): with
    # it on, two passes over the same tokens would differ and the load-time check would fail
    from transformers import LlamaConfig

    folder = save_tiny_model(LlamaConfig, attention_dropout=0.5)
    model = load_policy(folder, device=torch.device("cpu"))
    assert model.training and model.config.attention_dropout == 0.0
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)
