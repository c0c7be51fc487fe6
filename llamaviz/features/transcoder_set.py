"""A transcoder per layer as one object, in circuit-tracer's layout: config.yaml + layer_{i}.safetensors.

config.yaml: model_kind: transcoder_set, model_name, feature_input_hook (per block, "mlp.hook_in"),
feature_output_hook ("hook_mlp_out"), transcoders (the layer files, in layer order). Each file:
W_enc [d_tc, d_model] (the transpose of SAELens's), W_dec [d_tc, d_model], b_enc [d_tc], b_dec
[d_model], optional W_skip [d_model, d_model], activation_function.threshold (JumpReLU), k (TopK).
circuit-tracer encodes x @ W_enc.T + b_enc with no b_dec shift; so do these transcoders.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from llamaviz.features.dictionary import Dictionary, DictionaryConfig
from llamaviz.features.file_checks import check_folder, inside, read_text
from llamaviz.features.saelens_files import read_weights

INPUT_HOOK, OUTPUT_HOOK = "mlp.hook_in", "hook_mlp_out"


class TranscoderSet(nn.Module):
    """transcoders[L] reads blocks.L.{feature_input_hook} and writes blocks.L.{feature_output_hook}."""

    def __init__(self, transcoders: list[Dictionary], model_name: str = "", feature_input_hook: str = INPUT_HOOK,
                 feature_output_hook: str = OUTPUT_HOOK):
        super().__init__()
        if not transcoders:
            raise ValueError("a transcoder set needs at least one layer's transcoder")
        self.transcoders = nn.ModuleList(transcoders)
        self.model_name, self.feature_input_hook, self.feature_output_hook = (model_name, feature_input_hook,
                                                                              feature_output_hook)

    def __len__(self) -> int:
        return len(self.transcoders)

    def __getitem__(self, layer: int) -> Dictionary:
        return self.transcoders[layer]

    def __iter__(self):
        return iter(self.transcoders)

    @classmethod
    def load(cls, folder, device=None) -> "TranscoderSet":
        """circuit-tracer's layout (config.yaml + layer_{i}.safetensors)."""
        return load_transcoder_set(folder, device)

    def save(self, folder) -> Path:
        return save_transcoder_set(self, folder)


def transcoder(layer: int, d_model: int, d_tc: int, activation: str = "relu", skip: bool = True,
               k: int | None = None) -> Dictionary:
    """An empty transcoder of one layer reading blocks.L.mlp.hook_in and writing blocks.L.hook_mlp_out."""
    architecture = {"relu": "skip_transcoder" if skip else "transcoder",
                    "jumprelu": "jumprelu_skip_transcoder" if skip else "jumprelu_transcoder", "topk": "topk"}[activation]
    if activation == "topk" and skip:
        raise ValueError("a TopK transcoder with a skip path is not a SAELens architecture; use relu or jumprelu")
    return Dictionary(DictionaryConfig(architecture=architecture, d_in=d_model, d_sae=d_tc,
                                       hook_name=f"blocks.{layer}.{INPUT_HOOK}", d_out=d_model,
                                       hook_name_out=f"blocks.{layer}.{OUTPUT_HOOK}", k=k,
                                       apply_b_dec_to_input=False))


