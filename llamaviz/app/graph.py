"""What the Graph tab computes, from a run and a transcoder set: the attribution graph of the run's prompt
(llamaviz.graphs.attribute), its pruning, QK attributions and interventions on its feature nodes.

The graph is built once per (run, set) and kept in the page's GraphSession, so the pruning slider, pins
and supernodes only re-read it. Every number shown comes from llamaviz.graphs: influence and kept edges
from graphs.prune, edge weights from the graph's adjacency, QK terms from graphs.qk_attribution.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from llamaviz import features, graphs
from llamaviz.graphs.attribution import row_bytes
from llamaviz.graphs.replacement import ReplacementRun

from llamaviz.app import models
from llamaviz.app.state import Run

MAX_TOKENS = 64  # prompt tokens a graph is built for in the app: its adjacency is a dense nodes x nodes matrix
MAX_FEATURE_NODES = 2000  # node budget: past it the most influential features are kept (as circuit-tracer does)
MAX_ROW_BYTES = 2**30  # the rows a build holds (graphs.attribution.row_bytes); past it the build is refused
BATCH = 32  # prompt copies per backward pass
TOP_TOKENS = 5
PICK_SET = ("pick a transcoder set: a folder with circuit-tracer's config.yaml + layer_{i}.safetensors "
            "(found under model/ or beside the checkpoint), or type its path")
_SETS: dict[str, object] = {}


def found_transcoder_sets(model_path: str | None) -> list[str]:
    """Folders holding a transcoder set (config.yaml with model_kind: transcoder_set) under model/ and
    beside the checkpoint, one or two levels down (model/dictionaries/transcoders)."""
    roots = {models.model_dir()}  # model/dictionaries/transcoders (the default set) is one of */*/config.yaml
    if model_path:
        roots |= {Path(model_path).parent, Path(model_path).parent.parent}
    configs = {cfg for root in roots if root.is_dir() for pattern in ("*/config.yaml", "*/*/config.yaml")
               for cfg in root.glob(pattern)}
    return sorted(str(cfg.parent) for cfg in configs if _is_transcoder_set(cfg))


def _is_transcoder_set(config: Path) -> bool:
    try:
        data = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and data.get("model_kind") == "transcoder_set"


def transcoder_set(path: str):
    """The transcoder set at `path`, loaded once per process."""
    if not path or not str(path).strip():
        raise ValueError(PICK_SET)
    key = str(Path(path).resolve())
    if key not in _SETS:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"no transcoder set at {path}: the folder does not exist; {PICK_SET}")
        _SETS[key] = features.load_transcoder_set(path).eval()
    return _SETS[key]


def check_set(model, transcoders, path: str) -> None:
    """ValueError unless the set has one transcoder per layer of the model's width."""
    config = model.config
    width = transcoders[0].W_dec.shape[1]
    if len(transcoders) != config.num_hidden_layers or width != config.hidden_size:
        raise ValueError(f"the transcoder set at {path} has {len(transcoders)} layers of width {width}; the model "
                         f"has {config.num_hidden_layers} layers of width {config.hidden_size}: pick a set made "
                         "for this model")


@dataclass
class Built:
    """A graph built for one run's prompt with one set, and its prunings by node threshold."""

    run_id: int
    path: str
    graph: graphs.Graph
    tokens: list[str]  # the prompt's token pieces
    prunings: dict = field(default_factory=dict)
    hover: dict = field(default_factory=dict)  # node -> its hover summary (influence does not depend on the threshold)

    def pruned(self, node_threshold: float) -> graphs.Pruned:
        """graphs.prune at this node threshold (the edge threshold stays 0.98), kept per threshold."""
        key = round(float(node_threshold), 4)
        if not 0 < key <= 1:
            raise ValueError(f"the node threshold must be in (0, 1]; got {node_threshold!r}")
        if key not in self.prunings:
            self.prunings[key] = graphs.prune(self.graph, node_threshold=key)
        return self.prunings[key]


class GraphSession:
    """One page's graph, pinned nodes (adjacency indices) and supernodes {name: [indices]}."""

    def __init__(self):
        self.built: Built | None = None
        self.pinned: list[int] = []
        self.supernodes: dict[str, list[int]] = {}

    def current(self, run: Run) -> Built:
        if self.built is None:
            raise ValueError("build the graph first: pick a transcoder set and press Build graph")
        if self.built.run_id != run.run_id:
            raise ValueError("the graph was built for an earlier run; press Build graph for this one")
        return self.built

    def __deepcopy__(self, memo) -> "GraphSession":
        return GraphSession()  # gr.State copies its initial value per session: start fresh


def prompt_ids(run: Run) -> torch.Tensor:
    """[1, p] the run's prompt, checked against the app's budget."""
    ids = run.ids[:, :run.prompt_length]
    if ids.shape[1] > MAX_TOKENS:
        raise ValueError(f"the prompt has {ids.shape[1]} tokens; the app builds graphs of at most {MAX_TOKENS} "
                         "(the adjacency is dense): shorten the prompt, or use `llamaviz graph` for long ones")
    if ids.shape[1] < 2:
        raise ValueError("the prompt needs at least 2 tokens (position 0 carries no features)")
    return ids


