"""Tensor parallelism on torch.distributed: the heads and MLP features of every layer split across ranks.

The plan is PyTorch's own (DTensor and torch.distributed.tensor.parallel): q/k/v and gate/up are
sharded column-wise (each rank computes its heads / its slice of the MLP features), o_proj and
down_proj row-wise (each rank's partial product is summed by an all-reduce), so the residual stream
is whole and identical on every rank. Embeddings, norms and lm_head are replicated.

Hook names do not change. Head-shaped hooks (q, k, v, rot_q, rot_k, attn_scores, pattern, z) and the
MLP's feature hooks see this rank's slice; `hook.shard` says which global heads (or features) those
are, and `hook.gathered(x)` joins every rank's slice in global order (run_with_cache uses it).
"""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from llamaviz.llama.attention import LlamaAttention
from llamaviz.llama.modeling import LlamaMLP

TP_PLANS = ("auto",)
TIMEOUT_ENV = "LLAMAVIZ_TP_TIMEOUT"  # seconds a collective may wait for the other ranks before failing
DEFAULT_TIMEOUT_S = 300.0
LAUNCH_HINT = ("start the program with `torchrun --nproc-per-node N your_script.py` (or `torchrun "
               "--nproc-per-node N -m llamaviz run ...`), or call torch.distributed.init_process_group first")
_HEAD_HOOKS = {"hook_q": ("q", 2), "hook_rot_q": ("q", 2), "hook_z": ("q", 2), "hook_attn_scores": ("q", 1),
               "hook_pattern": ("q", 1), "hook_k": ("kv", 2), "hook_rot_k": ("kv", 2), "hook_v": ("kv", 2),
               "hook_result": ("q", 2)}
_FEATURE_HOOKS = ("hook_pre", "hook_pre_linear", "hook_post")  # [b, p, f] inside the MLP


@dataclasses.dataclass(frozen=True)
class HookShard:
    """Which slice of a full activation one rank's hook sees: indices start..stop of `size` along `dim`."""

    dim: int  # the sharded dim of the activation: heads ([b, p, h, d]: 2; [b, h, p, k]: 1) or features
    start: int
    stop: int
    size: int  # the full extent of that dim (all ranks together)
    mesh: DeviceMesh
    unit: str = "heads"  # "heads" or "features"

    @property
    def indices(self) -> range:
        """The global indices along `dim` this rank holds: heads, or MLP features for the MLP hooks."""
        return range(self.start, self.stop)

    heads = indices  # the name that reads right on head-shaped hooks

    def gathered(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's slice joined in global order along `dim`: the single-process activation."""
        shape = list(x.shape)
        shape[self.dim] = self.size
        full = DTensor.from_local(x.contiguous(), self.mesh, [Shard(self.dim)], run_check=False,
                                  shape=torch.Size(shape), stride=_contiguous_stride(shape))
        return full.full_tensor()

    def summed(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of a partial result (each rank's heads' share of the attention output)."""
        return DTensor.from_local(x.contiguous(), self.mesh, [Partial()], run_check=False).full_tensor()

    def local(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a full activation (e.g. a donor from a gathered cache)."""
        if full.shape[self.dim] != self.size:
            raise ValueError(f"expected a full activation with {self.size} {self.unit} on dim {self.dim}, "
                             f"got shape {tuple(full.shape)}")
        return full.narrow(self.dim, self.start, self.stop - self.start)

    def held(self, indices) -> tuple[list[int], list[int]]:
        """(global indices among `indices` this rank holds, their positions in this rank's slice)."""
        mine = [i for i in indices if self.start <= i < self.stop]
        return mine, [i - self.start for i in mine]


def _contiguous_stride(shape: list[int]) -> tuple[int, ...]:
    stride, step = [], 1
    for extent in reversed(shape):
        stride.append(step)
        step *= extent
    return tuple(reversed(stride))


def init_tensor_parallel(timeout_s: float | None = None) -> DeviceMesh:
    """The 1-D mesh of all ranks; starts the process group (nccl on CUDA, gloo on CPU) if torchrun set it up."""
    if not dist.is_available():
        raise RuntimeError("tp_plan needs torch.distributed, which this PyTorch build lacks")
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise RuntimeError(f"tp_plan='auto' needs a process group, and this program was not started by "
                               f"torchrun; {LAUNCH_HINT}")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        seconds = timeout_s if timeout_s is not None else float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=seconds))
    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, (dist.get_world_size(),))


