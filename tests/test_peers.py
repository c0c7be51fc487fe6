"""Round trips with the peers that cannot share this environment: SAELens reads llamaviz's dictionary folders
and computes the same numbers (1e-6), llamaviz reads what SAELens writes, and circuit-tracer opens a
transcoder set written here. They run in .venv-peers (`make peers` builds it) and skip without it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from llamaviz import features
from test_features import CASES, random_dictionary, random_set

PEERS = Path(__file__).resolve().parents[1] / ".venv-peers" / "bin" / "python"
BUILT = PEERS.parents[1] / ".installed"  # make peers writes it last: a half-built environment is skipped
SAE_CASES = CASES


@pytest.fixture(scope="module")
def peers(tmp_path_factory):
    if not BUILT.exists():
        pytest.skip("the peers environment is absent: `make peers` builds .venv-peers (sae-lens, circuit-tracer)")
    work = tmp_path_factory.mktemp("peers")
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(9))
    save_file({"x": x}, str(work / "inputs.safetensors"))
    ours = {}
    for index, (architecture, cfg) in enumerate(SAE_CASES):
        dictionary = random_dictionary(architecture, seed=index, **cfg)
        dictionary.cfg.metadata |= {"model_name": "tiny", "context_size": 128, "prepend_bos": True}
        if dictionary.cfg.is_transcoder:
            dictionary.cfg.hook_name_out = "blocks.1.hook_mlp_out"
        name = f"{index}-{architecture}"
        features.save(dictionary, work / "saes" / name)
        ours[name] = dictionary
    transcoders = random_set(layers=2)
    features.save_transcoder_set(transcoders, work / "set")
    result = subprocess.run([str(PEERS), str(Path(__file__).with_name("peers_check.py")), str(work)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return work, x, ours, transcoders, load_file(str(work / "peers.safetensors"))


def test_saelens_reads_our_folders_and_computes_the_same_numbers(peers):
    _, x, ours, _, theirs = peers
    for name, dictionary in ours.items():
        with torch.no_grad():
            acts = dictionary.encode(x)
            assert_close(theirs[f"{name}.acts"], acts, atol=1e-6, rtol=1e-6, msg=name)
            assert_close(theirs[f"{name}.recons"], dictionary.decode(acts, x), atol=1e-6, rtol=1e-6, msg=name)


def test_saelens_reads_our_metadata(peers):
    _, _, ours, _, theirs = peers
    for name, dictionary in ours.items():
        meta = dictionary.cfg.metadata
        expected = "|".join(str(v) for v in (meta.hook_name, meta.model_name, meta.context_size, meta.prepend_bos))
        assert "".join(map(chr, theirs[f"{name}.metadata"].tolist())) == expected, name


def test_what_saelens_writes_loads_here_with_the_same_numbers(peers):
    work, x, ours, _, _ = peers
    for name, dictionary in ours.items():
        loaded = features.load(work / "saes_resaved" / name)
        assert loaded.cfg.architecture == dictionary.cfg.architecture and loaded.cfg.d_sae == dictionary.cfg.d_sae
        assert (loaded.cfg.metadata.hook_name, loaded.cfg.metadata.model_name, loaded.cfg.metadata.context_size) == (
            dictionary.cfg.hook_name, "tiny", 128), name  # metadata survives SAELens's load and save
        assert loaded.cfg.hook_name_out == dictionary.cfg.hook_name_out, name
        with torch.no_grad():
            assert_close(loaded(x), dictionary(x), atol=1e-6, rtol=1e-6, msg=name)


def test_circuit_tracer_opens_our_transcoder_set(peers):
    _, x, _, transcoders, theirs = peers
    assert "".join(map(chr, theirs["set.input_hook"].tolist())) == "mlp.hook_in"
    for layer, tc in enumerate(transcoders):
        with torch.no_grad():
            assert_close(theirs[f"set.{layer}.acts"], tc.encode(x), atol=1e-6, rtol=1e-6)
            assert_close(theirs[f"set.{layer}.out"], tc(x), atol=1e-5, rtol=1e-5)


def transformers_folder(model, folder: Path) -> Path:
    """A tiny model as a transformers folder with a word-level tokenizer (circuit-tracer's nnsight backend loads both)."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model.save_pretrained(folder)
    vocab = Tokenizer(models.WordLevel({f"t{i}": i for i in range(model.config.vocab_size)}, unk_token="t0"))
    vocab.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=vocab, bos_token="t1", eos_token="t2", unk_token="t0",
                            pad_token="t0").save_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # the class name transformers 4.57 knows
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_circuit_tracer_builds_the_same_adjacency(tmp_path):
    """Same tiny Llama, JumpReLU set and prompt (BOS first, as circuit-tracer prepends it), float64, all nodes.

    Node orders agree (features by layer, position, index with position 0 excluded; errors by layer and
    position; tokens; logits by probability). circuit-tracer zeroes the error vectors at position 0, so
    those columns are zero there and compared only as such."""
    if not BUILT.exists():
        pytest.skip("the peers environment is absent: `make peers` builds .venv-peers (sae-lens, circuit-tracer)")
    from llamaviz import graphs
    from tiny import hf_and_ours

    _, model = hf_and_ours("gqa")
    transformers_folder(model, tmp_path / "model")
    transcoders = random_set(layers=3, skip=False, activation="jumprelu")
    with torch.no_grad():
        for tc in transcoders:
            tc.threshold.fill_(0.02)
            tc.b_enc.add_(0.05)
    features.save_transcoder_set(transcoders, tmp_path / "set")
    ids = torch.randint(3, 113, (6,), generator=torch.Generator().manual_seed(2))
    ids[0] = model.config.bos_token_id
    save_file({"ids": ids, "budget": torch.tensor(0), "batch": torch.tensor(16), "float64": torch.tensor(1)},
              str(tmp_path / "graph_inputs.safetensors"))
    result = subprocess.run([str(PEERS), str(Path(__file__).with_name("peers_check.py")), "graph", str(tmp_path)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = load_file(str(tmp_path / "graph.safetensors"))
    graph = graphs.attribute(model.double(), transcoders.double(), ids[None])
    assert torch.equal(theirs["active"], graph.features) and torch.equal(theirs["logit_tokens"], graph.logit_tokens)
    first_errors = [graph.error_index(layer, 0) for layer in range(graph.layers)]
    assert theirs["adjacency"][:, first_errors].abs().max() == 0
    kept = torch.ones(graph.n, dtype=torch.bool)
    kept[first_errors] = False
    assert_close(theirs["adjacency"][:, kept].double(), graph.adjacency[:, kept], atol=1e-4, rtol=1e-4)
