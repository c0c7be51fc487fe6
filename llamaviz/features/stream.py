"""One streamed pass trains many dictionaries: every hook the targets read is captured in a single
forward per chunk of windows, shuffled within the chunk (the shuffle buffer) and handed to each
target's trainer as its batches; nothing is written to disk but checkpoints and the dictionaries.

Memory: one chunk of activations (chunk_windows x context tokens x hooks x d floats, float32) plus the
dictionaries and their Adam state; nothing grows with the corpus (the windows themselves are token
ids). A checkpoint (every trainer's, then stream.json with the next chunk) is written every
`checkpoint_chunks` chunks, at the end, and on Ctrl-C, which finishes the chunk in hand first (a
second Ctrl-C stops at once and loses the work since the last checkpoint). Each chunk's shuffle is
seeded by (seed, chunk), so an interrupted and resumed run ends with an uninterrupted run's weights.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from llamaviz.features.harvest import BATCH_WINDOWS, special_ids
from llamaviz.features.training import TrainConfig, Trainer

HELD_OUT = 0.05  # fraction of the windows kept for evaluation


@dataclass
class Target:
    """One dictionary of the pass: an SAE on hook, or a transcoder hook -> hook_out (with skip)."""

    name: str
    hook: str
    cfg: TrainConfig
    hook_out: str | None = None


@dataclass
class Plan:
    train: torch.Tensor        # [n, context] the training windows
    held_out: torch.Tensor     # [m, context]
    keep: torch.Tensor         # [n, context] the positions trained on (not BOS / EOS / pad unless kept)
    held_keep: torch.Tensor    # [m, context] likewise for the held-out windows
    chunk_windows: int

    @property
    def chunks(self) -> int:
        return -(-len(self.train) // self.chunk_windows)

    def rows(self, chunk: int) -> slice:
        return slice(chunk * self.chunk_windows, (chunk + 1) * self.chunk_windows)

    def tokens(self, chunk: int) -> int:
        return int(self.keep[self.rows(chunk)].sum())


def plan(tokenizer, windows: torch.Tensor, chunk_windows: int = 64, keep_special: bool = False) -> Plan:
    if len(windows) < 2:
        raise ValueError(f"a streamed run needs at least 2 windows (one held out), got {len(windows)}")
    held = max(1, int(len(windows) * HELD_OUT))
    keep = torch.ones_like(windows, dtype=torch.bool) if keep_special else ~torch.isin(windows, torch.tensor(special_ids(tokenizer)))
    return Plan(windows[:-held], windows[-held:], keep[:-held], keep[-held:], max(1, chunk_windows))


def capture(model, windows: torch.Tensor, keep: torch.Tensor, hooks: list[str]) -> dict[str, torch.Tensor]:
    """{hook: [kept tokens, d] float32} of one forward per BATCH_WINDOWS windows, stopped after the last hook's block."""
    parts: dict[str, list[torch.Tensor]] = {hook: [] for hook in hooks}
    blocks = [int(hook.split(".")[1]) for hook in hooks if hook.startswith("blocks.")]
    stop = max(blocks) + 1 if len(blocks) == len(hooks) else None  # no final norm or unembedding needed
    with torch.no_grad():
        for start in range(0, len(windows), BATCH_WINDOWS):
            batch, mask = windows[start:start + BATCH_WINDOWS], keep[start:start + BATCH_WINDOWS]
            _, cache = model.run_with_cache(batch, names_filter=hooks, stop_at_layer=stop)
            for hook in hooks:
                parts[hook].append(cache[hook][mask].float().cpu())
    return {hook: torch.cat(values) for hook, values in parts.items()}


