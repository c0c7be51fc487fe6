"""Feature dashboards built offline in one pass of the model over a corpus's windows.

For every feature: the TOP contexts that activate it most (a window of tokens around the peak, with
every token's activation), SAMPLES contexts from each of INTERVALS activation intervals, a BINS-bin
histogram of its non-zero activations, its density (fraction of tokens where it fires), and its top
and bottom logit effects: the decoder row times the final norm's weight, through the unembedding
(the convention of logit_attrs; the norm's per-token scale is left out, so effects compare features,
not absolute logits).

The model runs once, up to the dictionary's hook only, and the dictionary encodes what it reads there.
That pass keeps a running top-TOP per feature (positions where it fires; an empty slot holds -1) and
writes the non-zero activations to a temporary spill on disk (12 bytes each, in window order). The
histograms (bins of peak / BINS), the interval samples (reservoirs by random keys, intervals of
peak / INTERVALS) and the contexts' activations are then read back from the spill, without the model.
Memory is one batch of activations [BATCH x context, features] plus O(features x (TOP + INTERVALS x
SAMPLES) x context width) for the running state, never [tokens, features] (memory_bound() states it).
Stored next to the dictionary in dashboards.safetensors (no pickle), read lazily per feature.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llamaviz.features.dictionary import Dictionary

TOP, INTERVALS, SAMPLES, BINS, RADIUS, BATCH, EFFECTS = 20, 10, 3, 50, 8, 8, 10
FILE = "dashboards.safetensors"


def feature_acts(model, dictionary: Dictionary, ids: torch.Tensor) -> torch.Tensor:
    """[b, p, F] activations of every feature on windows ids [b, p]: the dictionary encodes what its hook reads.

    The forward stops after the hook's block (nothing later changes the hook's input), and the
    dictionary is not spliced in: one encode, no reconstruction or error term.
    """
    hook = dictionary.cfg.hook_name
    model._check_name(hook)
    stop = _stop_layer(hook, model.config.num_hidden_layers)
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, names_filter=[hook], **({} if stop is None else {"stop_at_layer": stop}))
        return dictionary.encode(cache[hook].to(dictionary.W_enc.dtype)).float()


def _stop_layer(hook: str, layers: int) -> int | None:
    """The block after the one `hook` sits in ("blocks.L..." -> L + 1), None when the whole forward is needed."""
    parts = hook.split(".")
    if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit() and int(parts[1]) + 1 < layers:
        return int(parts[1]) + 1
    return None


def logit_effects(model, dictionary: Dictionary, count: int = EFFECTS, chunk: int = 256) -> dict[str, torch.Tensor]:
    """Top and bottom `count` tokens of each feature's decoder row through norm weight and unembedding."""
    weight, unembed = model.model.norm.weight.detach().float(), model.lm_head.weight.detach().float()  # [m], [v, m]
    out = {key: [] for key in ("promoted_ids", "promoted_values", "suppressed_ids", "suppressed_values")}
    with torch.no_grad():
        for start in range(0, dictionary.cfg.d_sae, chunk):
            effects = (dictionary.W_dec[start:start + chunk].float().to(weight.device) * weight) @ unembed.T  # [c, v]
            top, bottom = effects.topk(count, dim=-1), effects.topk(count, dim=-1, largest=False)
            out["promoted_ids"].append(top.indices), out["promoted_values"].append(top.values)
            out["suppressed_ids"].append(bottom.indices), out["suppressed_values"].append(bottom.values)
    return {key: torch.cat(values).cpu() for key, values in out.items()}


