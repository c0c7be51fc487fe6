"""Training dictionaries: corpora, the harvest, the four trainers, scale folding, resumable runs, evaluation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from llamaviz.features import data, harvest as harvesting, job, sparsity
from llamaviz.features.dictionary import Dictionary, DictionaryConfig
from llamaviz.features.training import TrainConfig, Trainer
from tiny import hf_and_ours


class Tok:
    """A byte-level stand-in tokenizer: ids 3.. are bytes, 1 = BOS, 2 = EOS."""
    bos_token_id, eos_token_id, pad_token_id, add_bos_token = 1, 2, None, True

    def encode(self, text, add_special_tokens=False):
        return [3 + b % 100 for b in text.encode()]


def test_corpora_skip_what_is_not_text_and_refuse_an_empty_one(tmp_path):
    (tmp_path / "a.txt").write_text("plain text")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"body": "two"}) + "\n")
    (tmp_path / "c.bin.txt").write_bytes(b"\x00\x01")
    (tmp_path / "d.md").write_bytes(b"\xff\xfe\xfa")
    (tmp_path / "e.png").write_bytes(b"PNG")
    corpus = data.read_corpus(tmp_path)
    assert corpus.documents == ["plain text", "one"]
    assert corpus.skipped == {"binary files": 1, "undecodable files": 1, "files of other kinds": 1}
    assert data.read_corpus(tmp_path, text_field="body").documents == ["plain text", "two"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no text"):
        data.read_corpus(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no corpus at"):
        data.read_corpus(tmp_path / "absent")


def test_windows_are_packed_and_open_with_bos():
    ids = data.windows(Tok(), ["ab" * 20, "cd" * 20], context=16)
    assert ids.shape == (5, 16) and (ids[:, 0] == 1).all()
    assert (ids == 2).sum() == 1  # the EOS between the documents (the last one's falls off the end)
    with pytest.raises(ValueError, match="fewer than one window"):
        data.windows(Tok(), ["a"], context=16)


@pytest.fixture(scope="module")
def tiny():
    _, ours = hf_and_ours("gqa")
    return ours.eval()


def test_the_harvest_holds_the_hooks_activations_without_special_tokens(tiny, tmp_path, monkeypatch):
    ids = torch.randint(3, 113, (3, 10))
    ids[:, 0], ids[1, 5] = 1, 2
    folder = harvesting.harvest(tiny, Tok(), ids, ["blocks.1.hook_resid_post", "blocks.1.mlp.hook_in"], tmp_path / "h")
    _, cache = tiny.run_with_cache(ids, names_filter=["blocks.1.hook_resid_post"])
    keep = (ids != 1) & (ids != 2)
    stored = harvesting.open_harvest(folder, "blocks.1.hook_resid_post")
    assert stored.shape == (int(keep.sum()), 64)
    assert_close(torch.from_numpy(np.array(stored)), cache["blocks.1.hook_resid_post"][keep])
    with pytest.raises(KeyError, match="has no 'blocks.0.hook_resid_post'"):
        harvesting.open_harvest(folder, "blocks.0.hook_resid_post")
    monkeypatch.setattr(harvesting.shutil, "disk_usage", lambda path: type("U", (), {"free": 10})())
    with pytest.raises(OSError, match="needs .* GiB .* GiB free"):
        harvesting.harvest(tiny, Tok(), ids, ["blocks.1.hook_resid_post"], tmp_path / "h2")


def sparse_data(n: int = 8192, d: int = 32, latents: int = 64, seed: int = 0) -> np.ndarray:
    """Activations made of a few of `latents` random directions each: a dictionary can explain them."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(latents, d, generator=g), dim=-1)
    codes = torch.rand(n, latents, generator=g) * (torch.rand(n, latents, generator=g) < 4 / latents)
    return (codes @ directions * 5 + 0.5).numpy().astype(np.float32)


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "jumprelu", "relu"])
def test_every_trainer_learns_and_the_folded_dictionary_reads_raw_activations(architecture):
    x = sparse_data()
    cfg = TrainConfig(architecture=architecture, width=128, k=6, batch_size=256, lr=3e-3, l1=0.05, l0=0.02,
                      checkpoint_every=10_000, steps=160)
    trainer = Trainer(cfg, x)
    first = trainer.train_step()["explained variance"]
    while trainer.step < trainer.steps:
        stats = trainer.train_step()
    assert stats["explained variance"] > max(first, 0.5), (first, stats)
    dictionary = job.to_dictionary(trainer, "blocks.0.hook_resid_post", None, None)
    raw = torch.from_numpy(x[:64])
    with torch.no_grad():
        _, acts = trainer.encode(raw * trainer.scale_in, training=False)
        expected = trainer.decode(acts, raw * trainer.scale_in) / trainer.scale_out
        assert_close(dictionary(raw), expected, atol=1e-4, rtol=1e-4)  # the scale is folded into the weights
    scores = job.evaluate(dictionary, x[-1024:], x[-1024:])
    assert scores["explained variance"] > 0.5 and scores["L0"] > 0 and scores["log10 frequency"].shape == (128,)


