"""`llamaviz features train` as a function: harvest once, train, fold the scale in, evaluate, save.

The job's folder holds harvest/ (the activations, reused by --resume and by other runs), checkpoint/
(the trainer's state, every checkpoint_every steps and on Ctrl-C) and the dictionary (SAELens's
files) or, for a transcoder set, circuit-tracer's layout. Evaluation on held-out tokens is stored in
the dictionary's metadata and printed.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from llamaviz.features.attach import attached
from llamaviz.features.dictionary import Dictionary, DictionaryConfig
from llamaviz.features.harvest import harvest, open_harvest
from llamaviz.features.saelens_files import save
from llamaviz.features.stream import StreamedRun, Target, capture, plan as make_plan
from llamaviz.features.training import TrainConfig, Trainer
from llamaviz.features.transcoder_set import TranscoderSet, save_transcoder_set

HELD_OUT = 0.05  # fraction of the harvested tokens kept for evaluation


def train_dictionary(model, tokenizer, windows: torch.Tensor, hook: str, out, cfg: TrainConfig, resume: bool = False,
                     hook_out: str | None = None, dtype: str = "float32", keep_special: bool = False,
                     progress: bool = True) -> tuple[Dictionary, str]:
    """(dictionary, "done" | "interrupted"); hook_out makes it a transcoder from hook to hook_out (with skip)."""
    out = Path(out)
    hooks = [hook] + ([hook_out] if hook_out else [])
    folder = out / "harvest"
    if not (resume and (folder / "harvest.json").exists()):
        harvest(model, tokenizer, windows, hooks, folder, dtype, keep_special)
    x, y = (open_harvest(folder, h) for h in (hook, hook_out or hook))
    split = max(1, int(len(x) * (1 - HELD_OUT)))
    trainer = Trainer(cfg, x[:split], y[:split] if hook_out else None, skip=hook_out is not None)
    if resume and (out / "checkpoint" / "checkpoint.json").exists():
        trainer.load_checkpoint(out / "checkpoint")
    status = run(trainer, out / "checkpoint", progress)
    dictionary = to_dictionary(trainer, hook, hook_out, model)
    if status == "done":
        scores = evaluate(dictionary, x[split:], y[split:])
        scores |= evaluate_in_model(model, dictionary, windows[-max(1, len(windows) // 20):])
        dictionary.cfg.metadata["evaluation"] = {k: v for k, v in scores.items() if k != "log10 frequency"}
        dictionary.cfg.metadata["training"] = asdict(cfg) | {"tokens": int(split)}
        save(dictionary, out, sparsity=scores["log10 frequency"])
    return dictionary, status


def train_streamed(model, tokenizer, windows: torch.Tensor, targets: list[Target], out, resume: bool = False,
                   keep_special: bool = False, progress: bool = True, chunk_windows: int = 64,
                   transcoder_set: str | None = None, on_chunk=None) -> tuple[dict, str]:
    """({name: dictionary}, status) of one streamed pass training every target (stream.py); each dictionary is
    saved as out/<name> (SAELens's folder), and targets named f"{transcoder_set}/layer_{L}" also as one
    circuit-tracer set at out/<transcoder_set>. Held-out scores go into the metadata."""
    out = Path(out)
    the_plan = make_plan(tokenizer, windows, chunk_windows, keep_special)
    run_ = StreamedRun(model, targets, the_plan, out)
    status = run_.run(resume, progress, on_chunk)
    if status != "done":
        return {}, status
    held = the_plan.held_out[:16]
    acts = capture(model, held, the_plan.held_keep[:16], run_.hooks)
    done = {}
    for target in targets:
        dictionary = to_dictionary(run_.trainers[target.name], target.hook, target.hook_out, model)
        x, y = acts[target.hook].numpy(), acts[target.hook_out or target.hook].numpy()
        scores = evaluate(dictionary, x, y)
        if target.hook_out is None:
            scores |= evaluate_in_model(model, dictionary, held[:8])
        dictionary.cfg.metadata["evaluation"] = {k: v for k, v in scores.items() if k != "log10 frequency"}
        dictionary.cfg.metadata["training"] = asdict(run_.trainers[target.name].cfg) | {
            "tokens": int(the_plan.keep.sum()), "streamed": True}
        save(dictionary, out / target.name, sparsity=scores["log10 frequency"])
        done[target.name] = dictionary
    if transcoder_set is not None:
        layers = [done[t.name] for t in targets if t.name.startswith(f"{transcoder_set}/")]
        tc = TranscoderSet(layers, str(getattr(model, "name_or_path", "")))
        save_transcoder_set(tc, out / transcoder_set)
        (out / transcoder_set / "evaluation.json").write_text(json.dumps(evaluate_in_model(model, tc, held[:8]), indent=2))
    return done, status


def run(trainer: Trainer, checkpoints: Path, progress: bool = True) -> str:
    """Train to the last step with a progress bar; Ctrl-C writes a checkpoint and returns "interrupted"."""
    from tqdm.auto import tqdm

    bar = tqdm(total=trainer.steps, initial=trainer.step, disable=not progress, unit="step")
    start, first = time.perf_counter(), trainer.step
    try:
        while trainer.step < trainer.steps:
            stats = trainer.train_step()
            rate = (trainer.step - first) * trainer.cfg.batch_size / max(1e-9, time.perf_counter() - start)
            bar.update(1)
            bar.set_postfix({"tok/s": f"{rate:,.0f}", "EV": f"{stats['explained variance']:.3f}",
                             "L0": f"{stats['L0']:.1f}", "dead": f"{stats['dead']:.2%}"}, refresh=False)
            if trainer.step % trainer.cfg.checkpoint_every == 0:
                trainer.save_checkpoint(checkpoints)
    except KeyboardInterrupt:
        trainer.save_checkpoint(checkpoints)
        return "interrupted"
    finally:
        bar.close()
    trainer.save_checkpoint(checkpoints)
    return "done"


def to_dictionary(trainer: Trainer, hook: str, hook_out: str | None, model) -> Dictionary:
    """The trained weights with the input/output scales folded in: the dictionary reads raw activations."""
    p = {name: value.detach().clone() for name, value in trainer.params.items()}
    s_in, s_out, cfg = trainer.scale_in, trainer.scale_out, trainer.cfg
    architecture = {"topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu", "relu": "standard"}[cfg.architecture]
    if hook_out:
        architecture = "jumprelu_skip_transcoder" if architecture == "jumprelu" else "skip_transcoder"
    d_in, d_out = p["W_enc"].shape[0], p["W_dec"].shape[1]
    dictionary = Dictionary(DictionaryConfig(
        architecture=architecture, d_in=d_in, d_sae=cfg.width, hook_name=hook, d_out=d_out if hook_out else None,
        hook_name_out=hook_out, k=cfg.k if architecture == "topk" else None, apply_b_dec_to_input=hook_out is None,
        metadata={"model_name": str(getattr(model, "name_or_path", "")), "context_size": None, "prepend_bos": True}))
    state = {"W_enc": p["W_enc"] * s_in, "W_dec": p["W_dec"] / s_out, "b_enc": p["b_enc"], "b_dec": p["b_dec"] / s_out}
    if "threshold" in dict(dictionary.named_parameters()):
        state["threshold"] = (p["log_threshold"].exp() if cfg.architecture == "jumprelu"
                              else trainer.threshold.expand(cfg.width).clone())
    if hook_out:
        state["W_skip"] = p["W_skip"] * s_in / s_out
    dictionary.load_state_dict(state)
    return dictionary


def evaluate(dictionary: Dictionary, x: np.ndarray, y: np.ndarray, batch: int = 4096) -> dict:
    """Explained variance, L0, dead and dense fractions, log10 firing frequency on held-out activations."""
    squared, total, active, fired, count = 0.0, 0.0, 0.0, None, 0
    mean = torch.from_numpy(np.array(y, dtype=np.float32)).mean(0)
    with torch.no_grad():
        for start in range(0, len(x), batch):
            xs = torch.from_numpy(np.array(x[start:start + batch], dtype=np.float32))
            ys = torch.from_numpy(np.array(y[start:start + batch], dtype=np.float32))
            acts = dictionary.encode(xs)
            squared += (dictionary.decode(acts, xs) - ys).pow(2).sum().item()
            total += (ys - mean).pow(2).sum().item()
            on = (acts > 0).float()
            active += on.sum().item()
            fired = on.sum(0) if fired is None else fired + on.sum(0)
            count += len(xs)
    frequency = fired / max(1, count)
    return {"explained variance": 1 - squared / max(total, 1e-12), "L0": active / max(1, count),
            "dead fraction": (frequency == 0).float().mean().item(),
            "dense fraction": (frequency > 0.1).float().mean().item(),
            "log10 frequency": frequency.clamp(min=1e-10).log10()}


def evaluate_in_model(model, dictionary: Dictionary | TranscoderSet, windows: torch.Tensor) -> dict:
    """SAELens's CE loss score and KL score against zero ablation, and the loss with the dictionary spliced in
    (a transcoder set: every layer spliced in at once, against zeroing every MLP's output)."""
    cfgs = [d.cfg for d in dictionary] if isinstance(dictionary, TranscoderSet) else [dictionary.cfg]
    zero = [(cfg.hook_name_out or cfg.hook_name, lambda x, hook: torch.zeros_like(x)) for cfg in cfgs]
    with torch.no_grad():
        clean = model(windows, return_type="logits").log_softmax(-1)
        with attached(model, dictionary):
            spliced = model(windows, return_type="logits").log_softmax(-1)
        zero = model.run_with_hooks(windows, return_type="logits", fwd_hooks=zero).log_softmax(-1)
    nxt = windows[:, 1:, None]

    def ce(logp):
        return -logp[:, :-1].gather(-1, nxt).mean().item()

    def kl(logp):
        return (clean.exp() * (clean - logp)).sum(-1).mean().item()

    ce_clean, ce_spliced, ce_zero = ce(clean), ce(spliced), ce(zero)
    return {"ce loss clean": ce_clean, "ce loss spliced": ce_spliced, "ce loss zero ablation": ce_zero,
            "ce loss score": (ce_zero - ce_spliced) / max(1e-12, ce_zero - ce_clean),
            "kl score": (kl(zero) - kl(spliced)) / max(1e-12, kl(zero))}
