"""Output objects shaped like transformers': attributes, `out["logits"]`, and `out[0]` over set fields."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


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
