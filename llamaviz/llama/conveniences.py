"""TransformerLens' model conveniences on the causal LM: tokens <-> text, weight views, factored matrices.

Weights are the checkpoint's own (nothing folded or centred, TransformerLens' `no_processing`); the
one place a norm weight enters is `tokens_to_residual_directions`, which includes the final norm's
weight so that a component divided by the final norm's scale and dotted with it gives its exact
share of the logit (what TransformerLens' default folded W_U gives).
"""

from __future__ import annotations

import torch

from llamaviz.llama.factored_matrix import FactoredMatrix
from llamaviz.llama.pretrained import provided


class ConfigView:
    """TransformerLens' `model.cfg` names over a LlamaConfig (n_layers, n_heads, d_model, ...)."""

    def __init__(self, config, model):
        self._config, self._model = config, model

    n_layers = property(lambda self: self._config.num_hidden_layers)
    n_heads = property(lambda self: self._config.num_attention_heads)
    n_key_value_heads = property(lambda self: self._config.num_key_value_heads)
    d_model = property(lambda self: self._config.hidden_size)
    d_head = property(lambda self: self._config.head_dim)
    d_mlp = property(lambda self: self._config.intermediate_size)
    d_vocab = property(lambda self: self._config.vocab_size)
    d_vocab_out = property(lambda self: self._config.vocab_size)
    n_ctx = property(lambda self: self._config.max_position_embeddings)
    normalization_type = property(lambda self: "RMS")
    act_fn = property(lambda self: "silu")
    gated_mlp = property(lambda self: True)
    positional_embedding_type = property(lambda self: "rotary")
    device = property(lambda self: self._model.device)
    dtype = property(lambda self: self._model.dtype)

    def __getattr__(self, name):
        return getattr(self._config, name)

    def __repr__(self) -> str:
        return (f"cfg(n_layers={self.n_layers}, n_heads={self.n_heads}, n_key_value_heads={self.n_key_value_heads}, "
                f"d_model={self.d_model}, d_head={self.d_head}, d_mlp={self.d_mlp}, d_vocab={self.d_vocab})")


