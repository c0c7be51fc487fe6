"""The sparse activations the trainers use, with the gradients each needs.

topk keeps each row's k largest pre-activations (ReLU'd); batch_topk keeps the k x rows largest of the
whole batch; jump_relu zeroes pre <= threshold, and `step` counts active latents for the L0 penalty,
both with a straight-through rectangle-kernel gradient for the threshold (bandwidth BANDWIDTH).
`decode` multiplies sparse activations by the decoder touching only the active latents' rows (forward
and backward), the same numbers as the dense product. `gathered` reads chosen entries of an encoder's
pre-activations with a gradient that touches only those latents: what TopK training needs, since the
loss depends on no other entry.
"""

from __future__ import annotations

import torch

BANDWIDTH = 0.001


def topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    values, indices = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values.relu())


def batch_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    acts = pre.relu()
    flat = acts.flatten()
    kept = flat.topk(min(k * pre.shape[0], flat.numel())).indices
    return torch.zeros_like(flat).scatter(0, kept, flat[kept]).view_as(acts)


def decode(acts: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """acts [b, w] @ W_dec [w, d] read from the non-zero entries only (an embedding bag over the active rows)."""
    rows, cols = acts.nonzero(as_tuple=True)
    return decode_entries(rows, cols, acts[rows, cols], W_dec, acts.shape[0])


def decode_entries(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor,
                   batch: int) -> torch.Tensor:
    """The [batch, d] product of the sparse activations {(rows[i], cols[i]): values[i]} (rows sorted) and W_dec."""
    return torch.nn.functional.embedding_bag(cols, W_dec, _offsets(rows, batch), mode="sum", per_sample_weights=values)


def _offsets(rows: torch.Tensor, batch: int) -> torch.Tensor:
    offsets = torch.zeros(batch, dtype=torch.long, device=rows.device)
    offsets[1:] = torch.bincount(rows, minlength=batch).cumsum(0)[:-1]
    return offsets


class _Gathered(torch.autograd.Function):
    """pre[rows, cols] of pre = x @ W_enc + b_enc (pre given, already computed without a gradient); the
    backward is a sparse product over the gathered entries instead of the dense [b, w] one."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, pre, rows, cols):
        ctx.save_for_backward(x, W_enc, rows, cols)
        return pre[rows, cols]

    @staticmethod
    def backward(ctx, grad):
        x, W_enc, rows, cols = ctx.saved_tensors
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = decode_entries(rows, cols, grad, W_enc.t().contiguous(), x.shape[0])
        if ctx.needs_input_grad[1]:
            by_latent = torch.sparse_coo_tensor(torch.stack([cols, rows]), grad, (W_enc.shape[1], x.shape[0]),
                                                check_invariants=False)
            grad_W = torch.sparse.mm(by_latent, x).t()
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(W_enc.shape[1], dtype=grad.dtype, device=grad.device).index_add_(0, cols, grad)
        return grad_x, grad_W, grad_b, None, None, None


def gathered(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, pre: torch.Tensor, rows: torch.Tensor,
             cols: torch.Tensor) -> torch.Tensor:
    """(x @ W_enc + b_enc)[rows, cols] read from `pre` (that product, computed without a gradient), with the
    gradient of x, W_enc and b_enc through those entries only."""
    return _Gathered.apply(x, W_enc, b_enc, pre, rows, cols)


def topk_entries(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of each row's k largest entries, rows sorted."""
    cols = pre.topk(k, dim=-1).indices.flatten()
    return torch.arange(pre.shape[0], device=pre.device).repeat_interleave(k), cols


def batch_topk_entries(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the k x rows largest ReLU'd entries of the whole batch, rows sorted."""
    flat = pre.relu().flatten()
    kept = flat.topk(min(k * pre.shape[0], flat.numel())).indices.sort().values
    return kept // pre.shape[1], kept % pre.shape[1]


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, threshold):
        ctx.save_for_backward(pre, threshold)
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        near = ((pre - threshold).abs() < BANDWIDTH / 2).to(grad.dtype)
        return grad * (pre > threshold), (-(threshold / BANDWIDTH) * near * grad).sum(0)


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, threshold):
        ctx.save_for_backward(pre, threshold)
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        near = ((pre - threshold).abs() < BANDWIDTH / 2).to(grad.dtype)
        return torch.zeros_like(pre), (-(1.0 / BANDWIDTH) * near * grad).sum(0)


def jump_relu(pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return _JumpReLU.apply(pre, threshold)


def step(pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return _Step.apply(pre, threshold)