class Ranked:
    """The `size` largest keys of each of `groups` groups offered so far, each with a payload; -1 marks an empty slot."""

    def __init__(self, groups: int, size: int):
        self.keys = torch.full((groups, size), -1.0)  # [G, size], descending
        self.payload = torch.zeros(groups, size, dtype=torch.long)

    def offer(self, group: torch.Tensor, key: torch.Tensor, payload: torch.Tensor) -> None:
        """Merge candidates (group [N], key [N] >= 0, payload [N]) into the kept ones."""
        better = key > self.keys[group, -1]  # only these can enter: the rest of the state stays as it is
        group, key, payload = group[better], key[better], payload[better]
        if not len(group):
            return
        touched, local = torch.unique(group, return_inverse=True)
        size = self.keys.shape[1]
        every_group = torch.cat([torch.arange(len(touched)).repeat_interleave(size), local])
        every_key = torch.cat([self.keys[touched].flatten(), key])
        every_payload = torch.cat([self.payload[touched].flatten(), payload])
        order = torch.argsort(every_key, descending=True, stable=True)
        order = order[torch.argsort(every_group[order], stable=True)]  # by group, then key descending
        ranked = every_group[order]
        rank = torch.arange(len(ranked)) - torch.searchsorted(ranked, ranked)
        kept = order[rank < size]
        keys, payloads = torch.full((len(touched), size), -1.0), torch.zeros(len(touched), size, dtype=torch.long)
        keys[every_group[kept], rank[rank < size]] = every_key[kept]
        payloads[every_group[kept], rank[rank < size]] = every_payload[kept]
        self.keys[touched], self.payload[touched] = keys, payloads


class Spill:
    """The pass's non-zero activations on disk, in batches: int64 keys ((window x p + position) x F + feature,
    ascending) and float32 values."""

    def __init__(self, folder: Path):
        self.keys_path, self.values_path = folder / "keys.bin", folder / "values.bin"
        self._files = [open(self.keys_path, "wb"), open(self.values_path, "wb")]
        self.counts: list[int] = []

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self._files[0].write(keys.numpy().tobytes())
        self._files[1].write(values.numpy().astype(np.float32).tobytes())
        self.counts.append(len(keys))

    def batches(self):
        """(keys, values) of each appended batch, read back in order."""
        for handle in self._files:
            handle.flush()
        offset = 0
        for count in self.counts:
            keys = np.fromfile(self.keys_path, dtype=np.int64, count=count, offset=8 * offset)
            values = np.fromfile(self.values_path, dtype=np.float32, count=count, offset=4 * offset)
            offset += count
            yield torch.from_numpy(keys), torch.from_numpy(values)

    def lookup(self, wanted: torch.Tensor) -> torch.Tensor:
        """The activations at keys `wanted` [N] (0 where the feature was not active), in one read of the spill."""
        order = torch.argsort(wanted)
        ordered, found = wanted[order], torch.zeros(len(wanted))
        for keys, values in self.batches():
            if not len(keys) or not len(ordered):
                continue
            low, high = int(torch.searchsorted(ordered, keys[0])), int(torch.searchsorted(ordered, keys[-1], right=True))
            at = torch.searchsorted(keys, ordered[low:high]).clamp(max=len(keys) - 1)
            hit = keys[at] == ordered[low:high]
            found[order[low:high][hit]] = values[at[hit]]
        return found

    def close(self) -> None:
        for handle in self._files:
            handle.close()


def build(model, dictionary: Dictionary, windows: torch.Tensor, folder=None, progress=None) -> Path | dict:
    """Dashboards of every feature from windows [n, p]; written to folder/dashboards.safetensors when folder is given."""
    n, p = windows.shape
    features = dictionary.cfg.d_sae
    top, fired = Ranked(features, TOP), torch.zeros(features)
    with tempfile.TemporaryDirectory(dir=folder) as spill_folder:
        spill = Spill(Path(spill_folder))
        try:
            for start in range(0, n, BATCH):  # the one pass of the model: density, top positions, the spill
                flat = feature_acts(model, dictionary, windows[start:start + BATCH]).reshape(-1, features)
                rows, feature = flat.nonzero(as_tuple=True)  # row-major: keys come out ascending
                keys = ((start * p + rows) * features + feature).cpu()
                values, feature = flat[rows, feature].cpu(), feature.cpu()
                spill.append(keys, values)
                fired += torch.bincount(feature, minlength=features)
                top.offer(feature, values, keys // features)
                if progress is not None:
                    progress(min(n, start + BATCH), n)
            peak = top.keys[:, 0].clamp(min=0)
            histogram, samples = _spread(spill, peak, features)
            sample_where = samples.payload.view(features, INTERVALS, SAMPLES)
            sample_valid = samples.keys.view(features, INTERVALS, SAMPLES) >= 0
            found = _contexts(spill, windows, features, {"top": (top.payload, top.keys >= 0),
                                                         "sample": (sample_where.reshape(features, -1),
                                                                    sample_valid.reshape(features, -1))})
        finally:
            spill.close()
    tensors = {"peak": peak, "density": fired / (n * p), "histogram": histogram, "top_values": top.keys,
               "top_where": top.payload, "sample_where": sample_where, "sample_valid": sample_valid, **found,
               **logit_effects(model, dictionary)}
    if folder is None:
        return tensors
    path = Path(folder) / FILE
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"hook_name": dictionary.cfg.hook_name, "context": str(p), "radius": str(RADIUS)})
    return path


