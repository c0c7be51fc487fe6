"""Analyses on a dictionary's features, in the shapes of llamaviz.interpret (logit_attrs, attribution
patching, get_act_patch_*): direct logit effects, attribution to a metric, the exact effect of an
ablation, and activation patching between a clean and a corrupted prompt.

    with features.attached(model, sae, use_error_term=True):
        _, cache = model.run_with_cache(tokens)
    direct = feature_logit_attrs(cache, sae, " Paris")                 # [b, p, F] logits
    estimate = feature_attribution(model, tokens, sae, metric)         # activation x gradient, one backward
    exact = ablation_effects(model, tokens, sae, metric, estimate.top_cells(10))   # the same cells, ablated
    patched = get_act_patch_features(model, corrupted, clean_cache, metric, sae)   # [F] metric values

`metric(logits [b, p, v]) -> scalar` as in llamaviz.interpret.patching. Every forward here runs with
the dictionaries attached and, by default, their error terms (use_error_term=True), so an unedited run
gives the model's own logits and an edit of a latent moves the output by its decoded change only.
Attribution and ablation use one sign: score ~ metric - metric with the feature zeroed, the drop an
ablation causes (positive: the feature supports the metric).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from llamaviz.features.attach import attached
from llamaviz.features.dictionary import Dictionary
from llamaviz.interpret.patching.sweeps import check_pair, check_scalar
from llamaviz.llama.hook_points import frozen_parameters

RESIDUAL_WRITERS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")
COPIES_PER_FORWARD = 16  # edited copies of the prompt that go through the model together, at most
LOGITS_BYTES_PER_FORWARD = 512 * 2**20  # and at most this many bytes of logits from one forward
Cell = tuple[int, int]  # (position, feature)


def acts_name(dictionary: Dictionary) -> str:
    """The hook point of the dictionary's latent activations: {hook}.hook_sae_acts_post [b, p, F]."""
    return f"{dictionary.cfg.hook_name}.hook_sae_acts_post"


def _dictionaries(dictionaries) -> list[Dictionary]:
    items = [dictionaries] if isinstance(dictionaries, Dictionary) else list(dictionaries)
    if not items or not all(isinstance(d, Dictionary) for d in items):
        raise ValueError("pass a dictionary, a list of them or a TranscoderSet (llamaviz.features.load / "
                         f"load_transcoder_set); got {type(dictionaries).__name__}")
    return items


def _tokens(model, tokens) -> torch.Tensor:
    ids = model.to_tokens(tokens) if isinstance(tokens, (str, list)) else tokens
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"tokens must be text or ids [batch, positions]; got {getattr(ids, 'shape', ids)!r}")
    return ids.to(model.device)


# ---------------------------------------------------------------- direct logit effects


def decoder_coefficients(dictionary: Dictionary, acts: torch.Tensor, sae_input: torch.Tensor) -> torch.Tensor:
    """c [..., F] with the dictionary's output = sum_f c_f W_dec[f] + what does not depend on the latents.

    acts [..., F] from hook_sae_acts_post, sae_input [..., d_in] from hook_sae_input (the raw input): a
    decoder-norm rescale divides by |W_dec[f]|; a normalisation multiplies by the per-token factor it undoes.
    """
    coef = acts.float()
    if dictionary.cfg.rescale_acts_by_decoder_norm:
        coef = coef / dictionary.decoder_norms().detach().float()
    x = sae_input.float()
    kind = dictionary.cfg.normalize_activations
    if kind == "constant_norm_rescale":
        coef = coef * x.norm(dim=-1, keepdim=True) / dictionary.cfg.d_in ** 0.5
    elif kind == "layer_norm":
        coef = coef * (x - x.mean(-1, keepdim=True)).std(-1, keepdim=True)
    return coef


def feature_logit_attrs(cache, dictionary: Dictionary, tokens, incorrect_tokens=None) -> torch.Tensor:
    """Each feature's direct effect on the logit of `tokens` (minus `incorrect_tokens`) at every position [b, p, F].

    The convention of ActivationCache.logit_attrs: the feature's decoded contribution through the final
    norm's frozen scale (ln_final.hook_scale) and weight, then the unembedding. `cache` is a run with the
    dictionary attached (it holds {hook}.hook_sae_acts_post and .hook_sae_input). Only for dictionaries
    that write the residual stream (an SAE on it, or a transcoder writing hook_mlp_out / hook_attn_out).
    """
    cfg = dictionary.cfg
    writes = cfg.hook_name_out or cfg.hook_name
    if not writes.endswith(RESIDUAL_WRITERS):
        raise ValueError(f"the dictionary writes {writes}, which does not add into the residual stream; a direct "
                         f"logit effect needs one that does (accepted hooks end with {', '.join(RESIDUAL_WRITERS)})")
    for name in (acts_name(dictionary), f"{cfg.hook_name}.hook_sae_input", "ln_final.hook_scale"):
        if name not in cache:
            raise KeyError(f"the cache has no {name!r}: run_with_cache with the dictionary attached "
                           "(features.attached) and that hook point kept")
    model = cache.model
    direction = model.tokens_to_residual_directions(tokens).float()  # [m]
    if incorrect_tokens is not None:
        direction = direction - model.tokens_to_residual_directions(incorrect_tokens).float()
    if direction.dim() != 1:
        raise ValueError(f"pass one token and at most one incorrect token; got directions {tuple(direction.shape)}")
    per_feature = dictionary.W_dec.detach().float() @ direction.to(dictionary.W_dec.device)  # [F]
    coef = decoder_coefficients(dictionary, cache[acts_name(dictionary)], cache[f"{cfg.hook_name}.hook_sae_input"])
    scale = cache["ln_final.hook_scale"].float().to(coef.device)  # [b, p, 1]
    return coef * per_feature.to(coef.device) / scale


