"""Generation for the app: encode and check the prompt, decode in a worker thread, stream the text.

The worker runs `llamaviz.run.generation.generate_with_cache` under the model's lock (its capture
hooks attach to the shared model) and hands each decoded piece to a queue the handler reads.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from llamaviz.run.generation import generate_with_cache
from llamaviz.run.streamers import TextStreamer

from llamaviz.app.models import ModelEntry
from llamaviz.app.run_stats import RunStats, kept_names
from llamaviz.app.state import CAPTURE_PATTERNS, Run, Settings

MAX_PROMPT_CHARS = 100_000  # refuse before tokenizing (8,192 tokens of text take far fewer characters)
_DONE = object()


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(entry: ModelEntry, prompt: str, chat_template: bool) -> tuple[torch.Tensor, str]:
    """(input ids [1, p], the text they encode); the chat template wraps the prompt as a user turn."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty: type some text to continue, e.g. "
                         "'Plants create energy through a process known as'")
    check_encodable(prompt)
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"the prompt has {len(prompt):,} characters; the app takes at most "
                         f"{MAX_PROMPT_CHARS:,} (and at most {entry.config.max_position_embeddings - 1} tokens)")
    tok = entry.tokenizer
    if chat_template and has_chat_template(tok):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
    else:
        text = prompt
        ids = tok(prompt)["input_ids"]
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)  # [1, p]
    if ids.shape[1] == 0:
        raise ValueError("the prompt encodes to no tokens; type some text")
    return ids, text


def check_encodable(prompt: str) -> None:
    """ValueError naming the first character UTF-8 cannot encode (a lone surrogate, e.g. half an emoji)."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"the prompt holds a lone surrogate {prompt[err.start]!r} at character {err.start} "
                         "(half of a character such as an emoji); it is not valid Unicode text: retype or "
                         "paste that character again") from None


def token_budget(entry: ModelEntry, prompt_length: int, max_new_tokens: int) -> tuple[int, str]:
    """(new tokens allowed, a note when clipped); ValueError when the prompt leaves no room."""
    limit = entry.config.max_position_embeddings
    if prompt_length >= limit:
        raise ValueError(f"the prompt is {prompt_length} tokens long; at most {limit - 1} fit (the model's context "
                         f"is {limit} tokens). Shorten the prompt.")
    allowed = min(max_new_tokens, limit - prompt_length)
    note = "" if allowed == max_new_tokens else (
        f"max new tokens lowered from {max_new_tokens} to {allowed}: prompt + continuation fill the model's "
        f"context of {limit} tokens")
    return allowed, note


@dataclass(frozen=True)
class Prefill:
    """The prompt's forward has passed `done` of `total` layers (reported before the first new token)."""

    done: int
    total: int


class Generation:
    """One generate_with_cache call in a worker thread; iterate `updates()` for the growing continuation."""

    def __init__(self, entry: ModelEntry, ids: torch.Tensor, settings: Settings, max_new_tokens: int,
                 stop: threading.Event):
        self.entry, self.ids, self.settings = entry, ids, settings
        self.max_new_tokens, self.stop = max_new_tokens, stop
        self.pieces: queue.Queue = queue.Queue()  # text pieces, Prefill reports, then _DONE
        self.sequences: torch.Tensor | None = None  # [1, T]
        self.cache = None
        self.stats: RunStats | None = None
        self.error: BaseException | None = None
        self.waited = entry.lock.locked()  # another request holds the model: this one queues behind it
        self.thread = threading.Thread(target=self._work, name="llamaviz-generate", daemon=True)
        self.thread.start()

    def _work(self) -> None:
        streamer = TextStreamer(self.entry.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                on_text=lambda piece, final: self.pieces.put(piece))
        model = self.entry.model
        self.stats = RunStats(model.config.num_hidden_layers)
        try:
            with self.entry.lock, model.hooks(fwd_hooks=self.stats.hooks()):
                self.sequences, self.cache = generate_with_cache(
                    model, self.ids, max_new_tokens=self.max_new_tokens,
                    names_filter=kept_names(model.config.num_hidden_layers), patterns=CAPTURE_PATTERNS,
                    streamer=streamer, stop=self.stop.is_set, **self.settings.sampling(),
                    progress=lambda done, total: self.pieces.put(Prefill(done, total)))
        except BaseException as err:  # handed to the request thread, which reports it
            self.error = err
        finally:
            self.pieces.put(_DONE)

    def updates(self) -> Iterator[tuple[str, Prefill | None]]:
        """(the continuation so far, the newest prefill report or None) after each new piece; ends with the worker."""
        text = ""
        while True:
            pieces = [self.pieces.get()]
            while pieces[-1] is not _DONE:  # several pieces may be waiting: send the newest state once
                try:
                    pieces.append(self.pieces.get_nowait())
                except queue.Empty:
                    break
            prefill = next((piece for piece in reversed(pieces) if isinstance(piece, Prefill)), None)
            text += "".join(piece for piece in pieces if isinstance(piece, str))
            done = pieces[-1] is _DONE
            if len(pieces) > done:  # something came besides the end marker
                yield text, prefill
            if done:
                break
        self.thread.join()

    def to_run(self, prompt: str, model_input: str, continuation: str) -> Run:
        """The finished generation as a Run; re-raises the worker's error."""
        if self.error is not None:
            raise self.error
        ids = self.sequences.cpu()  # [1, T]
        tokens = self.entry.tokenizer.convert_ids_to_tokens(ids[0].tolist())
        return Run(entry=self.entry, prompt=prompt, model_input=model_input, settings=self.settings, ids=ids,
                   prompt_length=self.ids.shape[1], tokens=list(tokens), cache=self.cache,
                   continuation=continuation, stopped=self.stop.is_set(), stats=self.stats)
