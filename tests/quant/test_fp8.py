"""FP8 (e4m3) checkpoints in vLLM's "fp8" format and `quantization="fp8"` at load time.

A tiny llama checkpoint is packed by the test packer (round-to-nearest into e4m3, per-tensor or
per-channel weight scales, dynamic or static activation scales, some modules ignored); loading
it gives exactly the packer's dequantized weights, and the model computes what an unquantized
float32 model holding those weights computes (for static activation scales: the same model with
its projection inputs rounded through e4m3 with the checkpoint's input scales). Two engines
through `pagedserve.LLM` give the same greedy tokens (an fp8 checkpoint; fp8 at load time).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor

from pagedserve import LLM, EngineArgs, SamplingParams
from pagedserve.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from pagedserve.model_executor.loader import load_model
from pagedserve.model_executor.models.base import LLAMA_PACKED_MODULES
from pagedserve.model_executor.quantization.fp8 import Fp8Config
from pagedserve.model_executor.quantization.fp8_linear import (
    Fp8LinearMethod,
    dequantize_fp8,
    fp8_linear_torch,
    scaled_mm_supported,
)
from pagedserve.testing.quant_pack import write_dequantized_checkpoint
from pagedserve.testing.quant_pack.fp8 import pack_fp8_checkpoint, quantize_fp8_rtn
from tests.engine.engine_helpers import make_prompts
from tests.models.test_model_parity import PagedHarness
from tests.models.test_tensor_parallel import _steps

# layer 0's down_proj and all of layer 1's q/k/v (its merged qkv_proj) stay unquantized
IGNORED = ["model.layers.0.mlp.down_proj", *(f"model.layers.1.self_attn.{p}_proj" for p in "qkv")]
# static activation scales: the calibrated max |input| / 448, times these factors, so the merged
# shards' input scales differ (their input is one tensor: the loader keeps the largest, q's / up's)
SHARD_FACTOR = {"k_proj": 0.5, "v_proj": 0.75, "gate_proj": 0.5}
CASES = {  # name -> (weight scale layout, static activations)
    "tensor-dynamic": ("tensor", False), "channel-dynamic": ("channel", False),
    "channel2d-static": ("channel_2d", True), "tensor-static": ("tensor", True),
}


def _linears(model: Any) -> dict[str, LinearBase]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LinearBase)}


def _parts(name: str) -> list[str]:
    head, _, last = name.rpartition(".")
    return [f"{head}.{p}" for p in LLAMA_PACKED_MODULES.get(last, [last])]


@torch.no_grad()
def _input_amax(model: Any) -> dict[str, float]:
    """Calibration: max |input| of every projection (checkpoint module names) over one prefill."""
    amax: dict[str, float] = {}
    hooks = []

    def recorder(parts: list[str]) -> Callable[[Any, tuple[Tensor, ...]], None]:
        def hook(_: Any, args: tuple[Tensor, ...]) -> None:
            for p in parts:
                amax[p] = max(amax.get(p, 0.0), float(args[0].abs().max()))
        return hook

    for name, layer in _linears(model).items():
        hooks.append(layer.register_forward_pre_hook(recorder(_parts(name))))
    steps = _steps(model.spec.vocab_size)
    PagedHarness(model, seed=1).step(steps[0])
    for h in hooks:
        h.remove()
    return amax


@pytest.fixture(scope="module")
def packed(tiny_checkpoints: Any, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Any]:
    """(case, arch) -> (fp8 checkpoint, float32 checkpoint of its dequantized weights,
    {module: input scale})."""
    cache: dict[tuple[str, str], Any] = {}

    def get(case: str, arch: str = "llama") -> Any:
        if (case, arch) not in cache:
            src = tiny_checkpoints[arch]
            scales, static = CASES[case]
            root = tmp_path_factory.mktemp(f"fp8_{case}_{arch}")
            input_scale: dict[str, float] = {}
            if static:
                float_model = load_model(src, torch.float32, "cpu", show_progress=False).model
                input_scale = {m: a / 448 * SHARD_FACTOR.get(m.rpartition(".")[2], 1.0)
                               for m, a in _input_amax(float_model).items()}
            deq = pack_fp8_checkpoint(src, root / "fp8", scales=scales, ignored_layers=IGNORED,
                                      input_scale=input_scale.__getitem__ if static else None)
            write_dequantized_checkpoint(src, root / "float", deq)
            cache[case, arch] = str(root / "fp8"), str(root / "float"), deq, input_scale
        return cache[case, arch]

    return get


def _fake_quant_inputs(model: Any, input_scale: dict[str, float]) -> None:
    """The oracle of the static scheme: each quantized projection of the float model reads its
    input rounded through e4m3 with the largest input scale of its shards."""
    for name, layer in _linears(model).items():
        if name not in input_scale:
            continue
        s = torch.tensor(input_scale[name])
        method = layer._apply_method

        def fake_quant(lyr: Any, x: Tensor, s: Tensor = s, method: Any = method, **kw: Any) -> Any:
            assert not kw  # the torch kernel set fuses no norm into the projections
            xq = (x / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s
            return method(lyr, xq)

        layer._apply_method = fake_quant


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_loads_the_packed_weights_and_matches_float(case: str, packed: Any) -> None:
    quant_dir, float_dir, deq, input_scale = packed(case)
    scales, static = CASES[case]
    stored = load_file(str(Path(quant_dir) / "model.safetensors"))
    o = "model.layers.0.self_attn.o_proj"
    assert stored[f"{o}.weight"].dtype == torch.float8_e4m3fn
    assert stored[f"{o}.weight_scale"].shape == {"tensor": (), "channel": (64,), "channel_2d": (64, 1)}[scales]
    assert (f"{o}.input_scale" in stored) == static
    assert stored["model.layers.0.mlp.down_proj.weight"].dtype == torch.float32  # ignored

    loaded = load_model(quant_dir, torch.float32, "cpu", show_progress=False)
    cfg = loaded.quant_config
    assert isinstance(cfg, Fp8Config) and cfg.serialized and cfg.static_activations == static
    linears = _linears(loaded.model)
    layer_input_scale: dict[str, float] = {}
    for name, layer in linears.items():
        parts = _parts(name)
        want = torch.cat([deq[f"{p}.weight"] for p in parts])
        if parts[0] in IGNORED:
            assert isinstance(layer.linear_method, UnquantizedLinearMethod), name
            assert torch.equal(layer.weight, want), name
            continue
        assert isinstance(layer.linear_method, Fp8LinearMethod), name
        assert layer.weight.dtype == torch.float8_e4m3fn
        assert torch.equal(dequantize_fp8(layer.weight, layer.weight_scale, torch.float32), want), name
        # per-tensor scales: one scalar unless the merged shards' scales differ (then per channel)
        merged = len(parts) > 1
        assert layer.weight_scale.dim() == (1 if scales != "tensor" or merged else 0), name
        if static:
            assert layer.input_scale.item() == pytest.approx(max(input_scale[p] for p in parts))
            layer_input_scale[name] = layer.input_scale.item()
        else:
            assert layer.input_scale is None

    plain = load_model(float_dir, torch.float32, "cpu", show_progress=False).model
    if static:
        _fake_quant_inputs(plain, layer_input_scale)
    got_h, want_h = PagedHarness(loaded.model, seed=1), PagedHarness(plain, seed=1)
    for chunk in _steps(loaded.model_spec.vocab_size):  # prefill, then 3-row and 1-row decode steps
        got, want = got_h.step(chunk), want_h.step(chunk)
        for req in want:  # same float32 weights and inputs: equal up to summation order
            torch.testing.assert_close(got[req], want[req], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("case", "arch"), [("tensor-static", "llama3"), ("channel-dynamic", "llama")])
def test_tensor_parallel_matches_tp1(case: str, arch: str, packed: Any) -> None:
    """Each of 2 ranks loads its slice (llama3: one KV head, replicated) of the fp8 tensors: the
    per-shard scalars fill this rank's rows, per-channel scales are sliced like the rows."""
    from tests.models.test_tensor_parallel import _compare

    _compare(packed(case, arch)[0], 2)


