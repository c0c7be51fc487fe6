"""Crafted checkpoints, activation caches and view files: each fails at once with a ValueError naming
what is wrong, in bounded time and memory (measured in a child process, so the peak RSS is its own)."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llamaviz.llama.activation_cache import ActivationCache
from llamaviz.notebook import open_view, read_view

from test_checkpoints import TINY, hf_twin, write_gguf

MAX_SECONDS = 1.0  # per hostile checkpoint, load call to error
MAX_PEAK_MB = 150  # growth of the child's peak RSS over all hostile files, after one warm-up load

# GGUF value types
U32, F32, STRING, ARRAY, U64 = 4, 6, 8, 9, 10


def gguf_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def gguf_value(kind: int, value) -> bytes:
    if kind == STRING:
        return gguf_string(value)
    if kind == ARRAY:
        item_kind, items = value
        return struct.pack("<IQ", item_kind, len(items)) + b"".join(gguf_value(item_kind, v) for v in items)
    return struct.pack({U32: "<I", F32: "<f", U64: "<Q"}[kind], value)


def llama_fields(**changes) -> list[tuple[str, int, object]]:
    """The metadata a tiny Llama GGUF needs; `changes` replace values by key suffix (block_count=...)."""
    fields = {"general.architecture": (STRING, "llama"), "llama.block_count": (U32, 1),
              "llama.context_length": (U32, 64), "llama.embedding_length": (U32, 64),
              "llama.feed_forward_length": (U32, 96), "llama.attention.head_count": (U32, 4),
              "llama.attention.layer_norm_rms_epsilon": (F32, 1e-5), "llama.vocab_size": (U32, 128)}
    for suffix, value in changes.items():
        key = next(k for k in fields if k.endswith(suffix))
        fields[key] = value if isinstance(value, tuple) else (fields[key][0], value)
    return [(key, kind, value) for key, (kind, value) in fields.items()]


def gguf_bytes(fields, n_tensors: int = 0, n_fields: int | None = None, tail: bytes = b"") -> bytes:
    """A GGUF v3 header written by hand: fields, then `tail` (tensor entries), with the counts as given."""
    body = b"".join(gguf_string(key) + struct.pack("<I", kind) + gguf_value(kind, value) for key, kind, value in fields)
    count = len(fields) if n_fields is None else n_fields
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, count) + body + tail


def tensor_entry(name: str, dims: list[int], type_id: int = 0, offset: int = 0) -> bytes:
    return gguf_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + \
        struct.pack("<IQ", type_id, offset)


def hostile_ggufs(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, the message its error must match)."""
    state = hf_twin().state_dict()  # 2 real layers of TINY
    files = {
        "a million blocks": (gguf_bytes(llama_fields(block_count=1_000_000)),
                             r"llama.block_count is 1,000,000 but the file's tensors hold no layers"),
        "twenty thousand blocks": (None, r"llama.block_count is 20,000 but the file's tensors hold layers 0..1"),
        "a billion-row vocabulary": (None, r"llama.vocab_size .* is 1,000,000,000 but the token embedding has 128 rows"),
        "2**60 tensors": (gguf_bytes(llama_fields(), n_tensors=2**60), r"announces 1,152,921,504,606,846,976 tensors"),
        "2**40 fields": (gguf_bytes(llama_fields(), n_fields=2**40), r"announces 1,099,511,627,776 metadata fields"),
        "alignment 0": (gguf_bytes([*llama_fields(), ("general.alignment", U32, 0)]), r"general.alignment is 0; accepted"),
        "alignment as a string": (gguf_bytes([*llama_fields(), ("general.alignment", STRING, "32")]),
                                  r"general.alignment is '32'; accepted"),
        "block count as a string": (gguf_bytes(llama_fields(block_count=(STRING, "many"))),
                                    r"'llama.block_count' is 'many'; accepted: a positive integer"),
        "a thousand dimensions": (gguf_bytes(llama_fields(), n_tensors=1, tail=tensor_entry("token_embd.weight", [2] * 1000)),
                                  r"has 1,000 dimensions; accepted: at most 4"),
    }
    strings = b"".join([gguf_string("tokenizer.ggml.tokens"), struct.pack("<I", ARRAY), struct.pack("<IQ", STRING, 2**50)])
    files["2**50 strings"] = (gguf_bytes(llama_fields(), n_fields=len(llama_fields()) + 1) + strings,
                              r"announces 1,125,899,906,842,624 array items")
    nested = b"".join([gguf_string("deep"), struct.pack("<I", ARRAY)] + [struct.pack("<IQ", ARRAY, 1)] * 5000)
    files["arrays nested 5000 deep"] = (gguf_bytes(llama_fields(), n_fields=len(llama_fields()) + 1) + nested,
                                        r"arrays nested more than 4 deep")
    out = {}
    for name, (data, message) in files.items():
        path = folder / (name.replace(" ", "-").replace("*", "") + ".gguf")
        if name == "twenty thousand blocks":
            write_gguf(path, state, {**TINY, "num_hidden_layers": 20_000})
        elif name == "a billion-row vocabulary":
            write_gguf(path, state, {**TINY, "vocab_size": 10**9})
        else:
            path.write_bytes(data)
        out[name] = (path, message)
    return out


