"""Hook points: identity modules with stable names, and the machinery to run a model with hooks.

A hook is `fn(tensor, hook) -> tensor | None`; a returned tensor replaces the activation downstream.
Temporary hooks live only inside `HookedRootModule.hooks(...)`, which removes them on exit, error or
not, so nothing leaks between calls.
"""

from __future__ import annotations

import contextlib
import difflib
import re
from typing import Callable, Iterable, Iterator, Union

import torch
from torch import nn

HookFn = Callable[[torch.Tensor, "HookPoint"], Union[torch.Tensor, None]]
NameOrPredicate = Union[str, Callable[[str], bool]]

# Hook points shaped [b, h, p, k]: quadratic in T, queries on dim 2. Everything else is [b, p, ...].
PATTERN_SHAPED = ("hook_attn_scores", "hook_pattern")


def is_pattern_shaped(name: str) -> bool:
    """True for blocks.L.attn.hook_pattern / hook_attn_scores ([b, h, p, k])."""
    return name.rsplit(".", 1)[-1] in PATTERN_SHAPED


def query_dim(name: str) -> int:
    """The dimension that indexes positions (queries): 2 for pattern-shaped hooks, else 1."""
    return 2 if is_pattern_shaped(name) else 1


def activation_numel(name: str, config, batch: int, positions: int, key_positions: int) -> int:
    """Elements one hook point holds for a forward over `positions` queries and `key_positions` keys."""
    h, g, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    suffix = name.rsplit(".", 1)[-1]
    per_position = {  # elements per query position, by hook suffix; anything else is [b, p, m]
        "hook_attn_scores": h * key_positions, "hook_pattern": h * key_positions,
        "hook_q": h * d, "hook_rot_q": h * d, "hook_z": h * d,
        "hook_k": g * d, "hook_rot_k": g * d, "hook_v": g * d,
        "hook_pre": config.intermediate_size, "hook_pre_linear": config.intermediate_size,
        "hook_post": config.intermediate_size if ".mlp." in name else config.hidden_size,
        "hook_logits": config.vocab_size, "hook_result": h * config.hidden_size, "hook_scale": 1,
        "hook_q_normalized": h * d, "hook_k_normalized": g * d,
    }.get(suffix, config.hidden_size)
    return batch * positions * per_position


class HookPoint(nn.Module):
    """Identity on its input unless hooks are attached; costs one list check when idle."""

    def __init__(self):
        super().__init__()
        self.name: str = ""
        self.fwd_fns: list[HookFn] = []
        self.bwd_fns: list[HookFn] = []
        self.shard = None  # under tensor parallelism: the slice of heads/features this rank sees (parallel.HookShard)

    def gathered(self, x: torch.Tensor) -> torch.Tensor:
        """The full activation: x, or under tensor parallelism every rank's slice joined in global order."""
        return x if self.shard is None else self.shard.gathered(x)

    @property
    def active(self) -> bool:
        return bool(self.fwd_fns or self.bwd_fns)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # bypasses nn.Module dispatch: this runs ~600x a forward
        if not (self.fwd_fns or self.bwd_fns):
            return x
        return self.forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fn in self.fwd_fns:
            out = fn(x, self)
            if out is not None:
                if not isinstance(out, torch.Tensor) or out.shape != x.shape:
                    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                    raise ValueError(f"hook on {self.name} returned {got}; it must return None or a tensor "
                                     f"of the activation's shape {tuple(x.shape)}")
                x = out
        if self.bwd_fns and x.requires_grad:
            fns = list(self.bwd_fns)  # the hooks of this forward run at backward time, even after removal
            x.register_hook(lambda grad: self._run_backward_hooks(grad, fns))
        return x

    def _run_backward_hooks(self, grad: torch.Tensor, fns: list[HookFn]) -> torch.Tensor:
        for fn in fns:
            out = fn(grad, self)
            if out is not None:
                grad = out
        return grad

    def add_hook(self, fn: HookFn, dir: str = "fwd", prepend: bool = False) -> None:
        """Attach `fn` until `remove_hooks()` / `model.reset_hooks()` (TransformerLens' permanent hook)."""
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"hook direction {dir!r} is not supported; accepted: 'fwd', 'bwd'")
        fns = self.fwd_fns if dir == "fwd" else self.bwd_fns
        fns.insert(0, fn) if prepend else fns.append(fn)

    def remove_hooks(self, dir: str = "both") -> None:
        """Detach this point's hooks: "fwd", "bwd" or "both"."""
        if dir not in ("fwd", "bwd", "both"):
            raise ValueError(f"hook direction {dir!r} is not supported; accepted: 'fwd', 'bwd', 'both'")
        if dir in ("fwd", "both"):
            self.fwd_fns.clear()
        if dir in ("bwd", "both"):
            self.bwd_fns.clear()

    def layer(self) -> int:
        """The block index in this point's name ('blocks.3.attn.hook_z' -> 3); ValueError for model-level points."""
        index = layer_of(self.name)
        if index is None:
            raise ValueError(f"hook point {self.name!r} belongs to no layer")
        return index

    def extra_repr(self) -> str:
        return self.name


