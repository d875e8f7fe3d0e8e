"""train.py end to end on the tiny preset, one process on CPU.

Every run here is compared with one uninterrupted 20-step ZeRO-0 run (train_helpers.baseline)
or with an independent computation: plain per-response forward passes and the loss formula
written out below, never train.py's own code path."""

import json
import math
import os
import shutil
import sys

import pytest
import torch

import models
from train_helpers import baseline, read_log, read_rows, reference_logps, run_train

TOL = 1e-5


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    return baseline(tmp_path_factory)


def logo_reference(logps, beta, gamma, sft_weight):
    """Eq. 2 + lambda * NLL for one row of (1+M,) mean log-probs, in plain Python."""
    c, rejected = float(logps[0]), [float(x) for x in logps[1:]]
    z = beta * c - beta * sum(rejected) / len(rejected) - gamma
    logo = math.log1p(math.exp(-z))
    return logo + sft_weight * -c, logo


def test_twenty_steps_on_a_small_set_drive_the_loss_down_and_reward_accuracy_up(base_run):
    log = read_log(base_run[1])
    assert [r["step"] for r in log] == list(range(1, 21))
    for r in log:                                   # every field of the log line, finite
        for k in ("loss", "logo", "sft", "reward_chosen", "reward_rejected", "reward_margin",
                  "reward_accuracy", "lr", "tokens_per_s", "seconds_per_step", "grad_norm"):
            assert r[k] is not None and math.isfinite(r[k]), (r["step"], k)
        assert r["skipped"] is False and len(r["rows"]) == 2
    first, last = log[:5], log[-5:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)
    assert mean(last, "loss") < mean(first, "loss") - 0.3          # 1.53 -> 0.90 when written
    assert mean(log[:3], "reward_accuracy") <= 0.5 < 0.9 <= mean(last, "reward_accuracy")  # 0.5 -> 1.0
    assert mean(last, "reward_margin") > mean(first, "reward_margin") + 0.5
    # the schedule: linear warmup over 2 steps to lr 1e-3, cosine down to 1e-4 at step 20
    assert log[0]["lr"] == pytest.approx(5e-4) and log[1]["lr"] == pytest.approx(1e-3)
    assert log[-1]["lr"] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 17 / 18)))


def test_the_first_step_loss_equals_the_loss_computed_by_hand_from_plain_forward_passes(base_run):
    # At step 1 LoRA's B matrices are zero, so the model is the base model.
    data, out = base_run
    step1 = read_log(out)[0]
    cfg = json.load(open(os.path.join(out, "run_config.json")))
    model = models.load_model("tiny").eval()
    losses, logos = [], []
    for ids, pos, seg in read_rows(data, step1["rows"]):
        loss, logo = logo_reference(reference_logps(model, ids, pos, seg), cfg["beta"], cfg["gamma"],
                                    cfg["sft_weight"])
        losses.append(loss)
        logos.append(logo)
    assert step1["loss"] == pytest.approx(sum(losses) / 2, abs=TOL)
    assert step1["logo"] == pytest.approx(sum(logos) / 2, abs=TOL)


def test_the_exported_adapter_loads_with_peft_and_reproduces_the_trained_log_probs(base_run):
    from peft import PeftModel
    from safetensors.torch import load_file
    data, out = base_run
    final = os.path.join(out, "final")
    assert {"adapter_model.safetensors", "adapter_config.json", "logo_config.json",
            "tokenizer.json"} <= set(os.listdir(final))
    weights = load_file(os.path.join(final, "adapter_model.safetensors"))
    assert any("embed_tokens.lora_embedding" in k for k in weights)     # LoRA on the embeddings too
    assert all(weights[k].abs().max() > 0 for k in weights if "lora_B" in k)   # trained, not empty
    cfg = json.load(open(os.path.join(final, "logo_config.json")))
    for k in ("model", "model_path", "rope_theta", "target_len", "tokenizer_fingerprint", "loss",
              "beta", "gamma", "sft_weight"):
        assert k in cfg
    model = PeftModel.from_pretrained(models.load_model(cfg["model_path"]), final).eval()
    check = cfg["check_logps"]
    for (ids, pos, seg), expected in zip(read_rows(data, check["rows"]), check["logps"]):
        got = reference_logps(model, ids, pos, seg)
        assert got.tolist() == pytest.approx(expected, abs=TOL)


