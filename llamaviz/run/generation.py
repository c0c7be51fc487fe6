"""generate(): greedy and sampled decoding with a KV cache, streaming, and capture while generating.

The logits pipeline follows transformers' order: repetition penalty, then temperature, top-k,
top-p, so a seeded run picks what transformers picks.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable

import torch

from llamaviz.llama.cache import DynamicCache, StaticCache
from llamaviz.llama.capture import Recorder, choose_patterns, exact_patterns, layer_progress_hooks
from llamaviz.llama.masks import AttentionMask
from llamaviz.run.streamers import TextIteratorStreamer, TextStreamer

__all__ = ["generate", "generate_with_cache", "TextStreamer", "TextIteratorStreamer"]

CACHE_IMPLEMENTATIONS = ("dynamic", "static")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make tokens already in `seen` [b, t] less likely: positive logits / penalty, negative * penalty."""
    scores = logits.gather(-1, seen)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(-1, seen, scores)


def filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probabilities add up to top_p (at least one)."""
    sorted_logits, order = logits.sort(dim=-1)  # ascending
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= 1 - top_p
    drop_sorted[..., -1] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_tokens(logits, seen, do_sample, temperature, top_k, top_p, repetition_penalty, generator):
    """logits [b, v] of the last position -> chosen ids [b]."""
    logits = logits.float()
    if repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if not do_sample:
        return logits.argmax(dim=-1)
    if temperature != 1.0:
        logits = logits / temperature
    if top_k:
        logits = filter_top_k(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = filter_top_p(logits, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _check_settings(model, input_ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                    cache_implementation):
    if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        shape = None if input_ids is None else tuple(input_ids.shape)
        raise ValueError(f"generate needs a non-empty prompt: input_ids of shape [batch, positions >= 1], "
                         f"got {shape}")
    context = model.config.max_position_embeddings
    if input_ids.shape[1] >= context:
        raise ValueError(f"prompt of {input_ids.shape[1]} tokens leaves no room in the model's context of "
                         f"{context} tokens")
    checks = [
        (isinstance(max_new_tokens, int) and max_new_tokens >= 1,
         f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}"),
        (temperature > 0, f"temperature must be > 0, got {temperature}"),
        (top_k is None or (isinstance(top_k, int) and top_k >= 0),
         f"top_k must be None or an integer >= 0, got {top_k!r}"),
        (top_p is None or 0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}"),
        (repetition_penalty > 0, f"repetition_penalty must be > 0, got {repetition_penalty}"),
        (cache_implementation in CACHE_IMPLEMENTATIONS,
         f"cache_implementation {cache_implementation!r} is not supported; "
         f"accepted: {', '.join(CACHE_IMPLEMENTATIONS)}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    if input_ids.shape[1] + max_new_tokens > context:
        warnings.warn(f"prompt + max_new_tokens exceeds the context of {context}; generation stops there")
    return min(max_new_tokens, context - input_ids.shape[1])


def _eos_ids(model, eos_token_id) -> list[int]:
    if eos_token_id is None:
        return model.config.eos_token_ids
    return list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]


@torch.no_grad()
def generate(model, input_ids=None, attention_mask=None, max_new_tokens: int = 20, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             repetition_penalty: float = 1.0, eos_token_id=None, pad_token_id=None, streamer=None,
             seed: int | None = None, cache_implementation: str | None = None, compile: bool = False,
             stop: Callable[[], bool] | None = None, on_step: Callable | None = None) -> torch.Tensor:
    """Prompt + continuation ids [b, p + n]; finished rows are filled with pad_token_id.

    `stop()` returning True ends generation early (the app's Stop button); `on_step(ids [b, 1])`
    sees every chosen token. cache_implementation: "dynamic" (the default) or "static";
    compile=True runs the one-token steps through torch.compile on a static cache.
    """
    cache_implementation = _cache_choice(cache_implementation, compile)
    max_new_tokens = _check_settings(model, input_ids, max_new_tokens, temperature, top_k, top_p,
                                     repetition_penalty, cache_implementation)
    if streamer is not None and input_ids.shape[0] != 1:
        raise ValueError(f"a streamer follows one sequence; got a batch of {input_ids.shape[0]}")
    device = model.device
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device) if attention_mask is not None else None
    eos = torch.tensor(_eos_ids(model, eos_token_id), device=device)
    pad = pad_token_id if pad_token_id is not None else (model.config.pad_token_id or (eos[0].item() if len(eos) else 0))
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    cache = _new_cache(model, input_ids, max_new_tokens, cache_implementation)
    sequences, unfinished = input_ids, torch.ones(input_ids.shape[0], dtype=torch.bool, device=device)
    step_input = input_ids
    hooked_logits = getattr(model, "hook_logits", None)
    keep = 0 if hooked_logits is not None and hooked_logits.active else 1  # a logits hook sees every position
    decode_step = compiled_decode_step() if compile else forward_last
    if streamer is not None:
        streamer.put(input_ids.cpu())
    for _ in range(max_new_tokens):
        run = decode_step if step_input.shape[1] == 1 else forward_last  # the prompt runs eagerly
        logits = run(model, step_input, attention_mask, cache, keep)  # [b, v]
        chosen = next_tokens(logits, sequences, do_sample, temperature, top_k, top_p, repetition_penalty, generator)
        chosen = torch.where(unfinished, chosen, torch.full_like(chosen, pad))
        sequences = torch.cat([sequences, chosen[:, None]], dim=1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
        if streamer is not None:
            streamer.put(chosen.cpu())
        if on_step is not None:
            on_step(chosen[:, None])
        unfinished = unfinished & ~torch.isin(chosen, eos)
        if not bool(unfinished.any()) or (stop is not None and stop()):
            break
        step_input = chosen[:, None]
    if streamer is not None:
        streamer.end()
    return sequences


def forward_last(model, ids, attention_mask, cache, keep: int = 1) -> torch.Tensor:
    """Logits [b, v] at the last position of ids [b, p]; the cache is updated in place."""
    return model(ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True,
                 logits_to_keep=keep).logits[:, -1]


@functools.cache
def compiled_decode_step():
    """forward_last under torch.compile, for one-token steps on a StaticCache.

    Each step has the same tensor shapes (the cache's full buffers, masks over its capacity); the
    write position and the mask's width are ints that dynamo traces symbolically (dynamic=True), so
    one graph serves every step and every prompt length instead of one compile per step.
    """
    return torch.compile(forward_last, dynamic=True)


def _cache_choice(cache_implementation: str | None, compile: bool) -> str:
    """None -> "static" when compiling, else "dynamic"; compile=True with a dynamic cache is refused."""
    if cache_implementation is None:
        return "static" if compile else "dynamic"
    if compile and cache_implementation != "static":
        raise ValueError(f"compile=True needs cache_implementation='static' (fixed shapes), got "
                         f"{cache_implementation!r}")
    return cache_implementation


def _new_cache(model, input_ids, max_new_tokens, cache_implementation):
    if cache_implementation == "dynamic":
        return DynamicCache(initial_capacity=input_ids.shape[1] + max_new_tokens)
    cfg = model.config
    kv_heads = cfg.num_key_value_heads // getattr(model, "tp_size", 1)  # a rank's share under tensor parallelism
    return StaticCache(cfg.num_hidden_layers, input_ids.shape[0], kv_heads, cfg.head_dim,
                       input_ids.shape[1] + max_new_tokens, model.dtype, model.device)


def generate_with_cache(model, input_ids=None, max_new_tokens: int = 20, names_filter=None,
                        memory_budget: int | None = None, patterns: str = "lazy", progress=None, **sampling):
    """(sequences [b, T], ActivationCache equal to run_with_cache(sequences[:, :-1])) in one decode pass.

    Each step records its activations through the Recorder run_with_cache uses: per-position ones
    are joined along positions; with patterns="stored", pattern/scores rows are written into one
    [b, h, T-1, T-1] matrix; with "lazy" (the default) the cache keeps rot_q / rot_k instead, and
    with "recompute" only each layer's resid_pre (q / k are rebuilt from it when a pattern is read).
    progress=True (a bar) or a callable (done, total) follows the prompt's prefill layer by layer.
    """
    names = model.resolve_hook_names(names_filter)
    if input_ids is None or input_ids.dim() != 2:
        raise ValueError("generate_with_cache needs input_ids of shape [batch, positions]")
    batch, total = input_ids.shape[0], input_ids.shape[1] + max_new_tokens - 1
    patterns = choose_patterns(model, names, batch, total, total, memory_budget, None,
                               exact_patterns(model, patterns))
    recorder = Recorder(model, names, patterns, length=total)  # gathers heads under TP
    with model.hooks(fwd_hooks=recorder.hooks() + layer_progress_hooks(model, progress)):
        sequences = generate(model, input_ids, max_new_tokens=max_new_tokens, cache_implementation="dynamic",
                             **sampling)
    length = sequences.shape[1] - 1
    mask = AttentionMask(length, 0, _mask_of_sequence(sampling.get("attention_mask"), length),
                         model.config.sliding_window, device=model.device)
    return sequences, recorder.finish(mask, sequences[:, :-1], length=length)


def _mask_of_sequence(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """The prompt's [b, p] padding mask extended over the generated tokens (always attended): [b, length]."""
    if attention_mask is None:
        return None
    grown = attention_mask.new_ones(attention_mask.shape[0], max(length, attention_mask.shape[1]))
    grown[:, :attention_mask.shape[1]] = attention_mask
    return grown[:, :length]
