"""Tile sizes of the fused MoE kernel (kernels/triton/fused_moe.py), per token count.

A config names one BLOCK_M (the row block both grouped GEMMs share, since the expert sort pads
each expert's rows to a multiple of it) and, for each GEMM, BLOCK_N, BLOCK_K, num_warps and
num_stages:

    {"block_m": 16, "gate_up": {"block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 4},
                    "down":    {"block_n": 32, "block_k": 128, "num_warps": 4, "num_stages": 4}}

Where they come from, first match wins:
1. a tuned table measured on the device by `python -m benchmarks.tune_moe` and shipped in
   `moe_configs/E=<experts>,H=<hidden>,I=<inter>,K=<top_k>,dtype=<dtype>,device=<name>.json`
   ({"<num_tokens>": config, ...}); the entry of the nearest measured token count is used;
2. the heuristic below, sized by the rows each expert receives on average (T * top_k / E):
   at decode a few rows per expert, so the GEMMs are weight-bandwidth bound and want many small
   tiles in flight; at prefill many rows, so bigger tiles that reuse each weight tile.
"""

from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

__all__ = ["GemmTiles", "MoeConfig", "config_file_name", "heuristic_config", "pow2_at_least_16", "select_config",
           "tuned_config", "TUNED_DIR"]

TUNED_DIR = Path(__file__).with_name("moe_configs")


@dataclass(frozen=True)
class GemmTiles:
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class MoeConfig:
    block_m: int
    gate_up: GemmTiles
    down: GemmTiles

    def to_json(self) -> dict[str, Any]:
        return {"block_m": self.block_m, "gate_up": vars(self.gate_up), "down": vars(self.down)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MoeConfig:
        return cls(int(d["block_m"]), GemmTiles(**d["gate_up"]), GemmTiles(**d["down"]))


def pow2_at_least_16(n: int) -> int:
    return max(16, 1 << max(0, (n - 1).bit_length()))  # tl.dot needs every block dim >= 16


def heuristic_config(num_tokens: int, num_experts: int, top_k: int, hidden: int, inter: int) -> MoeConfig:
    """Tiles chosen from the mean rows per expert; block dims capped by the matrix dims."""
    rows = max(1, num_tokens * top_k // num_experts)
    if rows <= 16:  # decode: bandwidth bound, narrow N tiles so the down GEMM fills the SMs
        block_m, up, down = 16, GemmTiles(64, 128, 4, 4), GemmTiles(32, 128, 4, 4)
    elif rows <= 64:
        block_m, up, down = 32, GemmTiles(64, 64, 4, 4), GemmTiles(64, 64, 4, 4)
    else:  # prefill: compute bound, reuse each weight tile over 64 rows
        block_m, up, down = 64, GemmTiles(128, 64, 8, 3), GemmTiles(128, 64, 8, 3)

    def cap(t: GemmTiles, n: int, k: int) -> GemmTiles:
        return GemmTiles(min(t.block_n, pow2_at_least_16(n)), min(t.block_k, pow2_at_least_16(k)),
                         t.num_warps, t.num_stages)  # fmt: skip

    return MoeConfig(block_m, cap(up, inter, hidden), cap(down, hidden, inter))


def config_file_name(num_experts: int, hidden: int, inter: int, top_k: int, dtype: torch.dtype,
                     device_name: str) -> str:  # fmt: skip
    dtype_name = str(dtype).removeprefix("torch.")
    return f"E={num_experts},H={hidden},I={inter},K={top_k},dtype={dtype_name},device={device_name.replace(' ', '_')}.json"


@lru_cache(maxsize=64)
def _tuned_table(file_name: str) -> tuple[list[int], list[MoeConfig]] | None:
    """(sorted token counts, their configs) from the first directory holding file_name:
    $PAGEDSERVE_MOE_CONFIG_DIR (a user's own tuning) before the shipped tables."""
    dirs = [Path(d) for d in os.environ.get("PAGEDSERVE_MOE_CONFIG_DIR", "").split(os.pathsep) if d]
    for directory in [*dirs, TUNED_DIR]:
        path = directory / file_name
        if path.is_file():
            table = {int(k): MoeConfig.from_json(v) for k, v in json.loads(path.read_text()).items()}
            keys = sorted(table)
            return keys, [table[k] for k in keys]
    return None


@lru_cache(maxsize=16)
def _device_name(index: int | None) -> str:
    return torch.cuda.get_device_name(index)


def _nearest(keys: list[int], n: int) -> int:
    i = bisect.bisect_left(keys, n)
    if i == 0:
        return 0
    if i == len(keys):
        return len(keys) - 1
    return i if keys[i] - n < n - keys[i - 1] else i - 1


def select_config(num_tokens: int, num_experts: int, top_k: int, hidden: int, inter: int,
                  dtype: torch.dtype, device: torch.device) -> MoeConfig:  # fmt: skip
    """The tuned entry nearest num_tokens for this shape and device, else the heuristic."""
    if device.type == "cuda":
        name = config_file_name(num_experts, hidden, inter, top_k, dtype, _device_name(device.index))
        tuned = tuned_config(name, num_tokens)
        if tuned is not None:
            return tuned
    return heuristic_config(num_tokens, num_experts, top_k, hidden, inter)


def tuned_config(file_name: str, num_tokens: int) -> MoeConfig | None:
    """The entry of the token count nearest num_tokens in the tuned table file_name, if any."""
    table = _tuned_table(file_name)
    if table is None:
        return None
    keys, configs = table
    return configs[_nearest(keys, num_tokens)]