def _at_load_dequantized(src: str) -> dict[str, Tensor]:
    """What quantization at load time must give: each merged weight (q|k|v, gate|up) quantized
    with one scale, its max |w| / 448, split back into its checkpoint shards."""
    tensors = load_file(str(Path(src) / "model.safetensors"))
    out: dict[str, Tensor] = {}
    for layer in range(2):
        for group in (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]):
            names = [f"model.layers.{layer}.{g}.weight" for g in group]
            _, _, deq = quantize_fp8_rtn(torch.cat([tensors[n].float() for n in names]))
            out.update(zip(names, deq.split([tensors[n].shape[0] for n in names]), strict=True))
    return out


def test_quantization_fp8_at_load_time(tiny_checkpoints: Any) -> None:
    src = tiny_checkpoints["llama"]
    EngineArgs(model=src, quantization="fp8").create_engine_config()  # accepted at start-up
    loaded = load_model(src, torch.float32, "cpu", show_progress=False, quantization="fp8")
    cfg = loaded.quant_config
    assert isinstance(cfg, Fp8Config) and not cfg.serialized and not cfg.static_activations
    want = _at_load_dequantized(src)
    linears = _linears(loaded.model)
    assert len(linears) == 8
    for name, layer in linears.items():
        assert isinstance(layer.linear_method, Fp8LinearMethod), name
        assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.dim() == 0
        expect = torch.cat([want[f"{p}.weight"] for p in _parts(name)])
        assert torch.equal(dequantize_fp8(layer.weight, layer.weight_scale, torch.float32), expect), name


