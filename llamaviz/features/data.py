"""Text a user has, as packed context windows of token ids for harvesting activations.

Sources: a .txt / .md / .jsonl file or a folder of them (a jsonl line's "text" field, or the one named
by `field`), a `datasets` dataset saved to disk (when datasets is installed), or tokens sampled from
the model itself. Documents are joined with EOS between them and cut into windows of `context`
tokens, each opened with BOS when the tokenizer adds one (its own BOS rule). Binary or undecodable
files are skipped and counted; an empty corpus is an error before anything runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")


@dataclass
class Corpus:
    documents: list[str]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> files

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {reason}" for reason, n in self.skipped.items()) or "none"
        return f"{len(self.documents)} documents ({sum(map(len, self.documents)):,} characters); skipped: {skipped}"


def read_corpus(path, text_field: str = "text") -> Corpus:
    """Every document under `path` (a file, a folder, or a saved `datasets` dataset)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no corpus at {path} (accepted: a .txt/.md/.jsonl file, a folder of them, "
                                "or a datasets dataset saved with save_to_disk)")
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        return _saved_dataset(path, text_field)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    corpus = Corpus([])
    for file in files:
        reason = _read_file(file, text_field, corpus.documents)
        if reason:
            corpus.skipped[reason] = corpus.skipped.get(reason, 0) + 1
    if not any(doc.strip() for doc in corpus.documents):
        raise ValueError(f"the corpus at {path} holds no text ({corpus.summary()}); accepted: "
                         f"{', '.join(TEXT_SUFFIXES)} files, a jsonl '{text_field}' field")
    return corpus


def _read_file(file: Path, text_field: str, documents: list[str]) -> str | None:
    """Append the file's documents; the reason it was skipped, or None."""
    if file.suffix.lower() not in TEXT_SUFFIXES:
        return "files of other kinds"
    raw = file.read_bytes()
    if b"\x00" in raw[:8192]:
        return "binary files"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "undecodable files"
    if file.suffix.lower() != ".jsonl":
        documents.append(text)
        return None
    for line in text.splitlines():
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            return "jsonl files with a malformed line"
        if isinstance(record, dict) and isinstance(record.get(text_field), str):
            documents.append(record[text_field])
    return None


def _saved_dataset(path: Path, text_field: str) -> Corpus:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{path} is a saved datasets dataset; install the datasets package to read it") from None
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset[next(iter(dataset))]
    if text_field not in dataset.column_names:
        raise ValueError(f"{path} has no {text_field!r} column; columns: {', '.join(dataset.column_names)}")
    return Corpus([row for row in dataset[text_field] if isinstance(row, str)])


def windows(tokenizer, documents: list[str], context: int = 128, max_tokens: int | None = None) -> torch.Tensor:
    """[n, context] token ids: documents joined by EOS, cut into windows, each opened with BOS if the tokenizer adds it."""
    if context < 2:
        raise ValueError(f"context must be at least 2 tokens, got {context}")
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None \
        else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    body = context - len(bos)
    limit = None if max_tokens is None else -(-max_tokens // context) * body
    for doc in documents:
        stream += tokenizer.encode(doc, add_special_tokens=False) + eos
        if limit is not None and len(stream) >= limit:
            break
    count = len(stream) // body
    if count == 0:
        raise ValueError(f"the corpus has {len(stream)} tokens, fewer than one window of {context}; "
                         "add text or lower --context")
    rows = torch.tensor(stream[:count * body]).view(count, body)
    return torch.cat([torch.tensor(bos).expand(count, len(bos)), rows], dim=1) if bos else rows


def generated(model, tokenizer, tokens: int, context: int = 128, seed: int = 0) -> torch.Tensor:
    """[n, context] windows sampled from the model itself, starting from BOS (or the EOS token)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    count = max(1, -(-tokens // context))
    torch.manual_seed(seed)
    prompt = torch.full((count, 1), start, dtype=torch.long)
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=context - 1, do_sample=True, eos_token_id=[])
    return out[:, :context]
