"""Rotary position embeddings: inverse-frequency tables, the scaling variants, and their application.

A scaling variant is a function from (config, head_dim) to inverse frequencies; the table below is
the whole list. "dynamic" additionally depends on how far the positions reach.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llamaviz.llama.config import LlamaConfig


def _default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))  # [d/2]


def _linear(config: LlamaConfig, dim: int) -> torch.Tensor:
    return _default_inv_freq(config.rope_theta, dim) / config.rope_scaling["factor"]


def _llama3(config: LlamaConfig, dim: int) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth blend between."""
    scaling = config.rope_scaling
    inv_freq = _default_inv_freq(config.rope_theta, dim)
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(is_medium, blended, scaled)


def _dynamic(config: LlamaConfig, dim: int, seq_len: int) -> torch.Tensor:
    """Dynamic NTK: past the trained context, grow the base with the sequence length."""
    original = config.rope_scaling.get("original_max_position_embeddings", config.max_position_embeddings)
    if seq_len <= original:
        return _default_inv_freq(config.rope_theta, dim)
    factor = config.rope_scaling["factor"]
    base = config.rope_theta * ((factor * seq_len / original) - (factor - 1)) ** (dim / (dim - 2))
    return _default_inv_freq(base, dim)


INV_FREQ = {
    "default": lambda config, dim: _default_inv_freq(config.rope_theta, dim),
    "linear": _linear,
    "llama3": _llama3,
    "dynamic": lambda config, dim: _dynamic(config, dim, 0),
}


class RotaryEmbedding(nn.Module):
    """cos and signed sin for given positions: [b, p, d] each, in the activations' dtype.

    The sin table's first half is negated so that rotating needs only a roll (see apply_rope).
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", INV_FREQ[config.rope_type](config, config.head_dim), persistent=False)

    def reset_parameters(self) -> None:
        """Recompute the table (after construction on the meta device)."""
        self.inv_freq = INV_FREQ[self.config.rope_type](self.config, self.config.head_dim).to(self.inv_freq.device)

    def frequencies(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.inv_freq

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.frequencies(position_ids)  # [b, p, d/2]
        sin = freqs.sin()
        cos = freqs.cos()
        return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


class DynamicRotaryEmbedding(RotaryEmbedding):
    """Dynamic NTK scaling: once positions reach past the trained context, the base grows with them."""

    def frequencies(self, position_ids: torch.Tensor) -> torch.Tensor:
        reach = int(position_ids.max()) + 1
        original = self.config.rope_scaling.get("original_max_position_embeddings",
                                                self.config.max_position_embeddings)
        if reach <= original:
            return self.inv_freq
        return _dynamic(self.config, self.config.head_dim, reach).to(self.inv_freq.device)


def rotary_embedding(config: LlamaConfig) -> RotaryEmbedding:
    """The rotary module for the config's rope type."""
    return DynamicRotaryEmbedding(config) if config.rope_type == "dynamic" else RotaryEmbedding(config)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [b, p, heads, d] by its positions' angles, pairing dims i and i + d/2.

    x * cos + rotate_half(x) * sin, where rotate_half([x1, x2]) = [-x2, x1]: a roll by d/2 times
    the sin table with its first half negated gives exactly those products.
    """
    half = x.shape[-1] // 2
    return x * cos[:, :, None, :] + x.roll(half, dims=-1) * signed_sin[:, :, None, :]


def default_position_ids(attention_mask: torch.Tensor | None, past_length: int, query_length: int,
                         device) -> torch.Tensor:
    """[b|1, p] positions: counted over non-padding tokens when a mask is given (left padding)."""
    if attention_mask is None:
        return torch.arange(past_length, past_length + query_length, device=device)[None]
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 1)
    return positions[:, -query_length:]
