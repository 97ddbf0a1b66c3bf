"""vattn in HuggingFace transformers (Llama, Qwen2/Qwen3, Mistral and other models whose attention
goes through transformers' AttentionInterface).

    import vattn, vattn.hf
    vattn.hf.register(vattn.Config("vattention", eps=0.05, delta=0.05))
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="vattn")
or, on a loaded model (with per-layer statistics):
    run = vattn.hf.enable(model, vattn.Config("vattention"), collect=True, errors=True)
    model.generate(...)
    print(run.summary())          # per layer: density, budget, estimated and measured error

The prefill (several queries at once) runs dense through torch SDPA; each decode step (one query
per sequence) runs vAttention over the layer's whole cache, as the model's cache object holds it
(dynamic or static caches, left padding, sliding windows, beam search). generate(use_cache=False)
recomputes every step as a prefill, so it runs dense throughout. register(config) sets the
process-wide default for layers that vattn.hf.enable did not set up.
Tested with transformers >= 5.0, < 6 (TRANSFORMERS_RANGE).
"""

from __future__ import annotations

import math
import threading
from typing import Optional, Union

import torch
import transformers
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .config import Config
from .ops import Decoder

NAME = "vattn"
TRANSFORMERS_RANGE = ">=5.0,<6"

_lock = threading.Lock()
_default = Config("vattention")


def _major(version: str) -> int:
    return int(version.split(".")[0])


if _major(transformers.__version__) != 5:
    raise ImportError(f"vattn.hf is tested with transformers {TRANSFORMERS_RANGE}, found "
                      f"{transformers.__version__}")


class Collector:
    """Per-layer statistics of the decode steps run while enabled.

    records: one dict per (layer, decode step) with [batch, heads_q] tensors: density, b, n_s,
    n_f, est_rel_error, and error (the measured relative output error against dense attention,
    when collecting errors).
    """

    def __init__(self, errors: bool, capture=None):
        self.errors = errors
        self.records = []
        self.capture = set(capture or ())  # layers whose first decode step's q/K/V to keep
        self.captured = {}  # layer -> (q [heads_q, d], k, v [tokens, heads_kv, d]), sequence 0

    def add(self, record: dict) -> None:
        self.records.append(record)

    def clear(self) -> None:
        self.records.clear()

    def summary(self, eps: Optional[float] = None) -> list:
        """One dict per layer: steps, mean density, mean budget b, mean |R| (n_s), mean estimated
        error and, with errors, mean/max measured error and (given eps) the share of heads whose
        error exceeded eps."""
        layers = sorted({r["layer"] for r in self.records})
        rows = []
        for layer in layers:
            rs = [r for r in self.records if r["layer"] == layer]
            cat = {k: torch.cat([r[k].reshape(-1).double() for r in rs])
                   for k in ("density", "b", "n_s", "est_rel_error")}
            row = {"layer": layer, "steps": len(rs), "density": cat["density"].mean().item(),
                   "b": cat["b"].mean().item(), "n_s": cat["n_s"].mean().item(),
                   "est_rel_error": cat["est_rel_error"].clamp(min=0).mean().item()}
            if self.errors:
                err = torch.cat([r["error"].reshape(-1) for r in rs])
                row["error_mean"] = err.mean().item()
                row["error_max"] = err.max().item()
                if eps is not None:
                    row["above_eps"] = (err > eps).double().mean().item()
            rows.append(row)
        return rows


class _LayerState:
    def __init__(self, config: Config, layer: int, collector: Optional[Collector]):
        self.config = config.replace(layer=layer)  # each layer draws its own samples
        self.layer = layer
        self.collector = collector
        self.decoder = None
        self.scaling = None
        self.position = 0  # the last query's position (when the model passes no position_ids)

    def decoder_for(self, scaling: Optional[float], head_dim: int) -> Decoder:
        if self.decoder is None or scaling != self.scaling:
            cfg = self.config
            if scaling is not None and not math.isclose(scaling, head_dim ** -0.5, rel_tol=1e-6):
                cfg = cfg.replace(scale=float(scaling))
            self.decoder = Decoder(cfg)
            self.scaling = scaling
        return self.decoder

    def reset(self) -> None:
        if self.decoder is not None:
            self.decoder.reset()


