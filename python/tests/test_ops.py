"""vattn.attention / vattn.Decoder / torch.ops.vattn.decode against exact attention in float64."""

import math

import pytest
import torch

import vattn

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def reference(q, k, v, starts=None, lens=None, scale=None):
    """Exact attention in float64; q [b, hq, d], k/v [b, hkv, t, d] -> [b, hq, d]."""
    b, hq, d = q.shape
    g = hq // k.shape[1]
    scale = scale if scale is not None else 1 / math.sqrt(d)
    out = torch.empty(b, hq, d, dtype=torch.float64)
    for i in range(b):
        s0 = 0 if starts is None else starts[i]
        n = k.shape[2] - s0 if lens is None else lens[i]
        kk = k[i, :, s0:s0 + n].double().repeat_interleave(g, 0)
        vv = v[i, :, s0:s0 + n].double().repeat_interleave(g, 0)
        w = torch.softmax(torch.einsum("hd,htd->ht", q[i].double(), kk) * scale, -1)
        out[i] = torch.einsum("ht,htd->hd", w, vv)
    return out


def rel_err(a, b):
    return ((a.double() - b).norm(dim=-1) / b.norm(dim=-1)).max().item()


def problem(b=2, hq=8, hkv=2, t=700, d=64, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, d, generator=g)
    k = torch.randn(b, hkv, t, d, generator=g).to(dtype)
    v = (torch.randn(b, hkv, t, d, generator=g) + 0.5).to(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_matches_reference(dtype):
    q, k, v = problem(dtype=dtype)
    out = vattn.attention(q, k, v, "method=dense")
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, reference(q, k, v)) < 1e-5


def test_hf_query_shape_and_dtype_are_kept():
    q, k, v = problem(dtype=torch.bfloat16)
    q4 = q.to(torch.bfloat16).unsqueeze(2)  # [b, hq, 1, d] as HF passes it
    out = vattn.attention(q4, k, v, "method=dense")
    assert out.shape == q4.shape and out.dtype == torch.bfloat16
    assert rel_err(out[:, :, 0], reference(q4[:, :, 0].float(), k, v)) < 1e-2


def test_layouts_strides_and_ranges_read_in_place():
    q, k, v = problem(t=900)
    ref = reference(q, k, v, starts=[5, 100], lens=[800, 650])
    # HF layout with per-sequence visible ranges (left padding)
    out = vattn.attention(q, k, v, "method=dense", seq_start=[5, 100], seq_lens=[800, 650])
    assert rel_err(out, ref) < 1e-5
    # engines' [batch, tokens, heads, dim], as a transposed view (no copy)
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    out = vattn.attention(q, kt, vt, "method=dense", layout="bthd", seq_start=[5, 100],
                          seq_lens=[800, 650])
    assert rel_err(out, ref) < 1e-5
    # a slice of a larger preallocated cache (static cache): batch stride > heads * tokens
    big_k = torch.zeros(2, 2, 1200, 64)
    big_v = torch.zeros(2, 2, 1200, 64)
    big_k[:, :, :900], big_v[:, :, :900] = k, v
    out = vattn.attention(q, big_k[:, :, :900], big_v[:, :, :900], "method=dense",
                          seq_start=[5, 100], seq_lens=[800, 650])
    assert rel_err(out, ref) < 1e-5


