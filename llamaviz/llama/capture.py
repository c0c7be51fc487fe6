"""Recording activations (run_with_cache, generate_with_cache) and the memory guard.

One `Recorder` serves a single forward and a whole decode loop. patterns="stored" keeps the
[b, h, p, k] matrices; patterns="lazy" keeps each layer's rot_q / rot_k and the mask recipe and
computes a pattern when it is read (llama/lazy_patterns.py): linear in T instead of quadratic.
"""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from collections.abc import Callable

import torch

from llamaviz.llama import activation_cache
from llamaviz.llama.activation_cache import ActivationCache
from llamaviz.llama.hook_points import activation_numel, is_pattern_shaped, layer_of
from llamaviz.llama.lazy_patterns import LazyPatterns, ResidualPieces, StoredPieces, lazy_piece_names
from llamaviz.llama.masks import AttentionMask
from llamaviz.llama.rope import default_position_ids

PATTERN_MODES = ("stored", "lazy", "recompute")
LAZY_MODES = ("lazy", "recompute")  # "recompute": rot_q / rot_k from the kept resid_pre, nothing else stored


def check_patterns_mode(patterns: str) -> str:
    if patterns not in PATTERN_MODES:
        raise ValueError(f"patterns={patterns!r} is not supported; accepted: {', '.join(PATTERN_MODES)}")
    return patterns


def recorded_names(names: list[str], patterns: str) -> tuple[list[str], list[str], list[str]]:
    """(stored names, lazy pattern-shaped names, the pieces those are computed from: rot_q/rot_k or resid_pre)."""
    lazy = [n for n in names if patterns in LAZY_MODES and is_pattern_shaped(n)]
    stored = [n for n in names if n not in lazy]
    layers = list(dict.fromkeys(layer_of(n) for n in lazy))
    if patterns == "recompute":
        return stored, lazy, [f"blocks.{layer}.hook_resid_pre" for layer in layers]
    return stored, lazy, [piece for layer in layers for piece in lazy_piece_names(layer)]


def capture_sizes(model, names: list[str], batch: int, positions: int, key_positions: int,
                  dtype: torch.dtype, patterns: str = "stored") -> dict[str, int]:
    """Estimated bytes per recorded name; a lazy rot_k piece spans every key (past ones included)."""
    size = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 8
    stored, _, pieces = recorded_names(names, patterns)
    sizes = {n: activation_numel(n, model.config, batch, positions, key_positions) * size for n in stored}
    for piece in pieces:
        span = key_positions if piece.endswith("rot_k") else positions  # a resid_pre piece spans the queries
        sizes[piece] = max(sizes.get(piece, 0), activation_numel(piece, model.config, batch, span, key_positions) * size)
    return sizes


def available_memory(device: torch.device) -> int:
    """Free bytes on the device: GPU free memory, or MemAvailable of the host."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def memory_budget_bytes(model, memory_budget: int | None = None, device=None) -> int:
    """The budget a capture may take: `memory_budget`, else a fraction of the device's free memory."""
    if memory_budget is not None:
        return memory_budget
    target = torch.device(device) if device is not None else model.device
    return int(activation_cache.MEMORY_BUDGET_FRACTION * available_memory(target))


