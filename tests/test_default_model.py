"""The default model (SmolLM2-135M-Instruct GGUF) against transformers reading the same file."""

import pytest
import torch
from torch.testing import assert_close

import llamaviz

pytestmark = pytest.mark.slow

PROMPT = "Plants create energy through a process known as"


@pytest.fixture(scope="module")
def pair(default_gguf):
    import transformers

    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        str(default_gguf.parent), gguf_file=default_gguf.name, dtype=torch.float32, attn_implementation="eager").eval()
    ours, tok = llamaviz.load(default_gguf)
    return theirs, ours, tok


def test_logits_and_patterns_match_transformers(pair):
    theirs, ours, tok = pair
    ids = tok(["The quick brown fox jumps over the lazy dog. " + PROMPT], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = theirs(ids, output_attentions=True)
        logits, cache = ours.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
    assert_close(logits, ref.logits, atol=1e-3, rtol=0)
    for layer in (0, 14, 29):
        assert_close(cache["pattern", layer], ref.attentions[layer], atol=1e-5, rtol=0)


def test_greedy_generation_identical_for_32_tokens(pair):
    theirs, ours, tok = pair
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    ref = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                          pad_token_id=tok.pad_token_id)
    out = ours.generate(ids, max_new_tokens=32)
    assert torch.equal(out, ref[:, :out.shape[1]])
    assert out.shape[1] == ref.shape[1]


def test_chat_generation_decodes_to_text(pair):
    _, ours, tok = pair
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, tokenize=False)
    ids = tok(text, return_tensors="pt")["input_ids"]
    out = ours.generate(ids, max_new_tokens=12)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
