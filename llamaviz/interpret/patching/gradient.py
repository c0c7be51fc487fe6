"""Attribution patching: every exact sweep estimated from one forward and one backward per prompt pair.

metric(corrupted + d) - metric(corrupted) ~ d . dmetric/dact at the corrupted run, with
d = clean - corrupted for the patched cell; summed over the axes a cell covers (batch, features,
and the positions/keys it spans), so each estimate has the shape of its exact sweep. The values are
estimated changes of the metric (exact sweep minus the unpatched corrupted metric).
"""

from __future__ import annotations

import torch

from llamaviz.llama.hook_points import frozen_parameters
from llamaviz.llama.names import get_act_name

from llamaviz.interpret.patching.kinds import KINDS
from llamaviz.interpret.patching.sweeps import check_pair, check_scalar


def attribution_patch(model, clean_tokens, corrupted_tokens, metric, names=None) -> dict[str, torch.Tensor]:
    """{kind: estimate} for the kinds in `names` (default: every kind of llamaviz.interpret.patching.KINDS)."""
    if isinstance(clean_tokens, (str, list)):
        clean_tokens = model.to_tokens(clean_tokens)
    if isinstance(corrupted_tokens, (str, list)):
        corrupted_tokens = model.to_tokens(corrupted_tokens)
    check_pair(model, corrupted_tokens, clean_tokens)
    kinds = _kinds(names)
    hooks = _hook_names(model, kinds)
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean_tokens, names_filter=hooks, return_type=None)
    return attribution_scores(model, corrupted_tokens, clean_cache, metric, kinds)


def attribution_scores(model, corrupted_tokens, clean_cache, metric, names=None) -> dict[str, torch.Tensor]:
    """Like attribution_patch, with the clean activations given as a cache (any activations, not only a run's)."""
    kinds = _kinds(names)
    hooks = _hook_names(model, kinds)
    acts, grads = _corrupted_grads(model, corrupted_tokens, metric, hooks)
    result = {}
    for kind in kinds:
        spec = KINDS[kind]
        rows = []
        for layer in range(model.config.num_hidden_layers):
            name = get_act_name(spec.act, layer)
            if name not in clean_cache:
                raise KeyError(f"the clean cache has no {name!r}: capture it with run_with_cache")
            delta = clean_cache[name].to(acts[name].device, torch.float32) - acts[name].float()
            rows.append(_reduce(spec, delta * grads[name].float()))
        result[kind] = torch.stack(rows).cpu()
    return result


def _kinds(names) -> list[str]:
    kinds = list(KINDS) if names is None else ([names] if isinstance(names, str) else list(names))
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown patching kinds {unknown or names!r}; accepted: {', '.join(KINDS)}")
    return kinds


def _hook_names(model, kinds: list[str]) -> list[str]:
    acts = {KINDS[k].act for k in kinds}
    return [get_act_name(a, layer) for layer in range(model.config.num_hidden_layers) for a in sorted(acts)]


def _corrupted_grads(model, tokens, metric, names: list[str]):
    """The corrupted run's activations and d metric / d activation for each named hook point."""
    acts: dict[str, torch.Tensor] = {}

    def leaf(x, hook):  # the embeddings become the graph's leaf, so activations get gradients
        return x.detach().requires_grad_(True)

    def keep(x, hook):
        x.retain_grad()
        acts[hook.name] = x

    with frozen_parameters(model), torch.enable_grad():
        hooks = [("hook_embed", leaf)] + [(name, keep) for name in names]
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks, return_type="logits")
        check_scalar(metric(logits)).backward()
    grads = {name: (x.grad if x.grad is not None else torch.zeros_like(x)) for name, x in acts.items()}
    return {name: x.detach() for name, x in acts.items()}, grads


def _reduce(spec, contribution: torch.Tensor) -> torch.Tensor:
    """Sum a per-element estimate over everything one cell covers, keeping the swept axes."""
    if spec.pattern_shaped:  # [b, h, q, k]
        return contribution.sum(dim=(0, 2, 3)) if "dest_pos" not in spec.axes else contribution.sum(dim=(0, 3))
    if "head" in spec.axes:  # [b, p, h, d]
        return contribution.sum(dim=(0, 1, 3)) if "pos" not in spec.axes else contribution.sum(dim=(0, 3))
    return contribution.sum(dim=(0, 2))  # [b, p, m] -> [p]
