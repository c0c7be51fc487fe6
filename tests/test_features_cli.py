"""`llamaviz features top | show | dashboards` on the default model."""

import pytest
import torch

from llamaviz import cli, features
from llamaviz.features.dictionary import Dictionary, DictionaryConfig

pytestmark = pytest.mark.slow


def test_top_dashboards_and_show(tmp_path, capsys, default_gguf):
    torch.manual_seed(1)
    sae = Dictionary(DictionaryConfig("topk", d_in=576, d_sae=1152, hook_name="blocks.10.hook_resid_post", k=8))
    with torch.no_grad():
        sae.W_dec.normal_(0, 0.05)
        sae.W_enc.copy_(sae.W_dec.T * 4)
    folder = features.save(sae, tmp_path / "sae")
    (tmp_path / "notes.txt").write_text("The cat sat on the mat. <script>alert(1)</script> " * 40)
    assert cli.main(["features", "top", "The cat sat", "--dictionary", str(folder)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and "' cat'" in lines[1] and "#" in lines[1]
    assert cli.main(["features", "dashboards", "--dictionary", str(folder), "--data", str(tmp_path / "notes.txt"),
                     "--tokens", "512", "--context", "64"]) == 0
    assert (folder / "dashboards.safetensors").exists()
    capsys.readouterr()
    assert cli.main(["features", "show", "--dictionary", str(folder), "--feature", "7"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("feature 7 of blocks.10.hook_resid_post: density") and "promotes:" in out
    assert cli.main(["features", "show", "--dictionary", str(folder), "--feature", "5000"]) == 2
    assert "accepted: 0..1151" in capsys.readouterr().err
