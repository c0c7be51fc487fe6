"""The SAELens side of benchmarks/train_vs_saelens.py: runs inside .venv-peers (sae-lens 6.54).

Trains a TopK SAE with SAELens's own SAETrainer on rows [0, split) of a harvested [tokens, d] .npy
file (memory-mapped), fed through a data provider that yields seeded shuffled batches; SAELens
estimates its input scale (expected_average_only_in) and folds it into the weights, as llamaviz
does. Writes the inference SAE (SAELens's save_inference_model) to --out and prints one JSON line:
{"seconds": training time (SAE built, norm estimated, fit), "tokens": samples trained on}.

    .venv-peers/bin/python benchmarks/saelens_train_worker.py --npy H/blocks.10.hook_resid_post.npy \
        --split 60000 --width 2304 --k 32 --batch 1024 --lr 4e-4 --steps 100 --out /tmp/sae
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def batches(x: np.ndarray, split: int, batch: int, seed: int):
    """Endless [batch, d] float32 tensors: a seeded permutation of rows [0, split) per epoch."""
    epoch = 0
    while True:
        order = np.random.default_rng(seed * 7919 + epoch).permutation(split)
        for start in range(0, split - batch + 1, batch):
            index = np.sort(order[start:start + batch])
            yield torch.from_numpy(np.asarray(x[index], dtype=np.float32))
        epoch += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--npy", required=True)
    parser.add_argument("--split", type=int, required=True, help="train on rows [0, split)")
    for name, kind in (("width", int), ("k", int), ("batch", int), ("lr", float), ("steps", int), ("seed", int),
                       ("threads", int), ("warmup", int), ("decay", int), ("dead-window", int)):
        parser.add_argument(f"--{name}", type=kind, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(max(1, args.threads))
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    x = np.load(args.npy, mmap_mode="r")
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=args.width, k=args.k, dtype="float32",
                                                device="cpu", normalize_activations="expected_average_only_in"))
    cfg = SAETrainerConfig(total_training_samples=args.steps * args.batch, train_batch_size_samples=args.batch,
                           lr=args.lr, lr_end=args.lr, lr_warm_up_steps=args.warmup, lr_decay_steps=args.decay,
                           device="cpu",
                           dead_feature_window=args.dead_window or 1000, feature_sampling_window=10**9,
                           n_batches_for_norm_estimate=max(1, 4096 // args.batch))
    trainer = SAETrainer(cfg, sae, batches(x, args.split, args.batch, args.seed))
    trainer.fit()
    seconds = time.perf_counter() - start
    sae.save_inference_model(Path(args.out))
    print(json.dumps({"seconds": seconds, "tokens": trainer.n_training_samples}))


if __name__ == "__main__":
    main()
