"""GGUF checkpoints (llama.cpp's single-file format): config, tokenizer and weights, as vLLM reads them.

    find_gguf_file(path)              a .gguf file, or the one .gguf in a directory; else None
    load_gguf_config(file)            transformers config from the metadata (`gguf_file=`)
    load_gguf_tokenizer(file)         tokenizer (and chat template) from the metadata
    iterate_gguf(file, dtype)         (Hugging Face name, dequantized tensor), one tensor at a time

Weights are dequantized at load with the `gguf` package's own kernels (gguf.quants) into `dtype`
and handed to the model's `load_weights` under Hugging Face names, so the model's name map and
weight loaders (fused qkv / gate_up, tensor-parallel shards) apply exactly as for safetensors.
Keeping the weights quantized on the device is the quantization layer's business, not this one's.

llama.cpp's converter permutes the rows of Q and K for its "llama" architecture (it rotates
interleaved pairs, Hugging Face rotates halves); `unpermute_rotary` puts them back (see there).
qwen2 / qwen3 files are written unpermuted (llama.cpp rotates those NEOX-style, i.e. by halves).
"""

from __future__ import annotations

import re
from collections.abc import Container, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pagedserve.model_executor.model_spec import complete_gguf_config

__all__ = [
    "GGUF_ARCHITECTURES",
    "SUPPORTED_QUANT_TYPES",
    "find_gguf_file",
    "is_gguf",
    "gguf_architecture",
    "load_gguf_config",
    "load_gguf_tokenizer",
    "gguf_to_hf_name",
    "unpermute_rotary",
    "iterate_gguf",
]

# general.architecture -> the Hugging Face class our registry builds. Mistral files are written by
# llama.cpp as "llama" (transformers tells them apart by general.name and sets model_type mistral).
GGUF_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_MODEL_TYPE_CLASS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                     "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# Architectures whose Q/K rows llama.cpp's converter permuted (its LlamaModel.modify_tensors).
_PERMUTED_ARCHS = frozenset({"llama"})

SUPPORTED_QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                         "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# GGUF tensor name pieces -> Hugging Face names (the layout every llama-family model shares).
_TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Tensors a GGUF may carry that the Hugging Face model derives from its config instead:
# rope_freqs holds Llama 3's rope-scaling factors (our rotary computes them from rope_scaling).
_DERIVED = frozenset({"rope_freqs.weight"})
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_TOP_RE = re.compile(r"^([a-z_]+)\.(weight|bias)$")


def is_gguf(path: str | Path) -> bool:
    """A file with the GGUF magic (b"GGUF"), whatever its name."""
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


def find_gguf_file(path: str | Path) -> str | None:
    """The GGUF checkpoint `path` names: the file itself, or the single *.gguf in a directory that
    holds no safetensors / PyTorch weights of its own. None when `path` is no GGUF checkpoint;
    ValueError when a directory holds several GGUF files (the user must pick one)."""
    p = Path(path).expanduser()
    if p.is_file():
        return str(p.resolve()) if is_gguf(p) else None
    if not p.is_dir():
        return None
    files = sorted(f for f in p.glob("*.gguf") if f.is_file())
    if not files or any(p.glob("*.safetensors")) or any(p.glob("*.bin")):
        return None
    if len(files) > 1:
        raise ValueError(f"{p} holds several GGUF files ({', '.join(f.name for f in files)}); "
                         f"pass the one to load as the model")
    return str(files[0].resolve())


def _reader(file: str) -> Any:
    try:
        from gguf import GGUFReader
    except ImportError:  # a declared dependency; say so plainly if an install lacks it
        raise ImportError("loading a GGUF checkpoint needs the `gguf` package: pip install gguf") from None
    return GGUFReader(file)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_architecture(reader: Any) -> str:
    """general.architecture of an open GGUFReader; ValueError naming it when unsupported."""
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: "
                         f"{', '.join(GGUF_ARCHITECTURES)}")
    return str(arch)


def _split(file: str) -> tuple[str, str]:
    p = Path(file)
    return str(p.parent), p.name


def _cache_dir(file: str, part: str) -> Path:
    """Where a GGUF file's converted config / tokenizer are kept: parsing the metadata (tens of
    thousands of vocabulary and merge entries) takes seconds, and a server reads it in two
    processes. Keyed by the file's path, size and mtime and the transformers version."""
    import hashlib
    import os

    import transformers

    st = os.stat(file)
    key = hashlib.sha256(f"{os.path.realpath(file)}|{st.st_size}|{st.st_mtime_ns}|"
                         f"{transformers.__version__}".encode()).hexdigest()[:20]
    root = Path(os.environ.get("PAGEDSERVE_CACHE") or Path.home() / ".cache" / "pagedserve")
    return root / "gguf" / key / part


def _store(target: Path, obj: Any) -> None:
    """save_pretrained into a temporary sibling, renamed into place (a crash or a concurrent
    writer never leaves a half-written entry); a cache that cannot be written is skipped."""
    import os
    import shutil
    import tempfile

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    except OSError:
        return
    try:
        obj.save_pretrained(str(tmp))
        os.replace(tmp, target)
    except OSError:
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_gguf_config(file: str) -> Any:
    """The transformers config of a GGUF file (transformers' GGUF metadata mapping), with
    `architectures` set so the model registry can pick the class. ValueError for an
    architecture we do not build (checked first, from the metadata alone)."""
    from transformers import AutoConfig

    cached = _cache_dir(file, "config")
    if (cached / "config.json").is_file():
        return AutoConfig.from_pretrained(str(cached))
    reader = _reader(file)
    arch = gguf_architecture(reader)
    folder, name = _split(file)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    # The per-head size, as llama.cpp's converter states it whenever the checkpoint named one:
    # transformers maps it for llama only (from rope.dimension_count) and would leave qwen2 / qwen3
    # at their config classes' defaults (hidden / heads, 128).
    head_dim = _field(reader, f"{arch}.attention.key_length")
    complete_gguf_config(config, None if head_dim is None else int(head_dim), _MODEL_TYPE_CLASS, file)
    _store(cached, config)
    return config


