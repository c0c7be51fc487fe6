"""Per-browser state: the generation settings, the last run (tokens + ActivationCache) and its Stop flag.

A browser session's `gr.State` holds one `BrowserState`. The activations of a run stay in that
state, so every tab browses them without re-running the model. `LIVE_RUNS` bounds the memory
all sessions hold together, the activations and the views memoised on them (run.memo_bytes): past
its budget the oldest runs drop both. Each Generate gets its own stop flag (`BrowserState.begin`),
so a second Generate in a session stops the first one and only the newest run is kept.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import itertools
import os
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llamaviz.app import files

MAX_NEW_TOKENS = 512  # the settings slider's upper end
LIVE_RUNS_ENV = "LLAMAVIZ_LIVE_RUNS_MB"  # overrides the budget below (MiB)
LIVE_RUNS_BYTES = int(os.environ.get(LIVE_RUNS_ENV) or 3072) * 2**20  # activations + memoised views of all sessions
SESSION_TTL_S = 3600  # a session's run is freed this long after its last Generate, even if the tab stays open
SEED_LIMIT = 2**63  # seeds are 0..2**63 - 1 (torch.Generator.manual_seed takes a signed 64-bit int)
FLOAT_EXACT = 2**53  # above this a float no longer holds every whole number

# What a run keeps, linear in T (app/run_stats.py): every layer's pattern as a lazy recipe rebuilt from
# resid_pre (the attention tabs, head scores), the residual stream once (logit lens, norms, token
# log-probs), and running MLP / per-head hook_z statistics gathered while generating.
CAPTURE_PATTERNS = "recompute"


@dataclass(frozen=True)
class Settings:
    """Generation settings as the page sends them, checked by `checked()`."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int = 0
    do_sample: bool = False
    chat_template: bool = True

    def checked(self) -> "Settings":
        """These settings with ints made ints; ValueError naming the first one out of range."""
        settings = Settings(_whole(self.max_new_tokens, "max new tokens"), _number(self.temperature, "temperature"),
                            _whole(self.top_k, "top-k"), _number(self.top_p, "top-p"), _whole(self.seed, "seed"),
                            bool(self.do_sample), bool(self.chat_template))
        s = settings
        rules = [  # (ok, what, accepted, value)
            (1 <= s.max_new_tokens <= MAX_NEW_TOKENS, "max new tokens", f"between 1 and {MAX_NEW_TOKENS}",
             s.max_new_tokens),
            (0 < s.temperature <= 5, "temperature", "in (0, 5]", s.temperature),
            (s.top_k >= 0, "top-k", "an integer >= 0 (0 turns it off)", s.top_k),
            (0 < s.top_p <= 1, "top-p", "in (0, 1]", s.top_p),
            (0 <= s.seed < SEED_LIMIT, "seed", "between 0 and 2**63 - 1", s.seed),
        ]
        for ok, what, accepted, value in rules:
            if not ok:
                raise ValueError(f"{what} must be {accepted}; got {value!r}")
        return settings

    def sampling(self) -> dict:
        """Keyword arguments of llamaviz.run.generation.generate."""
        return {"do_sample": self.do_sample, "temperature": self.temperature, "top_k": self.top_k or None,
                "top_p": self.top_p, "seed": self.seed}


_run_ids = itertools.count(1)


def _number(value, what: str) -> float:
    """`value` as a finite float; ValueError naming the setting otherwise (an empty box sends None)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number; got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError(f"{what} must be a finite number; got {value!r}")
    return number


def _whole(value, what: str) -> int:
    """`value` as an int: ints (and digit strings) exactly, whole floats only where floats are exact."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    number = _number(value, what)
    if number != int(number):
        raise ValueError(f"{what} must be a whole number; got {value!r}")
    if abs(number) > FLOAT_EXACT:
        raise ValueError(f"{what} {value!r} came as a float above 2**53, where floats skip whole numbers, so "
                         "its exact value is lost; send it as an integer")
    return int(number)


