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

from llamaviz.llama.names import get_act_name

from .kinds import KINDS, PatchKind, axis_sizes

Progress = Callable[[int, int], None]  # progress(done, total); raise from it to stop a sweep
LOGITS_BYTES_PER_FORWARD = 512 * 2**20  # cap on the logits one batched forward produces


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
                             progress: Progress | bool | None = None) -> torch.Tensor:
    """The metric after patching each cell of `kind` (a name of kinds.KINDS): [L, *axes]."""
    spec = KINDS[kind]
    tokens, resid = corrupted_inputs(model, corrupted_tokens, clean_cache)
    layers = model.config.num_hidden_layers
    sizes = axis_sizes(model.config, tokens.shape[1], spec.act)
    shape = (layers, *(sizes[a] for a in spec.axes))
    cells = list(itertools.product(*(range(sizes[a]) for a in spec.axes)))
    result = torch.zeros(shape)
    report = _progress(progress, layers * len(cells), kind)
    batch, rows = tokens.shape[0], _rows_per_forward(model, tokens)
    done = 0
    for layer in range(layers):
        name = get_act_name(spec.act, layer)
        if name not in clean_cache:
            raise KeyError(f"the clean cache has no {name!r}: run_with_cache the clean prompt with that hook point")
        clean = clean_cache[name].to(resid[layer].device)
        for start in range(0, len(cells), rows):
            chunk = cells[start:start + rows]
            logits = _patched_logits(model, resid[layer], layer, name, spec, chunk, clean)
            for r, cell in enumerate(chunk):
                result[(layer, *cell)] = check_scalar(patching_metric(logits[r * batch:(r + 1) * batch])).float()
            done += len(chunk)
            report(done)
    return result


@torch.no_grad()
def _patched_logits(model, resid, layer: int, name: str, spec: PatchKind, cells, clean) -> torch.Tensor:
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
        return model(x, start_at_layer=layer, return_type="logits")


def _rows_per_forward(model, tokens: torch.Tensor) -> int:
    per_copy = tokens.shape[0] * tokens.shape[1] * model.config.vocab_size * 4
    return max(1, LOGITS_BYTES_PER_FORWARD // per_copy)


def _progress(progress, total: int, label: str) -> Callable[[int], None]:
    """progress=True draws a tqdm bar; a callable gets (done, total); None/False reports nothing."""
    if callable(progress):
        return lambda done: progress(done, total)
    if not progress:
        return lambda done: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=label)

    def update(done: int) -> None:
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update
