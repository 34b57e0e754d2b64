"""The per-step sampling state reaches the device by queued copies only: no torch.tensor(...,
device=...) (a synchronous copy, which on a GPU waits for every kernel queued before it, so
async scheduling's launch of step n+1 would wait for its own forward). Checked on the meta
device, where the copies are free and the spy sees every tensor made."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from pagedserve.sampling_params import SamplingParams
from pagedserve.worker.device_copy import list_to_device
from pagedserve.worker.sampler import SamplingMetadata


def test_list_to_device_keeps_values_and_dtype() -> None:
    cpu = list_to_device([3, 1, 2], torch.int64, torch.device("cpu"))
    assert cpu.dtype == torch.int64 and cpu.tolist() == [3, 1, 2]
    meta = list_to_device([0.5, 1.0], torch.float32, torch.device("meta"))
    assert meta.device.type == "meta" and meta.shape == (2,) and meta.dtype == torch.float32


def test_sampling_metadata_makes_no_synchronous_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    made_on_device: list[Any] = []
    real_tensor = torch.tensor

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("device") is not None:
            made_on_device.append(kwargs["device"])
        return real_tensor(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", spy)
    params = [
        SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                       presence_penalty=0.2, frequency_penalty=0.1, logit_bias={3: 1.0}, min_tokens=4),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0),
    ]  # fmt: skip
    meta = SamplingMetadata.build(params, [[1, 2], [3], [4, 5, 6]], [[7], [], [8]], [None, None, None],
                                  [2, 2, None], 64, torch.device("meta"))  # fmt: skip
    assert made_on_device == []
    # every option became a tensor on the device
    assert meta.temperature is not None and meta.temperature.device.type == "meta"
    assert meta.top_k is not None and meta.top_p is not None and meta.min_p is not None
    assert meta.greedy_mask is not None and meta.greedy_mask.dtype == torch.bool
    assert meta.logit_bias is not None and meta.min_tokens_mask is not None
    assert meta.repetition_penalties is not None and meta.repetition_penalties.device.type == "meta"
