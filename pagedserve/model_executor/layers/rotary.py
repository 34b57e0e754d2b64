"""Rotary position embedding: config parsing, frequency scaling, and the cos/sin cache.

cos_sin_cache [max_position, rot_dim] float32, row p = [cos(p * f_0..f_{r/2-1}) | sin(...)],
with inverse frequencies f_i = base^(-2i / rot_dim) (rescaled per rope type). The cache is a
non-persistent buffer (never in checkpoints; `rotary_emb.inv_freq` checkpoint tensors are ignored).

Supported rope types: default, linear, dynamic (static NTK: base stretched for
max_position * factor, as vLLM does), llama3 (Llama 3.1 wavelength-banded scaling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pagedserve.kernels.registry import active_kernels

__all__ = ["RopeConfig", "get_rope_config", "RotaryEmbedding", "SUPPORTED_ROPE_TYPES"]

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
_DEFAULT_THETA = 10000.0


@dataclass(slots=True)
class RopeConfig:
    rope_type: str
    theta: float
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position: int | None = None  # llama3 (pre-training context)
    partial_rotary_factor: float = 1.0


def get_rope_config(hf_config: Any) -> RopeConfig:
    """Read rope settings the transformers-5 way (`rope_parameters` dict) or the older way
    (`rope_theta` + `rope_scaling` with `type` or `rope_type`). Unknown type -> ValueError."""
    params: dict[str, Any] = dict(getattr(hf_config, "rope_parameters", None) or {})
    scaling = getattr(hf_config, "rope_scaling", None)
    if not params.get("rope_type") and isinstance(scaling, dict):
        params = {**scaling, **params}
    theta = params.get("rope_theta") or getattr(hf_config, "rope_theta", None) or _DEFAULT_THETA
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_type must be one of {list(SUPPORTED_ROPE_TYPES)}, got {rope_type!r}")
    partial = params.get("partial_rotary_factor") or getattr(hf_config, "partial_rotary_factor",
                                                             None) or 1.0
    cfg = RopeConfig(rope_type=rope_type, theta=float(theta), partial_rotary_factor=float(partial))
    if rope_type != "default":
        if "factor" not in params:
            raise ValueError(f"rope scaling of type {rope_type!r} needs a 'factor'")
        cfg.factor = float(params["factor"])
    if rope_type == "llama3":
        cfg.low_freq_factor = float(params.get("low_freq_factor", 1.0))
        cfg.high_freq_factor = float(params.get("high_freq_factor", 4.0))
        cfg.original_max_position = int(params.get("original_max_position_embeddings")
                                        or hf_config.max_position_embeddings)
    return cfg


def _inv_freq(base: float, rot_dim: int) -> Tensor:
    # float32 throughout, computed exactly as transformers does, so both caches agree bit for bit.
    exponent = torch.arange(0, rot_dim, 2, dtype=torch.int64).to(torch.float32) / rot_dim
    return 1.0 / (base ** exponent)


def compute_inv_freq(cfg: RopeConfig, rot_dim: int, max_position: int) -> tuple[Tensor, int]:
    """Returns (inv_freq [rot_dim/2] float32, number of cache rows)."""
    if cfg.rope_type == "default":
        return _inv_freq(cfg.theta, rot_dim), max_position
    if cfg.rope_type == "linear":
        # Positions divided by factor == frequencies divided by factor; the cache covers the
        # stretched context.
        return _inv_freq(cfg.theta, rot_dim) / cfg.factor, int(max_position * cfg.factor)
    if cfg.rope_type == "dynamic":
        # NTK-aware base for the full stretched length max_position * factor.
        length = int(max_position * cfg.factor)
        base = cfg.theta * ((cfg.factor * length / max_position) - (cfg.factor - 1)) ** (
            rot_dim / (rot_dim - 2))
        return _inv_freq(base, rot_dim), length
    if cfg.rope_type == "llama3":
        assert cfg.original_max_position is not None
        inv_freq = _inv_freq(cfg.theta, rot_dim)
        old_len = cfg.original_max_position
        low_wavelen = old_len / cfg.low_freq_factor  # longer wavelengths: divide freq by factor
        high_wavelen = old_len / cfg.high_freq_factor  # shorter wavelengths: unchanged
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / cfg.factor, inv_freq)
        # in between: interpolate with smooth = (old_len / wavelen - low) / (high - low)
        smooth = (old_len / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor
                                                              - cfg.low_freq_factor)
        smoothed = (1 - smooth) * scaled / cfg.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), max_position
    raise ValueError(f"rope_type must be one of {list(SUPPORTED_ROPE_TYPES)}, got {cfg.rope_type!r}")


class RotaryEmbedding(nn.Module):
    """Applies rotary embedding to q [T, H*d] and k [T, KVH*d] at the given positions."""

    cos_sin_cache: Tensor

    def __init__(self, head_dim: int, max_position: int, cfg: RopeConfig,
                 is_neox: bool = True) -> None:
        super().__init__()
        self._rotary = active_kernels().rotary_embedding  # bound once, at construction
        rot_dim = int(head_dim * cfg.partial_rotary_factor)
        if rot_dim % 2 != 0 or rot_dim <= 0:
            raise ValueError(f"rotary dim (head_dim * partial_rotary_factor) must be a positive "
                             f"even number, got {rot_dim}")
        self.head_dim = head_dim
        self.rot_dim = rot_dim
        self.is_neox = is_neox
        inv_freq, length = compute_inv_freq(cfg, rot_dim, max_position)
        # Built on the current default device (the loader constructs the model on its device).
        inv_freq = inv_freq.to(torch.get_default_device())
        t = torch.arange(length, dtype=torch.float32, device=inv_freq.device)
        freqs = t[:, None] * inv_freq[None, :]  # [length, rot_dim/2]
        cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def forward(self, positions: Tensor, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """positions [T]; q [T, H*d]; k [T, KVH*d] -> rotated (q, k) with the same shapes."""
        num_tokens = q.shape[0]
        query = q.view(num_tokens, -1, self.head_dim)
        key = k.view(num_tokens, -1, self.head_dim)
        query, key = self._rotary(positions, query, key, self.cos_sin_cache,
                                                self.is_neox)
        return query.reshape(num_tokens, -1), key.reshape(num_tokens, -1)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, rot_dim={self.rot_dim}, neox={self.is_neox}"
