"""LlamaConfig: every hyper-parameter that changes the math, read from and written to config.json.

The family's other members are subclasses that add their own config.json keys: MistralConfig,
Qwen2Config (per-layer sliding windows) and Qwen3Config. `LlamaConfig.from_pretrained` reads any of
them and returns the subclass that config.json's `model_type` names.
"""

from __future__ import annotations

import dataclasses
import json
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclass
class LlamaConfig:
    model_type: ClassVar[str] = "llama"  # config.json's model_type
    architecture: ClassVar[str] = "LlamaForCausalLM"  # config.json's architectures[0]

    vocab_size: int = 32000  # v: rows of embed_tokens and lm_head
    hidden_size: int = 4096  # m: width of the residual stream
    intermediate_size: int = 11008  # f: width of the SwiGLU MLP
    num_hidden_layers: int = 32  # decoder layers
    num_attention_heads: int = 32  # h: query heads
    num_key_value_heads: int | None = None  # g: key/value heads (GQA); None = h
    head_dim: int | None = None  # d: None = hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6  # epsilon inside every RMSNorm
    rope_theta: float = 10000.0  # RoPE base frequency
    rope_scaling: dict | None = None  # {"rope_type": linear|dynamic|llama3, "factor": ..., ...}
    max_position_embeddings: int = 2048  # context length the model was trained for
    tie_word_embeddings: bool = False  # lm_head shares embed_tokens' weight
    attention_bias: bool = False  # biases on q/k/v/o projections
    mlp_bias: bool = False  # biases on gate/up/down projections
    sliding_window: int | None = None  # keys further back than this are masked; None = full causal
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    initializer_range: float = 0.02  # std of the normal init for fresh weights
    torch_dtype: str | None = None  # the checkpoint's own dtype, e.g. "bfloat16"
    num_labels: int = 2  # task heads: classes of sequence/token classification
    problem_type: str | None = None  # regression | single_label_classification | multi_label_classification
    name_or_path: str = ""  # where it was loaded from; shown in titles
    extra: dict = field(default_factory=dict, repr=False)  # unknown config.json keys, kept for round trips

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.rope_scaling = _normalise_rope_scaling(self.rope_scaling)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field when the numbers cannot describe a Llama."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"LlamaConfig.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def layer_windows(self) -> list[int | None]:
        """Each layer's sliding window (None = full causal): one window for every layer of a Llama."""
        return [self.sliding_window] * self.num_hidden_layers

    @property
    def rope_type(self) -> str:
        return (self.rope_scaling or {}).get("rope_type", "default")

    @property
    def eos_token_ids(self) -> list[int]:
        """The end-of-sequence ids as a list (config.json allows one id or several)."""
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    def check_layer(self, layer) -> int:
        """`layer` as an int in 0..num_hidden_layers - 1; ValueError naming the valid range otherwise."""
        return _check_index(layer, "layer", self.num_hidden_layers, "layers")

    def check_head(self, head, mean: bool = False) -> int | str:
        """`head` as an int in 0..num_attention_heads - 1 (or "mean" when `mean`); ValueError naming the range."""
        if mean and head == "mean":
            return head
        return _check_index(head, "head", self.num_attention_heads, "heads per layer", " (or 'mean')" if mean else "")

    # ----- config.json -----

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LlamaConfig":
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        rope = values.get("rope_parameters")
        if isinstance(rope, dict):  # transformers >= 5 writes rope_theta and the scaling in one block
            scaling = values.get("rope_scaling") or {k: v for k, v in rope.items() if k != "rope_theta"}
            values = {**values, "rope_theta": rope.get("rope_theta", values.get("rope_theta", 10000.0)),
                      "rope_scaling": scaling or None}
            values.pop("rope_parameters")
        kwargs = {k: v for k, v in values.items() if k in known}
        if "num_labels" not in kwargs and isinstance(values.get("id2label"), dict):
            kwargs["num_labels"] = len(values["id2label"])  # transformers writes id2label, not num_labels
        if "dtype" in values and "torch_dtype" not in kwargs:
            kwargs["torch_dtype"] = values["dtype"]
        extra = {k: v for k, v in values.items() if k not in known and k != "dtype"}
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_json_file(cls, path: str | Path) -> "LlamaConfig":
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {path}") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        config_class = cls.class_for(values.get("model_type", cls.model_type), path)
        config = config_class.from_dict(values)
        config.name_or_path = config.name_or_path or str(path.parent)
        return config

    @classmethod
    def class_for(cls, model_type: str, source: object = "config") -> type["LlamaConfig"]:
        """The config class for a config.json `model_type`: any family member for LlamaConfig, else its own."""
        families = config_classes()
        if model_type not in families:
            raise ValueError(f"{source}: model_type {model_type!r} is not supported; accepted: "
                             f"{', '.join(map(repr, families))}")
        found = families[model_type]
        if cls is not LlamaConfig and found is not cls:
            raise ValueError(f"{source}: model_type {model_type!r} is not a {cls.__name__} "
                             f"(model_type {cls.model_type!r}); load it with {found.__name__} or LlamaConfig")
        return found

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "LlamaConfig":
        path = Path(path)
        return cls.from_json_file(path / "config.json" if path.is_dir() else path)

    def to_dict(self) -> dict[str, Any]:
        """The config.json that transformers' LlamaConfig reads."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in ("extra", "name_or_path")}
        values.update(model_type=self.model_type, architectures=[self.architecture], hidden_act="silu")
        return {**self.extra, **values}

    def save_pretrained(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / "config.json"
        target.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return target


@dataclass
class MistralConfig(LlamaConfig):
    """Mistral: a Llama whose keys reach back at most `sliding_window` positions (4096 unless config.json says)."""

    model_type: ClassVar[str] = "mistral"
    architecture: ClassVar[str] = "MistralForCausalLM"

    sliding_window: int | None = 4096  # transformers' default for Mistral; config.json may say null


@dataclass
class Qwen2Config(LlamaConfig):
    """Qwen2 / Qwen2.5: biased q/k/v (not o_proj; see llama.variants) and a sliding window on chosen layers."""

    model_type: ClassVar[str] = "qwen2"
    architecture: ClassVar[str] = "Qwen2ForCausalLM"

    sliding_window: int | None = 4096  # used only where use_sliding_window is true
    use_sliding_window: bool = False  # False: every layer is full causal, whatever sliding_window says
    max_window_layers: int = 28  # layers from this index on slide, when layer_types is not given
    layer_types: list[str] | None = None  # per layer: "full_attention" | "sliding_attention"

    def __post_init__(self):
        if not self.use_sliding_window:
            self.sliding_window = None
        if self.layer_types is None and isinstance(self.num_hidden_layers, int):  # else validate() names the field
            self.layer_types = ["sliding_attention" if self.sliding_window is not None and i >= self.max_window_layers
                                else "full_attention" for i in range(self.num_hidden_layers)]
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if (not isinstance(self.layer_types, list) or len(self.layer_types) != self.num_hidden_layers
                or not set(self.layer_types) <= set(LAYER_TYPES)):
            raise ValueError(f"{type(self).__name__}.layer_types must list one of {', '.join(LAYER_TYPES)} for each "
                             f"of the {self.num_hidden_layers} layers, got {self.layer_types!r}")
        if "sliding_attention" in self.layer_types and self.sliding_window is None:
            raise ValueError(f"{type(self).__name__}.layer_types has sliding_attention layers but sliding_window "
                             "is None (or use_sliding_window is false)")

    @property
    def layer_windows(self) -> list[int | None]:
        return [self.sliding_window if kind == "sliding_attention" else None for kind in self.layer_types]


@dataclass
class Qwen3Config(Qwen2Config):
    """Qwen3: Qwen2's settings, attention_bias for all four projections (as Llama), an RMSNorm per q/k head."""

    model_type: ClassVar[str] = "qwen3"
    architecture: ClassVar[str] = "Qwen3ForCausalLM"

    head_dim: int | None = 128  # transformers' default for Qwen3, which sets it explicitly


