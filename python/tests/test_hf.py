"""vattn in HuggingFace transformers, on tiny randomly initialised models built here (nothing is
downloaded): exact budgets reproduce dense generation token for token, the (eps, delta) guarantee
holds on the collected errors, and bad setups raise clear errors."""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import vattn  # noqa: E402
import vattn.hf  # noqa: E402

COMMON = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=8, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=8192)


def tiny_model(family="llama", seed=0, **extra):
    torch.manual_seed(seed)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[family]
    return model_cls(config_cls(**COMMON, **extra)).eval()


def prompt(batch=2, tokens=1100, pad=(0, 200), seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (batch, tokens), generator=g)
    mask = torch.ones_like(ids)
    for i, p in enumerate(pad[:batch]):
        mask[i, :p] = 0  # left padding
        ids[i, :p] = 0
    return ids, mask


def generate(model, ids, mask, new_tokens=6):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0)


EXACT = dict(eps=1e-6, delta=0.05, sink=16, local=16)


@pytest.mark.parametrize("family, predictor", [
    ("llama", "oracle"), ("llama", "pages"), ("llama", "signs"),
    ("qwen2", "oracle"), ("qwen3", "signs"), ("mistral", "pages"),
])
def test_exact_budget_generates_what_dense_generates(family, predictor):
    model = tiny_model(family)
    ids, mask = prompt()
    dense = generate(model, ids, mask)
    run = vattn.hf.enable(model, vattn.Config("vattention", predictor=predictor, **EXACT),
                          collect=True)
    got = generate(model, ids, mask)
    run.disable()
    assert torch.equal(got, dense)
    # the decode steps really ran through vattn, over each sequence's visible tokens
    assert len(run.records) == 2 * 5  # layers x decode steps (the prefill gives the first)
    for r in run.records:
        assert torch.equal(r["b"], r["n_s"])
        assert torch.all(r["n"][0] == r["n"][0, 0]) and int(r["n"][1, 0]) == int(r["n"][0, 0]) - 200
        assert torch.all(r["dense_fallback"] == 0)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("setup", ["static", "beams", "window"])
def test_static_caches_beams_and_windows(setup):
    # exact budgets give dense's tokens; the sampling key's step advances every decode step
    kw, family = {}, "llama"
    if setup == "static":
        kw = dict(cache_implementation="static")
    elif setup == "beams":
        kw = dict(num_beams=3)
    else:
        family = "mistral"
    model = tiny_model(family, **({"sliding_window": 300} if setup == "window" else {}))
    ids, mask = prompt()
    with torch.no_grad():
        dense = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                               pad_token_id=0, **kw)
        run = vattn.hf.enable(model, vattn.Config("vattention", predictor="signs", **EXACT),
                              collect=True)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                             pad_token_id=0, **kw)
    run.disable()
    assert torch.equal(got, dense)
    steps = [r["step"] for r in run.records if r["layer"] == 0]
    assert steps == sorted(set(steps)) and len(steps) == 5
    if setup == "window":
        assert all(int(r["n"].max()) == 300 for r in run.records)


def test_enabled_models_can_be_copied():
    import copy
    model = tiny_model()
    vattn.hf.enable(model, vattn.Config("vattention", **EXACT))
    twin = copy.deepcopy(model)
    ids, mask = prompt()
    assert torch.equal(generate(twin, ids, mask), generate(model, ids, mask))


def test_attn_implementation_at_load_time(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    vattn.hf.register(vattn.Config("vattention", **EXACT))
    try:
        dense = transformers.AutoModelForCausalLM.from_pretrained(tmp_path,
                                                                  attn_implementation="sdpa")
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path,
                                                                  attn_implementation="vattn")
        assert model.config._attn_implementation == "vattn"
        ids, mask = prompt()
        assert torch.equal(generate(model, ids, mask), generate(dense, ids, mask))
        assert model.model.layers[1].self_attn._vattn_state.config.layer == 1
    finally:
        vattn.hf.register(vattn.Config("vattention"))


