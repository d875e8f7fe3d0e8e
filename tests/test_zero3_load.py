"""
models.load_model(zero3=...): the partitioned ZeRO-3 load holds only its share of every
weight on each process, and that share is the checkpoint's. The test launches this file
under the deepspeed launcher on 3 CPU processes (3 so that sizes which do not divide are
padded); each process checks its partitions against the plain whole-model load and writes
what it found to a JSON file the test reads.

    python -m pytest -q tests/test_zero3_load.py          # ~70 s on a shared 2-core CPU
"""

import argparse
import json
import math
import os
import shutil
import sys

import pytest
import torch

import models
from train_helpers import ROOT, run_script

WORLD = 3


def small_config():
    """Tied embeddings (SmolLM2's layout), sizes that 3 does not divide: 40 (norms), 50 x 40 (MLP)."""
    return models.tiny_config(len(models.tiny_tokenizer()), hidden_size=40, intermediate_size=50,
                              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from transformers import LlamaForCausalLM
    out = tmp_path_factory.mktemp("small_tied")
    torch.manual_seed(0)
    LlamaForCausalLM(small_config()).save_pretrained(out)        # float32 safetensors
    return str(out)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])      # read in place; converted on read
def test_each_process_holds_only_its_share_of_every_weight_and_that_share_is_the_checkpoints(
        folder, tmp_path, dtype):
    exe = shutil.which("deepspeed")
    launcher = ([exe] if exe else [sys.executable, "-m", "deepspeed.launcher.runner"]) + ["--num_gpus", str(WORLD)]
    r = run_script("tests/test_zero3_load.py", "--folder", folder, "--dtype", dtype, "--out", tmp_path,
                   launcher=launcher, env={"PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])})
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    reports = [json.load(open(tmp_path / f"rank{k}.json")) for k in range(WORLD)]
    whole = models.load_model(folder, dtype=getattr(torch, dtype))
    named = dict(whole.named_parameters())
    assert "lm_head.weight" not in named                        # tied: one tensor, read once
    for k, rep in enumerate(reports):
        assert rep["names"] == list(named), k
        for name, p in named.items():
            share = math.ceil(p.numel() / WORLD)
            assert rep["held"][name] == share, (k, name)        # the share, padded at the end
            assert rep["full"][name] == 0, (k, name)            # no whole copy left behind
            assert rep["slice_diff"][name] == 0, (k, name)      # its slice of the checkpoint, exactly
            assert rep["gathered_diff"][name] == 0, (k, name)   # gathered = the plain load
        assert rep["dtypes"] == [dtype]
        assert rep["inv_freq_diff"] == 0 and rep["inv_freq_dtype"] == "torch.float32"  # RoPE table as plain
        assert rep["lm_head_is_embed"] is True
    padded = {n: math.ceil(p.numel() / WORLD) * WORLD != p.numel() for n, p in named.items()}
    assert padded["model.norm.weight"] and padded["model.layers.0.mlp.up_proj.weight"]   # the padding is tested


def worker(args):
    """One process under the launcher: load partitioned, compare with the plain load."""
    from train import import_deepspeed          # set up as train.py does (no shm op on CPU)
    deepspeed = import_deepspeed()
    deepspeed.init_distributed()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dtype = getattr(torch, args.dtype)
    ds = {"train_batch_size": world, "zero_optimization": {"stage": 3},
          "bf16": {"enabled": args.dtype == "bfloat16"}}
    model = models.load_model(args.folder, dtype=dtype, zero3=ds)
    whole = models.load_model(args.folder, dtype=dtype)
    ref = dict(whole.named_parameters())
    named = list(model.named_parameters())
    rep = dict(names=[n for n, _ in named], held={}, full={}, slice_diff={}, gathered_diff={},
               dtypes=sorted({str(p.ds_tensor.dtype).removeprefix("torch.") for _, p in named}))
    for name, p in named:
        rep["held"][name], rep["full"][name] = p.ds_tensor.numel(), p.data.numel()
        flat = ref[name].detach().reshape(-1)
        share = p.ds_tensor.numel()
        mine = flat[rank * share:(rank + 1) * share]
        rep["slice_diff"][name] = float((p.ds_tensor[:mine.numel()].float() - mine.float()).abs().max())
        with deepspeed.zero.GatheredParameters([p]):
            rep["gathered_diff"][name] = float((p.data.float() - ref[name].float()).abs().max())
    inv, inv_ref = model.model.rotary_emb.inv_freq, whole.model.rotary_emb.inv_freq
    rep.update(inv_freq_diff=float((inv - inv_ref).abs().max()), inv_freq_dtype=str(inv.dtype),
               lm_head_is_embed=model.lm_head.weight is model.model.embed_tokens.weight)
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(rep, f)
    # A rank can abort at interpreter shutdown ("terminate called without an active
    # exception", return code -6; in 2 of 5 fresh-clone CI runs on 2 cores, with or without
    # destroy_process_group): the report is on disk, so leave without the C++ teardown
    torch.distributed.destroy_process_group()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="one process of the test above")
    p.add_argument("--folder", required=True, help="a model folder (safetensors)")
    p.add_argument("--dtype", default="float32", help="the model's dtype")
    p.add_argument("--out", required=True, help="folder for rank<k>.json")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    worker(p.parse_args())
