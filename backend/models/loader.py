"""Find, convert and load model weights.

A GGUF file is converted once into a Hugging Face safetensors folder under the cache
directory (`$TOLLGATE_CACHE_DIR`, default `~/.cache/tollgate`, then
`models/<stem>-<key>`); the key hashes the file size and its first megabytes, so a
copied or touched file maps to the same folder and a different file to a new one.
The folder is written under a temporary name and renamed into place, so concurrent
processes either see a complete folder or none, and the loser of a race discards
its copy. A folder path is used as is.

Loading builds the model on the meta device and assigns tensors read from the
memory-mapped safetensors files, so no time is spent initializing weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from backend.config import Quant, WeightQuant
from backend.executor.kernels import triton_kernels_supported
from backend.executor.packed_linear import pack_linears, packing_applies
from backend.executor.quant import (
    int8_unavailable_reason,
    prepare_cpu_int4_kernels,
    prepare_cpu_int8_kernels,
    quantizable_linears,
    quantize_state_dict,
    swap_linears,
)
from backend.models.bundled import bundled_gguf_path
from backend.models.llama import LlamaConfig, LlamaForCausalLM

CONVERTER_VERSION = 1
"""Bump when the converted folder's layout changes, so old conversions are not reused."""
HASHED_PREFIX_BYTES = 8 * 1024 * 1024
GGUF_MAGIC = b"GGUF"
LAYER_TYPES_FILE = "gguf-layer-types.json"


class ModelNotFoundError(FileNotFoundError):
    """The model path is neither a GGUF file nor a folder with `config.json`."""


