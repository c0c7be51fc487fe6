"""Feature dashboards built offline in two streaming passes over a corpus's windows.

For every feature: the TOP contexts that activate it most (a window of tokens around the peak, with
every token's activation), SAMPLES contexts from each of INTERVALS activation intervals, a BINS-bin
histogram of its non-zero activations, its density (fraction of tokens where it fires), and its top
and bottom logit effects: the decoder row times the final norm's weight, through the unembedding
(the convention of logit_attrs; the norm's per-token scale is left out, so effects compare features,
not absolute logits).

Memory is a running top-k per feature, never a [tokens, features] tensor: at most one batch of
activations [BATCH x context, features] at a time plus O(features x (TOP + INTERVALS x SAMPLES))
indices. Stored next to the dictionary in dashboards.safetensors (no pickle), read lazily per feature.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llamaviz.features.attach import attached
from llamaviz.features.dictionary import Dictionary

TOP, INTERVALS, SAMPLES, BINS, RADIUS, BATCH, EFFECTS = 20, 10, 3, 50, 8, 8, 10
FILE = "dashboards.safetensors"


def feature_acts(model, dictionary: Dictionary, ids: torch.Tensor) -> torch.Tensor:
    """[b, p, F] activations of every feature on windows ids [b, p] (the model runs with the dictionary attached)."""
    name = f"{dictionary.cfg.hook_name}.hook_sae_acts_post"
    with torch.no_grad(), attached(model, dictionary, use_error_term=True):
        _, cache = model.run_with_cache(ids, names_filter=[name])
    return cache[name].float()


def logit_effects(model, dictionary: Dictionary, count: int = EFFECTS, chunk: int = 1024) -> dict[str, torch.Tensor]:
    """Top and bottom `count` tokens of each feature's decoder row through norm weight and unembedding."""
    weight, unembed = model.model.norm.weight.detach().float(), model.lm_head.weight.detach().float()  # [m], [v, m]
    out = {key: [] for key in ("promoted_ids", "promoted_values", "suppressed_ids", "suppressed_values")}
    with torch.no_grad():
        for start in range(0, dictionary.cfg.d_sae, chunk):
            effects = (dictionary.W_dec[start:start + chunk].float() * weight) @ unembed.T  # [c, v]
            top, bottom = effects.topk(count, dim=-1), effects.topk(count, dim=-1, largest=False)
            out["promoted_ids"].append(top.indices), out["promoted_values"].append(top.values)
            out["suppressed_ids"].append(bottom.indices), out["suppressed_values"].append(bottom.values)
    return {key: torch.cat(values) for key, values in out.items()}


def build(model, dictionary: Dictionary, windows: torch.Tensor, folder=None, progress=None) -> Path | dict:
    """Dashboards of every feature from windows [n, p]; written to folder/dashboards.safetensors when folder is given."""
    n, p = windows.shape
    features = dictionary.cfg.d_sae
    peak = torch.zeros(features)
    top_values, top_where = torch.full((features, TOP), -1.0), torch.zeros(features, TOP, dtype=torch.long)
    fired = torch.zeros(features)
    for start in range(0, n, BATCH):  # pass 1: maxima, density, top contexts
        acts = feature_acts(model, dictionary, windows[start:start + BATCH])  # [b, p, F]
        flat = acts.reshape(-1, features)  # [b * p, F]
        fired += (flat > 0).sum(0)
        peak = torch.maximum(peak, flat.max(0).values)
        values = torch.cat([top_values, flat.T], dim=1)  # [F, TOP + b * p]
        where = torch.cat([top_where, torch.arange(start * p, start * p + flat.shape[0]).expand(features, -1)], dim=1)
        top_values, chosen = values.topk(TOP, dim=1)
        top_where = where.gather(1, chosen)
        if progress is not None:
            progress(min(n, start + BATCH), 2 * n)
    histogram = torch.zeros(features, BINS)
    sample_keys = torch.full((features, INTERVALS, SAMPLES), -1.0)
    sample_where = torch.zeros(features, INTERVALS, SAMPLES, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    for start in range(0, n, BATCH):  # pass 2: histograms and interval samples (reservoirs by random keys)
        flat = feature_acts(model, dictionary, windows[start:start + BATCH]).reshape(-1, features)
        scaled = flat / peak.clamp(min=1e-12)  # (0, 1] where the feature fires
        bins = (scaled * BINS).ceil().clamp(1, BINS).long() - 1
        histogram.scatter_add_(1, bins.T, (flat > 0).float().T)
        interval = (scaled * INTERVALS).ceil().clamp(1, INTERVALS).long() - 1
        keys = torch.rand(flat.shape, generator=generator)
        positions = torch.arange(start * p, start * p + flat.shape[0])
        for index in range(INTERVALS):
            masked = torch.where((flat > 0) & (interval == index), keys, torch.full_like(keys, -1.0)).T  # [F, N]
            merged = torch.cat([sample_keys[:, index], masked], dim=1)
            where = torch.cat([sample_where[:, index], positions.expand(features, -1)], dim=1)
            sample_keys[:, index], chosen = merged.topk(SAMPLES, dim=1)
            sample_where[:, index] = where.gather(1, chosen)
        if progress is not None:
            progress(n + min(n, start + BATCH), 2 * n)
    tensors = {"peak": peak, "density": fired / (n * p), "histogram": histogram, "top_values": top_values,
               "top_where": top_where, "sample_where": sample_where, "sample_valid": sample_keys >= 0,
               **contexts(model, dictionary, windows, top_where, top_values >= 0, "top"),
               **contexts(model, dictionary, windows, sample_where.view(features, -1),
                          (sample_keys >= 0).view(features, -1), "sample"),
               **logit_effects(model, dictionary)}
    if folder is None:
        return tensors
    path = Path(folder) / FILE
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"hook_name": dictionary.cfg.hook_name, "context": str(p), "radius": str(RADIUS)})
    return path


