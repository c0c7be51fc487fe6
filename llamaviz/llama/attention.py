"""Grouped-query self-attention with hook points on q, k, v, scores, pattern and z.

Two ways to the same numbers: `eager_attention` writes scores -> mask -> softmax -> values out and
exposes the pattern; `sdpa_attention` calls the fused kernel. The eager path is chosen per layer
only when somebody needs this layer's scores or pattern.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llamaviz.llama.config import LlamaConfig
from llamaviz.llama.hook_points import HookPoint
from llamaviz.llama.masks import AttentionMask
from llamaviz.llama.rope import apply_rope


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[b, g, k, d] -> [b, g * groups, k, d]: each key/value head serves `groups` query heads."""
    if groups == 1:
        return x
    b, g, k, d = x.shape
    return x[:, :, None].expand(b, g, groups, k, d).reshape(b, g * groups, k, d)


def masked_scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [b, h, p, d], k [b, h, k, d] (kv heads already repeated), mask bool [b|1, 1, p, k] -> scores [b, h, p, k].

    Shared by the eager path and lazy patterns (llama/lazy_patterns.py), so both give the same numbers.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)  # [b, h, p, k]; in place: it is a fresh tensor
    # masked scores hold the dtype's lowest value, as in transformers (softmax over -inf is slower)
    return scores.masked_fill_(~mask, torch.finfo(scores.dtype).min)


def softmax_pattern(scores: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """scores [b, h, p, k] -> probabilities [b, h, p, k]: softmax in float32, cast back to the scores' dtype.

    in_place writes float32 probabilities over scores nobody else holds (same kernel, same bits): a
    captured pattern then reuses the scores' memory instead of leaving a freed block of that size
    beside it in the allocator's heap at every layer.
    """
    if in_place and scores.dtype == torch.float32 and not scores.requires_grad:
        return torch.softmax(scores, dim=-1, out=scores)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)


def eager_attention(q, k, v, mask, scale, hook_scores: HookPoint, hook_pattern: HookPoint):
    """q [b, h, p, d], k/v [b, g, k, d], mask bool [b|1, 1, p, k] -> (z [b, h, p, d], pattern [b, h, p, k])."""
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    scores = hook_scores(masked_scores(q, k, mask, scale))
    pattern = hook_pattern(softmax_pattern(scores, in_place=not hook_scores.active))  # [b, h, p, k]
    return torch.matmul(pattern, v), pattern  # [b, h, p, d]


_SDPA_HAS_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


def sdpa_attention(q, k, v, mask, scale):
    """Same result as eager_attention's z through the fused kernel; mask None means plain causal."""
    is_causal = mask is None and q.shape[2] > 1
    if _SDPA_HAS_GQA:  # the kernel reads each kv head for its query group: no repeated copies
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=True)
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)


class LlamaAttention(nn.Module):
    """Self-attention of one decoder layer: q/k/v/o projections, RoPE, GQA, optional KV cache."""

    # the hook points under blocks.{L}.attn, in forward order (a variant adding hooks extends it)
    hook_suffixes = ("q", "k", "v", "rot_q", "rot_k", "attn_scores", "pattern", "z", "result")

    def __init__(self, config: LlamaConfig, layer_idx: int, attn_implementation: str = "sdpa"):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.scale = self.head_dim ** -0.5
        self.attn_implementation = attn_implementation
        hidden, (qkv_bias, o_bias) = config.hidden_size, self.projection_biases(config)
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=o_bias)
        self.hook_q = HookPoint()  # [b, p, h, d] before RoPE
        self.hook_k = HookPoint()  # [b, p, g, d] before RoPE
        self.hook_v = HookPoint()  # [b, p, g, d]
        self.hook_rot_q = HookPoint()  # [b, p, h, d] after RoPE
        self.hook_rot_k = HookPoint()  # [b, p, g, d] after RoPE
        self.hook_attn_scores = HookPoint()  # [b, h, p, k] scaled, masked, before softmax
        self.hook_pattern = HookPoint()  # [b, h, p, k] softmax probabilities
        self.hook_z = HookPoint()  # [b, p, h, d] per-head output before o_proj
        self.hook_result = HookPoint()  # [b, p, h, m] each head's output in the residual stream; only when hooked

    @staticmethod
    def projection_biases(config: LlamaConfig) -> tuple[bool, bool]:
        """(q/k/v biased, o_proj biased): a Llama biases all four or none, as config.attention_bias says."""
        return config.attention_bias, config.attention_bias

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [b, p, m] -> q [b, p, h, d], k [b, p, g, d], v [b, p, g, d], before RoPE."""
        b, p, _ = x.shape
        q = self.hook_q(self.q_proj(x).view(b, p, self.num_heads, self.head_dim))  # [b, p, h, d]
        k = self.hook_k(self.k_proj(x).view(b, p, self.kv_heads, self.head_dim))  # [b, p, g, d]
        v = self.hook_v(self.v_proj(x).view(b, p, self.kv_heads, self.head_dim))  # [b, p, g, d]
        return q, k, v

    def qk_norm(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """Per-head normalisation of q ("q") or k ("k") before RoPE: none in Llama (Qwen3 overrides it)."""
        return x

    def needs_pattern(self, output_attentions: bool) -> bool:
        return (output_attentions or self.attn_implementation == "eager"
                or self.hook_pattern.active or self.hook_attn_scores.active)

    def forward(self, x, cos, sin, mask: AttentionMask, cache=None, output_attentions=False):
        """x [b, p, m] -> (out [b, p, m], pattern [b, h, p, k] or None).

        `mask` is this step's recipe: the eager path asks it for the dense tensor, the fused path
        for None when it is plain causal.
        """
        b, p, _ = x.shape
        q, k, v = self.project(x)  # [b, p, h|g, d]
        q = self.hook_rot_q(apply_rope(q, cos, sin)).transpose(1, 2)  # [b, h, p, d]
        k = self.hook_rot_k(apply_rope(k, cos, sin)).transpose(1, 2)  # [b, g, p, d]
        v = v.transpose(1, 2)  # [b, g, p, d]
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # [b, g, k, d]
        if self.needs_pattern(output_attentions):
            z, pattern = eager_attention(q, k, v, mask.dense(), self.scale, self.hook_attn_scores,
                                         self.hook_pattern)
        else:
            z, pattern = sdpa_attention(q, k, v, mask.for_sdpa(), self.scale), None
        z = self.hook_z(z.transpose(1, 2))  # [b, p, h, d]
        if self.hook_result.active:
            return self.head_results(z), pattern
        return self.o_proj(z.reshape(b, p, self.num_heads * self.head_dim)), pattern

    def head_results(self, z: torch.Tensor) -> torch.Tensor:
        """o_proj written per head: z [b, p, h, d] -> hook_result [b, p, h, m], summed to [b, p, m] (+ bias once).

        Under tensor parallelism z holds this rank's heads and o_proj's weight its columns; the ranks'
        partial sums are added up (hook_result.shard.summed) before the bias.
        """
        weight, bias = (_local(t) for t in (self.o_proj.weight, self.o_proj.bias))
        w_o = weight.view(-1, z.shape[2], self.head_dim)  # [m, h, d]
        result = self.hook_result(torch.einsum("bphd,mhd->bphm", z, w_o.to(z.dtype)))  # [b, p, h, m]
        out = result.sum(dim=2)
        if self.hook_result.shard is not None:
            out = self.hook_result.shard.summed(out)
        return out + bias if bias is not None else out


def _local(tensor):
    """A sharded parameter's local part (DTensor.to_local), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
