"""circuit-tracer's graph JSON read back: our file round-trips (nodes, kept edges and weights), node ids follow
circuit-tracer's conventions, and a file in circuit-tracer's own node-id form opens."""

from __future__ import annotations

import json

import pytest

from llamaviz import graphs
from test_dashboards import Tok
from test_graphs import setup  # noqa: F401  (the module's fixture)


def test_our_json_reads_back_and_writes_the_same_file(setup, tmp_path):  # noqa: F811
    _, _, _, graph = setup
    pruned = graphs.prune(graph)
    first = json.loads(graphs.write_json(graph, pruned, tmp_path / "a.json", Tok()).read_text())
    loaded, kept = graphs.read_json(tmp_path / "a.json")
    second = json.loads(graphs.write_json(loaded, kept, tmp_path / "b.json", Tok()).read_text())
    assert sorted(n["node_id"] for n in first["nodes"]) == sorted(n["node_id"] for n in second["nodes"])
    weights = {(link["source"], link["target"]): link["weight"] for link in first["links"]}
    assert {(link["source"], link["target"]): link["weight"] for link in second["links"]} == pytest.approx(weights)
    assert loaded.layers == graph.layers and loaded.ids.tolist() == graph.ids.tolist()
    assert loaded.logit_tokens.tolist() == graph.logit_tokens.tolist()
    errors = [n for n in first["nodes"] if n["feature_type"] == "mlp reconstruction error"]
    assert all(n["node_id"] == f"{n['layer']}_error_{n['ctx_idx']}" and n["feature"] == -1 for n in errors)


def test_circuit_tracers_error_ids_open(setup, tmp_path):  # noqa: F811
    _, _, _, graph = setup
    data = json.loads(graphs.write_json(graph, graphs.prune(graph), tmp_path / "a.json", Tok()).read_text())
    renamed = {}
    for node in data["nodes"]:
        if node["feature_type"] == "mlp reconstruction error":
            renamed[node["node_id"]] = node["node_id"] = f"0_{node['layer']}_{node['ctx_idx']}"
    for link in data["links"]:
        link["source"], link["target"] = (renamed.get(link[k], link[k]) for k in ("source", "target"))
    (tmp_path / "theirs.json").write_text(json.dumps(data))
    ours, _ = graphs.read_json(tmp_path / "a.json")
    theirs, _ = graphs.read_json(tmp_path / "theirs.json")
    features = {f"{l}_{i}_{p}" for l, p, i in ours.features.tolist()}
    if not features & set(renamed.values()):  # no id collides: the two read the same
        assert (ours.adjacency == theirs.adjacency).all()
    else:
        assert ours.adjacency.shape == theirs.adjacency.shape


def test_bad_files_are_named(tmp_path):
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="not a circuit-tracer graph JSON"):
        graphs.read_json(tmp_path / "x.json")
    (tmp_path / "y.json").write_text(json.dumps({"nodes": [{"node_id": "q", "feature_type": "attention"}], "links": []}))
    with pytest.raises(ValueError, match="feature_type 'attention'"):
        graphs.read_json(tmp_path / "y.json")