@dataclass(eq=False)  # runs compare by identity (their tensors have no single truth value)
class Run:
    """One generation: the token ids [1, T], their strings, and the activations of positions 0..T-2.

    `cache` holds run_with_cache(ids[:, :-1]) as captured while generating; the last token was
    sampled from the final step and has no activations. `memo` keeps views computed from it.
    """

    entry: object  # models.ModelEntry of the model that produced it
    prompt: str
    model_input: str  # the text fed to the tokenizer (the prompt, or the chat-templated prompt)
    settings: Settings
    ids: torch.Tensor  # [1, T]
    prompt_length: int
    tokens: list[str]  # [T] raw token pieces
    cache: object | None  # ActivationCache over positions 0..T-2, None once released
    continuation: str
    stopped: bool = False
    stats: object | None = None  # run_stats.RunStats gathered while generating
    run_id: int = field(default_factory=lambda: next(_run_ids))
    memo: dict = field(default_factory=dict)  # key -> (view, bytes); views.memo keeps it
    memo_bytes: int = 0  # what the memoised views take (the figures as sent, the tables)
    explained: object | None = None  # the ActivationCache the explanation tabs read (explain.analysis_cache)

    @property
    def cached_tokens(self) -> list[str]:
        """The tokens the activations cover: [T-1]."""
        return self.tokens[:-1]

    @property
    def new_tokens(self) -> int:
        return len(self.tokens) - self.prompt_length

    def activations(self):
        """The ActivationCache; ValueError when it was released to save memory."""
        if self.cache is None:
            raise ValueError("the activations of this run were freed to keep the server's memory bounded "
                             "(the oldest runs go first); press Generate again")
        return self.cache

    def nbytes(self) -> int:
        """Bytes the budget counts: the activations, the explanations' extra activations, the memoised views."""
        if self.cache is None:
            return self.memo_bytes
        extra = 0 if self.explained is None else self.explained.nbytes() - self.cache.nbytes()  # shared tensors once
        return self.memo_bytes + self.cache.nbytes() + max(extra, 0)  # lazy patterns cost nothing until drawn

    @property
    def export_folder(self) -> Path:
        """This run's folder in the process's private export folder (made on first use)."""
        return files.run_folder(self.run_id)

    def release(self) -> None:
        """Drop the activations, the memoised views and the exported files."""
        self.cache = self.explained = None
        self.memo.clear()
        self.memo_bytes = 0
        files.remove_run_folder(self.run_id)


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return None


def trim_heap() -> None:
    """Hand the allocator's free pages back to the system (glibc malloc_trim; nothing elsewhere).

    A Generate allocates and frees hundreds of MB of activations; without this the freed pages stay
    in the process as slack and RSS creeps up session after session.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


class RunBudget:
    """Keeps the activations of all live runs under `max_bytes`, dropping the oldest first."""

    def __init__(self, max_bytes: int = LIVE_RUNS_BYTES):
        self.max_bytes = max_bytes
        self._runs: deque[Run] = deque()
        self._lock = threading.Lock()
        self.shared: dict[str, int] = {}  # bytes held once for all sessions (loaded dictionaries), by name

    def hold(self, name: str, nbytes: int) -> None:
        """Count `nbytes` held for every session under `name` (0 = released); runs make room for them."""
        with self._lock:
            if nbytes:
                self.shared[name] = nbytes
            else:
                self.shared.pop(name, None)
        self.settle()

    def add(self, run: Run) -> None:
        with self._lock:
            self._runs.append(run)
        self.settle()

    def settle(self) -> None:
        """Release the oldest runs until the total is under budget (called after a run's memo grows)."""
        with self._lock:
            total = sum(r.nbytes() for r in self._runs) + sum(self.shared.values())
            released = False
            while total > self.max_bytes and len(self._runs) > 1:
                oldest = self._runs.popleft()
                total -= oldest.nbytes()
                oldest.release()
                released = True
        if released:
            trim_heap()

    def total(self) -> int:
        """Bytes all live runs and the shared holdings take now."""
        with self._lock:
            return sum(r.nbytes() for r in self._runs) + sum(self.shared.values())

    def discard(self, run: Run) -> None:
        with self._lock:
            if run in self._runs:
                self._runs.remove(run)


LIVE_RUNS = RunBudget()


class BrowserState:
    """What one browser session keeps: its last run and the stop flag of the Generate in flight."""

    def __init__(self):
        self.run: Run | None = None
        self.stop = threading.Event()  # the newest Generate's flag; each Generate has its own
        self.stop.set()  # nothing generating yet
        self.tab = "Attention"  # the tab on screen: the logit lens (the costliest view) is drawn only there
        self.fresh = False  # a new run that the tabs have not drawn yet
        self.feature_shown: dict = {}  # the Features tab's last ablation / attribution, for its export

    @property
    def generating(self) -> bool:
        return not self.stop.is_set()

    def begin(self) -> threading.Event:
        """A stop flag for a new Generate; the previous Generate of this session is told to stop."""
        self.stop.set()
        self.stop = threading.Event()
        return self.stop

    def finish(self, stop: threading.Event) -> None:
        """A Generate ended (done, failed or closed): its own flag is set, never a newer one's."""
        stop.set()

    def is_current(self, stop: threading.Event) -> bool:
        """Whether the Generate holding `stop` is still this session's newest."""
        return stop is self.stop

    def replace_run(self, run: Run) -> None:
        """Make `run` current (and fresh); the previous run's activations are freed."""
        if self.run is not None and self.run is not run:
            LIVE_RUNS.discard(self.run)
            self.run.release()
        self.run, self.fresh = run, True
        LIVE_RUNS.add(run)

    def __deepcopy__(self, memo) -> "BrowserState":
        return BrowserState()  # gr.State copies its initial value per session: start fresh


def release_state(state: BrowserState | None) -> None:
    """gr.State's delete_callback: stop a closed or expired session's Generate and free its run."""
    if not isinstance(state, BrowserState):
        return
    state.stop.set()
    if state.run is not None:
        LIVE_RUNS.discard(state.run)
        state.run.release()
        state.run = None
