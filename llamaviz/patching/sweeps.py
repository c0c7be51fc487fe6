"""Exact activation patching: the corrupted run with one piece of the clean run put back, for every piece.

Same numbers as TransformerLens' `patching.get_act_patch_*`, computed differently: the patched runs
of one layer go through the model together (the corrupted prompt repeated along the batch, each
copy patched at its own cell), and each starts at the patched layer from the corrupted run's
residual stream, since nothing before that layer changes. `metric(logits [b, p, v])` is called once
per cell on that cell's logits, exactly as TransformerLens calls it.
"""

from __future__ import annotations

import itertools
from typing import Callable

import torch

from llamaviz.llama.capture import progress_reporter
from llamaviz.llama.names import get_act_name

from .kinds import KINDS, PatchKind, axis_sizes

Progress = Callable[[int, int], None]  # progress(done, total); raise from it to stop a sweep
LOGITS_BYTES_PER_FORWARD = 512 * 2**20  # cap on the logits one batched forward produces
MAX_ROWS_PER_FORWARD = 256  # and on the copies one forward carries (activations grow with them)


def check_scalar(value, where: str = "metric") -> torch.Tensor:
    """The metric's value as a 0-d tensor; ValueError when it is not one number."""
    value = torch.as_tensor(value)
    if value.numel() != 1:
        raise ValueError(f"the {where} must return a scalar (a float or a one-element tensor); it returned a "
                         f"tensor of shape {tuple(value.shape)} (reduce it, e.g. with .mean())")
    return value.reshape(())


def check_pair(model, corrupted_tokens: torch.Tensor, clean_tokens: torch.Tensor | None) -> None:
    """Clean and corrupted prompts must tokenize to the same shape; the error shows both tokenizations."""
    if clean_tokens is None or tuple(clean_tokens.shape) == tuple(corrupted_tokens.shape):
        return
    show = _tokenization(model, clean_tokens), _tokenization(model, corrupted_tokens)
    raise ValueError(f"clean and corrupted prompts must have the same token length to patch between them; "
                     f"clean is {tuple(clean_tokens.shape)}: {show[0]}, corrupted is "
                     f"{tuple(corrupted_tokens.shape)}: {show[1]}")


def _tokenization(model, tokens: torch.Tensor):
    try:
        return model.to_str_tokens(tokens[:1])
    except (ValueError, AttributeError):
        return tokens[:1].tolist()


def corrupted_inputs(model, corrupted_tokens, clean_cache) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(tokens [b, p], the corrupted run's resid_pre of every layer [b, p, m])."""
    if isinstance(corrupted_tokens, (str, list)):
        corrupted_tokens = model.to_tokens(corrupted_tokens)
    check_pair(model, corrupted_tokens, getattr(clean_cache, "tokens", None))
    names = [f"blocks.{i}.hook_resid_pre" for i in range(model.config.num_hidden_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(corrupted_tokens, names_filter=names, return_type=None)
    return corrupted_tokens, [cache[name] for name in names]


def generic_activation_patch(model, corrupted_tokens, clean_cache, patching_metric: Callable, kind: str,
                             progress: Progress | bool | None = None, last_position_only: bool = False) -> torch.Tensor:
    """The metric after patching each cell of `kind` (a name of kinds.KINDS): [L, *axes].

    last_position_only=True hands the metric logits [b, 1, v] of the last position only (a metric
    reading logits[:, -1] gives the same numbers, for less unembedding work and bigger batches).
    """
    spec = KINDS[kind]
    tokens, resid = corrupted_inputs(model, corrupted_tokens, clean_cache)
    layers = model.config.num_hidden_layers
    sizes = axis_sizes(model.config, tokens.shape[1], spec.act)
    shape = (layers, *(sizes[a] for a in spec.axes))
    cells = list(itertools.product(*(range(sizes[a]) for a in spec.axes)))
    result = torch.zeros(shape)
    report = progress_reporter(progress, layers * len(cells), kind)
    keep = 1 if last_position_only else 0  # logits_to_keep: 0 = every position
    batch, rows = tokens.shape[0], _rows_per_forward(model, tokens, keep)
    done = 0
    for layer in range(layers):
        name = get_act_name(spec.act, layer)
        if name not in clean_cache:
            raise KeyError(f"the clean cache has no {name!r}: run_with_cache the clean prompt with that hook point")
        clean = clean_cache[name].to(resid[layer].device)
        for start in range(0, len(cells), rows):
            chunk = cells[start:start + rows]
            logits = _patched_logits(model, resid[layer], layer, name, spec, chunk, clean, keep)
            for r, cell in enumerate(chunk):
                result[(layer, *cell)] = check_scalar(patching_metric(logits[r * batch:(r + 1) * batch])).float()
            done += len(chunk)
            report(done)
    return result


@torch.no_grad()
def _patched_logits(model, resid, layer: int, name: str, spec: PatchKind, cells, clean, keep: int = 0) -> torch.Tensor:
    """Logits [n * b, p, v] of n patched copies of the corrupted run, starting at `layer`."""
    batch = resid.shape[0]

    def patch(activation: torch.Tensor, hook) -> torch.Tensor:
        activation = activation.clone()
        for r, cell in enumerate(cells):
            where = spec.index(cell)
            rows = slice(r * batch, (r + 1) * batch)
            activation[(rows, *where)] = clean[(slice(None), *where)].to(activation.dtype)
        return activation

    x = resid.repeat(len(cells), 1, 1)  # [n * b, p, m]
    with model.hooks(fwd_hooks=[(name, patch)]):
        return model(x, start_at_layer=layer, return_type="logits", logits_to_keep=keep)


def _rows_per_forward(model, tokens: torch.Tensor, keep: int = 0) -> int:
    per_copy = tokens.shape[0] * (keep or tokens.shape[1]) * model.config.vocab_size * 4
    return max(1, min(LOGITS_BYTES_PER_FORWARD // per_copy, MAX_ROWS_PER_FORWARD // tokens.shape[0]))
