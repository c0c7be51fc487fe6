"""Dictionaries spliced into a model's forward, their latents as hook points under SAELens's names.

Inside `with attached(model, sae):` the activation at sae.cfg.hook_name is replaced by the SAE's
reconstruction (or, for a transcoder, the activation at hook_name_out by the transcoder's output
from what it read at hook_name), and `{hook}.hook_sae_input / _acts_pre / _acts_post / _recons /
_error / _output` are hook points of the model: run_with_cache, run_with_hooks and every tool that
takes hook names see them. use_error_term=True adds back what the dictionary misses (computed
without the dictionary's hooks), so the model's output is unchanged until a hook edits a latent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from llamaviz.features.dictionary import Dictionary


@contextlib.contextmanager
def attached(model, *dictionaries: Dictionary, use_error_term: bool = False) -> Iterator:
    """Splice each dictionary in for the block; the model's hook table is restored on exit, also on an error."""
    dictionaries = [d for item in dictionaries for d in (item if not isinstance(item, Dictionary) else [item])]
    saved = dict(model._hook_dict)
    added: list[tuple[list, object]] = []
    try:
        for dictionary in dictionaries:
            _check(model, saved, dictionary)
            for name, point in dictionary.hook_points().items():
                point.name = name
                model._hook_dict[name] = point
            for target, fn in _splices(dictionary, use_error_term):
                saved[target].fwd_fns.append(fn)
                added.append((saved[target].fwd_fns, fn))
        yield model
    finally:
        for fns, fn in reversed(added):
            fns.remove(fn)
        model._hook_dict.clear()
        model._hook_dict.update(saved)


def _check(model, names: dict, dictionary: Dictionary) -> None:
    cfg = dictionary.cfg
    if not cfg.hook_name:
        raise ValueError("the dictionary names no hook point (its cfg.json has no metadata.hook_name); "
                         "set dictionary.cfg.hook_name, e.g. 'blocks.3.hook_resid_post'")
    for hook in (cfg.hook_name, cfg.hook_name_out) if cfg.is_transcoder else (cfg.hook_name,):
        if hook not in names:
            model._check_name(hook)  # KeyError naming the closest hook points
    width = model.config.hidden_size
    if cfg.d_in != width and not cfg.hook_name.endswith(("hook_post", "hook_pre", "hook_pre_linear")):
        raise ValueError(f"the dictionary reads {cfg.d_in} features but {cfg.hook_name} holds {width}")


def _splices(dictionary: Dictionary, use_error_term: bool):
    """(hook name, fn) pairs that put the dictionary in the forward."""
    cfg = dictionary.cfg
    if not cfg.is_transcoder:
        return [(cfg.hook_name, lambda x, hook: _output(dictionary, x, x, use_error_term))]
    read: dict[str, torch.Tensor] = {}

    def keep_input(x, hook):
        read["x"] = x

    def replace_output(out, hook):
        return _output(dictionary, read.pop("x"), out, use_error_term)

    return [(cfg.hook_name, keep_input), (cfg.hook_name_out, replace_output)]


def _output(dictionary: Dictionary, x: torch.Tensor, target: torch.Tensor, use_error_term: bool) -> torch.Tensor:
    """The dictionary's output in place of `target` (x itself for an SAE), plus the error term if asked."""
    recons = dictionary.decode(dictionary.encode(x), x)
    if not use_error_term:
        return dictionary.hook_sae_output(recons)
    with _hooks_off(dictionary), torch.no_grad():
        clean = dictionary.decode(dictionary.encode(x), x)
    error = dictionary.hook_sae_error(target - clean)
    return dictionary.hook_sae_output(recons + error)


@contextlib.contextmanager
def _hooks_off(dictionary: Dictionary):
    points = list(dictionary.hook_points().values())
    held = [(point, point.fwd_fns) for point in points]
    try:
        for point in points:
            point.fwd_fns = []
        yield
    finally:
        for point, fns in held:
            point.fwd_fns = fns
