"""GGUF loading on small files written here with gguf.GGUFWriter: the name map, the Q/K rotary
permutation undone, every supported quant type dequantized, and clear errors for the rest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package (a declared dependency) is not installed")

from pagedserve.config import EngineArgs  # noqa: E402
from pagedserve.model_executor.gguf_loader import (  # noqa: E402
    SUPPORTED_QUANT_TYPES,
    find_gguf_file,
    gguf_to_hf_name,
    iterate_gguf,
    load_gguf_config,
    unpermute_rotary,
)
from pagedserve.model_executor.loader import load_model, resolve_model_dir  # noqa: E402
from pagedserve.testing.checkpoints import build_checkpoint  # noqa: E402
from pagedserve.testing.gguf_files import (  # noqa: E402
    llama_cpp_permute,
    random_block_bytes,
    write_gguf_from_hf,
    write_tensors,
)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGEDSERVE_CACHE", str(tmp_path / "cache"))  # converted metadata goes here


def test_name_map() -> None:
    assert gguf_to_hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert gguf_to_hf_name("output_norm.weight") == "model.norm.weight"
    assert gguf_to_hf_name("output.weight") == "lm_head.weight"
    assert gguf_to_hf_name("blk.12.attn_q.bias") == "model.layers.12.self_attn.q_proj.bias"
    assert gguf_to_hf_name("blk.0.attn_output.weight") == "model.layers.0.self_attn.o_proj.weight"
    assert gguf_to_hf_name("blk.3.attn_k_norm.weight") == "model.layers.3.self_attn.k_norm.weight"
    assert gguf_to_hf_name("blk.1.ffn_norm.weight") == "model.layers.1.post_attention_layernorm.weight"
    assert gguf_to_hf_name("blk.1.ffn_down.weight") == "model.layers.1.mlp.down_proj.weight"
    assert gguf_to_hf_name("rope_freqs.weight") is None  # derived from the config's rope scaling
    with pytest.raises(ValueError, match="blk.0.ffn_gate_exps.weight"):
        gguf_to_hf_name("blk.0.ffn_gate_exps.weight")


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_unpermute_inverts_llama_cpp_permutation(heads: int) -> None:
    w = np.random.default_rng(heads).standard_normal((heads * 8, 5)).astype(np.float32)
    permuted = llama_cpp_permute(w, heads)
    assert not np.array_equal(permuted, w)
    assert torch.equal(unpermute_rotary(torch.from_numpy(permuted), heads), torch.from_numpy(w))
    bias = w[:, 0].copy()  # a 1-D bias row set goes the same way
    assert torch.equal(unpermute_rotary(torch.from_numpy(llama_cpp_permute(bias, heads)), heads),
                       torch.from_numpy(bias))
    with pytest.raises(ValueError, match="cannot unpermute"):
        unpermute_rotary(torch.zeros(heads * 8 + 1, 3), heads)


# (our arch, GGUF general.architecture, general.name): llama.cpp writes Mistral as "llama";
# transformers reads such a file as Mistral when general.name is "mistral" (else as Llama, the
# same network but for the sliding window, which llama.cpp's llama architecture does not apply).
CASES = [("llama", "llama", "tiny llama"), ("mistral", "llama", "mistral"),
         ("qwen2", "qwen2", "tiny qwen2"), ("qwen3", "qwen3", "tiny qwen3")]


@pytest.mark.parametrize("arch,gguf_arch,name", CASES, ids=[c[0] for c in CASES])
def test_gguf_loads_the_same_weights_as_safetensors(tmp_path: Path, arch: str, gguf_arch: str,
                                                    name: str) -> None:
    from transformers import AutoModelForCausalLM

    ckpt = build_checkpoint(str(tmp_path / arch), arch)
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    file = write_gguf_from_hf(hf, str(tmp_path / f"{arch}.gguf"), arch=gguf_arch, name=name)
    config = load_gguf_config(file)
    assert config.model_type == arch and config.architectures == [type(hf).__name__]
    assert config.head_dim == hf.config.head_dim != config.hidden_size // config.num_attention_heads
    ours = load_model(file, torch.float32, "cpu", show_progress=False)
    ref = load_model(ckpt, torch.float32, "cpu", show_progress=False)
    a, b = dict(ours.model.named_parameters()), dict(ref.model.named_parameters())
    assert a.keys() == b.keys()
    for key in a:  # F32 file: exact, so every name and every un-permuted Q/K row is in place
        assert torch.equal(a[key], b[key]), key
    again = load_gguf_config(file)  # from the converted-metadata cache this time
    drop = {"_name_or_path"}  # where it was read from
    assert {k: v for k, v in again.to_dict().items() if k not in drop} == {
        k: v for k, v in config.to_dict().items() if k not in drop}


def test_transformers_reads_our_llama_file_as_the_original(tmp_path: Path) -> None:
    """The oracle agrees on the permutation convention: transformers un-permutes our llama.cpp-style
    file back to the original weights too."""
    from transformers import AutoModelForCausalLM

    ckpt = build_checkpoint(str(tmp_path / "llama"), "llama")
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    file = Path(write_gguf_from_hf(hf, str(tmp_path / "m.gguf")))
    back = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32)
    for key, value in hf.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def _quantized_tensor(qtype: str, rows: int = 4, cols: int = 512) -> tuple[np.ndarray, np.ndarray | None]:
    """(data to write, the float values it approximates or None for raw K-quant blocks)."""
    if qtype.endswith("_K"):
        return random_block_bytes(qtype, rows, cols, seed=len(qtype)), None
    w = np.random.default_rng(7).standard_normal((rows, cols)).astype(np.float32)
    return w, w


TOLERANCE = {"F32": 0.0, "F16": 2e-3, "BF16": 2e-2, "Q8_0": 3e-2, "Q5_0": 0.25, "Q5_1": 0.2,
             "Q4_0": 0.5, "Q4_1": 0.4}


@pytest.mark.parametrize("qtype", SUPPORTED_QUANT_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_supported_type_dequantizes(tmp_path: Path, qtype: str, dtype: torch.dtype) -> None:
    data, original = _quantized_tensor(qtype)
    file = write_tensors(str(tmp_path / "t.gguf"), [("blk.0.ffn_up.weight", data, qtype),
                                                    ("blk.0.ffn_norm.weight", np.ones(512, np.float32), "F32")])
    got = dict(iterate_gguf(file, dtype))
    assert set(got) == {"model.layers.0.mlp.up_proj.weight", "model.layers.0.post_attention_layernorm.weight"}
    w = got["model.layers.0.mlp.up_proj.weight"]
    assert w.shape == (4, 512) and w.dtype == dtype and torch.isfinite(w).all()
    # The values are the gguf package's own dequantization of the bytes in the file.
    reader = gguf.GGUFReader(file)
    expected = gguf.quants.dequantize(reader.tensors[0].data, reader.tensors[0].tensor_type).reshape(4, 512)
    assert torch.equal(w, torch.from_numpy(np.array(expected, dtype=np.float32)).to(dtype))
    if original is not None:  # and they approximate what was quantized, within the type's error
        err = (w.float() - torch.from_numpy(original)).abs().max().item()
        assert err <= TOLERANCE[qtype] + (1e-2 if dtype == torch.bfloat16 else 0.0), err
    else:
        assert w.float().std() > 0  # K-quant blocks decode to varied values, not a constant


@pytest.mark.parametrize("qtype", ["IQ4_NL", "TQ2_0", "Q8_1"])
def test_unsupported_quant_type_is_named(tmp_path: Path, qtype: str) -> None:
    cols = 256
    file = write_tensors(str(tmp_path / "t.gguf"), [
        ("blk.0.ffn_norm.weight", np.ones(cols, np.float32), "F32"),
        ("blk.0.ffn_up.weight", random_block_bytes(qtype, 2, cols), qtype)])
    weights = iterate_gguf(file)
    with pytest.raises(ValueError, match=f"quantization type.*{qtype}.*supported: F32"):
        next(weights)  # refused before the first (supported) tensor is handed out


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    file = write_tensors(str(tmp_path / "g.gguf"), [("token_embd.weight", np.ones((8, 4), np.float32), "F32")],
                         arch="gpt2", metadata={"block_count": 1})
    with pytest.raises(ValueError, match="GGUF architecture 'gpt2' is not supported; supported: llama"):
        load_gguf_config(file)
    with pytest.raises(ValueError, match="'gpt2'"):
        next(iterate_gguf(file))


def test_gguf_file_discovery_and_engine_config(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    ckpt = build_checkpoint(str(tmp_path / "hf"), "llama")
    folder = tmp_path / "gguf_dir"
    folder.mkdir()
    file = write_gguf_from_hf(AutoModelForCausalLM.from_pretrained(ckpt), str(folder / "model-f32.gguf"))
    assert find_gguf_file(file) == file and find_gguf_file(folder) == file
    assert find_gguf_file(ckpt) is None  # a safetensors checkpoint stays one
    assert resolve_model_dir(file) == file
    (tmp_path / "not.gguf").write_bytes(b"nope")
    with pytest.raises(ValueError, match="is a file; expected a checkpoint directory or a .gguf file"):
        resolve_model_dir(str(tmp_path / "not.gguf"))
    config = EngineArgs(model=str(folder), tokenizer=ckpt, max_model_len=64).create_engine_config()
    mc: Any = config.model_config
    assert mc.model_dir == file and mc.tokenizer == ckpt and mc.model_spec.head_dim == 32
    (folder / "second.gguf").write_bytes(Path(file).read_bytes())
    with pytest.raises(ValueError, match="several GGUF files"):
        find_gguf_file(folder)
