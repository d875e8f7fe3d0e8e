"""
tests/device_check.py, the GPU check, run at its CPU shapes: it passes on working code, and
it fails loudly, naming each part, when the code is broken. The faults are planted through
a sitecustomize.py that every Python process of the check imports at start (train.py under
the DeepSpeed launcher, bench.py's layout processes): the loss goes NaN, and the packed
attention lets a response see the others.

    python -m pytest -q tests/test_device_check.py     # ~3 min on a 2-core CPU
"""

import json
import os
import subprocess
import sys

from train_helpers import ROOT

FAULTS = '''
import os, sys
sys.path.insert(0, {root!r})
import loss, model_patch

_logo_loss = loss.logo_loss
def logo_loss(*a, **k):                       # every loss NaN: train.py stops after 3 such steps
    value, metrics = _logo_loss(*a, **k)
    return value * float("nan"), metrics
loss.logo_loss = logo_loss

_split = model_patch.split_attention
def split_attention(query, key, value, layout, scaling, dropout=0.0):
    layout.resp_masks = [m.clamp(min=0) for m in layout.resp_masks]   # every response sees all
    return _split(query, key, value, layout, scaling, dropout)
model_patch.split_attention = split_attention
'''


def check(tmp_path, env=None):
    r = subprocess.run([sys.executable, "tests/device_check.py", "--device", "cpu", "--work", str(tmp_path / "w"),
                        "--logs", str(tmp_path / "logs")], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, **(env or {})), timeout=900)
    return r, json.loads((tmp_path / "logs" / "summary.json").read_text())


def test_the_device_check_passes_on_working_code(tmp_path):
    r, summary = check(tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "DEVICE CHECK PASSED: environment, train, evaluate, parity, cuda tests" in r.stdout
    assert summary["failed"] == {} and len(summary["train_steps"]) == 4
    assert any("float32: max |packed (split) - unpacked (SDPA)|" in line for line in summary["parity"])


def test_the_device_check_fails_loudly_and_names_each_broken_part(tmp_path):
    (tmp_path / "faults").mkdir()
    (tmp_path / "faults" / "sitecustomize.py").write_text(FAULTS.format(root=ROOT))
    r, summary = check(tmp_path, {"PYTHONPATH": str(tmp_path / "faults")})
    assert r.returncode == 1, (r.stdout + r.stderr)[-4000:]
    assert "DEVICE CHECK FAILED: train, evaluate, parity" in r.stderr
    assert set(summary["failed"]) == {"train", "evaluate", "parity"}
    assert "non-finite for 3 steps" in summary["failed"]["train"]
    assert "float32 packed vs unpacked" in summary["failed"]["parity"]