def hostile_hf_folders(folder: Path) -> dict[str, tuple[Path, str]]:
    """HF folders whose config.json claims what their safetensors file does not hold."""
    twin = hf_twin()
    out = {}
    for name, change, message in [
        ("config: a million layers", {"num_hidden_layers": 1_000_000},
         r"config.json: num_hidden_layers is 1,000,000 but the file's tensors hold layers 0..1"),
        ("config: a billion-row vocabulary", {"vocab_size": 10**9},
         r"config.json: vocab_size is 1,000,000,000 but the token embedding has 128 rows"),
        ("config: layers as a string", {"num_hidden_layers": "many"}, r"num_hidden_layers must be a positive integer"),
    ]:
        path = folder / name.replace(" ", "-").replace(":", "")
        twin.save_pretrained(path, safe_serialization=True)
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, **change}))
        out[name] = (path, message)
    header = json.dumps({"w": {"dtype": "F32", "shape": [2**40, 2**20], "data_offsets": [0, 2**62]}}).encode()
    bogus = folder / "safetensors-claiming-an-exabyte"
    twin.save_pretrained(bogus, safe_serialization=True)
    (bogus / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    out["safetensors header claiming 4 EiB"] = (bogus, r"model.safetensors is not a readable safetensors file")
    return out


CHILD = r"""
import json, resource, sys, time
import llamaviz
paths = json.loads(sys.argv[1])
def attempt(path):
    started = time.perf_counter()
    try:
        llamaviz.load(path)
        return "loaded", "", time.perf_counter() - started
    except Exception as err:
        return type(err).__name__, str(err), time.perf_counter() - started
attempt(paths[0])  # warm-up: imports and lazy initialisation are not the file's cost
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
results = [attempt(p) for p in paths]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"results": results, "peak_growth_mb": (peak - base) / 1024}))
"""


def test_hostile_checkpoints_fail_fast_with_a_clear_error_and_little_memory(tmp_path):
    cases = {**hostile_ggufs(tmp_path), **hostile_hf_folders(tmp_path)}
    paths = [str(path) for path, _ in cases.values()]
    child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(paths)], capture_output=True, text=True,
                           timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    for (name, (_, message)), (kind, text, seconds) in zip(cases.items(), report["results"]):
        assert kind == "ValueError", f"{name}: {kind}: {text}"
        assert re.search(message, text), f"{name}: {text!r} does not match {message!r}"
        assert seconds < MAX_SECONDS, f"{name}: took {seconds:.2f} s"
    assert report["peak_growth_mb"] < MAX_PEAK_MB, report


# ---------------------------------------------------------------- activation caches


def crafted_cache(path: Path, metadata: str) -> Path:
    save_file({"blocks.0.hook_resid_pre": torch.zeros(1, 2, 4)}, str(path), metadata={"llamaviz": metadata})
    return path


@pytest.mark.parametrize("metadata, message", [
    ("[1, 2]", "must be a JSON object; got list"),
    ("[" * 100_000, "is not JSON"),
    ('{"tokens": [[1, 2], [3]]}', "'tokens' must be a list of token ids"),
    ('{"tokens": [1.5, 2]}', "'tokens' must be a list of token ids"),
    (json.dumps({"tokens": [2**70]}), "'tokens' must be a list of token ids"),
    ('{"tokens": "abc"}', "'tokens' must be a list of token ids"),
    ('{"model_name": 5}', "metadata 'model_name' must be a string"),
    ('{"tokens": [[[1]]]}', "'tokens' must be a list of token ids"),
])
def test_crafted_activation_caches_raise_value_error(tmp_path, metadata, message):
    with pytest.raises(ValueError, match=message):
        ActivationCache.load(crafted_cache(tmp_path / "cache.safetensors", metadata))


def test_a_saved_cache_still_loads_with_its_tokens(tmp_path):
    path = crafted_cache(tmp_path / "cache.safetensors", json.dumps({"tokens": [[1, 2]], "model_name": "m"}))
    cache = ActivationCache.load(path)
    assert cache.tokens.tolist() == [[1, 2]] and cache.model_name == "m"


# ---------------------------------------------------------------- view files


