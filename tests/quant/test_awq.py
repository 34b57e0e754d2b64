"""AWQ (GEMM) checkpoints packed by the test packer (pagedserve.testing.quant_pack.awq) load as
published: the interleaved packing decodes exactly to the packer's weights, both config
spellings are read, modules_to_not_convert stay float, greedy tokens equal the float32 model of
the dequantized weights, and the GEMV version and bad values are refused clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pagedserve import EngineArgs
from pagedserve.model_executor.quantization.awq import AWQConfig
from pagedserve.model_executor.quantization.wna16_method import unpack_awq_columns
from pagedserve.testing.quant_pack import quantize_checkpoint
from pagedserve.testing.quant_pack.awq import awq_config, awq_quantizer, pack_awq
from tests.quant.wna16_helpers import (
    assert_greedy_equals_dequantized,
    assert_layers_equal_packer,
    assert_tp2_logits_equal_tp1,
    linears,
    load,
    wide_checkpoint,
)

__all__ = ["wide_checkpoint"]  # the fixture, imported for pytest


def test_interleaved_order_round_trips() -> None:
    # column j of each 8 sits at bits 4 * (0 4 1 5 2 6 3 7)[j] of its word
    values = torch.arange(16).reshape(2, 8)
    words = pack_awq(values)
    assert words.shape == (2, 1)
    nibbles = [(int(words[0, 0]) >> (4 * i)) & 0xF for i in range(8)]
    assert nibbles == [0, 2, 4, 6, 1, 3, 5, 7]
    q = torch.randint(0, 16, (5, 24), generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_awq_columns(pack_awq(q)), q.to(torch.int32))


@pytest.mark.parametrize("group", [64, 128, 32])
@pytest.mark.parametrize("autoawq_file", [False, True])
def test_layers_decode_to_the_packed_values(wide_checkpoint: str, tmp_path: Path, group: int,
                                            autoawq_file: bool) -> None:
    location = "quant_config.json" if autoawq_file else "config.json"
    deq = quantize_checkpoint(wide_checkpoint, tmp_path / "q", awq_quantizer(group),
                              awq_config(group, autoawq_file=autoawq_file), config_location=location)
    # AutoAWQ's quant_config.json names no quant_method: the user names it (vLLM's alias too)
    loaded = load(tmp_path / "q", quantization="awq_marlin" if autoawq_file else None)
    assert isinstance(loaded.quant_config, AWQConfig)
    assert loaded.quant_config.group_size == group
    assert_layers_equal_packer(loaded, deq)
    w = linears(loaded.model)["model.layers.1.mlp.down_proj"].wna16_weight
    assert (w.bits, w.group_size, w.perm) == (4, group, None)


def test_modules_to_not_convert_stay_float(wide_checkpoint: str, tmp_path: Path) -> None:
    skip = ["layers.0.self_attn", "down_proj"]
    deq = quantize_checkpoint(wide_checkpoint, tmp_path / "q", awq_quantizer(64, modules_to_not_convert=skip),
                              awq_config(64, modules_to_not_convert=skip))
    unquantized = {"model.layers.0.self_attn.qkv_proj", "model.layers.0.self_attn.o_proj",
                   "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    assert_layers_equal_packer(load(tmp_path / "q"), deq, unquantized=unquantized)


# the second through tensor_parallel_size 2 (one gloo worker process per rank)
@pytest.mark.parametrize(("group", "autoawq_file", "tp"), [(128, False, 1), (64, True, 2)])
def test_greedy_equals_float_model_of_the_dequantized_weights(wide_checkpoint: str, tmp_path: Path,
                                                              group: int, autoawq_file: bool, tp: int) -> None:
    location = "quant_config.json" if autoawq_file else "config.json"
    deq = quantize_checkpoint(wide_checkpoint, tmp_path / "q", awq_quantizer(group),
                              awq_config(group, autoawq_file=autoawq_file), config_location=location)
    assert_greedy_equals_dequantized(wide_checkpoint, tmp_path / "q", deq,
                                     quantization="awq" if autoawq_file else None, tensor_parallel_size=tp)


def test_tensor_parallel_matches_one_rank(wide_checkpoint: str, tmp_path: Path) -> None:
    quantize_checkpoint(wide_checkpoint, tmp_path / "q", awq_quantizer(64), awq_config(64))
    assert_tp2_logits_equal_tp1(tmp_path / "q")


def test_gemv_version_and_bad_values_are_refused() -> None:
    good = awq_config(128)
    for change, message in [({"version": "gemv"}, "AWQ version 'gemv' is not supported: only the GEMM"),
                            ({"version": "GEMV_FAST"}, "AWQ version 'GEMV_FAST' is not supported"),
                            ({"bits": 8}, r"AWQ bits must be one of \[4\], got 8"),
                            ({"group_size": -1}, "AWQ group_size must be a positive integer, got -1"),
                            ({"group_size": "128"}, "got '128'"),
                            ({"zero_point": False}, "without a zero point"),
                            ({"modules_to_not_convert": [3]}, "modules_to_not_convert must be a list")]:
        with pytest.raises(ValueError, match=message):
            AWQConfig.from_config({**good, **change})
    with pytest.raises(ValueError, match="AWQ version 'GEMV' is not supported"):
        AWQConfig.from_config(awq_config(128, autoawq_file=True, version="gemv"))
    with pytest.raises(ValueError, match=r"has no bits \(w_bit / bits\)"):
        AWQConfig.from_config({"q_group_size": 128})


def test_gptq_requested_for_an_awq_checkpoint_fails(wide_checkpoint: str, tmp_path: Path) -> None:
    quantize_checkpoint(wide_checkpoint, tmp_path / "q", awq_quantizer(128), awq_config(128))
    with pytest.raises(ValueError, match=r"quantization='gptq' was requested.*quantized with 'awq'"):
        EngineArgs(model=str(tmp_path / "q"), quantization="gptq").create_engine_config()
    with pytest.raises(ValueError, match=r"quantization='gptq_marlin' was requested.*quantized with 'awq'"):
        load(tmp_path / "q", quantization="gptq_marlin")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    cfg["quantization_config"]["version"] = "gemv"
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="AWQ version 'gemv' is not supported"):
        load(tmp_path / "q")