def dense_reference_loss(trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """TopK / BatchTopK + AuxK written as dense products through every latent (autograd's reference)."""
    p, cfg = trainer.params, trainer.cfg
    pre = (x if trainer.transcoder else x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    acts = sparsity.topk(pre, cfg.k) if cfg.architecture == "topk" else sparsity.batch_topk(pre, cfg.k)
    recon = acts @ p["W_dec"] + p["b_dec"] + (x @ p["W_skip"].T if trainer.skip else 0)
    residual = y - recon.detach()
    dead = trainer.unfired >= cfg.dead_steps
    aux_acts = sparsity.topk(pre.masked_fill(~dead, -torch.inf), min(cfg.aux_k, int(dead.sum()))).nan_to_num(0.0)
    aux = (aux_acts @ p["W_dec"] - residual).pow(2).sum(-1).mean() / residual.pow(2).sum(-1).mean()
    return (recon - y).pow(2).sum(-1).mean() + aux / 32


@pytest.mark.parametrize("architecture,transcoder", [("topk", False), ("batchtopk", False), ("batchtopk", True)])
def test_the_sparse_training_step_has_the_dense_products_gradient(architecture, transcoder):
    x = sparse_data(n=2048, d=24)
    y = (x @ np.random.default_rng(3).standard_normal((24, 24))).astype(np.float32) if transcoder else None
    cfg = TrainConfig(architecture=architecture, width=96, k=5, aux_k=12, batch_size=512, steps=10)
    trainer = Trainer(cfg, x, y, skip=transcoder)
    trainer.unfired[::3] = cfg.dead_steps  # a third of the latents dead: AuxK reads them
    xb, yb = trainer.batch(0)
    expected = dense_reference_loss(trainer, xb, yb)  # before trainer.loss counts this step's firing
    reference = dict(zip(trainer.params, torch.autograd.grad(expected, list(trainer.params.values()))))
    loss, _ = trainer.loss(xb, yb)
    assert_close(loss, expected)
    for name, grad in zip(trainer.params, torch.autograd.grad(loss, list(trainer.params.values()))):
        assert_close(grad, reference[name], atol=1e-5, rtol=1e-4, msg=name)


def test_a_transcoder_with_skip_learns_a_linear_map_through_its_skip_path():
    x = sparse_data(d=16, seed=1)
    mixing = torch.randn(16, 16, generator=torch.Generator().manual_seed(2)).numpy()
    y = (x @ mixing).astype(np.float32)
    trainer = Trainer(TrainConfig(architecture="relu", width=32, batch_size=256, lr=5e-3, l1=0.01, steps=200), x, y,
                      skip=True)
    while trainer.step < trainer.steps:
        stats = trainer.train_step()
    assert stats["explained variance"] > 0.9
    dictionary = job.to_dictionary(trainer, "blocks.0.mlp.hook_in", "blocks.0.hook_mlp_out", None)
    assert dictionary.cfg.architecture == "skip_transcoder"
    scores = job.evaluate(dictionary, x[-1024:], y[-1024:])
    assert scores["explained variance"] > 0.9


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    x = sparse_data(n=4096)
    cfg = TrainConfig(architecture="topk", width=64, k=4, batch_size=256, checkpoint_every=5, dead_steps=3)
    straight = Trainer(cfg, x)
    assert job.run(straight, tmp_path / "straight", progress=False) == "done"
    interrupted = Trainer(cfg, x)
    original = Trainer.train_step

    def stop_at_seven(self):
        if self.step == 7:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", stop_at_seven)
    assert job.run(interrupted, tmp_path / "run", progress=False) == "interrupted"
    monkeypatch.setattr(Trainer, "train_step", original)
    resumed = Trainer(cfg, x)
    resumed.load_checkpoint(tmp_path / "run")
    assert resumed.step == 7
    assert job.run(resumed, tmp_path / "run", progress=False) == "done"
    for name, value in straight.params.items():
        assert_close(resumed.params[name], value, atol=1e-6, rtol=0, msg=name)
    other = TrainConfig(architecture="topk", width=64, k=5, batch_size=256)
    with pytest.raises(ValueError, match="other settings than the checkpoint's: k"):
        Trainer(other, x).load_checkpoint(tmp_path / "run")


def test_a_dictionary_that_reconstructs_exactly_scores_one_in_the_model(tiny):
    d = Dictionary(DictionaryConfig("standard", d_in=64, d_sae=128, hook_name="blocks.1.hook_resid_post",
                                    apply_b_dec_to_input=False))
    eye = torch.eye(64)
    with torch.no_grad():
        d.W_enc.copy_(torch.cat([eye, -eye], dim=1))  # relu(x) - relu(-x) = x
        d.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    scores = job.evaluate_in_model(tiny, d, torch.randint(3, 113, (2, 12)))
    assert abs(scores["ce loss score"] - 1) < 1e-4 and abs(scores["kl score"] - 1) < 1e-4
    assert scores["ce loss zero ablation"] != scores["ce loss clean"]


def test_the_command_explains_itself_and_refuses_bad_input(tmp_path):
    help_text = subprocess.run([sys.executable, "-m", "llamaviz", "features", "train", "--help"], capture_output=True,
                               text=True, timeout=60).stdout
    for option in ("--hook", "--transcoders", "--data", "--width", "--k", "--out", "--tokens", "--seed",
                   "--architecture", "--resume", "--field", "--generate", "--context", "--keep-special"):
        assert option in help_text
    (tmp_path / "empty").mkdir()
    result = subprocess.run([sys.executable, "-m", "llamaviz", "features", "train", "--data", str(tmp_path / "empty"),
                             "--hook", "blocks.1.hook_resid_post", "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "holds no text" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing ran


@pytest.mark.slow
def test_training_on_the_default_model_end_to_end(tmp_path):
    from llamaviz import features

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "notes.md").write_text((Path(data.__file__).read_text() + "\n") * 6)
    summary = features.train(hook="blocks.10.hook_resid_post", data=tmp_path / "corpus", out=tmp_path / "sae",
                             width="2x", k=16, tokens=6000, batch_size=256, progress=False)
    assert summary["status"] == "done"
    sae = features.load(tmp_path / "sae")
    assert sae.cfg.metadata["evaluation"]["L0"] <= 16 and "ce loss score" in sae.cfg.metadata["evaluation"]
    assert sae.cfg.architecture == "topk" and sae.cfg.d_sae == 2 * 576


@pytest.mark.slow
def test_a_transcoder_set_trains_from_one_streamed_pass_on_the_default_model(tmp_path, monkeypatch):
    from llamaviz import features
    from llamaviz.features import stream

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "notes.md").write_text((Path(data.__file__).read_text() + "\n") * 4)
    captured, capture = [], stream.capture
    monkeypatch.setattr(stream, "capture", lambda model, windows, *rest: captured.append(len(windows))
                        or capture(model, windows, *rest))
    summary = features.train(transcoders="all", data=tmp_path / "corpus", out=tmp_path / "set", width=64, k=8,
                             architecture="batchtopk", tokens=3000, batch_size=256, progress=False)
    assert summary["status"] == "done" and summary["layers trained"] == 30
    held = max(1, int(summary["windows"] * stream.HELD_OUT))
    assert sum(captured) == summary["windows"] - held  # every training window through the model once, for all 30
    transcoders = features.load_transcoder_set(tmp_path / "set")
    assert len(transcoders) == 30 and transcoders[7].cfg.hook_name == "blocks.7.mlp.hook_in"
    assert transcoders[7].cfg.architecture == "jumprelu_skip_transcoder"
    assert "explained variance" in features.load(tmp_path / "set" / "layer_7").cfg.metadata["evaluation"]