class TransformerLensMixin:
    """to_tokens, to_str_tokens, W_Q ... on LlamaForCausalLM (TransformerLens names, shapes and semantics)."""

    _tokenizer = None

    @property
    def cfg(self) -> ConfigView:
        return ConfigView(self.config, self)

    @property
    def tokenizer(self):
        """The tokenizer of the checkpoint this model came from, loaded on first use."""
        if self._tokenizer is None:
            if not self.name_or_path:
                raise ValueError("this model has no tokenizer: set model.tokenizer = tok (llamaviz.load does)")
            self._tokenizer = provided("auto_tokenizer").from_pretrained(self.name_or_path)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    # ----- text <-> tokens -----

    def encode_text(self, text, prepend_bos: bool | None = None, padding_side: str | None = None):
        """(ids [b, p], attention_mask [b, p] or None when unpadded) of a text or a list of texts."""
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"expected a text or a non-empty list of texts, got {text!r}")
        tok = self.tokenizer
        rows = [tok.encode(t, add_special_tokens=prepend_bos is not False) for t in texts]
        bos = tok.bos_token_id
        if prepend_bos and bos is not None:
            rows = [row if row[:1] == [bos] else [bos, *row] for row in rows]
        if prepend_bos is False and bos is not None:
            rows = [row[1:] if row[:1] == [bos] else row for row in rows]
        if any(not row for row in rows):
            raise ValueError(f"text {texts[[bool(r) for r in rows].index(False)]!r} has no tokens")
        return self._pad(rows, padding_side or tok.padding_side)

    def _pad(self, rows: list[list[int]], side: str):
        if side not in ("left", "right"):
            raise ValueError(f"padding_side {side!r} is not supported; accepted: 'left', 'right'")
        width = max(len(row) for row in rows)
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else (self.config.eos_token_ids or [0])[0]
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
            ids[i, span] = torch.tensor(row)
            mask[i, span] = 1
        return ids.to(self.device), (mask.to(self.device) if not bool(mask.all()) else None)

    def text_input(self, input_ids, attention_mask=None, prepend_bos=None, padding_side=None):
        """Tokenize text input (forward, run_with_cache, run_with_hooks, generate accept it); tensors pass through."""
        if isinstance(input_ids, str) or (isinstance(input_ids, (list, tuple)) and input_ids
                                          and all(isinstance(t, str) for t in input_ids)):
            ids, mask = self.encode_text(input_ids, prepend_bos, padding_side)
            return ids, attention_mask if attention_mask is not None else mask
        return input_ids, attention_mask

    def to_tokens(self, input, prepend_bos: bool | None = None, padding_side: str | None = None,
                  move_to_device: bool = True, truncate: bool = False) -> torch.Tensor:
        """Token ids [b, p] of a text or a list of texts (padded); prepend_bos None = the tokenizer's default."""
        ids, _ = self.encode_text(input, prepend_bos, padding_side)
        if truncate:
            ids = ids[:, :self.config.max_position_embeddings]
        return ids if move_to_device else ids.cpu()

    def to_str_tokens(self, input, prepend_bos: bool | None = None, padding_side: str | None = None):
        """Each token as readable text (' John', not 'ĠJohn'); a list of lists for a batch."""
        if isinstance(input, (list, tuple)) and input and all(isinstance(t, str) for t in input):
            return [self.to_str_tokens(text, prepend_bos, padding_side) for text in input]
        if isinstance(input, str):
            ids = self.to_tokens(input, prepend_bos, padding_side)[0]
        else:
            ids = torch.as_tensor(input)
            if ids.dim() == 2:
                if ids.shape[0] != 1:
                    return [self.tokenizer.display_tokens(row.tolist()) for row in ids]
                ids = ids[0]
        return self.tokenizer.display_tokens(ids.reshape(-1).tolist())

    def to_single_token(self, string: str) -> int:
        """The id of a string that is exactly one token; ValueError listing the tokens otherwise."""
        ids = self.to_tokens(string, prepend_bos=False)[0]
        if ids.numel() != 1:
            pieces = self.tokenizer.display_tokens(ids.tolist())
            raise ValueError(f"{string!r} is {ids.numel()} tokens, not one: {pieces}")
        return int(ids[0])

    def to_single_str_token(self, token: int) -> str:
        return self.tokenizer.display_tokens([int(token)])[0]

    def to_string(self, tokens):
        """Text of ids [p] (a string) or [b, p] (a list of strings)."""
        ids = torch.as_tensor(tokens)
        if ids.dim() == 0:
            ids = ids[None]
        if ids.dim() == 2:
            return [self.tokenizer.decode(row.tolist()) for row in ids]
        return self.tokenizer.decode(ids.tolist())

    def get_token_position(self, single_token, input, mode: str = "first", prepend_bos: bool | None = None) -> int:
        """Index of `single_token` (a string or id) in `input` (text or ids [p] / [1, p])."""
        if mode not in ("first", "last"):
            raise ValueError(f"mode {mode!r} is not supported; accepted: 'first', 'last'")
        ids = self.to_tokens(input, prepend_bos)[0] if isinstance(input, str) else torch.as_tensor(input)
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                raise ValueError(f"get_token_position takes one sequence, got a batch of {ids.shape[0]}")
            ids = ids[0]
        token = self.to_single_token(single_token) if isinstance(single_token, str) else int(single_token)
        hits = (ids == token).nonzero().flatten()
        if hits.numel() == 0:
            raise ValueError(f"token {token} ({self.to_single_str_token(token)!r}) does not occur in the input: "
                             f"{self.tokenizer.display_tokens(ids.tolist())}")
        return int(hits[0] if mode == "first" else hits[-1])

    def tokens_to_residual_directions(self, tokens) -> torch.Tensor:
        """Residual directions [..., m] whose dot with x / final_scale is each token's logit (final norm weight included)."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        ids = torch.as_tensor(tokens, device=self.lm_head.weight.device)
        rows = self.lm_head.weight.detach()[ids]  # [..., m]
        return rows * self.model.norm.weight.detach()

    # ----- weights, TransformerLens shapes (read-only views: they do not write back) -----

    def _stack(self, fn) -> torch.Tensor:
        return torch.stack([fn(layer) for layer in self.model.layers]).detach()

    def _heads(self, linear, heads: int, expand: int = 1) -> torch.Tensor:
        """A q/k/v projection's weight [heads * d, m] as [h, m, d], kv heads repeated for their query group."""
        c = self.config
        weight = linear.weight.detach().view(heads, c.head_dim, c.hidden_size).transpose(1, 2)
        return weight.repeat_interleave(expand, dim=0)

    def _head_bias(self, linear, heads: int, expand: int = 1) -> torch.Tensor:
        return linear.bias.detach().view(heads, self.config.head_dim).repeat_interleave(expand, dim=0)

    @property
    def _groups(self) -> int:
        return self.config.num_attention_heads // self.config.num_key_value_heads

    W_E = property(lambda self: self.model.embed_tokens.weight.detach(), doc="[v, m]")
    W_U = property(lambda self: self.lm_head.weight.detach().T, doc="[m, v] lm_head as stored (no norm folded)")
    W_Q = property(lambda self: self._stack(lambda l: self._heads(l.self_attn.q_proj, self.config.num_attention_heads)),
                   doc="[L, h, m, d]")
    W_K = property(lambda self: self._stack(lambda l: self._heads(l.self_attn.k_proj, self.config.num_key_value_heads,
                                                                  self._groups)), doc="[L, h, m, d], kv heads repeated")
    W_V = property(lambda self: self._stack(lambda l: self._heads(l.self_attn.v_proj, self.config.num_key_value_heads,
                                                                  self._groups)), doc="[L, h, m, d], kv heads repeated")
    W_O = property(lambda self: self._stack(lambda l: l.self_attn.o_proj.weight.detach().view(
        self.config.hidden_size, self.config.num_attention_heads, self.config.head_dim).permute(1, 2, 0)),
        doc="[L, h, d, m]")
    W_gate = property(lambda self: self._stack(lambda l: l.mlp.gate_proj.weight.detach().T), doc="[L, m, f]")
    W_in = property(lambda self: self._stack(lambda l: l.mlp.up_proj.weight.detach().T), doc="[L, m, f]")
    W_out = property(lambda self: self._stack(lambda l: l.mlp.down_proj.weight.detach().T), doc="[L, f, m]")

    def _bias(self, name: str, fn):
        if not self._has_bias(name):
            raise AttributeError(f"{name}: this model has no such bias (config.attention_bias / mlp_bias is False)")
        return self._stack(fn)

    def _has_bias(self, name: str) -> bool:
        first = self.model.layers[0]
        module = {"b_Q": first.self_attn.q_proj, "b_K": first.self_attn.k_proj, "b_V": first.self_attn.v_proj,
                  "b_O": first.self_attn.o_proj, "b_in": first.mlp.up_proj, "b_gate": first.mlp.gate_proj,
                  "b_out": first.mlp.down_proj}[name]
        return module.bias is not None

    b_Q = property(lambda self: self._bias("b_Q", lambda l: self._head_bias(l.self_attn.q_proj,
                                                                            self.config.num_attention_heads)))
    b_K = property(lambda self: self._bias("b_K", lambda l: self._head_bias(
        l.self_attn.k_proj, self.config.num_key_value_heads, self._groups)))
    b_V = property(lambda self: self._bias("b_V", lambda l: self._head_bias(
        l.self_attn.v_proj, self.config.num_key_value_heads, self._groups)))
    b_O = property(lambda self: self._bias("b_O", lambda l: l.self_attn.o_proj.bias.detach()))
    b_in = property(lambda self: self._bias("b_in", lambda l: l.mlp.up_proj.bias.detach()))
    b_gate = property(lambda self: self._bias("b_gate", lambda l: l.mlp.gate_proj.bias.detach()))
    b_out = property(lambda self: self._bias("b_out", lambda l: l.mlp.down_proj.bias.detach()))

    @property
    def OV(self) -> FactoredMatrix:
        """W_V @ W_O per head, factored: [L, h, m, m]."""
        return FactoredMatrix(self.W_V, self.W_O)

    @property
    def QK(self) -> FactoredMatrix:
        """W_Q @ W_K^T per head, factored: [L, h, m, m] (before RoPE, as TransformerLens)."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))
