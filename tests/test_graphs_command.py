"""`llamaviz graph`: the scores it prints are graphs.scores of the graph it writes, and the file reads back."""

from __future__ import annotations

import torch

from llamaviz import cli, features, graphs
from llamaviz.graphs import command
from test_dashboards import Tok
from test_features import random_set
from tiny import hf_and_ours


class WordTok(Tok):
    def encode(self, text):
        return [int(word) for word in text.split()]


def test_the_graph_command_prints_the_scores_and_writes_the_json(tmp_path, monkeypatch, capsys):
    _, model = hf_and_ours("gqa")
    transcoders = random_set(layers=model.config.num_hidden_layers)
    with torch.no_grad():
        for tc in transcoders:
            tc.b_enc.add_(0.05)
    features.save_transcoder_set(transcoders, tmp_path / "set")
    monkeypatch.setattr(command, "load", lambda path, dtype=None: (model, WordTok()))
    status = cli.main(["graph", "1 17 40 8 99", "--transcoders", str(tmp_path / "set"), "--out",
                       str(tmp_path / "g.json"), "--top", "3"])
    printed = capsys.readouterr().out
    assert status == 0
    expected = graphs.scores(graphs.attribute(model, transcoders, torch.tensor([[1, 17, 40, 8, 99]])))
    assert f"replacement score {expected['replacement']:.3f}" in printed
    assert f"completeness score {expected['completeness']:.3f}" in printed
    assert printed.count("feature ") >= 3 and (tmp_path / "g.json").exists()
    loaded, _ = graphs.read_json(tmp_path / "g.json")
    assert loaded.ids.tolist() == [[1, 17, 40, 8, 99]]
