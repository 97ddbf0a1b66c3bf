"""vattn: verified sparse attention for LLM decoding (vAttention).

Attention over a long KV cache is computed exactly over sink, local and predicted top-k tokens and
estimated from a uniform sample of the rest, sized per head from (eps, delta) so that the error
stays within eps with probability at least 1 - delta. The kernels are the C++ core's.

    import vattn
    cfg = vattn.Config("vattention", eps=0.05, delta=0.05, mode="output")
    out, stats = vattn.attention(q, k, v, cfg, return_stats=True)   # torch tensors

vattn.hf puts it into HuggingFace transformers models (attn_implementation="vattn").
"""

from . import _core
from .config import Config

__version__ = _core.version()
simd_level = _core.simd_level
hardware_threads = _core.hardware_threads

__all__ = ["Config", "Decoder", "attention", "simd_level", "hardware_threads", "__version__"]


try:  # the torch front (and the op torch.ops.vattn.decode) when torch is installed
    from .ops import STAT_INT_FIELDS, STAT_REAL_FIELDS, Decoder, attention
except ModuleNotFoundError as e:
    if e.name != "torch":
        raise

    def _needs_torch(*args, **kwargs):
        raise ImportError("vattn.attention and vattn.Decoder need torch: pip install torch")

    attention = Decoder = _needs_torch


def __getattr__(name):  # vattn.hf (transformers) and vattn.eval are imported on first use
    if name in ("hf", "eval", "tasks"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'vattn' has no attribute {name!r}")
