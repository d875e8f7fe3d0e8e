"""
The GPU check: the project's main path, run for real on one GPU, failing loudly. One
command, made to finish in under 8 minutes on one H100 or H200 (GPU.md):

    python tests/device_check.py --wheels wheels/    # an offline GPU machine: what is missing comes from wheels/
    python tests/device_check.py --device cpu        # the same parts at small shapes on a CPU (split attention,
                                                     # float32; no flex kernel, no CUDA tests)

Each part runs in its own processes. A crash, a parity miss, an out-of-memory or a
non-finite loss fails the part; the check goes on with the next and at the end exits 1
naming every failed part (0 when all passed). Logs: <work>/logs/<part>.log.

  environment  the versions found against requirements.txt's floors; packages that are
               missing or too old are installed from --wheels (pip --no-index --target)
  train        deepspeed --num_gpus 1 train.py with ZeRO-3 (every tensor partitioned), bf16,
               --gradient_checkpointing and flex, on a random-initialised bf16 safetensors
               Llama written on the spot (head dim 128, GQA 8/2, 4 layers, the tiny byte
               tokenizer; nothing downloaded), 4 steps over rows of 280-410 tokens (two
               128-token flex buckets), a checkpoint at step 2; then the exported adapter is
               read back: non-empty, finite, LoRA B moved off zero; the losses finite
  evaluate     evaluate.py with that adapter on the GPU: NIAH (generation) and perplexity
  parity       bench.py --device_check: packed flex vs unpacked SDPA in bf16 at the paper's
               sample shape (16 x 512 context, 32-token question, 3 x 256 responses) with
               Llama-3-8B's width, heads and vocabulary (4 layers), each against a float32
               unpacked SDPA reference, tolerances asserted; step time and peak memory of
               both layouts
  cuda tests   pytest -k cuda: the tests the CPU suite skips (flex forward and backward with
               the Triton kernel against the unpacked layout); none may skip here
"""

import argparse
import glob
import importlib
import importlib.metadata as md
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
p.add_argument("--wheels", default=None, help="folder of wheels for packages missing here (deepspeed, ...)")
p.add_argument("--work", default="/tmp/logo_device_check", help="scratch folder (deleted first)")
p.add_argument("--logs", default=None, help="where the part logs and summary.json go (default <work>/logs)")
p.add_argument("--parts", default=None, help="comma-separated subset of the parts (default: all; "
               "evaluate needs train's adapter)")
args = p.parse_args()
GPU = args.device == "cuda"
shutil.rmtree(args.work, ignore_errors=True)
LOGS = args.logs or os.path.join(args.work, "logs")
os.makedirs(LOGS, exist_ok=True)
ENV = dict(os.environ, PYTHONUNBUFFERED="1")
for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(k, None)                                 # a launcher's leftovers would confuse train.py
summary = {"device": args.device}


class Failed(Exception):
    pass


def run(part, cmd, timeout):
    """Run cmd from the repo root; its output goes to <logs>/<part>.log. Raises Failed
    (with the log's tail) on a non-zero exit or a timeout; returns the output."""
    log = os.path.join(LOGS, re.sub(r"\W+", "_", part) + ".log")
    t0 = time.time()
    with open(log, "a") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        try:
            r = subprocess.run(list(map(str, cmd)), cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT,
                               timeout=timeout)
            rc = r.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    out = open(log).read()
    print(f"  {' '.join(map(str, cmd[:4]))} ... : exit {rc} in {time.time() - t0:.0f} s", flush=True)
    if rc != 0:
        raise Failed(f"exit {rc} ({log}):\n" + "\n".join(out.splitlines()[-40:]))
    return out


# ----------------------------------------------------------------------------------------
# Parts.

