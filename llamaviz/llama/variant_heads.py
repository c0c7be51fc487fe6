"""Task heads of the Llama family: Mistral, Qwen2 and Qwen3 under transformers' class names.

Each is the Llama head (llama.heads) over its family's decoder (llama.variants), with transformers'
module names, so the family's classification and QA checkpoints load without renaming: Qwen2 and
Qwen3 keep their QA base model under `transformer`, Mistral under `model`.
"""

from __future__ import annotations

from llamaviz.llama.config import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config
from llamaviz.llama.heads import (LlamaForQuestionAnswering, LlamaForSequenceClassification, LlamaForTokenClassification,
                    LlamaHeadModel)
from llamaviz.llama.variants import MistralModel, Qwen2Model, Qwen3Model, check_family_config


class _FamilyHead(LlamaHeadModel):
    """Checks that the config is of the family's config class before building the head."""

    def __init__(self, config: LlamaConfig, attn_implementation: str = "sdpa"):
        check_family_config(self, config)
        super().__init__(config, attn_implementation)


class MistralForSequenceClassification(_FamilyHead, LlamaForSequenceClassification):
    config_class, base_model_class = MistralConfig, MistralModel


class MistralForTokenClassification(_FamilyHead, LlamaForTokenClassification):
    config_class, base_model_class = MistralConfig, MistralModel


class MistralForQuestionAnswering(_FamilyHead, LlamaForQuestionAnswering):
    config_class, base_model_class = MistralConfig, MistralModel
    base_model_prefix = "model"  # where transformers' Mistral QA keeps its decoder


class Qwen2ForSequenceClassification(_FamilyHead, LlamaForSequenceClassification):
    config_class, base_model_class = Qwen2Config, Qwen2Model


class Qwen2ForTokenClassification(_FamilyHead, LlamaForTokenClassification):
    config_class, base_model_class = Qwen2Config, Qwen2Model


class Qwen2ForQuestionAnswering(_FamilyHead, LlamaForQuestionAnswering):
    config_class, base_model_class = Qwen2Config, Qwen2Model


class Qwen3ForSequenceClassification(_FamilyHead, LlamaForSequenceClassification):
    config_class, base_model_class = Qwen3Config, Qwen3Model


class Qwen3ForTokenClassification(_FamilyHead, LlamaForTokenClassification):
    config_class, base_model_class = Qwen3Config, Qwen3Model


class Qwen3ForQuestionAnswering(_FamilyHead, LlamaForQuestionAnswering):
    config_class, base_model_class = Qwen3Config, Qwen3Model


HEADS = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")
__all__ = [f"{family}{head}" for family in ("Mistral", "Qwen2", "Qwen3") for head in HEADS]