def prepare(run: Run, path: str):
    """(transcoders, ids, active feature count) after every check that needs no backward pass."""
    transcoders = transcoder_set(path)
    check_set(run.entry.model, transcoders, path)
    ids = prompt_ids(run)
    with run.entry.lock, torch.no_grad():
        active = sum(int((acts[1:] > 0).sum()) for acts in ReplacementRun(run.entry.model, transcoders, ids).acts)
    held = row_bytes(active, run.entry.model.config.num_hidden_layers, ids.shape[1], 10, MAX_FEATURE_NODES)
    if held > MAX_ROW_BYTES:
        raise ValueError(f"{active} features are active on these {ids.shape[1]} tokens: the graph's rows would take "
                         f"{held / 2**20:.0f} MiB, over the app's {MAX_ROW_BYTES / 2**20:.0f} MiB; shorten the prompt "
                         "or use a sparser transcoder set")
    return transcoders, ids, active


def build(run: Run, path: str, prepared: tuple | None = None) -> Built:
    """The attribution graph of the run's prompt (graphs.attribute): minutes on a CPU for long prompts.
    `prepared`: what prepare(run, path) returned, when the caller has it already."""
    transcoders, ids, active = prepared or prepare(run, path)
    with run.entry.lock:
        graph = graphs.attribute(run.entry.model, transcoders, ids, batch=BATCH,
                                 max_feature_nodes=MAX_FEATURE_NODES if active > MAX_FEATURE_NODES else None)
    tokens = [run.entry.tokenizer.decode([int(i)]) for i in ids[0]]
    return Built(run.run_id, path, graph, tokens)


def qk(run: Run, built: Built, layer, head, query, key) -> dict:
    """graphs.qk_attribution of one head at (query, key) on the built graph."""
    model = run.entry.model
    numbers = {}
    for name, value in (("layer", layer), ("head", head), ("query", query), ("key", key)):
        if value is None or isinstance(value, bool) or float(value) != int(float(value)):
            raise ValueError(f"the {name} must be a whole number; got {value!r}")
        numbers[name] = int(float(value))
    layers = model.config.num_hidden_layers
    if not 0 <= numbers["layer"] < layers:
        raise ValueError(f"layer {numbers['layer']} is out of range; accepted: 0..{layers - 1}")
    with run.entry.lock:
        return graphs.qk_attribution(model, transcoder_set(built.path), built.graph, **numbers)


def pinned_edge(graph, pinned: list[int]) -> tuple[int, int] | None:
    """(source, target) of the last two pins when they make an edge that crosses attention: the earlier
    position is the source (not a logit), the later the target (not a token); None otherwise."""
    if len(pinned) < 2:
        return None
    n, n_f, p = graph.n, len(graph.features), graph.positions
    tokens = range(n_f + graph.layers * p, n - len(graph.logit_tokens))

    def position(i: int) -> int:
        if i < n_f:
            return int(graph.features[i, 1])
        return (i - n_f) % p if i < n - len(graph.logit_tokens) else p - 1

    source, target = sorted(pinned[-2:], key=position)
    if position(source) == position(target) or source >= n - len(graph.logit_tokens) or target in tokens:
        return None
    return source, target


def loadings(run: Run, built: Built, source: int, target: int, top: int = 5) -> dict:
    """graphs.head_loadings of one edge: its strongest heads [(layer, head, part)], the direct part, the edge."""
    with run.entry.lock:
        found = graphs.head_loadings(run.entry.model, transcoder_set(built.path), built.graph, target, source)
    heads = found["heads"]
    order = heads.flatten().abs().argsort(descending=True)[:top].tolist()
    width = heads.shape[1]
    return {"heads": [(i // width, i % width, float(heads.flatten()[i])) for i in order],
            "direct": found["direct"], "edge": found["edge"], "total": float(heads.sum()) + found["direct"]}


def intervene(run: Run, built: Built, nodes: list[int], factor: float, freeze: bool = True) -> dict:
    """Top next tokens after the prompt before and after setting the pinned feature nodes to `factor` x their
    activation (0 zeroes them), by graphs.intervene: frozen (the prompt's replacement model, every other
    feature, the attention patterns and norm scales fixed) or live (the model itself, which responds)."""
    graph, n_f = built.graph, len(built.graph.features)
    chosen = [i for i in nodes if i < n_f]
    if not chosen:
        raise ValueError("pin at least one feature node to intervene on (errors, tokens and logits cannot be set)")
    edits = [(*graph.features[i].tolist()[:2], int(graph.features[i, 2]), float(factor) * float(graph.activations[i]))
             for i in chosen]
    with run.entry.lock:
        found = graphs.intervene(run.entry.model, transcoder_set(built.path), graph.ids, edits,
                                 freeze_attention=bool(freeze), top=TOP_TOKENS)
    decode = lambda rows: [(run.entry.tokenizer.decode([int(t)]), float(p)) for t, p in rows]  # noqa: E731
    return {"before": decode(found["before"]), "after": decode(found["top"]), "nodes": chosen,
            "factor": float(factor), "frozen": bool(freeze)}


def checked_factor(value) -> float:
    """A finite multiple of the activation; ValueError otherwise (an empty box sends None)."""
    try:
        factor = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"the factor must be a number (x the activation), e.g. 2 or -1; got {value!r}") from None
    if factor != factor or abs(factor) == float("inf"):
        raise ValueError(f"the factor must be a finite number; got {value!r}")
    return factor

