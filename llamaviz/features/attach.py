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
from llamaviz.llama.hook_points import activation_numel, is_pattern_shaped


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


HEADED = ("hook_q", "hook_k", "hook_v", "hook_z", "hook_rot_q", "hook_rot_k", "hook_q_normalized",
          "hook_k_normalized", "hook_result")  # [b, p, heads, d]: read as [b, p, heads * d] (reshape "hook_z")


def hook_width(model, name: str) -> int:
    """Features per position of hook point `name` ([b, p, width], or [b, p, h, d] as h * d), from the config.

    ValueError for the attention pattern and scores ([b, h, q, k]: their width grows with the prompt).
    """
    if is_pattern_shaped(name):
        raise ValueError(f"{name} holds attention over key positions [batch, head, query, key]; no dictionary reads "
                         "it (accepted: hooks shaped [batch, pos, features] or [batch, pos, head, d_head])")
    return activation_numel(name, model.config, 1, 1, 1)


def _check(model, names: dict, dictionary: Dictionary) -> None:
    """ValueError (KeyError for an unknown hook) before anything is attached: the hooks exist, are whole
    on this rank, and their widths are the dictionary's d_in (and d_out for a transcoder's output)."""
    cfg = dictionary.cfg
    if not cfg.hook_name:
        raise ValueError("the dictionary names no hook point (its cfg.json has no metadata.hook_name); "
                         "set dictionary.cfg.hook_name, e.g. 'blocks.3.hook_resid_post'")
    reads = [(cfg.hook_name, cfg.d_in, "d_in")]
    if cfg.is_transcoder:
        if not cfg.hook_name_out:
            raise ValueError(f"the transcoder reading {cfg.hook_name} names no output hook (metadata.hook_name_out); "
                             "set dictionary.cfg.hook_name_out, e.g. 'blocks.3.hook_mlp_out'")
        reads.append((cfg.hook_name_out, cfg.d_out or cfg.d_in, "d_out"))
    for hook, width, field in reads:
        if hook not in names:
            model._check_name(hook)  # KeyError naming the closest hook points
        if getattr(names[hook], "shard", None) is not None:
            raise ValueError(f"{hook} holds only this rank's {names[hook].shard.unit} under tensor parallelism; "
                             "attach dictionaries to hooks that are whole on every rank (the residual stream, "
                             "hook_attn_out, hook_mlp_out, mlp.hook_in)")
        expected = hook_width(model, hook)
        if width != expected:
            raise ValueError(f"the dictionary's {field} is {width} but {hook} holds {expected} features per position"
                             f"{_shape_note(model, hook)}; accepted: a dictionary trained on that hook ({field}={expected})")
        headed = hook.rsplit(".", 1)[-1] in HEADED
        if field == "d_in" and headed != (cfg.reshape_activations == "hook_z"):
            raise ValueError(f"{hook} is {'[batch, pos, head, d_head]' if headed else '[batch, pos, features]'}: "
                             f"the dictionary's reshape_activations must be {'hook_z' if headed else 'none'}, "
                             f"got {cfg.reshape_activations!r}")


def _shape_note(model, hook: str) -> str:
    if hook.rsplit(".", 1)[-1] not in HEADED:
        return ""
    kv = hook.rsplit(".", 1)[-1] in ("hook_k", "hook_v", "hook_rot_k", "hook_k_normalized")
    heads = model.config.num_key_value_heads if kv else model.config.num_attention_heads
    return f" ({heads} heads x {activation_numel(hook, model.config, 1, 1, 1) // heads})"


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
