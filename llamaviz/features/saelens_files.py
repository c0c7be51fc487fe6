"""SAELens's dictionary folder, both ways: cfg.json, sae_weights.safetensors, sparsity.safetensors. No pickle.

cfg.json (SAELens 6): architecture, d_in, d_sae, dtype, device, apply_b_dec_to_input,
normalize_activations, reshape_activations, metadata {model_name, hook_name, context_size,
prepend_bos, ...}; topk adds k and rescale_acts_by_decoder_norm; transcoders d_out and
metadata.hook_name_out. Older folders with hook_name at the top level load too. Weights:
W_enc [d_in, d_sae], W_dec [d_sae, d_out], b_enc, b_dec, threshold (jumprelu), b_gate/b_mag/r_mag
(gated), W_skip [d_out, d_in] (skip transcoder). A folder without metadata.hook_name (SAELens writes one
when what it read had none) loads with hook_name "" (set dictionary.cfg.hook_name before attaching it).
sparsity.safetensors: "sparsity" [d_sae], the log10 firing frequency. cfg.metadata reads as SAELens's
(metadata.hook_name is cfg.hook_name; a missing key reads None).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llamaviz.features.dictionary import (ARCHITECTURES, NORMALIZATIONS, RESHAPES, TRANSCODERS, Dictionary,
                                         DictionaryConfig)
from llamaviz.features.file_checks import check_folder, check_safetensors, inside, read_text

CONFIG, WEIGHTS, SPARSITY = "cfg.json", "sae_weights.safetensors", "sparsity.safetensors"
_TOP_LEVEL_META = ("hook_name", "model_name", "context_size", "prepend_bos", "hook_name_out")
# metadata.sae_lens_version: the cfg.json layout's version. SAELens takes a file without it for a 5.x one
# and rebuilds metadata from top-level keys, losing metadata.hook_name, model_name and context_size.
SAELENS_FORMAT = "6.0.0"


def read_config(folder: Path) -> DictionaryConfig:
    """The folder's cfg.json as a DictionaryConfig; ValueError naming the file and the field that is wrong."""
    path = inside(folder, CONFIG)
    try:
        raw = json.loads(read_text(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder} is not a SAELens dictionary folder: {CONFIG} is missing "
                                f"(accepted: a folder with {CONFIG} and {WEIGHTS})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: line {err.lineno}, column {err.colno}: {err.msg}") from None
    except RecursionError:
        raise ValueError(f"{path} is not valid JSON: nested too deep") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    if not isinstance(raw.get("metadata", {}), (dict, type(None))):
        raise ValueError(f"{path}: metadata must be a JSON object, got {type(raw['metadata']).__name__}")
    metadata = dict(raw.get("metadata") or {})
    for key in _TOP_LEVEL_META:  # SAELens 5.x kept these at the top
        if key in raw and key not in metadata:
            metadata[key] = raw[key]
    _check_fields(path, raw, metadata)
    architecture = raw.get("architecture", "standard")
    return DictionaryConfig(
        architecture=architecture, d_in=raw["d_in"], d_sae=raw["d_sae"], hook_name=metadata.pop("hook_name", "") or "",
        d_out=raw.get("d_out"), hook_name_out=metadata.pop("hook_name_out", None), k=raw.get("k"),
        rescale_acts_by_decoder_norm=bool(raw.get("rescale_acts_by_decoder_norm", False)),
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", architecture not in TRANSCODERS)),
        normalize_activations=raw.get("normalize_activations", "none") or "none",
        reshape_activations=raw.get("reshape_activations", "none") or "none", metadata=metadata)