def test_zero_stage_3_gives_the_same_losses_and_a_full_adapter(base_run, tmp_path):
    from safetensors.torch import load_file
    data, out = base_run
    r = run_train("--model", "tiny", "--data_dir", data, "--out_dir", tmp_path / "z3",
                  "--zero_stage", 3, "--save_every", 10)
    assert r.returncode == 0, r.stderr[-3000:]
    ref, got = read_log(out), read_log(tmp_path / "z3")
    assert [g["loss"] for g in got] == pytest.approx([x["loss"] for x in ref], abs=TOL)
    # the adapter was gathered from the ZeRO-3 shards: the same tensors as the ZeRO-0 run's
    a = load_file(os.path.join(out, "final", "adapter_model.safetensors"))
    b = load_file(tmp_path / "z3" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and torch.allclose(a[k], b[k], atol=TOL), k


def test_stopping_after_step_10_and_resuming_reproduces_steps_11_to_20(base_run, tmp_path):
    data, out = base_run
    run = tmp_path / "run"
    r = run_train("--model", "tiny", "--data_dir", data, "--out_dir", run, "--save_every", 10,
                  "--stop_after", 10)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (run / "final").exists() and (run / "checkpoints" / "step_000010").is_dir()
    r = run_train("--model", "tiny", "--data_dir", data, "--out_dir", run, "--save_every", 10, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    ref, got = read_log(out), read_log(run)
    assert [g["step"] for g in got] == list(range(1, 21))
    assert [g["loss"] for g in got[10:]] == pytest.approx([x["loss"] for x in ref[10:]], abs=TOL)
    assert [g["reward_margin"] for g in got[10:]] == pytest.approx([x["reward_margin"] for x in ref[10:]], abs=TOL)


def test_micro_batches_of_two_padded_rows_give_the_same_losses_as_two_micro_batches_of_one(base_run, tmp_path):
    data, out = base_run
    r = run_train("--model", "tiny", "--data_dir", data, "--out_dir", tmp_path / "mb2",
                  "--micro_batch", 2, "--stop_after", 3)
    assert r.returncode == 0, r.stderr[-3000:]
    got, ref = read_log(tmp_path / "mb2"), read_log(out)[:3]
    assert len({len(row) for row in read_rows(data, range(8))[:2]} | {0}) > 1   # rows differ in length
    assert [g["loss"] for g in got] == pytest.approx([x["loss"] for x in ref], abs=TOL)


def test_bf16_with_deepspeed_on_cpu_trains_close_to_float32(base_run, tmp_path):
    data, out = base_run
    r = run_train("--model", "tiny", "--data_dir", data, "--out_dir", tmp_path / "bf16",
                  "--dtype", "bfloat16", "--stop_after", 3)
    assert r.returncode == 0, r.stderr[-3000:]
    got, ref = read_log(tmp_path / "bf16"), read_log(out)[:3]
    # bf16 keeps ~3 significant digits; fp32 master weights keep the steps close
    assert [g["loss"] for g in got] == pytest.approx([x["loss"] for x in ref], rel=1e-2)
    assert got[0]["loss"] != ref[0]["loss"]                                # it did run in bf16


def test_sft_loss_trains_on_the_chosen_response_only(base_run, tmp_path):
    data, out = base_run
    run = tmp_path / "sft"
    r = run_train("--model", "tiny", "--data_dir", data, "--out_dir", run, "--loss", "sft",
                  "--beta", 2.0, "--gamma", 0.6, "--stop_after", 3)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.load(open(run / "run_config.json"))
    assert cfg["gamma"] == pytest.approx(0.6) and cfg["loss"] == "sft"
    got = read_log(run)
    assert all(g["loss"] == pytest.approx(g["sft"], abs=1e-6) for g in got)
    # step 1 (base model): the mean NLL of the chosen responses; the LOGO term still logged
    model = models.load_model("tiny").eval()
    lps = [reference_logps(model, *row) for row in read_rows(data, got[0]["rows"])]
    assert got[0]["loss"] == pytest.approx(-sum(float(lp[0]) for lp in lps) / 2, abs=TOL)
    assert got[0]["logo"] == pytest.approx(sum(logo_reference(lp, 2.0, 0.6, 0)[1] for lp in lps) / 2, abs=TOL)
    # and from step 2 on the two losses move the model differently
    assert got[1]["sft"] != pytest.approx(read_log(out)[1]["sft"], abs=TOL)


def test_reference_based_training_starts_at_margin_zero_and_then_differs_from_reference_free(base_run, tmp_path):
    """--reference: step 1 scores the base model against itself (the adapter starts at zero), so
    every reward is exactly 0: logo = log(1 + e^gamma), margin 0; the SFT term is the base
    model's chosen NLL, as computed by hand. From step 2 the rewards move off zero."""
    data, out = base_run
    run = tmp_path / "ref"
    r = run_train("--model", "tiny", "--data_dir", data, "--out_dir", run, "--reference", "--stop_after", 3)
    assert r.returncode == 0, r.stderr[-3000:]
    got, free = read_log(run), read_log(out)
    cfg = json.load(open(run / "run_config.json"))
    assert cfg["reference"] is True
    assert got[0]["reward_margin"] == 0.0 and got[0]["reward_chosen"] == 0.0 and got[0]["reward_accuracy"] == 0.0
    assert got[0]["logo"] == pytest.approx(math.log1p(math.exp(cfg["gamma"])), abs=1e-6)
    model = models.load_model("tiny").eval()
    lps = [reference_logps(model, *row) for row in read_rows(data, got[0]["rows"])]
    assert got[0]["sft"] == pytest.approx(-sum(float(lp[0]) for lp in lps) / 2, abs=TOL)
    assert got[0]["sft"] == pytest.approx(free[0]["sft"], abs=TOL)   # same model, same rows
    assert got[0]["logo"] != pytest.approx(free[0]["logo"], abs=1e-3)
    assert got[2]["reward_margin"] != 0.0 and all(math.isfinite(g["loss"]) for g in got)


def launcher(procs):
    exe = shutil.which("deepspeed")
    return ([exe] if exe else [sys.executable, "-m", "deepspeed.launcher.runner"]) + ["--num_gpus", str(procs)]


def test_the_deepspeed_launcher_runs_the_same_training_on_one_process(base_run, tmp_path):
    data, out = base_run
    r = run_train("--model", "tiny", "--data_dir", data, "--out_dir", tmp_path / "ds", "--zero_stage", 0,
                  "--stop_after", 2, launcher=launcher(1))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert json.load(open(tmp_path / "ds" / "run_config.json"))["world_size"] == 1
    got, ref = read_log(tmp_path / "ds"), read_log(out)[:2]
    assert [g["loss"] for g in got] == pytest.approx([x["loss"] for x in ref], abs=TOL)
    assert [g["reward_accuracy"] for g in got] == pytest.approx([x["reward_accuracy"] for x in ref], abs=TOL)


# The tiny preset's flags, for the same model saved as a folder (what a hub id or a local
# checkpoint goes through: from_pretrained, under ZeRO-3 inside deepspeed.zero.Init).
TINY_FLAGS = ["--beta", 2.5, "--gamma", 0.5, "--lr", 1e-3, "--warmup_steps", 2, "--max_steps", 20,
              "--global_batch", 2, "--lora_r", 8, "--lora_alpha", 16, "--dtype", "float32"]
# Two processes against one: the gradients are all-reduced in another order, and 20 AdamW
# steps carry the rounding along. Measured when written (deepspeed 0.19.8, torch 2.13 CPU):
# losses within 4.2e-7, adapter weights within 2.4e-7 (ZeRO-3); the tolerance is 10x more.
DIST_TOL = 5e-6


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_folder")
    models.load_model("tiny").save_pretrained(folder)          # seed 0: the baseline's weights
    models.tiny_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("zero", [3, 2])
def test_two_processes_with_zero_and_gradient_checkpointing_train_to_the_end_like_zero_0(
        base_run, tiny_folder, tmp_path, zero):
    """ZeRO-3 for real: --zero3_persistence_threshold 0 partitions every tensor (by default
    DeepSpeed keeps tensors under 1e5 elements whole, i.e. all of the tiny model's), the
    model is built partitioned (deepspeed.zero.Init), frozen weights are gathered again in
    the non-reentrant checkpointing recompute (the crash DeepSpeed < 0.19.3 has there) and
    the LoRA weights at export. ZeRO-2 partitions gradients and optimiser state only."""
    from safetensors.torch import load_file
    data, out = base_run
    run = tmp_path / f"z{zero}"
    extra = ["--zero3_persistence_threshold", 0] if zero == 3 else []
    ext = tmp_path / "torch_extensions"   # empty, as on a fresh machine
    r = run_train("--model", tiny_folder, *TINY_FLAGS, "--data_dir", data, "--out_dir", run,
                  "--zero_stage", zero, *extra, "--gradient_checkpointing", "--save_every", 10,
                  launcher=launcher(2), env={"TORCH_EXTENSIONS_DIR": str(ext)})
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    # no g++ build of DeepSpeed's shared-memory op on CPU (train.import_deepspeed)
    assert not ext.exists() and "shm_comm_op built" not in r.stdout + r.stderr
    if zero == 3:
        assert "ZeRO-3 load: 21 tensors built partitioned; this process holds 53,728 of their 107,456" in r.stdout
        assert "ZeRO-3: 39 of 39 tensors partitioned across 2 processes" in r.stdout   # LoRA too
    cfg = json.load(open(run / "run_config.json"))
    assert cfg["world_size"] == 2 and cfg["gradient_checkpointing"] is True
    got, ref = read_log(run), read_log(out)
    assert [g["step"] for g in got] == list(range(1, 21))
    for k in ("loss", "reward_margin", "reward_accuracy"):
        assert [g[k] for g in got] == pytest.approx([x[k] for x in ref], abs=DIST_TOL), k
    assert (run / "checkpoints" / "step_000020").is_dir()
    a = load_file(os.path.join(out, "final", "adapter_model.safetensors"))
    b = load_file(run / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(b) == 18                  # lora A/B x (8 projections + embeddings)
    for k in a:
        assert b[k].shape == a[k].shape and b[k].numel() > 0, k
        assert torch.allclose(a[k], b[k], rtol=0, atol=DIST_TOL), (k, (a[k] - b[k]).abs().max())
    assert all(b[k].abs().max() > 1e-3 for k in b if "_B" in k)   # trained, not the zero init


def test_print_ds_config_shows_the_batch_split_zero_stage_and_offload():
    r = run_train("--model", "tiny", "--global_batch", 8, "--micro_batch", 2, "--zero_stage", 3,
                  "--offload_optimizer", "--dtype", "bfloat16", "--print_ds_config")
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads(r.stdout)
    assert cfg["train_batch_size"] == 8 and cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_accumulation_steps"] == 4                    # 8 / (2 x 1 process)
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["bf16"]["enabled"] is True and cfg["gradient_clipping"] == 1.0