def _spread(spill: Spill, peak: torch.Tensor, features: int) -> tuple[torch.Tensor, Ranked]:
    """Histograms [F, BINS] of the non-zero activations over (0, peak] and the interval samples, from the spill."""
    histogram = torch.zeros(features * BINS)
    samples = Ranked(features * INTERVALS, SAMPLES)
    generator = torch.Generator().manual_seed(0)
    for keys, values in spill.batches():
        feature = keys % features
        scaled = values / peak[feature]  # (0, 1]
        bins = (scaled * BINS).ceil().clamp(1, BINS).long() - 1
        histogram += torch.bincount(feature * BINS + bins, minlength=features * BINS)
        interval = (scaled * INTERVALS).ceil().clamp(1, INTERVALS).long() - 1
        samples.offer(feature * INTERVALS + interval, torch.rand(len(keys), generator=generator), keys // features)
    return histogram.view(features, BINS), samples


def _contexts(spill: Spill, windows: torch.Tensor, features: int, chosen: dict) -> dict[str, torch.Tensor]:
    """Token ids and activations [F, k, 2 x RADIUS + 1] around each chosen position ({prefix: (where, valid)});
    -1 pads the ids. All activations come from one read of the spill."""
    p = windows.shape[1]
    offsets = torch.arange(-RADIUS, RADIUS + 1)
    out, wanted, places = {}, [], []
    for prefix, (where, valid) in chosen.items():
        window_of, spots = (where // p)[..., None], (where % p)[..., None] + offsets  # [F, k, 1], [F, k, width]
        inside = valid[..., None] & (spots >= 0) & (spots < p)
        clipped = spots.clamp(0, p - 1)
        out[f"{prefix}_ids"] = torch.where(inside, windows[window_of.expand_as(clipped), clipped], -1)
        feature = torch.arange(features)[:, None, None]
        wanted.append(((window_of * p + clipped) * features + feature)[inside])
        places.append((prefix, inside))
    found = spill.lookup(torch.cat(wanted))
    for prefix, inside in places:
        acts = torch.zeros(inside.shape)
        acts[inside], found = found[:int(inside.sum())], found[int(inside.sum()):]
        out[f"{prefix}_acts"] = acts
    return out


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

    def values(self, key: str, indices) -> torch.Tensor:
        """One field of the chosen features, [len(indices), ...]: the other fields are not read."""
        indices = [int(i) for i in indices]
        for index in indices:
            if not 0 <= index < self.features:
                raise IndexError(f"feature {index} is out of range; accepted: 0..{self.features - 1}")
        with safe_open(str(self.path), "pt") as f:
            if key not in f.keys():
                raise KeyError(f"{self.path} has no field {key!r}; it holds: {', '.join(sorted(f.keys()))}")
            part = f.get_slice(key)
            return torch.stack([part[i] for i in indices]) if indices else torch.zeros(0)

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


def memory_bound(features: int, context: int, l0: int | None = None, vocab: int = 0) -> int:
    """Bytes the build holds at most besides the model's own forward: one batch of dense activations, its
    non-zero entries (l0 per token, at most `features`: indices, keys, values and the merge's sort), the
    running state, the contexts with their lookups, and one chunk of logit effects [256, vocab]."""
    tokens, l0 = BATCH * context, features if l0 is None else min(l0, features)
    batch = tokens * features * 4 + tokens * l0 * (8 + 8 + 8 + 4 + 4 + 8 + 8 * 3)
    kept = features * (TOP + INTERVALS * SAMPLES)
    state = kept * (4 + 8) * 2 + features * (BINS + 1) * 4
    return batch + state + kept * (2 * RADIUS + 1) * (8 + 4 + 8 * 4) + 256 * vocab * 4 * 2
