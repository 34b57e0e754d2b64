"""Rotary position embedding: frequency scaling and the cos/sin cache (settings: model_spec.py).

cos_sin_cache [max_position, rot_dim] float32, row p = [cos(p * f_0..f_{r/2-1}) | sin(...)],
with inverse frequencies f_i = base^(-2i / rot_dim) (rescaled per rope type). The cache is a
non-persistent buffer (never in checkpoints; `rotary_emb.inv_freq` checkpoint tensors are ignored).

Supported rope types: default, linear, dynamic (static NTK: base stretched for
max_position * factor, as vLLM does), llama3 (Llama 3.1 wavelength-banded scaling).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pagedserve.model_executor.layers.context import BuildContext
from pagedserve.model_executor.model_spec import SUPPORTED_ROPE_TYPES, RopeConfig, rope_from_hf

__all__ = ["RopeConfig", "get_rope_config", "RotaryEmbedding", "SUPPORTED_ROPE_TYPES"]

# Rope settings are parsed with the rest of the model config (model_spec.py); re-exported here.
get_rope_config = rope_from_hf


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
                 is_neox: bool | None = None, *, ctx: BuildContext) -> None:
        super().__init__()
        self._rotary = ctx.kernels.rotary_embedding  # bound once, at construction
        rot_dim = int(head_dim * cfg.partial_rotary_factor)
        if rot_dim % 2 != 0 or rot_dim <= 0:
            raise ValueError(f"rotary dim (head_dim * partial_rotary_factor) must be a positive "
                             f"even number, got {rot_dim}")
        self.head_dim = head_dim
        self.rot_dim = rot_dim
        self.is_neox = cfg.is_neox if is_neox is None else is_neox  # the config decides by default
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
