"""Exact activation patching: the corrupted run with one piece of the clean run put back, for every piece.

Same numbers as TransformerLens' `patching.get_act_patch_*`, computed differently: the patched runs
of one layer go through the model together (the corrupted prompt repeated along the batch, each
copy patched at its own cell), and each starts at the patched layer from the corrupted run's
residual stream, since nothing before that layer changes. A copy patched at one position also
starts at that position (patching/suffix.py): the corrupted run's keys, values and logits stand in
for the positions before it. `metric(logits [b, p, v])` is called once per cell on that cell's
logits, exactly as TransformerLens calls it.
"""

from __future__ import annotations

import itertools
from typing import Callable

import torch

from llamaviz.llama.capture import progress_reporter
from llamaviz.llama.names import get_act_name

from llamaviz.interpret.patching.kinds import KINDS, PatchKind, axis_sizes
from llamaviz.interpret.patching.suffix import CorruptedRun, copy_logits, packed_logits, suffix_start

Progress = Callable[[int, int], None]  # progress(done, total); raise from it to stop a sweep
LOGITS_BYTES_PER_FORWARD = 512 * 2**20  # cap on the logits one batched forward produces
MAX_ROWS_PER_FORWARD = 256  # and on the copies one forward carries (activations grow with them)
PACKED_ROWS = 2048  # and on the positions of packed suffixes in one forward


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
    raise ValueError(f"clean and corrupted prompts must have the same token length to patch between them; clean "
                     f"is {tuple(clean_tokens.shape)}, corrupted is {tuple(corrupted_tokens.shape)}. "
                     + aligned(_tokenization(model, clean_tokens), _tokenization(model, corrupted_tokens)))


def aligned(clean: list, corrupted: list, before: int = 3, after: int = 40) -> str:
    """The two tokenizations side by side, position by position, from just before their first difference:
    "9: ' John' | ' Jo'" (at most `after` positions past it)."""
    clean, corrupted = [clean] if not isinstance(clean, list) else clean, corrupted
    clean = clean[0] if clean and isinstance(clean[0], list) else clean
    corrupted = corrupted[0] if corrupted and isinstance(corrupted[0], list) else corrupted
    first = next((i for i, (a, b) in enumerate(zip(clean, corrupted)) if a != b), min(len(clean), len(corrupted)))
    rows = []
    for i in range(max(0, first - before), min(max(len(clean), len(corrupted)), first + after + 1)):
        left = repr(clean[i]) if i < len(clean) else "-"
        right = repr(corrupted[i]) if i < len(corrupted) else "-"
        rows.append(f"{i}: {left} | {right}" + ("  <- first difference" if i == first else ""))
    return f"They first differ at position {first} (clean | corrupted): " + "; ".join(rows)


def _tokenization(model, tokens: torch.Tensor):
    try:
        return model.to_str_tokens(tokens[:1])
    except (ValueError, AttributeError):
        return tokens[:1].tolist()


def corrupted_inputs(model, corrupted_tokens, clean_cache) -> tuple[torch.Tensor, CorruptedRun]:
    """(tokens [b, p], the corrupted run: every layer's resid_pre, rotated keys and values, and its logits)."""
    if isinstance(corrupted_tokens, (str, list)):
        corrupted_tokens = model.to_tokens(corrupted_tokens)
    check_pair(model, corrupted_tokens, getattr(clean_cache, "tokens", None))
    layers = range(model.config.num_hidden_layers)
    names = [f"blocks.{i}.{n}" for i in layers for n in ("hook_resid_pre", "attn.hook_rot_k", "attn.hook_v")]
    with torch.no_grad():
        logits, cache = model.run_with_cache(corrupted_tokens, names_filter=names, return_type="logits")
    run = CorruptedRun(resid=[cache[f"blocks.{i}.hook_resid_pre"] for i in layers],
                       keys=[cache[f"blocks.{i}.attn.hook_rot_k"].transpose(1, 2) for i in layers],
                       values=[cache[f"blocks.{i}.attn.hook_v"].transpose(1, 2) for i in layers], logits=logits)
    return corrupted_tokens, run


