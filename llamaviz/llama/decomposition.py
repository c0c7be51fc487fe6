"""The residual stream taken apart, with TransformerLens' ActivationCache names, arguments and labels.

Every stack is [components, b, p, m] (or [components, b, m] when pos_slice is an int). The pieces
add up: embed + every attn_out + every mlp_out is the last resid_post, and the heads' results plus
the o_proj biases are the attention outputs. `apply_ln_to_stack` divides by a cached RMSNorm scale
(`*.hook_scale`, the rms the model computed), TransformerLens' frozen-scale convention, so that
each component is put through the norm exactly as the model's whole residual was; the one
exception, as in TransformerLens 4, is `accumulated_resid(apply_ln=True)` up to the final layer,
which puts each state through the final norm afresh (the logit lens).
"""

from __future__ import annotations

import torch


class Slice:
    """A position or batch selection: None (all), an int (drops the axis), a list/tensor of ints, or a slice."""

    def __init__(self, selection=None):
        if isinstance(selection, Slice):
            selection = selection.selection
        if isinstance(selection, (list, tuple)):
            selection = torch.tensor(selection, dtype=torch.long)
        if isinstance(selection, bool) or not (selection is None or isinstance(selection, (int, slice, torch.Tensor))):
            raise ValueError(f"a slice must be None, an int, a list of ints, a slice or an int tensor; got {selection!r}")
        self.selection = selection

    def apply(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        if self.selection is None:
            return tensor
        index = [slice(None)] * tensor.dim()
        selection = self.selection
        if isinstance(selection, torch.Tensor):
            selection = selection.to(tensor.device)
        index[dim] = selection
        try:
            result = tensor[tuple(index)]
        except IndexError as err:
            raise ValueError(f"slice {self!r} does not fit an axis of size {tensor.shape[dim]}: {err}") from None
        if isinstance(self.selection, (slice, torch.Tensor)) and result.shape[dim if dim >= 0 else dim] == 0:
            raise ValueError(f"slice {self!r} selects nothing from an axis of size {tensor.shape[dim]}")
        return result

    def __repr__(self) -> str:
        return f"Slice({self.selection!r})"


def _full(layer: int | None, layers: int) -> int:
    """TransformerLens' layer argument of a stack: None or -1 = every layer (the final residual)."""
    if layer is None or layer == -1:
        return layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= layers:
        raise ValueError(f"layer {layer!r} is out of range: accepted 0..{layers} (or -1/None for all {layers} layers)")
    return layer


class DecompositionMixin:
    """decompose_resid, accumulated_resid, stack_head_results and friends for ActivationCache."""

    def _layers(self) -> int:
        return self._num_layers()

    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False, apply_ln: bool = False,
                          pos_slice=None, mlp_input: bool = False, return_labels: bool = False):
        """The residual stream before each layer up to `layer` (and after the last): [c, b, p, m]."""
        layers, pos_slice = self._layers(), Slice(pos_slice)
        layer = _full(layer, layers)
        parts, labels = [], []
        for i in range(layer + 1):
            if i == layers:
                parts.append(self[f"blocks.{layers - 1}.hook_resid_post"])
                labels.append("final_post")
                continue
            parts.append(self[f"blocks.{i}.hook_resid_pre"])
            labels.append(f"{i}_pre")
            if (incl_mid and i < layer) or (mlp_input and i == layer):
                parts.append(self[f"blocks.{i}.hook_resid_mid"])
                labels.append(f"{i}_mid")
        stack = torch.stack([pos_slice.apply(part, dim=-2) for part in parts])
        if apply_ln:  # at the final layer each state goes through the final norm itself (TransformerLens 4)
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice,
                                           recompute_ln=layer == layers)
        return (stack, labels) if return_labels else stack

    def decompose_resid(self, layer: int | None = None, mlp_input: bool = False, mode: str = "all",
                        apply_ln: bool = False, pos_slice=None, incl_embeds: bool = True, return_labels: bool = False):
        """What each layer wrote before `layer`: embed, then each attn_out and mlp_out ([c, b, p, m])."""
        if mode not in ("all", "attn", "mlp"):
            raise ValueError(f"mode {mode!r} is not supported; accepted: 'all', 'attn', 'mlp'")
        layers, pos_slice = self._layers(), Slice(pos_slice)
        layer = _full(layer, layers)
        parts, labels = [], []
        if incl_embeds:
            parts.append(self["hook_embed"])
            labels.append("embed")
        for i in range(layer):
            if mode != "mlp":
                parts.append(self[f"blocks.{i}.hook_attn_out"])
                labels.append(f"{i}_attn_out")
            if mode != "attn":
                parts.append(self[f"blocks.{i}.hook_mlp_out"])
                labels.append(f"{i}_mlp_out")
        if mlp_input and mode != "mlp" and layer < layers:
            parts.append(self[f"blocks.{layer}.hook_attn_out"])
            labels.append(f"{layer}_attn_out")
        if not parts:
            raise ValueError(f"decompose_resid(layer={layer}, mode={mode!r}, incl_embeds={incl_embeds}) selects no component")
        stack = torch.stack([pos_slice.apply(part, dim=-2) for part in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def compute_head_results(self) -> None:
        """Add blocks.{L}.attn.hook_result [b, p, h, m] (each head through its slice of o_proj, no bias) from hook_z."""
        model = self._require_model("compute_head_results")
        for i in range(self._layers()):
            name = f"blocks.{i}.attn.hook_result"
            if name not in self._tensors:
                z = self[f"blocks.{i}.attn.hook_z"]  # [b, p, h, d]
                w_o = model.model.layers[i].self_attn.o_proj.weight.detach()
                w_o = w_o.view(w_o.shape[0], z.shape[-2], z.shape[-1]).to(z.device, z.dtype)  # [m, h, d]
                self._tensors[name] = torch.einsum("...hd,mhd->...hm", z, w_o)

    def stack_head_results(self, layer: int | None = None, return_labels: bool = False, incl_remainder: bool = False,
                           pos_slice=None, apply_ln: bool = False):
        """Each head's output in the residual stream, for the layers before `layer`: [L * h, b, p, m], labels 'L3H1'."""
        layers, pos_slice = self._layers(), Slice(pos_slice)
        layer = _full(layer, layers)
        if layer == 0:
            raise ValueError("stack_head_results(layer=0) selects no head: pass a layer of at least 1")
        if any(f"blocks.{i}.attn.hook_result" not in self._tensors for i in range(layer)):
            self.compute_head_results()
        parts, labels = [], []
        for i in range(layer):
            result = pos_slice.apply(self[f"blocks.{i}.attn.hook_result"], dim=-3)  # [b, p, h, m]
            parts.append(result.movedim(-2, 0))
            labels.extend(f"L{i}H{h}" for h in range(result.shape[-2]))
        return self._finish_stack(torch.cat(parts), labels, layer, pos_slice, incl_remainder, apply_ln, return_labels)

    def stack_neuron_results(self, layer: int | None = None, pos_slice=None, neuron_slice=None,
                             return_labels: bool = False, incl_remainder: bool = False, apply_ln: bool = False):
        """Each MLP neuron's write (post activation x its row of down_proj): [L * f, b, p, m], labels 'L0N5'."""
        model = self._require_model("stack_neuron_results")
        layers, pos_slice, neuron_slice = self._layers(), Slice(pos_slice), Slice(neuron_slice)
        layer = _full(layer, layers)
        parts, labels = [], []
        for i in range(layer):
            post = pos_slice.apply(self[f"blocks.{i}.mlp.hook_post"], dim=-2)  # [b, p, f]
            w_out = model.model.layers[i].mlp.down_proj.weight.detach().T.to(post.device, post.dtype)  # [f, m]
            neurons = torch.arange(w_out.shape[0])
            chosen = neuron_slice.apply(neurons)
            chosen = chosen.reshape(-1)
            parts.append((post[..., chosen, None] * w_out[chosen]).movedim(-2, 0))  # [f', b, p, m]
            labels.extend(f"L{i}N{n}" for n in chosen.tolist())
        if not parts:
            raise ValueError("stack_neuron_results(layer=0) selects no neuron: pass a layer of at least 1")
        return self._finish_stack(torch.cat(parts), labels, layer, pos_slice, incl_remainder, apply_ln, return_labels)

    def _finish_stack(self, stack, labels, layer, pos_slice, incl_remainder, apply_ln, return_labels):
        """Optionally add what the stack leaves out of resid_post ("remainder") and the frozen norm; labels too."""
        if incl_remainder:
            remainder = pos_slice.apply(self[f"blocks.{layer - 1}.hook_resid_post"], dim=-2) - stack.sum(0)
            stack = torch.cat([stack, remainder[None]])
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def stack_activation(self, activation_name: str, layer: int = -1, sublayer_type: str | None = None) -> torch.Tensor:
        """One activation of every layer before `layer`, stacked: [L, ...]."""
        layer = _full(layer, self._layers())
        return torch.stack([self[(activation_name, i, sublayer_type)] for i in range(layer)])

    def get_full_resid_decomposition(self, layer: int | None = None, mlp_input: bool = False,
                                     expand_neurons: bool = True, apply_ln: bool = False, pos_slice=None,
                                     return_labels: bool = False):
        """Heads, MLPs (or their neurons), embed and biases: the whole residual before `layer`, [c, b, p, m]."""
        layers, pos_slice = self._layers(), Slice(pos_slice)
        layer = _full(layer, layers)
        head_layers = layer + (1 if mlp_input else 0)
        parts, labels = [], []
        if head_layers > 0:
            heads, labels = self.stack_head_results(head_layers, pos_slice=pos_slice, return_labels=True)
            parts.append(heads)
        if layer > 0:
            if expand_neurons:
                mlp, mlp_labels = self.stack_neuron_results(layer, pos_slice=pos_slice, return_labels=True)
            else:
                mlp, mlp_labels = self.decompose_resid(layer, pos_slice=pos_slice, mode="mlp", incl_embeds=False,
                                                       return_labels=True)
            parts.append(mlp)
            labels = labels + mlp_labels
        embed = pos_slice.apply(self["hook_embed"], dim=-2)[None]
        parts.append(embed)
        labels.append("embed")
        bias = self._accumulated_bias(head_layers, layer if expand_neurons else 0)
        parts.append(bias.to(embed.device, embed.dtype).expand_as(embed))
        labels.append("bias")
        stack = torch.cat(parts)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def _accumulated_bias(self, attn_layers: int, mlp_layers: int) -> torch.Tensor:
        """Sum of o_proj biases of the first `attn_layers` layers and down_proj biases of the first `mlp_layers`: [m]."""
        model = self._require_model("get_full_resid_decomposition")
        total = torch.zeros(model.config.hidden_size)
        for i, block in enumerate(model.model.layers):
            if i < attn_layers and block.self_attn.o_proj.bias is not None:
                total = total + block.self_attn.o_proj.bias.detach().float().cpu()
            if i < mlp_layers and block.mlp.down_proj.bias is not None:
                total = total + block.mlp.down_proj.bias.detach().float().cpu()
        return total

    def apply_ln_to_stack(self, residual_stack: torch.Tensor, layer: int | None = None, mlp_input: bool = False,
                          pos_slice=None, batch_slice=None, has_batch_dim: bool = True,
                          recompute_ln: bool = False) -> torch.Tensor:
        """Divide each component by the scale the norm before `layer` computed (the final norm for None/-1).

        recompute_ln=True (final norm only) instead puts each component through the final norm itself,
        its own rms and the norm's weight: the logit lens's view (accumulated_resid(apply_ln=True) uses it).
        """
        layers, pos_slice, batch_slice = self._layers(), Slice(pos_slice), Slice(batch_slice)
        final = layer is None or layer == -1 or layer == layers
        if has_batch_dim:
            residual_stack = batch_slice.apply(residual_stack, dim=1)
        if recompute_ln and final:
            norm = self._require_model("apply_ln_to_stack").model.norm
            x = residual_stack.float()
            rms = (x.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()
            return (x / rms * norm.weight.detach().float().to(x.device)).to(residual_stack.dtype)
        name = "ln_final.hook_scale" if final else f"blocks.{_full(layer, layers)}.ln{2 if mlp_input else 1}.hook_scale"
        if name not in self._tensors:
            raise KeyError(f"apply_ln needs {name!r} in the cache: run_with_cache with that hook point "
                           "(names_filter including it, or no names_filter)")
        scale = self._tensors[name]  # [b, p, 1]
        if not has_batch_dim:
            scale = scale[0]
        scale = pos_slice.apply(scale, dim=-2)
        if has_batch_dim:
            scale = batch_slice.apply(scale, dim=0)
        return residual_stack / scale.to(residual_stack.device, residual_stack.dtype)

    def logit_attrs(self, residual_stack: torch.Tensor, tokens, incorrect_tokens=None, pos_slice=None,
                    batch_slice=None, has_batch_dim: bool = True) -> torch.Tensor:
        """Each component's direct effect on the logit of `tokens` (minus `incorrect_tokens`): stack without m.

        Pass the raw stack (not apply_ln=True): the final norm's frozen scale is applied here.
        Components are put through the final norm's frozen scale and projected on
        model.tokens_to_residual_directions, which includes the final norm's weight, so the
        full decomposition's attributions add up to the logits.
        """
        model = self._require_model("logit_attrs")
        directions = model.tokens_to_residual_directions(_as_tokens(model, tokens))
        if incorrect_tokens is not None:
            wrong = model.tokens_to_residual_directions(_as_tokens(model, incorrect_tokens))
            if wrong.shape != directions.shape:
                raise ValueError(f"tokens give directions of shape {tuple(directions.shape)} but incorrect_tokens "
                                 f"{tuple(wrong.shape)}; pass one incorrect token per token")
            directions = directions - wrong
        scaled = self.apply_ln_to_stack(residual_stack, -1, pos_slice=pos_slice, batch_slice=batch_slice,
                                        has_batch_dim=has_batch_dim)
        return (scaled * directions.to(scaled.device, scaled.dtype)).sum(-1)

    def apply_slice_to_batch_dim(self, batch_slice):
        """A cache holding only the selected batch rows (an int drops the batch axis)."""
        batch_slice = Slice(batch_slice)
        tensors = {name: batch_slice.apply(t, dim=0) for name, t in self._tensors.items()}
        tokens = None if self.tokens is None else batch_slice.apply(self.tokens, dim=0)
        return type(self)(tensors, model=self.model, tokens=tokens, model_name=self.model_name)


def _as_tokens(model, tokens):
    if isinstance(tokens, str):
        return model.to_single_token(tokens)
    return tokens
