"""Layers across devices (device_map): whole decoder layers on several devices, the residual stream moved between.

device_map is "auto" (fill the devices in order, each up to 90% of its free memory: fewest hand-offs),
"balanced" (layers spread in proportion to free memory) or {module prefix: device} as in transformers
("model.layers.0": "cuda:0", "lm_head": "cuda:1", ...). Each placed module moves the tensors it is
given to its own device before it runs, so hooks see activations where their layer lives and
run_with_cache(device=...) gathers them to one device.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch
from torch import nn

from llamaviz.llama.capture import available_memory

DEVICE_MAPS = ("auto", "balanced")
FREE_FRACTION = 0.9  # of a device's free memory that "auto" fills with weights


@dataclass
class Placement:
    """Module prefix -> device; a module goes where its longest matching prefix says."""

    devices: dict[str, torch.device]
    main: torch.device  # buffers outside every prefix (RoPE tables) live here, with the embeddings

    def device_of(self, module_name: str) -> torch.device:
        match = max((p for p in self.devices if _covers(p, module_name)), key=len, default=None)
        return self.devices[match] if match is not None else self.main


def _covers(prefix: str, name: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def plan_placement(model: nn.Module, device_map, dtype: torch.dtype) -> Placement:
    """The Placement for `device_map` on a model built on the meta device; ValueError for a bad map."""
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAPS:
            raise ValueError(f"device_map {device_map!r} is not supported; accepted: 'auto', 'balanced', or a dict "
                             "{module prefix: device} such as {'model.layers.0': 'cuda:0', ...}")
        device_map = _automatic_map(model, device_map, dtype)
    if not isinstance(device_map, dict) or not device_map:
        raise ValueError(f"device_map must be 'auto', 'balanced' or a non-empty dict {{module prefix: device}}; "
                         f"got {device_map!r}")
    modules = dict(model.named_modules())
    devices = {}
    for prefix, device in device_map.items():
        if prefix not in modules:
            close = difflib.get_close_matches(prefix, [n for n in modules if n], n=3)
            hint = f"; closest: {', '.join(close)}" if close else "; prefixes name modules, e.g. model.layers.0"
            raise ValueError(f"device_map names module {prefix!r}, which {type(model).__name__} does not have{hint}")
        devices[prefix] = check_device(device)
    placement = Placement(devices, devices.get("model.embed_tokens", next(iter(devices.values()))))
    uncovered = [n for n, _ in model.named_parameters() if not any(_covers(p, n) for p in devices)]
    if uncovered:
        raise ValueError(f"device_map places no device for {len(uncovered)} parameter(s), e.g. {uncovered[0]}; "
                         "add their module prefix (or '' for everything else)")
    return placement


def check_device(device) -> torch.device:
    """A torch.device that exists on this machine, or ValueError naming what does."""
    try:
        resolved = torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device_map device {device!r} is not a device; use 'cpu', 'cuda:N' or an int N") from None
    count = torch.cuda.device_count()
    if resolved.type == "cuda" and (count == 0 or (resolved.index or 0) >= count):
        raise ValueError(f"device_map names {str(resolved)!r}, but this machine has {count} CUDA device(s)"
                         + (f": cuda:0..cuda:{count - 1}" if count else "; use 'cpu'"))
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device_map device {str(resolved)!r} is not supported; accepted: 'cpu', 'cuda:N'")
    return resolved


def _automatic_map(model: nn.Module, strategy: str, dtype: torch.dtype) -> dict[str, torch.device]:
    """Whole layers onto the CUDA devices by free memory (all on the CPU without CUDA)."""
    devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())] or [torch.device("cpu")]
    base = getattr(model, "base_model_prefix", "model")
    base = base if hasattr(model, base) else ""
    stem = f"{base}." if base else ""
    layers = [f"{stem}layers.{i}" for i in range(model.config.num_hidden_layers)]
    size = dtype.itemsize
    layer_bytes = sum(p.numel() for p in model.get_submodule(layers[0]).parameters()) * size
    free = [available_memory(d) for d in devices]
    if strategy == "balanced":
        shares = [f / sum(free) for f in free]
        bounds = [round(sum(shares[:i + 1]) * len(layers)) for i in range(len(devices))]
    else:
        bounds, filled = [], 0
        for f in free:
            filled += int(FREE_FRACTION * f // max(layer_bytes, 1))
            bounds.append(min(filled, len(layers)))
        bounds[-1] = len(layers)  # what does not fit anywhere goes to the last device, which fails loudly if full
    mapping, start = {"": devices[0]}, 0
    for device, stop in zip(devices, bounds):
        mapping.update({name: device for name in layers[start:stop]})
        start = max(start, stop)
    mapping[f"{stem}norm"] = mapping[layers[-1]]
    if hasattr(model, "lm_head") and not model.config.tie_word_embeddings:  # a tied head stays with the embeddings
        mapping["lm_head"] = mapping[layers[-1]]
    return mapping


def move_between_devices(model: nn.Module, placement: Placement) -> None:
    """Each placed module moves its tensor inputs to its own device before it runs."""
    for prefix, device in placement.devices.items():
        module = model.get_submodule(prefix)
        weight = next(module.parameters(), None)  # a tied lm_head lives where the embeddings are
        module.register_forward_pre_hook(_mover(weight.device if weight is not None else device), with_kwargs=True)


def _mover(device: torch.device):
    def move(module, args, kwargs):
        return tuple(_to(a, device) for a in args), {k: _to(v, device) for k, v in kwargs.items()}
    return move


def _to(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if callable(value) and not isinstance(value, nn.Module):  # the lazily built eager mask
        return lambda: _to(value(), device)
    return value
