"""The frozen replacement model's backward pass written out: with attention patterns and norm scales
frozen and the transcoders' skip paths linear, the gradient of a target with respect to the residual
stream only crosses each layer's OV circuit (W_V, the frozen pattern, W_O), the skip matrix and the
frozen norm scales. `LinearBackward` applies those transposed maps to a batch of seeds directly, with
no autograd graph and no rerun of the model: per layer and target it costs about p*m*(2*h*d + m)
multiply-adds plus h*p^2*d for the pattern, and only the positions up to the batch's last target
position and the layers below its top target are visited.

Shapes: c targets in a batch, P positions kept (the batch's last target position + 1), m hidden,
h heads, g kv heads, d head_dim.
"""

from __future__ import annotations

import torch


class LinearBackward:
    """The transposed frozen model of one prompt (a ReplacementRun's patterns and scales)."""

    def __init__(self, run):
        model = run.model
        self.run, self.layers = run, run.layers
        config = model.config
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        dtype = run.embed.dtype
        self.blocks = []
        for layer, block in enumerate(model.model.layers):
            tc = run.transcoders[layer]
            self.blocks.append({
                "pattern": run.frozen[f"blocks.{layer}.attn.hook_pattern"][0].to(dtype),  # [h, p, p] (query, key)
                "in1": block.input_layernorm.weight.detach().to(dtype),  # [m]
                "s1": run.frozen[f"blocks.{layer}.ln1.hook_scale"][0].to(dtype),  # [p, 1]
                "in2": block.post_attention_layernorm.weight.detach().to(dtype),
                "s2": run.frozen[f"blocks.{layer}.ln2.hook_scale"][0].to(dtype),
                "W_O": block.self_attn.o_proj.weight.detach().to(dtype),  # [m, h*d]
                "W_V": block.self_attn.v_proj.weight.detach().to(dtype),  # [g*d, m]
                "W_skip": tc.W_skip.detach().to(dtype) if hasattr(tc, "W_skip") else None,  # [m, m] out x in
            })
        self.final_weight = model.model.norm.weight.detach().to(dtype)
        self.final_scale = run.frozen["ln_final.hook_scale"][0].to(dtype)  # [p, 1]

    def mlp_seed(self, layer: int, position: int, direction: torch.Tensor) -> torch.Tensor:
        """A direction read at blocks.layer.mlp.hook_in, as a gradient on resid_mid at that position [m]."""
        block = self.blocks[layer]
        return direction * block["in2"] / block["s2"][position]

    def logit_seed(self, direction: torch.Tensor) -> torch.Tensor:
        """A direction read after the final norm at the last position, as a gradient on the last resid_post [m]."""
        return direction * self.final_weight / self.final_scale[-1]

    def attention_back(self, layer: int, grad_mid: torch.Tensor, heads: bool = False) -> torch.Tensor:
        """d target / d resid_pre through the layer's OV circuit: [c, P, m] -> [c, P, m] ([c, h, P, m] with heads)."""
        block, (c, P, m) = self.blocks[layer], grad_mid.shape
        h, g, d = self.heads, self.kv_heads, self.head_dim
        grad_z = (grad_mid @ block["W_O"]).view(c, P, h, d).permute(2, 1, 0, 3).reshape(h, P, c * d)  # query side
        grad_v = block["pattern"][:, :P, :P].transpose(1, 2) @ grad_z  # [h, P, c*d] key side; no [c, h, P, P] copy
        grad_v = grad_v.view(h, P, c, d).permute(2, 0, 1, 3)  # [c, h, P, d]
        w_v = block["W_V"].view(g, d, m).repeat_interleave(h // g, dim=0)  # [h, d, m]
        if heads:
            per_head = grad_v @ w_v  # [c, h, P, m]
            return per_head * block["in1"] / block["s1"][:P]
        grad_v = grad_v.reshape(c, g, h // g, P, d).sum(2).transpose(1, 2).reshape(c, P, g * d)  # [c, P, g*d]
        return (grad_v @ block["W_V"]) * block["in1"] / block["s1"][:P]

    def skip_back(self, layer: int, grad_post: torch.Tensor) -> torch.Tensor:
        """d target / d resid_mid through the transcoder's skip path (zero without one): [c, P, m]."""
        block = self.blocks[layer]
        if block["W_skip"] is None:
            return torch.zeros_like(grad_post)
        return (grad_post @ block["W_skip"]) * block["in2"] / block["s2"][: grad_post.shape[1]]

    def backward(self, seeds: list[tuple[int, int, torch.Tensor]], visit) -> torch.Tensor:
        """Run the seeds (layer, position, gradient on resid_mid [m]; layer == L: on the last resid_post) down.

        visit(layer, grad [c, P, m]) sees d target / d hook_mlp_out of every layer, top first; returns
        d target / d hook_embed [c, P, m]."""
        c, dtype = len(seeds), self.run.embed.dtype
        P = max(position for _, position, _ in seeds) + 1
        top = max(layer for layer, _, _ in seeds)
        grad = torch.zeros(c, P, self.run.embed.shape[-1], dtype=dtype)
        by_layer: dict[int, list] = {}
        for copy, (layer, position, vector) in enumerate(seeds):
            if layer == self.layers:
                grad[copy, position] += vector
            else:
                by_layer.setdefault(layer, []).append((copy, position, vector))
        for layer in reversed(range(min(top, self.layers - 1) + 1)):
            if layer < top or top == self.layers:
                visit(layer, grad)
                grad = grad + self.skip_back(layer, grad)
            for copy, position, vector in by_layer.get(layer, ()):
                grad[copy, position] += vector
            grad = grad + self.attention_back(layer, grad)
        return grad
