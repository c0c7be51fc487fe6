"""What the app keeps of a run, linear in T: lazy patterns, the residual stream once, running statistics.

resid_pre[L+1] is resid_post[L], so the residual stream is kept as every resid_pre plus the last
resid_post. MLP statistics and the per-head mean of hook_z are accumulated by hooks while the
model runs, so no [T, f] or [T, h, d] activation is stored.
"""

from __future__ import annotations

import torch

from llamaviz.llama.hook_points import layer_of


def kept_names(num_layers: int) -> list[str]:
    """Hook names a run stores: every pattern (lazy: rot_q / rot_k), every resid_pre and the last resid_post."""
    return ([f"blocks.{i}.attn.hook_pattern" for i in range(num_layers)]
            + [f"blocks.{i}.hook_resid_pre" for i in range(num_layers)]
            + [f"blocks.{num_layers - 1}.hook_resid_post"])


class RunStats:
    """Per-layer sums over every position seen: |mlp post| statistics and the sum of hook_z per head."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.mlp = [torch.zeros(4, dtype=torch.float64) for _ in range(num_layers)]  # sum|x|, >0, >0.1, count
        self.mlp_max = [0.0] * num_layers
        self.z_sum: list[torch.Tensor | None] = [None] * num_layers  # [h, d] float64
        self.positions = [0] * num_layers

    def hooks(self) -> list[tuple]:
        return [(lambda name: name.endswith("mlp.hook_post"), self._mlp),
                (lambda name: name.endswith("attn.hook_z"), self._z)]

    def _mlp(self, post: torch.Tensor, hook) -> None:  # post [b, p, f]
        size = post.detach().float().abs()
        layer = layer_of(hook.name)
        self.mlp[layer] += torch.tensor([size.sum().item(), (post > 0).sum().item(), (size > 0.1).sum().item(),
                                         size.numel()], dtype=torch.float64)
        self.mlp_max[layer] = max(self.mlp_max[layer], size.max().item())

    def _z(self, z: torch.Tensor, hook) -> None:  # z [b, p, h, d]
        layer = layer_of(hook.name)
        total = z.detach().double().sum(dim=(0, 1)).cpu()  # [h, d]
        self.z_sum[layer] = total if self.z_sum[layer] is None else self.z_sum[layer] + total
        self.positions[layer] += z.shape[0] * z.shape[1]

    def mlp_rows(self) -> list[dict]:
        """Per layer: mean |post|, fraction > 0, fraction |post| > 0.1, max |post| (as the MLP tab shows)."""
        rows = []
        for layer, (total, positive, large, count) in enumerate(s.tolist() for s in self.mlp):
            count = max(count, 1.0)
            rows.append({"layer": layer, "mean |post|": round(total / count, 4),
                         "fraction > 0": round(positive / count, 4), "fraction |post| > 0.1": round(large / count, 4),
                         "max |post|": round(self.mlp_max[layer], 3)})
        return rows

    def z_mean(self, layer: int) -> torch.Tensor:
        """Mean of hook_z over every position seen: [h, d] (what mean ablation writes)."""
        if self.z_sum[layer] is None:
            raise ValueError(f"no hook_z of layer {layer} was seen while capturing")
        return (self.z_sum[layer] / self.positions[layer]).float()
