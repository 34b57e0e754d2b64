"""The format-independent half of the test packers: walk a checkpoint, quantize its projections.

    deq = quantize_checkpoint(src, dst, quantizer, {"quant_method": "gptq", "bits": 4, ...})
    write_dequantized_checkpoint(src, dst_float, deq)   # the same model, weights = dequantized

`deq` maps each quantized weight's checkpoint name ("model.layers.0.self_attn.q_proj.weight")
to the float32 tensor [out, in] that the quantized tensors decode to; the packer's quantizer must
make that decoding exact (it is what the format's loader is tested against).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

__all__ = ["LINEAR_SUFFIXES", "QuantizedTensor", "TensorQuantizer", "quantize_checkpoint",
           "write_dequantized_checkpoint"]

# Llama-family projection modules (the last name of the module); lm_head and embeddings are left
# unquantized, as published GPTQ/AWQ checkpoints leave them.
LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class QuantizedTensor:
    tensors: dict[str, Tensor]  # suffix -> stored tensor ("qweight", "qzeros", "scales", ...)
    dequantized: Tensor  # float32 [out, in]: exactly what `tensors` decode to


# (checkpoint module name, float32 weight [out, in]) -> its stored tensors
TensorQuantizer = Callable[[str, Tensor], QuantizedTensor]


def _weight_files(src: Path) -> list[Path]:
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {src}")
    return files


def _copy_side_files(src: Path, dst: Path) -> None:
    for path in src.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name != "model.safetensors.index.json":
            shutil.copy2(path, dst / path.name)


def quantize_checkpoint(src: str | Path, dst: str | Path, quantizer: TensorQuantizer,
                        quant_config: Mapping[str, Any], *,
                        modules: Iterable[str] = LINEAR_SUFFIXES,
                        config_location: Literal["config.json", "quantize_config.json",
                                                 "quant_config.json"] = "config.json",
                        device: str | torch.device | None = None,
                        keep_dequantized: bool = True,
                        ) -> dict[str, Tensor]:
    """Write `dst` = `src` with every `<prefix>.<module>.weight` (module in `modules`) replaced by
    the quantizer's tensors `<prefix>.<module>.<suffix>`; the biases stay as they are. The
    quantization config goes into config.json's `quantization_config` or into its own file beside
    it. Returns {weight name: dequantized float32 [out, in]}. One safetensors file is written.

    device: where the quantizer's math runs ("cuda" for an 8B model: its 7B projection weights
    take minutes of CPU time). The weight is moved there and the quantizer runs under
    `torch.device(device)`, so the tensors it creates without a device land there too; what it
    returns is brought back to the CPU. keep_dequantized=False returns {} (the float32 copies of
    an 8B model's projections would take 28 GB)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    wanted = tuple(modules)
    out: dict[str, Tensor] = {}
    dequantized: dict[str, Tensor] = {}
    count = 0
    for file in _weight_files(src):
        for name, tensor in load_file(str(file)).items():
            module, _, leaf = name.rpartition(".")
            if leaf == "weight" and tensor.dim() == 2 and module.rpartition(".")[2] in wanted:
                if device is None:
                    q = quantizer(module, tensor.float())
                else:
                    with torch.device(device):
                        q = quantizer(module, tensor.to(device).float())
                if q.dequantized.shape != tensor.shape:
                    raise ValueError(f"{name}: dequantized shape {tuple(q.dequantized.shape)} != "
                                     f"{tuple(tensor.shape)}")
                for suffix, stored in q.tensors.items():
                    out[f"{module}.{suffix}"] = stored.cpu().contiguous()
                if keep_dequantized:
                    dequantized[name] = q.dequantized.cpu()
                count += 1
            else:
                out[name] = tensor.contiguous()
    if not count:
        raise ValueError(f"no projection weights ({', '.join(wanted)}) found in {src}")
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    _copy_side_files(src, dst)
    config = json.loads((dst / "config.json").read_text())
    if config_location == "config.json":
        config["quantization_config"] = dict(quant_config)
    else:
        (dst / config_location).write_text(json.dumps(dict(quant_config), indent=2))
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dequantized


def write_dequantized_checkpoint(src: str | Path, dst: str | Path, dequantized: Mapping[str, Tensor],
                                 dtype: torch.dtype = torch.float32) -> None:
    """`dst` = `src` (unquantized) with the weights in `dequantized` replaced: the oracle model."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    out: dict[str, Tensor] = {}
    for file in _weight_files(src):
        for name, tensor in load_file(str(file)).items():
            out[name] = (dequantized[name] if name in dequantized else tensor).to(dtype).contiguous()
    missing = set(dequantized) - set(out)
    if missing:
        raise KeyError(f"not in {src}: {sorted(missing)[:3]}")
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    _copy_side_files(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.pop("quantization_config", None)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (dst / "config.json").write_text(json.dumps(config, indent=2))
