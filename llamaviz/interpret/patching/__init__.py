"""Activation patching with TransformerLens' function names, arguments and output shapes, and attribution patching.

    clean_logits, clean_cache = model.run_with_cache(clean_tokens)
    result = patching.get_act_patch_resid_pre(model, corrupted_tokens, clean_cache, metric)  # [L, p]
    estimate = patching.attribution_patch(model, clean_tokens, corrupted_tokens, metric)["resid_pre"]

Each `get_act_patch_*(model, corrupted_tokens, clean_cache, patching_metric, progress=None)` returns
the metric of the corrupted run with one cell of the clean run patched in, for every cell.
Grouped-query attention: the head axis of the k and v sweeps is the key/value head (g of them, as
TransformerLens does); patching kv head j changes what all query heads j * h/g .. (j + 1) * h/g - 1
read. The `*_every` stacks repeat each kv head's value over its query heads so the five rows align.
"""

from __future__ import annotations

import torch

from llamaviz.interpret.patching.gradient import attribution_patch, attribution_scores
from llamaviz.interpret.patching.kinds import BLOCK_EVERY, HEAD_EVERY, KINDS
from llamaviz.interpret.patching.sweeps import generic_activation_patch


def _sweep(kind: str):
    def sweep(model, corrupted_tokens, clean_cache, patching_metric, progress=None) -> torch.Tensor:
        return generic_activation_patch(model, corrupted_tokens, clean_cache, patching_metric, kind, progress)

    sweep.__name__ = f"get_act_patch_{kind}"
    sweep.__doc__ = (f"Patch {KINDS[kind].act} from the clean run, one cell at a time: "
                     f"[layer, {', '.join(KINDS[kind].axes)}] of metric values.")
    return sweep


get_act_patch_resid_pre = _sweep("resid_pre")
get_act_patch_resid_mid = _sweep("resid_mid")
get_act_patch_attn_out = _sweep("attn_out")
get_act_patch_mlp_out = _sweep("mlp_out")
get_act_patch_attn_head_out_by_pos = _sweep("attn_head_out_by_pos")
get_act_patch_attn_head_q_by_pos = _sweep("attn_head_q_by_pos")
get_act_patch_attn_head_k_by_pos = _sweep("attn_head_k_by_pos")
get_act_patch_attn_head_v_by_pos = _sweep("attn_head_v_by_pos")
get_act_patch_attn_head_pattern_by_pos = _sweep("attn_head_pattern_by_pos")
get_act_patch_attn_head_out_all_pos = _sweep("attn_head_out_all_pos")
get_act_patch_attn_head_q_all_pos = _sweep("attn_head_q_all_pos")
get_act_patch_attn_head_k_all_pos = _sweep("attn_head_k_all_pos")
get_act_patch_attn_head_v_all_pos = _sweep("attn_head_v_all_pos")
get_act_patch_attn_head_pattern_all_pos = _sweep("attn_head_pattern_all_pos")


def get_act_patch_block_every(model, corrupted_tokens, clean_cache, metric, progress=None) -> torch.Tensor:
    """resid_pre, attn_out and mlp_out sweeps stacked: [3, L, p]."""
    return torch.stack([generic_activation_patch(model, corrupted_tokens, clean_cache, metric, kind, progress)
                        for kind in BLOCK_EVERY])


def get_act_patch_attn_head_all_pos_every(model, corrupted_tokens, clean_cache, metric, progress=None):
    """Head output, q, k, v and pattern sweeps over all positions: [5, L, h] (kv heads repeated per group)."""
    return torch.stack([_per_query_head(model, kind, generic_activation_patch(
        model, corrupted_tokens, clean_cache, metric, f"attn_head_{kind}_all_pos", progress)) for kind in HEAD_EVERY])


def get_act_patch_attn_head_by_pos_every(model, corrupted_tokens, clean_cache, metric, progress=None):
    """Head output, q, k, v and pattern sweeps by position: [5, L, p, h] (the pattern's [L, h, p] turned)."""
    rows = []
    for kind in HEAD_EVERY:
        result = generic_activation_patch(model, corrupted_tokens, clean_cache, metric, f"attn_head_{kind}_by_pos",
                                          progress)
        rows.append(_per_query_head(model, kind, result.transpose(1, 2) if kind == "pattern" else result))
    return torch.stack(rows)


def _per_query_head(model, kind: str, result: torch.Tensor) -> torch.Tensor:
    """A k/v result over kv heads (last axis) repeated for each query head of the group."""
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    return result.repeat_interleave(groups, dim=-1) if kind in ("k", "v") else result


__all__ = [name for name in dir() if name.startswith("get_act_patch_")] + [
    "generic_activation_patch", "attribution_patch", "attribution_scores", "KINDS"]
