"""Decode attention over torch tensors: vattn.attention (one call), vattn.Decoder (a layer's plan
and predictor index kept across decode steps) and the torch op torch.ops.vattn.decode.

Tensors reach the C++ core through DLPack in place: K and V are read with their own strides,
only the query (one row per head) is converted to float32.
"""

from __future__ import annotations

import threading
from typing import Optional, Sequence, Union

import torch

from . import _core
from .config import Config

STAT_INT_FIELDS = ("n", "n_f", "n_s", "m", "b", "n_sampled", "bytes_kv", "dense_fallback")
STAT_REAL_FIELDS = ("density", "est_rel_error")
_KV_DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
_LAYOUTS = ("bhtd", "bthd")

IntList = Union[Sequence[int], torch.Tensor, None]


def _ints(name: str, values: IntList, n: int, default: int) -> list:
    if values is None:
        return [default] * n
    if isinstance(values, torch.Tensor):
        if values.dtype.is_floating_point or values.dim() != 1:
            raise TypeError(f"{name} must be a 1-D integer tensor or a list of ints")
        values = values.tolist()
    values = [int(x) for x in values]
    if len(values) != n:
        raise ValueError(f"{name} must have one entry per sequence ({n}), got {len(values)}")
    return values


def _check_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} is on {t.device}: this build of vattn runs on the CPU only "
                         "(the CUDA backend is not built into the Python package yet)")
    return t.detach()