@pytest.mark.parametrize("source", ["checkpoint", "at_load"])
def test_greedy_tokens_equal_the_dequantized_float_model(source: str, packed: Any,
                                                         tiny_checkpoints: Any, tmp_path: Path) -> None:
    if source == "checkpoint":
        model, float_dir, _, _ = packed("tensor-dynamic")
        quantization = None  # taken from the checkpoint
    else:
        model, quantization = tiny_checkpoints["llama"], "fp8"
        float_dir = str(tmp_path / "float")
        write_dequantized_checkpoint(model, float_dir, _at_load_dequantized(model))
    prompts = make_prompts(512, seed=3, lengths=(1, 7, 17, 33, 100))
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    runs = []
    for path, q in ((model, quantization), (float_dir, None)):
        llm = LLM(model=path, dtype="float32", quantization=q, max_model_len=512,
                  kv_cache_memory_bytes=32 << 20, swap_space=0.05)
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
        runs.append([list(o.outputs[0].token_ids) for o in outs])
        del llm
    assert runs[0] == runs[1]
    assert all(len(tokens) == 10 for tokens in runs[0])


def test_contradictions_fail_clearly(packed: Any, tiny_checkpoints: Any, tmp_path: Path) -> None:
    quant_dir, _, _, _ = packed("tensor-dynamic")
    with pytest.raises(ValueError, match=r"quantization='gptq' was requested.*quantized with 'fp8'"):
        load_model(quant_dir, torch.float32, "cpu", show_progress=False, quantization="gptq")
    with pytest.raises(ValueError, match=r"quantization='gptq' was requested.*quantized with 'fp8'"):
        EngineArgs(model=quant_dir, quantization="gptq").create_engine_config()
    other = tmp_path / "other"  # a checkpoint of another method: fp8 cannot be applied on top
    shutil.copytree(tiny_checkpoints["llama"], other)
    (other / "quant_config.json").write_text(json.dumps({"quant_method": "gptq"}))
    with pytest.raises(ValueError, match=r"quantization='fp8' was requested.*quantized with 'gptq'"):
        load_model(str(other), torch.float32, "cpu", show_progress=False, quantization="fp8")

    def with_config(name: str, **changes: Any) -> str:
        d = tmp_path / name
        shutil.copytree(quant_dir, d)
        cfg = json.loads((d / "config.json").read_text())
        cfg["quantization_config"].update(changes)
        (d / "config.json").write_text(json.dumps(cfg))
        return str(d)

    cases = [  # (config changes, the error)
        ({"ignored_layers": IGNORED[1:2]}, r"qkv_proj: fp8 ignored_layers names some of its merged shards"),
        ({"ignored_layers": IGNORED[1:]}, r"down_proj: the fp8 checkpoint's weight is torch.float32, "
                                          r"not float8_e4m3fn.*ignored_layers"),
        ({"activation_scheme": "static"}, r"lacks weights for: .*input_scale"),
        ({"activation_scheme": "per_token"}, r"activation_scheme must be one of \['static', 'dynamic'\]"),
        ({"weight_block_size": [128, 128]}, r"block-wise FP8 .* not supported"),
    ]
    for i, (changes, error) in enumerate(cases):
        with pytest.raises(ValueError, match=error):
            load_model(with_config(f"c{i}", **changes), torch.float32, "cpu", show_progress=False)
    with pytest.raises(ValueError, match="static activation scheme needs an fp8 checkpoint"):
        Fp8Config(serialized=False, activation_scheme="static")