def floors():
    """requirements.txt -> {distribution: minimum version}."""
    out = {}
    for line in open(os.path.join(ROOT, "requirements.txt")):
        m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][^\s#]*)", line)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def installed(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def environment():
    from packaging.version import Version
    need = floors()
    not_needed = {"spacy", "gguf"}                   # prepare.py's; not used by this check
    low = lambda n: installed(n) is None or Version(installed(n)) < Version(need[n])
    if args.wheels:
        site = os.path.join(args.work, "site")
        take = []
        for w in sorted(glob.glob(os.path.join(args.wheels, "*.whl"))):
            dist, version = os.path.basename(w).split("-")[:2]   # name-version-...whl
            have = installed(dist.lower().replace("_", "-"))
            if have is None or Version(have) < Version(version):  # missing, or older than given
                take.append(w)
        if take:
            run("environment", [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                "--no-compile", "--target", site, *take], 300)
            sys.path.insert(0, site)
            ENV["PYTHONPATH"] = os.pathsep.join([site] + [x for x in [ENV.get("PYTHONPATH")] if x])
            importlib.invalidate_caches()
            print(f"  installed from {args.wheels}: {', '.join(os.path.basename(w) for w in take)}")
    versions = {n: installed(n) for n in need}
    summary["versions"] = versions
    print("  " + ", ".join(f"{n} {v}" for n, v in versions.items()))
    bad = [f"{n} {versions[n] or 'missing'} (needs >= {need[n]})" for n in need if n not in not_needed and low(n)]
    import torch
    if GPU:
        if not torch.cuda.is_available():
            bad.append("torch sees no CUDA device")
        else:
            summary["gpu"] = torch.cuda.get_device_name(0)
            print(f"  {summary['gpu']}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    if bad:
        raise Failed("; ".join(bad) + (" (pass --wheels with them)" if not args.wheels else ""))


def write_model(path):
    """A random-initialised Llama in bf16 safetensors + the tiny byte tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    import models
    tok = models.tiny_tokenizer()
    width = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=8, num_key_value_heads=2,
                 num_hidden_layers=4) if GPU else \
        dict(hidden_size=256, intermediate_size=512, num_attention_heads=2, num_key_value_heads=1,
             num_hidden_layers=2)
    config = LlamaConfig(vocab_size=len(tok), head_dim=128, max_position_embeddings=4096, rope_theta=1e4,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=4, pad_token_id=2,
                         architectures=["LlamaForCausalLM"], **width)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16 if GPU else torch.float32).save_pretrained(path)
    tok.save_pretrained(path)
    return config


def train():
    import torch
    from safetensors.torch import load_file
    from train_helpers import write_tiny_data
    model, data, out = (os.path.join(args.work, d) for d in ("model", "data", "run"))
    config = write_model(model)
    write_tiny_data(data, rows=8, num_rejected=2, target_len=4096, prefix_lens=(250, 360))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "train.py",
           "--model", model, "--data_dir", data, "--out_dir", out, "--zero_stage", "3",
           "--zero3_persistence_threshold", "0", "--gradient_checkpointing", "--max_steps", "4",
           "--global_batch", "2", "--micro_batch", "1", "--lr", "1e-3", "--warmup_steps", "1",
           "--save_every", "2"]
    cmd += ["--dtype", "bfloat16", "--attention", "flex"] if GPU else ["--dtype", "float32", "--attention", "split"]
    run("train", cmd, 420)
    recs = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    summary["train_steps"] = [{k: r[k] for k in ("step", "loss", "reward_margin", "seconds_per_step")} for r in recs]
    print(f"  {config.num_hidden_layers} layers, head dim {config.head_dim}, GQA "
          f"{config.num_attention_heads}/{config.num_key_value_heads}; losses "
          f"{[r['loss'] for r in recs]}, s/step {[round(r['seconds_per_step'], 1) for r in recs]}")
    if len(recs) != 4 or any(r["skipped"] or r["loss"] is None or not math.isfinite(r["loss"]) for r in recs):
        raise Failed(f"expected 4 steps with finite losses, got {[(r['step'], r['loss']) for r in recs]}")
    if not os.path.isdir(os.path.join(out, "checkpoints", "step_000002")):
        raise Failed("no checkpoint at step 2")
    adapter = load_file(os.path.join(out, "final", "adapter_model.safetensors"))
    b = [t for n, t in adapter.items() if "lora_B" in n]
    # q, k, v, o per layer + embed_tokens, each an A and a B matrix
    expected = 2 * (4 * config.num_hidden_layers + 1)
    if len(adapter) != expected or any(t.numel() == 0 or not torch.isfinite(t).all() for t in adapter.values()):
        raise Failed(f"adapter holds {len(adapter)} tensors (expected {expected}), "
                     f"{sum(t.numel() == 0 for t in adapter.values())} empty")
    if not all(t.float().norm() > 0 for t in b):
        raise Failed("some LoRA B matrices are still zero after 4 steps")
    check = json.load(open(os.path.join(out, "final", "logo_config.json")))["check_logps"]["logps"]
    if not all(math.isfinite(x) for row in check for x in row):
        raise Failed(f"non-finite check log-probs {check}")
    summary["adapter_tensors"] = len(adapter)


def evaluate():
    model, adapter, out = (os.path.join(args.work, d) for d in ("model", "run/final", "eval"))
    base = [sys.executable, "evaluate.py", "--model", model, "--adapter", adapter, "--out_dir", out,
            "--device", args.device]
    run("evaluate", base + ["--task", "niah", "--lengths", "300,600", "--depths", "0,100",
                            "--max_new_tokens", "8"], 300)
    run("evaluate", base + ["--task", "ppl", "--lengths", "64,128", "--max_tokens", "256"], 300)
    for task in ("niah", "ppl"):
        res = json.load(open(os.path.join(out, f"{task}.json")))["results"]
        summary[f"evaluate_{task}"] = res
        if not re.search(r"\d", json.dumps(res)) or "NaN" in json.dumps(res):
            raise Failed(f"{task}: no finite results: {json.dumps(res)[:300]}")


def parity():
    out = run("parity", [sys.executable, "bench.py", "--device_check", "--device", args.device], 420)
    summary["parity"] = [line for line in out.splitlines() if re.search(
        r"unpacked|packed|float32|bfloat16|FLOPs|peak GPU|timed steps|benchmark", line)]
    print("\n".join("  " + line for line in summary["parity"]))


def cuda_tests():
    if not GPU:
        summary["cuda_tests"] = "not run (no GPU)"
        return print("  not run (no GPU)")
    out = run("cuda tests", [sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_model_patch.py",
                             "tests/test_flex_training.py", "-k", "cuda"], 300)
    summary["cuda_tests"] = out.strip().splitlines()[-1]
    if "skipped" in out or " passed" not in out:
        raise Failed(f"a CUDA test skipped or none ran: {summary['cuda_tests']}")


PARTS = {"environment": environment, "train": train, "evaluate": evaluate, "parity": parity,
         "cuda tests": cuda_tests}

failed = {}
t_all = time.time()
chosen = ["environment"] + [x for x in (args.parts or ",".join(PARTS)).split(",") if x and x != "environment"]
unknown = [x for x in chosen if x not in PARTS]
if unknown:
    sys.exit(f"error: unknown part(s) {unknown}; the parts are {', '.join(PARTS)}")
for name, fn in ((n, PARTS[n]) for n in PARTS if n in chosen):
    if name == "evaluate" and "train" in failed:
        failed[name] = "not run: it needs train's adapter"
        continue
    print(f"[{name}]", flush=True)
    t0 = time.time()
    try:
        fn()
        print(f"[{name}] passed in {time.time() - t0:.0f} s", flush=True)
    except Exception as e:              # Failed, or a bug of this script: reported, never swallowed
        failed[name] = str(e) if isinstance(e, Failed) else f"{type(e).__name__}: {e}"
        print(f"[{name}] FAILED after {time.time() - t0:.0f} s: {failed[name]}", flush=True)
    if name == "environment" and failed:
        break                           # nothing else can run without the packages
summary.update(failed=failed, seconds=round(time.time() - t_all))
with open(os.path.join(LOGS, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1, default=str)
if failed:
    sys.exit(f"DEVICE CHECK FAILED: {', '.join(failed)} ({time.time() - t_all:.0f} s; logs in {LOGS})")
print(f"DEVICE CHECK PASSED: {', '.join(n for n in PARTS if n in chosen)} ({time.time() - t_all:.0f} s on {summary.get('gpu', args.device)})")
