"""SamplingParams: vLLM defaults, normalisation, validation messages, derived views."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

from pagedserve.sampling_params import RequestOutputKind, SamplingParams, SamplingType


def test_defaults_match_vllm() -> None:
    p = SamplingParams()
    assert (p.n, p.best_of, p.temperature, p.top_p, p.top_k, p.min_p) == (1, None, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.prompt_logprobs, p.seed) == (16, 0, None, None, None)
    assert p.stop == [] and p.stop_token_ids == [] and p.logit_bias is None
    assert p.detokenize and p.skip_special_tokens and p.spaces_between_special_tokens
    assert not p.ignore_eos and not p.include_stop_str_in_output
    assert p.output_kind is RequestOutputKind.CUMULATIVE
    assert p.sampling_type is SamplingType.RANDOM
    assert not p.has_penalties


def test_normalisation() -> None:
    p = SamplingParams(stop="###", stop_token_ids=[5, 3, 5], top_k=-1, seed=-1)
    assert p.stop == ["###"] and p.stop_token_ids == [5, 3] and p.top_k == 0 and p.seed is None
    assert p.all_stop_token_ids == frozenset({3, 5})
    p = SamplingParams(logit_bias={"7": 250.0, 8: -1000, 9: 0.5})  # type: ignore[dict-item]
    assert p.logit_bias == {7: 100.0, 8: -100.0, 9: 0.5}
    assert SamplingParams(logprobs=True, prompt_logprobs=True).logprobs == 1  # type: ignore[arg-type]
    assert SamplingParams(max_tokens=None).max_tokens is None


def test_greedy_resets_truncation_and_types() -> None:
    p = SamplingParams(temperature=0.0, top_p=0.5, top_k=3, min_p=0.2)
    assert (p.top_p, p.top_k, p.min_p) == (1.0, 0, 0.0)
    assert p.sampling_type is SamplingType.GREEDY
    assert SamplingParams(temperature=1e-6).sampling_type is SamplingType.GREEDY
    assert SamplingParams(seed=3).sampling_type is SamplingType.RANDOM_SEED
    assert SamplingParams(temperature=0.5, top_k=3).top_k == 3
    assert SamplingParams(n=3, temperature=0.0).n == 3  # vLLM refuses this; we allow it


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"n": 0}, r"n must be .*>= 1"),
        ({"best_of": 3}, r"best_of must be None or equal to n=1"),
        ({"presence_penalty": 2.5}, r"presence_penalty must be in \[-2, 2\]"),
        ({"frequency_penalty": -3}, r"frequency_penalty must be in \[-2, 2\]"),
        ({"repetition_penalty": 0.0}, r"repetition_penalty must be greater than zero"),
        ({"temperature": -0.1}, r"temperature must be non-negative"),
        ({"temperature": float("inf")}, r"temperature must be a finite number"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -2}, r"top_k must be 0 or -1 \(disabled\), or an integer >= 1"),
        ({"top_k": 2.5}, r"top_k must be"),
        ({"min_p": 1.5}, r"min_p must be in \[0, 1\]"),
        ({"max_tokens": 0}, r"max_tokens must be None or an integer >= 1"),
        ({"min_tokens": -1}, r"min_tokens must be an integer >= 0"),
        ({"min_tokens": 5, "max_tokens": 4}, r"min_tokens must be in \[0, max_tokens=4\]"),
        ({"logprobs": -1}, r"logprobs must be None or an integer >= 0"),
        ({"prompt_logprobs": -2}, r"prompt_logprobs must be None or an integer >= 0"),
        ({"stop": ["a", ""]}, r"stop must contain only non-empty strings"),
        ({"stop": "x", "detokenize": False}, r"stop strings need detokenize=True"),
        ({"stop_token_ids": [1, -4]}, r"stop_token_ids must contain only integers >= 0"),
        ({"seed": 1.5}, r"seed must be None or an integer in \[-2\*\*63, 2\*\*64 - 1\]"),
        ({"seed": 2**64}, r"seed must be None or an integer"),
        ({"logit_bias": {"x": 1.0}}, r"logit_bias keys must be integer token ids"),
        ({"logit_bias": {1: float("nan")}}, r"logit_bias\[1\] must be a finite number"),
        ({"truncate_prompt_tokens": 0}, r"truncate_prompt_tokens must be None or an integer >= 1"),
    ],
)
def test_invalid_values_name_the_field(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        SamplingParams(**kwargs)


def test_boundaries_are_accepted() -> None:
    SamplingParams(presence_penalty=-2, frequency_penalty=2, top_p=1e-9, min_p=1.0, top_k=1)
    SamplingParams(min_tokens=16, max_tokens=16, logprobs=0, prompt_logprobs=0, seed=2**64 - 1)
    SamplingParams(seed=-(2**63), n=3, best_of=3, temperature=0.7)


def test_verify_for_model() -> None:
    SamplingParams(stop_token_ids=[9], logit_bias={0: 1.0, 9: 1.0}, logprobs=5).verify_for_model(10, 5)
    with pytest.raises(ValueError, match=r"stop_token_ids must be in \[0, 9\]"):
        SamplingParams(stop_token_ids=[10]).verify_for_model(10)
    with pytest.raises(ValueError, match=r"logit_bias token ids must be in \[0, 9\]"):
        SamplingParams(logit_bias={12: 1.0}).verify_for_model(10)
    with pytest.raises(ValueError, match=r"logprobs must be in \[0, max_logprobs=5\]"):
        SamplingParams(logprobs=6).verify_for_model(10, 5)
    with pytest.raises(ValueError, match=r"prompt_logprobs must be in \[0, max_logprobs=2\]"):
        SamplingParams(prompt_logprobs=3).verify_for_model(10, 2)


def test_clone_shares_no_containers() -> None:
    p = SamplingParams(stop=["a"], stop_token_ids=[1], logit_bias={2: 1.0}, n=2, seed=7)
    q = p.clone()
    assert q == p and q is not p
    assert isinstance(q.stop, list) and isinstance(q.stop_token_ids, list) and q.logit_bias is not None
    q.stop.append("b")
    q.stop_token_ids.append(9)
    q.logit_bias[3] = 2.0
    assert p.stop == ["a"] and p.stop_token_ids == [1] and p.logit_bias == {2: 1.0}


def test_child_params() -> None:
    p = SamplingParams(n=3, seed=10, temperature=0.8)
    kids = [p.child(i) for i in range(3)]
    assert [k.seed for k in kids] == [10, 11, 12]
    assert all(k.n == 1 and k.temperature == 0.8 for k in kids)
    assert p.n == 3 and p.seed == 10
    assert SamplingParams(n=2).child(1).seed is None
    assert SamplingParams(n=2, seed=2**64 - 1).child(1).seed == -(2**64) + 2**64  # wraps to 0


def test_output_text_buffer_length() -> None:
    assert SamplingParams().output_text_buffer_length == 0
    assert SamplingParams(stop=["ab", "xyz1"]).output_text_buffer_length == 3
    assert SamplingParams(stop=["xyz1"], include_stop_str_in_output=True).output_text_buffer_length == 0


def test_pure_python_and_picklable() -> None:
    p = SamplingParams(stop=["x"], logit_bias={1: 2.0}, output_kind=RequestOutputKind.DELTA, seed=5)
    assert pickle.loads(pickle.dumps(p)) == p
    code = "import sys, pagedserve.sampling_params; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
    assert "temperature" not in repr(SamplingParams()) and "temperature=0.5" in repr(
        SamplingParams(temperature=0.5)
    )
