"""`wapo export`: a 1-step run's weights load with plain transformers / peft and give the same logits."""

from __future__ import annotations

import json

import pytest
import torch

from wapo import config as cfg
from wapo.cli import main
from wapo.export import export_run
from wapo.trainer import build_trainer


def _trained(model_dir, tmp_path, **model):
    """A wapo run of one step on the tiny model (its parameters moved); the trainer."""
    config = cfg.from_dict({
        "model": {"model": model_dir, **model},
        "env": {"env": "test_digit"},
        "sampling": {"prompts_per_step": 2, "samples_per_prompt": 4, "max_new_tokens": 6, "temperature": 3.0},
        "optim": {"lr": 1e-2},
        "run": {"steps": 1, "eval_size": 0, "progress": False, "output_dir": str(tmp_path / "run"), "seed": 1},
    })
    trainer = build_trainer(config)
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}
    trainer.fit()
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.named_parameters() if v.requires_grad)
    return trainer


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, tmp_path_factory):
    return _trained(tiny_model_dir, tmp_path_factory.mktemp("full"))


def _logits(model, ids):
    """On the CPU, whatever device the model is on (the trainer's `auto` picks CUDA when present)."""
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids.to(model.device)).logits.cpu()


IDS = torch.tensor([[5, 17, 3, 40, 22, 9, 31, 2], [12, 12, 7, 1, 60, 4, 28, 15]])


def test_full_weights_export_loads_with_plain_transformers_and_gives_the_same_logits(full_run, tiny_model_dir,
                                                                                     tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer = full_run
    out = export_run(trainer.run_dir, tmp_path / "hf")
    exported = AutoModelForCausalLM.from_pretrained(out)
    diff = float((_logits(exported, IDS) - _logits(trainer.model, IDS)).abs().max())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    moved = float((_logits(base, IDS) - _logits(trainer.model, IDS)).abs().max())
    print(f"\nfull weights: max |Δlogit| exported vs trained = {diff:.1e} (trained vs base: {moved:.1e})")
    assert diff <= 1e-5 and moved > 1e-3  # the export is the trained model, not the base
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True) == "Q:hi\nA:"
    info = json.loads((out / "wapo_export.json").read_text())
    assert info["step"] == 1 and info["weights"] == "full"


def test_lora_export_merged_or_as_a_peft_adapter(tiny_model_dir, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    trainer = _trained(tiny_model_dir, tmp_path, lora_rank=4, lora_alpha=8.0)
    expected = _logits(trainer.model, IDS)
    checkpoint_dir = trainer.run_dir / "checkpoints" / "step_000001"  # a checkpoint folder works too
    merged = AutoModelForCausalLM.from_pretrained(export_run(checkpoint_dir, tmp_path / "merged"))
    assert not any("lora" in name for name, _ in merged.named_parameters())
    adapter_dir = export_run(trainer.run_dir, tmp_path / "adapter", adapter=True)
    assert (adapter_dir / "adapter_model.safetensors").is_file() and not (adapter_dir / "model.safetensors").exists()
    adapter = AutoPeftModelForCausalLM.from_pretrained(adapter_dir)
    for name, model in (("merged", merged), ("adapter", adapter)):
        diff = float((_logits(model, IDS) - expected).abs().max())
        print(f"\nLoRA {name}: max |Δlogit| = {diff:.1e}")
        assert diff <= 1e-5


def test_export_command_and_its_errors(full_run, tmp_path, capsys):
    trainer = full_run
    assert main(["export", str(trainer.run_dir), str(tmp_path / "hf")]) == 0
    assert "AutoModelForCausalLM.from_pretrained" in capsys.readouterr().out
    assert main(["export", str(trainer.run_dir), str(tmp_path / "hf")]) == 2  # not empty
    assert "not empty" in capsys.readouterr().err
    assert main(["export", str(trainer.run_dir), str(tmp_path / "a"), "--adapter"]) == 2
    assert "no adapter" in capsys.readouterr().err
    assert main(["export", str(tmp_path), str(tmp_path / "b")]) == 2
    assert "neither a wapo run folder" in capsys.readouterr().err
