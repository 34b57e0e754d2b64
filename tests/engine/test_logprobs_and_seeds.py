"""Log-probabilities against Hugging Face logits, and seeded sampling that does not depend on the
rest of the batch (nor on preemption)."""

from __future__ import annotations

import torch

from pagedserve import SamplingParams
from tests.engine.engine_helpers import make_engine, make_prompts, run_staggered


def test_prompt_logprobs_match_hf(tiny_checkpoints, hf_reference) -> None:
    model, _ = hf_reference("llama")
    prompts = make_prompts(model.config.vocab_size, seed=3, lengths=(2, 17, 40, 130))
    # a 32-token budget splits the longer prompts into chunks
    engine = make_engine(tiny_checkpoints["llama"], max_num_batched_tokens=32)
    params = SamplingParams(max_tokens=1, prompt_logprobs=3)
    finished = run_staggered(engine, prompts, params, per_step=2)
    for i, prompt in enumerate(prompts):
        out = finished[str(i)]
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)
        assert out.prompt_logprobs[0] is None
        assert len(out.prompt_logprobs) == len(prompt)
        worst = 0.0
        for pos in range(1, len(prompt)):
            entry = out.prompt_logprobs[pos]
            token = prompt[pos]
            assert token in entry
            worst = max(worst, abs(entry[token].logprob - ref[pos - 1, token].item()))
            top = torch.topk(ref[pos - 1], 3).indices.tolist()
            assert set(top) <= set(entry)  # the top-3 are reported too
            assert entry[token].rank == int((ref[pos - 1] > ref[pos - 1, token]).sum()) + 1
        assert worst < 1e-3, worst


def test_sample_logprobs_match_hf(tiny_checkpoints, hf_reference) -> None:
    model, _ = hf_reference("llama")
    [prompt] = make_prompts(model.config.vocab_size, seed=4, lengths=(20,))
    engine = make_engine(tiny_checkpoints["llama"])
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=2)
    out = run_staggered(engine, [prompt], params)["0"].outputs[0]
    seq = prompt + list(out.token_ids)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), dim=-1)
    total = 0.0
    for k, token in enumerate(out.token_ids):
        row = ref[len(prompt) - 1 + k]
        assert abs(out.logprobs[k][token].logprob - row[token].item()) < 1e-3
        assert out.logprobs[k][token].rank == 1  # greedy picks the most likely token
        total += row[token].item()
    assert abs(out.cumulative_logprob - total) < 1e-3


def _sample(engine, prompts, params_of):
    finished = run_staggered(engine, prompts, params_of, per_step=len(prompts))
    return {k: [list(o.token_ids) for o in v.outputs] for k, v in finished.items()}


def test_seeded_sampling_is_independent_of_batch_and_preemption(tiny_checkpoints) -> None:
    path = tiny_checkpoints["llama"]
    target = make_prompts(512, seed=5, lengths=(30,))[0]
    others = make_prompts(512, seed=6, lengths=(3, 50, 90, 120, 7))
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True, n=2)
    noisy = SamplingParams(temperature=1.3, max_tokens=30, ignore_eos=True)

    alone = _sample(make_engine(path), [target], lambda i: seeded)["0"]
    crowded = _sample(make_engine(path), others + [target], lambda i: seeded if i == 5 else noisy)["5"]
    squeezed_engine = make_engine(path, num_gpu_blocks_override=14, max_model_len=200,
                                  max_num_batched_tokens=32)
    squeezed = _sample(squeezed_engine, others + [target], lambda i: seeded if i == 5 else noisy)["5"]
    assert squeezed_engine.get_stats().last.num_preemptions > 0
    assert alone == crowded == squeezed
    assert alone[0] != alone[1]  # the two children draw different streams (seed + index)

    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=12, ignore_eos=True)
    assert _sample(make_engine(path), [target], lambda i: other_seed)["0"][0] != alone[0]
