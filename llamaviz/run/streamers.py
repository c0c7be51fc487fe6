"""Streamers: turn the ids generate() produces, one step at a time, into pieces of text.

A streamer has put(ids) and end(). Text is released only once it decodes cleanly, so a character
split over several byte tokens never shows up half-made.
"""

from __future__ import annotations

import queue
import sys

import torch


class TextStreamer:
    """Decodes the continuation incrementally and hands each new piece to `on_text` (stdout by default)."""

    def __init__(self, tokenizer, skip_prompt: bool = True, skip_special_tokens: bool = True, on_text=None):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.skip_special_tokens = skip_special_tokens
        self.on_text = on_text or (lambda text, final: print(text, end="\n" if final else "", flush=True,
                                                              file=sys.stdout))
        self._ids: list[int] = []
        self._emitted = 0
        self._prompt_seen = False

    def put(self, ids: torch.Tensor) -> None:
        ids = ids.reshape(-1).tolist()
        if not self._prompt_seen:
            self._prompt_seen = True
            if self.skip_prompt:
                return
        self._ids.extend(ids)
        text = self.tokenizer.decode(self._ids, skip_special_tokens=self.skip_special_tokens)
        if text.endswith("\ufffd"):  # an unfinished multi-byte character: wait for its other bytes
            return
        self._release(text[self._emitted:], final=False)
        self._emitted = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self._ids, skip_special_tokens=self.skip_special_tokens)
        self._release(text[self._emitted:], final=True)
        self._ids, self._emitted, self._prompt_seen = [], 0, False

    def _release(self, piece: str, final: bool) -> None:
        if piece or final:
            self.on_text(piece, final)


class TextIteratorStreamer(TextStreamer):
    """Iterate over text pieces while generate() runs in another thread."""

    def __init__(self, tokenizer, skip_prompt: bool = True, skip_special_tokens: bool = True,
                 timeout: float | None = None):
        super().__init__(tokenizer, skip_prompt, skip_special_tokens, on_text=self._enqueue)
        self._queue: queue.Queue = queue.Queue()
        self.timeout = timeout

    def _enqueue(self, piece: str, final: bool) -> None:
        if piece:
            self._queue.put(piece)
        if final:
            self._queue.put(None)

    def __iter__(self):
        return self

    def __next__(self) -> str:
        piece = self._queue.get(timeout=self.timeout)
        if piece is None:
            raise StopIteration
        return piece
