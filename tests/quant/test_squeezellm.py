"""SqueezeLLM checkpoints packed by the test packer: the loaded layers decode to exactly the
packer's weights (fused qkv / gate_up from separate shards), and the quantized tiny model's
greedy tokens equal those of a float32 model holding the dequantized weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.kernels.reference_lut import dequantize_lut, lut_matmul
from pagedserve.kernels.reference_quant import pack_along_rows
from pagedserve.model_executor.loader import load_model
from pagedserve.model_executor.quantization.squeezellm import SqueezeLLMConfig, SqueezeLLMLinearMethod
from pagedserve.testing.quant_pack import write_dequantized_checkpoint
from pagedserve.testing.quant_pack.squeezellm import pack_squeezellm, squeezellm_quantize

# our merged layer -> the checkpoint projections stacked into it, in order
PARTS = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"],
         "o_proj": ["o_proj"], "down_proj": ["down_proj"]}


def test_lut_layout_by_hand() -> None:
    """w[k, n] = lut[n, idx[k, n]], indices packed along K in GPTQ bit order."""
    idx = torch.tensor([[(3 * k + 5 * n) % 16 for n in range(3)] for k in range(16)])  # [K=16, N=3]
    lut = torch.arange(48, dtype=torch.float16).reshape(3, 16) * 0.5
    qweight = pack_along_rows(idx, 4)
    assert qweight.shape == (2, 3) and int(qweight[0, 0]) & 0xF == idx[0, 0]
    assert (int(qweight[1, 2]) >> 28) & 0xF == idx[15, 2]
    w = dequantize_lut(qweight, lut)  # [N, K]
    for k in range(16):
        for n in range(3):
            assert w[n, k] == lut[n, idx[k, n]]
    x = torch.randn(2, 16)
    torch.testing.assert_close(lut_matmul(x, qweight, lut), x @ w.float().t(), rtol=0, atol=0)


def test_packer_round_trip() -> None:
    w = torch.randn(6, 64)
    q = squeezellm_quantize("m", w)
    assert q.tensors["qweight"].shape == (8, 6) and q.tensors["qweight"].dtype == torch.int32
    assert q.tensors["lookup_table"].shape == (6, 16) and q.tensors["lookup_table"].dtype == torch.float16
    assert torch.equal(dequantize_lut(q.tensors["qweight"], q.tensors["lookup_table"]).float(), q.dequantized)
    # nearest table entry: no weight lies closer to another entry than to its own
    err = (q.dequantized - w).abs()
    table = q.tensors["lookup_table"].float()
    assert torch.all(err <= (w[:, :, None] - table[:, None, :]).abs().min(dim=2).values + 1e-6)


def test_config_is_validated() -> None:
    assert SqueezeLLMConfig.from_config({"quant_method": "squeezellm", "wbits": 4}).weight_bits == 4
    with pytest.raises(ValueError, match="wbits: 4"):
        SqueezeLLMConfig.from_config({"quant_method": "squeezellm", "wbits": 3})


@pytest.fixture(scope="module")
def packed(tiny_checkpoints: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for arch in ("llama", "qwen2"):
        root = tmp_path_factory.mktemp(f"sq_{arch}")
        deq = pack_squeezellm(tiny_checkpoints[arch], root / "q")
        write_dequantized_checkpoint(tiny_checkpoints[arch], root / "f", deq)
        out[arch] = (str(root / "q"), str(root / "f"), deq)
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_loaded_weights_equal_the_packers(packed: dict[str, Any], arch: str) -> None:
    quant_dir, _, deq = packed[arch]
    assert json.loads((Path(quant_dir) / "config.json").read_text())["quantization_config"]["wbits"] == 4
    loaded = load_model(quant_dir, torch.float32, "cpu", show_progress=False)
    assert isinstance(loaded.quant_config, SqueezeLLMConfig)
    seen = 0
    for name, module in loaded.model.named_modules():
        last = name.rpartition(".")[2]
        if last not in PARTS:
            continue
        assert isinstance(module.linear_method, SqueezeLLMLinearMethod), name
        head = name.rpartition(".")[0].replace(".self_attn", "").replace(".mlp", "")
        sub = "self_attn" if last in ("qkv_proj", "o_proj") else "mlp"
        want = torch.cat([deq[f"{head}.{sub}.{p}.weight"] for p in PARTS[last]], dim=0)
        assert torch.equal(dequantize_lut(module.qweight, module.lookup_table).float(), want), name
        seen += 1
    assert seen == 4 * 2  # 4 projections x 2 layers
    assert not hasattr(loaded.model.lm_head, "qweight")  # lm_head stays unquantized


def test_greedy_equals_float_model_with_dequantized_weights(packed: dict[str, Any]) -> None:
    quant_dir, float_dir, _ = packed["qwen2"]  # qwen2: biases on q/k/v ride along
    params = SamplingParams(temperature=0.0, max_tokens=12)
    kwargs: dict[str, Any] = dict(dtype="float32", max_model_len=128, kv_cache_memory_bytes=2 << 20)
    prompts = ["the cat runs", "a dog"]
    want = [o.outputs[0].token_ids for o in LLM(model=float_dir, **kwargs).generate(prompts, params)]
    got = [o.outputs[0].token_ids for o in LLM(model=quant_dir, quantization="squeezellm",
                                               **kwargs).generate(prompts, params)]
    assert got == want
    assert all(len(t) == 12 for t in got)


def test_triton_kernels_in_the_model(packed: dict[str, Any]) -> None:
    """The quantized model on the Triton lut_matmul (interpreted on CPU) gives the torch path's
    logits: decode steps take the fused LUT GEMV (the norm and, on gate_up, the SiLU-and-mul
    folded in), prefill chunks the plain fused kernel."""
    pytest.importorskip("triton")
    import dataclasses

    from pagedserve.kernels.registry import TORCH_KERNELS
    from pagedserve.kernels.triton.lut_gemv import FUSED_MAX_TOKENS
    from pagedserve.kernels.triton.lut_gemv import lut_matmul as triton_lut_matmul
    from tests.models.test_tensor_parallel import _steps, run_steps

    quant_dir = packed["qwen2"][0]
    kernels = dataclasses.replace(TORCH_KERNELS, lut_matmul=triton_lut_matmul,
                                  lut_fused_max_tokens=FUSED_MAX_TOKENS)
    plain: Any = load_model(quant_dir, torch.float32, "cpu", show_progress=False).model
    fast = load_model(quant_dir, torch.float32, "cpu", show_progress=False, kernels=kernels).model
    steps = _steps(plain.spec.vocab_size)[:3]  # prefills of 19-21 rows, one decode step of 3
    for g, w in zip(run_steps(fast, steps), run_steps(plain, steps), strict=True):
        for req in w:
            torch.testing.assert_close(g[req], w[req], atol=1e-4, rtol=1e-4)


def test_tensor_parallel_matches_tp1(packed: dict[str, Any]) -> None:
    from pagedserve.model_executor.layers.context import ParallelGroup
    from tests.models.test_tensor_parallel import _steps, run_steps
    from tests.models.thread_comm import ThreadGroup

    quant_dir = packed["llama"][0]
    one: Any = load_model(quant_dir, torch.float32, "cpu", show_progress=False).model
    steps = _steps(one.spec.vocab_size)
    want = run_steps(one, steps)
    group = ThreadGroup(2)
    models = [load_model(quant_dir, torch.float32, "cpu", show_progress=False,
                         parallel=ParallelGroup(r, 2, group.comm(r))).model for r in range(2)]
    per_rank = group.run(lambda rank: run_steps(models[rank], steps, 1))
    for got in per_rank:
        for g, w in zip(got, want, strict=True):
            for req in w:
                torch.testing.assert_close(g[req], w[req], atol=1e-4, rtol=1e-4)


def test_published_quant_config_json_without_method(tiny_checkpoints: Any, tmp_path: Path) -> None:
    """SqueezeLLM's released checkpoints carry quant_config.json {"wbits": 4} without a
    quant_method: quantization="squeezellm" names it (as with vLLM's --quantization squeezellm)."""
    from pagedserve.testing.quant_pack import quantize_checkpoint

    deq = quantize_checkpoint(tiny_checkpoints["llama"], tmp_path / "q", squeezellm_quantize, {"wbits": 4},
                              config_location="quant_config.json")
    with pytest.raises(ValueError, match="names no quant_method; pass quantization="):
        load_model(str(tmp_path / "q"), torch.float32, "cpu", show_progress=False)
    loaded = load_model(str(tmp_path / "q"), torch.float32, "cpu", show_progress=False, quantization="squeezellm")
    down = dict(loaded.model.named_modules())["model.layers.1.mlp.down_proj"]
    assert torch.equal(dequantize_lut(down.qweight, down.lookup_table).float(),
                       deq["model.layers.1.mlp.down_proj.weight"])
