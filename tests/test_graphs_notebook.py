"""show_graph: one marker per kept node, placed at its (position, layer), sized by influence; edges are kept ones."""

from __future__ import annotations

import pytest

from llamaviz import graphs
from llamaviz.notebook import show_graph
from llamaviz.notebook.graphs import node_places
from test_graphs import setup  # noqa: F401  (the module's fixture)


def test_show_graph_places_and_sizes_the_kept_nodes(setup):  # noqa: F811
    _, _, _, graph = setup
    pruned = graphs.prune(graph)
    figure = show_graph(graph, pruned, max_edges=20)
    nodes = figure.data[-1]
    kept = pruned.nodes.nonzero().flatten().tolist()
    assert len(nodes.x) == len(kept)
    _, layers, labels = node_places(graph)
    assert list(nodes.y) == [float(layers[i]) for i in kept] and list(nodes.text) == [labels[i] for i in kept]
    influence = pruned.influence[kept]
    largest, smallest = int(influence.argmax()), int(influence.argmin())
    assert nodes.marker.size[largest] > nodes.marker.size[smallest]
    assert len(figure.data) - 1 == min(20, int(pruned.edges.sum()))
    with pytest.raises(ValueError, match="max_edges"):
        show_graph(graph, pruned, max_edges=-1)