def cache_root() -> Path:
    """The Tollgate cache directory (`$TOLLGATE_CACHE_DIR` or `~/.cache/tollgate`)."""
    configured = os.environ.get("TOLLGATE_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "tollgate"


def is_gguf(path: Path) -> bool:
    """True when `path` is a file starting with the GGUF magic bytes."""
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC


def gguf_cache_key(path: Path) -> str:
    """A short key identifying a GGUF file's content (size + first megabytes)."""
    digest = hashlib.sha256(f"v{CONVERTER_VERSION}:{path.stat().st_size}:".encode())
    with path.open("rb") as f:
        digest.update(f.read(HASHED_PREFIX_BYTES))
    return digest.hexdigest()[:16]


def model_source(path: str | None) -> Path:
    """The file or folder `path` names (None means the bundled GGUF file)."""
    return bundled_gguf_path() if path is None else Path(path).expanduser()


def gguf_layer_types(gguf: Path, model_dir: Path) -> frozenset[str]:
    """The storage types (GGML names such as "Q4_1") of the GGUF file's layer
    matrices, cached in its converted folder: reading them parses the file's
    whole header, vocabulary included, about 2 s for the bundled model."""
    cached = model_dir / LAYER_TYPES_FILE
    try:
        return frozenset(json.loads(cached.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        pass
    from gguf import GGUFReader

    types = sorted(
        {
            t.tensor_type.name
            for t in GGUFReader(str(gguf)).tensors
            if t.name.startswith("blk.") and len(t.shape) == 2
        }
    )
    staging = cached.with_name(f".{cached.name}.{os.getpid()}")
    try:
        staging.write_text(json.dumps(types), encoding="utf-8")
        staging.replace(cached)
    except OSError:  # a read-only cache only costs the next start the 2 s again
        staging.unlink(missing_ok=True)
    return frozenset(types)


def resolve_quant(
    quant: Quant, source: Path, model_dir: Path, device: torch.device, dtype: torch.dtype
) -> WeightQuant:
    """What `quant` means for this checkpoint and device.

    "auto" is int4 for a GGUF file whose layer matrices are all Q4_1, where a
    fused int4 kernel runs (CUDA with the Triton kernels, or a bfloat16 model on
    CPU; elsewhere int4 dequantizes every weight per call), and "none" otherwise. Q4_1 keeps a
    scale and a minimum per group of 32 weights with 4-bit codes, int4's own
    layout (`backend.executor.quant`), and llama.cpp sets each group's scale and
    minimum from its extreme weights, so re-quantizing the dequantized file
    recovers the file's own codes: int4 serves exactly the file's weights, in a
    quarter of bfloat16's bytes. Other 4-bit types (Q4_0, Q4_K) do not survive
    that round trip unchanged, and wider ones would lose precision.
    """
    if quant != "auto":
        return quant
    fused = (device.type == "cuda" and triton_kernels_supported(device)) or (
        device.type == "cpu" and dtype == torch.bfloat16
    )
    if fused and is_gguf(source) and gguf_layer_types(source, model_dir) == {"Q4_1"}:
        return "int4"
    return "none"


def resolve_model_dir(path: str | None) -> Path:
    """Return a safetensors model folder for `path` (None means the bundled model)."""
    source = model_source(path)
    if source.is_dir():
        if not (source / "config.json").is_file():
            raise ModelNotFoundError(f"{source} has no config.json")
        return source
    if not is_gguf(source):
        raise ModelNotFoundError(f"{source} is neither a GGUF file nor a model folder")
    target = cache_root() / "models" / f"{source.stem}-{gguf_cache_key(source)}"
    if not target.is_dir():
        convert_gguf(source, target)
    return target


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF checkpoint into a float32 safetensors folder at `target`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = [type(model).__name__]
        config["dtype"] = "float32"
        (staging / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        tied = bool(config.get("tie_word_embeddings"))
        tensors = {
            name: tensor.detach().contiguous()
            for name, tensor in model.state_dict().items()
            if not (tied and name == "lm_head.weight")
        }
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(str(staging))
        # mkdtemp makes a private folder; the cache is meant to be readable like any other.
        staging.chmod(0o755)
        for file in staging.iterdir():
            file.chmod(0o644)
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def read_safetensors(model_dir: Path, device: torch.device | str) -> dict[str, Tensor]:
    """Read every `*.safetensors` file in the folder (memory-mapped) onto `device`."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"{model_dir} has no .safetensors files")
    state: dict[str, Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                state[name] = f.get_tensor(name)
    return state


def convert_hf_state_dict(state: Mapping[str, Tensor], config: LlamaConfig) -> dict[str, Tensor]:
    """Map Hugging Face parameter names onto `LlamaForCausalLM`'s, fusing QKV and gate/up."""
    out = {
        "tok_embeddings.weight": state["model.embed_tokens.weight"],
        "norm.weight": state["model.norm.weight"],
    }
    tied = config.tie_word_embeddings or "lm_head.weight" not in state
    out["output.weight"] = out["tok_embeddings.weight"] if tied else state["lm_head.weight"]
    fused = {
        "attention.wqkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "attention.wo": ("self_attn.o_proj",),
        "feed_forward.w13": ("mlp.gate_proj", "mlp.up_proj"),
        "feed_forward.w2": ("mlp.down_proj",),
        "attention_norm": ("input_layernorm",),
        "ffn_norm": ("post_attention_layernorm",),
    }
    for i in range(config.num_layers):
        for ours, theirs in fused.items():
            for kind in ("weight", "bias"):
                parts = [state.get(f"model.layers.{i}.{name}.{kind}") for name in theirs]
                found = [p for p in parts if p is not None]
                if found:
                    merged = found[0] if len(found) == 1 else torch.cat(found, dim=0)
                    out[f"layers.{i}.{ours}.{kind}"] = merged
    return out


def load_model(
    model_dir: Path,
    dtype: torch.dtype,
    device: torch.device | str,
    quant: WeightQuant = "none",
    max_positions: int | None = None,
) -> LlamaForCausalLM:
    """Build the model on the meta device and load the folder's weights into it.

    Raises ValueError for a quantization the device cannot run (int8 off the CPU)
    before any weights are read.
    """
    if quant == "int8" and (reason := int8_unavailable_reason(torch.device(device))):
        raise ValueError(reason)
    config = LlamaConfig.from_file(model_dir / "config.json")
    state = convert_hf_state_dict(read_safetensors(model_dir, device), config)
    return assemble_model(config, state, dtype, device, quant, max_positions)


def assemble_model(
    config: LlamaConfig,
    state: Mapping[str, Tensor],
    dtype: torch.dtype,
    device: torch.device | str,
    quant: WeightQuant = "none",
    max_positions: int | None = None,
) -> LlamaForCausalLM:
    """Build the model on the meta device and assign `state` (our parameter names,
    already on `device`), cast to `dtype` or quantized with `quant`.
    """
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    names: list[str] = []
    if quant == "none":
        weights = {k: v.to(dtype) for k, v in state.items()}
    else:
        names = quantizable_linears(model, quant)
        weights = quantize_state_dict(state, names, quant, dtype)
        with torch.device("meta"):
            swap_linears(model, names, quant, dtype)
    if config.tie_word_embeddings and "output" not in names:
        weights["output.weight"] = weights["tok_embeddings.weight"]
    model.load_state_dict(weights, strict=True, assign=True)
    if quant == "int4":
        prepare_cpu_int4_kernels(model)
    elif quant == "int8":
        prepare_cpu_int8_kernels(model)
    if packing_applies(torch.device(device), dtype):
        # Whatever stays a plain bfloat16 linear: every linear without `quant`,
        # and with int4 or fp8 the full-precision `output`, the largest matrix.
        pack_linears(model)
    model.setup_rope(device, max_positions)
    model.requires_grad_(False)
    return model.eval()
