"""Our models (paged KV cache, shuffled block tables) against transformers on tiny checkpoints."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
import torch

from pagedserve.model_executor.layers.attention import AttentionMetadata
from pagedserve.model_executor.loader import load_model
from pagedserve.testing.checkpoints import ARCHS, build_checkpoint, synthetic_corpus

ATOL = 1e-4


class PagedHarness:
    """Drives a model like the model runner does: a shared paged KV cache, per-request block
    tables drawn from a shuffled free list, packed steps over several requests."""

    def __init__(self, model: Any, num_blocks: int = 96, block_size: int = 16, seed: int = 0) -> None:
        cfg = model.config
        self.device = dev = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        kv_heads = cfg.num_key_value_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=dtype, device=dev), torch.zeros(shape, dtype=dtype, device=dev))
                          for _ in range(cfg.num_hidden_layers)]
        self.model = model
        self.block_size = block_size
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.tables: dict[str, list[int]] = {}

    @torch.no_grad()
    def step(self, chunks: list[tuple[str, list[int], int, int]]) -> dict[str, torch.Tensor]:
        """chunks: (req_id, all token ids, start, end): run tokens[start:end] of each request
        (positions start..end-1; tokens before start must be cached). Returns logits per req."""
        ids, pos, slots, qsl, seq_lens = [], [], [], [0], []
        for req, tokens, start, end in chunks:
            table = self.tables.setdefault(req, [])
            while len(table) * self.block_size < end:
                table.append(self.free.pop())
            for p in range(start, end):
                ids.append(tokens[p])
                pos.append(p)
                slots.append(table[p // self.block_size] * self.block_size + p % self.block_size)
            qsl.append(qsl[-1] + end - start)
            seq_lens.append(end)
        width = max(len(self.tables[c[0]]) for c in chunks) + 1
        tables = torch.zeros(len(chunks), width, dtype=torch.int32)
        for i, (req, *_rest) in enumerate(chunks):
            tables[i, : len(self.tables[req])] = torch.tensor(self.tables[req], dtype=torch.int32)
        dev = self.device
        md = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=tables.to(dev),
            max_query_len=max(b - a for a, b in zip(qsl, qsl[1:])),
            max_seq_len=max(seq_lens),
        )
        hidden = self.model(torch.tensor(ids, device=dev), torch.tensor(pos, device=dev), self.kv_caches, md)
        logits = self.model.compute_logits(hidden).cpu()
        assert logits.dtype == torch.float32
        return {c[0]: logits[a:b] for c, a, b in zip(chunks, qsl, qsl[1:])}


def _prompt(tokenizer: Any, n: int, seed: int) -> list[int]:
    ids = tokenizer(" ".join(synthetic_corpus(60, seed=seed))).input_ids[:n]
    assert len(ids) == n
    return ids


@torch.no_grad()
def _hf_logits(hf: Any, ids: list[int]) -> torch.Tensor:
    return hf(torch.tensor([ids])).logits[0].float()


@pytest.fixture(scope="module")
def ours(tiny_checkpoints: Any) -> Callable[[str], Any]:
    cache: dict[str, Any] = {}

    def get(arch: str) -> Any:
        if arch not in cache:
            cache[arch] = load_model(tiny_checkpoints[arch], torch.float32, "cpu",
                                     show_progress=False).model
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_full_prompt_matches_hf(arch: str, ours: Any, hf_reference: Any) -> None:
    hf, tok = hf_reference(arch)
    ids = _prompt(tok, 130, seed=ARCHS.index(arch))  # > every sliding window (64, 48)
    out = PagedHarness(ours(arch), seed=1).step([("a", ids, 0, len(ids))])["a"]
    expected = _hf_logits(hf, ids)
    assert out.shape == expected.shape
    assert (out - expected).abs().max().item() < ATOL


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_and_mixed_batches_match(arch: str, ours: Any, hf_reference: Any) -> None:
    hf, tok = hf_reference(arch)
    model = ours(arch)
    a, b, c = _prompt(tok, 101, 11), _prompt(tok, 80, 12), _prompt(tok, 23, 13)
    one_pass = PagedHarness(model, seed=2).step([("a", a, 0, len(a))])["a"]

    h = PagedHarness(model, seed=3)
    # step 1: a's prefix (ends mid-block) alone; step 2: the rest of a, batched with b's prefill
    first = h.step([("a", a, 0, 37)])["a"]
    second = h.step([("a", a, 37, len(a)), ("b", b, 0, 70)])
    chunked = torch.cat([first, second["a"]])
    assert (chunked - one_pass).abs().max().item() < ATOL
    # step 3 (decode-like): b adds 3 single-token steps batched with c's whole prompt
    decode = [h.step([("b", b, p, p + 1), ("c", c, 0, len(c))] if p == 70 else [("b", b, p, p + 1)])
              for p in range(70, 73)]
    b_logits = torch.cat([second["b"], *(d["b"] for d in decode)])
    assert (b_logits - _hf_logits(hf, b[:73])).abs().max().item() < ATOL
    assert (decode[0]["c"] - _hf_logits(hf, c)).abs().max().item() < ATOL
    assert (chunked - _hf_logits(hf, a)).abs().max().item() < ATOL


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_no_cache_profiling_path_matches_hf(arch: str, ours: Any, hf_reference: Any) -> None:
    """kv_caches=[] (memory profiling run): dense causal attention over packed sequences."""
    hf, tok = hf_reference(arch)
    a, b = _prompt(tok, 90, 21), _prompt(tok, 20, 22)
    n = len(a) + len(b)
    md = AttentionMetadata(
        slot_mapping=torch.full((n + 2,), -1, dtype=torch.int64),
        query_start_loc=torch.tensor([0, len(a), n], dtype=torch.int32),
        seq_lens=torch.tensor([len(a), len(b)], dtype=torch.int32),
        block_tables=torch.zeros(2, 1, dtype=torch.int32), max_query_len=len(a), max_seq_len=len(a))
    ids = torch.tensor(a + b + [5, 6])  # 2 padding tokens past query_start_loc[-1]
    positions = torch.tensor(list(range(len(a))) + list(range(len(b))) + [0, 0])
    with torch.no_grad():
        logits = ours(arch).compute_logits(ours(arch)(ids, positions, [], md))
    assert (logits[: len(a)] - _hf_logits(hf, a)).abs().max().item() < ATOL
    assert (logits[len(a):n] - _hf_logits(hf, b)).abs().max().item() < ATOL


def test_sliding_windows_per_layer(ours: Any) -> None:
    windows = {arch: [layer.self_attn.attn.sliding_window for layer in ours(arch).model.layers]
               for arch in ARCHS}
    assert windows == {"llama": [None, None], "llama3": [None, None], "mistral": [64, 64],
                       "qwen2": [None, 48], "qwen3": [None, None]}


@pytest.mark.parametrize("arch", ["llama3", "qwen3"])
def test_tied_lm_head_shares_the_embedding(arch: str, ours: Any) -> None:
    model = ours(arch)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" not in dict(model.named_parameters())


def test_llama_attention_and_mlp_biases(tmp_path: Any) -> None:
    from transformers import AutoModelForCausalLM

    path = build_checkpoint(str(tmp_path / "llama-bias"), "llama", seed=5, attention_bias=True,
                            mlp_bias=True, num_key_value_heads=4)  # MHA
    model: Any = load_model(path, torch.float32, "cpu", show_progress=False).model
    assert model.model.layers[0].self_attn.o_proj.bias is not None
    assert model.model.layers[0].mlp.down_proj.bias is not None
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                              attn_implementation="eager").eval()
    ids = list(range(10, 60))
    out = PagedHarness(model, seed=4).step([("a", ids, 0, 30)])["a"]
    out = torch.cat([out, PagedHarness(model).step([("a", ids, 0, 50)])["a"][30:]])
    assert (out - _hf_logits(hf, ids)).abs().max().item() < ATOL


def test_load_weights_rejects_unknown_and_misshapen_tensors(ours: Any) -> None:
    model = ours("llama")
    with pytest.raises(ValueError, match="matches no model parameter"):
        model.load_weights([("model.layers.0.self_attn.bogus.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="does not fit"):
        model.load_weights([("model.layers.0.self_attn.k_proj.weight", torch.zeros(3, 64))])
    # inv_freq buffers of old checkpoints are ignored; a merged param counts once all shards arrive
    qkv = model.model.layers[0].self_attn.qkv_proj.weight
    q, k, v = qkv[:128].clone(), qkv[128:192].clone(), qkv[192:].clone()
    names = ["model.layers.0.self_attn.rotary_emb.inv_freq", "model.layers.0.self_attn.q_proj.weight",
             "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight"]
    tensors = [torch.zeros(16), q, k, v]
    assert model.load_weights(zip(names[:3], tensors[:3])) == set()
    assert model.load_weights(zip(names, tensors)) == {"model.layers.0.self_attn.qkv_proj.weight"}
    assert torch.equal(qkv, torch.cat([q, k, v]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ARCHS)
def test_triton_backend_on_gpu_matches_hf(arch: str, tiny_checkpoints: Any, hf_reference: Any) -> None:
    """The same paged run on CUDA with the Triton attention backend (float32: tight tolerance)."""
    hf, tok = hf_reference(arch)
    model = load_model(tiny_checkpoints[arch], torch.float32, "cuda", attn_backend="triton",
                       show_progress=False).model
    a, b = _prompt(tok, 101, 31), _prompt(tok, 40, 32)
    h = PagedHarness(model, seed=5)
    first = h.step([("a", a, 0, 37), ("b", b, 0, 39)])
    second = h.step([("a", a, 37, len(a)), ("b", b, 39, 40)])
    got_a = torch.cat([first["a"], second["a"]])
    got_b = torch.cat([first["b"], second["b"]])
    assert (got_a - _hf_logits(hf, a)).abs().max().item() < 2e-3
    assert (got_b - _hf_logits(hf, b)).abs().max().item() < 2e-3
    bf16 = load_model(tiny_checkpoints[arch], torch.bfloat16, "cuda", attn_backend="triton",
                      show_progress=False).model
    out = PagedHarness(bf16, seed=6).step([("a", a, 0, len(a))])["a"]
    ref = _hf_logits(hf, a)
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree > 0.9 and (out - ref).abs().max().item() < 0.5
