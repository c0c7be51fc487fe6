"""The Graph tab's handlers on a tiny random model and transcoder set: what the page shows against the
library's own graph (graphs.attribute, prune, qk_attribution) and an intervention against plain hooks."""

from __future__ import annotations

import re
from html import escape as html_escape

import gradio as gr
import pytest
import torch

from llamaviz import features, graphs
from llamaviz.app import graph as gx, graph_svg, graph_tab
from llamaviz.app.models import ModelEntry
from llamaviz.app.state import BrowserState, Run, Settings
from test_dashboards import Tok
from test_features import random_set
from test_handlers import is_error
from tiny import hf_and_ours

PROMPT = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    _, model = hf_and_ours("gqa")
    model.eval()
    transcoders = random_set(layers=model.config.num_hidden_layers)
    with torch.no_grad():
        for tc in transcoders:
            tc.b_enc.add_(0.05)  # enough active features to make a graph
    root = tmp_path_factory.mktemp("models")
    folder = str(features.save_transcoder_set(transcoders, root / "transcoders"))
    ids = torch.randint(3, 113, (1, PROMPT + 2), generator=torch.Generator().manual_seed(2))
    graph = graphs.attribute(model, features.load_transcoder_set(folder), ids[:, :PROMPT])
    return model, folder, ids, graph, root


def new_state(model, ids) -> BrowserState:
    state = BrowserState()
    state.run = Run(ModelEntry("tiny", model, Tok()), "prompt", "prompt", Settings(), ids, PROMPT,
                    [f"<{i}>" for i in ids[0].tolist()], None, "")
    return state


def built(setup, threshold=0.8):
    model, folder, ids, _, _ = setup
    state, session = new_state(model, ids), gx.GraphSession()
    shown = dict(zip(graph_tab.SHOWN, list(graph_tab.build(state, session, folder, threshold))[-1]))
    assert not is_error(shown["status"]), shown["status"]
    return state, session, shown


def drawn_ids(svg: str) -> list[str]:
    return re.findall(r'data-node="([^"]+)"', svg)


def expected_ids(graph, pruned) -> set[str]:
    """The library's kept features, tokens and logits, and the errors at least as influential as a kept feature."""
    n_f, n = len(graph.features), graph.n
    kept = pruned.nodes.nonzero().flatten().tolist()
    floor = pruned.influence[:n_f][pruned.nodes[:n_f]].min()
    ids = {f"{l}_{i}_{p}" for l, p, i in graph.features[[k for k in kept if k < n_f]].tolist()}
    ids |= {f"{l}_error_{p}" for l in range(graph.layers) for p in range(graph.positions)
            if pruned.influence[graph.error_index(l, p)] >= floor}
    ids |= {f"E_{int(t)}_{p}" for p, t in enumerate(graph.ids[0])}
    ids |= {f"{graph.layers + 1}_{int(t)}_{graph.positions - 1}" for t in graph.logit_tokens}
    assert n == n_f + graph.layers * graph.positions + graph.positions + len(graph.logit_tokens)
    return ids


def test_the_set_is_found_beside_the_checkpoint_and_the_drawing_is_the_librarys_pruned_graph(setup):
    model, folder, ids, graph, root = setup
    assert folder in gx.found_transcoder_sets(str(root / "model.gguf"))
    _, session, shown = built(setup)
    # the same code; float32 products batched by gx.BATCH vs attribute's default round differently
    torch.testing.assert_close(session.built.graph.adjacency, graph.adjacency, atol=1e-4, rtol=1e-4)
    pruned = graphs.prune(graph, 0.8)
    assert set(drawn_ids(shown["graph_plot"])) == expected_ids(graph, pruned)
    n_f = len(graph.features)
    assert f"{int(pruned.nodes[:n_f].sum())} of {n_f} features kept" in shown["graph_caption"]
    found = graphs.scores(graph)
    assert f"replacement score {found['replacement']:.3f}" in shown["graph_caption"]
    kept_edges = pruned.edges[[graph_svg.index_of(graph, i) for i in drawn_ids(shown["graph_plot"])]]
    lines = shown["graph_plot"].count("<line ")
    assert 0 < lines <= graph_svg.MAX_EDGES and lines <= int(kept_edges.sum())
    first = n_f and int(pruned.nodes[:n_f].nonzero()[0])
    l, p, i = graph.features[first].tolist()
    title = re.search(rf'data-node="{l}_{i}_{p}"[^>]*><title>([^<]+)', shown["graph_plot"]).group(1)
    assert f"activation {float(graph.activations[first]):.3f}" in title and "promotes" in title