@pytest.fixture(scope="module")
def tiny_model():
    from tiny import hf_and_ours

    return hf_and_ours()[1]


@pytest.mark.parametrize("content, message", [
    ("[" * 100_000, "is not a JSON view file: RecursionError"),
    (json.dumps({"prompt": "hi", "token_ids": [2**70]}), '"token_ids" must be a non-empty list of token ids'),
    (json.dumps({"prompt": "hi", "token_ids": [-1]}), '"token_ids" must be a non-empty list of token ids'),
    (json.dumps({"prompt": "hi", "seed": 2**70}), '"seed" must be an int or null'),
    (json.dumps({"prompt": "hi", "settings": {"top_k": "5"}}), "setting 'top_k' must be int from 1 to 100"),
    (json.dumps({"prompt": "hi", "settings": {"top_k": 10**9}}), "setting 'top_k' must be int from 1 to 100"),
    (json.dumps({"prompt": "hi", "settings": {"drop_first": "yes"}}), "setting 'drop_first' must be bool"),
    (json.dumps({"prompt": "hi", "settings": {"layer": 1.5}}), "setting 'layer' must be int"),
    (json.dumps({"prompt": "hi", "settings": {"head": [1]}}), "setting 'head' must be int or str"),
])
def test_crafted_view_files_raise_value_error(tmp_path, content, message):
    (tmp_path / "view.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        read_view(tmp_path / "view.json")


def test_view_token_ids_are_checked_against_the_model(tmp_path, tiny_model):
    vocab, context = tiny_model.config.vocab_size, tiny_model.config.max_position_embeddings
    for ids, message in [([vocab], f"token id {vocab} is outside the model's vocabulary"),
                         ([1] * (context + 1), f"the view has {context + 1:,} tokens; the model's context is")]:
        (tmp_path / "view.json").write_text(json.dumps({"prompt": "hi", "token_ids": ids}))
        with pytest.raises(ValueError, match=message):
            open_view(tmp_path / "view.json", model=tiny_model, tok=object())


def test_an_oversized_view_file_is_refused_before_reading(tmp_path):
    path = tmp_path / "view.json"
    with open(path, "wb") as handle:
        handle.truncate(17 * 2**20)
    with pytest.raises(ValueError, match="a view file has at most"):
        read_view(path)


# ---------------------------------------------------------------- dictionaries (SAELens folders, transcoder sets)


def saved_dictionary(folder: Path, architecture: str = "standard", hook: str = "blocks.1.hook_resid_post",
                     d_in: int = 64, **cfg) -> Path:
    from llamaviz import features
    from llamaviz.features.dictionary import Dictionary, DictionaryConfig

    torch.manual_seed(0)
    dictionary = Dictionary(DictionaryConfig(architecture, d_in=d_in, d_sae=32, hook_name=hook, **cfg))
    with torch.no_grad():
        for p in dictionary.parameters():
            p.normal_(0, 0.1)
    return features.save(dictionary, folder)


def header_bytes(header: dict, data: int) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(data)


@pytest.mark.parametrize("name, damage, message", [
    ("truncated header", lambda raw: raw[:50], r"sae_weights.safetensors is truncated: its safetensors header length "
                                               r"says \d+ bytes but only 42 follow"),
    ("shorter than 8 bytes", lambda raw: raw[:5], r"sae_weights.safetensors is truncated: 5 bytes"),
    ("oversized header", lambda raw: struct.pack("<Q", 2**40) + raw[8:],
     r"sae_weights.safetensors: the safetensors header length says 1,099,511,627,776 bytes; accepted: at most"),
    ("data past the end", lambda raw: header_bytes({"W_enc": {"dtype": "F32", "shape": [2**30, 2**20],
                                                              "data_offsets": [0, 2**52]}}, 16),
     r"sae_weights.safetensors is truncated or corrupt: tensor 'W_enc' claims bytes 0..4,503,599,627,370,496"),
    ("header not JSON", lambda raw: struct.pack("<Q", 4) + b"{{{{", r"sae_weights.safetensors: the safetensors "
                                                                    r"header is not JSON"),
])
def test_bad_safetensors_headers_name_the_file(tmp_path, name, damage, message):
    from llamaviz import features

    folder = saved_dictionary(tmp_path / "sae")
    weights = folder / "sae_weights.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(ValueError, match=message):
        features.load(folder)


@pytest.mark.parametrize("text, message", [
    ('{"architecture": "standard",\n "d_in": 64,\n "d_sae": 32,,\n}', r"cfg.json is not valid JSON: line 3, column 14"),
    ("[" * 100_000, r"cfg.json is not valid JSON"),
    ("[1, 2]", r"cfg.json must hold a JSON object, got list"),
    ('{"d_in": "64", "d_sae": 32}', r"cfg.json: d_in must be a positive integer, got '64'"),
    ('{"d_in": 64, "d_sae": true}', r"cfg.json: d_sae must be a positive integer, got True"),
    ('{"d_in": 64, "d_sae": 32, "apply_b_dec_to_input": "yes"}', r"cfg.json: apply_b_dec_to_input must be true or false"),
    ('{"d_in": 64, "d_sae": 32, "reshape_activations": "hook_q"}', r"cfg.json: reshape_activations 'hook_q' is not "
                                                                   r"supported; accepted: none, hook_z"),
    ('{"d_in": 64, "d_sae": 32, "normalize_activations": "expected_average_only_in"}',
     r"cfg.json: normalize_activations 'expected_average_only_in' is not supported; accepted: none"),
    ('{"d_in": 64, "d_sae": 32, "metadata": [1]}', r"cfg.json: metadata must be a JSON object, got list"),
    ('{"d_in": 64, "d_sae": 32, "metadata": {"hook_name": 5}}', r"cfg.json: metadata.hook_name must be a string"),
    ('{"d_in": 64, "d_sae": 32, "metadata": {"context_size": -1}}', r"cfg.json: metadata.context_size must be a "
                                                                    r"positive integer or null"),
    ('{"d_in": 64, "d_sae": 32, "architecture": "matryoshka"}', r"cfg.json: architecture 'matryoshka' is not supported"),
])
def test_bad_cfg_json_names_the_file_and_the_field(tmp_path, text, message):
    from llamaviz import features

    folder = saved_dictionary(tmp_path / "sae")
    (folder / "cfg.json").write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(folder) + "/") + message):  # the file, then the field
        features.load(folder)