def _check_fields(path: Path, raw: dict, metadata: dict) -> None:
    """ValueError naming cfg.json and the first field whose type or value is not accepted."""
    architecture = raw.get("architecture", "standard")
    if architecture not in ARCHITECTURES:
        raise ValueError(f"{path}: architecture {architecture!r} is not supported; accepted: {', '.join(ARCHITECTURES)}")
    for key in ("d_in", "d_sae"):
        if not _positive_int(raw.get(key)):
            raise ValueError(f"{path}: {key} must be a positive integer, got {raw.get(key)!r}")
    for key in ("d_out", "k"):
        if raw.get(key) is not None and not _positive_int(raw[key]):
            raise ValueError(f"{path}: {key} must be a positive integer or absent, got {raw[key]!r}")
    for key in ("apply_b_dec_to_input", "rescale_acts_by_decoder_norm"):
        if key in raw and not isinstance(raw[key], bool):
            raise ValueError(f"{path}: {key} must be true or false, got {raw[key]!r}")
    for key, accepted in (("normalize_activations", NORMALIZATIONS), ("reshape_activations", RESHAPES)):
        if (raw.get(key) or "none") not in accepted:
            raise ValueError(f"{path}: {key} {raw[key]!r} is not supported; accepted: {', '.join(accepted)}")
    for key in ("hook_name", "hook_name_out", "model_name"):
        if metadata.get(key) is not None and not isinstance(metadata[key], str):
            raise ValueError(f"{path}: metadata.{key} must be a string, got {metadata[key]!r}")
    if metadata.get("context_size") is not None and not _positive_int(metadata["context_size"]):
        raise ValueError(f"{path}: metadata.context_size must be a positive integer or null, "
                         f"got {metadata['context_size']!r}")
    if metadata.get("prepend_bos") is not None and not isinstance(metadata["prepend_bos"], bool):
        raise ValueError(f"{path}: metadata.prepend_bos must be true or false, got {metadata['prepend_bos']!r}")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors after its header is checked against its size (file_checks)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    check_safetensors(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from None


def load(folder, device=None, dtype=None, cls=Dictionary) -> Dictionary:
    """A dictionary from a SAELens folder (safetensors only); every weight's shape is checked against cfg.json."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no dictionary folder at {folder} (accepted: a folder with {CONFIG} and {WEIGHTS})")
    check_folder(folder)
    dictionary = cls(read_config(folder))
    path = inside(folder, WEIGHTS)
    weights = read_weights(path)
    expected = {name: tuple(p.shape) for name, p in dictionary.named_parameters()}
    missing, extra = set(expected) - set(weights), set(weights) - set(expected)
    if missing:
        raise ValueError(f"{path} lacks {', '.join(sorted(missing))} for a {dictionary.cfg.architecture} dictionary")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise ValueError(f"{path}: {name} has shape {list(weights[name].shape)}, cfg.json says "
                             f"{list(shape)} (d_in={dictionary.cfg.d_in}, d_sae={dictionary.cfg.d_sae})")
    bad = [name for name in expected if not torch.isfinite(weights[name]).all()]
    if bad:
        raise ValueError(f"{path}: {', '.join(bad)} holds NaN or infinite values")
    dictionary.load_state_dict({name: weights[name] for name in expected})
    if extra - {"scaling_factor"}:
        dictionary.cfg.metadata.setdefault("ignored_tensors", sorted(extra))
    return dictionary.to(device=device, dtype=dtype or _dtype(dictionary))


def _dtype(dictionary: Dictionary) -> torch.dtype:
    return dictionary.W_enc.dtype


def config_dict(cfg: DictionaryConfig, dtype: torch.dtype) -> dict:
    """cfg.json's contents in SAELens 6's keys."""
    out = {"architecture": cfg.architecture, "d_in": cfg.d_in, "d_sae": cfg.d_sae,
           "dtype": str(dtype).removeprefix("torch."), "device": "cpu",
           "apply_b_dec_to_input": cfg.apply_b_dec_to_input, "normalize_activations": cfg.normalize_activations,
           "reshape_activations": cfg.reshape_activations,
           "metadata": {"sae_lens_version": SAELENS_FORMAT, "hook_name": cfg.hook_name, **cfg.metadata}}
    if cfg.architecture == "topk":
        out |= {"k": cfg.k, "rescale_acts_by_decoder_norm": cfg.rescale_acts_by_decoder_norm}
    if cfg.is_transcoder:
        out["d_out"] = cfg.d_out or cfg.d_in
        out["metadata"]["hook_name_out"] = cfg.hook_name_out
    return out


def save(dictionary: Dictionary, folder, sparsity: torch.Tensor | None = None) -> Path:
    """Write the folder SAELens's SAE.load_from_disk reads; sparsity = log10 firing frequency [d_sae]."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {name: p.detach().contiguous().cpu() for name, p in dictionary.named_parameters()}
    save_file(weights, str(folder / WEIGHTS))
    (folder / CONFIG).write_text(json.dumps(config_dict(dictionary.cfg, dictionary.W_enc.dtype), indent=2))
    if sparsity is not None:
        if tuple(sparsity.shape) != (dictionary.cfg.d_sae,):
            raise ValueError(f"sparsity must be [d_sae={dictionary.cfg.d_sae}], got {list(sparsity.shape)}")
        save_file({"sparsity": sparsity.detach().float().contiguous().cpu()}, str(folder / SPARSITY))
    return folder


def load_sparsity(folder) -> torch.Tensor | None:
    """The log10 firing frequency [d_sae] saved beside a dictionary, or None."""
    path = inside(Path(folder), SPARSITY)
    if not path.exists():
        return None
    weights = read_weights(path)
    if "sparsity" not in weights:
        raise ValueError(f"{path} lacks the tensor 'sparsity' (log10 firing frequency [d_sae])")
    return weights["sparsity"]


class SAE(Dictionary):
    """SAELens's spelling: SAE.load_from_disk(path), sae.save_model(path), sae.encode / decode / sae(x)."""

    @classmethod
    def load_from_disk(cls, path, device: str | None = None, dtype=None) -> "SAE":
        return load(path, device=device, dtype=dtype, cls=cls)

    def save_model(self, path, sparsity: torch.Tensor | None = None) -> Path:
        return save(self, path, sparsity)