def _state(module) -> _LayerState:
    st = getattr(module, "_vattn_state", None)
    if st is None:
        with _lock:
            st = getattr(module, "_vattn_state", None)
            if st is None:
                st = _LayerState(_default, int(getattr(module, "layer_idx", 0) or 0), None)
                module._vattn_state = st
    return st


def _visible_ranges(mask, batch: int, kv_len: int, window):
    """Each sequence's visible tokens [start, start + len) from the decode step's attention mask
    (None, a boolean mask or an additive 0/-inf one, [batch or 1, 1, 1, kv])."""
    if mask is None:
        starts, lens = [0] * batch, [kv_len] * batch
    else:
        if mask.dim() != 4 or mask.shape[-1] < kv_len or mask.shape[0] not in (1, batch):
            raise ValueError(f"vattn expects a [batch, 1, 1, >= {kv_len}] attention mask at a decode "
                             f"step, got shape {tuple(mask.shape)}")
        m = mask[:, :, -1, :kv_len]
        if m.shape[1] > 1 and not bool((m == m[:, :1]).all()):
            raise ValueError("vattn needs one attention mask for every head of a sequence")
        m = m[:, 0]
        if m.dtype == torch.bool:
            visible = m
        else:
            visible = m == 0
            hidden = m[~visible]
            if hidden.numel() and bool((hidden > torch.finfo(m.dtype).min / 2).any()):
                raise ValueError("vattn supports attention masks that only show or hide tokens "
                                 "(0 / -inf), not additive biases")
        visible = visible.expand(batch, kv_len).cpu()
        starts, lens = [], []
        for i in range(batch):
            idx = visible[i].nonzero().flatten()
            if idx.numel() == 0:
                raise ValueError(f"sequence {i} has no visible token in the attention mask")
            lo, hi = int(idx[0]), int(idx[-1]) + 1
            if idx.numel() != hi - lo:
                raise ValueError(f"sequence {i}: vattn needs the visible tokens to form one "
                                 "contiguous range (left padding, sliding windows); pass an "
                                 "attention_mask of ones if the prompt holds pad-token ids")
            starts.append(lo)
            lens.append(hi - lo)
    if window is not None and mask is None:
        for i in range(batch):
            if lens[i] > window:
                starts[i] += lens[i] - window
                lens[i] = window
    return starts, lens


# Keyword arguments of attention functions that change the arithmetic and vattn does not implement.
_UNSUPPORTED = {"softcap": "attention logit softcapping", "position_bias": "additive position "
                "biases", "s_aux": "learned attention sinks", "sinks": "learned attention sinks"}


