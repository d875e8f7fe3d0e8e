"""The whole pipeline as a user runs it, on the tiny preset: prepare.py -> train.py ->
evaluate.py, each as its own process, sharing only files on disk (the demo, shrunk to
seconds). The parts are tested in depth elsewhere; this checks that they fit together."""

import json
import math

from safetensors import safe_open

from train_helpers import ANSWERS_FINISHED, planted, run_script


def script(name, *args, env=None):
    r = run_script(name, *args, env=env)
    assert r.returncode == 0, f"{name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def test_prepare_then_train_then_evaluate_on_the_tiny_preset(tmp_path):
    data, run, ev = tmp_path / "data", tmp_path / "logo", tmp_path / "eval"   # label: run folder

    # The random tiny model never ends a sentence: its answers count as finished (train_helpers)
    script("prepare.py", "--model", "tiny", "--num_samples", 4, "--max_new_tokens", 6,
           "--seed", 0, "--threads", 1, "--out_dir", data, env=planted(tmp_path, ANSWERS_FINISHED))
    meta = json.loads((data / "meta.json").read_text())
    assert meta["complete"] and meta["counts"]["kept"] == 4
    with safe_open(str(data / "shard_00000.safetensors"), "np") as f:
        assert len(f.get_tensor("offsets")) == 4 + 1                  # 4 packed rows

    script("train.py", "--model", "tiny", "--data_dir", data, "--out_dir", run,
           "--max_steps", 3, "--save_every", 2)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in log)
    assert (run / "final" / "adapter_model.safetensors").is_file()
    assert (run / "final" / "logo_config.json").is_file()

    script("evaluate.py", "--task", "ppl", "--model", "tiny", "--adapter", run / "final",
           "--compare", "--lengths", 64, "--max_tokens", 128, "--out_dir", ev)
    res = json.loads((ev / "ppl.json").read_text())["results"]
    assert list(res) == ["base", "logo"]
    base, tuned = (res[k]["lengths"][0]["ppl"] for k in ("base", "logo"))
    assert math.isfinite(base) and math.isfinite(tuned)
    assert base != tuned                                   # the adapter is loaded and not empty
