"""Task heads on LlamaModel: sequence classification, token classification, question answering.

Attribute names and state-dict keys are transformers' (`model.*` + `score`, `transformer.*` +
`qa_outputs` for question answering), so their checkpoints load unchanged. Every head shares the
causal model's hook points, plus `hook_logits` on the head's per-position output.
Shapes: b batch, p positions, m hidden_size, n num_labels.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from llamaviz.llama.config import LlamaConfig
from llamaviz.llama.hook_points import HookPoint
from llamaviz.llama.modeling import LlamaModel, LlamaPreTrainedModel
from llamaviz.llama.outputs import BaseModelOutput, QuestionAnsweringOutput, SequenceClassifierOutput

PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


class LlamaHeadModel(LlamaPreTrainedModel):
    """LlamaModel under `base_model_prefix` + one linear head whose output passes `hook_logits`."""

    base_model_prefix = "model"
    base_model_class: type[LlamaModel] = LlamaModel  # a family's head (llama.variant_heads) swaps in its own

    def __init__(self, config: LlamaConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        self.config = config
        setattr(self, self.base_model_prefix, self.base_model_class(config, attn_implementation))
        self.hook_logits = HookPoint()  # [b, p, n] the head's output at every position

    @property
    def base_model(self) -> LlamaModel:
        return getattr(self, self.base_model_prefix)

    def _finish_init(self, head: nn.Linear) -> None:
        self._init_weights(head)
        self.setup_hooks()

    def _hook_names(self) -> dict[str, HookPoint]:
        return {**self.base_model._hook_names(), "hook_logits": self.hook_logits}

    def _run_base(self, input_ids, attention_mask, position_ids, past_key_values, use_cache, output_attentions,
                  output_hidden_states, inputs_embeds) -> BaseModelOutput:
        return self.base_model(input_ids, attention_mask, position_ids, past_key_values, use_cache,
                               output_attentions, output_hidden_states, inputs_embeds)


class LlamaForSequenceClassification(LlamaHeadModel):
    """One label distribution (or value) per sequence, read at its last non-padding token."""

    def __init__(self, config: LlamaConfig, attn_implementation: str = "sdpa"):
        super().__init__(config, attn_implementation)
        self.num_labels = config.num_labels
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self._finish_init(self.score)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, output_attentions=False, output_hidden_states=False, inputs_embeds=None,
                labels=None, **unused) -> SequenceClassifierOutput:
        out = self._run_base(input_ids, attention_mask, position_ids, past_key_values, use_cache,
                             output_attentions, output_hidden_states, inputs_embeds)
        logits = self.hook_logits(self.score(out.last_hidden_state))  # [b, p, n]
        last = last_non_pad_index(input_ids, self.config.pad_token_id, logits.shape[0], logits.device)  # [b] or -1
        pooled = logits[torch.arange(logits.shape[0], device=logits.device), last]  # [b, n]
        loss = sequence_classification_loss(pooled, labels, self.config) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=pooled, past_key_values=out.past_key_values,
                                        hidden_states=out.hidden_states, attentions=out.attentions)


class LlamaForTokenClassification(LlamaHeadModel):
    """Label logits at every position (tagging), with dropout before the head as in transformers."""

    def __init__(self, config: LlamaConfig, attn_implementation: str = "sdpa"):
        super().__init__(config, attn_implementation)
        self.num_labels = config.num_labels
        self.dropout = nn.Dropout(classifier_dropout(config))
        bias = config.extra.get("token_classification_bias", True)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=bias)
        self._finish_init(self.score)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, output_attentions=False, output_hidden_states=False, inputs_embeds=None,
                labels=None, **unused) -> SequenceClassifierOutput:
        out = self._run_base(input_ids, attention_mask, position_ids, past_key_values, use_cache,
                             output_attentions, output_hidden_states, inputs_embeds)
        logits = self.hook_logits(self.score(self.dropout(out.last_hidden_state)))  # [b, p, n]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, self.num_labels), labels.reshape(-1).to(logits.device),
                                   ignore_index=-100)
        return SequenceClassifierOutput(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                        hidden_states=out.hidden_states, attentions=out.attentions)


class LlamaForQuestionAnswering(LlamaHeadModel):
    """Extractive QA: a start and an end logit per position; the base model sits at `transformer`."""

    base_model_prefix = "transformer"  # transformers keeps this name for Llama QA checkpoints

    def __init__(self, config: LlamaConfig, attn_implementation: str = "sdpa"):
        super().__init__(config, attn_implementation)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self._finish_init(self.qa_outputs)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, output_attentions=False, output_hidden_states=False, inputs_embeds=None,
                start_positions=None, end_positions=None, **unused) -> QuestionAnsweringOutput:
        out = self._run_base(input_ids, attention_mask, position_ids, past_key_values, use_cache,
                             output_attentions, output_hidden_states, inputs_embeds)
        logits = self.hook_logits(self.qa_outputs(out.last_hidden_state))  # [b, p, 2]
        start_logits, end_logits = (part.squeeze(-1).contiguous() for part in logits.split(1, dim=-1))  # [b, p]
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = span_loss(start_logits, end_logits, start_positions, end_positions)
        return QuestionAnsweringOutput(loss=loss, start_logits=start_logits, end_logits=end_logits,
                                       hidden_states=out.hidden_states, attentions=out.attentions)


def last_non_pad_index(input_ids, pad_token_id, batch: int, device) -> torch.Tensor | int:
    """Index of each row's rightmost token that is not pad_token_id ([b]); -1 without ids or a pad id.

    transformers' rule: it works for left and right padding alike and ignores attention_mask; with
    no pad id only a batch of one is accepted, and with inputs_embeds the last position is used.
    """
    if pad_token_id is None:
        if batch != 1:
            raise ValueError(f"a batch of {batch} sequences needs config.pad_token_id to find each sequence's "
                             "last token; set it, or classify one sequence at a time")
        return -1
    if input_ids is None:
        warnings.warn("sequence classification from inputs_embeds cannot see padding; using the last position")
        return -1
    is_token = (input_ids != pad_token_id).to(device, torch.int32)  # [b, p]
    positions = torch.arange(input_ids.shape[-1], device=device, dtype=torch.int32)  # [p]
    return (positions * is_token).argmax(-1)  # [b]


def infer_problem_type(config: LlamaConfig, labels: torch.Tensor) -> str:
    """config.problem_type, or transformers' guess: 1 label = regression, integer labels = single label."""
    if config.problem_type is not None:
        if config.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"config.problem_type {config.problem_type!r} is not supported; "
                             f"accepted: {', '.join(PROBLEM_TYPES)} or None (inferred from the labels)")
        return config.problem_type
    if config.num_labels == 1:
        return "regression"
    if labels.dtype in (torch.long, torch.int):
        return "single_label_classification"
    return "multi_label_classification"


