"""ActivationCache (a read-only mapping of hook name -> tensor), run_with_cache and its memory guard."""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from pathlib import Path

import torch

from llamaviz.llama.decomposition import DecompositionMixin
from llamaviz.llama.hook_points import layer_of
from llamaviz.llama.names import get_act_name
from llamaviz.llama.lazy_patterns import LazyPatterns, lazy_piece_names, query_window, unique_nbytes

MEMORY_BUDGET_FRACTION = 0.25  # of available RAM / GPU memory a capture may take by default



def hook_name(short: str, layer: int | None = None, sub: str | None = None, n_layers: int | None = None) -> str:
    """TransformerLens-style name from a short form: ("pattern", 3) -> "blocks.3.attn.hook_pattern"."""
    return get_act_name(short, layer, sub, n_layers=n_layers)


class ActivationCache(DecompositionMixin, Mapping):
    """Activations by hook name. `cache["pattern", 3]` is `cache["blocks.3.attn.hook_pattern"]`.

    Keys may be TransformerLens short forms: `cache["attn", 3]`, `cache["scale", 2, "ln1"]`,
    `cache["resid_post", -1]` (negative layers count from the end).
    With `lazy` (a LazyPatterns), pattern-shaped names are computed from rot_q / rot_k when read;
    `cache.pattern(layer, head, queries)` reads one head or a window of queries either way.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], model=None, tokens: torch.Tensor | None = None,
                 model_name: str = "", lazy=None):
        self._tensors = dict(tensors)
        self.lazy = lazy
        self.model = model
        self.tokens = tokens
        self.model_name = model_name or getattr(model, "name_or_path", "") or ""

    def __getitem__(self, key) -> torch.Tensor:
        name = self.resolve_key(key)
        if name in self._tensors:
            return self._tensors[name]
        if self.lazy is not None and name in self.lazy:
            return self.lazy.read(name)
        close = difflib.get_close_matches(name, list(self), n=5, cutoff=0.6)
        raise KeyError(f"{name!r} is not in this cache ({len(self)} names"
                       + (f"; closest: {', '.join(close)})" if close else ")"))

    def resolve_key(self, key) -> str:
        """The hook name a key stands for: a full name, or a (short name, layer[, sublayer]) tuple."""
        if isinstance(key, tuple):
            layers = self.model.config.num_hidden_layers if self.model is not None else None
            return get_act_name(*key, n_layers=layers)
        return key if key in self._tensors else get_act_name(key)

    def __contains__(self, key) -> bool:  # without computing a lazy pattern
        try:
            name = self.resolve_key(key)
            return name in self._tensors or (self.lazy is not None and name in self.lazy)
        except KeyError:
            return False

    def __iter__(self):
        yield from self._tensors
        if self.lazy is not None:
            yield from (n for n in self.lazy.names if n not in self._tensors)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def nbytes(self) -> int:
        """Bytes held: the stored tensors plus lazy pieces (a lazy pattern costs nothing until read)."""
        return unique_nbytes([*self._tensors.values(), *(self.lazy.tensors() if self.lazy is not None else [])])

    def pattern(self, layer: int, head: int | None = None, queries=slice(None)) -> torch.Tensor:
        """Softmax pattern of `layer`: [b, h, q, k], or [b, q, k] for one head; lazy ones compute only that."""
        return self._attention(layer, "pattern", head, queries)

    def attn_scores(self, layer: int, head: int | None = None, queries=slice(None)) -> torch.Tensor:
        """Scaled, masked scores of `layer`, shaped as `pattern`."""
        return self._attention(layer, "attn_scores", head, queries)

    def _attention(self, layer, kind, head, queries) -> torch.Tensor:
        name = hook_name(kind, layer)
        if self.lazy is not None and layer in self.lazy.pieces:
            return self.lazy.compute(layer, kind, head, queries)
        if name not in self._tensors:
            q_name, k_name = lazy_piece_names(layer)
            raise KeyError(f"{name!r} is not in this cache and neither are its lazy pieces; capture {name} "
                           f"(patterns='stored' or 'lazy') or {q_name} and {k_name}")
        full = self._tensors[name]  # [b, h, p, k] (or [h, p, k] without the batch dim)
        full = full if full.dim() == 4 else full[None]
        start, stop = query_window(queries, full.shape[2])
        if head is not None and (isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < full.shape[1]):
            raise IndexError(f"head {head!r} is out of range; accepted: 0..{full.shape[1] - 1}")
        picked = full[:, :, start:stop] if head is None else full[:, head, start:stop]
        return picked if self._tensors[name].dim() == 4 else picked[0]

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} activations, model={self.model_name!r})"

    def to(self, device) -> "ActivationCache":
        return ActivationCache({n: t.to(device) for n, t in self._tensors.items()}, self.model,
                               self.tokens, self.model_name, None if self.lazy is None else self.lazy.to(device))

    def remove_batch_dim(self) -> "ActivationCache":
        """Drop a batch dimension of size 1 from every activation."""
        return ActivationCache({n: t[0] for n, t in self._tensors.items()}, self.model,
                               None if self.tokens is None else self.tokens[0], self.model_name,
                               None if self.lazy is None else self.lazy.without_batch())

    # ----- saving -----

    def save(self, path: str | Path) -> Path:
        """Write a safetensors file; tokens, model name and model shape go in its JSON metadata."""
        from safetensors.torch import save_file

        path = Path(path)
        meta = {"model_name": self.model_name, "model_signature": model_signature(self.model),
                "tokens": self.tokens.tolist() if self.tokens is not None else None}
        tensors = dict(self._tensors)
        if self.lazy is not None:  # the pieces and the mask recipe, not the patterns
            lazy_tensors, meta["lazy"] = self.lazy.to_tensors()
            tensors.update(lazy_tensors)
        seen = set()
        for n, t in tensors.items():  # one activation may be another's tensor (mlp_in is resid_mid)
            t = t.detach().contiguous().cpu()
            tensors[n] = t.clone() if t.data_ptr() in seen else t
            seen.add(t.data_ptr())
        save_file(tensors, str(path), metadata={"llamaviz": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | Path, model=None) -> "ActivationCache":
        """Read a cache saved by `save`; with `model`, refuse a cache captured from another model.

        A crafted file gets a ValueError naming what is wrong (metadata that is not the JSON object
        `save` writes, tokens that are not integer ids), never another exception type.
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no activation cache at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get("llamaviz", "{}")
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as err:
            raise ValueError(f"{path} is not a readable safetensors activation cache: {err}") from None
        meta = _cache_metadata(path, raw)
        if model is not None and meta.get("model_signature") != model_signature(model):
            raise ValueError(f"{path} was captured from model {meta.get('model_name')!r} "
                             f"({meta.get('model_signature')}), not from this model ({model_signature(model)})")
        tokens = _cache_tokens(path, meta.get("tokens"))
        lazy = None
        if meta.get("lazy") is not None:
            lazy = LazyPatterns.from_tensors({n: tensors.pop(n) for n in list(tensors) if n.startswith("lazy.")},
                                             meta["lazy"])
        return cls(tensors, model=model, tokens=tokens, model_name=meta.get("model_name", ""), lazy=lazy)

    # ----- analysis -----

    def logit_lens(self, top_k: int = 5, targets: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Each accumulated residual through the final norm and lm_head.

        Returns top_ids / top_probs [layers + 1, b, p, top_k] and, with `targets` [b, p] token ids,
        target_probs [layers + 1, b, p]. Computed one layer at a time so memory stays small.
        """
        model = self._require_model("logit_lens")
        norm, lm_head = model.model.norm, model.lm_head
        top_ids, top_probs, target_probs = [], [], []
        with torch.no_grad():
            for resid in self.accumulated_resid(layer=-1):
                probs = torch.softmax(lm_head(norm(resid.to(model.device, model.dtype))).float(), dim=-1)  # [b, p, v]
                values, ids = probs.topk(top_k, dim=-1)
                top_ids.append(ids)
                top_probs.append(values)
                if targets is not None:
                    target_probs.append(probs.gather(-1, targets.to(probs.device)[..., None])[..., 0])
        result = {"top_ids": torch.stack(top_ids), "top_probs": torch.stack(top_probs)}
        if targets is not None:
            result["target_probs"] = torch.stack(target_probs)
        return result

    def head_logit_attribution(self, token_id, position: int = -1) -> torch.Tensor:
        """Direct effect of every head on a token's logit (or a logit difference): [layers, heads].

        Each head's output (hook_z through its slice of o_proj) is scaled by the final norm frozen
        at this position and projected on lm_head's row for `token_id` (or row a - row b for a pair).
        """
        model = self._require_model("head_logit_attribution")
        layers, cfg = self._num_layers(), model.config
        direction = self._unembed_direction(model, token_id)  # [m]
        final = self[f"blocks.{layers - 1}.hook_resid_post"][:, position].float()  # [b, m]
        scale = torch.rsqrt(final.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)  # [b, 1]
        rows = []
        for i in range(layers):
            z = self[f"blocks.{i}.attn.hook_z"][:, position].float()  # [b, h, d]
            w_o = model.model.layers[i].self_attn.o_proj.weight.float().to(z.device)  # [m, h*d]
            w_o = w_o.view(cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim)  # [m, h, d]
            head_out = torch.einsum("bhd,mhd->bhm", z, w_o)  # [b, h, m]
            rows.append((head_out * scale[:, None].to(z.device)) @ direction.to(z.device))  # [b, h]
        return torch.stack(rows, dim=1)  # [b, layers, h]

    @staticmethod
    def _unembed_direction(model, token_id) -> torch.Tensor:
        weight = model.lm_head.weight.float()
        norm_weight = model.model.norm.weight.float()
        if isinstance(token_id, (tuple, list)):
            row = weight[token_id[0]] - weight[token_id[1]]
        else:
            row = weight[token_id]
        return (row * norm_weight).detach()

    def _num_layers(self) -> int:
        if self.model is not None:
            return self.model.config.num_hidden_layers
        layers = {layer_of(n) for n in self} - {None}
        if not layers:
            raise ValueError("this cache holds no per-layer activations")
        return max(layers) + 1

    def _require_model(self, what: str):
        if self.model is None:
            raise ValueError(f"{what} needs the model: ActivationCache.load(path, model=model)")
        return self.model


def _cache_metadata(path: Path, raw) -> dict:
    """The "llamaviz" metadata entry of a saved cache: a JSON object of strings and token ids."""
    try:
        meta = json.loads(raw)
    except (ValueError, TypeError, RecursionError) as err:
        raise ValueError(f"{path}: its 'llamaviz' metadata is not JSON ({type(err).__name__}: {err})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: its 'llamaviz' metadata must be a JSON object; got {type(meta).__name__}")
    for key in ("model_name", "model_signature"):
        if not isinstance(meta.get(key, ""), str):
            raise ValueError(f"{path}: metadata {key!r} must be a string; got {meta[key]!r}")
    return meta


def _cache_tokens(path: Path, tokens) -> torch.Tensor | None:
    """Saved token ids -> a long tensor [b, p] or [p]; ValueError for anything but lists of int64 ids."""
    if tokens is None:
        return None
    rows = tokens if isinstance(tokens, list) and tokens and isinstance(tokens[0], list) else [tokens]
    ok = isinstance(tokens, list) and all(
        isinstance(row, list) and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**63 for i in row)
        for row in rows) and len({len(row) for row in rows}) <= 1
    if not ok:
        raise ValueError(f"{path}: metadata 'tokens' must be a list of token ids (ints 0..2**63-1) or a list of "
                         "equal-length lists of them")
    return torch.tensor(tokens, dtype=torch.long)


def model_signature(model) -> str:
    """A short description of a model's shape, stored with saved caches to catch mismatches."""
    if model is None:
        return ""
    c = model.config
    return (f"llama L{c.num_hidden_layers} m{c.hidden_size} h{c.num_attention_heads} g{c.num_key_value_heads} "
            f"d{c.head_dim} f{c.intermediate_size} v{c.vocab_size} {getattr(model, 'name_or_path', '')}")
