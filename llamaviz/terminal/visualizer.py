"""AttentionMaskVisualizer: a prompt -> the model's attention mask (or weights) printed in the terminal.

The mask needs only the config and the tokenizer, so no weights are read until the weights view
(layer=, head=) asks for them. Masks come from llamaviz.llama.masks.build_mask, the model's own builder.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple

import torch

from llamaviz.llama.masks import build_mask

from llamaviz.terminal.render import render_mask, render_weights

PAD_LABEL = "<pad>"  # row label of padding positions, whatever the pad token is


class Encoded(NamedTuple):
    input_ids: torch.Tensor  # long [b, n], left-padded
    attention_mask: torch.Tensor  # long [b, n], 0 at padding
    tokens: list[list[str]]  # b lists of n row labels (padding shown as PAD_LABEL)


class AttentionMaskVisualizer:
    """Print which keys each token may attend to, as transformers' AttentionMaskVisualizer does, and more:
    batches with left padding, sliding windows, a KV-cache decode step, and real attention weights.

    path_or_model: an HF checkpoint folder, a .gguf file, a folder holding one .gguf, None (the default
    model), or a loaded LlamaForCausalLM (then pass tokenizer= unless config.name_or_path is its folder).
    """

    def __init__(self, path_or_model=None, tokenizer=None, dtype=None, device=None):
        self.dtype, self.device = dtype, device  # used when the weights view loads the model
        if isinstance(path_or_model, torch.nn.Module):
            self._model = path_or_model
            self.config = path_or_model.config
            self.path = _existing_path(self.config.name_or_path)
            self.tokenizer = tokenizer if tokenizer is not None else _tokenizer_for_model(self.path)
        else:
            self._model = None
            self.path, self.config, tokenizer_path = _open(path_or_model)
            self.tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(tokenizer_path)
        self.name = Path(self.config.name_or_path or self.path or "model").name

    def __call__(self, text, file=None, **options) -> None:
        """Print render(text, **options) to `file` (stdout); color=None decides by that stream."""
        stream = sys.stdout if file is None else file
        print(self.render(text, stream=stream, **options), file=stream)

    # ----- what gets drawn -----

    def render(self, text, *, layer: int | None = None, head=None, past_length: int = 0, color=None,
               width: int | None = None, max_tokens: int | None = None, scale: str = "row", stream=None,
               raw_tokens: bool = False, rows: tuple[int, int] | None = None) -> str:
        """The printout as a string. text: a prompt or a list of prompts (a left-padded batch).
        layer= (and head=, an index or "mean", default "mean") switches to the weights view; past_length=N
        treats the first N tokens as already in the KV cache, so rows are only the tokens after them.
        Rows are labelled with each token's text as the app shows it (' John' as '␣John'); raw_tokens=True
        shows the vocabulary's pieces instead ('ĠJohn', '▁John'), as transformers' visualizer does.
        rows=(start, stop) shows only those query rows of a long prompt (and the keys up to stop - 1);
        the weights view then computes only those rows."""
        encoded = self.encode(text, raw_tokens=raw_tokens)
        if rows is not None:
            encoded, past_length = self._row_window(encoded, rows, past_length)
        options = dict(attention_mask=encoded.attention_mask, color=color, width=width, max_tokens=max_tokens,
                       stream=stream)
        if layer is None and head is None:
            panels = self._mask_panels(encoded, past_length)
            return render_mask(encoded.tokens, panels, title=f"Attention mask · {self.name}",
                               info=self._info("mask: " + ", ".join(panels)), **options)
        layer, head = self.check_layer_head(layer, head)
        mask = self.mask(encoded, past_length)  # [b, 1, p, n]
        weights = self.weights(encoded, layer, head, first_row=past_length)  # [b, p, n]
        heads = f"mean of {self.config.num_attention_heads} heads" if head == "mean" else f"head {head}"
        return render_weights(encoded.tokens, weights, mask, title=f"Attention weights · {self.name}",
                              info=self._info(f"layer {layer}, {heads}"), scale=scale, **options)

    def encode(self, text, raw_tokens: bool = False) -> Encoded:
        """Tokenize one prompt or a list of them, left-padding to the longest (as generation does)."""
        texts = _check_texts(text)
        ids = [self._token_ids(t) for t in texts]
        length = max(len(row) for row in ids)
        pad_id = self._pad_id()
        input_ids = torch.tensor([[pad_id] * (length - len(row)) + row for row in ids])  # [b, n]
        attention_mask = torch.tensor([[0] * (length - len(row)) + [1] * len(row) for row in ids])  # [b, n]
        tokens = [[PAD_LABEL] * (length - len(row)) + self._token_labels(row, raw_tokens) for row in ids]
        return Encoded(input_ids, attention_mask, tokens)

    def mask(self, encoded: Encoded, past_length: int = 0, sliding_window="config") -> torch.Tensor:
        """The model's mask for these inputs, bool [b, 1, p, n]: the last p = n - past_length tokens are queries."""
        n = encoded.input_ids.shape[1]
        if isinstance(past_length, bool) or not isinstance(past_length, int) or not 0 <= past_length < n:
            raise ValueError(f"past_length must be an integer in 0..{n - 1} (the prompt has {n} tokens, and at "
                             f"least one must be new), got {past_length!r}")
        window = self.config.sliding_window if sliding_window == "config" else sliding_window
        return build_mask(n - past_length, n, past_length, encoded.attention_mask, window)

    def weights(self, encoded: Encoded, layer: int, head, first_row: int = 0) -> torch.Tensor:
        """Attention probabilities of `layer` for the queries from `first_row` on, float [b, n - first_row, n]:
        one head, or their mean. Patterns are lazy, so only the rows shown are computed."""
        layer, head = self.check_layer_head(layer, head)
        model = self.model
        name = f"blocks.{layer}.attn.hook_pattern"
        with torch.no_grad():
            _, cache = model.run_with_cache(encoded.input_ids.to(model.device), names_filter=name, patterns="lazy",
                                            attention_mask=encoded.attention_mask.to(model.device), logits_to_keep=1,
                                            progress=encoded.input_ids.shape[1] >= 1024)  # a bar on stderr
            pattern = cache.pattern(layer, None if head == "mean" else head, slice(first_row, None)).float().cpu()
        return pattern.mean(dim=1) if head == "mean" else pattern  # [b, rows, n]

    def _row_window(self, encoded: Encoded, rows, past_length: int) -> tuple[Encoded, int]:
        """The prompt cut after query row stop - 1, with start as the first row shown (as past_length is)."""
        n = encoded.input_ids.shape[1]
        if past_length:
            raise ValueError("rows= and past_length= both choose the query rows; pass one of them")
        if (not isinstance(rows, (tuple, list)) or len(rows) != 2 or not all(isinstance(r, int) for r in rows)
                or not 0 <= rows[0] < rows[1] <= n):
            raise ValueError(f"rows must be (start, stop) with 0 <= start < stop <= {n} (the prompt has {n} "
                             f"tokens), got {rows!r}")
        start, stop = rows
        cut = Encoded(encoded.input_ids[:, :stop], encoded.attention_mask[:, :stop],
                      [row[:stop] for row in encoded.tokens])
        return cut, start

    def check_layer_head(self, layer, head) -> tuple[int, int | str]:
        """(layer, head) validated against the config; head None -> "mean". ValueError names the valid range."""
        if layer is None:
            raise ValueError(f"head= needs layer= as well (a layer in 0..{self.config.num_hidden_layers - 1})")
        layer = self.config.check_layer(layer)
        return layer, self.config.check_head("mean" if head is None else head, mean=True)

    @property
    def model(self):
        """The LlamaForCausalLM, loaded from the path on first use (only the weights view needs it)."""
        if self._model is None:
            from llamaviz.llama.modeling import LlamaForCausalLM

            self._model = LlamaForCausalLM.from_pretrained(self.path, dtype=self.dtype, device=self.device).eval()
        return self._model

    # ----- pieces -----

    def _mask_panels(self, encoded: Encoded, past_length: int) -> dict[str, torch.Tensor]:
        """{"causal": mask}, or causal and sliding-window masks side by side when the config has a window."""
        window = self.config.sliding_window
        causal = self.mask(encoded, past_length, sliding_window=None)
        if window is None:
            return {"causal": causal}
        return {"causal": causal, f"sliding window ({window})": self.mask(encoded, past_length)}

    def _info(self, view: str) -> list[str]:
        c = self.config
        heads = f"{c.num_attention_heads} heads" + (f" ({c.num_key_value_heads} KV)"
                                                    if c.num_key_value_heads != c.num_attention_heads else "")
        return [f"{c.num_hidden_layers} layers · {heads} · context {c.max_position_embeddings}", view]

    def _token_ids(self, text: str) -> list[int]:
        ids = list(self.tokenizer.encode(text))
        if not ids:
            raise ValueError(f"text {text!r:.60} gives no tokens")
        return [int(i) for i in ids]

    def _token_labels(self, ids: list[int], raw_tokens: bool) -> list[str]:
        """Row labels (plots.tokens.token_labels); the renderer prints them with repr(), which escapes
        control characters."""
        from llamaviz.plots.tokens import token_labels

        return token_labels(self.tokenizer, ids, raw_tokens)

    def _pad_id(self) -> int:
        """The tokenizer's pad token, else the config's, else eos, else 0 (masked out either way)."""
        candidates = (getattr(self.tokenizer, "pad_token_id", None), self.config.pad_token_id,
                      getattr(self.tokenizer, "eos_token_id", None), *self.config.eos_token_ids, 0)
        return next(int(i) for i in candidates if i is not None)


