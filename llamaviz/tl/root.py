"""HookedRootModule for your own modules: put HookPoints in any nn.Module, call setup(), and hook or cache them.

TransformerLens' way: every HookPoint found under the module is named by its path
(`layer2.hook_square`) when `setup()` runs at the end of `__init__`; then run_with_hooks,
run_with_cache, hooks(), add_hook and reset_hooks work on it as on the model.
"""

from __future__ import annotations

from llamaviz.llama.activation_cache import ActivationCache
from llamaviz.llama.hook_points import HookedRootModule as _HookedModel
from llamaviz.llama.hook_points import HookPoint


class HookedRootModule(_HookedModel):
    """Subclass it, build your layers with HookPoints, and call `self.setup()` last in __init__."""

    def setup(self) -> None:
        """Name every HookPoint by its module path and index the modules (mod_dict) and points (hook_dict)."""
        self.mod_dict = {name: module for name, module in self.named_modules() if name}
        self.setup_hooks()

    def _hook_names(self) -> dict[str, HookPoint]:
        return {name: module for name, module in self.named_modules() if isinstance(module, HookPoint)}

    @property
    def hook_dict(self) -> dict[str, HookPoint]:
        self._check_setup()
        return self.hook_points()

    def _check_setup(self) -> None:
        if "_hook_dict" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__} has no named hook points yet: call self.setup() at the end "
                               "of its __init__")

    def hooks(self, fwd_hooks=(), bwd_hooks=()):
        self._check_setup()
        return super().hooks(fwd_hooks, bwd_hooks)

    def run_with_hooks(self, *model_args, fwd_hooks=(), bwd_hooks=(), reset_hooks_end: bool = True, **model_kwargs):
        """forward(*model_args, **model_kwargs) with the hooks attached (removed after unless reset_hooks_end=False)."""
        self._check_setup()
        if not reset_hooks_end:
            for pairs, direction in ((fwd_hooks, "fwd"), (bwd_hooks, "bwd")):
                for selector, fn in pairs:
                    self.add_hook(selector, fn, dir=direction)
            return self(*model_args, **model_kwargs)
        with self.hooks(fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks):
            return self(*model_args, **model_kwargs)

    def run_with_cache(self, *model_args, names_filter=None, device=None, remove_batch_dim: bool = False,
                       **model_kwargs):
        """(forward's output, ActivationCache of the selected hook points in the order they ran)."""
        self._check_setup()
        stored = {}

        def keep(activation, hook):
            value = activation.detach()
            stored[hook.name] = value.to(device) if device is not None else value

        with self.hooks(fwd_hooks=[(name, keep) for name in self.resolve_hook_names(names_filter)]):
            out = self(*model_args, **model_kwargs)
        cache = ActivationCache(stored)
        return out, cache.remove_batch_dim() if remove_batch_dim else cache
