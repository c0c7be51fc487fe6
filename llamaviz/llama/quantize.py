"""Weight-only quantization: int4 (two codes a byte) or int8, per-group scales and zero points.

Each group of `group_size` consecutive input weights of a row gets its own scale s and integer zero
point z (asymmetric): w ~= (q - z) * s with q in [0, 2**bits - 1]. `QuantizedLinear` keeps only the
codes, scales and zero points, and dequantizes the whole weight on every matmul (no custom kernel:
less memory, not more speed).

What is quantized: q/k/v/o_proj, gate/up/down_proj, and lm_head when it is not tied to the input
embeddings. A tied lm_head stays in floating point together with embed_tokens: quantizing it would
need a second, untied copy of the largest matrix, or a quantized embedding lookup whose error every
layer would then see. Norms and task heads (score, qa_outputs) are tiny and stay as they are.
Shapes: o out_features, i in_features, n groups per row (i / group_size), g group_size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BITS = {"int4": 4, "int8": 8}
QUANTIZED_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
MAX_AUTO_GROUP = 128
CHUNK_ELEMENTS = 2 ** 22  # weights quantized at a time


class QuantizedLinear(nn.Module):
    """A bias-optional linear layer whose weight lives as int4/int8 codes + per-group scale and zero point."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        groups, per_byte = in_features // group_size, 8 // bits
        self.register_buffer("qweight", torch.zeros(out_features, in_features // per_byte, dtype=torch.uint8,
                                                    device=device))  # [o, i * bits / 8] packed codes
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=dtype, device=device))  # [o, n]
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8, device=device))  # [o, n]
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int) -> "QuantizedLinear":
        weight = linear.weight.detach()
        quantized = cls(linear.in_features, linear.out_features, bits, group_size, linear.bias is not None,
                        weight.dtype, weight.device)
        codes, scales, zeros = quantize_weight(weight, bits, group_size)
        quantized.qweight.copy_(pack_codes(codes, bits))
        quantized.scales.copy_(scales)
        quantized.zeros.copy_(zeros)
        if linear.bias is not None:
            quantized.bias.data.copy_(linear.bias.detach())
        return quantized

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight [o, i] in the scales' dtype (for code that reads `.weight`)."""
        dtype = self.scales.dtype
        codes = unpack_codes(self.qweight, self.bits)  # [o, i] uint8
        grouped = codes.view(self.out_features, -1, self.group_size).to(dtype)  # [o, n, g]
        shift = self.zeros.to(dtype) * self.scales  # [o, n]: the zero point in weight units
        return grouped.mul_(self.scales[..., None]).sub_(shift[..., None]).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int):
    """weight [o, i] -> (codes uint8 [o, i], scales [o, n] in weight's dtype, zeros uint8 [o, n]).

    Round to nearest on each group's [min, max] range, widened to hold 0 so the zero point is a
    valid code. Rows go in chunks so a large lm_head needs little scratch memory. (Searching a
    clipped range per group was tried: no better top-1 agreement on the default model.)
    """
    rows = max(1, CHUNK_ELEMENTS // weight.shape[1])
    parts = [_quantize_rows(chunk, bits, group_size) for chunk in weight.split(rows)]
    return tuple(torch.cat(part) for part in zip(*parts))


def _quantize_rows(weight: torch.Tensor, bits: int, group_size: int):
    top = 2 ** bits - 1
    out_features, in_features = weight.shape
    grouped = weight.float().view(out_features, in_features // group_size, group_size)  # [o, n, g]
    low, high = grouped.amin(-1).clamp(max=0), grouped.amax(-1).clamp(min=0)  # [o, n]
    scales = ((high - low) / top).clamp(min=torch.finfo(torch.float32).tiny)
    zeros = (-low / scales).round_().clamp_(0, top)  # [o, n]
    codes = (grouped / scales[..., None]).round_().add_(zeros[..., None]).clamp_(0, top)  # [o, n, g]
    return codes.to(torch.uint8).view(out_features, in_features), scales.to(weight.dtype), zeros.to(torch.uint8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [o, i] -> [o, i] (int8) or [o, i / 2] (int4: column j in the low nibble, j + i/2 in the high)."""
    if bits == 8:
        return codes
    half = codes.shape[1] // 2
    return codes[:, :half] | (codes[:, half:] << 4)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_codes: uint8 [o, i]."""
    if bits == 8:
        return packed
    return torch.cat((packed & 0xF, packed >> 4), dim=1)  # [o, i]


def quantize_model(model: nn.Module, quantization: str = "int4", group_size: int | None = None) -> nn.Module:
    """Replace the model's large nn.Linear layers by QuantizedLinear, in place; returns the model.

    group_size=None picks the largest power of two up to 128 that divides every quantized layer's
    input width (128 for most Llamas, 64 for SmolLM2's 576-wide layers).
    """
    check_quantization(quantization)
    already = quantization_of(model)
    if already is not None:
        raise ValueError(f"the model is already quantized ({already}); load it again in floating point "
                         "to quantize it another way")
    bits, targets = BITS[quantization], quantizable_linears(model)
    if not targets:
        raise ValueError(f"{type(model).__name__} has no layer to quantize (looked for nn.Linear named "
                         f"{', '.join(QUANTIZED_LINEARS)})")
    group_size = auto_group_size(targets, bits) if group_size is None else group_size
    check_group_size(targets, bits, group_size)
    for name, linear in targets.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantizedLinear.from_linear(linear, bits, group_size))
    return model


def check_quantization(quantization) -> str:
    """The name, when it is one of BITS; else a ValueError listing them."""
    if quantization not in BITS:
        raise ValueError(f"quantization {quantization!r} is not supported; accepted: {', '.join(map(repr, BITS))}")
    return quantization


def quantizable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Name -> nn.Linear for every projection to quantize (lm_head only when untied)."""
    embeddings = {id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)}
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rpartition(".")[2] in QUANTIZED_LINEARS
            and id(module.weight) not in embeddings}


def auto_group_size(targets: dict[str, nn.Linear], bits: int) -> int:
    """The largest power of two up to MAX_AUTO_GROUP dividing every layer's input width."""
    widths = {linear.in_features for linear in targets.values()}
    group = MAX_AUTO_GROUP
    while group > 1 and any(width % group for width in widths):
        group //= 2
    if group < 2 and bits == 4:
        raise ValueError(f"int4 packs two weights a byte, but the input widths {sorted(widths)} are odd; "
                         "use quantization='int8'")
    return group


def check_group_size(targets: dict[str, nn.Linear], bits: int, group_size: int) -> None:
    """Raise ValueError naming the first layer whose input width group_size does not divide."""
    if not isinstance(group_size, int) or group_size < 1 or (bits == 4 and group_size % 2):
        raise ValueError(f"group_size must be a positive integer{' and even for int4' if bits == 4 else ''}, "
                         f"got {group_size!r}")
    for name, linear in targets.items():
        width = linear.in_features
        if width % group_size:
            fits = [size for size in (32, 64, 128, 256) if all(t.in_features % size == 0 for t in targets.values())]
            hint = f"sizes that fit every layer: {', '.join(map(str, fits))}" if fits else "no size from 32 to 256 fits"
            raise ValueError(f"group_size {group_size} does not divide {name}'s {width} input features; {hint} "
                             "(or group_size=None to choose one)")


def quantization_of(model: nn.Module) -> str | None:
    """'int4, group_size 64' style description when the model holds QuantizedLinear layers, else None."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            return f"int{module.bits}, group_size {module.group_size}"
    return None


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, each shared tensor counted once (tied embeddings)."""
    seen, total = set(), 0
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total
