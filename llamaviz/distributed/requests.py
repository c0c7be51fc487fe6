"""A tensor-parallel model driven by rank 0 alone: the other ranks follow its forwards (the web app under torchrun).

Rank 0 calls `lead(model)`; from then on each forward it runs is first sent to the other ranks,
which sit in `follow(model)` and run the same forward with the same hooks, so the collectives
inside meet. A hook travels as itself when it pickles (the intervention factories' hooks do), else
as a stand-in that only joins the gathers (what the capture hooks of run_with_cache do besides
recording). KV caches stay on their rank: rank 0 names each cache, the followers keep their own
under that name. `stop_followers()` ends the followers' loops.

Requests go over their own gloo group with a long timeout: a follower may wait hours for the next
click, while the model's collectives keep the short timeout that catches a failed rank.
"""

from __future__ import annotations

import datetime
import itertools
import pickle

import torch
import torch.distributed as dist

from llamaviz.llama.cache import DynamicCache, StaticCache

IDLE_TIMEOUT = datetime.timedelta(days=7)  # how long a follower waits for rank 0's next request
_STOP = "stop"
_group = None


def _requests_group():
    global _group
    if _group is None:
        _group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    return _group


def _send(request) -> None:
    dist.broadcast_object_list([request], src=0, group=_requests_group())


def _receive():
    box = [None]
    dist.broadcast_object_list(box, src=0, group=_requests_group())
    return box[0]


def gather_only(x: torch.Tensor, hook) -> None:
    """A follower's stand-in for a hook that only reads: it joins the hook's gather and changes nothing."""
    hook.gathered(x)


def _portable(fn):
    try:
        pickle.dumps(fn)
        return fn
    except Exception:  # a closure (e.g. run_with_cache's recorder): it reads, so the follower only gathers
        return gather_only


def lead(model) -> None:
    """On rank 0: send every forward of `model` to the followers before running it."""
    counter = itertools.count()
    forward = model.forward

    def leading_forward(*args, **kwargs):
        number = next(counter)
        past = kwargs.get("past_key_values")
        if past is not None and not hasattr(past, "tp_name"):
            past.tp_name = f"given-{number}"  # a cache made outside forward: the followers make theirs
        hooks = [(name, _portable(fn)) for name, point in model.hook_points().items() for fn in point.fwd_fns]
        _send(("forward", number, args, {k: _describe(v) for k, v in kwargs.items()}, hooks))
        out = forward(*args, **kwargs)
        if getattr(out, "past_key_values", None) is not None and not hasattr(out.past_key_values, "tp_name"):
            out.past_key_values.tp_name = f"made-{number}"
        return out

    model.forward = leading_forward


def _describe(value):
    """A cache as its name and the shape a follower needs to make its own; anything else as is."""
    if isinstance(value, DynamicCache):
        return ("cache", value.tp_name, "dynamic", None)
    if isinstance(value, StaticCache):
        b, g, t, d = value.keys[0].shape
        return ("cache", value.tp_name, "static", (len(value.keys), b, g, d, t, value.keys[0].dtype))
    return value


def follow(model) -> None:
    """On the other ranks: run rank 0's forwards until it calls stop_followers()."""
    caches: dict[str, object] = {}
    while True:
        request = _receive()
        if request == _STOP:
            return
        _, number, args, kwargs, hooks = request
        kwargs = {k: _own(v, caches, model) for k, v in kwargs.items()}
        with model.hooks(fwd_hooks=hooks), torch.no_grad():
            out = model(*args, **kwargs)
        if getattr(out, "past_key_values", None) is not None and not hasattr(out.past_key_values, "tp_name"):
            out.past_key_values.tp_name = f"made-{number}"
            caches[out.past_key_values.tp_name] = out.past_key_values
        _forget_finished(caches)


def _own(value, caches: dict, model):
    if not (isinstance(value, tuple) and len(value) == 4 and value[0] == "cache"):
        return value
    _, name, kind, shape = value
    if name not in caches:
        if kind == "dynamic":
            caches[name] = DynamicCache()
        else:
            layers, b, g, d, t, dtype = shape
            caches[name] = StaticCache(layers, b, g, d, t, dtype, model.device)
        caches[name].tp_name = name
    return caches[name]


def _forget_finished(caches: dict, keep: int = 8) -> None:
    """Drop all but the most recent caches: rank 0 decodes one sequence at a time per model."""
    for name in list(caches)[:-keep]:
        del caches[name]


def stop_followers() -> None:
    """On rank 0: end the followers' loops (they return from follow())."""
    _send(_STOP)


def rank0_items(items):
    """Yield rank 0's `items` on every rank (e.g. prompts read from rank 0's stdin), in order."""
    if dist.get_rank() == 0:
        for item in items:
            _send(("item", item))
            yield item
        _send(_STOP)
        return
    while (message := _receive()) != _STOP:
        yield message[1]
