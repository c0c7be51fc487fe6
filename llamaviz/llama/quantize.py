"""Weight-only quantization: int4 (two codes a byte) or int8, per-group scales and zero points.

Each group of `group_size` consecutive input weights of a row gets its own scale s and integer zero
point z (asymmetric): w ~= (q - z) * s with q in [0, 2**bits - 1]. When group_size does not divide a
row's width, the row's last group is shorter (576 = 4 * 128 + 64); it is quantized on its own range,
exactly as if it were a row of that width. `QuantizedLinear` keeps only the codes, scales and zero
points, and dequantizes the whole weight on every matmul (no custom kernel: less memory, not more speed).
`TorchAoConfig` is the transformers / torchao spelling of the same request.

What is quantized: q/k/v/o_proj, gate/up/down_proj, and lm_head when it is not tied to the input
embeddings. A tied lm_head stays in floating point together with embed_tokens: quantizing it would
need a second, untied copy of the largest matrix, or a quantized embedding lookup whose error every
layer would then see. Norms and task heads (score, qa_outputs) are tiny and stay as they are.
Shapes: o out_features, i in_features, n groups per row (ceil(i / group_size)), g group_size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BITS = {"int4": 4, "int8": 8}
QUANTIZED_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
MAX_AUTO_GROUP, MIN_AUTO_GROUP = 128, 32  # group_size=None: a power of two in this range
CHUNK_ELEMENTS = 2 ** 22  # weights quantized at a time


class QuantizedLinear(nn.Module):
    """A bias-optional linear layer whose weight lives as int4/int8 codes + per-group scale and zero point."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        groups, per_byte = -(-in_features // group_size), 8 // bits
        self.register_buffer("qweight", torch.zeros(out_features, -(-in_features // per_byte), dtype=torch.uint8,
                                                    device=device))  # [o, ceil(i * bits / 8)] packed codes
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
        """The dequantized weight [o, i] in the scales' dtype (for code that reads `.weight`), contiguous."""
        return self.dequantized().contiguous()

    def dequantized(self) -> torch.Tensor:
        """The dequantized weight [o, i]: a column slice of [o, n * g] when the last group is shorter.

        The codes are unpacked into whole groups, [o, n, g], so one broadcast does every group; the
        columns past i (a shorter last group's missing ones) are left out by slicing, not copying
        (F.linear reads the strided weight as it is).
        """
        groups, width = self.scales.shape[1], min(self.group_size, self.in_features)  # a group wider than a row: one
        codes = unpack_codes(self.qweight, self.bits, self.in_features, columns=groups * width)  # [o, n * g]
        grouped = codes.view(self.out_features, groups, width).to(self.scales.dtype)  # [o, n, g]
        shift = self.zeros.to(self.scales.dtype) * self.scales  # [o, n]: the zero point in weight units
        weight = grouped.mul_(self.scales[..., None]).sub_(shift[..., None]).view(self.out_features, -1)
        return weight[:, :self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


def group_spans(in_features: int, group_size: int) -> list[tuple[int, int, int]]:
    """(first column, groups, group width) of the whole groups of a row, then of its shorter last group if any."""
    whole = in_features // group_size
    spans = [(0, whole, group_size)] if whole else []
    if in_features % group_size:
        spans.append((whole * group_size, 1, in_features % group_size))
    return spans


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
    """quantize_weight of a few rows: the whole groups, then the shorter last group on its own."""
    parts = [_quantize_groups(weight[:, first:first + groups * width], bits, width)
             for first, groups, width in group_spans(weight.shape[1], group_size)]
    codes, scales, zeros = (torch.cat(part, dim=1) for part in zip(*parts))
    return codes, scales.to(weight.dtype), zeros


def _quantize_groups(weight: torch.Tensor, bits: int, width: int):
    """weight [o, n * width], every group `width` wide -> codes [o, n * width], scales [o, n] float32, zeros [o, n]."""
    top = 2 ** bits - 1
    out_features, columns = weight.shape
    grouped = weight.float().reshape(out_features, columns // width, width)  # [o, n, g]
    low, high = grouped.amin(-1).clamp(max=0), grouped.amax(-1).clamp(min=0)  # [o, n]
    scales = ((high - low) / top).clamp(min=torch.finfo(torch.float32).tiny)
    zeros = (-low / scales).round_().clamp_(0, top)  # [o, n]
    codes = (grouped / scales[..., None]).round_().add_(zeros[..., None]).clamp_(0, top)  # [o, n, g]
    return codes.to(torch.uint8).view(out_features, columns), scales, zeros.to(torch.uint8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [o, i] -> [o, i] (int8) or [o, ceil(i / 2)] (int4: column j low nibble, j + ceil(i / 2) high).

    An odd width gets one zero code appended first, so every byte holds two codes.
    """
    if bits == 8:
        return codes
    if codes.shape[1] % 2:
        codes = F.pad(codes, (0, 1))
    half = codes.shape[1] // 2
    return codes[:, :half] | (codes[:, half:] << 4)


def unpack_codes(packed: torch.Tensor, bits: int, in_features: int | None = None,
                 columns: int | None = None) -> torch.Tensor:
    """Inverse of pack_codes: uint8 [o, i] (in_features drops the padding code of an odd width).

    columns >= i returns [o, columns] instead, zero codes after column i (room for whole groups).
    """
    if in_features is None:
        in_features = packed.shape[1] * 8 // bits
    columns = in_features if columns is None else columns
    if bits == 8 and columns == in_features:
        return packed
    if bits == 4 and columns == in_features == 2 * packed.shape[1]:
        return torch.cat((packed & 0xF, packed >> 4), dim=1)  # [o, i]
    codes = torch.zeros(packed.shape[0], columns, dtype=torch.uint8, device=packed.device)  # [o, columns]
    if bits == 8:
        codes[:, :in_features] = packed
        return codes
    half = packed.shape[1]
    codes[:, :half] = packed & 0xF
    codes[:, half:in_features] = (packed >> 4)[:, :in_features - half]
    return codes


def quantize_model(model: nn.Module, quantization: str = "int4", group_size: int | None = None) -> nn.Module:
    """Replace the model's large nn.Linear layers by QuantizedLinear, in place; returns the model.

    group_size=None picks the largest power of two from 128 down to 32 that divides every quantized
    layer's input width (128 for most Llamas, 64 for SmolLM2's 576-wide layers), else 128. Any
    group_size >= 1 works on every model: where it does not divide a width, each row's last group
    is shorter (group_size=128 on SmolLM2: four groups of 128 and one of 64 per row).
    """
    check_quantization(quantization)
    check_group_size(group_size)
    already = quantization_of(model)
    if already is not None:
        raise ValueError(f"the model is already quantized ({already}); load it again in floating point "
                         "to quantize it another way")
    bits, targets = BITS[quantization], quantizable_linears(model)
    if not targets:
        raise ValueError(f"{type(model).__name__} has no layer to quantize (looked for nn.Linear named "
                         f"{', '.join(QUANTIZED_LINEARS)})")
    group_size = auto_group_size(targets) if group_size is None else group_size
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


def check_group_size(group_size) -> int | None:
    """group_size when it is None (choose one) or an integer >= 1; else a ValueError."""
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size must be a positive integer (weights per scale, e.g. 32, 64, 128) or None "
                         f"to choose one, got {group_size!r}")
    return group_size


def quantizable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Name -> nn.Linear for every projection to quantize (lm_head only when untied)."""
    embeddings = {id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)}
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rpartition(".")[2] in QUANTIZED_LINEARS
            and id(module.weight) not in embeddings}


def auto_group_size(targets: dict[str, nn.Linear]) -> int:
    """The largest power of two from MAX_AUTO_GROUP down to MIN_AUTO_GROUP dividing every input width, else 128."""
    widths = {linear.in_features for linear in targets.values()}
    group = MAX_AUTO_GROUP
    while group >= MIN_AUTO_GROUP:
        if all(width % group == 0 for width in widths):
            return group
        group //= 2
    return MAX_AUTO_GROUP  # nothing divides: rows end in a shorter group


def quantization_request(quantization: str | None, group_size: int | None, quantization_config) -> tuple:
    """(quantization, group_size) from from_pretrained's arguments, checked before any weight is read."""
    if quantization_config is not None:
        if quantization is not None or group_size is not None:
            raise ValueError("pass either quantization=/group_size= or quantization_config=, not both")
        config = as_torchao_config(quantization_config)
        return config.quantization, config.group_size
    if quantization is None:
        if group_size is not None:
            raise ValueError(f"group_size={group_size!r} needs quantization='int4' or 'int8'")
        return None, None
    return check_quantization(quantization), check_group_size(group_size)


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


# ----- transformers' / torchao's spelling: TorchAoConfig("int4_weight_only", group_size=128) -----

TORCHAO_TYPES = {"int4_weight_only": "int4", "int8_weight_only": "int8"}  # quant_type -> llamaviz scheme
TORCHAO_CLASSES = {"Int4WeightOnlyConfig": "int4_weight_only", "Int8WeightOnlyConfig": "int8_weight_only"}
TORCHAO_DEFAULT_GROUP = {"int4_weight_only": 128}  # torchao's int4 default; int8: llamaviz chooses (see quantize_model)


class TorchAoConfig:
    """The documented quantization_config spelling, for the weight-only schemes llamaviz implements.

    quant_type is "int4_weight_only" or "int8_weight_only", or a torchao Int4WeightOnlyConfig /
    Int8WeightOnlyConfig object (its group_size is read). int4 groups default to 128, as in torchao;
    int8's group_size=None lets quantize_model choose (torchao's int8 is one scale per row instead).
    """

    quant_method = "torchao"

    def __init__(self, quant_type, group_size: int | None = None, **kwargs):
        if kwargs:
            raise ValueError(f"TorchAoConfig accepts quant_type and group_size; {', '.join(sorted(kwargs))} "
                             "is not supported by llamaviz")
        if type(quant_type).__name__ in TORCHAO_CLASSES and type(quant_type).__module__.startswith("torchao"):
            group_size = getattr(quant_type, "group_size", None) if group_size is None else group_size
            quant_type = TORCHAO_CLASSES[type(quant_type).__name__]
        if quant_type not in TORCHAO_TYPES:
            raise ValueError(f"TorchAoConfig quant_type {quant_type!r} is not implemented by llamaviz; supported: "
                             f"{', '.join(map(repr, TORCHAO_TYPES))} (or torchao's {', '.join(TORCHAO_CLASSES)})")
        self.quant_type = quant_type
        self.quantization = TORCHAO_TYPES[quant_type]
        self.group_size = check_group_size(TORCHAO_DEFAULT_GROUP.get(quant_type) if group_size is None else group_size)

    def __repr__(self) -> str:
        return f"TorchAoConfig({self.quant_type!r}, group_size={self.group_size!r})"


def as_torchao_config(config) -> TorchAoConfig:
    """llamaviz's TorchAoConfig from itself, from transformers' TorchAoConfig, or from a torchao config object."""
    if isinstance(config, TorchAoConfig):
        return config
    if type(config).__name__ == "TorchAoConfig" and hasattr(config, "quant_type"):  # transformers' class
        return TorchAoConfig(config.quant_type, **(getattr(config, "quant_type_kwargs", None) or {}))
    if type(config).__name__ in TORCHAO_CLASSES:
        return TorchAoConfig(config)
    raise ValueError(f"quantization_config must be a TorchAoConfig (llamaviz's or transformers') or a torchao "
                     f"{' / '.join(TORCHAO_CLASSES)}, got {type(config).__name__}")