def test_the_slider_re_prunes_without_recomputing(setup, monkeypatch):
    state, session, _ = built(setup)
    graph = setup[3]
    monkeypatch.setattr(graphs, "attribute", lambda *a, **k: pytest.fail("the graph was recomputed"))
    low = graph_tab.reprune(state, session, 0.3)
    assert set(drawn_ids(low["graph_plot"])) == expected_ids(graph, graphs.prune(graph, 0.3))
    assert len(drawn_ids(low["graph_plot"])) < len(drawn_ids(graph_tab.reprune(state, session, 1.0)["graph_plot"]))


def test_pins_supernodes_and_the_qk_view_read_the_librarys_numbers(setup):
    model, folder, ids, graph, _ = setup
    state, session, shown = built(setup)
    features_shown = [i for i in drawn_ids(shown["graph_plot"]) if "_error_" not in i and not i.startswith("E_")
                      and not i.startswith(f"{graph.layers + 1}_")]
    first = features_shown[0]
    second = next(i for i in features_shown[1:] if int(i.rsplit("_", 1)[1]) < PROMPT - 1)  # before the logits
    logit = f"{graph.layers + 1}_{int(graph.logit_tokens[0])}_{PROMPT - 1}"
    assert not is_error(graph_tab.pin(state, session, first, 0.8)["status"])
    clicked = graph_tab.clicked(state, session, 0.8, gr.EventData(None, {"node": second}))
    assert f'data-node="{second}"' in clicked["graph_plot"] and "stroke-width=\"2.5\"" in clicked["graph_plot"]
    grouped = graph_tab.group(state, session, "features", 0.8)
    assert not is_error(grouped["status"]) and "features" in grouped["graph_subgraph"]
    pinned = graph_tab.pin(state, session, logit, 0.8)  # the logit stays its own node
    members = [graph_svg.index_of(graph, i) for i in (first, second, logit)]
    assert session.supernodes["features"] == members[:2]
    weight = float(graph.adjacency[members[2]][members[:2]].sum())
    page = graph_tab.subgraph_html(session.built, session)
    assert f'data-edge="features->{logit}"' in page and f"{weight:+.4f}" in page

    source = graph_svg.index_of(graph, second)
    loadings = graphs.head_loadings(model, features.load_transcoder_set(folder), graph, members[2], source)
    strongest = int(loadings["heads"].abs().flatten().argmax())
    layer, head = divmod(strongest, loadings["heads"].shape[1])
    assert (pinned["graph_qk_layer"], pinned["graph_qk_head"]) == (layer, head)
    assert (pinned["graph_qk_query"], pinned["graph_qk_key"]) == (PROMPT - 1, int(graph.features[source, 1]))
    assert f"L{layer} H{head}</td><td>{float(loadings['heads'][layer, head]):+.4f}" in pinned["graph_loadings"]

    l_q, query, key = 1, PROMPT - 1, 2
    qk = graph_tab.qk_view(state, session, l_q, 1, query, key)["graph_qk_view"]
    expected = graphs.qk_attribution(model, features.load_transcoder_set(folder), graph, l_q, 1, query, key)
    assert f"score {expected['score']:.4f}" in qk and f"sum to {float(expected['terms'].sum()):.4f}" in qk
    top = expected["terms"].flatten().abs().argmax()
    assert f"{float(expected['terms'].flatten()[top]):+.4f}" in qk


def plain_top(model, ids, hooks=()) -> list[tuple[str, float]]:
    with torch.no_grad(), model.hooks(fwd_hooks=list(hooks)):
        probs = model(ids, return_type="logits")[0, -1].softmax(-1)
    values, tokens = probs.topk(gx.TOP_TOKENS)
    return [(Tok().decode([int(t)]), float(v)) for v, t in zip(values, tokens)]


def test_an_intervention_on_the_last_layer_matches_plain_hooks(setup):
    model, folder, ids, graph, _ = setup
    state, session, _ = built(setup, threshold=1.0)
    last = [k for k, (l, p, _) in enumerate(graph.features.tolist()) if l == graph.layers - 1 and p == PROMPT - 1]
    assert last, "the random set has a feature at the last layer and position"
    session.pinned = last
    found = gx.intervene(state.run, session.built, session.pinned, 0.0, freeze=False)
    tcs = features.load_transcoder_set(folder)

    def remove(out, hook):
        out = out.clone()
        for k in last:
            out[0, PROMPT - 1] -= graph.activations[k] * tcs[graph.layers - 1].W_dec[int(graph.features[k, 2])]
        return out

    expected = plain_top(model, ids[:, :PROMPT], [(f"blocks.{graph.layers - 1}.hook_mlp_out", remove)])
    assert [t for t, _ in found["after"]] == [t for t, _ in expected]
    torch.testing.assert_close([p for _, p in found["after"]], [p for _, p in expected], atol=1e-5, rtol=1e-4)
    unchanged = gx.intervene(state.run, session.built, session.pinned, 1.0, freeze=True)  # no edit: the model's own
    plain = plain_top(model, ids[:, :PROMPT])
    assert [t for t, _ in unchanged["after"]] == [t for t, _ in plain] == [t for t, _ in unchanged["before"]]
    torch.testing.assert_close([p for _, p in unchanged["after"]], [p for _, p in plain], atol=1e-5, rtol=1e-4)
    page = graph_tab.intervene(state, session, "zero", 1.0, False)["graph_intervention"]
    assert f"{found['after'][0][1]:.3f}" in page and "top tokens before" in page


