"""Hook factories for interventions: each returns fwd_hooks for `model.hooks(...)` / `run_with_hooks`.

    with model.hooks(fwd_hooks=ablate_heads([(3, 1)])):
        logits = model(ids).logits
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterable, Mapping

import torch

from llamaviz.llama.activation_cache import ActivationCache
from llamaviz.llama.hook_points import held_heads, query_dim

ABLATION_MODES = ("zero", "mean")


def _heads_by_layer(heads, layer_index=operator.index, head_index=operator.index) -> dict[int, list[int]]:
    """Accept [(layer, head), ...] or {layer: [heads]}; group heads by layer, each index checked as it is read."""
    pairs = ([(layer, h) for layer, hs in heads.items() for h in hs] if isinstance(heads, Mapping)
             else list(heads))
    grouped: dict[int, list[int]] = {}
    for layer, head in pairs:
        grouped.setdefault(layer_index(layer), []).append(head_index(head))
    return grouped


def check_heads(model, heads) -> dict[int, list[int]]:
    """Validated {layer: [heads]}; ValueError naming the range for an out-of-range layer or head."""
    return _heads_by_layer(heads, model.config.check_layer, model.config.check_head)


def ablate_heads(heads, mode: str = "zero", model=None, mean_cache: ActivationCache | None = None):
    """Knock out heads through hook_z: zero them, or replace them by their mean output.

    `heads` is [(layer, head), ...] or {layer: [heads]}. For "mean", the mean over batch and
    positions of `mean_cache`'s hook_z (a reference run) is used, or of the current run when absent.
    """
    if mode not in ABLATION_MODES:
        raise ValueError(f"ablation mode {mode!r} is not supported; accepted: {', '.join(ABLATION_MODES)}")
    grouped = check_heads(model, heads) if model is not None else _heads_by_layer(heads)
    hooks = []
    for layer, hs in grouped.items():
        name = f"blocks.{layer}.attn.hook_z"
        reference = mean_cache[name] if (mode == "mean" and mean_cache is not None) else None
        hooks.append((name, _head_ablation(hs, mode, reference)))
    return hooks


def _head_ablation(heads: list[int], mode: str, reference: torch.Tensor | None):
    """The hook for ablate_heads; a partial of a module-level function, so it pickles (tensor-parallel app)."""
    return functools.partial(_ablate, heads, mode, reference)


def _ablate(heads: list[int], mode: str, reference: torch.Tensor | None, z: torch.Tensor, hook) -> torch.Tensor:
    """z [b, p, h, d] (this rank's heads under tensor parallelism) with `heads` (global indices) ablated."""
    held, local = held_heads(hook, heads)  # global heads this activation holds, and where
    z = z.clone()
    if mode == "zero":
        z[:, :, local] = 0
    else:
        source = reference[:, :, held] if reference is not None else z[:, :, local]  # the reference is full
        z[:, :, local] = source.mean(dim=(0, 1)).to(z.dtype)
    return z


def patch_activation(name: str, source: ActivationCache, positions: Iterable[int] | None = None):
    """Replace activation `name` at `positions` (default: all) with its value from another run's cache.

    For activations with positions on dim 1 ([b, p, ...]); patterns/scores patch query rows (dim 2).
    """
    source_value = source[name]  # full (gathered) under tensor parallelism
    dim = query_dim(name)
    index = None if positions is None else list(positions)

    def hook(x: torch.Tensor, hook) -> torch.Tensor:
        shard = getattr(hook, "shard", None)
        donor = source_value if shard is None else shard.local(source_value)  # this rank's heads
        if index is None and donor.shape != x.shape:
            raise ValueError(f"cannot patch {name}: source shape {tuple(donor.shape)} differs from this run's "
                             f"{tuple(x.shape)}; pass positions= to patch only some positions")
        x = x.clone()
        if index is None:
            return donor.to(x.device, x.dtype)
        selector = [slice(None)] * dim + [index]
        x[tuple(selector)] = donor[tuple(selector)].to(x.device, x.dtype)
        return x

    return [(name, hook)]


def steer(layers, vector: torch.Tensor, scale: float = 1.0, positions: Iterable[int] | None = None,
          hook: str = "hook_resid_post"):
    """Add `scale * vector` [m] to the residual stream of each layer in `layers` (an int or a list)."""
    layers = [layers] if isinstance(layers, int) else list(layers)
    index = None if positions is None else list(positions)

    def add(x: torch.Tensor, point) -> torch.Tensor:  # x [b, p, m]
        delta = (scale * vector).to(x.device, x.dtype)
        if index is None:
            return x + delta
        x = x.clone()
        x[:, index] += delta
        return x

    return [(f"blocks.{layer}.{hook}", add) for layer in layers]
