"""pipeline("text-generation", ...): transformers' one-call text generation over llamaviz models.

Outputs follow transformers: one prompt gives [{"generated_text": ...}], a list of prompts a list
of such lists; a chat (a list of {"role", "content"} dicts) goes through the chat template and comes
back as the conversation with the new assistant message appended.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from llamaviz.run.generation import generate

SUPPORTED_TASKS = ("text-generation",)


def pipeline(task: str, model=None, tokenizer=None, dtype=None, device=None, torch_dtype=None, **model_kwargs):
    """A callable TextGenerationPipeline; `model` is a path (None = the default model) or a loaded model.

    dtype (alias torch_dtype): a torch dtype, its name, or "auto" (the checkpoint's own).
    device: 0 / "cuda:N" / "cpu" / "cuda" / "mps" / "auto". model_kwargs go to from_pretrained
    (e.g. quantization="int4").
    """
    if task not in SUPPORTED_TASKS:
        raise ValueError(f"unknown pipeline task {task!r}; supported tasks: {', '.join(SUPPORTED_TASKS)}")
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass one of them "
                         "(torch_dtype is the older name of dtype)")
    dtype = dtype if dtype is not None else torch_dtype
    model = _load_model(model, dtype, device, model_kwargs)
    return TextGenerationPipeline(model, _load_tokenizer(tokenizer, model))


def _load_model(model, dtype, device, model_kwargs: dict):
    from llamaviz.checkpoints import resolve_device, resolve_dtype
    from llamaviz.checkpoints.paths import model_path
    from llamaviz.llama.modeling import LlamaForCausalLM

    if model is None or isinstance(model, (str, Path)):
        return LlamaForCausalLM.from_pretrained(model_path(model), dtype=dtype, device=device, **model_kwargs)
    if not hasattr(model, "generate"):
        raise ValueError(f"model must be a checkpoint path, None (the default model) or a LlamaForCausalLM; "
                         f"got {type(model).__name__}")
    if model_kwargs:
        raise ValueError(f"{', '.join(model_kwargs)}: loading options, but the model is already loaded")
    if dtype is not None and dtype != "auto":
        model = model.to(resolve_dtype(dtype))
    return model.to(resolve_device(device)) if device is not None else model


def _load_tokenizer(tokenizer, model):
    from llamaviz.tokenizers import AutoTokenizer

    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer
    source = tokenizer or getattr(model, "name_or_path", "")
    if not source:
        raise ValueError("pipeline cannot tell where this model's tokenizer is: pass tokenizer= "
                         "(a tokenizer or the path of its checkpoint)")
    return AutoTokenizer.from_pretrained(source)


def is_chat(value) -> bool:
    """A conversation: a non-empty list of dicts with "role" and "content", as transformers checks."""
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in value))


class TextGenerationPipeline:
    """Continue prompts or chats with model.generate; decoding and output shapes as in transformers."""

    task = "text-generation"

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self._generate_options = set(inspect.signature(generate).parameters) - {"model", "input_ids",
                                                                                "attention_mask", "unused"}

    @property
    def device(self) -> torch.device:
        return self.model.device

    def __call__(self, text_inputs, return_full_text: bool = True, continue_final_message: bool | None = None,
                 skip_special_tokens: bool = True, num_return_sequences: int = 1, **generate_kwargs):
        """[{"generated_text": ...}] per prompt; a list of prompts or chats gives a list of those lists."""
        self._check_options(generate_kwargs, num_return_sequences)
        options = dict(return_full_text=return_full_text, continue_final_message=continue_final_message,
                       skip_special_tokens=skip_special_tokens, num_return_sequences=num_return_sequences)
        if isinstance(text_inputs, str) or is_chat(text_inputs):
            return self._complete(text_inputs, options, generate_kwargs)
        if isinstance(text_inputs, (list, tuple)) and text_inputs and all(
                isinstance(item, str) or is_chat(item) for item in text_inputs):
            return [self._complete(item, options, generate_kwargs) for item in text_inputs]
        raise ValueError("text-generation takes a prompt string, a chat (a list of {'role': ..., 'content': ...} "
                         f"dicts), or a non-empty list of those; got {_describe(text_inputs)}")

    def _check_options(self, generate_kwargs: dict, num_return_sequences) -> None:
        unknown = sorted(set(generate_kwargs) - self._generate_options - {"max_length"})
        if unknown:
            raise ValueError(f"unknown generation option(s) {', '.join(unknown)}; accepted: "
                             f"{', '.join(sorted(self._generate_options | {'max_length'}))}")
        if not isinstance(num_return_sequences, int) or num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be an integer >= 1, got {num_return_sequences!r}")

    def _complete(self, prompt, options: dict, generate_kwargs: dict) -> list[dict]:
        """Records for one prompt string or one chat."""
        final = _continues_final(prompt, options["continue_final_message"])
        input_ids = self._encode(prompt, final)  # [1, p]
        length = input_ids.shape[1]
        kwargs = dict(generate_kwargs)
        if "max_length" in kwargs:  # transformers' total-length spelling
            kwargs.setdefault("max_new_tokens", max(1, kwargs["max_length"] - length))
            del kwargs["max_length"]
        batch = input_ids.repeat(options["num_return_sequences"], 1)  # [n, p]
        sequences = self.model.generate(batch, attention_mask=torch.ones_like(batch), **kwargs)
        texts = [self.tokenizer.decode(row[length:].tolist(), skip_special_tokens=options["skip_special_tokens"])
                 for row in sequences]
        return [{"generated_text": _with_prompt(prompt, text, final) if options["return_full_text"] else text}
                for text in texts]

    def _encode(self, prompt, continue_final: bool) -> torch.Tensor:
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt)["input_ids"]
        else:
            ids = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=not continue_final,
                                                     continue_final_message=continue_final, return_dict=False)
        if not ids:
            raise ValueError(f"the prompt {prompt!r} encodes to no tokens; give some text to continue")
        return torch.tensor([ids])


def _continues_final(prompt, continue_final_message: bool | None) -> bool:
    """Whether a chat's last message is continued (default: when it is the assistant's, a prefill)."""
    if isinstance(prompt, str):
        return False
    return continue_final_message if continue_final_message is not None else prompt[-1]["role"] == "assistant"


def _with_prompt(prompt, text: str, continue_final: bool):
    """The full output: prompt + text, or the chat with the new (or continued) assistant message."""
    if isinstance(prompt, str):
        return prompt + text
    messages = list(prompt)
    if continue_final:
        return messages[:-1] + [{**messages[-1], "content": messages[-1]["content"] + text}]
    return messages + [{"role": "assistant", "content": text}]


def _describe(value) -> str:
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)} item(s)" + (
            f", the first a {type(value[0]).__name__}" if value else "")
    return f"a {type(value).__name__}"
