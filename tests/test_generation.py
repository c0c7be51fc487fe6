"""generate() against transformers' generate on tiny random models."""

import pytest
import torch

from llamaviz.run.generation import generate
from llamaviz.run.streamers import TextIteratorStreamer, TextStreamer
from tiny import hf_and_ours


def hf_generate(hf, ids, **kw):
    return hf.generate(ids, attention_mask=kw.pop("attention_mask", torch.ones_like(ids)), pad_token_id=0,
                       eos_token_id=None, **kw)


@pytest.mark.parametrize("variant", ["default", "gqa", "tied", "llama3_rope"])
def test_greedy_generation_identical_to_transformers(variant):
    hf, ours = hf_and_ours(variant, hf_attn="sdpa")
    ids = torch.randint(3, 113, (1, 7))
    ref = hf_generate(hf, ids, max_new_tokens=20, do_sample=False, min_new_tokens=20)
    out = ours.generate(ids, max_new_tokens=20, eos_token_id=[])
    assert torch.equal(out, ref)


def test_left_padded_batch_generation_identical_to_transformers():
    hf, ours = hf_and_ours("gqa", hf_attn="sdpa")
    ids = torch.randint(3, 113, (2, 9))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    ref = hf_generate(hf, ids, attention_mask=mask, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    out = ours.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(out, ref)
    alone = ours.generate(ids[:1, 3:], max_new_tokens=12, eos_token_id=[])
    assert torch.equal(out[0, 3:], alone[0])


def test_sampling_follows_transformers_with_the_same_seed():
    hf, ours = hf_and_ours("default", hf_attn="sdpa")
    ids = torch.randint(3, 113, (1, 5))
    settings = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.3, max_new_tokens=15)
    torch.manual_seed(123)
    ref = hf_generate(hf, ids, min_new_tokens=15, **settings)
    torch.manual_seed(123)
    out = ours.generate(ids, eos_token_id=[], **settings)
    assert torch.equal(out, ref)


def test_repetition_penalty_greedy_matches_transformers():
    hf, ours = hf_and_ours("default", hf_attn="sdpa")
    ids = torch.randint(3, 113, (1, 6))
    ref = hf_generate(hf, ids, max_new_tokens=15, do_sample=False, repetition_penalty=1.5, min_new_tokens=15)
    assert torch.equal(ours.generate(ids, max_new_tokens=15, repetition_penalty=1.5, eos_token_id=[]), ref)


def test_seed_makes_sampling_reproducible():
    _, ours = hf_and_ours()
    ids = torch.randint(3, 113, (1, 5))
    first = ours.generate(ids, do_sample=True, seed=7, max_new_tokens=10)
    assert torch.equal(first, ours.generate(ids, do_sample=True, seed=7, max_new_tokens=10))


def test_stops_at_eos_and_pads_finished_rows():
    _, ours = hf_and_ours()
    ids = torch.randint(3, 113, (2, 5))
    free = ours.generate(ids, max_new_tokens=6, eos_token_id=[])
    eos = int(free[0, 6])  # the second token row 0 produces becomes "end of sequence"
    out = ours.generate(ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert out[0, 6] == eos
    if (free[1, 5:] == eos).any():
        pytest.skip("row 1 produced the chosen eos too")
    assert (out[0, 7:] == 0).all() and torch.equal(out[1], free[1, :out.shape[1]])


def test_static_cache_generates_what_the_dynamic_cache_does():
    _, ours = hf_and_ours("gqa")
    ids = torch.randint(3, 113, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    dynamic = ours.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    static = ours.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[], cache_implementation="static")
    assert torch.equal(dynamic, static)


class ListTokenizer:
    """Decodes ids as space-joined numbers: enough to check what streamers release."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" {i}" for i in ids)


def test_streamers_release_the_continuation_in_pieces():
    _, ours = hf_and_ours()
    ids = torch.randint(3, 113, (1, 4))
    pieces = []
    out = ours.generate(ids, max_new_tokens=5, eos_token_id=[],
                        streamer=TextStreamer(ListTokenizer(), on_text=lambda text, final: pieces.append(text)))
    assert "".join(pieces) == ListTokenizer().decode(out[0, 4:].tolist())
    assert len([p for p in pieces if p]) == 5
    import threading

    streamer = TextIteratorStreamer(ListTokenizer())
    thread = threading.Thread(target=ours.generate, args=(ids,),
                              kwargs=dict(max_new_tokens=5, eos_token_id=[], streamer=streamer))
    thread.start()
    assert "".join(streamer) == "".join(pieces)
    thread.join()


def test_stop_callback_ends_generation_early():
    _, ours = hf_and_ours()
    calls = []
    out = ours.generate(torch.randint(3, 113, (1, 4)), max_new_tokens=10, eos_token_id=[],
                        stop=lambda: len(calls) >= 3, on_step=calls.append)
    assert out.shape[1] == 4 + 3


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(temperature=0.0, do_sample=True), "temperature must be > 0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(cache_implementation="paged"), "cache_implementation 'paged' is not supported"),
])
def test_bad_settings_are_named(kwargs, message):
    _, ours = hf_and_ours()
    with pytest.raises(ValueError, match=message):
        ours.generate(torch.randint(3, 113, (1, 4)), **kwargs)


def test_empty_and_too_long_prompts_are_refused():
    _, ours = hf_and_ours()
    with pytest.raises(ValueError, match="non-empty prompt"):
        ours.generate(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="context of 64 tokens"):
        generate(ours, torch.ones(1, 64, dtype=torch.long))
