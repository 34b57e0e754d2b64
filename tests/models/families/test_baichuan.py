"""Baichuan / Baichuan2 (`BaichuanForCausalLM`) from tiny checkpoints in the published layout
(config.json keys, fused `W_pack`, no `auto_map` code run), greedy-equal to their oracles through
the engine under chunked prefill (32-token budget), preemption (a KV cache far too small for the
batch) and prefix caching:

    7B layout (rotary) + Baichuan2 NormHead -> transformers LlamaForCausalLM with W_pack split
                                               and the head normalized into lm_head
    13B layout (ALiBi)                      -> a plain-torch ALiBi decoder written here, its
                                               slopes checked against BLOOM's build_alibi_tensor
"""

from __future__ import annotations

import io
import json
import math
import os
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pagedserve import LLM, SamplingParams
from pagedserve.kernels.reference import alibi_slopes
from pagedserve.model_executor.model_spec import ModelSpec, load_hf_config
from pagedserve.testing.checkpoints import build_checkpoint, synthetic_corpus

HEADS, HIDDEN, LAYERS = 4, 64, 2
MAX_TOKENS = 6
LENGTHS = [3, 41, 7, 18, 60, 1, 25, 12, 33, 5, 50, 9, 28, 2, 44, 15]  # 16 prompts, mixed
VOCAB = 512
USER_ID, ASSISTANT_ID = 3, 4  # <reserved_106>, <reserved_107> (195 / 196 in Baichuan2's vocab)


def _write_tokenizer(out_dir: str) -> None:
    """tokenizer.model (a BPE SentencePiece model with byte fallback and Baichuan2's identity
    normalizer, no dummy prefix) with the remote-code tokenizer_config.json and the chat role
    ids of generation_config.json, as Baichuan2-Chat publishes them."""
    import sentencepiece as spm

    corpus = synthetic_corpus(400, seed=3) + ["你好，世界！今天天气很好。", "百川智能的模型。我们一起学习。"] * 20
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, vocab_size=VOCAB, model_type="bpe",
        byte_fallback=True, control_symbols=["<reserved_106>", "<reserved_107>"],
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        split_digits=True, minloglevel=2)
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(buf.getvalue())
    tok_config = {
        "auto_map": {"AutoTokenizer": ["tokenization_baichuan.BaichuanTokenizer", None]},
        "tokenizer_class": "BaichuanTokenizer", "add_bos_token": False, "add_eos_token": False,
        "bos_token": {"content": "<s>", "lstrip": False, "normalized": True, "rstrip": False,
                      "single_word": True},
        "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>", "model_max_length": 512,
        "clean_up_tokenization_spaces": False,
    }
    generation = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
                  "user_token_id": USER_ID, "assistant_token_id": ASSISTANT_ID}
    for name, obj in (("tokenizer_config.json", tok_config), ("generation_config.json", generation)):
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(obj, f)


