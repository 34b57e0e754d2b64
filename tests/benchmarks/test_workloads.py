"""The named workloads of benchmarks/throughput.py (deterministic, the documented lengths) and the
roofline arithmetic, against hand-computed values. No engine is started."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from benchmarks.roofline import _context_sum, matmul_params, roofline
from benchmarks.workload import (
    REALISTIC_SAMPLING,
    SYSTEM_PROMPT_LEN,
    WORKLOADS,
    engine_settings,
    named_workload,
    sharegpt_like,
)
from pagedserve.model_executor.model_spec import ModelSpec

VOCAB = 512


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_each_workload_is_deterministic(name: str) -> None:
    a, b = named_workload(name, VOCAB, 6), named_workload(name, VOCAB, 6)
    assert (a.work.prompts, a.work.output_lens, a.sampling) == (b.work.prompts, b.work.output_lens, b.sampling)
    assert len(a.work.prompts) == len(a.sampling) == 6
    assert all(100 <= t < VOCAB - 100 for p in a.work.prompts for t in p)
    assert (a.max_num_seqs, a.enable_prefix_caching) == tuple(engine_settings(name).values())


def test_the_mix_is_todays() -> None:
    mix, named = sharegpt_like(VOCAB, 20), named_workload("sharegpt", VOCAB, 20)
    assert (named.work.prompts, named.work.output_lens) == (mix.prompts, mix.output_lens)
    assert named.sampling == [{"temperature": 1.0, "top_p": 1.0}] * 20


def test_documented_lengths_and_settings() -> None:
    long_in = named_workload("long-prompts", VOCAB, 3)
    assert [len(p) for p in long_in.work.prompts] == [2000] * 3 and long_in.work.output_lens == [128] * 3
    long_out = named_workload("long-outputs", VOCAB, 3)
    assert [len(p) for p in long_out.work.prompts] == [128] * 3 and long_out.work.output_lens == [1000] * 3
    assert long_out.max_num_seqs == 256
    realistic = named_workload("realistic-sampling", VOCAB, 4)
    assert realistic.sampling == [{**REALISTIC_SAMPLING, "seed": i} for i in range(4)]
    assert REALISTIC_SAMPLING == {"temperature": 0.7, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.1}
    shared = named_workload("shared-prefix", VOCAB, 4)
    system = shared.work.prompts[0][:SYSTEM_PROMPT_LEN]
    assert shared.shared_prefix_len == SYSTEM_PROMPT_LEN and shared.enable_prefix_caching
    assert all(p[:SYSTEM_PROMPT_LEN] == system and len(p) > SYSTEM_PROMPT_LEN for p in shared.work.prompts)


def test_scale_and_fit() -> None:
    tiny = named_workload("long-prompts", VOCAB, 2, scale=0.05)
    assert [len(p) for p in tiny.work.prompts] == [100, 100] and tiny.work.output_lens == [6, 6]
    cut = named_workload("long-prompts", VOCAB, 2, max_model_len=1024)
    assert all(len(p) + n <= 1024 for p, n in zip(cut.work.prompts, cut.work.output_lens)) and cut.notes
    with pytest.raises(ValueError, match="unknown workload"):
        named_workload("nope", VOCAB, 2)


def _spec() -> ModelSpec:
    return ModelSpec.from_hf(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                         max_position_embeddings=256))


def test_roofline_by_hand() -> None:
    spec = _spec()  # head_dim 16
    # per layer: q, o 64*64 each; k, v 64*32 each; gate, up, down 64*128 each
    assert matmul_params(spec) == (2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128), 64 * VOCAB)
    # one request, prompt 3, output 2, nothing cached: positions 0..3 fed, keys 1+2+3+4 per layer;
    # the one decode token (position 3) reads 4 keys per layer
    line = roofline(spec, [3], [2], [0], weight_bytes=1000, kv_dtype_bytes=2, max_num_seqs=256,
                    max_num_batched_tokens=2048, matmul_flops_per_s=1e6, copy_bytes_per_s=1e3)
    body, head = matmul_params(spec)
    assert line.flops == 2 * body * 4 + 2 * head * 2 + 4 * 4 * 16 * 10 * 2
    kv_token = 2 * 2 * 2 * 16 * 2  # K and V, 2 layers, 2 kv heads, head_dim 16, 2 bytes
    assert line.min_steps == 2  # the output's two tokens come one step after the other
    assert line.bytes == 1000 * 2 + kv_token * 4 + kv_token // 2 * 4 * 2
    assert line.seconds == max(line.flops / 1e6, line.bytes / 1e3)
    # cached prompt tokens are not computed, and the last prompt token always is
    assert roofline(spec, [3], [2], [5], 1000, 2, 256, 2048, 1e6, 1e3).flops == (
        2 * body * 2 + 2 * head * 2 + 4 * 4 * 16 * (3 + 4) * 2)


def test_sliding_window_context() -> None:
    assert _context_sum(5, None) == 15
    assert _context_sum(5, 2) == 1 + 2 + 2 + 2 + 2
    assert _context_sum(2, 4) == 3
