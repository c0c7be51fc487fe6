"""Interventions on a graph's features: set or zero a feature at a position and rerun.

An edit is (layer, position, feature, value): the feature's output at that (layer, position) becomes
value x its decoder row. With frozen attention the rerun is the prompt's frozen replacement model
(patterns, norm scales and every other feature fixed; the change travels the linear paths, so a
logit node moves by exactly minus the edge when a feature is zeroed). Live, it is the model itself
with that layer's hook_mlp_out moved by (value - the feature's live activation) x decoder row, so
attention, norms and the MLPs downstream respond. `generate_with` generates greedily with live edits,
one list for the prompt's positions and one applied at every new position's forward.
"""

from __future__ import annotations

import torch

from llamaviz.graphs.replacement import ReplacementRun, _eager


def _check(edits, transcoders, positions: int | None) -> list[tuple[int, int, int, float]]:
    checked = []
    for edit in edits:
        if len(edit) != 4:
            raise ValueError(f"an edit is (layer, position, feature, value); got {edit!r}")
        layer, position, feature, value = int(edit[0]), int(edit[1]), int(edit[2]), float(edit[3])
        if not 0 <= layer < len(transcoders):
            raise ValueError(f"edit layer {layer} is out of range; accepted: 0..{len(transcoders) - 1}")
        if positions is not None and not 0 <= position < positions:
            raise ValueError(f"edit position {position} is out of range; accepted: 0..{positions - 1}")
        if not 0 <= feature < transcoders[layer].W_dec.shape[0]:
            raise ValueError(f"feature {feature} is out of range; layer {layer} has {transcoders[layer].W_dec.shape[0]}")
        checked.append((layer, position, feature, value))
    return checked


def _top(logits: torch.Tensor, top: int) -> list[tuple[int, float]]:
    probs = logits[-1].float().softmax(-1)
    values, tokens = probs.topk(top)
    return list(zip(tokens.tolist(), values.tolist()))


def intervene(model, transcoders, ids: torch.Tensor, edits, freeze_attention: bool = True, top: int = 10) -> dict:
    """{"logits": [p, v] after the edits, "top": [(token, probability)] at the last position, "before": the same}."""
    edits = _check(edits, transcoders, ids.shape[1])
    if freeze_attention:
        run = ReplacementRun(model, transcoders, ids)
        additions = {}
        for layer, position, feature, value in edits:
            change = (value - run.acts[layer][position, feature]) * transcoders[layer].W_dec[feature].detach()
            additions.setdefault(layer, torch.zeros(1, *run.embed.shape, dtype=run.embed.dtype))[0, position] += change
        with torch.no_grad():
            logits, _, _ = run.forward(1, additions)
        before = run.logits[0]
    else:
        with torch.no_grad():
            before = model(ids, return_type="logits")[0]
            logits = live_logits(model, transcoders, ids, edits)
    return {"logits": logits[0].detach(), "top": _top(logits[0].detach(), top), "before": _top(before.detach(), top)}


def _live_hooks(transcoders, edits: list, every_from: int | None, every: list) -> list:
    """hook_in keeps the live MLP input; hook_mlp_out adds (value - live activation) x decoder row."""
    live, hooks = {}, []
    layers = sorted({e[0] for e in edits} | {e[0] for e in every})
    for layer in layers:
        tc = transcoders[layer]

        def keep(x, hook, layer=layer):
            live[layer] = x
            return x

        def edit(out, hook, layer=layer, tc=tc):
            out = out.clone()
            spots = [(pos, f, v) for l, pos, f, v in edits if l == layer]
            if every_from is not None:
                spots += [(pos, f, v) for l, f, v in every for pos in range(every_from, out.shape[1]) if l == layer]
            for position, feature, value in spots:
                acts = tc.encode(live[layer][:, position])  # [b, d_tc]
                out[:, position] += (value - acts[:, feature:feature + 1]) * tc.W_dec[feature]
            return out

        hooks += [(f"blocks.{layer}.mlp.hook_in", keep), (f"blocks.{layer}.hook_mlp_out", edit)]
    return hooks


def live_logits(model, transcoders, ids: torch.Tensor, edits, every_from: int | None = None, every=()) -> torch.Tensor:
    """[b, p, v]: the model's logits with the edits applied live (and `every` (layer, feature, value) from every_from)."""
    with _eager(model), model.hooks(fwd_hooks=_live_hooks(transcoders, list(edits), every_from, list(every))):
        return model(ids, return_type="logits")


def generate_with(model, transcoders, ids: torch.Tensor, edits=(), every=(), max_new_tokens: int = 10) -> torch.Tensor:
    """[1, p + new] greedy continuation with live edits: `edits` on the prompt, `every` (layer, feature, value)
    at each new position, both applied in every step's forward (the whole sequence rerun, no cache)."""
    edits = _check(edits, transcoders, ids.shape[1])
    every = [(layer, feature, value) for layer, _, feature, value in _check([(l, 0, f, v) for l, f, v in every],
                                                                            transcoders, None)]
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    tokens = ids
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = live_logits(model, transcoders, tokens, edits, ids.shape[1], every)
            tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens
