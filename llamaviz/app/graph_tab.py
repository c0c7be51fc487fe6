"""The Graph tab: the attribution graph of the run's prompt with a transcoder set, pruned by a slider, nodes
pinned by a click or by id and grouped into supernodes, the QK view of a pinned edge, and interventions on
pinned features (numbers: app/graph.py over llamaviz.graphs; drawing: app/graph_svg.py)."""

from __future__ import annotations

import html
import threading
import time

import gradio as gr

from llamaviz import graphs
from llamaviz.app import graph as gx, graph_svg
from llamaviz.app.handlers import current_run, failure, status
from llamaviz.app.workbench import guarded, outputs

# a click on a node of the drawing (its <g data-node>) reaches the server as the HTML component's click event
RELAY_CLICK = ("element.addEventListener('click', (event) => { const node = event.target.closest('[data-node]');"
               " if (node) trigger('click', {node: node.dataset.node}); });")
SHOWN = ["graph_plot", "graph_caption", "graph_node", "graph_subgraph", "status"]


def tab(c: dict, model_path: str | None) -> None:
    with gr.Tab("Graph", id="graph", elem_id="tab-graph"):
        gr.Markdown("The attribution graph of the run's prompt: a transcoder set replaces the MLPs, attention "
                    "patterns and norm scales are frozen, and each edge is a direct effect. Hover a node for its "
                    "summary, click it (or pick its id) to pin it.")
        c["graph_session"] = gr.State(gx.GraphSession())
        with gr.Row():
            c["graph_set"] = gr.Dropdown(gx.found_transcoder_sets(model_path), label="Transcoder set",
                                         allow_custom_value=True, elem_id="graph-set", scale=4)
            c["graph_build"] = gr.Button("Build graph", variant="primary", elem_id="graph-build", scale=1)
        c["graph_prune"] = gr.Slider(0.05, 1.0, value=0.8, step=0.05, label="Node threshold (share of influence kept)",
                                     elem_id="graph-prune")
        c["graph_caption"] = gr.HTML(elem_id="graph-caption")
        c["graph_plot"] = gr.HTML(elem_id="graph-plot", js_on_load=RELAY_CLICK)
        with gr.Row():
            c["graph_node"] = gr.Dropdown([], label="Node (click one above, or pick / type its id)",
                                          allow_custom_value=True, elem_id="graph-node", scale=3)
            c["graph_pin"] = gr.Button("Pin", elem_id="graph-pin", scale=1)
            c["graph_clear"] = gr.Button("Clear pins", elem_id="graph-clear", scale=1)
            c["graph_super_name"] = gr.Textbox(label="Supernode name", elem_id="graph-supernode-name", scale=2)
            c["graph_group"] = gr.Button("Group pinned", elem_id="graph-group", scale=1)
        c["graph_subgraph"] = gr.HTML(elem_id="graph-subgraph")
        c["graph_loadings"] = gr.HTML(elem_id="graph-loadings")
        with gr.Row():
            c["graph_qk_layer"] = gr.Number(0, label="QK: layer", precision=0, elem_id="graph-qk-layer")
            c["graph_qk_head"] = gr.Number(0, label="head", precision=0, elem_id="graph-qk-head")
            c["graph_qk_query"] = gr.Number(1, label="query position", precision=0, elem_id="graph-qk-query")
            c["graph_qk_key"] = gr.Number(0, label="key position", precision=0, elem_id="graph-qk-key")
            c["graph_qk"] = gr.Button("QK attribution", elem_id="graph-qk")
        c["graph_qk_view"] = gr.HTML(elem_id="graph-qk-view")
        with gr.Row():
            c["graph_mode"] = gr.Radio(["zero", "multiply"], value="zero", label="Intervene on pinned features",
                                       elem_id="graph-mode")
            c["graph_factor"] = gr.Number(2.0, label="x activation (multiply)", elem_id="graph-factor")
            c["graph_freeze"] = gr.Checkbox(True, label="Frozen replacement model", elem_id="graph-freeze",
                                          info="patterns, norms and other features fixed; off: the live model")
            c["graph_intervene"] = gr.Button("Intervene", elem_id="graph-intervene")
        c["graph_intervention"] = gr.HTML(elem_id="graph-intervention")


def _esc(text) -> str:
    return html.escape(str(text))


def drawn(state, session: gx.GraphSession, threshold) -> dict:
    """The drawing, caption, node choices and subgraph of the session's graph at `threshold`."""
    run = current_run(state)
    built = session.current(run)
    pruned = built.pruned(threshold)
    shown = graph_svg.shown_nodes(built, pruned)
    kept, drawn_edges = graph_svg.edge_count(built, pruned)
    scores = graphs.scores(built.graph)
    n_f = len(built.graph.features)
    active = built.graph.active_features
    budget = f" (the {n_f} most influential of {active} active: node budget)" if active > n_f else ""
    caption = (f"<p>{int(pruned.nodes[:n_f].sum())} of {n_f} features{budget} kept at node threshold {float(threshold):g}; "
               f"{kept} edges kept among the {len(shown)} nodes shown ({drawn_edges} strongest drawn); "
               f"replacement score {scores['replacement']:.3f}, completeness {scores['completeness']:.3f}.</p>")
    choices = [graph_svg.node_id(built.graph, i) for i in shown]
    return {"graph_plot": graph_svg.svg(run, built, pruned, session.pinned), "graph_caption": caption,
            "graph_node": gr.update(choices=choices), "graph_subgraph": subgraph_html(built, session)}


def subgraph_html(built: gx.Built, session: gx.GraphSession) -> str:
    """The pinned nodes and supernodes, and the edges between them (a supernode's: sums over its members)."""
    if not session.pinned:
        return "<p>No node pinned.</p>"
    graph = built.graph
    grouped = {i for members in session.supernodes.values() for i in members}
    groups = [(name, members) for name, members in session.supernodes.items()]
    groups += [(graph_svg.node_id(graph, i), [i]) for i in session.pinned if i not in grouped]
    rows = []
    for source, sources in groups:
        for target, targets in groups:
            weight = float(graph.adjacency[targets][:, sources].sum())
            if source != target and weight != 0:
                rows.append(f'<tr data-edge="{_esc(source)}->{_esc(target)}"><td>{_esc(source)}</td>'
                            f"<td>{_esc(target)}</td><td>{weight:+.4f}</td></tr>")
    names = "".join(f"<li><b>{_esc(name)}</b>: {_esc(', '.join(graph_svg.node_id(graph, i) for i in members))}</li>"
                    for name, members in groups)
    table = ("<table><tr><th>source</th><th>target</th><th>direct effect</th></tr>" + "".join(rows) + "</table>"
             if rows else "<p>No edge between the pinned nodes.</p>")
    return f'<div class="lv-subgraph"><ul>{names}</ul>{table}</div>'


def build(state, session, path, threshold):
    """Build the graph (a thread), saying how long it has run every second; then draw it."""
    respond = outputs(lambda result: result, SHOWN)
    try:
        run = current_run(state)
        prepared = gx.prepare(run, path)
    except Exception as err:
        yield respond({"status": failure(err)})
        return
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(built=_try(gx.build, run, path, prepared)), daemon=True)
    started = time.perf_counter()
    worker.start()
    active = prepared[2]
    passes = -(-(min(active, gx.MAX_FEATURE_NODES) + 10) // gx.BATCH)  # at most 10 logits
    while worker.is_alive():
        yield respond({"status": status(f"Building the graph: {active} active features, about {passes} backward "
                                        f"passes; {time.perf_counter() - started:.0f} s…")})
        worker.join(1.0)
    built = result["built"]
    if isinstance(built, Exception):
        yield respond({"status": failure(built)})
        return
    session.built, session.pinned, session.supernodes = built, [], {}
    shown = _try(drawn, state, session, threshold)
    if isinstance(shown, Exception):
        yield respond({"status": failure(shown)})
        return
    message = f"Graph built in {time.perf_counter() - started:.1f} s."
    yield respond({**shown, "status": status(message, "ok")})


def _try(fn, *args):
    try:
        return fn(*args)
    except Exception as err:
        return err


@guarded
def reprune(state, session, threshold):
    return {**drawn(state, session, threshold), "status": status(f"Pruned at {float(threshold):g}.", "ok")}


def _pin(state, session, text, threshold) -> dict:
    run = current_run(state)
    built = session.current(run)
    index = graph_svg.index_of(built.graph, text)
    if index not in session.pinned:
        session.pinned.append(index)
    shown = drawn(state, session, threshold)
    return {**shown, **_qk_defaults(run, built, session.pinned), "graph_node": gr.update(choices=shown["graph_node"]
                                                                                     ["choices"], value=text),
            "status": status(f"Pinned {text} ({len(session.pinned)} pinned).", "ok")}


@guarded
def pin(state, session, text, threshold):
    return _pin(state, session, text, threshold)


@guarded
def clicked(state, session, threshold, evt: gr.EventData):
    node = (getattr(evt, "_data", None) or {}).get("node")
    if not node:
        return {}
    return _pin(state, session, node, threshold)


def _qk_defaults(run, built: gx.Built, pinned: list[int]) -> dict:
    """For a pinned edge across positions: its head loadings, and the QK fields set to its strongest head
    with the target's position as query and the source's as key."""
    edge = gx.pinned_edge(built.graph, pinned)
    if edge is None:
        return {}
    source, target = edge
    found = gx.loadings(run, built, source, target)
    key = graph_svg.place(built.graph, source)[1]
    query = graph_svg.place(built.graph, target)[1]
    rows = "".join(f'<tr data-head="{layer}.{head}"><td>L{layer} H{head}</td><td>{part:+.4f}</td></tr>'
                   for layer, head, part in found["heads"])
    names = f"{graph_svg.node_id(built.graph, source)} -> {graph_svg.node_id(built.graph, target)}"
    page = (f'<div class="lv-loadings"><p>Heads carrying {_esc(names)} (edge {found["edge"]:+.4f}; heads and the '
            f'direct part sum to {found["total"]:+.4f}):</p><table><tr><th>head</th><th>part</th></tr>{rows}</table>'
            "</div>")
    shown = {"graph_qk_query": query, "graph_qk_key": key, "graph_loadings": page}
    if found["heads"]:
        layer, head, _ = found["heads"][0]
        shown |= {"graph_qk_layer": layer, "graph_qk_head": head}
    return shown


@guarded
def clear(state, session, threshold):
    session.pinned, session.supernodes = [], {}
    return {**drawn(state, session, threshold), "status": status("Pins cleared.", "ok")}


@guarded
def group(state, session, name, threshold):
    session.current(current_run(state))
    name = str(name or "").strip()
    if not name:
        raise ValueError("name the supernode, e.g. 'cat features'")
    grouped = {i for members in session.supernodes.values() for i in members}
    members = [i for i in session.pinned if i not in grouped]
    if len(members) < 2:
        raise ValueError("pin at least two nodes that are not in a supernode yet, then group them")
    if name in session.supernodes:
        raise ValueError(f"a supernode is already named {name!r}; pick another name")
    session.supernodes[name] = members
    return {**drawn(state, session, threshold), "status": status(f"Grouped {len(members)} nodes as {name}.", "ok")}


@guarded
def qk_view(state, session, layer, head, query, key):
    run = current_run(state)
    found = gx.qk(run, session.current(run), layer, head, query, key)
    labels, terms = found["labels"], found["terms"]
    values, flat = terms.flatten().abs().topk(min(12, terms.numel()))
    width = terms.shape[1]
    rows = "".join(f"<tr><td>{_esc(labels[i // width])}</td><td>{_esc(labels[i % width])}</td>"
                   f"<td>{float(terms.flatten()[i]):+.4f}</td></tr>" for i in flat.tolist())
    page = (f'<div class="lv-qk"><p>L{int(layer)} H{int(head)}, query {int(query)} to key {int(key)}: score '
            f"{found['score']:.4f}; the {terms.numel()} terms sum to {float(terms.sum()):.4f}.</p>"
            f"<table><tr><th>query part</th><th>key part</th><th>term</th></tr>{rows}</table></div>")
    return {"graph_qk_view": page, "status": status("QK attribution done.", "ok")}


@guarded
def intervene(state, session, mode, factor, freeze):
    run = current_run(state)
    built = session.current(run)
    factor = 0.0 if mode == "zero" else gx.checked_factor(factor)
    found = gx.intervene(run, built, session.pinned, factor, bool(freeze))
    before = "".join(f"<li>{_esc(t)} ({p:.3f})</li>" for t, p in found["before"])
    after = "".join(f"<li>{_esc(t)} ({p:.3f})</li>" for t, p in found["after"])
    names = ", ".join(graph_svg.node_id(built.graph, i) for i in found["nodes"])
    page = (f'<div class="lv-graph-intervention"><p>{_esc(names)} x {factor:g}'
            f"{' (frozen replacement model)' if freeze else ' (live model)'}</p><div style='display:flex;gap:3em'>"
            f"<div><b>top tokens before</b><ol>{before}</ol></div><div><b>after</b><ol>{after}</ol></div></div></div>")
    return {"graph_intervention": page, "status": status("Intervened.", "ok")}


def wire(state, c: dict) -> None:
    session = c["graph_session"]

    def click(event, fn, inputs, keys, **options):
        event(outputs(fn, keys), [state, session, *[c[k] for k in inputs]], [c[k] for k in keys], **options)

    c["graph_build"].click(build, [state, session, c["graph_set"], c["graph_prune"]],
                           [c[k] for k in SHOWN])
    click(c["graph_prune"].input, reprune, ["graph_prune"], SHOWN, trigger_mode="always_last")
    pinned = [*SHOWN, "graph_qk_layer", "graph_qk_head", "graph_qk_query", "graph_qk_key", "graph_loadings"]
    click(c["graph_pin"].click, pin, ["graph_node", "graph_prune"], pinned)
    click(c["graph_plot"].click, clicked, ["graph_prune"], pinned)
    click(c["graph_clear"].click, clear, ["graph_prune"], SHOWN)
    click(c["graph_group"].click, group, ["graph_super_name", "graph_prune"], SHOWN)
    click(c["graph_qk"].click, qk_view, ["graph_qk_layer", "graph_qk_head", "graph_qk_query", "graph_qk_key"],
          ["graph_qk_view", "status"])
    click(c["graph_intervene"].click, intervene, ["graph_mode", "graph_factor", "graph_freeze"],
          ["graph_intervention", "status"])