def rank_device(mesh: DeviceMesh) -> torch.device:
    """The device this rank computes on: its CUDA device under nccl, else the CPU."""
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_tp(config, world: int, tp_plan="auto") -> None:
    """ValueError unless tp_plan is known and `world` ranks split the kv heads and MLP features evenly."""
    if tp_plan not in TP_PLANS:
        raise ValueError(f"tp_plan {tp_plan!r} is not supported; accepted: {', '.join(map(repr, TP_PLANS))} or None")
    g, f = config.num_key_value_heads, config.intermediate_size
    if g % world or f % world:
        working = [n for n in range(1, g + 1) if g % n == 0 and f % n == 0]
        raise ValueError(
            f"tensor parallelism over {world} ranks splits whole key/value heads and equal MLP slices, but the "
            f"model has num_key_value_heads={g} and intermediate_size={f}; rank counts that work: "
            f"{', '.join(map(str, working))} (torchrun --nproc-per-node N)")


def shard_model(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Apply the column/row-wise plan to every attention and MLP block (on the meta device or not)."""
    world, rank = mesh.size(), mesh.get_local_rank()
    for module in model.modules():
        if isinstance(module, LlamaAttention):
            _shard_attention(module, mesh, world, rank)
        elif isinstance(module, LlamaMLP):
            _shard_mlp(module, mesh, world, rank)
    model.tp_mesh, model.tp_size = mesh, world
    return model


def _shard_attention(attn: LlamaAttention, mesh: DeviceMesh, world: int, rank: int) -> None:
    counts = {"q": attn.num_heads, "kv": attn.kv_heads}
    parallelize_module(attn, mesh, {"q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(),
                                    "v_proj": ColwiseParallel(), "o_proj": RowwiseParallel()})
    for name, (kind, dim) in _HEAD_HOOKS.items():
        per_rank = counts[kind] // world
        getattr(attn, name).shard = HookShard(dim, rank * per_rank, (rank + 1) * per_rank, counts[kind], mesh)
    attn.num_heads, attn.kv_heads = counts["q"] // world, counts["kv"] // world  # what this rank computes
    attn.o_proj.register_forward_hook(_wait_for_sum)
    attn.register_forward_hook(_gather_pattern)


def _gather_pattern(attn: LlamaAttention, inputs, output):
    """The attention probabilities a layer returns (output_attentions) in full, as without TP."""
    out, pattern = output
    if pattern is None:
        return None
    return out, attn.hook_pattern.shard.gathered(pattern)


def _wait_for_sum(linear: nn.Module, inputs, output):
    """A row-wise layer's all-reduced output as a plain tensor, so hooks and caches hold ordinary tensors."""
    return output.wait() if isinstance(output, AsyncCollectiveTensor) else None


def _shard_mlp(mlp: LlamaMLP, mesh: DeviceMesh, world: int, rank: int) -> None:
    f = mlp.gate_proj.out_features
    parallelize_module(mlp, mesh, {"gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel(),
                                   "down_proj": RowwiseParallel()})
    mlp.down_proj.register_forward_hook(_wait_for_sum)
    per_rank = f // world
    for name in _FEATURE_HOOKS:
        getattr(mlp, name).shard = HookShard(2, rank * per_rank, (rank + 1) * per_rank, f, mesh, "features")


def empty_like_dtensor(tensor: DTensor, dtype: torch.dtype, device: torch.device) -> DTensor:
    """A DTensor of `tensor`'s global shape and placements whose local shard is fresh storage on `device`."""
    local = torch.empty(tensor.to_local().shape, dtype=dtype, device=device)
    return DTensor.from_local(local, tensor.device_mesh, tensor.placements, run_check=False,
                              shape=tensor.shape, stride=tensor.stride())


def local_slice(tensor: DTensor) -> tuple[int, int, int] | None:
    """(dim, start, stop) of the global tensor this rank holds, or None when it holds all of it."""
    placement = tensor.placements[0]
    if not isinstance(placement, Shard):
        return None
    dim = placement.dim % tensor.dim()
    rows = tensor.to_local().shape[dim]
    start = tensor.device_mesh.get_local_rank() * -(-tensor.shape[dim] // tensor.device_mesh.size())
    return dim, start, start + rows
