"""The one decision about model paths: None is the default model, and which kind of checkpoint a path holds."""

from pathlib import Path

import pytest
import torch

import llamaviz
from llamaviz.checkpoints import gguf
from llamaviz.checkpoints.paths import checkpoint_kind, model_path


def test_none_is_the_default_model(default_gguf):
    assert model_path(None) == default_gguf


def test_a_missing_path_names_what_is_accepted(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at .*nowhere; expected an HF folder"):
        model_path(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="must be a str or pathlib.Path .* got int"):
        model_path(3)


def test_kinds_from_the_names_on_disk(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"")
    (hf / "extra.gguf").write_bytes(b"")  # HF weights win over a stray .gguf
    gguf_folder = tmp_path / "g"
    gguf_folder.mkdir()
    (gguf_folder / "config.json").write_text("{}")
    (gguf_folder / "m.gguf").write_bytes(b"")  # no HF weights: the .gguf is the checkpoint
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "params.json").write_text("{}")
    (meta / "consolidated.00.pth").write_bytes(b"")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert [checkpoint_kind(p) for p in (hf, hf / "model.safetensors", gguf_folder, gguf_folder / "m.gguf", meta,
                                         empty, tmp_path / "notes.txt", tmp_path / "absent")] == \
        ["hf", "hf", "gguf", "gguf", "meta", None, None, None]


def test_load_parses_the_gguf_header_once(default_gguf, monkeypatch):
    calls = []
    original = gguf.read_gguf_header
    monkeypatch.setattr(gguf, "read_gguf_header", lambda path: calls.append(Path(path)) or original(path))
    model, tok = llamaviz.load(default_gguf)
    assert calls == [default_gguf]
    reference = llamaviz.AutoTokenizer.from_pretrained(default_gguf)
    text = "Plants create energy through a process known as"
    assert tok.encode(text) == reference.encode(text)
    assert model(torch.tensor([tok.encode(text)])).logits.shape[-1] == model.config.vocab_size
