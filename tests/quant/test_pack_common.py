"""The packers' shared driver: every projection is replaced, everything else copied, and the
dequantized copy differs from the original exactly where the quantizer said."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from pagedserve.testing.quant_pack import QuantizedTensor, quantize_checkpoint, write_dequantized_checkpoint


def _halve(module: str, w: Tensor) -> QuantizedTensor:  # a "format": one tensor, w rounded to 0.5
    q = torch.round(w * 2)
    return QuantizedTensor({"qweight": q.to(torch.int8), "scales": torch.tensor([0.5])}, q / 2)


def test_quantize_then_dequantize_round_trip(tiny_checkpoints, tmp_path: Path) -> None:
    src = Path(tiny_checkpoints["llama"])
    deq = quantize_checkpoint(src, tmp_path / "q", _halve, {"quant_method": "halve"})
    stored = load_file(str(tmp_path / "q" / "model.safetensors"))
    original = {k: v for f in src.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    assert "model.layers.0.self_attn.q_proj.qweight" in stored
    assert "model.layers.0.self_attn.q_proj.weight" not in stored
    assert "lm_head.weight" in stored or "model.embed_tokens.weight" in stored
    assert set(deq) == {k for k in original if k.endswith("_proj.weight")}
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "halve"}
    assert (tmp_path / "q" / "tokenizer.json").is_file()
    write_dequantized_checkpoint(src, tmp_path / "f", deq)
    floats = load_file(str(tmp_path / "f" / "model.safetensors"))
    for name, w in original.items():
        expect = deq[name] if name in deq else w.float()
        assert torch.equal(floats[name], expect.float()), name
    assert "quantization_config" not in json.loads((tmp_path / "f" / "config.json").read_text())