def _fp8_test_layers(dev: torch.device, dtype: torch.dtype, cfg: Fp8Config) -> dict[str, Any]:
    """A merged q|k|v layer (hidden 64, head size 16, 4 query and 2 KV heads) and a layer whose
    sizes (40 x 24) need padding to multiples of 16, both with bias, built on dev in dtype with
    the torch kernel set."""
    from pagedserve.kernels.registry import TORCH_KERNELS
    from pagedserve.model_executor.layers.context import BuildContext
    from pagedserve.model_executor.layers.linear import QKVParallelLinear, ReplicatedLinear

    with torch.device(dev):
        torch.set_default_dtype(dtype)
        try:
            ctx = BuildContext.create(TORCH_KERNELS, quant_config=cfg)
            return {"qkv": QKVParallelLinear(64, 16, 4, 2, bias=True, ctx=ctx.child("qkv_proj")),
                    "odd": ReplicatedLinear(24, 40, bias=True, ctx=ctx.child("odd"))}
        finally:
            torch.set_default_dtype(torch.float32)


def _load_fp8_layer(name: str, layer: Any, g: torch.Generator, dev: torch.device, scales: str,
                    static: bool) -> None:  # fmt: skip
    """Round-to-nearest e4m3 shards (shard i drawn x (i + 1), so merged shards get distinct
    scales), their scales (and static input scales), and a bias, through the layer's loaders."""
    shards = ["q", "k", "v"] if name == "qkv" else [None]
    for i, sid in enumerate(shards):
        w = torch.randn(layer.output_sizes[i], layer.input_size, generator=g) * (i + 1)
        q, scale, _ = quantize_fp8_rtn(w, per_channel=scales == "channel")
        layer.weight.weight_loader(layer.weight, q.to(dev), sid)
        layer.weight_scale.weight_loader(layer.weight_scale, scale.to(dev), sid)
        if static:
            layer.input_scale.weight_loader(layer.input_scale, torch.tensor(0.01 * (i + 1)).to(dev), sid)
    layer.bias.data.copy_(torch.randn(layer.bias.shape, generator=g))


def _check_scaled_mm(dev: torch.device, dtype: torch.dtype, scales: str, static: bool) -> None:
    """The _scaled_mm plan against fp8_linear_torch given the activation scale the GEMM used:
    a merged q|k|v layer with distinct per-shard scales, and a layer whose sizes (40 x 24) need
    padding to multiples of 16; bias on both; 1, 5 and 37 tokens. Off CUDA the plan is forced
    (torch._scaled_mm runs on CPU too, through oneDNN) to check its padding and scale layouts.
    On CUDA the plan is laid out at load, so the oracle's weight and scale come from a CPU twin
    loaded with the same draws (the torch plan keeps them as loaded)."""
    g = torch.Generator().manual_seed(0)
    cfg = Fp8Config(serialized=True, activation_scheme="static" if static else "dynamic")
    layers = _fp8_test_layers(dev, dtype, cfg)
    cpu = torch.device("cpu")
    twins = _fp8_test_layers(cpu, dtype, cfg) if dev.type == "cuda" else layers
    for name, layer in layers.items():
        twin = twins[name]
        if twin is not layer:
            same_draws = torch.Generator()
            same_draws.set_state(g.get_state())
            _load_fp8_layer(name, twin, same_draws, cpu, scales, static)
            twin.linear_method.process_weights_after_loading(twin)
        _load_fp8_layer(name, layer, g, dev, scales, static)
        method = layer.linear_method
        method.process_weights_after_loading(layer)
        weight, weight_scale = twin.weight.data.to(dev), twin.weight_scale.data.to(dev)
        input_scale = layer.input_scale
        assert weight_scale.dim() == (0 if scales == "tensor" and name == "odd" else 1)
        if dev.type == "cuda":
            assert method._impl == method._apply_scaled_mm
        else:
            assert method._impl == method._apply_torch
            method._prepare_scaled_mm(layer)
            method._impl = method._apply_scaled_mm
        if name == "odd":  # padded to [K16, N16] = [32, 48]
            assert tuple(layer.weight.shape) == (32, 48)
        for m in (1, 5, 37):
            x = torch.randn(m, layer.input_size, generator=g).to(dev, dtype)
            got = layer(x)
            if static:
                xs = input_scale
            else:  # what the plan scales by: per token with a row-wise weight scale, else per tensor
                xs = (x.abs().amax(dim=-1, keepdim=True) if method._rowwise else x.abs().amax()).float() / 448
            want = fp8_linear_torch(x.float(), weight, weight_scale, xs, layer.bias.float())
            assert got.dtype == dtype and got.shape == want.shape
            # the same e4m3 operands: the accumulation order and the output rounding differ only
            torch.testing.assert_close(got.float(), want, atol=1e-2 * want.abs().max().item(), rtol=1e-2)