class HookedRootModule(nn.Module):
    """Mixin for a model whose HookPoints are named by `_hook_names()`; adds hooks, run_with_hooks, run_with_cache."""

    def _hook_names(self) -> dict[str, HookPoint]:
        raise NotImplementedError

    def setup_hooks(self) -> None:
        """Give every HookPoint its public name (call once at the end of __init__)."""
        self._hook_dict = self._hook_names()
        for name, point in self._hook_dict.items():
            point.name = name

    def hook_points(self) -> dict[str, HookPoint]:
        """Every hook point by name, in forward order."""
        return dict(self._hook_dict)

    def resolve_hook_names(self, names: NameOrPredicate | Iterable[str] | None) -> list[str]:
        """Names selected by a name, a list of names, a predicate, or None (all); unknown names raise."""
        if names is None:  # every point but per-head results, which (as in TransformerLens) must be asked for
            return [n for n in self._hook_dict if not n.endswith("attn.hook_result")]
        if callable(names):
            selected = [n for n in self._hook_dict if names(n)]
            if not selected:
                raise ValueError("the names_filter predicate matched no hook point; "
                                 f"names look like {', '.join(list(self._hook_dict)[:4])}, ...")
            return selected
        names = [names] if isinstance(names, str) else list(names)
        if not names:
            raise ValueError("names_filter is an empty list: it would select no hook point")
        for name in names:
            self._check_name(name)
        return names

    def _check_name(self, name: str) -> None:
        if name in self._hook_dict:
            return
        close = difflib.get_close_matches(name, list(self._hook_dict), n=5, cutoff=0.6)
        hint = f"; closest: {', '.join(close)}" if close else "; see model.hook_points() for the list"
        raise KeyError(f"unknown hook point {name!r}{hint}")

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Iterable[tuple[NameOrPredicate, HookFn]] = (),
              bwd_hooks: Iterable[tuple[NameOrPredicate, HookFn]] = ()) -> Iterator["HookedRootModule"]:
        """Attach hooks for the duration of the block; they are removed on exit, also on an exception."""
        attached: list[tuple[list, HookFn]] = []
        try:
            for pairs, attr in ((fwd_hooks, "fwd_fns"), (bwd_hooks, "bwd_fns")):
                for selector, fn in pairs:
                    for name in self.resolve_hook_names(selector):
                        fns = getattr(self._hook_dict[name], attr)
                        fns.append(fn)
                        attached.append((fns, fn))
            yield self
        finally:
            for fns, fn in reversed(attached):
                fns.remove(fn)

    def reset_hooks(self, including_permanent: bool = True) -> None:
        """Remove every hook from every hook point (temporary hooks are removed on their block's exit anyway)."""
        for point in self._hook_dict.values():
            point.remove_hooks()

    def add_hook(self, name: NameOrPredicate, fn: HookFn, dir: str = "fwd") -> None:
        """Attach `fn` to every point `name` selects, until reset_hooks()."""
        for selected in self.resolve_hook_names(name):
            self._hook_dict[selected].add_hook(fn, dir=dir)

    tl_return_type: str | None = None  # set by models with TransformerLens' forward: what run_with_* return

    def run_with_hooks(self, input, fwd_hooks=(), bwd_hooks=(), reset_hooks_end: bool = True, **forward_kwargs):
        """One forward with hooks; the logits on a causal LM (TransformerLens), else what forward returns.

        reset_hooks_end=False keeps the hooks attached afterwards (until reset_hooks()), as TransformerLens does.
        """
        if self.tl_return_type is not None:
            forward_kwargs.setdefault("return_type", self.tl_return_type)
        if not reset_hooks_end:
            for pairs, direction in ((fwd_hooks, "fwd"), (bwd_hooks, "bwd")):
                for selector, fn in pairs:
                    self.add_hook(selector, fn, dir=direction)
            return self(input, **forward_kwargs)
        with self.hooks(fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks):
            return self(input, **forward_kwargs)


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """No parameter gradients inside the block (attribution needs only the activations'); flags restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def held_heads(hook, heads) -> tuple[list[int], list[int]]:
    """(global heads among `heads` this hook's activation holds, where they sit in it): all, without tensor parallelism."""
    shard, heads = getattr(hook, "shard", None), list(heads)
    return (heads, heads) if shard is None else shard.held(heads)


def layer_of(name: str) -> int | None:
    """The block index in a hook name ('blocks.3.attn.hook_z' -> 3), or None for model-level hooks."""
    match = re.match(r"blocks\.(\d+)\.", name)
    return int(match.group(1)) if match else None
