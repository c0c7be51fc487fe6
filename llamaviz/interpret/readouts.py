"""The numbers behind the figures, for the notebook helpers and the web app alike (one code path each).

Tables of a run's activations: the logit lens, each token's log-probability, residual norms and
their row labels; and the direct logit attribution of one predicted token (embedding, each layer's
attention and MLP, each head, the accumulated residual), composed from ActivationCache's
decompose_resid / stack_head_results / accumulated_resid / logit_attrs. Token ids come back as ids:
the caller turns them into strings its own way.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOGIT_CHUNK = 64  # positions per unembedding matmul in final_logits
# What the direct logit attribution and the information flow read from a cache.
EXPLAIN_SUFFIXES = ("hook_embed", "hook_attn_out", "hook_mlp_out", "hook_resid_pre", "hook_resid_post",
                    "attn.hook_z", "attn.hook_v", "attn.hook_pattern", "ln_final.hook_scale")


def explain_filter(name: str) -> bool:
    """names_filter of a run_with_cache that direct_logit_attribution and llamaviz.interpret.flow can use."""
    return name.endswith(EXPLAIN_SUFFIXES)


def lens_labels(layers: int) -> list[str]:
    """Rows of the accumulated residual stream [layers+1]: "embed" (before layer 0), then "L0".."L{n-1}"."""
    return ["embed"] + [f"L{i}" for i in range(layers)]


def norm_labels(layers: int) -> list[str]:
    """Rows of the residual norms [layers+1]: "embed", then "after L0".."after L{n-1}"."""
    return ["embed"] + [f"after L{i}" for i in range(layers)]


def resid_names(layers: int) -> list[str]:
    """The hook points accumulated_resid stacks: every resid_pre and the last resid_post."""
    return [f"blocks.{i}.hook_resid_pre" for i in range(layers)] + [f"blocks.{layers - 1}.hook_resid_post"]


# ---------------------------------------------------------------- tables of a run


def readout(model, resid: torch.Tensor) -> torch.Tensor:
    """Final norm + lm_head on residual streams [..., m] -> float32 logits [..., v], without the norm's hook point.

    The same arithmetic as LlamaRMSNorm then lm_head; only weights are read, so it runs while another
    request's hooks sit on the shared model (lm_head has no hook point) and needs no lock.
    """
    norm = model.model.norm
    x = resid.to(model.device, model.dtype)
    normalized = F.rms_norm(x.float(), x.shape[-1:], eps=norm.eps).to(x.dtype)  # [..., m]
    return model.lm_head(norm.weight * normalized).float()  # [..., v]


def logit_lens_table(cache) -> tuple[torch.Tensor, torch.Tensor]:
    """The logit lens's top token of the first batch row: (its probability [layers+1, p], its id [layers+1, p]).

    cache.logit_lens(top_k=1)'s numbers, one layer at a time through `readout` (no hook point, no lock).
    """
    model = cache.model
    probs, ids = [], []
    with torch.no_grad():
        for name in resid_names(model.config.num_hidden_layers):
            top = readout(model, cache[name][0]).softmax(dim=-1).max(dim=-1)  # [p] each
            probs.append(top.values.cpu())
            ids.append(top.indices.cpu())
    return torch.stack(probs), torch.stack(ids)


def resid_norms(cache) -> torch.Tensor:
    """L2 norm of the accumulated residual stream [layers+1, p] (first batch row)."""
    return cache.accumulated_resid()[:, 0].float().norm(dim=-1).cpu()


@dataclass
class TokenLogprobs:
    """Log-prob of each token given the ones before it [p] (NaN for the first) and the top predictions there."""

    chosen: torch.Tensor  # [p] nats
    top_probs: torch.Tensor  # [p - 1, k] the top-k next-token probabilities at positions 0..p-2
    top_ids: torch.Tensor  # [p - 1, k]


def token_logprobs(logit_chunks: Iterator[torch.Tensor], ids: torch.Tensor, top_k: int = 5) -> TokenLogprobs:
    """From the next-token logits of positions 0..p-2 (chunks of [c, v], in order) and the ids [p]."""
    targets = ids.reshape(-1).cpu()  # [p]
    chosen, top_probs, top_ids, begin = [], [], [], 0
    for logits in logit_chunks:
        logprobs = torch.log_softmax(logits.float().cpu(), dim=-1)  # [c, v]
        picked = targets[1 + begin:1 + begin + logprobs.shape[0]]  # [c]: the token each position predicts
        chosen.append(logprobs.gather(-1, picked[:, None])[:, 0])
        values, indices = logprobs.topk(top_k, dim=-1)  # [c, k]
        top_probs.append(values.exp())
        top_ids.append(indices)
        begin += logprobs.shape[0]
    if begin != targets.numel() - 1:
        raise ValueError(f"token_logprobs got logits of {begin} positions for {targets.numel()} tokens; "
                         "it needs the logits of every position but the last")
    empty = torch.zeros(0, top_k)
    return TokenLogprobs(torch.cat([torch.tensor([float("nan")]), *chosen]),
                         torch.cat(top_probs) if top_probs else empty,
                         torch.cat(top_ids) if top_ids else empty.long())


@torch.no_grad()
def final_logits(model, final_resid: torch.Tensor, chunk: int = LOGIT_CHUNK) -> Iterator[torch.Tensor]:
    """Logits [c, v] of the final residual stream [p, m], `chunk` positions at a time (no [p, v] tensor kept)."""
    for begin in range(0, final_resid.shape[0], chunk):
        with torch.no_grad():
            yield readout(model, final_resid[begin:begin + chunk])


# ---------------------------------------------------------------- direct logit attribution


@dataclass
class LogitAttribution:
    """What each piece of the residual stream at `position` adds to the logit of `token` (minus `foil`'s).

    Units: logits, after the final norm's frozen scale, so the components sum to the model's logit
    (difference) there, as TransformerLens' logit_attrs.
    """

    position: int
    token: int
    foil: int | None
    labels: list[str]  # [c] "embed", "L0 attn", "L0 mlp", ...
    components: torch.Tensor  # [c]
    heads: torch.Tensor  # [L, h] each head's direct effect
    accumulated: torch.Tensor  # [L + 1] the accumulated residual's logit (difference) before each layer and at the end
    accumulated_labels: list[str]  # [L + 1] lens_labels: "embed", then after each layer

    @property
    def total(self) -> float:
        """The logit (difference) the model computed at `position` (the sum of the components)."""
        return float(self.accumulated[-1])


def direct_logit_attribution(cache, position: int, token: int, foil: int | None = None,
                             batch: int = 0) -> LogitAttribution:
    """The direct logit attribution of `token` (an id) at `position` of a cache captured with explain_filter."""
    p = cache["hook_embed"].shape[1]
    if isinstance(position, bool) or not isinstance(position, int) or not -p <= position < p:
        raise ValueError(f"position {position!r} is out of range for {p} cached positions; accepted: {-p}..{p - 1}")
    position = position % p
    row = cache.apply_slice_to_batch_dim([batch])
    layers = cache.model.config.num_hidden_layers

    def attrs(stack: torch.Tensor) -> torch.Tensor:  # [c, 1, m] -> [c]
        return row.logit_attrs(stack, token, foil, pos_slice=position)[:, 0].float().cpu()

    parts, names = row.decompose_resid(pos_slice=position, return_labels=True)  # [c, 1, m]
    heads = attrs(row.stack_head_results(pos_slice=position))  # [L * h]
    accumulated = attrs(row.accumulated_resid(pos_slice=position))  # [L + 1]
    return LogitAttribution(position, int(token), None if foil is None else int(foil),
                            [_component_label(n) for n in names], attrs(parts),
                            heads.view(layers, -1), accumulated, lens_labels(layers))


def _component_label(name: str) -> str:
    """decompose_resid's "3_attn_out" as "L3 attn"; "embed" stays."""
    if name == "embed":
        return name
    layer, kind = name.split("_", 1)
    return f"L{layer} {kind.removesuffix('_out')}"


def lens_logit_diff(cache, token: int, foil: int | None = None) -> torch.Tensor:
    """The accumulated residual's logit of `token` (minus `foil`'s) at every layer and position [L+1, p].

    The logit lens of one logit (difference) through the final norm's frozen scale, as logit_attrs.
    """
    return cache.logit_attrs(cache.accumulated_resid(), token, foil)[:, 0].float().cpu()