def load_gguf_tokenizer(file: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer embedded in a GGUF file's metadata (vocabulary, merges, special tokens and
    the chat template), rebuilt by transformers as a fast tokenizer (and kept converted)."""
    from transformers import AutoTokenizer

    cached = _cache_dir(file, "tokenizer")
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached), trust_remote_code=trust_remote_code)
    folder, name = _split(file)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=trust_remote_code)
    _store(cached, tokenizer)
    return tokenizer


def gguf_to_hf_name(name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor ("blk.3.attn_q.weight" ->
    "model.layers.3.self_attn.q_proj.weight"); None for tensors derived from the config;
    ValueError for a name we cannot place."""
    if name in _DERIVED:
        return None
    m = _BLOCK_RE.match(name)
    if m and m.group(2) in _BLOCK:
        return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"
    m = _TOP_RE.match(name)
    if m and m.group(1) in _TOP_LEVEL:
        return f"{_TOP_LEVEL[m.group(1)]}.{m.group(2)}"
    raise ValueError(f"GGUF tensor {name!r} has no Hugging Face counterpart in the llama layout")


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (its convert_hf_to_gguf `permute`).

    Rows of one head (head_dim = 2 * half), Hugging Face order vs GGUF order:

        HF:    [x0 x1 ... x(half-1) | y0 y1 ... y(half-1)]   rotary pairs (x_i, y_i) by halves
        GGUF:  [x0 y0 x1 y1 ... x(half-1) y(half-1)]         pairs interleaved

    GGUF rows viewed as (n_heads, half, 2, ...) and transposed to (n_heads, 2, half, ...) give
    the HF order back. Works for a weight [n_heads*head_dim, in] and a bias [n_heads*head_dim].
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"cannot unpermute {tuple(w.shape)} over {n_heads} heads")
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def _dequantize(tensor: Any) -> np.ndarray:
    """A ReaderTensor as float32 numpy in row-major Hugging Face shape (GGUF lists dims inner-first)."""
    from gguf import quants

    qtype = tensor.tensor_type
    if qtype.name not in SUPPORTED_QUANT_TYPES:
        raise ValueError(f"GGUF tensor {tensor.name!r} has quantization type {qtype.name}, which is not "
                         f"supported; supported: {', '.join(SUPPORTED_QUANT_TYPES)}")
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    values = np.asarray(quants.dequantize(tensor.data, qtype), dtype=np.float32)
    if not values.flags.writeable:  # F32 data is the read-only memory map itself: copy this one tensor
        values = values.copy()
    return values.reshape(shape)


def iterate_gguf(file: str, dtype: torch.dtype = torch.float32, show_progress: bool = False,
                 keep_quantized: Container[str] = ()) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Hugging Face name, CPU tensor in `dtype`) for each tensor of a GGUF file, one at a
    time: the file is memory-mapped and each tensor dequantized only when its turn comes, so at
    most one float32 copy of one tensor exists beside the model. Every tensor's type is checked
    before the first is yielded, so an unsupported one fails before any weight is copied.

    Weights named in `keep_quantized` (quantization/gguf_quant.py decides, while the model is
    built) come as their raw blocks instead, uint8 [rows, row bytes] under "<module>.qweight";
    Q/K rows are un-permuted all the same (whole rows of blocks: exact)."""
    from tqdm.auto import tqdm

    reader = _reader(file)
    arch = gguf_architecture(reader)
    bad = sorted({t.tensor_type.name for t in reader.tensors} - set(SUPPORTED_QUANT_TYPES))
    if bad:
        raise ValueError(f"GGUF file {file!r} holds tensors of quantization type(s) {', '.join(bad)}, "
                         f"which are not supported; supported: {', '.join(SUPPORTED_QUANT_TYPES)}")
    heads = {"attn_q": _field(reader, f"{arch}.attention.head_count"),
             "attn_k": _field(reader, f"{arch}.attention.head_count_kv")}
    if heads["attn_k"] is None:
        heads["attn_k"] = heads["attn_q"]
    for tensor in tqdm(reader.tensors, desc="Loading GGUF weights", unit="tensor", disable=not show_progress):
        hf_name = gguf_to_hf_name(tensor.name)
        if hf_name is None:
            continue
        raw = hf_name in keep_quantized
        # raw: the blocks as stored, (rows, row bytes) uint8, copied out of the read-only map
        weight = torch.from_numpy(np.array(tensor.data) if raw else _dequantize(tensor))
        m = _BLOCK_RE.match(tensor.name)
        if arch in _PERMUTED_ARCHS and m and m.group(2) in heads:
            weight = unpermute_rotary(weight, int(heads[m.group(2)]))
        if raw:
            yield hf_name.removesuffix("weight") + "qweight", weight
        else:
            yield hf_name, weight.to(dtype)