def generic_activation_patch(model, corrupted_tokens, clean_cache, patching_metric: Callable, kind: str,
                             progress: Progress | bool | None = None, last_position_only: bool = False) -> torch.Tensor:
    """The metric after patching each cell of `kind` (a name of kinds.KINDS): [L, *axes].

    last_position_only=True hands the metric logits [b, 1, v] of the last position only (a metric
    reading logits[:, -1] gives the same numbers, for less unembedding work and bigger batches).
    """
    spec = KINDS[kind]
    tokens, run = corrupted_inputs(model, corrupted_tokens, clean_cache)
    layers = model.config.num_hidden_layers
    sizes = axis_sizes(model.config, tokens.shape[1], spec.act)
    shape = (layers, *(sizes[a] for a in spec.axes))
    cells = list(itertools.product(*(range(sizes[a]) for a in spec.axes)))
    result = torch.zeros(shape)
    report = progress_reporter(progress, layers * len(cells), kind)
    keep = 1 if last_position_only else 0  # logits_to_keep: 0 = every position
    rows, done = _rows_per_forward(model, tokens, keep), 0
    packed = _can_pack(model, spec)
    patch = _packed_copies if packed else _patched_copies
    for layer in range(layers):
        name = get_act_name(spec.act, layer)
        if name not in clean_cache:
            raise KeyError(f"the clean cache has no {name!r}: run_with_cache the clean prompt with that hook point")
        clean = clean_cache[name].to(run.resid[layer].device)
        for chunk in _chunks(cells, rows, spec, tokens.shape[1], packed):
            for cell, logits in zip(chunk, patch(model, run, layer, name, spec, chunk, clean, keep)):
                result[(layer, *cell)] = check_scalar(patching_metric(logits)).float()
            done += len(chunk)
            report(done)
    return result


def _chunks(cells: list, rows: int, spec: PatchKind, length: int, packed: bool):
    """The cells in groups of one forward: at most `rows` copies; packed, also at most PACKED_ROWS suffix rows
    (the packed sequence's attention grows with its square), though never less than one copy."""
    chunk, packed_rows = [], 0
    for cell in cells:
        size = length - suffix_start(spec.axes, cell) if packed else 0
        if chunk and (len(chunk) == rows or packed_rows + size > PACKED_ROWS):
            yield chunk
            chunk, packed_rows = [], 0
        chunk.append(cell)
        packed_rows += size
    if chunk:
        yield chunk


def _can_pack(model, spec: PatchKind) -> bool:
    """Copies can start at their patched position: one-position cells, no other hooks, one device, one process."""
    layer_devices = {next(block.parameters()).device for block in model.model.layers}
    return ("pos" in spec.axes and not spec.pattern_shaped and getattr(model, "tp_size", 1) == 1
            and len(layer_devices) == 1 and not any(point.active for point in model.hook_points().values()))


def _packed_copies(model, run: CorruptedRun, layer: int, name: str, spec: PatchKind, cells, clean,
                   keep: int = 0) -> list[torch.Tensor]:
    """Each cell's logits [b, p, v] (or [b, 1, v] with keep=1), its copy packed from its patched position on."""
    starts = [suffix_start(spec.axes, cell) for cell in cells]

    def patch_at(activation: torch.Tensor, offsets: list[int]) -> torch.Tensor:
        activation = activation.clone()
        for cell, offset in zip(cells, offsets):
            where = spec.index(cell)  # (pos, ...): the copy's patched position is the first of its suffix
            activation[(slice(None), offset, *where[1:])] = clean[(slice(None), *where)].to(activation.dtype)
        return activation

    packed, offsets = packed_logits(model, run, layer, name, patch_at, starts, last_only=bool(keep))
    if keep:
        return [packed[:, r:r + 1] for r in range(len(cells))]
    return [copy_logits(run, packed, start, offset) for start, offset in zip(starts, offsets)]


@torch.no_grad()
def _patched_copies(model, run: CorruptedRun, layer: int, name: str, spec: PatchKind, cells, clean,
                    keep: int = 0) -> list[torch.Tensor]:
    """Each cell's logits [b, p, v]: n patched copies of the corrupted run in one forward, from `layer`."""
    resid = run.resid[layer]
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
        logits = model(x, start_at_layer=layer, return_type="logits", logits_to_keep=keep)
    return list(logits.split(batch))


def _rows_per_forward(model, tokens: torch.Tensor, keep: int = 0) -> int:
    per_copy = tokens.shape[0] * (keep or tokens.shape[1]) * model.config.vocab_size * 4
    return max(1, min(LOGITS_BYTES_PER_FORWARD // per_copy, MAX_ROWS_PER_FORWARD // tokens.shape[0]))
