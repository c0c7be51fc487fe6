"""Activation and attribution patching against TransformerLens' patching module and brute-force hooks."""

import itertools

import pytest
import torch
from torch.testing import assert_close

from llamaviz import get_act_name, patching
from tiny import hf_and_ours
from tl_reference import bridge

SWEEPS = [name for name in dir(patching) if name.startswith("get_act_patch_")]


def logit_diff(logits):
    return (logits[:, -1, 5] - logits[:, -1, 9]).mean()


@pytest.fixture(scope="module")
def setup():
    hf, ours = hf_and_ours("gqa", hf_attn="eager")
    clean = torch.randint(3, 113, (2, 6), generator=torch.Generator().manual_seed(4))
    corrupted = clean.clone()
    corrupted[:, 2] = 7
    _, clean_cache = ours.run_with_cache(clean)
    tl = bridge(hf)
    _, tl_clean_cache = tl.run_with_cache(clean)
    return ours, tl, clean, corrupted, clean_cache, tl_clean_cache


@pytest.mark.parametrize("name", SWEEPS)
def test_every_sweep_equals_transformer_lens(setup, name):
    import transformer_lens.patching as tl_patching

    ours, tl, clean, corrupted, clean_cache, tl_clean_cache = setup
    mine = getattr(patching, name)(ours, corrupted, clean_cache, logit_diff)
    if name.endswith("_every") and "head" in name:  # TransformerLens cannot stack [L, g] k/v rows with [L, h] ones
        groups = 2
        parts = {"all_pos": ("out", "q", "k", "v", "pattern"), "by_pos": ("out", "q", "k", "v", "pattern")}
        kind = "all_pos" if "all_pos" in name else "by_pos"
        rows = [getattr(tl_patching, f"get_act_patch_attn_head_{p}_{kind}")(tl, corrupted, tl_clean_cache, logit_diff)
                for p in parts[kind]]
        rows = [r.transpose(1, 2) if p == "pattern" and kind == "by_pos" else r for r, p in zip(rows, parts[kind])]
        theirs = torch.stack([r.repeat_interleave(groups, -1) if p in ("k", "v") else r
                              for r, p in zip(rows, parts[kind])])
    elif name == "get_act_patch_resid_mid":
        # the bridge's hook_resid_mid changes only the MLP's input, not the residual stream that flows on
        # (HookedTransformer's resid_mid fed both); the reference is brute force with plain hooks instead
        theirs = torch.tensor([[_patched_metric(ours, corrupted, clean_cache, f"blocks.{layer}.hook_resid_mid",
                                                (slice(None), pos)) for pos in range(6)] for layer in range(3)])
    else:
        theirs = getattr(tl_patching, name)(tl, corrupted, tl_clean_cache, logit_diff)
    assert mine.shape == theirs.shape
    assert_close(mine, theirs.float(), atol=1e-4, rtol=0)


def _patched_metric(model, corrupted, clean_cache, name, where) -> float:
    def put_back(x, hook):
        x = x.clone()
        x[where] = clean_cache[name][where]
        return x
    with torch.no_grad():
        return logit_diff(model.run_with_hooks(corrupted, fwd_hooks=[(name, put_back)])).item()


def test_kv_patching_patches_the_kv_head_all_its_query_heads_read(setup):
    ours, _, clean, corrupted, clean_cache, _ = setup
    result = patching.get_act_patch_attn_head_k_all_pos(ours, corrupted, clean_cache, logit_diff)
    assert result.shape == (3, 2)  # [layers, kv heads]

    expected = torch.tensor([[_patched_metric(ours, corrupted, clean_cache, f"blocks.{layer}.attn.hook_k",
                                              (slice(None), slice(None), g)) for g in range(2)] for layer in range(3)])
    assert_close(result, expected, atol=1e-5, rtol=0)
    every = patching.get_act_patch_attn_head_all_pos_every(ours, corrupted, clean_cache, logit_diff)
    assert every.shape == (5, 3, 4) and torch.equal(every[2], result.repeat_interleave(2, dim=-1))


