"""examples/main_demo.ipynb (TransformerLens' Main_Demo, ported) executes, and its numbers are TransformerLens'.

The notebook runs in a Jupyter kernel that imports this checkout's llamaviz; a cell appended here
(not part of the notebook) writes its results to a JSON file. The references come from TransformerLens'
TransformerBridge over transformers' model of the same GGUF, running the demo's own computations on the
notebook's inputs (its random tokens included): the losses, the value-head ablation, the logit
differences and a few cells of the residual patching sweep, every head's induction score, and the OV
and full-OV copying scores. The notebook's sizes are the demo's except where they are arbitrary (a batch
of 4 random sequences, every sixth layer patched, 2,000 tokens of the vocabulary for the full OV circuit).
"""

import json
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from notebooks import execute

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "main_demo.ipynb"
TOL = {"atol": 2e-4, "rtol": 1e-4}

# the demo rebinds `model` to its toy module at the end; everything kept here was computed before that
DUMP = """
import json as _json
import llamaviz as _llamaviz
_json.dump({{"llamaviz": _llamaviz.__file__, "text": model_description_text, "loss": loss.item(),
            "gpt2_tokens": gpt2_tokens.tolist(), "original_loss": original_loss.item(),
            "ablated_loss": ablated_loss.item(), "head": head_index_to_ablate,
            "clean": clean_tokens.tolist(), "corrupted": corrupted_tokens.tolist(),
            "clean_diff": clean_logit_diff.item(), "corrupted_diff": corrupted_logit_diff.item(),
            "patching": ioi_patching_result.tolist(), "repeated": repeated_tokens.tolist(),
            "induction": induction_score_store.tolist(), "seq_len": seq_len,
            "ov_score": OV_copying_score.tolist(), "full_ov_score": full_OV_copying_score.tolist(),
            "vocab": [vocab.start, vocab.stop], "multi": example_multi_text_tokens.tolist(),
            "toy_out": out.item()}}, open({path!r}, "w"))
"""


@pytest.fixture(scope="module")
def numbers(default_gguf, tmp_path_factory):
    folder = tmp_path_factory.mktemp("main_demo")
    execute(NOTEBOOK, ROOT, extra_cells=(DUMP.format(path=str(folder / "numbers.json")),))
    numbers = json.loads((folder / "numbers.json").read_text())
    assert Path(numbers["llamaviz"]).resolve().is_relative_to(ROOT)
    return numbers


def _copying_score(eigenvalues: torch.Tensor) -> torch.Tensor:
    return eigenvalues.sum(-1).real / eigenvalues.abs().sum(-1)


@pytest.mark.slow
def test_main_demo_numbers_equal_transformer_lens(numbers, default_with_reference):
    import transformer_lens.utilities as tl_utils

    _, _, _, tl = default_with_reference
    gpt2_tokens = torch.tensor(numbers["gpt2_tokens"])
    assert torch.equal(tl.to_tokens(numbers["text"])[:, :1], gpt2_tokens[:, :1])  # BOS first in both
    assert torch.equal(tl.to_tokens(["The cat sat on the mat.", "The cat sat on the mat really hard."]),
                       torch.tensor(numbers["multi"]))  # padded on the right, as TransformerLens pads
    with torch.no_grad():
        assert_close(torch.tensor(numbers["loss"]), tl(numbers["text"], return_type="loss"), **TOL)
        assert_close(torch.tensor(numbers["original_loss"]), tl(gpt2_tokens, return_type="loss"), **TOL)

        def ablate(value, hook):
            value[:, :, numbers["head"], :] = 0.0
            return value

        ablated = tl.run_with_hooks(gpt2_tokens, return_type="loss", fwd_hooks=[(tl_utils.get_act_name("v", 0), ablate)])
        assert_close(torch.tensor(numbers["ablated_loss"]), ablated, **TOL)
        _check_patching(tl, numbers)
        _check_induction(tl, numbers)
    heads = tl.cfg.n_layers, tl.cfg.n_heads
    assert_close(torch.tensor(numbers["ov_score"]), _copying_score(tl.OV.eigenvalues).reshape(heads), **TOL)
    vocab = slice(*numbers["vocab"])
    full = (tl.W_E[vocab] @ tl.OV @ tl.W_U[:, vocab]).eigenvalues
    assert_close(torch.tensor(numbers["full_ov_score"]), _copying_score(full).reshape(heads), atol=1e-3, rtol=1e-3)
    assert numbers["toy_out"] == 780.0  # (5^2 + 3)^2 - 4, TransformerLens' toy module


def _check_patching(tl, numbers):
    clean, corrupted = torch.tensor(numbers["clean"]), torch.tensor(numbers["corrupted"])
    john, mary = tl.to_single_token(" John"), tl.to_single_token(" Mary")
    diff = lambda logits: logits[0, -1, john] - logits[0, -1, mary]  # noqa: E731
    clean_logits, clean_cache = tl.run_with_cache(clean)
    clean_diff, corrupted_diff = diff(clean_logits), diff(tl(corrupted))
    assert_close(torch.tensor([numbers["clean_diff"], numbers["corrupted_diff"]]),
                 torch.stack([clean_diff, corrupted_diff]), **TOL)
    result = torch.tensor(numbers["patching"])  # [L, p], every sixth layer filled in
    best = divmod(int(result.abs().argmax()), result.shape[1])
    for layer, position in (best, (0, result.shape[1] - 1), (12, 9)):

        def patch(resid, hook):
            resid[:, position] = clean_cache[hook.name][:, position]
            return resid

        patched = tl.run_with_hooks(corrupted, fwd_hooks=[(tl_utils_name(layer), patch)])
        expected = (diff(patched) - corrupted_diff) / (clean_diff - corrupted_diff)
        assert_close(result[layer, position], expected, **TOL, msg=f"layer {layer}, position {position}")


def tl_utils_name(layer: int) -> str:
    import transformer_lens.utilities as tl_utils

    return tl_utils.get_act_name("in", layer)  # the demo's spelling: the block's input


def _check_induction(tl, numbers):
    store, seq_len = torch.zeros(tl.cfg.n_layers, tl.cfg.n_heads), numbers["seq_len"]

    def score(pattern, hook):
        store[hook.layer()] = pattern.diagonal(dim1=-2, dim2=-1, offset=1 - seq_len).mean((0, -1))

    tl.run_with_hooks(torch.tensor(numbers["repeated"]), return_type=None,
                      fwd_hooks=[(lambda name: name.endswith("pattern"), score)])
    assert_close(torch.tensor(numbers["induction"]), store, **TOL)
    assert divmod(int(store.argmax()), tl.cfg.n_heads) == (18, 6)  # the head the notebook draws