def test_bad_input_shows_a_message_and_the_tab_keeps_working(setup, tmp_path, monkeypatch):
    model, folder, ids, _, _ = setup
    state, session = new_state(model, ids), gx.GraphSession()
    last = lambda *inputs: dict(zip(graph_tab.SHOWN, list(graph_tab.build(*inputs))[-1]))  # noqa: E731
    assert "pick a transcoder set" in last(state, session, "", 0.8)["status"]
    assert "no transcoder set at" in last(state, session, str(tmp_path / "nothing"), 0.8)["status"]
    other = str(features.save_transcoder_set(random_set(layers=2), tmp_path / "other"))
    message = last(state, session, other, 0.8)["status"]
    assert is_error(message) and "has 2 layers" in message and "made for this model" in message
    monkeypatch.setattr(gx, "MAX_TOKENS", 4)
    message = last(state, session, folder, 0.8)["status"]
    assert is_error(message) and "at most 4" in message
    monkeypatch.setattr(gx, "MAX_TOKENS", 64)
    monkeypatch.setattr(gx, "MAX_ROW_BYTES", 1000)
    message = last(state, session, folder, 0.8)["status"]
    assert is_error(message) and "features are active on these 6 tokens" in message and "MiB" in message
    monkeypatch.undo()
    assert "Generate first" in last(BrowserState(), session, folder, 0.8)["status"]
    assert "build the graph first" in graph_tab.pin(state, session, "0_1_2", 0.8)["status"]
    _, session, _ = built(setup)
    state = new_state(model, ids)
    assert "earlier run" in graph_tab.reprune(state, session, 0.5)["status"]
    state, session, _ = built(setup)
    assert "no node &#x27;nope&#x27;" in graph_tab.pin(state, session, "nope", 0.8)["status"]
    assert "pin at least one feature" in graph_tab.intervene(state, session, "zero", 1.0, True)["status"]
    assert "finite number" in graph_tab.intervene(state, session, "multiply", float("nan"), True)["status"]
    assert "node threshold must be" in graph_tab.reprune(state, session, 0)["status"]
    assert "the layer must be a whole number" in graph_tab.qk_view(state, session, None, 0, 3, 1)["status"]
    assert not is_error(graph_tab.reprune(state, session, 0.6)["status"])  # still serving


def test_a_feature_nodes_hover_reads_its_dashboard_when_the_set_has_one(setup, tmp_path):
    import shutil

    from llamaviz.features import dashboards

    model, folder, ids, graph, _ = setup
    copy = shutil.copytree(folder, tmp_path / "with-dashboards")
    layer = int(graph.features[0, 0])
    windows = torch.randint(3, 113, (9, 8), generator=torch.Generator().manual_seed(5))
    (copy / f"layer_{layer}").mkdir()
    dashboards.build(model, features.load_transcoder_set(copy)[layer], windows, copy / f"layer_{layer}")
    board = dashboards.DashboardFile(copy / f"layer_{layer}")
    state, session = new_state(model, ids), gx.GraphSession()
    shown = dict(zip(graph_tab.SHOWN, list(graph_tab.build(state, session, str(copy), 1.0))[-1]))
    for l, p, i in graph.features.tolist():
        if l == layer and f'data-node="{l}_{i}_{p}"' in shown["graph_plot"]:
            title = re.search(rf'data-node="{l}_{i}_{p}"[^>]*><title>([^<]+)', shown["graph_plot"]).group(1)
            data = board.feature(i)
            promoted = ", ".join(Tok().decode([int(t)]) for t in data["promoted_ids"][:3])
            assert f"density {float(data['density']):.3%}; promotes {html_escape(promoted)}" in title
            break
    else:
        pytest.fail(f"no feature of layer {layer} is drawn")


def test_past_the_node_budget_the_graph_keeps_the_librarys_most_influential_features(setup, monkeypatch):
    model, folder, ids, graph, _ = setup
    monkeypatch.setattr(gx, "MAX_FEATURE_NODES", 5)
    _, session, shown = built(setup)
    expected = graphs.attribute(model, features.load_transcoder_set(folder), ids[:, :PROMPT], batch=gx.BATCH,
                                max_feature_nodes=5)
    assert len(expected.features) == 5 < len(graph.features)
    torch.testing.assert_close(session.built.graph.features, expected.features)
    torch.testing.assert_close(session.built.graph.adjacency, expected.adjacency)
    assert f"the 5 most influential of {len(graph.features)} active: node budget" in shown["graph_caption"]
