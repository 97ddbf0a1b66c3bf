"""train/train.py: a suspended and resumed run equals an uninterrupted one (CPU, tiny model)."""

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors.torch")

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
TRAIN = os.path.join(ROOT, "train", "train.py")
ARGS = ["--small", "--steps", "4", "--batch", "2", "--length", "512", "--warmup", "2",
        "--workers", "1"]


def _train(out, *extra):
    return subprocess.run([sys.executable, TRAIN, "--out", out, *ARGS, *extra],
                          capture_output=True, text=True, timeout=600)


def test_resume_equals_an_uninterrupted_run(tmp_path):
    whole = _train(str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    ckpt = str(tmp_path / "state.pt")
    # a time limit of zero suspends after the first step, with exit status 3
    first = _train(str(tmp_path / "parts"), "--checkpoint", ckpt, "--max-minutes", "1e-9")
    assert first.returncode == 3, first.stderr
    assert "suspending after step 0" in first.stdout
    assert not os.path.exists(tmp_path / "parts" / "model.safetensors")
    rest = _train(str(tmp_path / "parts"), "--checkpoint", ckpt, "--resume")
    assert rest.returncode == 0, rest.stderr
    assert "resuming at step 1" in rest.stdout

    a = safetensors.load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = safetensors.load_file(str(tmp_path / "parts" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    log_a = json.load(open(tmp_path / "whole" / "train_log.json"))
    log_b = json.load(open(tmp_path / "parts" / "train_log.json"))
    assert [r["text_loss"] for r in log_a["curve"]] == [r["text_loss"] for r in log_b["curve"]]
    assert log_b["steps_done"] == 4 and len(log_b["sessions"]) == 2