def _baichuan_config(vocab: int, alibi: bool) -> dict[str, Any]:
    """A config.json as Baichuan publishes it (remote-code classes in auto_map)."""
    cfg: dict[str, Any] = {
        "architectures": ["BaichuanForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                     "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"},
        "model_type": "baichuan", "hidden_act": "silu", "hidden_size": HIDDEN,
        "intermediate_size": 128, "num_attention_heads": HEADS, "num_hidden_layers": LAYERS,
        "rms_norm_eps": 1e-5, "vocab_size": vocab, "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 0, "tie_word_embeddings": False, "torch_dtype": "float32",
        "model_max_length": 512, "tokenizer_class": "BaichuanTokenizer",
    }
    if not alibi:  # the 7B configs: rotary, max_position_embeddings; Baichuan2's z_loss_weight
        cfg.update(max_position_embeddings=512, z_loss_weight=0)
    return cfg


def _to_baichuan(llama_dir: str, out_dir: str, alibi: bool) -> dict[str, torch.Tensor]:
    """Rewrite a tiny Llama checkpoint (MHA) in the Baichuan layout; returns the Llama tensors,
    with lm_head replaced by what the oracle should use (the normalized NormHead for 7B)."""
    tensors = load_file(os.path.join(llama_dir, "model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            continue
        if ".self_attn.q_proj." in name:
            parts = [tensors[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            out[name.replace("q_proj", "W_pack")] = torch.cat(parts, 0).contiguous()
        else:
            out[name] = t
    if not alibi:  # NormHead: the checkpoint holds an unnormalized head
        raw = tensors["lm_head.weight"] * torch.linspace(0.5, 3.0, tensors["lm_head.weight"].shape[0])[:, None]
        out["lm_head.weight"] = raw.contiguous()
        tensors = {**tensors, "lm_head.weight": F.normalize(raw, dim=-1)}
    os.makedirs(out_dir, exist_ok=True)
    save_file(out, os.path.join(out_dir, "model.safetensors"))
    _write_tokenizer(out_dir)
    vocab = tensors["model.embed_tokens.weight"].shape[0]
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(_baichuan_config(vocab, alibi), f)
    return tensors


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_checkpoint(str(tmp_path_factory.mktemp("llama")), "llama", num_key_value_heads=HEADS,
                            head_dim=HIDDEN // HEADS, max_position_embeddings=512, vocab_size=VOCAB)


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(4, vocab, (n,), generator=g).tolist() for n in LENGTHS]


def _engine_greedy(model_dir: str, prompts: list[list[int]]) -> tuple[list[list[int]], Any]:
    llm = LLM(model=model_dir, dtype="float32", max_model_len=96, max_num_batched_tokens=32,
              num_gpu_blocks_override=6, block_size=16, enable_prefix_caching=True, max_num_seqs=16)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    stats = llm.llm_engine.get_stats().last
    assert stats is not None and stats.num_preemptions > 0  # 6 blocks cannot hold the batch
    # Prefix caching: the longest prompt twice more; the second run reads the first one's blocks.
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    again = [llm.generate([{"prompt_token_ids": prompts[longest]}], params, use_tqdm=False)[0]
             for _ in range(2)]
    stats = llm.llm_engine.get_stats().last
    assert stats is not None and stats.prefix_cache_hits > 0
    got = [list(o.outputs[0].token_ids) for o in outs]
    tokenizer = llm.llm_engine.tokenizer
    assert type(tokenizer).__name__ == "SentencePieceTokenizer"  # ours: no checkpoint code ran
    assert outs[0].outputs[0].text == tokenizer.decode(got[0])
    for o in again:
        assert list(o.outputs[0].token_ids) == got[longest]
    return got, llm


def test_config_read_without_remote_code(llama_dir: str, tmp_path: Any) -> None:
    _to_baichuan(llama_dir, str(tmp_path / "b7"), alibi=False)
    _to_baichuan(llama_dir, str(tmp_path / "b13"), alibi=True)
    rope = ModelSpec.from_hf(load_hf_config(str(tmp_path / "b7")))
    assert rope.rope is not None and not rope.alibi and rope.norm_head
    assert ModelSpec.from_hf(load_hf_config(str(tmp_path / "b7"))).max_context_len == 512
    alibi = ModelSpec.from_hf(load_hf_config(str(tmp_path / "b13")))
    assert alibi.alibi and alibi.rope is None and not alibi.norm_head


def _llama_oracle(llama_dir: str, tensors: dict[str, torch.Tensor],
                  prompts: list[list[int]]) -> list[list[int]]:
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    hf.lm_head.weight.data.copy_(tensors["lm_head.weight"])  # the normalized NormHead
    expected = []
    with torch.no_grad():
        for p in prompts:
            out = hf.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False,
                              min_new_tokens=MAX_TOKENS, pad_token_id=0)
            expected.append(out[0, len(p):].tolist())
    return expected


def test_rotary_normhead_greedy_equals_llama(llama_dir: str, tmp_path: Any) -> None:
    tensors = _to_baichuan(llama_dir, str(tmp_path / "b7"), alibi=False)
    prompts = _prompts(VOCAB)
    got, _ = _engine_greedy(str(tmp_path / "b7"), prompts)
    assert got == _llama_oracle(llama_dir, tensors, prompts)


# ---------------------------------------------------------------- ALiBi (13B layout)


def test_alibi_slopes_match_bloom() -> None:
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    for n in (1, 4, 6, 8, 12, 40):  # 40: Baichuan-13B's head count (not a power of two)
        mask = torch.ones(1, 3)
        bloom = build_alibi_tensor(mask, n, torch.float32)  # [n, 1, 3] = slope_h * key position
        torch.testing.assert_close(alibi_slopes(n), bloom[:, 0, 1], rtol=1e-6, atol=0)
    assert alibi_slopes(8)[0].item() == 2.0 ** -1  # Press et al.: 2^(-8/n), ratio 2^(-8/n)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


@torch.no_grad()
def _alibi_reference_logits(t: dict[str, torch.Tensor], ids: list[int]) -> torch.Tensor:
    """Baichuan-13B's forward in plain torch, whole sequence: the bias is slope_h * key position
    (as its `_gen_alibi_mask`; equal under softmax to slope_h * (j - i)) plus the causal mask."""
    n, d = len(ids), HIDDEN // HEADS
    slopes = alibi_slopes(HEADS)
    pos = torch.arange(n)
    bias = slopes[:, None, None] * pos[None, None, :].float()
    bias = bias.masked_fill(pos[None, :] > pos[:, None], float("-inf"))  # [H, n, n]
    x = t["model.embed_tokens.weight"][ids]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        h = _rms(x, t[p + "input_layernorm.weight"])
        q, k, v = (F.linear(h, t[p + f"self_attn.{m}_proj.weight"]).view(n, HEADS, d).transpose(0, 1)
                   for m in ("q", "k", "v"))
        probs = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d) + bias, dim=-1)
        x = x + F.linear((probs @ v).transpose(0, 1).reshape(n, HIDDEN), t[p + "self_attn.o_proj.weight"])
        h = _rms(x, t[p + "post_attention_layernorm.weight"])
        act = F.silu(F.linear(h, t[p + "mlp.gate_proj.weight"])) * F.linear(h, t[p + "mlp.up_proj.weight"])
        x = x + F.linear(act, t[p + "mlp.down_proj.weight"])
    return F.linear(_rms(x, t["model.norm.weight"]), t["lm_head.weight"])


def _alibi_oracle(tensors: dict[str, torch.Tensor], prompts: list[list[int]]) -> list[list[int]]:
    expected = []
    for p in prompts:
        ids = list(p)
        for _ in range(MAX_TOKENS):
            ids.append(int(_alibi_reference_logits(tensors, ids)[-1].argmax()))
        expected.append(ids[len(p):])
    return expected


def test_alibi_greedy_equals_reference(llama_dir: str, tmp_path: Any) -> None:
    tensors = _to_baichuan(llama_dir, str(tmp_path / "b13"), alibi=True)
    prompts = _prompts(VOCAB)
    got, _ = _engine_greedy(str(tmp_path / "b13"), prompts)
    assert got == _alibi_oracle(tensors, prompts)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_triton_kernels_and_cuda_graphs(llama_dir: str, tmp_path: Any) -> None:
    """On CUDA the engine runs the Triton attention kernels (ALiBi specialisation for 13B) and
    decode CUDA graphs: still greedy-equal to both oracles (float32)."""
    prompts = _prompts(VOCAB)
    for alibi in (False, True):
        tensors = _to_baichuan(llama_dir, str(tmp_path / f"b{alibi}"), alibi=alibi)
        got, llm = _engine_greedy(str(tmp_path / f"b{alibi}"), prompts)
        assert llm.llm_engine.config.attention_backend == "triton"
        want = _alibi_oracle(tensors, prompts) if alibi else _llama_oracle(llama_dir, tensors, prompts)
        assert got == want
        del llm


# ---------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from pagedserve.model_executor.models.baichuan import baichuan_tokenizer
    from pagedserve.tokenizers.sentencepiece_tok import needs_own_tokenizer

    out = str(tmp_path_factory.mktemp("tok"))
    _write_tokenizer(out)
    assert needs_own_tokenizer(out)
    return baichuan_tokenizer(out)


@pytest.mark.parametrize("text", [
    "Hello world, the quick brown fox.", "你好，世界！今天天气很好。", "rare 龘 and 🚀 via byte fallback",
    "  two  spaces\tand a tab\n", "12345 digits", ""])
def test_tokenizer_round_trips(tokenizer: Any, text: str) -> None:
    import sentencepiece as spm

    ids = tokenizer.encode(text)
    sp = spm.SentencePieceProcessor(model_file=tokenizer.vocab_file)
    assert ids == sp.encode(text)  # add_bos_token false: exactly the model's pieces
    assert tokenizer.decode(ids) == text


def test_tokenizer_special_tokens(tokenizer: Any) -> None:
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)
    ids = tokenizer.encode("hi</s>")
    assert ids[-1] == 2 and tokenizer.decode(ids) == "hi</s>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hi"


def test_chat_format_as_published(tokenizer: Any) -> None:
    """Baichuan2-Chat's build_chat_input: system tokens, then [user id] + content,
    [assistant id] + content per message, and a final assistant id to prompt a reply."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "why?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
    want = tokenizer.encode("Be brief.")
    for m in messages[1:]:
        want += [USER_ID if m["role"] == "user" else ASSISTANT_ID] + tokenizer.encode(m["content"])
    assert list(ids) == want + [ASSISTANT_ID]


@pytest.mark.parametrize("alibi", [False, True])
def test_tensor_parallel_2_matches_tp1(alibi: bool, llama_dir: str, tmp_path: Any) -> None:
    """tp = 2 in threads (each rank its heads and, with ALiBi, their slopes) gives tp = 1's
    logits through the paged cache (prefill, chunk, decode steps)."""
    from pagedserve.model_executor.layers.context import ParallelGroup
    from pagedserve.model_executor.loader import load_model
    from tests.models.test_model_parity import PagedHarness
    from tests.models.test_tensor_parallel import _steps
    from tests.models.thread_comm import ThreadGroup

    path = str(tmp_path / "b")
    _to_baichuan(llama_dir, path, alibi=alibi)

    def logits(model: Any) -> list[dict[str, torch.Tensor]]:
        model.config.num_key_value_heads = HEADS  # read by the test harness only (MHA)
        h = PagedHarness(model, seed=1)
        if model.model.layers[0].self_attn.qkv_proj.tp_size > 1:  # this rank's KV heads
            shape = h.kv_caches[0][0].shape
            h.kv_caches = [tuple(torch.zeros(shape[:2] + (HEADS // 2, shape[-1])) for _ in range(2))
                           for _ in h.kv_caches]  # type: ignore[misc]
        return [h.step(chunk) for chunk in steps]

    plain = load_model(path, torch.float32, "cpu", show_progress=False).model
    steps = _steps(VOCAB)[:4]
    want = logits(plain)
    group = ThreadGroup(2)
    models = [load_model(path, torch.float32, "cpu", show_progress=False,
                         parallel=ParallelGroup(r, 2, group.comm(r))).model for r in range(2)]
    if alibi:
        slopes = [m.model.layers[0].self_attn.attn.alibi_slopes for m in models]
        assert torch.equal(torch.cat(slopes), alibi_slopes(HEADS))
    for got in group.run(lambda rank: logits(models[rank])):
        for g, w in zip(got, want, strict=True):
            for req in w:
                torch.testing.assert_close(g[req], w[req], atol=1e-4, rtol=0)