def _dense_reference(query, key, value, starts, lens, scaling):
    """Exact attention in float64 over the same tokens: [batch, heads_q, head_dim]."""
    b, hq, _, d = query.shape
    g = hq // key.shape[1]
    scale = scaling if scaling is not None else d ** -0.5
    out = torch.empty(b, hq, d, dtype=torch.float64)
    for i in range(b):
        k = key[i, :, starts[i]:starts[i] + lens[i]].double().repeat_interleave(g, 0)
        v = value[i, :, starts[i]:starts[i] + lens[i]].double().repeat_interleave(g, 0)
        q = query[i, :, 0].double().unsqueeze(1)
        w = torch.softmax((q @ k.transpose(1, 2)) * scale, dim=-1)
        out[i] = (w @ v).squeeze(1)
    return out


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                      scaling: Optional[float] = None, is_causal=None, **kwargs):
    """transformers attention function: dense prefill, vAttention decode."""
    state = _state(module)
    if query.shape[2] != 1 or module.training:
        state.reset()  # a prefill starts new sequences: the predictor index starts over
        state.position = key.shape[2] - 1
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    for name, what in _UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"vattn does not support {what} ({name})")
    batch, kv_len = query.shape[0], key.shape[2]
    starts, lens = _visible_ranges(attention_mask, batch, kv_len, kwargs.get("sliding_window"))
    # the sampling key's step: the query's position, which advances with every decode step (the
    # cache length does not under static caches and sliding windows)
    state.position += 1
    position_ids = kwargs.get("position_ids")
    step = int(position_ids.max()) if position_ids is not None else state.position
    decoder = state.decoder_for(scaling, query.shape[-1])
    collector = state.collector
    out = decoder(query, key, value, seq_lens=lens, seq_start=starts, step=step,
                  return_stats=collector is not None)
    if collector is not None:
        out, stats = out
        if state.layer in collector.capture and state.layer not in collector.captured:
            s0, n0 = starts[0], lens[0]
            collector.captured[state.layer] = (
                query[0, :, 0].detach().clone(),
                key[0, :, s0:s0 + n0].transpose(0, 1).detach().clone(),
                value[0, :, s0:s0 + n0].transpose(0, 1).detach().clone())
        record = {"layer": state.layer, "step": step, **stats}
        if collector.errors:
            ref = _dense_reference(query, key, value, starts, lens, scaling)
            got = out[:, :, 0].double()
            record["error"] = (got - ref).norm(dim=-1) / ref.norm(dim=-1).clamp(min=1e-300)
        collector.add(record)
    return out.transpose(1, 2).contiguous(), None


def register(config: Union[Config, str, None] = None) -> None:
    """Registers attn_implementation="vattn" with transformers; config (default: the vattention
    method's) is used by layers of models loaded with it that vattn.hf.enable did not set up."""
    global _default
    if config is not None:
        _default = Config.of(config)
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def _attention_modules(model):
    return [m for m in model.modules()
            if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]


class Enabled:
    """What vattn.hf.enable returns: the collector (if any) and a way back to dense."""

    def __init__(self, model, previous: str, collector: Optional[Collector], config: Config):
        self.model = model
        self.previous = previous
        self.collector = collector
        self.config = config

    @property
    def records(self) -> list:
        return self.collector.records if self.collector else []

    def summary(self) -> list:
        if self.collector is None:
            raise ValueError("statistics were not collected: call vattn.hf.enable(..., collect=True)")
        return self.collector.summary(self.config.eps if self.config.sample == "adaptive" else None)

    def disable(self) -> None:
        disable(self.model, self.previous if self.previous != NAME else "sdpa")


def enable(model, config: Union[Config, str, None] = None, *, collect: bool = False,
           errors: bool = False, capture=None) -> Enabled:
    """Runs decode attention of a loaded model through vattn with this config (one sampling key
    per layer). collect keeps per-layer statistics of every decode step; errors also measures
    each head's output error against exact attention (slow: it computes dense attention too);
    capture, a set of layer indices, keeps those layers' q/K/V of the first decode step
    (collector.captured), for dumps that `vattn check` reads."""
    cfg = Config.of(config)
    register()
    modules = _attention_modules(model)
    if not modules:
        raise ValueError("no attention layers with layer_idx / num_key_value_groups were found: "
                         "vattn.hf supports Llama-family models (Llama, Qwen2/Qwen3, Mistral)")
    collector = Collector(errors, capture) if (collect or errors or capture) else None
    for m in modules:
        m._vattn_state = _LayerState(cfg, int(m.layer_idx), collector)
    previous = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    return Enabled(model, previous, collector, cfg)


def disable(model, implementation: str = "sdpa") -> None:
    """Back to a dense implementation (sdpa unless told otherwise); forgets vattn's state."""
    model.set_attn_implementation(implementation)
    for m in _attention_modules(model):
        if hasattr(m, "_vattn_state"):
            del m._vattn_state