def test_progress_callback_counts_every_cell_and_can_stop(setup):
    ours, _, clean, corrupted, clean_cache, _ = setup
    seen = []
    patching.get_act_patch_resid_pre(ours, corrupted, clean_cache, logit_diff, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (18, 18) and [d for d, _ in seen] == sorted(d for d, _ in seen)

    class Stop(Exception):
        pass

    def stop_after_first(done, total):
        raise Stop

    with pytest.raises(Stop):
        patching.get_act_patch_attn_head_out_by_pos(ours, corrupted, clean_cache, logit_diff, progress=stop_after_first)


def test_attribution_patching_has_the_exact_shapes_and_is_exact_for_small_differences(setup):
    ours, _, clean, corrupted, clean_cache, _ = setup
    estimate = patching.attribution_patch(ours, clean, corrupted, logit_diff)
    for kind, value in estimate.items():
        exact = patching.generic_activation_patch(ours, corrupted, clean_cache, logit_diff, kind) \
            if kind in ("resid_pre", "attn_head_out_all_pos") else None
        if exact is not None:
            assert value.shape == exact.shape, kind
    assert estimate["attn_head_k_all_pos"].shape == (3, 2) and estimate["attn_head_pattern_by_pos"].shape == (3, 4, 6)
    # a clean cache a small step away from the corrupted run: the estimate is the exact change to first order
    _, corrupted_cache = ours.run_with_cache(corrupted)
    base = logit_diff(ours(corrupted, return_type="logits")).detach()
    torch.manual_seed(5)
    errors = []
    for eps in (1e-2, 1e-3):  # the step, relative to each activation's spread
        nearby = {n: t + eps * t.std() * torch.randn_like(t) if n.endswith("hook_resid_pre") else t
                  for n, t in corrupted_cache.items()}
        near_cache = type(corrupted_cache)(nearby, model=ours, tokens=corrupted)
        exact = patching.get_act_patch_resid_pre(ours, corrupted, near_cache, logit_diff) - base
        approx = patching.attribution_scores(ours, corrupted, near_cache, logit_diff, "resid_pre")["resid_pre"]
        errors.append(float((approx - exact).abs().max() / exact.abs().max()))
    assert errors[1] < 0.01 and errors[1] < errors[0] / 5, errors  # first order: the error shrinks with the step


def test_bad_inputs_are_named(setup):
    ours, _, clean, corrupted, clean_cache, _ = setup
    with pytest.raises(ValueError, match=r"same token length.*clean is \(2, 6\).*corrupted is \(2, 5\)"):
        patching.get_act_patch_resid_pre(ours, corrupted[:, :5], clean_cache, logit_diff)
    with pytest.raises(ValueError, match=r"must return a scalar.*shape \(2,\)"):
        patching.get_act_patch_resid_pre(ours, corrupted, clean_cache, lambda logits: logits[:, -1, 5])
    with pytest.raises(ValueError, match=r"must return a scalar"):
        patching.attribution_patch(ours, clean, corrupted, lambda logits: logits[:, -1])
    _, partial = ours.run_with_cache(clean, names_filter=lambda n: "resid" in n)
    with pytest.raises(KeyError, match="blocks.0.attn.hook_z"):
        patching.get_act_patch_attn_head_out_all_pos(ours, corrupted, partial, logit_diff)
    with pytest.raises(ValueError, match="unknown patching kinds"):
        patching.attribution_patch(ours, clean, corrupted, logit_diff, names=["resid_post"])


@pytest.mark.slow
def test_default_model_sweeps_equal_transformer_lens(default_with_reference):
    import transformer_lens.patching as tl_patching

    ours, tok, hf, tl = default_with_reference
    clean, corrupted = ours.to_tokens(["John gave Mary the", "Mary gave John the"])  # same length, one batch each
    clean, corrupted = clean[None], corrupted[None]
    mary, john = ours.to_single_token(" Mary"), ours.to_single_token(" John")

    def metric(logits):
        return logits[0, -1, mary] - logits[0, -1, john]

    _, cache = ours.run_with_cache(clean)
    _, tl_cache = tl.run_with_cache(clean)
    for name in ("get_act_patch_resid_pre",):  # the other sweeps are checked on the tiny configs (TL is slow here)
        assert_close(getattr(patching, name)(ours, corrupted, cache, metric),
                     getattr(tl_patching, name)(tl, corrupted, tl_cache, metric), atol=1e-4, rtol=0, msg=name)


def test_last_position_only_gives_the_same_numbers(setup):
    ours, _, clean, corrupted, clean_cache, _ = setup
    full = patching.get_act_patch_attn_head_out_by_pos(ours, corrupted, clean_cache, logit_diff)
    last = patching.generic_activation_patch(ours, corrupted, clean_cache, logit_diff, "attn_head_out_by_pos",
                                             last_position_only=True)
    assert_close(last, full, atol=1e-5, rtol=0)


POSITION_SWEEPS = ("resid_pre", "resid_mid", "attn_out", "mlp_out", "attn_head_out_by_pos", "attn_head_q_by_pos",
                   "attn_head_k_by_pos", "attn_head_v_by_pos")


def every_position_metric(logits):  # reads every position, so the copies' corrupted prefixes count too
    return (logits[..., 5] - logits[..., 9]).mean() + logits[:, 0, 7].sum()


@pytest.mark.parametrize("case", ["mistral", "qwen3_sliding"])
def test_copies_started_at_their_position_equal_brute_force_hooks(case):
    """Sliding windows shorter than the prompt, q/k norms, GQA, a batch of two: the packed suffixes
    (each copy from its patched position on, the corrupted keys before it) equal one hooked forward per cell."""
    from tiny_variants import hf_and_ours as variant

    from llamaviz.interpret.patching import sweeps

    _, model = variant(case)
    clean = torch.randint(3, 113, (2, 8), generator=torch.Generator().manual_seed(5))
    corrupted = clean.clone()
    corrupted[:, 3] = 7
    _, clean_cache = model.run_with_cache(clean)
    assert sweeps._can_pack(model, patching.KINDS["resid_pre"])
    for kind in POSITION_SWEEPS:
        spec = patching.KINDS[kind]
        mine = patching.generic_activation_patch(model, corrupted, clean_cache, every_position_metric, kind)
        last = patching.generic_activation_patch(model, corrupted, clean_cache, logit_diff, kind,
                                                 last_position_only=True)
        for layer in range(model.config.num_hidden_layers):
            name = get_act_name(spec.act, layer)
            for cell in itertools.product(*(range(n) for n in mine.shape[1:])):
                where = (slice(None), *spec.index(cell))
                expected = _hooked_metric(model, corrupted, clean_cache, name, where)
                assert_close(mine[(layer, *cell)], expected[0], atol=1e-5, rtol=0, msg=f"{kind} {layer} {cell}")
                assert_close(last[(layer, *cell)], expected[1], atol=1e-5, rtol=0, msg=f"{kind} {layer} {cell}")


def _hooked_metric(model, corrupted, clean_cache, name, where) -> tuple[torch.Tensor, torch.Tensor]:
    def put_back(x, hook):
        x = x.clone()
        x[where] = clean_cache[name][where]
        return x
    with torch.no_grad():
        logits = model.run_with_hooks(corrupted, fwd_hooks=[(name, put_back)])
    return every_position_metric(logits), logit_diff(logits)


def test_a_permanent_hook_keeps_every_copy_whole(setup):
    """A hook the user attached sees full-length copies: the sweep then runs each copy from position 0."""
    from llamaviz.interpret.patching import sweeps

    ours, _, _, corrupted, clean_cache, _ = setup
    without = patching.get_act_patch_resid_pre(ours, corrupted, clean_cache, every_position_metric)
    seen = []
    ours.add_hook("blocks.1.hook_mlp_out", lambda x, hook: seen.append(tuple(x.shape)))
    try:
        assert not sweeps._can_pack(ours, patching.KINDS["resid_pre"])
        with_hook = patching.get_act_patch_resid_pre(ours, corrupted, clean_cache, every_position_metric)
    finally:
        ours.reset_hooks()
    assert all(shape[1] == corrupted.shape[1] for shape in seen)
    assert_close(with_hook, without, atol=1e-5, rtol=0)


def test_packed_forwards_are_bounded_and_give_the_same_numbers(setup, monkeypatch):
    """With at most 7 packed rows per forward (a copy of 6 positions fits, two do not) the sweeps split
    into more forwards and return the same numbers."""
    from llamaviz.interpret.patching import sweeps

    ours, _, _, corrupted, clean_cache, _ = setup
    whole = patching.get_act_patch_attn_head_v_by_pos(ours, corrupted, clean_cache, every_position_metric)
    seen = []
    original = sweeps._packed_copies
    monkeypatch.setattr(sweeps, "PACKED_ROWS", 7)
    monkeypatch.setattr(sweeps, "_packed_copies", lambda *args, **kw: seen.append(
        sum(corrupted.shape[1] - cell[0] for cell in args[5])) or original(*args, **kw))
    split = patching.get_act_patch_attn_head_v_by_pos(ours, corrupted, clean_cache, every_position_metric)
    assert max(seen) <= 7 and len(seen) > ours.config.num_hidden_layers
    assert_close(split, whole, atol=1e-5, rtol=0)


def test_a_length_mismatch_shows_the_two_tokenizations_aligned_at_their_first_difference():
    from llamaviz.interpret.patching.sweeps import aligned

    text = aligned(["<s>", "When", " John", " went"], ["<s>", "When", " Jo", "hn", " went"])
    assert "first differ at position 2" in text
    assert "2: ' John' | ' Jo'  <- first difference" in text and "4: - | ' went'" in text
