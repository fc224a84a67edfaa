"""`auto` precision: bfloat16 only where its matmuls are fast (CUDA, a CPU with AMX or AVX512-BF16)."""

import pytest
import torch

from vigu_cli.precision import resolve_dtype
from vigu_cli.recipe import StageSection
from vigu_cli.train import mixed_precision

CPU = torch.device("cpu")


@pytest.mark.parametrize("amx, bf16_instructions, dtype, autocast", [
    (True, False, torch.bfloat16, "bf16"),
    (False, True, torch.bfloat16, "bf16"),
    (False, False, torch.float32, "no"),  # an AVX2 CPU emulates bfloat16, ~80x slower than float32
])
def test_auto_is_bfloat16_only_on_a_cpu_with_bfloat16_instructions(monkeypatch, amx, bf16_instructions, dtype,
                                                                   autocast):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16_instructions)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_dtype("auto", CPU) == dtype
    assert mixed_precision(StageSection(mixed_precision="auto")) == autocast
    assert resolve_dtype("float16", CPU) == torch.float16
    assert mixed_precision(StageSection(mixed_precision="no")) == "no"
