"""Opening any checkpoint, and filling a model built on the meta device from its tensor stream.

dtype=None follows transformers 5, whose from_pretrained default is dtype="auto": the checkpoint's
own dtype (config.json's torch_dtype/dtype, else its first floating tensor's dtype). Llama GGUF
files load in float32, as transformers' GGUF loader dequantizes them to float32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import threading
import warnings
from pathlib import Path

import torch
from torch import nn

from llamaviz.checkpoints.base import Checkpoint
from llamaviz.checkpoints.gguf import GGUFCheckpoint
from llamaviz.checkpoints.hf import open_hf_folder
from llamaviz.checkpoints.meta import MetaCheckpoint
from llamaviz.checkpoints.options import ProgressBar, resolve_device, resolve_dtype
from llamaviz.checkpoints.paths import ACCEPTED, checkpoint_kind
from llamaviz.llama.config import LlamaConfig

PROGRESS_MIN_BYTES = 500_000_000  # a bar is drawn above this many bytes unless asked otherwise
_IGNORED_UNEXPECTED = re.compile(r"(^|\.)inv_freq$")  # RoPE tables older checkpoints saved; recomputed
_NEW_HEADS = ("score.", "qa_outputs.")  # task heads a base checkpoint lacks: initialised fresh
_BASE_PREFIXES = ("model.", "transformer.")  # where transformers' Llama classes keep their LlamaModel
_INIT_PATCH_LOCK = threading.Lock()


def open_checkpoint(path: str | Path) -> Checkpoint:
    """A Checkpoint for an HF folder, a .gguf file, a folder holding one .gguf, or a Meta folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}; expected {ACCEPTED}")
    kind = checkpoint_kind(path)
    if kind is None and path.is_file():
        raise ValueError(f"{path} is not a checkpoint file; expected {ACCEPTED}")
    if kind is None:
        raise FileNotFoundError(f"no weights in {path}; expected {ACCEPTED}")
    if kind == "meta":
        return MetaCheckpoint(path)
    if kind == "hf":
        return open_hf_folder(path if path.is_dir() else path.parent)  # names the weight files it looked for
    if path.is_file():
        return GGUFCheckpoint(path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) > 1:
        raise ValueError(f"{path} holds {len(ggufs)} .gguf files ({', '.join(f.name for f in ggufs)}); "
                         "pass the path of the one to load")
    return GGUFCheckpoint(ggufs[0])


def load_pretrained(model_class, path, dtype=None, device=None, attn_implementation: str = "sdpa",
                    progress=None, tp_plan=None, device_map=None, **model_kwargs):
    """Build `model_class` on the meta device and fill it from the checkpoint at `path`, one tensor at a time.

    LlamaForCausalLM stands for the whole family: it becomes the variant the checkpoint's config names
    (MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM). Keyword arguments naming config fields (e.g. num_labels=3) override the config; the rest go
    to the model's constructor. progress: True/False forces the stderr bar; None shows it above 500 MB;
    a callable `fn(fraction, text)` is told instead (the web app's progress bar).
    tp_plan="auto" shards the model over the torch.distributed ranks (llamaviz.distributed.parallel), each
    rank reading only its slices; device_map places whole layers on devices (llamaviz.distributed.placement).
    """
    checkpoint = path if isinstance(path, Checkpoint) else open_checkpoint(path)
    model_class = family_class(model_class, checkpoint)
    dtype = resolve_dtype(dtype, checkpoint)
    config, model_kwargs = _configure(checkpoint.config, dtype, model_kwargs)
    mesh = _tensor_parallel_mesh(tp_plan, config, device, device_map)
    placement_device = device
    device = _rank_device(mesh) if mesh is not None else resolve_device(device)
    with torch.device("meta"), _no_init_on_meta():
        model = model_class(config, attn_implementation=attn_implementation, **model_kwargs)
    if mesh is not None:
        _shard(model, mesh)
    placement = _placement(model, device_map, dtype, placement_device) if device_map is not None else None
    materialize(model, device, dtype, placement)
    targets = model.state_dict(keep_vars=True)
    plan, new_heads = _plan(checkpoint, model, targets, config)
    _fill(checkpoint, targets, plan, progress)
    _init_new_heads(targets, new_heads, config.initializer_range)
    model.post_load()
    if placement is not None:
        from llamaviz.distributed.placement import move_between_devices

        move_between_devices(model, placement)
    model.eval()
    model.name_or_path = config.name_or_path
    return model