def save_transcoder_set(transcoders: TranscoderSet, folder) -> Path:
    """Write config.yaml and layer_{i}.safetensors, the layout circuit-tracer opens by the folder's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for layer, tc in enumerate(transcoders):
        weights = {"W_enc": tc.W_enc.T, "W_dec": tc.W_dec, "b_enc": tc.b_enc, "b_dec": tc.b_dec}
        if hasattr(tc, "W_skip"):
            weights["W_skip"] = tc.W_skip
        if hasattr(tc, "threshold"):
            weights["activation_function.threshold"] = tc.threshold
        if tc.cfg.k is not None:
            weights["k"] = torch.tensor(tc.cfg.k)
        save_file({n: w.detach().contiguous().cpu() for n, w in weights.items()}, str(folder / f"layer_{layer}.safetensors"))
        files.append(str((folder / f"layer_{layer}.safetensors").resolve()))
    config = {"model_kind": "transcoder_set", "model_name": transcoders.model_name, "scan": transcoders.model_name or folder.name,
              "feature_input_hook": transcoders.feature_input_hook,
              "feature_output_hook": transcoders.feature_output_hook, "transcoders": files}
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def load_transcoder_set(folder, device=None) -> TranscoderSet:
    """A set from circuit-tracer's layout (safe YAML, safetensors only); shapes checked layer by layer.

    Layer files are read only from inside the folder: a path in config.yaml that points elsewhere (circuit-
    tracer writes absolute paths) is taken as the file of that name in the folder, refused if there is none.
    """
    folder = Path(folder)
    check_folder(folder)
    path = inside(folder, "config.yaml")
    try:
        config = yaml.safe_load(read_text(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder} is not a transcoder set: config.yaml is missing "
                                "(accepted: circuit-tracer's config.yaml + layer_{i}.safetensors)") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ValueError(f"{path} is not valid YAML: {where}{getattr(err, 'problem', None) or err}") from None
    if not isinstance(config, dict) or config.get("model_kind") != "transcoder_set":
        raise ValueError(f"{path}: model_kind must be transcoder_set")
    files = config.get("transcoders") or sorted(folder.glob("layer_*.safetensors"),
                                                 key=lambda p: int(p.stem.split("_")[1]))
    if not isinstance(files, list) or not all(isinstance(f, (str, Path)) for f in files):
        raise ValueError(f"{path}: transcoders must be a list of layer file paths, got {files!r}")
    for key in ("feature_input_hook", "feature_output_hook", "model_name"):
        if config.get(key) is not None and not isinstance(config[key], str):
            raise ValueError(f"{path}: {key} must be a string, got {config[key]!r}")
    layers = [_read_layer(layer, _layer_file(folder, path, Path(name))) for layer, name in enumerate(files)]
    return TranscoderSet(layers, config.get("model_name", "") or "", config.get("feature_input_hook") or INPUT_HOOK,
                         config.get("feature_output_hook") or OUTPUT_HOOK).to(device)


def _layer_file(folder: Path, config: Path, named: Path) -> Path:
    """The layer file `named` in config.yaml, as a file inside `folder` (its own name there if it points out)."""
    if not named.is_absolute():
        return inside(folder, named)  # refuses a symlink or ../ that leads out
    if named.resolve().is_relative_to(folder.resolve()):
        return named.resolve()
    if os.path.lexists(folder / named.name):
        return inside(folder, named.name)
    raise ValueError(f"{config}: the layer file {named} lies outside the set's folder {folder} and the folder "
                     f"has no {named.name}; accepted: layer files inside the folder")


def _read_layer(layer: int, path: Path) -> Dictionary:
    try:
        weights = read_weights(path)
    except FileNotFoundError as err:
        raise ValueError(f"layer {layer} of the transcoder set: {err}") from None
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        if name not in weights:
            raise ValueError(f"{path} lacks {name} (a transcoder file has W_enc, W_dec, b_enc, b_dec)")
    d_tc, d_model = weights["W_enc"].shape
    if tuple(weights["W_dec"].shape) != (d_tc, d_model):
        raise ValueError(f"{path}: W_dec is {list(weights['W_dec'].shape)}, W_enc says [{d_tc}, {d_model}]")
    activation = "jumprelu" if "activation_function.threshold" in weights else "topk" if "k" in weights else "relu"
    tc = transcoder(layer, d_model, d_tc, activation, skip="W_skip" in weights,
                    k=int(weights["k"]) if "k" in weights else None)
    state = {"W_enc": weights["W_enc"].T, "W_dec": weights["W_dec"], "b_enc": weights["b_enc"], "b_dec": weights["b_dec"]}
    if "W_skip" in weights:
        state["W_skip"] = weights["W_skip"]
    if "activation_function.threshold" in weights:
        state["threshold"] = weights["activation_function.threshold"]
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(getattr(tc, name).shape):
            raise ValueError(f"{path}: {name} has shape {list(tensor.shape)}; W_enc [{d_tc}, {d_model}] needs "
                             f"{list(getattr(tc, name).shape)}")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: {name} holds NaN or infinite values")
    tc.load_state_dict(state)
    return tc.to(weights["W_enc"].dtype)