def test_paged_cache_matches_contiguous():
    q, k, v = problem(t=300)
    page, n_pages = 16, 64
    perm = torch.randperm(n_pages, generator=torch.Generator().manual_seed(1))
    kp = torch.zeros(n_pages, page, 2, 64)
    vp = torch.zeros(n_pages, page, 2, 64)
    lens = [300, 211]
    table = torch.zeros(2, 19, dtype=torch.int32)
    for i in range(2):
        for j in range((lens[i] + page - 1) // page):
            pid = int(perm[i * 19 + j])
            table[i, j] = pid
            n = min(page, lens[i] - j * page)
            kp[pid, :n] = k[i, :, j * page:j * page + n].transpose(0, 1)
            vp[pid, :n] = v[i, :, j * page:j * page + n].transpose(0, 1)
    out = vattn.attention(q, kp, vp, "method=dense", page_table=table, seq_lens=lens)
    assert rel_err(out, reference(q, k, v, lens=lens)) < 1e-5


@pytest.mark.parametrize("predictor", ["oracle", "pages", "signs"])
def test_exact_budget_equals_dense(predictor):
    # eps tiny: the budget b reaches n_s, every token is read, the estimate is exact
    q, k, v = problem(t=3000)
    cfg = vattn.Config("vattention", eps=1e-6, delta=0.05, predictor=predictor, sink=16, local=16)
    out, stats = vattn.attention(q, k, v, cfg, return_stats=True)
    assert torch.equal(stats["b"], stats["n_s"])
    assert torch.all(stats["density"] == 1)
    assert rel_err(out, reference(q, k, v)) < 1e-5


def test_stats_and_indices_describe_what_was_read():
    q, k, v = problem(t=4000)
    cfg = vattn.Config("vattention", eps=0.1, delta=0.1, sink=16, local=16, mode="output")
    out, stats, idx = vattn.attention(q, k, v, cfg, return_stats=True, return_indices=True)
    assert set(stats) == set(vattn.STAT_INT_FIELDS) | set(vattn.STAT_REAL_FIELDS)
    assert torch.all(stats["n"] == 4000)
    assert torch.all(stats["b"] < stats["n_s"])  # these caches are flat enough to sample
    read = stats["n_f"] + stats["n_sampled"]
    assert torch.allclose(stats["density"], read.double() / 4000)
    for s in range(2):
        for h in range(8):
            r = int(read[s, h])
            row = idx[s, h]
            assert torch.all(row[:r] >= 0) and torch.all(row[:r] < 4000)
            assert torch.all(row[r:] == -1)
            assert len(set(row[:r].tolist())) == r  # no token counted twice
            assert set(range(16)) <= set(row[:r].tolist())  # the sinks are in F


def test_sampling_is_keyed_by_step_and_seq_id():
    q, k, v = problem(t=4000)
    cfg = vattn.Config("vattention", eps=0.1, delta=0.1, sink=16, local=16)
    a = vattn.attention(q, k, v, cfg, step=3)
    assert torch.equal(a, vattn.attention(q, k, v, cfg, step=3))
    assert not torch.equal(a, vattn.attention(q, k, v, cfg, step=4))
    assert not torch.equal(a, vattn.attention(q, k, v, cfg, step=3, seq_id=[7, 8]))


@pytest.mark.parametrize("predictor", ["pages", "signs"])
def test_decoder_appends_to_its_index_like_a_rebuild(predictor):
    # a Decoder kept across steps appends new tokens to its predictor index; whatever happens to
    # the cache between steps, the result equals a one-shot call that builds the index afresh
    q, k, v = problem(t=2600)
    cfg = vattn.Config("vattention", predictor=predictor, sink=16, local=16, gqa_shared=True)
    dec = vattn.Decoder(cfg)

    def same(kk, vv, **kw):
        assert torch.equal(dec(q, kk, vv, **kw), vattn.attention(q, kk, vv, cfg, **kw))

    for n in (1500, 1501, 2100, 2600):  # the last growth passes the 2048-token plan capacity
        same(k[:, :, :n], v[:, :, :n], step=n)
    same(k, v, seq_start=[900, 900], seq_lens=[1700, 1700], step=1)  # a sliding window moved
    same(k, v, seq_start=[901, 901], seq_lens=[1699, 1699], step=2)
    same(k.flip(0), v.flip(0), step=3)  # the batch reordered in place (beam search)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 2000:] += 1  # other sequences with a shared prefix, longer than before
    same(k2, v2, step=4)
    dec.reset()
    same(k2, v2, step=5)


def test_single_token_caches_with_odd_strides():
    q, k, v = problem(t=1)
    odd = lambda x: x.as_strided(x.shape, (x.stride(0), x.stride(1), 3, 1))
    out = vattn.attention(q, odd(k), odd(v), "method=dense")
    assert rel_err(out, reference(q, k, v)) < 1e-5


def test_torch_op():
    q, k, v = problem()
    lens = torch.tensor([700, 500])
    out = torch.ops.vattn.decode(q, k, v, lens, "method=dense", 0)
    assert rel_err(out, reference(q, k, v, lens=[700, 500])) < 1e-5
    out = torch.ops.vattn.decode(q, k, v, lens, "method=dense", 0, torch.tensor([0, 150]))
    assert rel_err(out, reference(q, k, v, starts=[0, 150], lens=[700, 500])) < 1e-5
    torch.library.opcheck(torch.ops.vattn.decode.default, (q, k, v, lens, "method=dense", 0),
                          test_utils=("test_schema", "test_faketensor"))

    # traced by torch.compile as one opaque op (fake tensors give its output's shape)
    def step(q, k, v, lens):
        return torch.ops.vattn.decode(q * 2, k, v, lens, "method=dense", 0) + 1

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(q, k, v, lens), step(q, k, v, lens))