def family_class(model_class, checkpoint: Checkpoint):
    """The class to build for this checkpoint: LlamaForCausalLM -> the config's variant; others must match it."""
    from llamaviz.llama.modeling import LlamaForCausalLM
    from llamaviz.llama.variants import causal_lm_class_for

    config = checkpoint.config
    if model_class is LlamaForCausalLM:
        return causal_lm_class_for(config)
    wanted = getattr(model_class, "config_class", LlamaConfig)
    # a Mistral checkpoint is a Llama with a sliding window: every Llama class runs it unchanged
    runs_it = type(config) is wanted or (wanted is LlamaConfig and config.model_type == "mistral")
    if not runs_it:
        raise ValueError(f"{checkpoint.path} is a {config.model_type!r} checkpoint ({type(config).__name__}); "
                         f"{model_class.__name__} runs model_type {wanted.model_type!r}. Load it with "
                         f"{causal_lm_class_for(config).__name__} or AutoModelForCausalLM")
    return model_class


def materialize(model: nn.Module, device: torch.device, dtype: torch.dtype, placement=None) -> None:
    """Give every meta parameter (in `dtype`) and buffer uninitialised storage on `device`; shared ones stay shared.

    What model.to(dtype).to_empty(device) does, without the Python reference ops those route meta
    tensors through (their first use imports sympy: ~1 s). A tensor-parallel parameter (DTensor) gets
    storage for this rank's shard only; `placement` (a Placement) picks each module's device instead.
    """
    fresh: dict[int, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        where = placement.device_of(module_name) if placement is not None else device
        for slots, is_param in ((module._parameters, True), (module._buffers, False)):
            for name, tensor in slots.items():
                if tensor is None or not tensor.is_meta:
                    continue
                if id(tensor) not in fresh:
                    kind = dtype if is_param and tensor.is_floating_point() else tensor.dtype
                    empty = _empty(tensor, kind, where)
                    fresh[id(tensor)] = nn.Parameter(empty, tensor.requires_grad) if is_param else empty
                slots[name] = fresh[id(tensor)]


def _empty(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if type(tensor).__name__ == "DTensor":  # only tensor-parallel models hold these; no import otherwise
        from llamaviz.distributed.parallel import empty_like_dtensor

        return empty_like_dtensor(tensor, dtype, device)
    return torch.empty(tensor.shape, dtype=dtype, device=device)


def _tensor_parallel_mesh(tp_plan, config: LlamaConfig, device, device_map):
    """The device mesh for tp_plan (None without one), after checking the plan fits the model and the call."""
    if tp_plan is None:
        return None
    from llamaviz.distributed import parallel

    if device is not None or device_map is not None:
        raise ValueError("tp_plan places each rank on its own device (cuda:LOCAL_RANK under nccl, else the CPU); "
                         "drop device= and device_map=")
    if tp_plan not in parallel.TP_PLANS:
        raise ValueError(f"tp_plan {tp_plan!r} is not supported; accepted: 'auto' or None")
    mesh = parallel.init_tensor_parallel()
    parallel.check_tp(config, mesh.size(), tp_plan)
    return mesh


def _rank_device(mesh) -> torch.device:
    from llamaviz.distributed.parallel import rank_device

    return rank_device(mesh)


def _shard(model: nn.Module, mesh) -> None:
    from llamaviz.distributed.parallel import shard_model

    shard_model(model, mesh)


def _placement(model: nn.Module, device_map, dtype: torch.dtype, device):
    from llamaviz.distributed.placement import plan_placement

    if device is not None:
        raise ValueError(f"pass device= or device_map=, not both (got device={device!r}); device_map places "
                         "every module itself")

    return plan_placement(model, device_map, dtype)


@contextlib.contextmanager
def _no_init_on_meta():
    """Skip torch.nn.init's random fills on meta tensors: they hold no data, and the first one costs ~1 s of imports.

    Only meta tensors are skipped, so a model built at the same time in another thread still gets its init.
    """
    names = [name for name in dir(nn.init) if name.endswith("_") and not name.startswith("_")]

    def skipping(original):
        def init(tensor, *args, **kwargs):
            return tensor if tensor.is_meta else original(tensor, *args, **kwargs)
        return init

    with _INIT_PATCH_LOCK:  # one patcher at a time, so the originals restored are the real ones
        originals = {name: getattr(nn.init, name) for name in names}
        for name, original in originals.items():
            setattr(nn.init, name, skipping(original))
        try:
            yield
        finally:
            for name, original in originals.items():
                setattr(nn.init, name, original)


def _configure(config: LlamaConfig, dtype: torch.dtype, kwargs: dict) -> tuple[LlamaConfig, dict]:
    """A copy of the config with the dtype and any field overrides; the kwargs left for the model."""
    fields = {f.name for f in dataclasses.fields(config)}
    overrides = {k: v for k, v in kwargs.items() if k in fields}
    config = dataclasses.replace(config, torch_dtype=str(dtype).removeprefix("torch."), **overrides)
    return config, {k: v for k, v in kwargs.items() if k not in fields}



def _model_key(name: str, model_keys, prefix: str) -> str | None:
    """The model's key for a checkpoint key: as is, or with the base-model prefix dropped or swapped for `prefix`."""
    if name in model_keys:
        return name
    bare = next((name[len(p):] for p in _BASE_PREFIXES if name.startswith(p)), name)
    for key in (bare, f"{prefix}.{bare}"):
        if key in model_keys:
            return key
    return None


def _plan(checkpoint: Checkpoint, model, targets: dict, config: LlamaConfig):
    """checkpoint key -> model key for every tensor to copy, and the fresh task-head keys; errors and warnings."""
    plan, unexpected = {}, []
    prefix, model_name = getattr(model, "base_model_prefix", "model"), type(model).__name__
    for name in checkpoint.tensor_names():
        key = _model_key(name, targets, prefix)
        if key is None:
            if not _IGNORED_UNEXPECTED.search(name):
                unexpected.append(name)
        elif not (key.endswith("lm_head.weight") and config.tie_word_embeddings):
            plan[name] = key
    tied = {key for key in targets if key.endswith("lm_head.weight")} if config.tie_word_embeddings else set()
    covered = set(plan.values()) | tied
    missing = [key for key in targets if key not in covered]
    new_heads = [key for key in missing if key.startswith(_NEW_HEADS)]
    _report(checkpoint, model_name, unexpected, [key for key in missing if key not in new_heads], new_heads)
    for name, key in plan.items():
        _check_shape(checkpoint, name, tuple(targets[key].shape), config, model_name)
    return plan, new_heads


def _report(checkpoint: Checkpoint, model_name: str, unexpected: list, missing: list, new_heads: list) -> None:
    if missing:
        raise ValueError(f"{checkpoint.path} lacks {len(missing)} weight(s) {model_name} needs: {_some(missing)}")
    if unexpected:
        warnings.warn(f"{len(unexpected)} weight(s) of {checkpoint.path} were not used by {model_name}: "
                      f"{_some(unexpected)}", stacklevel=4)
    if new_heads:
        warnings.warn(f"Some weights of {model_name} were not initialized from the checkpoint at {checkpoint.path} "
                      f"and are newly initialized: {new_heads}. Train this head before using its predictions.",
                      stacklevel=4)


def _some(names: list[str], shown: int = 8) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


# which config field sizes each dim of a parameter (matched on the key's ending)
_DIM_FIELDS = {
    "embed_tokens.weight": ("vocab_size", "hidden_size"), "lm_head.weight": ("vocab_size", "hidden_size"),
    "q_proj.weight": ("num_attention_heads * head_dim", "hidden_size"),
    "k_proj.weight": ("num_key_value_heads * head_dim", "hidden_size"),
    "v_proj.weight": ("num_key_value_heads * head_dim", "hidden_size"),
    "o_proj.weight": ("hidden_size", "num_attention_heads * head_dim"),
    "q_proj.bias": ("num_attention_heads * head_dim",), "k_proj.bias": ("num_key_value_heads * head_dim",),
    "v_proj.bias": ("num_key_value_heads * head_dim",), "o_proj.bias": ("hidden_size",),
    "gate_proj.weight": ("intermediate_size", "hidden_size"), "up_proj.weight": ("intermediate_size", "hidden_size"),
    "down_proj.weight": ("hidden_size", "intermediate_size"), "gate_proj.bias": ("intermediate_size",),
    "up_proj.bias": ("intermediate_size",), "down_proj.bias": ("hidden_size",),
    "q_norm.weight": ("head_dim",), "k_norm.weight": ("head_dim",),  # before norm.weight: matched by ending
    "norm.weight": ("hidden_size",), "layernorm.weight": ("hidden_size",),
    "score.weight": ("num_labels", "hidden_size"), "qa_outputs.weight": ("2 (start, end)", "hidden_size"),
}


def _check_shape(checkpoint: Checkpoint, name: str, expected: tuple, config: LlamaConfig, model_name: str) -> None:
    info = checkpoint.infos[name]
    if info.shape == expected:
        return
    message = (f"{name} in {info.file} has shape {info.shape}, but {model_name} built from the config "
               f"expects {expected}")
    fields = next((f for suffix, f in _DIM_FIELDS.items() if name.endswith(suffix)), ())
    if len(info.shape) == len(expected) == len(fields):
        dim = next(d for d in range(len(expected)) if info.shape[d] != expected[d])
        message += (f": the config's {fields[dim]} gives {expected[dim]} but the weights have {info.shape[dim]}; "
                    f"fix {fields[dim]} in the config (from {config.name_or_path or 'the checkpoint'}) "
                    "or load the matching weights")
    raise ValueError(message)


def _fill(checkpoint: Checkpoint, targets: dict, plan: dict, progress) -> None:
    """Put each streamed tensor into its parameter: adopted when the reader made it fresh in the right
    dtype (no copy, no page faults), else copied in (cast to the parameter's dtype, moved to its device)."""
    total = sum(checkpoint.infos[name].nbytes for name in plan)
    callback = progress if callable(progress) else None
    enabled = progress if isinstance(progress, bool) else (callback is None and total > PROGRESS_MIN_BYTES)
    bar = ProgressBar(total, f"Loading {checkpoint.path.name}", enabled=enabled, callback=callback)
    sharded = {name: key for name, key in plan.items() if type(targets[key]).__name__ == "DTensor"}
    with torch.no_grad():
        if sharded:
            _fill_shards(checkpoint, targets, sharded, bar)
        for name, tensor in checkpoint.tensors([name for name in plan if name not in sharded]):
            target = targets[plan[name]]
            if tensor.shape != target.shape:  # the file's header promised another shape
                raise ValueError(f"{name} in {checkpoint.infos[name].file} holds shape {tuple(tensor.shape)}, "
                                 f"its header says {checkpoint.infos[name].shape}; the file is corrupt")
            if checkpoint.fresh_tensors and tensor.dtype == target.dtype and tensor.device == target.device:
                target.data = tensor
            else:
                target.copy_(tensor)
            bar.update(checkpoint.infos[name].nbytes)
    bar.close()


def _fill_shards(checkpoint: Checkpoint, targets: dict, sharded: dict, bar: "ProgressBar") -> None:
    """Tensor-parallel parameters: read only this rank's slice of each (llamaviz.checkpoints.slices)."""
    from llamaviz.checkpoints.slices import read_slice
    from llamaviz.distributed.parallel import local_slice

    for name, key in sharded.items():
        local = targets[key].to_local()
        where = local_slice(targets[key])
        piece = read_slice(checkpoint, name, *where) if where is not None else next(iter(checkpoint.tensors([name])))[1]
        if piece.shape != local.shape:
            raise ValueError(f"{name} in {checkpoint.infos[name].file}: this rank's slice has shape "
                             f"{tuple(piece.shape)}, expected {tuple(local.shape)}; the file is corrupt")
        local.copy_(piece)
        bar.update(checkpoint.infos[name].nbytes)


def _init_new_heads(targets: dict, keys: list[str], std: float) -> None:
    """Fresh task heads: normal(0, initializer_range) weights and zero biases, like transformers."""
    with torch.no_grad():
        for key in keys:
            if key.endswith(".bias"):
                targets[key].zero_()
            else:
                targets[key].normal_(mean=0.0, std=std)