class StreamedRun:
    """Trains every target from one pass over plan.train, chunk by chunk, into out/checkpoint/."""

    def __init__(self, model, targets: list[Target], the_plan: Plan, out, checkpoint_chunks: int = 4):
        names = [t.name for t in targets]
        if len(set(names)) != len(names) or not targets:
            raise ValueError(f"targets need distinct names, got {names}")
        for target in targets:
            target.cfg.check()
            for hook in (target.hook, target.hook_out):
                if hook is not None:
                    model._check_name(hook)
        self.model, self.targets, self.plan, self.out = model, targets, the_plan, Path(out)
        self.hooks = sorted({h for t in targets for h in (t.hook, t.hook_out) if h is not None})
        self.checkpoint_chunks = checkpoint_chunks
        self.steps = {t.name: sum(self.plan.tokens(c) // t.cfg.batch_size for c in range(self.plan.chunks))
                      for t in targets}
        bad = [name for name, steps in self.steps.items() if steps < 1]
        if bad:
            raise ValueError(f"{', '.join(bad)}: fewer training tokens ({int(self.plan.keep.sum()):,}) than one "
                             "batch in every chunk; more --tokens, a smaller --batch-size or more windows per chunk")
        self.trainers: dict[str, Trainer] = {}
        self.chunk = 0
        self._stop = False

    @property
    def folder(self) -> Path:
        return self.out / "checkpoint"

    def run(self, resume: bool = False, progress: bool = True, on_chunk=None) -> str:
        """Train to the end ("done") or to the chunk in hand when Ctrl-C comes ("interrupted")."""
        from tqdm.auto import tqdm

        if resume and (self.folder / "stream.json").exists():
            self.chunk = json.loads((self.folder / "stream.json").read_text())["chunk"]
        total = int(self.plan.keep.sum())
        done = sum(self.plan.tokens(c) for c in range(self.chunk))
        bar = tqdm(total=total, initial=done, disable=not progress, unit="tok", unit_scale=True)
        start = time.perf_counter()
        with self._interruptible():
            while self.chunk < self.plan.chunks and not self._stop:
                stats = self._train_chunk(resume)
                self.chunk += 1
                bar.update(self.plan.tokens(self.chunk - 1))
                bar.set_postfix(_postfix(stats, bar.n - done, time.perf_counter() - start), refresh=False)
                if on_chunk is not None:
                    on_chunk(self.chunk)
                if self.chunk % self.checkpoint_chunks == 0 or self._stop or self.chunk == self.plan.chunks:
                    self.save_checkpoint()
        bar.close()
        return "interrupted" if self.chunk < self.plan.chunks else "done"

    def _train_chunk(self, resume: bool) -> dict[str, dict]:
        rows = self.plan.rows(self.chunk)
        acts = capture(self.model, self.plan.train[rows], self.plan.keep[rows], self.hooks)
        if not self.trainers:
            self._make_trainers(acts, resume)
        stats = {}
        order = torch.Generator().manual_seed(self.targets[0].cfg.seed * 1_000_003 + self.chunk)
        permutation = torch.randperm(len(acts[self.hooks[0]]), generator=order)
        for target in self.targets:
            trainer, size = self.trainers[target.name], target.cfg.batch_size
            x, y = acts[target.hook], acts[target.hook_out or target.hook]
            for step in range(len(permutation) // size):
                index = permutation[step * size:(step + 1) * size]
                stats[target.name] = trainer.train_step((x[index], y[index]))
        return stats

    def _make_trainers(self, acts: dict[str, torch.Tensor], resume: bool) -> None:
        """Trainers initialised from the first chunk in hand (a resumed one then loads its checkpoint)."""
        for target in self.targets:
            cfg = TrainConfig(**(asdict(target.cfg) | {"steps": self.steps[target.name]}))
            x = acts[target.hook].numpy()
            y = acts[target.hook_out].numpy() if target.hook_out else None
            trainer = Trainer(cfg, x, y, skip=target.hook_out is not None)
            if resume and (self.folder / target.name / "checkpoint.json").exists():
                trainer.load_checkpoint(self.folder / target.name)
            self.trainers[target.name] = trainer

    def save_checkpoint(self) -> None:
        for name, trainer in self.trainers.items():
            trainer.save_checkpoint(self.folder / name)
        (self.folder / "stream.json.tmp").write_text(json.dumps({"chunk": self.chunk}))
        (self.folder / "stream.json.tmp").replace(self.folder / "stream.json")  # last: the trainers are all written

    @contextlib.contextmanager
    def _interruptible(self):
        """The first Ctrl-C finishes the chunk in hand and checkpoints; a second one stops at once."""
        def handler(signum, frame):
            if self._stop:
                raise KeyboardInterrupt
            self._stop = True
            print("\nCtrl-C: finishing this chunk, then writing a checkpoint (Ctrl-C again to stop now)", flush=True)

        try:
            previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread: Ctrl-C is not ours to catch
            previous = None
        try:
            yield
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)


def _postfix(stats: dict[str, dict], tokens: int, seconds: float) -> dict:
    values = list(stats.values())
    if not values:
        return {}
    mean = {key: sum(v[key] for v in values) / len(values) for key in ("explained variance", "L0", "dead")}
    return {"tok/s": f"{tokens / max(seconds, 1e-9):,.0f}", "EV": f"{mean['explained variance']:.3f}",
            "L0": f"{mean['L0']:.1f}", "dead": f"{mean['dead']:.2%}", "dictionaries": len(values)}