class _Cache:
    """K and V of one layer as the core sees them, plus the problem's shape."""

    def __init__(self, k, v, *, layout, seq_lens, seq_start, page_table):
        k = _check_tensor("k", k)
        v = _check_tensor("v", v)
        if k.dtype not in _KV_DTYPES:
            raise TypeError(f"k must be float32, float16 or bfloat16, got {k.dtype}")
        if v.dtype != k.dtype:
            raise TypeError(f"k and v must have the same dtype, got {k.dtype} and {v.dtype}")
        if k.dim() != 4:
            raise ValueError(f"k must be 4-D, got shape {tuple(k.shape)}")
        if v.shape != k.shape:
            raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
        if k.stride() != v.stride():
            raise ValueError(f"k and v must share strides, got {k.stride()} and {v.stride()} "
                             "(call .contiguous() on both)")
        if k.stride(3) != 1:
            raise ValueError("the last (head_dim) dimension of k and v must be contiguous")
        if k.numel() == 0:
            raise ValueError(f"k and v must not be empty, got shape {tuple(k.shape)}")
        self.dtype = _KV_DTYPES[k.dtype]
        self.k = k
        if page_table is not None:
            self._paged(k, v, seq_lens, page_table)
        else:
            self._contiguous(k, v, layout, seq_lens, seq_start)

    def _contiguous(self, k, v, layout, seq_lens, seq_start):
        if layout not in _LAYOUTS:
            raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
        if layout == "bhtd":  # HF: [batch, kv heads, tokens, head_dim]
            b, hkv, t, d = k.shape
            sb, sh, st = k.stride(0), k.stride(1), k.stride(2)
        else:  # engines' NHD: [batch, tokens, kv heads, head_dim]
            b, t, hkv, d = k.shape
            sb, st, sh = k.stride(0), k.stride(1), k.stride(2)
        if t > 1 and st < 1 or hkv > 1 and sh < 1:
            raise ValueError(f"k's token and head strides must be positive, got {k.stride()}")
        if t == 1:  # a single token: its stride is never used to step, any row stride fits
            st = sb if b > 1 and sb > 0 else 1
        st, sh = max(st, 1), max(sh, 1)
        rows_per_seq = 0
        if b > 1:
            if sb % st:
                raise ValueError(f"k's batch stride {sb} must be a multiple of its token stride "
                                 f"{st} (call .contiguous())")
            rows_per_seq = sb // st
        lens = _ints("seq_lens", seq_lens, b, t)
        starts = _ints("seq_start", seq_start, b, 0)
        for i, (n, s0) in enumerate(zip(lens, starts)):
            if n < 1 or s0 < 0 or s0 + n > t:
                raise ValueError(f"sequence {i}: tokens [{s0}, {s0 + n}) must be a non-empty "
                                 f"range inside the cache's {t} tokens")
        self.n_seq, self.n_head_kv, self.head_dim, self.lens = b, hkv, d, lens
        self.layout, self.starts = layout, starts
        self.core = _core.KvCache(
            k, v, hkv, d, torch.tensor(lens, dtype=torch.int32), st, sh,
            seq_start=torch.tensor([i * rows_per_seq + s for i, s in enumerate(starts)],
                                   dtype=torch.int64))

    def _paged(self, k, v, seq_lens, page_table):
        # [n_pages, page_size, kv heads, head_dim] pages; page_table [batch, pages per sequence]
        n_pages, page_size, hkv, d = k.shape
        page_table = _check_tensor("page_table", page_table)
        if page_table.dim() != 2 or page_table.dtype not in (torch.int32, torch.int64):
            raise TypeError("page_table must be a 2-D int32/int64 tensor [batch, max_pages]")
        if seq_lens is None:
            raise ValueError("a paged cache needs seq_lens")
        b, max_pages = page_table.shape
        lens = _ints("seq_lens", seq_lens, b, 0)
        for i, n in enumerate(lens):
            if n < 1 or n > max_pages * page_size:
                raise ValueError(f"seq_lens[{i}] = {n} must lie in [1, {max_pages * page_size}] "
                                 "(page_table's width times page_size)")
        self.n_seq, self.n_head_kv, self.head_dim, self.lens = b, hkv, d, lens
        self.layout, self.starts, self.page_size = "paged", [0] * b, page_size
        self.table = page_table.reshape(b, max_pages)
        self.core = _core.KvCache(
            k, v, hkv, d, torch.tensor(lens, dtype=torch.int32), k.stride(1), k.stride(2),
            page_size=page_size, page_table=page_table.reshape(-1).contiguous(),
            page_start=torch.arange(b, dtype=torch.int64) * max_pages, n_pages=n_pages,
            stride_page=k.stride(0))

    def probe(self, i: int, first: int, last: int) -> torch.Tensor:
        """Element 0 of every kv head's key at tokens [first, last) of sequence i: [n, heads]."""
        pos = torch.arange(first, last)
        if self.layout == "paged":
            pages = self.table[i, pos // self.page_size].long()
            return self.k[pages, pos % self.page_size, :, 0].clone()
        pos = pos + self.starts[i]
        if self.layout == "bhtd":
            return self.k[i, :, pos, 0].t().clone()
        return self.k[i, pos, :, 0].clone()


def _query(q, n_seq: int, head_dim: int) -> tuple:
    q = _check_tensor("q", q)
    if not q.dtype.is_floating_point:
        raise TypeError(f"q must be a floating-point tensor, got {q.dtype}")
    if q.dim() == 4:
        if q.shape[2] != 1:
            raise ValueError(f"q must hold one query per sequence (decode): got shape "
                             f"{tuple(q.shape)}; run the prefill densely")
        heads = q.shape[1]
    elif q.dim() == 3:
        heads = q.shape[1]
    else:
        raise ValueError(f"q must be [batch, heads, head_dim] or [batch, heads, 1, head_dim], got "
                         f"shape {tuple(q.shape)}")
    if q.shape[0] != n_seq or q.shape[-1] != head_dim:
        raise ValueError(f"q of shape {tuple(q.shape)} does not match the cache's {n_seq} "
                         f"sequences of head_dim {head_dim}")
    return q.reshape(n_seq, heads, head_dim).to(torch.float32).contiguous(), heads


def _bucket(n: int) -> int:
    return max(1024, 1 << (n - 1).bit_length())


# Tokens at the end of what an index holds that are compared before appending to it: a cache
# whose sequences were replaced or reordered (beam search) differs there, and the index starts over.
_PROBE = 32
_plans = {}  # attention()'s plans, by config and shapes (a plan holds no per-call state)
_plans_lock = threading.Lock()


def _shared_plan(args: tuple):
    key = (args[0].to_string(),) + args[1:]
    with _plans_lock:
        plan = _plans.get(key)
        if plan is None:
            if len(_plans) >= 16:
                _plans.pop(next(iter(_plans)))
            plan = _plans[key] = (_core.Plan(*args), threading.Lock())
        return plan


class Decoder:
    """One layer's decode attention: a plan (and a predictor index) kept across steps.

    Call it once per decode step with the layer's query and whole cache. The plan is made for the
    batch and head shapes and for a token capacity that doubles as the cache grows. A predictor
    index (predictor=pages or signs) is appended to as tokens arrive; it starts over by itself
    when a sequence's visible range moves (sliding windows), shrinks, or its last indexed keys
    changed (new or reordered sequences). reset() forgets it explicitly.
    """

    def __init__(self, config: Union[Config, str, None] = None, *, n_threads: int = 0):
        self.config = Config.of(config)
        self.n_threads = int(n_threads)
        self._drop_state()
        self._lock = threading.Lock()

    def _drop_state(self) -> None:
        self._plan = self._index = self._shape = self._seen = None

    def __getstate__(self):  # copies (copy.deepcopy of a model) start without plan or index
        return {"config": self.config, "n_threads": self.n_threads}

    def __setstate__(self, state):
        self.__init__(state["config"], n_threads=state["n_threads"])

    def reset(self) -> None:
        """Forget the predictor index (new sequences)."""
        with self._lock:
            if self._index is not None:
                self._index.clear()
            self._seen = None

    def _prepare(self, cache: _Cache, heads: int) -> None:
        need = max(cache.lens)
        shape = (cache.n_seq, heads, cache.n_head_kv, cache.head_dim, cache.dtype)
        if self._plan is not None and shape == self._shape and need <= self._plan.n_tokens_max:
            return
        cap = _bucket(need)
        if self._plan is not None and shape == self._shape:
            cap = max(cap, 2 * self._plan.n_tokens_max)
        args = (self.config._core, cache.n_seq, heads, cache.n_head_kv, cache.head_dim, cap,
                cache.dtype, self.n_threads)
        self._plan = _core.Plan(*args)
        self._index = _core.PredictorIndex(*args) if self.config.predictor != "oracle" else None
        self._shape = shape
        self._seen = None

    def _index_still_holds(self, cache: _Cache) -> bool:
        """Whether every slot's indexed tokens are still the cache's first ones."""
        if self._seen is None:
            return True
        starts, lens, probes = self._seen
        for i in range(cache.n_seq):
            if cache.starts[i] != starts[i] or cache.lens[i] < lens[i]:
                return False
            first = max(0, lens[i] - _PROBE)
            if not torch.equal(cache.probe(i, first, lens[i]), probes[i]):
                return False
        return True

    def _update_index(self, cache: _Cache) -> None:
        if not self._index_still_holds(cache):
            self._index.clear()
        self._index.update(cache.core)
        self._seen = (list(cache.starts), list(cache.lens),
                      [cache.probe(i, max(0, n - _PROBE), n) for i, n in enumerate(cache.lens)])

    def __call__(self, q, k, v, *, seq_lens: IntList = None, seq_start: IntList = None,
                 layout: str = "bhtd", page_table: Optional[torch.Tensor] = None, step: int = 0,
                 seq_id: IntList = None, return_stats: bool = False,
                 return_indices: bool = False):
        return self._run(q, k, v, seq_lens, seq_start, layout, page_table, step, seq_id,
                         return_stats, return_indices, shared=False)

    def _run(self, q, k, v, seq_lens, seq_start, layout, page_table, step, seq_id, return_stats,
             return_indices, shared: bool):
        cache = _Cache(k, v, layout=layout, seq_lens=seq_lens, seq_start=seq_start,
                       page_table=page_table)
        qf, heads = _query(q, cache.n_seq, cache.head_dim)
        if heads % cache.n_head_kv:
            raise ValueError(f"q's {heads} heads must be a multiple of the cache's "
                             f"{cache.n_head_kv} kv heads")
        out = torch.empty_like(qf)
        stats_int = torch.empty(cache.n_seq, heads, 8, dtype=torch.int64) if return_stats else None
        stats_real = torch.empty(cache.n_seq, heads, 2, dtype=torch.float64) if return_stats else None
        ids = None
        if seq_id is not None:
            ids = torch.tensor(_ints("seq_id", seq_id, cache.n_seq, 0), dtype=torch.int64)
        if shared:  # one call: a cached plan, a predictor index built for this call only
            args = (self.config._core, cache.n_seq, heads, cache.n_head_kv, cache.head_dim,
                    _bucket(max(cache.lens)), cache.dtype, self.n_threads)
            plan, lock = _shared_plan(args)
            index = None
            if self.config.predictor != "oracle":
                index = _core.PredictorIndex(*args)
                index.update(cache.core)
        else:
            lock = self._lock
        with lock:
            if not shared:
                self._prepare(cache, heads)
                plan, index = self._plan, self._index
                if index is not None:
                    self._update_index(cache)
            indices = None
            if return_indices:
                indices = torch.full((cache.n_seq, heads, plan.n_tokens_max), -1,
                                     dtype=torch.int32)
            plan.run(qf, cache.core, out, stats_int=stats_int, stats_real=stats_real,
                     indices=indices, step=int(step), seq_id=ids, index=index)
        out = out.to(q.dtype).reshape(q.shape)
        if not (return_stats or return_indices):
            return out
        result = [out]
        if return_stats:
            stats = {f: stats_int[..., i] for i, f in enumerate(STAT_INT_FIELDS)}
            stats.update({f: stats_real[..., i] for i, f in enumerate(STAT_REAL_FIELDS)})
            result.append(stats)
        if return_indices:
            result.append(indices)
        return tuple(result)


def attention(q, k, v, config: Union[Config, str, None] = None, *, seq_lens: IntList = None,
              seq_start: IntList = None, layout: str = "bhtd",
              page_table: Optional[torch.Tensor] = None, step: int = 0, seq_id: IntList = None,
              return_stats: bool = False, return_indices: bool = False, n_threads: int = 0):
    """Decode attention of one query per sequence over a KV cache, in one call.

    q: [batch, heads_q, head_dim] or [batch, heads_q, 1, head_dim] (any float dtype; the output
    has q's shape and dtype). k, v: [batch, heads_kv, tokens, head_dim] (layout="bhtd", as HF
    caches) or [batch, tokens, heads_kv, head_dim] (layout="bthd"), float32/float16/bfloat16, any
    strides with a contiguous last dimension; or pages [n_pages, page_size, heads_kv, head_dim]
    with page_table=[batch, max_pages] and seq_lens. seq_lens / seq_start pick tokens
    [seq_start, seq_start + seq_lens) of each sequence (default: all). step and seq_id enter the
    sampling key. return_stats adds a dict of [batch, heads_q] tensors (n, n_f, n_s, m, b,
    n_sampled, bytes_kv, dense_fallback, density, est_rel_error); return_indices adds the tokens
    read per head (-1 past the end). Plans are cached across calls; a predictor index is built
    for this call only: keep a vattn.Decoder across steps to append to it instead.
    """
    return Decoder(config, n_threads=n_threads)._run(
        q, k, v, seq_lens, seq_start, layout, page_table, step, seq_id, return_stats,
        return_indices, shared=True)


@torch.library.custom_op("vattn::decode", mutates_args=())
def _decode_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor,
               config: str, step: int, seq_start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """vattn.attention as a torch op (layout bhtd): traced by torch.compile as one node."""
    return attention(q, k, v, config, seq_lens=seq_lens, seq_start=seq_start, step=step)


@_decode_op.register_fake
def _decode_op_fake(q, k, v, seq_lens, config, step, seq_start=None):
    return torch.empty_like(q)
