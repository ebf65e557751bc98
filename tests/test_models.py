"""Hardware detection: whether bfloat16 matrix multiplies are native here."""

from __future__ import annotations

import pytest
import torch

from wapo import models
from wapo.models import native_bf16


@pytest.mark.parametrize("cpuinfo, torch_detects, native", [
    ("flags : fpu avx2 avx512f avx512_bf16 amx_tile", set(), True),
    ("flags : fpu avx2 avx512f amx_bf16 amx_tile", set(), True),
    ("flags : fpu avx2 avx512f avx512_vnni", set(), False),  # AVX-512 without bf16: emulated
    ("flags : fpu avx2 fma", set(), False),
    (None, {"_is_avx512_bf16_supported"}, True),  # no /proc/cpuinfo (macOS, Windows): torch's detection
    (None, {"_is_amx_tile_supported"}, True),
    (None, set(), False),
])
def test_native_bf16_on_a_cpu(tmp_path, monkeypatch, cpuinfo, torch_detects, native):
    path = tmp_path / "cpuinfo"
    if cpuinfo is not None:
        path.write_text(f"processor : 0\n{cpuinfo}\n\nprocessor : 1\n{cpuinfo}\n")
    monkeypatch.setattr(models, "CPUINFO", path)
    for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, check, lambda found=check in torch_detects: found, raising=False)
    assert native_bf16(torch.device("cpu")) is native


@pytest.mark.parametrize("supported", [True, False])
def test_native_bf16_on_cuda_is_what_torch_says(monkeypatch, supported):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: supported)
    assert native_bf16(torch.device("cuda")) is supported


def test_native_bf16_elsewhere_is_off(monkeypatch):
    monkeypatch.setattr(models, "_cpu_bf16_features", lambda: {"amx_bf16"})  # even beside such a CPU
    assert native_bf16(torch.device("meta")) is False
