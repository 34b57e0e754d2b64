"""Mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE) against transformers' own classes
on tiny random checkpoints (save_pretrained writes the published per-expert layout): stacked
expert weights, router logits / expert choice / block output, and greedy tokens on 16 prompts
through the engine, also under chunked prefill with preemption and with prefix caching."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from pagedserve.model_executor.layers.context import BuildContext, ParallelGroup
from pagedserve.model_executor.layers.moe import SparseMoeBlock
from pagedserve.model_executor.loader import load_model
from pagedserve.model_executor.model_spec import ModelSpec
from pagedserve.model_executor.models.base import DecoderForCausalLM
from pagedserve.model_executor.models.mixtral import MixtralForCausalLM
from pagedserve.testing.checkpoints import _randomize_biases_and_norms, build_tokenizer
from tests.engine.engine_helpers import (
    MAX_TOKENS,
    greedy,
    hf_greedy,
    make_engine,
    make_prompts,
    run_staggered,
)
from tests.models.thread_comm import ThreadGroup

MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe")

_BASE: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, max_position_embeddings=2048, rms_norm_eps=1e-5,
    initializer_range=0.2, bos_token_id=0, eos_token_id=1, pad_token_id=3, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, num_experts_per_tok=2,
)
_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    # Mixtral: 4 experts of intermediate_size, always renormalized
    "mixtral": ("MixtralConfig", dict(num_local_experts=4)),
    # Qwen2-MoE: shared expert, no renormalization, layer 1 dense (mlp_only_layers)
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=6, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=48, norm_topk_prob=False,
                                         mlp_only_layers=[1])),
    # Qwen3-MoE: q/k norms, renormalized (as published), 8 experts top-3
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=8, moe_intermediate_size=32, norm_topk_prob=True,
                                         num_experts_per_tok=3)),
}


def build_moe_checkpoint(out_dir: Path, arch: str, seed: int = 0) -> str:
    import transformers

    build_tokenizer(str(out_dir))
    cls_name, extra = _CONFIGS[arch]
    config = getattr(transformers, cls_name)(vocab_size=512, **{**_BASE, **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    _randomize_biases_and_norms(model, std=0.2)
    with torch.no_grad():  # routers are zero-initialised in some classes: route for real
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight") or name.endswith("shared_expert_gate.weight"):
                param.normal_(0.0, 0.5)
    model.config.dtype = torch.float32
    model.generation_config = transformers.GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=3)
    model.save_pretrained(str(out_dir))
    return str(out_dir)


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """get(arch) -> (checkpoint dir, HF model, prompts, HF greedy continuations), built once."""
    from transformers import AutoModelForCausalLM

    cache: dict[str, Any] = {}
    root = tmp_path_factory.mktemp("moe")

    def get(arch: str) -> Any:
        if arch not in cache:
            path = build_moe_checkpoint(root / arch, arch)
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                      attn_implementation="eager").eval()
            prompts = make_prompts(hf.config.vocab_size)
            cache[arch] = (path, hf, prompts, [hf_greedy(hf, p, MAX_TOKENS) for p in prompts])
        return cache[arch]

    return get


def _assert_matches(finished: dict, expected: list[list[int]]) -> None:
    assert len(finished) == len(expected)
    for i, ref in enumerate(expected):
        assert list(finished[str(i)].outputs[0].token_ids) == ref, f"prompt {i}"


def test_published_layout_is_stacked_at_load(moe) -> None:
    path, hf, _, _ = moe("qwen2_moe")
    from safetensors import safe_open

    with safe_open(str(Path(path) / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.mlp.experts.5.up_proj.weight" in names  # per-expert on disk
    ours = load_model(path, torch.float32, "cpu").model
    layer0 = ours.model.layers[0].mlp
    assert isinstance(layer0, SparseMoeBlock) and not isinstance(ours.model.layers[1].mlp, SparseMoeBlock)
    hf_experts = hf.model.layers[0].mlp.experts
    assert layer0.experts.gate_up_proj.shape == (6, 64, 64) and layer0.experts.down_proj.shape == (6, 64, 32)
    torch.testing.assert_close(layer0.experts.gate_up_proj, hf_experts.gate_up_proj, rtol=0, atol=0)
    torch.testing.assert_close(layer0.experts.down_proj, hf_experts.down_proj, rtol=0, atol=0)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_routing_and_block_match_hf(arch, moe) -> None:
    path, hf, _, _ = moe(arch)
    ours = load_model(path, torch.float32, "cpu").model
    h = torch.randn(23, 64, generator=torch.Generator().manual_seed(1))
    for i, layer in enumerate(ours.model.layers):
        block = layer.mlp
        if not isinstance(block, SparseMoeBlock):
            continue
        hf_block = hf.model.layers[i].mlp
        with torch.no_grad():
            hf_logits, hf_weights, hf_ids = hf_block.gate(h)
            logits, weights, ids = block.route(h)
            torch.testing.assert_close(logits, hf_logits, rtol=1e-5, atol=1e-6)
            assert torch.equal(ids, hf_ids)
            torch.testing.assert_close(weights, hf_weights.float(), rtol=1e-6, atol=1e-7)
            if arch != "qwen2_moe":  # renormalized: the chosen weights sum to 1
                torch.testing.assert_close(weights.sum(-1), torch.ones(23))
            out, residual = block(h, None, lambda x: x)
            torch.testing.assert_close(out, hf_block(h[None])[0], rtol=1e-5, atol=1e-5)
            assert residual is h
        assert len(set(ids.flatten().tolist())) > 2  # several experts really used


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_greedy_matches_hf(arch, moe) -> None:
    path, _, prompts, expected = moe(arch)
    engine = make_engine(path)
    _assert_matches(run_staggered(engine, prompts, greedy()), expected)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_greedy_matches_hf_chunked_prefill_and_preemption(arch, moe) -> None:
    path, _, prompts, expected = moe(arch)
    # 24 blocks of 16 for ~2000 prompt tokens admitted in 32-token chunks: requests are
    # preempted (recompute) and prompts are prefilled in several chunks.
    # each step's stats read right after its step(): the synchronous loop (async updates a step late)
    engine = make_engine(path, num_gpu_blocks_override=24, max_model_len=320, max_num_batched_tokens=32,
                         preemption_mode="recompute", enable_prefix_caching=False, async_scheduling=False)
    scheduled, preemptions = [], 0
    finished: dict[str, Any] = {}
    pending = list(enumerate(prompts))
    while pending or engine.has_unfinished_requests():
        for _ in range(min(16, len(pending))):
            i, prompt = pending.pop(0)
            engine.add_request(str(i), {"prompt_token_ids": prompt}, greedy())
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        last = engine.get_stats().last
        scheduled.append(last.num_scheduled_tokens)
        preemptions += last.num_preemptions
    assert max(scheduled) <= 32 and preemptions > 0
    _assert_matches(finished, expected)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_greedy_matches_hf_with_prefix_caching(arch, moe) -> None:
    path, hf, _, _ = moe(arch)
    [shared] = make_prompts(hf.config.vocab_size, seed=7, lengths=(100,))
    tails = make_prompts(hf.config.vocab_size, seed=8, lengths=(1, 5, 16, 30))
    prompts = [shared + t for t in tails] + [shared]
    expected = [hf_greedy(hf, p, MAX_TOKENS) for p in prompts]
    engine = make_engine(path, enable_prefix_caching=True)
    _assert_matches(run_staggered(engine, prompts, greedy(), per_step=1), expected)
    assert engine.get_stats().prefix_cache_hit_rate > 0.5


@pytest.mark.parametrize(("arch", "tp"), [("mixtral", 2), ("qwen2_moe", 2), ("qwen2_moe", 4),
                                       ("qwen3_moe", 2)])
def test_tensor_parallel_logits_match_tp1(arch, tp, moe) -> None:
    from tests.models.test_tensor_parallel import _compare

    path, _, _, _ = moe(arch)
    group = _compare(path, tp)  # every rank's logits (prefill, chunked, decode) == tp 1
    assert "all_reduce" in group.calls


def test_refusals(moe) -> None:
    path, hf, _, _ = moe("mixtral")
    spec = ModelSpec.from_hf(hf.config)
    with pytest.raises(ValueError, match="dense MLP"):  # the dense decoders still refuse MoE
        DecoderForCausalLM.check_spec(spec)
    with pytest.raises(ValueError, match="must be in 1..num_experts"):
        MixtralForCausalLM.check_spec(dataclasses.replace(spec, num_experts_per_tok=5))
    odd = dataclasses.replace(spec, moe_intermediate_size=95)
    group = ThreadGroup(2)
    with pytest.raises(ValueError, match=r"intermediate size \(95\) must be divisible"):
        MixtralForCausalLM(hf.config, spec=odd,
                           ctx=BuildContext.create(parallel=ParallelGroup(0, 2, group.comm(0))))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_gpu_triton_and_cuda_graphs_greedy_match_hf(arch, moe) -> None:
    """On CUDA: the Triton kernel set (fused MoE, attention, ...) and CUDA-graph decode give
    transformers' greedy tokens (float32)."""
    import gc

    from pagedserve import LLM

    path, _, prompts, expected = moe(arch)
    llm = LLM(path, dtype="float32", max_model_len=512, max_num_seqs=16, gpu_memory_utilization=0.3)
    runner = llm.llm_engine.engine_core.runner
    assert runner.decode_graphs is not None
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(), use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == expected
    del llm, runner
    gc.collect()
    torch.cuda.empty_cache()
