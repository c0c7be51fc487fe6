"""The notebook's feature helpers against plain hooks on a tiny model."""

import torch
from torch.testing import assert_close

from llamaviz import notebook
from llamaviz.features import dashboards
from llamaviz.notebook.runs import Run
from test_dashboards import Tok
from test_features import random_dictionary
from tiny import hf_and_ours


class TinyTok(Tok):
    def __call__(self, text, return_tensors=None):
        return {"input_ids": torch.tensor([[5 + ord(c) % 90 for c in text]])}


def test_feature_table_steer_and_dashboard(tmp_path):
    _, model = hf_and_ours("gqa")
    model.eval()
    sae = random_dictionary("topk", k=6)
    ids = torch.randint(3, 113, (1, 9))
    run = Run(ids, [str(i) for i in ids[0].tolist()], None, None)
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, names_filter=[sae.cfg.hook_name])
        acts = sae.encode(cache[sae.cfg.hook_name])[0, -1]
    table = notebook.feature_table(model, run, sae)
    assert [f for f, _ in table] == [int(i) for i in acts.topk(6).indices if acts[i] > 0]
    assert_close(torch.tensor([a for _, a in table]), acts.topk(len(table)).values)
    assert len(notebook.show_features(model, run, sae).data[0].x) == len(table)
    result = notebook.steer(model, TinyTok(), "abc", sae, 3, scale=30.0, max_new_tokens=4)
    direction = 30.0 * sae.W_dec[3].detach()
    with torch.no_grad(), model.hooks(fwd_hooks=[(sae.cfg.hook_name, lambda x, hook: x + direction)]):
        expected = model.generate(TinyTok()("abc")["input_ids"], max_new_tokens=4, do_sample=False)
    assert result["steered"] == TinyTok().decode(expected[0, 3:].tolist())
    dashboards.build(model, sae, torch.randint(3, 113, (4, 8)), tmp_path)
    assert "Feature 2" in notebook.show_feature(tmp_path, 2, Tok())
