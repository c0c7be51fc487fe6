"""run_with_cache and the memory guard that refuses a capture too big for the machine."""

from __future__ import annotations

import os

import torch

from . import activation_cache
from .activation_cache import ActivationCache


def activation_numel(name: str, config, batch: int, positions: int, key_positions: int) -> int:
    """Elements one hook point holds for a forward over `positions` queries and `key_positions` keys."""
    h, g, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    suffix = name.rsplit(".", 1)[-1]
    per_position = {
        "hook_attn_scores": h * key_positions, "hook_pattern": h * key_positions,
        "hook_q": h * d, "hook_rot_q": h * d, "hook_z": h * d,
        "hook_k": g * d, "hook_rot_k": g * d, "hook_v": g * d,
        "hook_pre": config.intermediate_size, "hook_pre_linear": config.intermediate_size,
        "hook_post": config.intermediate_size if ".mlp." in name else config.hidden_size,
        "hook_logits": config.vocab_size, "hook_result": h * config.hidden_size, "hook_scale": 1,
    }.get(suffix, config.hidden_size)
    return batch * positions * per_position


def available_memory(device: torch.device) -> int:
    """Free bytes on the device: GPU free memory, or MemAvailable of the host."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_memory(model, names: list[str], batch: int, positions: int, key_positions: int,
                 dtype: torch.dtype, memory_budget: int | None = None, device=None) -> int:
    """Estimated bytes of a capture; raises MemoryError with the estimate when over the budget."""
    size = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 8
    total = sum(activation_numel(n, model.config, batch, positions, key_positions) for n in names) * size
    target = torch.device(device) if device is not None else model.device
    budget = memory_budget if memory_budget is not None else int(
        activation_cache.MEMORY_BUDGET_FRACTION * available_memory(target))
    if total > budget:
        raise MemoryError(
            f"capturing {len(names)} activations for {batch} x {positions} tokens needs about "
            f"{total / 2**20:,.0f} MiB, over the budget of {budget / 2**20:,.0f} MiB; pass a names_filter "
            "(e.g. names_filter=lambda n: n.endswith('hook_pattern') and n.startswith('blocks.0.')) "
            "or a larger memory_budget=")
    return total


class CachingMixin:
    """Adds run_with_cache to a HookedRootModule."""

    def run_with_cache(self, input_ids, names_filter=None, device=None, memory_budget: int | None = None,
                       remove_batch_dim: bool = False, **forward_kwargs):
        """One forward that records the named activations: (logits or last hidden state, ActivationCache).

        On a causal LM the first item follows forward's return_type ("logits" by default, TransformerLens);
        text is tokenized by to_tokens; remove_batch_dim drops a batch axis of size 1 from every activation.
        """
        if hasattr(self, "text_input"):
            input_ids, mask = self.text_input(input_ids, forward_kwargs.pop("attention_mask", None),
                                              forward_kwargs.pop("prepend_bos", None),
                                              forward_kwargs.pop("padding_side", None))
            forward_kwargs["attention_mask"] = mask
        names = self.resolve_hook_names(names_filter)
        batch, positions = input_ids.shape[:2]
        if remove_batch_dim and batch != 1:
            raise ValueError(f"remove_batch_dim=True needs a batch of one, got {batch}")
        past = forward_kwargs.get("past_key_values")
        key_positions = positions + (past.get_seq_length() if past is not None else 0)
        check_memory(self, names, batch, positions, key_positions, self.dtype, memory_budget, device)
        store: dict[str, torch.Tensor] = {}

        def record(x: torch.Tensor, hook) -> None:
            x = hook.gathered(x.detach())  # heads in global order under tensor parallelism
            store[hook.name] = x if device is None else x.to(device)

        if self.tl_return_type is not None:
            forward_kwargs.setdefault("return_type", self.tl_return_type)
        with self.hooks(fwd_hooks=[(name, record) for name in names]):
            out = self(input_ids, **forward_kwargs)
        tokens = input_ids.detach().cpu() if not input_ids.is_floating_point() else None
        cache = ActivationCache(store, model=self, tokens=tokens)
        if self.tl_return_type is None:
            out = out.logits if getattr(out, "logits", None) is not None else out[0]
        return out, cache.remove_batch_dim() if remove_batch_dim else cache
