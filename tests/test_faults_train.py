"""train.py: bad input and faults end in one `error:` line (exit status 2,
no traceback, nothing half-written), and a killed run resumes to the same losses."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from train_helpers import ROOT, baseline, nan_at_steps, read_log, run_train, write_tiny_data

TOL = 1e-5


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    return baseline(tmp_path_factory)


@pytest.fixture
def data(tmp_path):
    d = tmp_path / "data"
    write_tiny_data(str(d), rows=4)
    return d


def edit_meta(data_dir, **changes):
    path = os.path.join(data_dir, "meta.json")
    meta = json.load(open(path))
    meta.update(changes)
    json.dump(meta, open(path, "w"))


def assert_user_error(r, *patterns):
    """Exit status 2, one `error:` line on stderr matching every pattern, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr[-3000:]
    for p in patterns:
        assert re.search(p, errors[0]), (p, errors[0])
    return errors[0]


def leftovers(out_dir):
    """Anything half-written: temporary names, or an adapter from a run that failed."""
    found = []
    for root, dirs, files in os.walk(out_dir):
        found += [os.path.join(root, n) for n in dirs + files if ".tmp" in n or ".old" in n]
    return found


def test_a_data_folder_that_does_not_exist_names_the_prepare_command(tmp_path):
    r = run_train("--model", "tiny", "--data_dir", tmp_path / "nope", "--out_dir", tmp_path / "run")
    assert_user_error(r, r"data folder .*nope does not exist",
                      r"python prepare\.py --model tiny --out_dir .*nope")
    assert not (tmp_path / "run").exists()