@pytest.mark.parametrize("bad, match", [
    (lambda q, k, v: (q, k, v.to(torch.float16)), "same dtype"),
    (lambda q, k, v: (q, k.to(torch.int32), v.to(torch.int32)), "float32, float16 or bfloat16"),
    (lambda q, k, v: (q.long(), k, v), "floating-point"),
    (lambda q, k, v: (q, k[:, :, :, :32], v[:, :, :, :32]), "head_dim"),
    (lambda q, k, v: (q, k[:1], v[:1]), "sequences"),
    (lambda q, k, v: (q, k[0], v[0]), "4-D"),
    (lambda q, k, v: (q, k, v[:, :, :10]), "shape"),
    (lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), "empty"),
    (lambda q, k, v: (q[:, :5], k, v), "multiple"),
    (lambda q, k, v: (q.unsqueeze(2).expand(-1, -1, 3, -1), k, v), "one query"),
    (lambda q, k, v: (q, k, v.clone().transpose(2, 3).contiguous().transpose(2, 3)), "strides"),
    (lambda q, k, v: ("q", k, v), "torch.Tensor"),
])
def test_bad_input_raises_clear_errors(bad, match):
    q, k, v = problem()
    with pytest.raises((ValueError, TypeError), match=match):
        vattn.attention(*bad(q, k, v), "method=dense")


def test_bad_values_raise():
    q, k, v = problem()
    with pytest.raises(ValueError, match="seq_lens"):
        vattn.attention(q, k, v, "method=dense", seq_lens=[700])
    with pytest.raises(ValueError, match="range"):
        vattn.attention(q, k, v, "method=dense", seq_lens=[700, 0])
    with pytest.raises(ValueError, match="range"):
        vattn.attention(q, k, v, "method=dense", seq_start=[1, 0])
    with pytest.raises(ValueError, match="layout"):
        vattn.attention(q, k, v, "method=dense", layout="nhd")
    k2 = k.clone()
    k2[1, 0, 17, 3] = float("nan")
    with pytest.raises(ValueError, match="(?i)nan|non-finite"):
        vattn.attention(q, k2, v, "method=dense")
    q2 = q.clone()
    q2[0, 1, 2] = float("inf")
    with pytest.raises(ValueError, match="q contains NaN/Inf"):
        vattn.attention(q2, k, v)
    with pytest.raises(ValueError, match="page_table"):  # an id beyond int32 is not truncated
        vattn.attention(q, k.transpose(1, 2), v.transpose(1, 2), seq_lens=[5, 5],
                        page_table=torch.tensor([[2**32 + 1], [0]]))
    with pytest.raises(ValueError, match="paged cache needs seq_lens"):
        vattn.attention(q, k.transpose(1, 2), v.transpose(1, 2),
                        page_table=torch.zeros(2, 1, dtype=torch.int32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_refused_with_a_clear_error():
    q, k, v = problem()
    with pytest.raises(ValueError, match="CPU only"):
        vattn.attention(q.cuda(), k.cuda(), v.cuda())
