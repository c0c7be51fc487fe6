"""Training a dictionary on harvested activations: TopK (with AuxK for dead latents), BatchTopK (saved as
jumprelu with its threshold), JumpReLU, ReLU + L1; Adam with warm-up and decay, gradient clipping.

Inputs are scaled to an average norm of sqrt(d) while training and the scale is folded into the
weights at the end, so the saved dictionary reads raw activations. Batches are a seeded permutation
of the tokens indexed by step, so a run resumed from its checkpoint ends with the weights an
uninterrupted run has. A checkpoint (safetensors + JSON, no pickle) is written every
`checkpoint_every` steps and on Ctrl-C. A streamed run (stream.py) hands each step its batch instead.
TopK and BatchTopK read and decode only the kept latents (sparsity.gathered, sparsity.decode_entries):
the backward touches only those, not the dense [batch, width] product.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from llamaviz.features import sparsity as sparse

TRAINED = ("topk", "batchtopk", "jumprelu", "relu")


@dataclass
class TrainConfig:
    architecture: str = "topk"   # one of TRAINED
    width: int = 4608            # latents (d_sae)
    k: int = 32                  # topk / batchtopk: latents per token
    lr: float = 4e-4
    l1: float = 2.0              # relu: L1 coefficient on acts x decoder norm
    l0: float = 2.0              # jumprelu: coefficient of the L0 penalty
    batch_size: int = 1024
    warmup: float = 0.05         # fraction of steps with a linear warm-up
    decay: float = 0.2           # final fraction of steps with a linear decay to 0
    clip: float = 1.0            # gradient norm clip
    aux_k: int = 256             # topk: latents of the auxiliary loss on dead ones
    dead_steps: int = 100        # a latent unfired this many steps counts as dead
    seed: int = 0
    checkpoint_every: int = 200
    steps: int | None = None     # None: one pass over the harvested tokens

    def check(self) -> None:
        if self.architecture not in TRAINED:
            raise ValueError(f"--architecture {self.architecture!r} is not trainable; accepted: {', '.join(TRAINED)}")
        if self.width < 1 or self.batch_size < 1 or (self.architecture in ("topk", "batchtopk")
                                                     and not 0 < self.k <= self.width):
            raise ValueError(f"width, batch size and k must be positive (k <= width); got {self.width}, "
                             f"{self.batch_size}, {self.k}")


class Trainer:
    """Trains on x [n, d_in] -> y [n, d_out] (y = x for an SAE; skip=True adds a linear skip path)."""

    def __init__(self, cfg: TrainConfig, x: np.ndarray, y: np.ndarray | None = None, skip: bool = False):
        cfg.check()
        self.cfg, self.x, self.y = cfg, x, (x if y is None else y)
        self.transcoder, self.skip = y is not None, skip
        self.per_epoch = len(x) // cfg.batch_size
        self.steps = cfg.steps or self.per_epoch
        if self.per_epoch < 1:
            raise ValueError(f"{len(x):,} tokens are fewer than one batch of {cfg.batch_size}; harvest more")
        d_in, d_out = x.shape[1], self.y.shape[1]
        self.scale_in, self.scale_out = _scale(x), _scale(self.y)
        generator = torch.Generator().manual_seed(cfg.seed)
        W_dec = torch.randn(cfg.width, d_out, generator=generator)
        W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True) * 0.1
        self.params = {"W_enc": W_dec.T.clone() if d_in == d_out else torch.randn(d_in, cfg.width, generator=generator)
                       / math.sqrt(d_in), "W_dec": W_dec, "b_enc": torch.zeros(cfg.width),
                       "b_dec": torch.from_numpy(np.array(self.y[:4096], dtype=np.float32)).mean(0) * self.scale_out}
        if cfg.architecture == "jumprelu":
            self.params["log_threshold"] = torch.full((cfg.width,), math.log(0.1))
        if skip:
            self.params["W_skip"] = torch.zeros(d_out, d_in)
        for p in self.params.values():
            p.requires_grad_(True)
        self.optimizer = torch.optim.Adam(list(self.params.values()), lr=cfg.lr, betas=(0.9, 0.999))
        self.step, self.unfired = 0, torch.zeros(cfg.width)
        self.threshold = torch.zeros(())  # batchtopk: running mean of the smallest kept activation

    # ----- one step
    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, offset = divmod(step, self.per_epoch)
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch))
        index = order[offset * self.cfg.batch_size:(offset + 1) * self.cfg.batch_size].sort().values.numpy()
        x = torch.from_numpy(np.array(self.x[index], dtype=np.float32)) * self.scale_in
        y = x if not self.transcoder else torch.from_numpy(np.array(self.y[index], dtype=np.float32)) * self.scale_out
        return x, y

    def encode(self, x: torch.Tensor, training: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(pre, acts) in the scaled space."""
        p, cfg = self.params, self.cfg
        pre = (x if self.transcoder else x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
        if cfg.architecture == "topk":
            return pre, sparse.topk(pre, cfg.k)
        if cfg.architecture == "batchtopk":
            return pre, sparse.batch_topk(pre, cfg.k) if training else pre * (pre > self.threshold)
        if cfg.architecture == "jumprelu":
            return pre, sparse.jump_relu(pre, p["log_threshold"].exp())
        return pre, pre.relu()

    def decode(self, acts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        sparse_acts = self.cfg.architecture in ("topk", "batchtopk")
        out = (sparse.decode(acts, self.params["W_dec"]) if sparse_acts else acts @ self.params["W_dec"]) + self.params["b_dec"]
        return out + x @ self.params["W_skip"].T if self.skip else out

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
        if self.cfg.architecture in ("topk", "batchtopk"):
            return self.sparse_loss(x, y)
        pre, acts = self.encode(x)
        recon = self.decode(acts, x)
        mse = (recon - y).pow(2).sum(-1).mean()
        loss, cfg = mse, self.cfg
        if cfg.architecture == "relu":
            loss = loss + cfg.l1 * (acts * self.params["W_dec"].norm(dim=-1)).sum(-1).mean()
        if cfg.architecture == "jumprelu":
            loss = loss + cfg.l0 * sparse.step(pre, self.params["log_threshold"].exp()).sum(-1).mean()
        return loss, self.stats(mse, y, (acts > 0).any(0).detach(), (acts > 0).sum().item())

    def sparse_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """TopK / BatchTopK with AuxK: the dense encoder product runs once without a gradient; the loss
        reads only the kept (and the auxiliary) latents, so its backward touches only those (the dense
        autograd graph through encode and decode is the reference, tests/test_training.py)."""
        p, cfg, batch = self.params, self.cfg, x.shape[0]
        x_in = x if self.transcoder else x - p["b_dec"]
        with torch.no_grad():
            pre = torch.addmm(p["b_enc"], x_in, p["W_enc"])
            select = sparse.topk_entries if cfg.architecture == "topk" else sparse.batch_topk_entries
            rows, cols = select(pre, cfg.k)
        values = sparse.gathered(x_in, p["W_enc"], p["b_enc"], pre, rows, cols).relu()
        recon = sparse.decode_entries(rows, cols, values, p["W_dec"], batch) + p["b_dec"]
        recon = recon + x @ p["W_skip"].T if self.skip else recon
        mse = (recon - y).pow(2).sum(-1).mean()
        loss = mse + self.aux_loss(x_in, pre, y - recon.detach()) / 32
        live = values.detach() > 0
        fired = torch.bincount(cols[live], minlength=cfg.width) > 0
        if cfg.architecture == "batchtopk" and live.any():
            smallest = values.detach()[live].min()
            self.threshold = 0.99 * self.threshold + 0.01 * smallest if self.step else smallest
        return loss, self.stats(mse, y, fired, int(live.sum()))

    def stats(self, mse: torch.Tensor, y: torch.Tensor, fired: torch.Tensor, active: int) -> dict:
        self.unfired = torch.where(fired, torch.zeros_like(self.unfired), self.unfired + 1)
        total = ((y - y.mean(0)).pow(2).sum(-1).mean()).clamp(min=1e-12)
        return {"explained variance": 1 - mse.item() / total.item(), "L0": active / y.shape[0],
                "dead": (self.unfired >= self.cfg.dead_steps).float().mean().item()}

    def aux_loss(self, x_in: torch.Tensor, pre: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """AuxK: the dead latents' top aux_k activations reconstruct what the live ones missed."""
        dead = (self.unfired >= self.cfg.dead_steps).nonzero().squeeze(1)
        if not len(dead):
            return pre.new_zeros(())
        p = self.params
        rows, among = sparse.topk_entries(pre[:, dead], min(self.cfg.aux_k, len(dead)))
        cols = dead[among]
        values = sparse.gathered(x_in, p["W_enc"], p["b_enc"], pre, rows, cols).relu()
        recon = sparse.decode_entries(rows, cols, values, p["W_dec"], pre.shape[0])
        return (recon - residual).pow(2).sum(-1).mean() / residual.pow(2).sum(-1).mean().clamp(min=1e-12)

    def learning_rate(self, step: int) -> float:
        total, cfg = self.steps, self.cfg
        warm, decay_from = max(1, int(cfg.warmup * total)), int((1 - cfg.decay) * total)
        if step < warm:
            return cfg.lr * (step + 1) / warm
        if step >= decay_from:
            return cfg.lr * max(0.0, (total - step) / max(1, total - decay_from))
        return cfg.lr

    def train_step(self, batch: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
        """One step on batch (raw x, y activations) or, without one, on the step's slice of the harvest."""
        if batch is None:
            x, y = self.batch(self.step)
        else:
            x = torch.as_tensor(batch[0], dtype=torch.float32) * self.scale_in
            y = x if not self.transcoder else torch.as_tensor(batch[1], dtype=torch.float32) * self.scale_out
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(self.step)
        loss, stats = self.loss(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.cfg.clip)
        self.optimizer.step()
        if self.cfg.architecture in ("topk", "batchtopk"):
            with torch.no_grad():  # unit decoder rows: the activations carry the scale
                self.params["W_dec"] /= self.params["W_dec"].norm(dim=-1, keepdim=True).clamp(min=1e-8)
        self.step += 1
        return stats

    # ----- checkpoints
    def save_checkpoint(self, folder: Path) -> None:
        tensors = {f"param.{n}": p.detach() for n, p in self.params.items()}
        for index, p in enumerate(self.params.values()):
            tensors |= {f"adam.{index}.{key}": value for key, value in self.optimizer.state[p].items()}
        tensors |= {"unfired": self.unfired, "threshold": self.threshold.reshape(1)}
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "checkpoint.tmp"))
        (folder / "checkpoint.json.tmp").write_text(json.dumps({"step": self.step, "config": asdict(self.cfg),
                                                                      "scales": [self.scale_in, self.scale_out]}))
        (folder / "checkpoint.tmp").replace(folder / "checkpoint.safetensors")  # atomic: kill -9 keeps the last one
        (folder / "checkpoint.json.tmp").replace(folder / "checkpoint.json")

    def load_checkpoint(self, folder: Path) -> None:
        info = json.loads((folder / "checkpoint.json").read_text())
        if info["config"] != asdict(self.cfg):
            changed = [k for k in info["config"] if info["config"][k] != asdict(self.cfg).get(k)]
            raise ValueError(f"--resume with other settings than the checkpoint's: {', '.join(changed)}")
        tensors = load_file(str(folder / "checkpoint.safetensors"))
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(tensors[f"param.{name}"])
        for index, p in enumerate(self.params.values()):
            self.optimizer.state[p] = {key.split(".", 2)[2]: value for key, value in tensors.items()
                                       if key.startswith(f"adam.{index}.")}
        self.unfired, self.threshold, self.step = tensors["unfired"], tensors["threshold"][0], info["step"]
        self.scale_in, self.scale_out = info.get("scales", [self.scale_in, self.scale_out])


def _scale(values: np.ndarray) -> float:
    """sqrt(d) / the average norm of a sample: the factor that brings activations to norm sqrt(d)."""
    sample = torch.from_numpy(np.array(values[:: max(1, len(values) // 4096)], dtype=np.float32))
    return float(math.sqrt(values.shape[1]) / sample.norm(dim=-1).mean().clamp(min=1e-12))
