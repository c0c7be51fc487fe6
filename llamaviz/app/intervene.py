"""Head ablation on the current tokens: one forward with and one without hooks on hook_z.

The hooks come from llamaviz.interpret.interventions.ablate_heads and attach to the shared model, so both
forwards run under the model's lock.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pandas as pd
import torch

from llamaviz.interpret.interventions import ablate_heads
from llamaviz.plots.tokens import display_token

from llamaviz.app.state import Run

TOP = 10
_PAIR = re.compile(r"L?\s*(\d+)\s*(?:[.:/]|H)\s*(\d+)", re.IGNORECASE)  # "3.1", "L3H1", "3:1"


def parse_heads(text: str, ticked: list[str] | None = None) -> list[tuple[int, int]]:
    """Heads from "3.1, 5.7" / "L3H1 L5H7" and ticked "L{l}H{h}" boxes -> sorted unique (layer, head)."""
    text = " ".join([*(ticked or []), text or ""])
    leftover = re.sub(r"[\s,;]+", " ", _PAIR.sub(" ", text)).strip()
    if leftover:
        raise ValueError(f"cannot read {leftover!r} as heads: write layer.head pairs such as '3.1, 5.7' "
                         "or 'L3H1 L5H7'")
    heads = sorted({(int(layer), int(head)) for layer, head in _PAIR.findall(text)})
    if not heads:
        raise ValueError("no heads to ablate: tick heads of the current layer or type pairs such as '3.1, 5.7'")
    return heads


def target_token(run: Run, text: str, fallback: int) -> int:
    """Token id of the tracked token: '#1234' is an id, other text its first token, empty the fallback."""
    text = text or ""
    if not text.strip():
        return fallback
    vocab = run.entry.config.vocab_size
    if re.fullmatch(r"#\d+", text.strip()):
        token = int(text.strip()[1:])
        if not 0 <= token < vocab:
            raise ValueError(f"token id {token} is out of range: the vocabulary has ids 0..{vocab - 1}")
        return token
    ids = run.entry.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"{text!r} encodes to no token")
    return int(ids[0])


@dataclass
class Ablation:
    """Next-token logits [v] after the run's tokens, without and with the ablation."""

    heads: list[tuple[int, int]]
    mode: str
    clean: torch.Tensor
    ablated: torch.Tensor


def run_ablation(run: Run, heads: list[tuple[int, int]], mode: str) -> Ablation:
    model = run.entry.model
    hooks = ablate_heads(heads, mode=mode, model=model, mean_cache=mean_z_cache(run))
    ids = run.ids.to(model.device)  # [1, T]
    with run.entry.lock, torch.no_grad():
        clean = model(ids, logits_to_keep=1).logits[0, -1].float().cpu()  # [v]
        with model.hooks(fwd_hooks=hooks):
            ablated = model(ids, logits_to_keep=1).logits[0, -1].float().cpu()  # [v]
    return Ablation(heads, mode, clean, ablated)


def top_table(ablation: Ablation, tokenizer) -> pd.DataFrame:
    """Top-10 next tokens before and after, side by side."""
    before = ablation.clean.softmax(-1).topk(TOP)
    after = ablation.ablated.softmax(-1).topk(TOP)
    pieces_before = tokenizer.convert_ids_to_tokens(before.indices.tolist())
    pieces_after = tokenizer.convert_ids_to_tokens(after.indices.tolist())
    return pd.DataFrame({
        "rank": range(1, TOP + 1),
        "before": [display_token(t) for t in pieces_before], "p before": [round(p, 5) for p in before.values.tolist()],
        "after": [display_token(t) for t in pieces_after], "p after": [round(p, 5) for p in after.values.tolist()],
    })


def token_change(ablation: Ablation, token: int, tokenizer) -> dict:
    """Logit, log-prob and probability of `token` before and after, and their differences."""
    clean_lp, ablated_lp = ablation.clean.log_softmax(-1), ablation.ablated.log_softmax(-1)
    kl = (clean_lp.exp() * (clean_lp - ablated_lp)).sum().item()
    return {
        "token": display_token(tokenizer.convert_ids_to_tokens([token])[0]), "id": token,
        "logit before": ablation.clean[token].item(), "logit after": ablation.ablated[token].item(),
        "logit difference": (ablation.ablated[token] - ablation.clean[token]).item(),
        "p before": clean_lp[token].exp().item(), "p after": ablated_lp[token].exp().item(),
        "kl": kl,
    }


def heads_of_layer(config, layer: int) -> list[str]:
    """Checkbox labels "L{layer}H{h}" for every head of a layer."""
    return [f"L{layer}H{h}" for h in range(config.num_attention_heads)]


def mean_z_cache(run):
    """hook_z means [1, 1, h, d] per layer, from the run's statistics (or its cache if it kept hook_z)."""
    from llamaviz.llama.activation_cache import ActivationCache

    run.activations()  # a released run has neither
    if run.stats is None:
        return run.activations()
    layers = run.entry.config.num_hidden_layers
    return ActivationCache({f"blocks.{i}.attn.hook_z": run.stats.z_mean(i)[None, None] for i in range(layers)})