def _check_texts(text) -> list[str]:
    texts = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else None
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"text must be a string or a non-empty list of strings, got {text!r:.80}")
    for index, t in enumerate(texts):
        if not t.strip():
            where = "" if len(texts) == 1 else f" (prompt {index})"
            raise ValueError(f"text is empty{where}; pass a prompt with at least one non-space character")
    return texts


def _open(path):
    """(path, config, tokenizer path) from a checkpoint path; None is the default model. Reads no weights."""
    from llamaviz.checkpoints import open_checkpoint
    from llamaviz.checkpoints.paths import model_path

    if path is not None and not isinstance(path, (str, Path)):
        raise ValueError(f"path_or_model must be a checkpoint path or a loaded model, got {type(path).__name__}")
    checkpoint = open_checkpoint(model_path(path))
    return checkpoint.path, checkpoint.config, checkpoint.tokenizer_path


def _load_tokenizer(path):
    from llamaviz.tokenizers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _existing_path(name) -> Path | None:
    path = Path(name).expanduser() if name else None
    return path if path is not None and path.exists() else None


def _tokenizer_for_model(path: Path | None):
    if path is None:
        raise ValueError("a loaded model needs tokenizer= (its config.name_or_path is not a checkpoint on disk)")
    return _load_tokenizer(path)
