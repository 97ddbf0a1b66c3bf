"""vattn.Config mirrors the C++ config: fields, text form, validation with named fields."""

import pytest

import vattn


def test_method_defaults_and_overrides():
    c = vattn.Config("vattention", eps=0.1, delta=0.2, sink=64, topk=0.1, predictor="signs",
                     pred_bits=128, gqa_shared=True, mode="output")
    assert c.eps == 0.1 and c.delta == 0.2
    assert c.sink == 64 and isinstance(c.sink, int)  # a count
    assert c.topk == 0.1 and isinstance(c.topk, float)  # a fraction of n
    assert c.local == 128  # the method's preset
    assert c.predictor == "signs" and c.pred_bits == 128 and c.gqa_shared
    assert c.select == "topk" and c.sample == "adaptive" and c.mode == "output"


def test_refine_field():
    c = vattn.Config("vattention", predictor="signs", refine=4.0, gqa_shared=True)
    assert c.refine == 4.0 and "refine=4" in str(c)
    assert vattn.Config.parse(c.to_string()) == c
    with pytest.raises(ValueError, match="refine"):
        vattn.Config("vattention", predictor="signs", refine=0.5)
    with pytest.raises(ValueError, match="pages or signs"):
        vattn.Config("vattention", refine=2.0)  # the oracle needs no re-ranking


def test_text_form_round_trips():
    c = vattn.Config("topk", topk=256)
    again = vattn.Config.parse(c.to_string())
    assert again == c and hash(again) == hash(c)
    assert "topk=256" in str(c)
    assert vattn.Config.parse("method=dense").dense


def test_replace_validates_again():
    c = vattn.Config("vattention")
    assert c.replace(eps=0.2).eps == 0.2 and c.eps == 0.05
    with pytest.raises(ValueError, match="eps"):
        c.replace(eps=1.5)


@pytest.mark.parametrize("kwargs, match", [
    ({"eps": 0.0}, "eps"),
    ({"delta": 1.0}, "delta"),
    ({"pred_bits": 40, "predictor": "signs"}, "bits"),
    ({"sink": -1}, "sink"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"mode": "sideways"}, "mode"),
])
def test_bad_fields_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vattn.Config("vattention", **kwargs)


def test_bad_types_and_methods():
    with pytest.raises(ValueError, match="method"):
        vattn.Config("nonsense")
    with pytest.raises(TypeError, match="eps"):
        vattn.Config("vattention", eps=[0.1])
    with pytest.raises(ValueError, match="plain word"):
        vattn.Config("vattention", mode="output,eps=0.9")
    with pytest.raises(TypeError):
        vattn.Config.of(3)
    with pytest.raises(AttributeError, match="no field"):
        vattn.Config("dense").epsilon


def test_build_information():
    assert vattn.__version__ == "0.1.0"
    assert vattn.simd_level() in ("scalar", "avx2", "avx512", "avx512+bf16")
    assert vattn.hardware_threads() >= 1