def check_memory(model, names: list[str], batch: int, positions: int, key_positions: int,
                 dtype: torch.dtype, memory_budget: int | None = None, device=None, patterns: str = "stored") -> int:
    """Estimated bytes of a capture; raises MemoryError with the estimate and the biggest hooks to drop."""
    sizes = capture_sizes(model, names, batch, positions, key_positions, dtype, patterns)
    total, budget = sum(sizes.values()), memory_budget_bytes(model, memory_budget, device)
    if total > budget:
        by_kind: dict[str, int] = defaultdict(int)
        for name, nbytes in sizes.items():
            by_kind[name.rsplit(".", 1)[-1] if layer_of(name) is not None else name] += nbytes
        biggest = sorted(by_kind.items(), key=lambda item: -item[1])[:3]
        drop = ", ".join(f"{kind} ({nbytes / 2**20:,.0f} MiB)" for kind, nbytes in biggest)
        raise MemoryError(
            f"capturing {len(names)} activations for {batch} x {positions} tokens needs about "
            f"{total / 2**20:,.0f} MiB (patterns={patterns!r}), over the budget of {budget / 2**20:,.0f} MiB; "
            f"the biggest are {drop}. Drop some with a names_filter "
            "(e.g. names_filter=lambda n: n.endswith('hook_pattern') and n.startswith('blocks.0.'))"
            + (", use patterns='lazy'," if patterns == "stored" and any(map(is_pattern_shaped, names)) else "")
            + " or pass a larger memory_budget=")
    return total


def exact_patterns(model, patterns: str) -> str:
    """Lazy patterns keep one mask recipe; a model whose layers use different windows stores them instead."""
    windows = getattr(model.config, "layer_windows", [None])
    if patterns in LAZY_MODES and len(set(windows)) > 1:
        warnings.warn("this model mixes sliding-window and full-attention layers; patterns are stored, "
                      "not lazy, so every layer keeps its own mask", stacklevel=3)
        return "stored"
    return patterns


def choose_patterns(model, names: list[str], batch: int, positions: int, key_positions: int,
                    memory_budget: int | None = None, device=None, patterns: str = "stored") -> str:
    """`patterns`, or "lazy" with a warning when stored patterns would exceed the budget and lazy fits."""
    check_patterns_mode(patterns)
    dtype, budget = model.dtype, memory_budget_bytes(model, memory_budget, device)
    if patterns == "stored" and any(is_pattern_shaped(n) for n in names):
        stored = sum(capture_sizes(model, names, batch, positions, key_positions, dtype, "stored").values())
        lazy = sum(capture_sizes(model, names, batch, positions, key_positions, dtype, "lazy").values())
        if stored > budget >= lazy:
            warnings.warn(f"stored patterns would take about {stored / 2**20:,.0f} MiB, over the budget of "
                          f"{budget / 2**20:,.0f} MiB; keeping them lazy ({lazy / 2**20:,.0f} MiB: rot_q/rot_k, "
                          "computed when read). Pass patterns='lazy' to silence this.", stacklevel=3)
        if stored > budget:
            patterns = "lazy"  # fits, or the error below gives the lazy estimate: even that is too big
    check_memory(model, names, batch, positions, key_positions, dtype, budget, device, patterns)
    return patterns


def progress_reporter(progress, total: int, label: str) -> Callable[[int], None]:
    """progress=True draws a tqdm bar; a callable gets (done, total); None/False reports nothing."""
    if callable(progress):
        return lambda done: progress(done, total)
    if not progress:
        return lambda done: None
    from tqdm.auto import tqdm  # only when a bar is asked for

    bar = tqdm(total=total, desc=label)

    def update(done: int) -> None:
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


def layer_progress_hooks(model, progress) -> list[tuple[str, Callable]]:
    """Hooks reporting (layers done, layers) as a forward over more than one position (a prefill) passes
    each layer; decode steps are not reported. Empty when progress is None/False."""
    if not progress:
        return []
    layers = model.config.num_hidden_layers
    report = progress_reporter(progress, layers, "layers")

    def passed(x: torch.Tensor, hook) -> None:
        if x.shape[1] > 1:
            report(hook.layer() + 1)

    return [(f"blocks.{layer}.hook_resid_post", passed) for layer in range(layers)]