def test_symlinks_out_of_the_folder_are_refused_naming_link_and_target(tmp_path, monkeypatch):
    from llamaviz import features

    outside = saved_dictionary(tmp_path / "elsewhere")
    for name in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors"):
        folder = saved_dictionary(tmp_path / f"linked-{name}")
        (folder / name).unlink(missing_ok=True)
        (outside / "sparsity.safetensors").write_bytes(b"")
        (folder / name).symlink_to(outside / name)
        call = features.load if name != "sparsity.safetensors" else features.saelens_files.load_sparsity
        with pytest.raises(ValueError, match=rf"{folder / name} is a symlink to {outside / name}, outside the "
                                             rf"dictionary folder {folder}; accepted: files inside the folder"):
            call(folder)
    models = tmp_path / "models"
    models.mkdir()
    (models / "sae-resid-1").symlink_to(outside)
    monkeypatch.setenv("LLAMAVIZ_MODEL_DIR", str(models))
    with pytest.raises(ValueError, match=rf"{models / 'sae-resid-1'} is a symlink to {outside}, which leads out of "
                                         rf"the models folder {models}"):
        features.load(models / "sae-resid-1")
    inside_link = models / "sae-copy"
    saved_dictionary(models / "sae-real")
    inside_link.symlink_to(models / "sae-real")  # a link that stays inside the models folder is fine
    assert features.load(inside_link).cfg.d_sae == 32


def test_transcoder_set_files_outside_the_folder_are_refused(tmp_path):
    import yaml

    from llamaviz import features
    from test_features import random_set

    folder = features.save_transcoder_set(random_set(layers=2), tmp_path / "set")
    config = yaml.safe_load((folder / "config.yaml").read_text())
    stray = features.save_transcoder_set(random_set(layers=1), tmp_path / "stray") / "layer_0.safetensors"
    (folder / "config.yaml").write_text(yaml.safe_dump(config | {"transcoders": [str(stray), str(tmp_path / "x.bin")]}))
    with pytest.raises(ValueError, match=rf"config.yaml: the layer file {tmp_path / 'x.bin'} lies outside the set's "
                                         rf"folder {folder} and the folder has no x.bin"):
        features.load_transcoder_set(folder)  # layer_0 is taken from the folder itself, x.bin is nowhere inside
    (folder / "config.yaml").write_text(yaml.safe_dump(config | {"transcoders": ["../stray/layer_0.safetensors"]}))
    with pytest.raises(ValueError, match=r"outside the dictionary folder"):
        features.load_transcoder_set(folder)
    (folder / "layer_1.safetensors").unlink()
    (folder / "layer_1.safetensors").symlink_to(stray)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=rf"{folder / 'layer_1.safetensors'} is a symlink to {stray}"):
        features.load_transcoder_set(folder)
    (folder / "config.yaml").write_text("model_kind: transcoder_set\ntranscoders: [a,\n  b: c\n")
    with pytest.raises(ValueError, match=r"config.yaml is not valid YAML: line 4, column 1: expected "):
        features.load_transcoder_set(folder)