def sequence_classification_loss(pooled: torch.Tensor, labels: torch.Tensor, config: LlamaConfig) -> torch.Tensor:
    """MSE (regression), cross-entropy (one label per sequence) or BCE (several), on pooled [b, n]."""
    problem_type = infer_problem_type(config, labels)
    labels = labels.to(pooled.device)
    pooled = pooled.float()
    if problem_type == "regression":
        if config.num_labels == 1:
            return F.mse_loss(pooled.squeeze(), labels.squeeze().float())
        return F.mse_loss(pooled, labels.float())
    if problem_type == "single_label_classification":
        return F.cross_entropy(pooled.view(-1, config.num_labels), labels.view(-1), ignore_index=-100)
    return F.binary_cross_entropy_with_logits(pooled, labels.float())


def span_loss(start_logits, end_logits, start_positions, end_positions) -> torch.Tensor:
    """Mean of start and end cross-entropies; positions outside the sequence are clamped and ignored."""
    length = start_logits.shape[1]
    losses = []
    for logits, positions in ((start_logits, start_positions), (end_logits, end_positions)):
        positions = positions.reshape(-1).to(logits.device).clamp(0, length)  # [b]
        losses.append(F.cross_entropy(logits.float(), positions, ignore_index=length))
    return (losses[0] + losses[1]) / 2


def classifier_dropout(config: LlamaConfig) -> float:
    """Dropout before the token-classification head: config's classifier_dropout, hidden_dropout, else 0.1."""
    for key in ("classifier_dropout", "hidden_dropout"):
        if config.extra.get(key) is not None:
            return float(config.extra[key])
    return 0.1
