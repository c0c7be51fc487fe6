"""One dictionary: a sparse autoencoder or a transcoder on a hook point, encoded and decoded as SAELens 6 does.

Shapes: x [..., d_in] -> acts [..., d_sae] -> out [..., d_out] (d_out = d_in for an SAE).
    sae_in = normalize(x) - b_dec * apply_b_dec_to_input
    pre    = sae_in @ W_enc + b_enc                       (hook_sae_acts_pre)
    acts   = activation(pre)                              (hook_sae_acts_post)
    out    = denormalize(acts @ W_dec + b_dec) [+ x @ W_skip.T for a skip transcoder]
The architectures differ only in `activation` (a table below): standard = ReLU; topk keeps the k
largest (with rescale_acts_by_decoder_norm, pre is scaled by each decoder row's norm before the
choice and acts divided by it before decoding); jumprelu zeroes pre <= threshold; gated multiplies
a ReLU magnitude path (W_enc * exp(r_mag), b_mag) by the gate (pre of W_enc, b_gate) > 0.
normalize_activations: "none"; "constant_norm_rescale" (x scaled to norm sqrt(d_in), the scale undone
on the way out); "layer_norm" (x centred and divided by std + 1e-5; the output times std plus the mean). A training
scale (SAELens's expected_average_only_in) is folded into the weights before saving.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from llamaviz.llama.hook_points import HookPoint

NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm")
RESHAPES = ("none", "hook_z")  # hook_z: [..., h, d] read as [..., h * d] and written back
SAE_HOOKS = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_error",
             "hook_sae_output")


class Metadata(dict):
    """cfg.metadata: a dict that also reads as attributes, as SAELens's SAEMetadata (a missing key reads None).

    hook_name and hook_name_out are the config's own fields seen from here: metadata.hook_name is
    cfg.hook_name, for reading and for setting, so the two spellings never disagree.
    """

    LINKED = ("hook_name", "hook_name_out")

    def __init__(self, values=(), owner: DictionaryConfig | None = None):
        values = dict(values)
        object.__setattr__(self, "_owner", owner)
        linked = {key: values.pop(key) for key in self.LINKED if key in values}
        super().__init__(values)
        for key, value in linked.items():
            if value:
                self[key] = value

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return self[name] if name in self.LINKED else self.get(name)

    def __setattr__(self, name: str, value) -> None:
        self[name] = value

    def __getitem__(self, key):
        if key in self.LINKED and self._owner is not None:
            return getattr(self._owner, key)
        return super().__getitem__(key)

    def __setitem__(self, key, value) -> None:
        if key in self.LINKED and self._owner is not None:
            object.__setattr__(self._owner, key, value)
        else:
            super().__setitem__(key, value)

    def __contains__(self, key) -> bool:
        if key in self.LINKED and self._owner is not None:
            return bool(getattr(self._owner, key))
        return super().__contains__(key)

    def get(self, key, default=None):
        return self[key] if key in self else default

    def update(self, *args, **kwargs) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __ior__(self, other):
        self.update(other)
        return self

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return self[key]

    def to_dict(self) -> dict:
        """Every key, hook_name included (SAELens's metadata.to_dict)."""
        linked = {key: self[key] for key in self.LINKED if key in self}
        return linked | dict(self.items())


@dataclass
class DictionaryConfig:
    architecture: str            # a key of ARCHITECTURES
    d_in: int                    # width of the hook it reads
    d_sae: int                   # number of latents
    hook_name: str               # where it reads, e.g. blocks.3.hook_resid_post or blocks.3.mlp.hook_in
    d_out: int | None = None     # transcoders: width of the hook it writes (None = d_in)
    hook_name_out: str | None = None  # transcoders: where it writes, e.g. blocks.3.hook_mlp_out
    k: int | None = None         # topk: latents kept per token
    rescale_acts_by_decoder_norm: bool = False  # topk: choose by pre * |W_dec row|
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    reshape_activations: str = "none"  # "hook_z": the heads of attn.hook_z flattened, d_in = h * d_head
    metadata: dict = field(default_factory=dict)  # model_name, context_size, prepend_bos, evaluation, ...

    def __setattr__(self, name: str, value) -> None:
        if name == "metadata":  # always a Metadata tied to this config (metadata.hook_name is cfg.hook_name)
            value = Metadata(value, self)
        super().__setattr__(name, value)

    @property
    def is_transcoder(self) -> bool:
        return "transcoder" in self.architecture


def _topk(dictionary: Dictionary, pre: torch.Tensor) -> torch.Tensor:
    chosen = pre * dictionary.decoder_norms() if dictionary.cfg.rescale_acts_by_decoder_norm else pre
    values, indices = chosen.topk(dictionary.cfg.k, dim=-1)
    return torch.zeros_like(chosen).scatter(-1, indices, values.relu())


ARCHITECTURES = {  # architecture -> activation(dictionary, pre) -> acts
    "standard": lambda d, pre: pre.relu(),
    "topk": _topk,
    "jumprelu": lambda d, pre: pre.relu() * (pre > d.threshold),
    "gated": None,  # two paths: see Dictionary.encode
    "transcoder": lambda d, pre: pre.relu(),
    "skip_transcoder": lambda d, pre: pre.relu(),
    "jumprelu_transcoder": lambda d, pre: pre.relu() * (pre > d.threshold),
    "jumprelu_skip_transcoder": lambda d, pre: pre.relu() * (pre > d.threshold),
}
SKIP = ("skip_transcoder", "jumprelu_skip_transcoder")  # architectures with W_skip
TRANSCODERS = ("transcoder", "jumprelu_transcoder") + SKIP


class Dictionary(nn.Module):
    """An SAE or transcoder with SAELens's parameter names and hook points (module docstring)."""

    def __init__(self, cfg: DictionaryConfig):
        super().__init__()
        if cfg.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {cfg.architecture!r}; accepted: {', '.join(ARCHITECTURES)}")
        if cfg.normalize_activations not in NORMALIZATIONS:
            raise ValueError(f"normalize_activations {cfg.normalize_activations!r} is not supported; accepted: "
                             f"{', '.join(NORMALIZATIONS)} (fold a training-time scale into the weights)")
        if cfg.reshape_activations not in RESHAPES:
            raise ValueError(f"reshape_activations {cfg.reshape_activations!r} is not supported; accepted: "
                             f"{', '.join(RESHAPES)}")
        if cfg.architecture == "topk" and (not isinstance(cfg.k, int) or not 0 < cfg.k <= cfg.d_sae):
            raise ValueError(f"a topk dictionary needs k in 1..d_sae={cfg.d_sae}; got {cfg.k!r}")
        self.cfg = cfg
        d_in, d_sae, d_out = cfg.d_in, cfg.d_sae, cfg.d_out or cfg.d_in
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae))  # [d_in, d_sae]
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_out))  # [d_sae, d_out]
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        if cfg.architecture.startswith("jumprelu"):
            self.threshold = nn.Parameter(torch.zeros(d_sae))
        if cfg.architecture == "gated":
            self.b_gate, self.b_mag, self.r_mag = (nn.Parameter(torch.zeros(d_sae)) for _ in range(3))
            del self.b_enc  # gated SAEs have b_gate and b_mag instead
        if cfg.architecture in SKIP:
            self.W_skip = nn.Parameter(torch.zeros(d_out, d_in))  # [d_out, d_in]
        for name in SAE_HOOKS:
            setattr(self, name, HookPoint())
        self._norm: tuple[torch.Tensor, torch.Tensor] | None = None  # (shift, factor): output = out * factor + shift
        self._d_head: int | None = None  # hook_z: the head width the input had, to shape the output back

    def hook_points(self) -> dict[str, HookPoint]:
        """{"{hook_name}.hook_sae_acts_post": point, ...}: SAELens's names under the hook it reads."""
        return {f"{self.cfg.hook_name}.{name}": getattr(self, name) for name in SAE_HOOKS}

    def decoder_norms(self) -> torch.Tensor:
        return self.W_dec.norm(dim=-1)  # [d_sae]

    def normalized_input(self, x: torch.Tensor) -> torch.Tensor:
        """x after normalize_activations and the b_dec shift: what the encoder multiplies [..., d_in]."""
        if self.cfg.reshape_activations == "hook_z":  # [..., h, d] -> [..., h * d]
            self._d_head = x.shape[-1]
            x = x.flatten(-2)
        x = self.hook_sae_input(x.to(self.W_enc.dtype))
        kind = self.cfg.normalize_activations
        if kind == "constant_norm_rescale":
            scale = (self.cfg.d_in ** 0.5) / x.norm(dim=-1, keepdim=True)
            self._norm = (torch.zeros_like(scale), 1.0 / scale)
            x = x * scale
        elif kind == "layer_norm":
            mean = x.mean(-1, keepdim=True)
            std = (x - mean).std(-1, keepdim=True)
            self._norm = (mean, std)  # undone as out * std + mean (SAELens leaves the epsilon out there)
            x = (x - mean) / (std + 1e-5)
        if self.cfg.apply_b_dec_to_input and not self.cfg.is_transcoder:
            x = x - self.b_dec
        return x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations [..., d_sae] of x [..., d_in]."""
        sae_in = self.normalized_input(x)
        if self.cfg.architecture == "gated":
            gate = sae_in @ self.W_enc + self.b_gate
            pre = self.hook_sae_acts_pre(sae_in @ (self.W_enc * self.r_mag.exp()) + self.b_mag)
            return self.hook_sae_acts_post((gate > 0).to(pre.dtype) * pre.relu())
        pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)
        return self.hook_sae_acts_post(ARCHITECTURES[self.cfg.architecture](self, pre))

    def decode(self, acts: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """The reconstruction [..., d_out] of latents [..., d_sae]; a skip transcoder also needs its input x."""
        if self.cfg.rescale_acts_by_decoder_norm:
            acts = acts / self.decoder_norms()
        out = self.hook_sae_recons(acts @ self.W_dec + self.b_dec)
        if self._norm is not None and self.cfg.normalize_activations != "none":
            shift, factor = self._norm
            out = out * factor + shift
        if self.cfg.architecture in SKIP:
            if x is None:
                raise ValueError("a skip transcoder decodes with its input: decode(acts, x)")
            out = out + x.to(self.W_skip.dtype) @ self.W_skip.T
        if self.cfg.reshape_activations == "hook_z" and self._d_head is not None:  # back to [..., h, d]
            out = out.unflatten(-1, (-1, self._d_head))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), x)

    def extra_repr(self) -> str:
        return f"{self.cfg.architecture}, {self.cfg.hook_name}, d_in={self.cfg.d_in}, d_sae={self.cfg.d_sae}"
