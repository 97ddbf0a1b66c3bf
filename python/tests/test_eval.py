"""The RULER-family task generators and `vattn eval` on our trained model (models/kjv-ruler-18m)."""

import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import vattn  # noqa: E402
from vattn import eval as veval  # noqa: E402
from vattn import tasks  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
MODEL = os.path.join(ROOT, "models", "kjv-ruler-18m")


@pytest.fixture(scope="module")
def hay():
    return tasks.Haystack(tasks.load_corpus())


@pytest.mark.parametrize("task", tasks.TASKS)
@pytest.mark.parametrize("length", [700, 4096])
def test_tasks_are_well_formed_and_seeded(hay, task, length):
    for i in range(5):
        a = tasks.make(task, np.random.default_rng([3, i]), hay, length)
        b = tasks.make(task, np.random.default_rng([3, i]), hay, length)
        assert a.prompt == b.prompt and a.answer == b.answer  # deterministic given the seed
        assert a.prompt.endswith(tasks.ANSWER_PREFIX.encode())
        n = max(length, tasks.MIN_LENGTH.get(task, 0))
        assert min(0.7 * n, n - 400) <= len(a.prompt) <= n + 64  # cut at sentence ends
        body = a.prompt.decode()
        assert all(item in body for item in a.answer)
        assert tasks.score(a, a.target.decode()) == 1.0
        assert tasks.score(a, " nothing\n") == 0.0
        if task == "frequent_words":  # the answer really is the most frequent words, in order
            counts = collections.Counter(body.split("\nQuestion")[0].replace(".", "").split())
            assert [w for w, _ in counts.most_common(3)] == a.answer


def test_unknown_task_is_refused(hay):
    with pytest.raises(ValueError, match="unknown task"):
        tasks.make("nope", np.random.default_rng(0), hay, 1000)


@pytest.fixture(scope="module")
def model():
    tok = transformers.AutoTokenizer.from_pretrained(MODEL)
    m = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    return m, tok


def test_tokenizer_is_bytes(model):
    _, tok = model
    text = "One of the special magic numbers for abc is: 1234567.\n"
    assert tok(text, add_special_tokens=False).input_ids == list(text.encode())
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)


def test_eval_runs_methods_and_dumps(model, tmp_path):
    m, tok = model
    methods = [x for x in veval.methods([0.1], [0.1], [], ["signs"], "output")
               if x["name"] in ("dense", "sink_local@0.1", "vattention_oracle@eps0.1",
                                "vattention_signs@eps0.1")]
    summary = veval.run(m, tok, task_names=["niah_single"], lengths=[600], samples=2, seed=0,
                        method_list=methods, dump=str(tmp_path), dump_layers=[0, 5], quiet=True)
    assert set(summary) == {x["name"] for x in methods}
    # the trained model finds a needle in 600 bytes, densely and under vAttention
    assert summary["dense"]["accuracy_mean"] == 1.0
    assert summary["vattention_oracle@eps0.1"]["accuracy_mean"] == 1.0
    v = summary["vattention_oracle@eps0.1"]
    assert 0 < v["density"] < 1 and len(v["per_layer"]) == 8
    assert 0 <= v["error_mean"] < 0.1  # eps = 0.1 bounds each head's error with prob. 0.9
    assert summary["sink_local@0.1"]["density"] < 0.11
    dumps = sorted(os.listdir(tmp_path))
    assert dumps == ["niah_single_600_layer0.safetensors", "niah_single_600_layer5.safetensors"]
    from safetensors.torch import load_file

    t = load_file(os.path.join(tmp_path, dumps[0]))
    assert t["q"].shape == (8, 64) and t["k"].shape == t["v"].shape
    assert t["k"].shape[1:] == (2, 64) and 500 < t["k"].shape[0] < 700


def test_eval_command_line(tmp_path):
    out = tmp_path / "e.json"
    r = subprocess.run([sys.executable, "-m", "vattn", "eval", "--model", MODEL, "--tasks",
                        "variable_tracking", "--lengths", "500", "--samples", "1", "--methods",
                        "dense,topk_oracle", "--densities", "0.2", "--json", str(out),
                        "--quiet"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "topk_oracle@0.2" in r.stdout
    j = json.loads(out.read_text())
    assert set(j["methods"]) == {"dense", "topk_oracle@0.2"}
    r = subprocess.run([sys.executable, "-m", "vattn", "eval", "--model", MODEL, "--tasks",
                        "nope"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown task" in r.stderr


def test_jobs_give_the_results_of_one_job(model):
    m, tok = model
    methods = [x for x in veval.methods([0.1], [0.1], [], [], "output")
               if x["name"] in ("dense", "topk_oracle@0.1", "vattention_oracle@eps0.1")]
    kw = dict(task_names=["niah_single", "variable_tracking"], lengths=[400], samples=2, seed=3,
              method_list=methods, quiet=True)
    one = veval.run(m, tok, **kw)
    two = veval.run(m, tok, **kw, jobs=2, model_dir=MODEL, threads=1)
    assert one == two
    # a sample depends on its task, length, index and seed, not on the other tasks of the run
    only = veval.run(m, tok, **{**kw, "task_names": ["variable_tracking"]})
    assert only["dense"]["accuracy"]["variable_tracking"] == \
        one["dense"]["accuracy"]["variable_tracking"]


def test_vattention_sizes_and_saved_runs(tmp_path):
    names = [m["name"] for m in veval.methods([], [0.2], [], ["signs"], "output", 0.01, 0.02)]
    assert names == ["dense", "vattention_oracle/k0.01b0.02@eps0.2",
                     "vattention_signs/k0.01b0.02@eps0.2"]
    refined = veval.methods([0.05], [], [], ["signs+r4"], "output")[-2]
    assert refined["name"] == "topk_signs+r4@0.05"
    assert refined["config"].refine == 4.0 and refined["config"].predictor == "signs"
    with pytest.raises(ValueError, match="signs\\+rx"):
        veval.methods([0.05], [], [], ["signs+rx"], "output")
    cfg = veval.methods([], [0.2], [], [], "output", 0.01, 0.02)[1]["config"]
    assert "topk=0.01" in str(cfg) and "base=0.02" in str(cfg)
    # runs saved with --json merge into one table and plot without the model
    runs = []
    for i, method in enumerate(["dense", "topk_oracle"]):
        out = tmp_path / f"run{i}.json"
        r = subprocess.run([sys.executable, "-m", "vattn", "eval", "--model", MODEL, "--tasks",
                            "niah_single", "--lengths", "300", "--samples", "1", "--methods",
                            method, "--densities", "0.2", "--json", str(out), "--quiet"],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        runs.append(str(out))
    md = tmp_path / "all.md"
    r = subprocess.run([sys.executable, "-m", "vattn", "eval", "--from-json", ",".join(runs),
                        "--markdown", str(md)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = md.read_text().splitlines()
    assert rows[2].startswith("| dense |") and rows[3].startswith("| topk_oracle@0.2 |")
    r = subprocess.run([sys.executable, "-m", "vattn", "eval", "--from-json",
                        str(tmp_path / "nope.json")], capture_output=True, text=True)
    assert r.returncode == 2 and "--from-json" in r.stderr
    r = subprocess.run([sys.executable, "-m", "vattn", "eval", "--model", MODEL,
                        "--vattention-topk", "2"], capture_output=True, text=True)
    assert r.returncode == 2 and "--vattention-topk" in r.stderr