def test_a_model_that_cannot_be_loaded_is_a_user_error(data, tmp_path):
    # a hub id that is not in the cache (offline): the same path as a missing demo package
    r = run_train("--model", "nobody/no-such-model", "--data_dir", data, "--out_dir", tmp_path / "run",
                  env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert_user_error(r, r"cannot load nobody/no-such-model", r"local model folder")
    assert not (tmp_path / "run").exists()


def test_an_architecture_the_packed_forward_is_not_tested_for_is_refused_before_loading(data, tmp_path):
    from transformers import Gemma2Config
    from models import tiny_tokenizer
    folder = tmp_path / "gemma2"
    Gemma2Config(vocab_size=261, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 architectures=["Gemma2ForCausalLM"]).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    r = run_train("--model", folder, "--data_dir", data, "--out_dir", tmp_path / "run")
    assert_user_error(r, r"is a Gemma2ForCausalLM: packed log-probs are tested for LlamaForCausalLM, "
                         r"MistralForCausalLM only")
    assert not (tmp_path / "run").exists()


def test_a_data_folder_without_meta_or_shards_names_the_prepare_command(data, tmp_path):
    for f in os.listdir(data):
        if f.startswith("shard_"):
            os.remove(data / f)
    r = run_train("--model", "tiny", "--data_dir", data, "--out_dir", tmp_path / "run")
    assert_user_error(r, r"no shards in .*data", r"python prepare\.py --model tiny")
    os.remove(data / "meta.json")
    r = run_train("--model", "tiny", "--data_dir", data, "--out_dir", tmp_path / "run")
    assert_user_error(r, r"meta\.json is missing", r"python prepare\.py --model tiny")
    assert not (tmp_path / "run").exists()


def test_shards_from_another_tokenizer_are_refused_with_both_fingerprints(data, tmp_path):
    edit_meta(data, tokenizer_fingerprint="0123456789abcdef", model="smollm2-135m")
    r = run_train("--model", "tiny", "--data_dir", data, "--out_dir", tmp_path / "run")
    assert_user_error(r, r"tokenized for smollm2-135m", "0123456789abcdef",
                      r"meta\.json\)", r"python prepare\.py --model tiny")


def test_shards_in_another_format_version_are_refused(data, tmp_path):
    edit_meta(data, format_version=2)
    r = run_train("--model", "tiny", "--data_dir", data, "--out_dir", tmp_path / "run")
    assert_user_error(r, r"format version 2.*reads version 1", r"python prepare\.py")


def test_a_damaged_shard_is_named(data, tmp_path):
    path = data / "shard_00000.safetensors"
    blob = path.read_bytes()
    path.write_bytes(blob[:len(blob) // 2])                   # a truncated copy
    r = run_train("--model", "tiny", "--data_dir", data, "--out_dir", tmp_path / "run")
    assert_user_error(r, r"shard_00000\.safetensors", r"python prepare\.py")


def test_a_target_length_beyond_the_rope_window_stops_and_the_suggested_rope_theta_works(data, tmp_path):
    # tiny: native window 4096, rope_theta 1e4, head dim 16. Data claiming K = 8192 needs the
    # RoPE base raised by 2^(16/14): rope_theta >= 1e4 * 2^(8/7) = 22,082.
    edit_meta(data, target_len=8192)
    r = run_train("--model", "tiny", "--data_dir", data, "--out_dir", tmp_path / "run")
    line = assert_user_error(r, r"target_len 8192", r"cover 4096", r"--rope_theta 2\.21e\+04")
    theta = float(re.search(r"--rope_theta (\S+)", line).group(1))
    assert theta == pytest.approx(1e4 * 2 ** (16 / 14), rel=1e-3)
    r = run_train("--model", "tiny", "--data_dir", data, "--out_dir", tmp_path / "run",
                  "--rope_theta", theta, "--max_steps", 1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.load(open(tmp_path / "run" / "final" / "logo_config.json"))["rope_theta"] == theta
    # beyond the paper's 8x no rope_theta will do
    edit_meta(data, target_len=4096 * 8 + 1)
    r = run_train("--model", "tiny", "--data_dir", data, "--out_dir", tmp_path / "run2", "--rope_theta", 1e9)
    assert_user_error(r, r"at most 8x", r"--target_len 32768")


def test_a_non_finite_loss_skips_that_step_counts_it_and_training_goes_on(base_run, tmp_path):
    data, out = base_run
    run = tmp_path / "run"
    r = run_train("--model", "tiny", "--data_dir", data, "--out_dir", run, env=nan_at_steps(tmp_path, [3]))
    assert r.returncode == 0, r.stderr[-3000:]
    log, ref = read_log(run), read_log(out)
    assert log[2]["skipped"] is True and log[2]["loss"] is None
    assert [g["nonfinite_steps"] for g in log] == [0, 0] + [1] * 18
    assert [g["loss"] for g in log[:2]] == pytest.approx([x["loss"] for x in ref[:2]], abs=TOL)
    # Step 3 was dropped whole: no update and untouched AdamW moments. Had NaN gradients
    # reached the weights, every later loss would be NaN; had the step been applied with
    # only some micro-batches, step 4 would not match a model that skipped step 3.
    assert all(g["loss"] is not None for g in log[3:])
    assert log[-1]["loss"] < log[0]["loss"] - 0.3
    assert "; 1 non-finite steps skipped" in r.stdout
    assert (run / "final" / "adapter_model.safetensors").exists()


def test_non_finite_losses_in_a_row_stop_the_run_with_a_clear_message(base_run, tmp_path):
    data, _ = base_run
    run = tmp_path / "run"
    r = run_train("--model", "tiny", "--data_dir", data, "--out_dir", run, env=nan_at_steps(tmp_path, [2, 3, 4]))
    assert_user_error(r, r"non-finite for 3 steps in a row \(steps 2-4", r"log\.jsonl", r"lower --lr")
    assert [g["skipped"] for g in read_log(run)] == [False, True, True, True]
    assert not (run / "final").exists() and not leftovers(run)


def test_a_run_killed_with_sigkill_resumes_to_the_same_losses(base_run, tmp_path):
    data, out = base_run
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--model", "tiny",
                          "--data_dir", data, "--out_dir", str(run), "--save_every", "5"],
                         cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = run / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:        # kill once step 6 is logged
        if log.exists() and sum(1 for _ in open(log)) >= 6:
            break
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    assert not (run / "final").exists()                       # it really died mid-run
    # What a kill in the middle of writing a checkpoint leaves behind: a .tmp folder.
    os.makedirs(run / "checkpoints" / ".tmp_step_000015" / "step_000015")
    (run / "checkpoints" / ".tmp_step_000015" / "step_000015" / "mp_rank_00_model_states.pt").write_bytes(b"half")
    r = run_train("--model", "tiny", "--data_dir", data, "--out_dir", run, "--save_every", 5, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    resumed_at = int(re.search(r"resumed from .*step_(\d+) at step", r.stdout).group(1))
    assert 5 <= resumed_at < 20
    got, ref = read_log(run), read_log(out)
    assert [g["step"] for g in got] == list(range(1, 21))     # torn and replayed lines dropped
    assert [g["loss"] for g in got] == pytest.approx([x["loss"] for x in ref], abs=TOL)
    assert not leftovers(run)


def test_a_checkpoint_holding_pickled_objects_is_refused(base_run, tmp_path):
    _, out = base_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    path = run / "checkpoints" / "step_000020" / "mp_rank_00_model_states.pt"
    sd = torch.load(path, weights_only=True)
    sd["extra"] = subprocess.CompletedProcess(["x"], 0)       # any class beyond tensors
    torch.save(sd, path)
    data = json.load(open(run / "run_config.json"))["data_dir"]
    r = run_train("--model", "tiny", "--data_dir", data, "--out_dir", run, "--save_every", 10,
                  "--resume", "--max_steps", 21)
    assert_user_error(r, r"refusing to unpickle \S*CompletedProcess", r"mp_rank_00_model_states\.pt")


def test_an_existing_run_is_never_overwritten_and_resume_needs_a_checkpoint(base_run, tmp_path):
    data, out = base_run
    r = run_train("--model", "tiny", "--data_dir", data, "--out_dir", out)
    assert_user_error(r, r"already holds a run", r"--resume", r"--overwrite")
    r = run_train("--model", "tiny", "--data_dir", data, "--out_dir", out, "--resume", "--lr", 0.5)
    assert_user_error(r, r"settings that differ", r"lr 0\.001 -> 0\.5")
    r = run_train("--model", "tiny", "--data_dir", data, "--out_dir", tmp_path / "empty", "--resume")
    assert_user_error(r, r"no finished checkpoint", r"--overwrite")


def test_an_unknown_model_is_refused_with_the_presets_named(tmp_path):
    r = run_train("--model", "no-such-preset", "--print_ds_config")
    assert_user_error(r, r"unknown model 'no-such-preset'", r"--model")
