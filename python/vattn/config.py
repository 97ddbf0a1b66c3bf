"""vattn.Config: the C++ vattn::config, built from keyword arguments or its text form."""

from __future__ import annotations

from . import _core

# Field names and what they mean: include/vattn/vattn.hpp (struct config) and docs/algorithm.md.
FIELDS = (
    "dense", "sink", "local", "select", "predictor", "topk", "pred_page", "pred_bits", "refine",
    "top_p", "sample", "sample_rate", "base", "mode", "eps", "delta", "gqa_shared", "hub", "scale",
    "seed", "layer",
)


def _format(key: str, value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)  # always carries '.' or an exponent: the core reads it as a fraction
        return text if ("." in text or "e" in text or "n" in text) else text + ".0"
    if isinstance(value, str):
        if not value or any(c in value for c in ",= \t\n"):
            raise ValueError(f"config value for {key!r} must be a plain word, got {value!r}")
        return value
    raise TypeError(f"config value for {key!r} must be bool, int, float or str, got "
                    f"{type(value).__name__}")


class Config:
    """The algorithm's settings, validated by the C++ core.

    ``Config("vattention", eps=0.05, delta=0.05, predictor="signs")`` starts from a named method
    (dense, sink_local, topk, topp, random, vattention, hub) and overrides fields. Sizes (sink,
    local, topk, base) are token counts when given as int and fractions of n when given as float.
    ``Config.parse("method=vattention,eps=0.05")`` reads the text form used by the command line and
    the C API. Invalid fields and combinations raise ValueError naming the field.
    """

    __slots__ = ("_core",)

    def __init__(self, method: str | None = None, **fields):
        parts = [] if method is None else [f"method={_format('method', method)}"]
        parts += [f"{k}={_format(k, v)}" for k, v in fields.items()]
        self._core = _core.parse_config(",".join(parts))

    @classmethod
    def parse(cls, text: str) -> "Config":
        if not isinstance(text, str):
            raise TypeError(f"config text must be a str, got {type(text).__name__}")
        c = cls.__new__(cls)
        c._core = _core.parse_config(text)
        return c

    @classmethod
    def of(cls, config) -> "Config":
        """A Config from a Config, a text form, or None (the vattention method's defaults)."""
        if config is None:
            return cls("vattention")
        if isinstance(config, Config):
            return config
        if isinstance(config, str):
            return cls.parse(config)
        raise TypeError(f"config must be a vattn.Config or a str, got {type(config).__name__}")

    def replace(self, **fields) -> "Config":
        """A copy with some fields changed (validated again)."""
        extra = ",".join(f"{k}={_format(k, v)}" for k, v in fields.items())
        return Config.parse(self.to_string() + ("," + extra if extra else ""))

    def to_string(self) -> str:
        return self._core.to_string()

    def __getattr__(self, name):
        if name in FIELDS:
            return getattr(self._core, name)
        raise AttributeError(f"vattn.Config has no field {name!r}")

    def __str__(self) -> str:
        return self.to_string()

    def __repr__(self) -> str:
        return f"vattn.Config.parse({self.to_string()!r})"

    def __reduce__(self):  # pickle / deepcopy through the text form
        return (Config.parse, (self.to_string(),))

    def __eq__(self, other) -> bool:
        return isinstance(other, Config) and self.to_string() == other.to_string()

    def __hash__(self) -> int:
        return hash(self.to_string())