# ---------------------------------------------------------------- attribution to a metric


@dataclass
class FeatureAttribution:
    """Activation x gradient of the metric for every feature at every position, per dictionary."""

    scores: dict[str, torch.Tensor]  # {acts hook name: [b, p, F]} ~ metric - metric with that feature zeroed
    activations: dict[str, torch.Tensor]  # {acts hook name: [b, p, F]}
    value: float  # the metric of the run

    def top(self, count: int = 10, start: int = 0) -> list[tuple[str, int, int, float]]:
        """The `count` largest |score| summed over the batch at positions start.. (1 leaves out BOS, which
        dictionaries trained without special tokens do not model): [(acts hook name, position, feature, score)]."""
        rows = []
        for name, scores in self.scores.items():
            summed = scores.sum(0)[start:]  # [p - start, F]
            values, flat = summed.flatten().abs().topk(min(count, summed.numel()))
            rows += [(name, start + int(i) // summed.shape[1], int(i) % summed.shape[1], float(summed.flatten()[i]))
                     for v, i in zip(values, flat) if v > 0]
        return sorted(rows, key=lambda row: -abs(row[3]))[:count]

    def top_cells(self, count: int = 10, start: int = 0) -> list[Cell]:
        """(position, feature) of the top scores (one dictionary) at positions start.., for ablation_effects."""
        return [(position, feature) for _, position, feature, _ in self.top(count, start)]


def feature_attribution(model, tokens, dictionaries, metric: Callable, use_error_term: bool = True,
                        fwd_hooks: Sequence = ()) -> FeatureAttribution:
    """Activation x d metric / d activation for every feature of each dictionary at every position, from one
    forward and one backward (parameters frozen). fwd_hooks are added to the run, as in run_with_hooks."""
    items, ids = _dictionaries(dictionaries), _tokens(model, tokens)
    held: dict[str, torch.Tensor] = {}

    def leaf(x, hook):  # the embeddings become the graph's leaf, so activations get gradients
        return x.detach().requires_grad_(True)

    def keep(acts, hook):
        acts.retain_grad()
        held[hook.name] = acts

    hooks = [("hook_embed", leaf), *fwd_hooks, *((acts_name(d), keep) for d in items)]
    with frozen_parameters(model), frozen_parameters(nn.ModuleList(items)), torch.enable_grad(), \
            attached(model, *items, use_error_term=use_error_term):
        value = check_scalar(metric(model.run_with_hooks(ids, return_type="logits", fwd_hooks=hooks)))
        value.backward()
    scores, activations = {}, {}
    for name, acts in held.items():
        grad = acts.grad if acts.grad is not None else torch.zeros_like(acts)
        activations[name] = acts.detach().float()
        scores[name] = activations[name] * grad.float()
    return FeatureAttribution(scores, activations, float(value.detach()))


# ---------------------------------------------------------------- interventions and their exact effects


def edit_features(dictionary: Dictionary, features: Iterable[int], value: float | torch.Tensor = 0.0,
                  positions: Iterable[int] | None = None, add: bool = False):
    """fwd_hooks that set (or, add=True, add to) `features`' activations at `positions` (default: all).

    The edit acts at {hook}.hook_sae_acts_post: the dictionary must be attached (features.attached).
    """
    cols = torch.tensor(_features(dictionary, features))  # [K]
    rows = slice(None) if positions is None else torch.tensor(list(positions))[:, None]  # [P, 1]: pairs with cols

    def hook(acts: torch.Tensor, point) -> torch.Tensor:  # [b, p, F]
        acts = acts.clone()
        index = (slice(None), rows, cols.to(acts.device))
        acts[index] = (acts[index] + value if add else torch.zeros_like(acts[index]) + value).to(acts.dtype)
        return acts

    return [(acts_name(dictionary), hook)]


def ablate_features(dictionary: Dictionary, features: Iterable[int], positions: Iterable[int] | None = None):
    """fwd_hooks that zero `features` at `positions` (default: all) of an attached dictionary."""
    return edit_features(dictionary, features, 0.0, positions)


def steer_features(dictionary: Dictionary, features: Iterable[int], value: float,
                   positions: Iterable[int] | None = None):
    """fwd_hooks that add `value` to the activations of `features` at `positions` (default: all)."""
    return edit_features(dictionary, features, value, positions, add=True)


def _features(dictionary: Dictionary, features: Iterable[int]) -> list[int]:
    chosen = [int(f) for f in ([features] if isinstance(features, int) else features)]
    bad = [f for f in chosen if not 0 <= f < dictionary.cfg.d_sae]
    if bad or not chosen:
        raise ValueError(f"features {bad or chosen!r} are out of range; accepted: 0..{dictionary.cfg.d_sae - 1}")
    return chosen


def ablation_effects(model, tokens, dictionary: Dictionary, metric: Callable, cells: Sequence[Cell],
                     use_error_term: bool = True, fwd_hooks: Sequence = ()) -> torch.Tensor:
    """metric - metric with feature f zeroed at position p (every batch row), for each (p, f) in `cells` [n].

    The exact counterpart of feature_attribution's scores summed over the batch.
    """
    ids = _tokens(model, tokens)
    for position, feature in cells:
        _features(dictionary, [feature])
        if not -ids.shape[1] <= position < ids.shape[1]:
            raise ValueError(f"position {position} is out of range for {ids.shape[1]} tokens")

    def zero(cell):
        def edit(acts):  # acts [b, p, F] of one copy, edited in place
            acts[:, cell[0], cell[1]] = 0.0
        return edit

    base = edited_metrics(model, ids, dictionary, metric, [None], use_error_term, fwd_hooks)[0]
    return base - edited_metrics(model, ids, dictionary, metric, [zero(c) for c in cells], use_error_term, fwd_hooks)


def edited_metrics(model, ids: torch.Tensor, dictionary: Dictionary, metric: Callable, edits: list,
                   use_error_term: bool = True, fwd_hooks: Sequence = ()) -> torch.Tensor:
    """The metric of the run with each edit applied to the latents [n]: copies of the prompt go through the
    model together, copy i's activations [b, p, F] handed to edits[i] (None: unedited) to change in place."""
    b, results = ids.shape[0], []
    per_copy = ids.numel() * model.config.vocab_size * 4  # float32 logits of one copy
    copies = max(1, min(COPIES_PER_FORWARD, LOGITS_BYTES_PER_FORWARD // per_copy))
    for start in range(0, len(edits), copies):
        chunk = edits[start:start + copies]

        def apply(acts, hook, chunk=chunk):
            acts = acts.clone()
            for copy, edit in enumerate(chunk):
                if edit is not None:
                    edit(acts[copy * b:(copy + 1) * b])
            return acts

        hooks = [*fwd_hooks, (acts_name(dictionary), apply)]
        with torch.no_grad(), attached(model, dictionary, use_error_term=use_error_term):
            logits = model.run_with_hooks(ids.repeat(len(chunk), 1), return_type="logits", fwd_hooks=hooks)
        results += [check_scalar(metric(logits[copy * b:(copy + 1) * b])).float().cpu() for copy in range(len(chunk))]
    return torch.stack(results)


# ---------------------------------------------------------------- activation patching of features


def get_act_patch_features(model, corrupted_tokens, clean_cache, patching_metric: Callable, dictionary: Dictionary,
                           by_position: bool = False, use_error_term: bool = True,
                           fwd_hooks: Sequence = ()) -> torch.Tensor:
    """The metric of the corrupted run with one feature's clean activations patched in: [F] (all positions at
    once), or [p, F] (by_position=True, one position at a time).

    clean_cache is a run of the clean prompt with the dictionary attached (it holds {hook}.hook_sae_acts_post).
    A feature whose clean and corrupted activations are equal there changes nothing: it gets the
    corrupted metric without a forward of its own.
    """
    name = acts_name(dictionary)
    if name not in clean_cache:
        raise KeyError(f"the clean cache has no {name!r}: run_with_cache the clean prompt with the dictionary "
                       "attached (features.attached)")
    ids = _tokens(model, corrupted_tokens)
    check_pair(model, ids, getattr(clean_cache, "tokens", None))
    with torch.no_grad(), attached(model, dictionary, use_error_term=use_error_term), model.hooks(fwd_hooks=fwd_hooks):
        _, cache = model.run_with_cache(ids, names_filter=[name])
    corrupted, clean = cache[name], clean_cache[name].to(cache[name].device, cache[name].dtype)  # [b, p, F]
    differs = (clean != corrupted).any(0)  # [p, F]
    base = edited_metrics(model, ids, dictionary, patching_metric, [None], use_error_term, fwd_hooks)[0]
    if not by_position:
        cells = [(slice(None), int(f)) for f in differs.any(0).nonzero()[:, 0]]
        result = torch.full((differs.shape[1],), float(base))
    else:
        cells = [(int(p), int(f)) for p, f in differs.nonzero()]
        result = torch.full(tuple(differs.shape), float(base))

    def patch(cell):
        def edit(acts):
            acts[:, cell[0], cell[1]] = clean[:, cell[0], cell[1]]
        return edit

    if cells:
        values = edited_metrics(model, ids, dictionary, patching_metric, [patch(c) for c in cells], use_error_term,
                                fwd_hooks)
        for cell, value in zip(cells, values):
            result[cell[1] if not by_position else cell] = value
    return result