def test_guarantee_holds_on_collected_errors():
    # Values with a common offset (a v bias) make the output norm large against the spread of
    # the values, so the budget stays well below n_s and the sampling is really exercised.
    model = tiny_model(attention_bias=True, initializer_range=0.1)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.bias.normal_(0, 0.5)
    eps = delta = 0.05
    ids, mask = prompt(tokens=2000, pad=(0, 300))
    run = vattn.hf.enable(model, vattn.Config("vattention", eps=eps, delta=delta, sink=16,
                                              local=16, mode="output"), errors=True)
    generate(model, ids, mask, new_tokens=12)
    run.disable()
    errors = torch.cat([r["error"].reshape(-1) for r in run.records])
    n = errors.numel()
    assert n == 2 * 11 * 2 * 8  # layers x decode steps x batch x heads
    violations = int((errors > eps).sum())
    # P(error > eps) <= delta per head; three binomial standard deviations of margin
    assert violations <= n * delta + 3 * math.sqrt(n * delta * (1 - delta)), (violations, n)
    summary = run.summary()
    assert [row["layer"] for row in summary] == [0, 1]
    assert min(row["density"] for row in summary) < 0.5  # not a dense run in disguise
    for row in summary:
        assert row["error_max"] < 3 * eps and 0 < row["est_rel_error"] <= eps * 1.0001
        assert row["above_eps"] <= 0.2


def test_batched_padding_equals_each_sequence_alone():
    # a left-padded sequence in a batch sees only its own tokens: with an exact budget it
    # generates what it generates alone (sampled runs differ, since the sampling key holds the
    # sequence's place in the batch)
    model = tiny_model()
    ids, mask = prompt(pad=(0, 200))
    run = vattn.hf.enable(model, vattn.Config("vattention", **EXACT), collect=True)
    both = generate(model, ids, mask)
    second = generate(model, ids[1:, 200:], mask[1:, 200:])
    run.disable()
    assert torch.equal(both[1, 200:], second[0])
    # the first decode step of each run: the padded sequence's 900 tokens and the new one
    assert int(run.records[0]["n"][1, 0]) == int(run.records[10]["n"][0, 0]) == 901


def test_errors_are_clear():
    model = tiny_model()
    with pytest.raises(ValueError, match="collect=True"):
        vattn.hf.enable(model, "method=vattention").summary()
    vattn.hf.disable(model)
    with pytest.raises(ValueError, match="no attention layers"):
        vattn.hf.enable(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="eps"):
        vattn.hf.enable(model, "method=vattention,eps=2")
    # a mask with a hole in the middle cannot be one range of tokens
    q = torch.randn(1, 8, 1, 16)
    k = torch.randn(1, 2, 1100, 16)
    hole = torch.ones(1, 1, 1, 1100, dtype=torch.bool)
    hole[..., 500] = False
    attn = model.model.layers[0].self_attn
    with pytest.raises(ValueError, match="contiguous range"):
        vattn.hf.attention_forward(attn, q, k, k, hole, scaling=0.25)
    bias = torch.zeros(1, 1, 1, 1100)
    bias[..., 3] = -1.5
    with pytest.raises(ValueError, match="additive biases"):
        vattn.hf.attention_forward(attn, q, k, k, bias, scaling=0.25)
    with pytest.raises(ValueError, match="softcap"):
        vattn.hf.attention_forward(attn, q, k, k, None, scaling=0.25, softcap=30.0)
    with pytest.raises(ValueError, match="s_aux"):
        vattn.hf.attention_forward(attn, q, k, k, None, scaling=0.25, s_aux=torch.zeros(8))
    per_head = torch.ones(1, 8, 1, 1100, dtype=torch.bool)
    per_head[:, 3, :, :10] = False
    with pytest.raises(ValueError, match="every head"):
        vattn.hf.attention_forward(attn, q, k, k, per_head, scaling=0.25)
    with pytest.raises(ValueError, match="attention mask"):
        vattn.hf.attention_forward(attn, q, k, k, per_head[..., :1000], scaling=0.25)