class Recorder:
    """Records the named activations of one forward, or of every step of a decode loop.

    Per-position activations are joined along positions. With `length` (a decode loop), stored
    patterns/scores rows are written into one [b, h, T, T] matrix allocated at the first step, so
    no per-step pieces are held beside it. Lazy pattern names record their layer's rot_q / rot_k.
    """

    def __init__(self, model, names: list[str], patterns: str = "stored", device=None, length: int | None = None):
        self.model, self.device, self.length, self.patterns = model, device, length, check_patterns_mode(patterns)
        self.stored, self.lazy, self.pieces = recorded_names(names, patterns)
        self.parts: dict[str, list[torch.Tensor]] = {n: [] for n in dict.fromkeys([*self.stored, *self.pieces])}
        self.matrices: dict[str, torch.Tensor] = {}  # name -> [b, h, T, T] while decoding
        self.rows_written: dict[str, int] = {}

    def hooks(self) -> list[tuple[str, Callable]]:
        return [(name, self.record) for name in self.parts]

    def record(self, x: torch.Tensor, hook) -> None:
        x = hook.gathered(x.detach())  # heads in global order under tensor parallelism
        x = x if self.device is None else x.to(self.device)
        if self.length is not None and is_pattern_shaped(hook.name):
            self._write_rows(hook.name, x)
        else:
            self.parts[hook.name].append(x)

    def _write_rows(self, name: str, part: torch.Tensor) -> None:
        """Copy one step's rows part [b, h, p_step, k_step] into the full matrix."""
        if name not in self.matrices:
            fill = 0.0 if name.endswith("hook_pattern") else torch.finfo(part.dtype).min  # as masked scores
            self.matrices[name] = part.new_full((*part.shape[:2], self.length, self.length), fill)  # [b, h, T, T]
        full, row = self.matrices[name], self.rows_written.get(name, 0)
        rows = min(part.shape[2], self.length - row)
        full[:, :, row:row + rows, :part.shape[3]] = part[:, :, :rows, :self.length]
        self.rows_written[name] = row + rows

    def past_keys(self, cache, past_length: int) -> dict[int, torch.Tensor]:
        """Rotated keys a KV cache already holds, per lazy layer: [b, past, g, d] (copied before the forward)."""
        if cache is None or past_length == 0 or not self.lazy:
            return {}
        layers = {layer_of(n) for n in self.lazy}
        return {layer: cache.keys[layer][:, :, :past_length].transpose(1, 2).detach().clone() for layer in layers}

    def finish(self, mask: AttentionMask, tokens: torch.Tensor, length: int | None = None,
               past_keys: dict[int, torch.Tensor] | None = None, position_ids=None) -> ActivationCache:
        """The ActivationCache of what was recorded; `length` trims decode captures to T positions."""
        joined = {name: self._join(name, length) for name in list(self.parts)}
        tensors = {name: self._matrix(name, length) if name in self.matrices else joined[name] for name in self.stored}
        tensors = {name: t for name, t in tensors.items() if t is not None}  # e.g. layers after stop_at_layer
        lazy = None
        if self.lazy:
            layers = sorted({layer_of(n) for n in self.lazy})
            if self.patterns == "recompute":
                pieces = self._residual_pieces(layers, joined, mask, position_ids)
            else:
                pieces = {layer: self._stored_pieces(layer, joined, past_keys) for layer in layers}
            recipe = mask.to(self.device) if self.device is not None else mask
            lazy = LazyPatterns(pieces, recipe, self.model.config.head_dim ** -0.5, self.lazy)
        tokens = None if tokens.is_floating_point() else tokens.detach().cpu()  # start_at_layer: a residual
        return ActivationCache(tensors, model=self.model, tokens=tokens, lazy=lazy)

    @staticmethod
    def _stored_pieces(layer: int, joined: dict, past_keys) -> StoredPieces:
        q_name, k_name = lazy_piece_names(layer)
        keys = joined[k_name]
        if past_keys and layer in past_keys:
            keys = torch.cat([past_keys[layer].to(keys.device), keys], dim=1)  # [b, k, g, d]
        return StoredPieces(joined[q_name], keys)

    def _residual_pieces(self, layers: list[int], joined: dict, mask: AttentionMask, position_ids) -> dict:
        """ResidualPieces per layer, with the RoPE tables of the positions the forward used."""
        base = getattr(self.model, "model", self.model)
        first = joined[f"blocks.{layers[0]}.hook_resid_pre"]  # [b, p, m]
        if position_ids is None:
            position_ids = default_position_ids(mask.attention_mask, 0, first.shape[1], first.device)
        cos, sin = base.rotary_emb(position_ids.to(first.device), first.dtype)  # [b|1, p, d]
        return {layer: ResidualPieces(base.layers[layer], joined[f"blocks.{layer}.hook_resid_pre"], cos, sin)
                for layer in layers}

    def _join(self, name: str, length: int | None) -> torch.Tensor | None:
        parts = self.parts.pop(name)
        if not parts:
            return None
        if len(parts) == 1 and length is None:
            return parts[0]
        return torch.cat(parts, dim=1)[:, :length]

    def _matrix(self, name: str, length: int) -> torch.Tensor:
        full = self.matrices.pop(name)
        return full if full.shape[2] == length else full[:, :, :length, :length].clone()


