"""One streamed pass training many dictionaries: the same steps as a trainer fed by hand from plain hooks,
interruption by Ctrl-C and --resume ending with the uninterrupted weights, the files it writes, and the
sparse TopK decoder's equality with the dense product."""

from __future__ import annotations

import signal

import pytest
import torch
from torch.testing import assert_close

from llamaviz.features import job, load, load_transcoder_set, sparsity, stream
from llamaviz.features.training import TrainConfig, Trainer
from tiny import hf_and_ours


class Tok:
    bos_token_id, eos_token_id, pad_token_id, add_bos_token = 1, 2, None, True


@pytest.fixture(scope="module")
def tiny():
    _, ours = hf_and_ours("gqa")
    return ours.eval()


def _windows(model, count=21, context=16):
    ids = torch.randint(3, model.config.vocab_size, (count, context), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 1
    return ids


def _targets(model):
    layers = model.config.num_hidden_layers
    sae = TrainConfig(architecture="topk", width=32, k=4, batch_size=32, seed=3)
    tc = TrainConfig(architecture="batchtopk", width=24, k=3, batch_size=32, seed=3)
    return ([stream.Target("sae", "blocks.0.hook_resid_post", sae)]
            + [stream.Target(f"set/layer_{L}", f"blocks.{L}.mlp.hook_in", tc, f"blocks.{L}.hook_mlp_out")
               for L in range(layers)])


def test_a_streamed_run_takes_the_steps_of_a_trainer_fed_from_plain_hooks(tiny, tmp_path):
    ids = _windows(tiny)
    target = _targets(tiny)[1]  # a transcoder: x and y from two hooks
    plan = stream.plan(Tok(), ids, chunk_windows=5)
    run = stream.StreamedRun(tiny, [target], plan, tmp_path)
    assert run.run(progress=False) == "done"
    # by hand: the hooks' activations of each chunk, the chunk's seeded permutation, whole batches only
    names = [target.hook, target.hook_out]
    _, cache = tiny.run_with_cache(plan.train, names_filter=names)
    keep = plan.train != 1
    cfg = TrainConfig(**{**target.cfg.__dict__, "steps": run.steps[target.name]})
    reference = None
    for chunk in range(plan.chunks):
        rows = plan.rows(chunk)
        x, y = (cache[n][rows][keep[rows]].detach() for n in names)
        if reference is None:
            reference = Trainer(cfg, x.numpy(), y.numpy(), skip=True)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(target.cfg.seed * 1_000_003 + chunk))
        for step in range(len(x) // cfg.batch_size):
            index = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            reference.train_step((x[index], y[index]))
    for name, value in reference.params.items():
        assert_close(run.trainers[target.name].params[name], value, atol=1e-6, rtol=1e-5)


def test_ctrl_c_then_resume_ends_with_the_uninterrupted_weights_and_writes_the_files(tiny, tmp_path):
    ids, targets = _windows(tiny), _targets(tiny)
    whole, status = job.train_streamed(tiny, Tok(), ids, targets, tmp_path / "whole", progress=False,
                                       chunk_windows=5, transcoder_set="set")
    assert status == "done"

    def ctrl_c(chunk):
        if chunk == 2:
            signal.raise_signal(signal.SIGINT)  # the handler lets the chunk finish and checkpoints

    parts, status = job.train_streamed(tiny, Tok(), ids, _targets(tiny), tmp_path / "cut", progress=False,
                                       chunk_windows=5, transcoder_set="set", on_chunk=ctrl_c)
    assert status == "interrupted" and parts == {}
    resumed, status = job.train_streamed(tiny, Tok(), ids, _targets(tiny), tmp_path / "cut", resume=True,
                                         progress=False, chunk_windows=5, transcoder_set="set")
    assert status == "done"
    for name, dictionary in whole.items():
        for key, value in dictionary.state_dict().items():
            assert_close(resumed[name].state_dict()[key], value, atol=1e-6, rtol=1e-6)
    sae = load(tmp_path / "cut" / "sae")
    assert sae.cfg.hook_name == "blocks.0.hook_resid_post" and "explained variance" in sae.cfg.metadata["evaluation"]
    tc = load_transcoder_set(tmp_path / "cut" / "set")
    assert len(tc) == tiny.config.num_hidden_layers and tc[0].cfg.architecture == "jumprelu_skip_transcoder"
    assert (tmp_path / "cut" / "set" / "evaluation.json").exists()


def test_bad_plans_are_refused_with_what_is_accepted(tiny, tmp_path):
    with pytest.raises(ValueError, match="at least 2 windows"):
        stream.plan(Tok(), _windows(tiny, count=1))
    big = stream.Target("big", "blocks.0.hook_resid_post", TrainConfig(width=8, k=2, batch_size=10_000))
    with pytest.raises(ValueError, match="fewer training tokens"):
        stream.StreamedRun(tiny, [big], stream.plan(Tok(), _windows(tiny)), tmp_path)
    typo = stream.Target("typo", "blocks.0.hook_resid_postt", TrainConfig(width=8, k=2))
    with pytest.raises(Exception, match="hook_resid_post"):
        stream.StreamedRun(tiny, [typo], stream.plan(Tok(), _windows(tiny)), tmp_path)


def test_the_sparse_decoder_equals_the_dense_product_forward_and_backward():
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(64, 96, generator=g, requires_grad=True)
    W_dec = torch.randn(96, 20, generator=g, requires_grad=True)
    outs = []
    for decode in (lambda a: a @ W_dec, lambda a: sparsity.decode(a, W_dec)):
        acts = sparsity.topk(pre, 7)
        out = decode(acts)
        out.pow(2).sum().backward()
        outs.append((out.detach(), pre.grad.clone(), W_dec.grad.clone()))
        pre.grad, W_dec.grad = None, None
    for dense, sparse in zip(*outs):
        assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