def contexts(model, dictionary: Dictionary, windows: torch.Tensor, where: torch.Tensor, valid: torch.Tensor,
             prefix: str) -> dict[str, torch.Tensor]:
    """Token ids and activations [F, k, 2 * RADIUS + 1] around each chosen (window, position); -1 pads."""
    p = windows.shape[1]
    window_of, position = where // p, where % p
    needed = sorted(set(window_of[valid].tolist()))
    width = 2 * RADIUS + 1
    ids = torch.full((*where.shape, width), -1, dtype=torch.long)
    acts = torch.zeros(*where.shape, width)
    offsets = torch.arange(-RADIUS, RADIUS + 1)
    for start in range(0, len(needed), BATCH):
        chunk = needed[start:start + BATCH]
        batch_acts = feature_acts(model, dictionary, windows[chunk])  # [c, p, F]
        for row, window in enumerate(chunk):
            feature, slot = torch.nonzero((window_of == window) & valid, as_tuple=True)
            spots = position[feature, slot][:, None] + offsets  # [m, width]
            inside = (spots >= 0) & (spots < p)
            clipped = spots.clamp(0, p - 1)
            ids[feature, slot] = torch.where(inside, windows[window][clipped], torch.full_like(clipped, -1))
            acts[feature, slot] = torch.where(inside, batch_acts[row][clipped, feature[:, None]], torch.zeros(()))
    return {f"{prefix}_ids": ids, f"{prefix}_acts": acts}


class DashboardFile:
    """A dashboards.safetensors read lazily: one feature's slices at a time."""

    def __init__(self, path):
        self.path = Path(path)
        if self.path.is_dir():
            self.path = self.path / FILE
        if not self.path.exists():
            raise FileNotFoundError(f"no dashboards at {self.path}: build them with features.dashboards.build")
        with safe_open(str(self.path), "pt") as f:
            self.features = f.get_slice("peak").get_shape()[0]
            self.metadata = f.metadata() or {}

    def feature(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.features:
            raise IndexError(f"feature {index} is out of range; accepted: 0..{self.features - 1}")
        with safe_open(str(self.path), "pt") as f:
            return {key: f.get_slice(key)[index] for key in f.keys()}

    def neuronpedia(self, index: int, tokenizer, model_id: str = "") -> dict:
        """One feature as Neuronpedia-style feature JSON (activations, logit effects, histogram, density)."""
        data = self.feature(index)
        text = lambda ids: [tokenizer.decode([i]) for i in ids.tolist() if i >= 0]  # noqa: E731
        peak = float(data["peak"])
        return {
            "modelId": model_id, "layer": self.metadata.get("hook_name", ""), "index": index,
            "maxActApprox": peak, "frac_nonzero": float(data["density"]),
            "pos_str": text(data["promoted_ids"]), "pos_values": data["promoted_values"].tolist(),
            "neg_str": text(data["suppressed_ids"]), "neg_values": data["suppressed_values"].tolist(),
            "freq_hist_data_bar_heights": data["histogram"].tolist(),
            "freq_hist_data_bar_values": [peak * (i + 0.5) / BINS for i in range(BINS)],
            "activations": [{"tokens": text(ids), "values": acts[ids >= 0].tolist(), "maxValue": float(acts.max())}
                            for ids, acts, value in zip(data["top_ids"], data["top_acts"], data["top_values"])
                            if value >= 0]}


def export_json(path, dashboards: DashboardFile, indices, tokenizer, model_id: str = "") -> Path:
    path = Path(path)
    path.write_text(json.dumps([dashboards.neuronpedia(i, tokenizer, model_id) for i in indices]))
    return path


def memory_bound(features: int, context: int) -> int:
    """Bytes the build holds at most besides the model: one batch of activations plus the running state."""
    batch = BATCH * context * features * 4 * 3  # activations, scaled copy, keys
    state = features * (TOP * 2 + INTERVALS * SAMPLES * 2 + BINS + 2) * 8
    return batch + state + math.ceil(features * (TOP + INTERVALS * SAMPLES) * (2 * RADIUS + 1) * 12)
