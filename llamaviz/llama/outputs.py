"""Output objects shaped like transformers': attributes, `out["logits"]`, and `out[0]` over set fields."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

RETURN_TYPES = ("logits", "loss", "both", None)
HF_OUTPUT = "output"  # forward's default return_type: transformers' CausalLMOutput


class ModelOutput:
    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]


@dataclass
class BaseModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor  # [b, p, m] after the final norm
    past_key_values: object | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None  # layers + 1 of [b, p, m]
    attentions: tuple[torch.Tensor, ...] | None = None  # layers of [b, h, p, k]


@dataclass
class CausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # [b, p, v]
    past_key_values: object | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class SequenceClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # [b, num_labels] (sequence) or [b, p, num_labels] (token)
    past_key_values: object | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class QuestionAnsweringOutput(ModelOutput):
    loss: torch.Tensor | None = None
    start_logits: torch.Tensor | None = None  # [b, p]
    end_logits: torch.Tensor | None = None  # [b, p]
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def check_return_type(return_type):
    if return_type != HF_OUTPUT and return_type not in RETURN_TYPES:
        raise ValueError(f"return_type {return_type!r} is not supported; accepted: "
                         f"{', '.join(repr(r) for r in RETURN_TYPES)} (or leave it out for a CausalLMOutput)")
    return return_type


def tl_output(logits, return_type, tokens, attention_mask, loss_per_token):
    """What a TransformerLens forward returns for `return_type`."""
    if return_type == "logits":
        return logits
    if return_type is None:
        return None
    if tokens is None:
        raise ValueError(f"return_type={return_type!r} with start_at_layer needs tokens= for the loss")
    loss = next_token_loss(logits, tokens, attention_mask, loss_per_token)
    return loss if return_type == "loss" else (logits, loss)


def next_token_loss(logits, tokens, attention_mask=None, per_token: bool = False) -> torch.Tensor:
    """TransformerLens' loss: -log p(tokens[i + 1]) at each position i; [b, p - 1] per token, else the mean."""
    if tokens.shape[1] < 2:
        raise ValueError("the next-token loss needs at least two tokens")
    log_probs = logits[:, :-1].float().log_softmax(dim=-1)
    losses = -log_probs.gather(-1, tokens[:, 1:, None].to(logits.device))[..., 0]  # [b, p - 1]
    if per_token:
        return losses
    if attention_mask is None:
        return losses.mean()
    counted = attention_mask[:, 1:].to(losses.device, losses.dtype)  # a target that is padding is not counted
    return (losses * counted).sum() / counted.sum()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: position i predicts labels[i + 1]; -100 is ignored."""
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]  # [b, p]
    return F.cross_entropy(logits.float().flatten(0, 1), shifted.flatten().to(logits.device), ignore_index=-100)
