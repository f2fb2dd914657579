"""`--quant auto`: the bundled Q4_1 GGUF is served as int4, exactly its own weights.

`resolve_quant` reads the GGUF's layer types (cached in the converted folder)
and picks int4 only where a fused int4 kernel runs; int4 must then reproduce
the file's dequantized weights bit for bit, which is why it may be the default.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from backend.executor.quant import dequantize_int4, quantize_int4
from backend.models import loader
from backend.models.loader import (
    LAYER_TYPES_FILE,
    model_source,
    read_safetensors,
    resolve_model_dir,
    resolve_quant,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bundled() -> tuple[Path, Path]:
    """The bundled GGUF file and its converted folder."""
    return model_source(None), resolve_model_dir(None)


def test_auto_serves_the_bundled_q4_1_file_as_int4_on_a_bfloat16_cpu(
    bundled: tuple[Path, Path],
) -> None:
    source, model_dir = bundled
    assert resolve_quant("auto", source, model_dir, CPU, torch.bfloat16) == "int4"
    assert json.loads((model_dir / LAYER_TYPES_FILE).read_text()) == ["Q4_1"]


def test_auto_stays_unquantized_where_int4_would_dequantize_per_call(
    bundled: tuple[Path, Path],
) -> None:
    source, model_dir = bundled
    assert resolve_quant("auto", source, model_dir, CPU, torch.float32) == "none"


@pytest.mark.parametrize("triton", [True, False])
def test_auto_on_cuda_needs_the_triton_int4_kernel(
    bundled: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, triton: bool
) -> None:
    # Without Triton, int4 on CUDA dequantizes every weight per call.
    source, model_dir = bundled
    monkeypatch.setattr(loader, "triton_kernels_supported", lambda device: triton)
    expected = "int4" if triton else "none"
    assert (
        resolve_quant("auto", source, model_dir, torch.device("cuda"), torch.bfloat16) == expected
    )


@pytest.mark.parametrize("quant", ["none", "int4", "fp8", "int8"])
def test_an_explicit_quant_is_kept(bundled: tuple[Path, Path], quant: str) -> None:
    source, model_dir = bundled
    assert resolve_quant(quant, source, model_dir, CPU, torch.bfloat16) == quant  # type: ignore[arg-type]


def test_auto_stays_unquantized_for_a_gguf_with_other_layer_types(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "f16.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.attn_q.weight", np.ones((8, 32), dtype=np.float16))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(32, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    converted = tmp_path / "converted"
    converted.mkdir()
    assert resolve_quant("auto", path, converted, CPU, torch.bfloat16) == "none"
    assert json.loads((converted / LAYER_TYPES_FILE).read_text()) == ["F16"]


def test_auto_stays_unquantized_for_a_safetensors_folder(
    bundled: tuple[Path, Path],
) -> None:
    _, model_dir = bundled
    assert resolve_quant("auto", model_dir, model_dir, CPU, torch.bfloat16) == "none"


def test_the_cached_layer_types_are_what_auto_reads(
    tmp_path: Path, bundled: tuple[Path, Path]
) -> None:
    source, _ = bundled
    converted = tmp_path / "converted"
    converted.mkdir()
    # A cache that says otherwise wins: the file is not read again.
    (converted / LAYER_TYPES_FILE).write_text(json.dumps(["Q8_0"]))
    assert resolve_quant("auto", source, converted, CPU, torch.bfloat16) == "none"


def test_int4_reproduces_every_layer_matrix_of_the_bundled_file_exactly(
    bundled: tuple[Path, Path],
) -> None:
    _, model_dir = bundled
    state = read_safetensors(model_dir, CPU)
    matrices = {k: w for k, w in state.items() if k.startswith("model.layers.") and w.dim() == 2}
    assert len(matrices) == 7 * 30
    for name, weight in matrices.items():
        packed, scales, mins = quantize_int4(weight, 32)
        back = dequantize_int4(packed, scales, mins, torch.float32)
        assert torch.equal(back, weight), name