class CachingMixin:
    """Adds run_with_cache to a HookedRootModule."""

    def run_with_cache(self, input_ids, names_filter=None, device=None, memory_budget: int | None = None,
                       patterns: str = "stored", remove_batch_dim: bool = False, progress=None, **forward_kwargs):
        """One forward that records the named activations: (logits or last hidden state, ActivationCache).

        On a causal LM the first item follows forward's return_type ("logits" by default, TransformerLens);
        text is tokenized by to_tokens; remove_batch_dim drops a batch axis of size 1 from every activation.
        patterns="lazy" keeps rot_q / rot_k for the selected hook_pattern / hook_attn_scores and
        computes them when read; "recompute" keeps only those layers' resid_pre and rebuilds q / k
        from it (no hook may edit q / k meanwhile); "stored" (the default) switches to lazy with a
        warning when the matrices would exceed the memory budget. progress=True (a bar) or a callable
        (done, total) follows the forward layer by layer.
        """
        if hasattr(self, "text_input"):
            input_ids, mask = self.text_input(input_ids, forward_kwargs.pop("attention_mask", None),
                                              forward_kwargs.pop("prepend_bos", None),
                                              forward_kwargs.pop("padding_side", None))
            forward_kwargs["attention_mask"] = mask
        names = self.resolve_hook_names(names_filter)
        batch, positions = input_ids.shape[:2]
        if remove_batch_dim and batch != 1:
            raise ValueError(f"remove_batch_dim=True needs a batch of one, got {batch}")
        past = forward_kwargs.get("past_key_values")
        past_length = past.get_seq_length() if past is not None else 0
        if patterns == "recompute" and past is not None:
            raise ValueError("patterns='recompute' rebuilds q/k from this forward's resid_pre, which does not cover "
                             "the keys already in past_key_values; use patterns='lazy' (or 'stored') with a KV cache")
        patterns = exact_patterns(self, patterns)
        patterns = choose_patterns(self, names, batch, positions, positions + past_length, memory_budget, device,
                                   patterns)
        recorder = Recorder(self, names, patterns, device)
        past_keys = recorder.past_keys(past, past_length)
        mask = AttentionMask(positions, past_length, forward_kwargs.get("attention_mask"), self.config.sliding_window,
                             getattr(past, "key_length", None), input_ids.device)
        if self.tl_return_type is not None:
            forward_kwargs.setdefault("return_type", self.tl_return_type)
        with self.hooks(fwd_hooks=recorder.hooks() + layer_progress_hooks(self, progress)):
            out = self(input_ids, **forward_kwargs)
        cache = recorder.finish(mask, input_ids, past_keys=past_keys, position_ids=forward_kwargs.get("position_ids"))
        if self.tl_return_type is None:
            out = out.logits if getattr(out, "logits", None) is not None else out[0]
        return out, cache.remove_batch_dim() if remove_batch_dim else cache
