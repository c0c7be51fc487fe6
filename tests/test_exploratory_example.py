"""examples/exploratory_analysis.ipynb executes, and its numbers are TransformerLens' on the same model.

The notebook runs in a Jupyter kernel that imports this checkout's llamaviz; a cell appended here
(not part of the notebook) writes its key results to a JSON file. The reference numbers come from
TransformerLens' TransformerBridge over transformers' model of the same GGUF: the logit difference
from its forward, the per-head direct logit attribution from its cache's head results through the
frozen final scale (projected on W_U's columns times the final norm's weight, which llamaviz's
tokens_to_residual_directions includes), and the block patching from its patching module on a
selection of cells (its full sweep takes one forward per cell, about 20 minutes here).
"""

import json
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from notebooks import execute

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "exploratory_analysis.ipynb"
TOL = {"atol": 1e-4, "rtol": 0}

DUMP = """
import json as _json
import llamaviz as _llamaviz
_json.dump({{"llamaviz": _llamaviz.__file__, "prompts": prompts, "tokens": tokens.tolist(),
            "answer_tokens": answer_tokens.tolist(), "logit_diff": original_average_logit_diff.item(),
            "per_head": per_head_logit_diffs.tolist(), "top_head": list(top_heads[0]),
            "every_block": every_block_result.tolist()}}, open({path!r}, "w"))
"""


@pytest.fixture(scope="module")
def notebook_numbers(default_gguf, tmp_path_factory):
    folder = tmp_path_factory.mktemp("exploratory")
    execute(NOTEBOOK, ROOT, extra_cells=(DUMP.format(path=str(folder / "numbers.json")),))
    numbers = json.loads((folder / "numbers.json").read_text())
    assert Path(numbers["llamaviz"]).resolve().is_relative_to(ROOT)
    return numbers


def _logit_diff(logits, answers):
    final = logits[:, -1].gather(-1, answers)  # [b, 2]
    return (final[:, 0] - final[:, 1]).mean()


@pytest.mark.slow
def test_notebook_numbers_equal_transformer_lens(notebook_numbers, default_with_reference):
    import pandas as pd
    import transformer_lens.patching as tl_patching

    _, _, hf, tl = default_with_reference
    tokens, answers = torch.tensor(notebook_numbers["tokens"]), torch.tensor(notebook_numbers["answer_tokens"])
    assert torch.equal(tl.to_tokens(notebook_numbers["prompts"]), tokens)  # the same ids, BOS first
    with torch.no_grad():
        logits, cache = tl.run_with_cache(tokens)
    assert_close(torch.tensor(notebook_numbers["logit_diff"]), _logit_diff(logits, answers), **TOL)

    # direct logit attribution of each head, TransformerLens' frozen-scale head results
    heads = cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True)  # [L * h, b, m]
    directions = (tl.W_U[:, answers[:, 0]] - tl.W_U[:, answers[:, 1]]).T * hf.model.norm.weight  # [b, m]
    per_head = (heads * directions).sum(-1).mean(-1).reshape(tl.cfg.n_layers, tl.cfg.n_heads)
    assert_close(torch.tensor(notebook_numbers["per_head"]), per_head, **TOL)
    assert notebook_numbers["top_head"] == list(divmod(int(per_head.argmax()), tl.cfg.n_heads))

    # block patching on the first pair: the notebook's best cell of each row and a few fixed cells
    clean, corrupted = tokens[:1], tokens[1:2]
    with torch.no_grad():
        clean_logits, clean_cache = tl.run_with_cache(clean)
        clean_diff, corrupted_diff = _logit_diff(clean_logits, answers[:1]), _logit_diff(tl(corrupted), answers[:1])

    def ioi_metric(patched):
        return (_logit_diff(patched, answers[:1]) - corrupted_diff) / (clean_diff - corrupted_diff)

    every_block = torch.tensor(notebook_numbers["every_block"])  # [3, L, p]
    for row, name in enumerate(("resid_pre", "attn_out", "mlp_out")):
        best = divmod(int(every_block[row].argmax()), every_block.shape[-1])
        cells = pd.DataFrame([best, (0, 2), (tl.cfg.n_layers // 2, every_block.shape[-1] - 1)],
                             columns=["layer", "pos"])
        theirs = tl_patching.generic_activation_patch(tl, corrupted, clean_cache, ioi_metric,
                                                      tl_patching.layer_pos_patch_setter, name, index_df=cells)
        assert_close(every_block[row, cells["layer"].values, cells["pos"].values], theirs.float(), **TOL, msg=name)