LAYER_TYPES = ("full_attention", "sliding_attention")


def config_classes() -> dict[str, type[LlamaConfig]]:
    """model_type -> config class, for every family member llamaviz runs."""
    return {cls.model_type: cls for cls in (LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config)}


def _check_index(value, name: str, size: int, what: str, also: str = "") -> int:
    """`value` as an int in 0..size - 1 (ints, numpy and 0-d torch integers; not bools)."""
    try:
        index = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        index = None
    if index is None:
        raise ValueError(f"{name} must be an integer in 0..{size - 1}{also}, got {value!r}")
    if not 0 <= index < size:
        raise ValueError(f"{name} {index} is out of range: the model has {size} {what}, 0..{size - 1}{also}")
    return index


def _normalise_rope_scaling(scaling: dict | None) -> dict | None:
    """Accept HF's spellings ("type" or "rope_type"); reject unknown rope types by name."""
    if not scaling:
        return None
    scaling = dict(scaling)
    rope_type = scaling.pop("type", None) or scaling.get("rope_type") or "default"
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unknown rope_scaling type {rope_type!r}; accepted: {', '.join(ROPE_TYPES)}")
    scaling["rope_type"] = rope_type
    if rope_type != "default" and "factor" not in scaling:
        raise ValueError(f"rope_scaling of type {rope_type!r} needs a 'factor'")
    return None if rope_type == "default" and len(scaling) == 1 else scaling