@pytest.mark.parametrize(("dtype", "scales", "static"), [
    (torch.bfloat16, "tensor", False), (torch.bfloat16, "channel", True),  # tensor-wise; row-wise
    (torch.float16, "channel", False)])  # per channel without bf16: the float32 epilogue
def test_scaled_mm_plan_on_cpu(dtype: torch.dtype, scales: str, static: bool) -> None:
    _check_scaled_mm(torch.device("cpu"), dtype, scales, static)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scales", ["tensor", "channel"])
@pytest.mark.parametrize("static", [False, True])
def test_scaled_mm_matches_the_torch_path(dtype: torch.dtype, scales: str, static: bool) -> None:
    """torch._scaled_mm on the GPU (compute capability >= 8.9) against the torch path."""
    dev = torch.device("cuda")
    if not scaled_mm_supported(dev):
        pytest.skip("torch._scaled_mm needs compute capability >= 8.9")
    _check_scaled_mm(dev, dtype, scales, static)


@pytest.mark.parametrize("scales", ["tensor", "channel"])
def test_decode_gemv_on_the_e4m3_weight(scales: str) -> None:
    """The decode path of a GPU with e4m3 (forced here, the Triton GEMV under TRITON_INTERPRET):
    up to the GEMV limit the layer reads its e4m3 weight through fused_gemv (weight-only: the
    dequantized float model's numbers), with the RMSNorm (+ residual) folded in on request;
    above it, _scaled_mm as before. A merged q|k|v layer (distinct shard scales) and one padded
    to multiples of 16 (40 x 24), with bias."""
    pytest.importorskip("triton")
    from pagedserve.kernels import reference as ref
    from pagedserve.kernels.registry import GemvLimits
    from pagedserve.kernels.triton.gemv import fused_gemv

    g = torch.Generator().manual_seed(3)
    cpu = torch.device("cpu")
    layers = _fp8_test_layers(cpu, torch.bfloat16, Fp8Config(serialized=True, activation_scheme="dynamic"))
    for name, layer in layers.items():
        _load_fp8_layer(name, layer, g, cpu, scales, static=False)
        method = layer.linear_method
        assert method.fused_max_tokens(gated=False) == 0  # no GEMV in the torch kernel set
        method.process_weights_after_loading(layer)
        weight, weight_scale = layer.weight.data.clone(), layer.weight_scale.data.clone()
        # force the e4m3 GPU's plan: _scaled_mm (oneDNN here) and the GEMV up to 4 tokens
        method._prepare_scaled_mm(layer)
        method._impl = method._apply_scaled_mm
        method._gemv, method._limits = fused_gemv, GemvLimits(4, 4, 0)
        method._prepare_gemv(layer)
        assert method._gemv_weight.dtype == torch.float8_e4m3fn
        assert method._gemv_weight.data_ptr() == layer.weight.data_ptr()  # a view, no copy
        for m in (1, 4):
            x = torch.randn(m, layer.input_size, generator=g).to(torch.bfloat16)
            got = layer(x)
            want = fp8_linear_torch(x.float(), weight, weight_scale, None, layer.bias.float())
            assert got.dtype == torch.bfloat16 and got.shape == want.shape
            torch.testing.assert_close(got.float(), want, atol=2e-2 * want.abs().max().item(), rtol=2e-2)
        x = torch.randn(5, layer.input_size, generator=g).to(torch.bfloat16)  # above the limit: _scaled_mm
        xs = (x.abs().amax(dim=-1, keepdim=True) if method._rowwise else x.abs().amax()).float() / 448
        want = fp8_linear_torch(x.float(), weight, weight_scale, xs, layer.bias.float())
        torch.testing.assert_close(layer(x).float(), want, atol=2e-2 * want.abs().max().item(), rtol=2e-2)
        # the norm folded in: (y, x + residual), as the layers ask for it within fused_max_tokens
        norm = SimpleNamespace(weight=(torch.randn(layer.input_size, generator=g) + 1).to(torch.bfloat16), eps=1e-6)
        x = torch.randn(3, layer.input_size, generator=g).to(torch.bfloat16)
        residual = torch.randn(3, layer.input_size, generator=g).to(torch.bfloat16)
        y, s = method.apply(layer, x, norm=norm, residual=residual)
        h, s_want = ref.fused_add_rms_norm(x, residual, norm.weight, 1e-6)
        torch.testing.assert_close(s, s_want, rtol=2**-7, atol=0)
        want = fp8_linear_torch(h.float(), weight, weight_scale, None, layer.bias.float())
        torch.testing.assert_close(y.float(), want, atol=3e-2 * want.abs().max().item(), rtol=3e-2)
