"""
Benchmark of LOGO's packing: one LoRA training step (forward + backward) on LOGO-shaped
samples, packed (model_patch.response_logps: the shared context once, logits only where a
response token is predicted) against the authors' layout (response_logps_unpacked: M+1 rows
of context + response, full-vocabulary logits for every token). A sample: N chunks x C
tokens of context, a Q-token question, M+1 responses of R tokens, positions synthesized over
the preset's window. Token ids are random: speed and memory do not depend on the text.

    python bench.py                        # SmolLM2-135M, 16 x 128, R=64, M=2 (float32 on CPU)
    python bench.py --chunk_len 512        # the paper's context shape, 16 x 512
    python bench.py --model tiny           # seconds: a random 2-layer model
    python bench.py --device_check         # one GPU: Llama-3-8B's width, heads and vocabulary,
                                           # 4 random layers, the paper's shape; exit 1 on a crash,
                                           # an OOM or a parity miss (tests/device_check.py)

dtype: bfloat16 on CUDA, float32 on CPU (a CPU without native bf16, like an AVX2 EPYC, runs a
bf16 step many times slower). Each layout runs in its own process (--variant), the layouts
taking turns step by step, so that other work on a shared machine slows both alike.
  step time    median of --steps steps after --warmup ones (min-max: check the spread); on CPU
               also the process CPU time (all threads).
  step memory  peak resident set during the steps minus the resident set once loaded (VmHWM,
               reset through /proc/self/clear_refs; Linux), freed memory returned between steps
               (malloc_trim). CUDA: max_memory_allocated minus memory_allocated.
  FLOP bound   (M+1)(k+r) / (k+(M+1)r), k = N*C+Q, r = R: the ratio of tokens through the
               layers, what packing saves outside attention.
  log-probs    max |difference| of the (B, 1+M) mean response log-probs of the two layouts,
               and of each against a float32 unpacked forward (in bf16: the bf16 noise).
"""

import argparse
import ctypes
import gc
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
import warnings

import torch

import model_patch
import models
from loss import logo_loss
from positions import pack_position_ids, synthesize_position_ids

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
a = parser.add_argument
# model
a("--model", default="smollm2-135m", help="preset: smollm2-135m (the CPU demo) or tiny")
a("--random_model", choices=["llama3-8b"], default=None, help="instead of --model: random "
  "weights in this model's width, heads and vocabulary, --num_layers layers (no download)")
a("--num_layers", type=int, default=4, help="layers of --random_model")
a("--hidden_size", type=int, default=None, help="width of --random_model (default its own)")
a("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
a("--device_check", action="store_true", help="the GPU check's parity part: --random_model "
  "llama3-8b, paper shape, flex vs SDPA against float32 (--device cpu: small shapes)")
a("--dtype", default=None, choices=["bfloat16", "float32", "float16"],
  help="default bfloat16 on CUDA, float32 on CPU (as train.py)")
a("--attn_implementation", default="sdpa", choices=["sdpa", "eager"],
  help="the model's own attention (the unpacked layout's)")
a("--attention", default="auto", choices=["auto", "split", "flex", "mask"],
  help="packed attention, see model_patch.response_logps (auto: split on CPU)")
a("--lora_r", type=int, default=None, help="LoRA rank (default: the preset's)")
a("--grad_ckpt", action="store_true", help="gradient checkpointing, both layouts")
a("--reference", action="store_true", help="also the reference-based loss: packed plus a "
  "no-grad forward with the LoRA adapter off (the reference policy), in a third process")
# sample shape
a("--num_chunks", type=int, default=16, help="N: context chunks (paper: 16)")
a("--chunk_len", type=int, default=128, help="C: tokens per chunk (paper: 512)")
a("--question_len", type=int, default=32, help="Q: question tokens")
a("--response_len", type=int, default=64, help="R: tokens per response")
a("--num_rejected", type=int, default=2, help="M: rejected responses (paper: 2)")
a("--batch_size", type=int, default=1, help="B: samples per step")
a("--target_len", type=int, default=None, help="K: position window (default: the preset's)")
# measurement
a("--warmup", type=int, default=1, help="untimed steps first")
a("--steps", type=int, default=3, help="timed steps (median reported)")
a("--mem_limit_gib", type=float, default=18.0, help="CPU: address space a layout may add once "
  "loaded; beyond it the layout is reported as not fitting (not the kernel's OOM killer)")
a("--seed", type=int, default=0)
a("--variant", choices=["packed", "unpacked", "reference"], default=None,
  help="internal: run one layout in this process, driven by the main one")
args = parser.parse_args()
if args.device == "auto":
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
if args.device == "cuda" and not torch.cuda.is_available():
    sys.exit("error: --device cuda, but torch sees no CUDA device (torch.cuda.is_available() is False)")
if args.device_check:       # a flag set: it overrides the flags below, whatever else was given
    gpu = args.device == "cuda"
    args.random_model, args.num_layers = "llama3-8b", 4 if gpu else 2
    args.hidden_size = None if gpu else 256
    args.num_chunks, args.chunk_len, args.question_len = 16, 512 if gpu else 32, 32
    args.response_len, args.num_rejected = 256 if gpu else 16, 2
    args.attention, args.attn_implementation = "flex" if gpu else "split", "sdpa"
    args.warmup, args.steps = 1, 3
if args.dtype is None:
    args.dtype = "bfloat16" if args.device == "cuda" else "float32"  # bf16 on an AVX2-only CPU: many times slower
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")   # peft vs transformers 5
warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")          # peft: LoRA on tied embeddings

def proc_status(key):
    """A field of /proc/self/status in bytes (VmRSS: resident now, VmHWM: peak resident)."""
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key + ":"))

# --random_model: the shapes of the real model, random weights (nothing to download).
RANDOM_MODELS = {"llama3-8b": dict(preset="llama3-8b-80k", hidden_size=4096, intermediate_size=14336,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                   rope_theta=500000.0, max_position_embeddings=81920)}

# The preset whose LoRA, loss and window settings the run uses.
PRESET = models.resolve_model(RANDOM_MODELS[args.random_model]["preset"] if args.random_model else args.model)
args.target_len = args.target_len or PRESET["target_len"]

def load(dtype):
    """The model with a LoRA on its preset targets (seeded: the same adapters each time).
    --random_model is built on the device directly (an 8B-wide layer is 0.9 GB in bf16)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    if args.random_model:
        kw = {k: v for k, v in RANDOM_MODELS[args.random_model].items() if k != "preset"}
        if args.hidden_size:            # keep the heads (32 q / 8 kv), shrink the head dim
            kw.update(hidden_size=args.hidden_size, intermediate_size=args.hidden_size * 7 // 2)
        config = LlamaConfig(num_hidden_layers=args.num_layers, tie_word_embeddings=False, **kw)
        config._attn_implementation = args.attn_implementation
        torch.manual_seed(args.seed)  # the same random weights in every layout's process
        with torch.device(args.device):
            model = LlamaForCausalLM(config).to(dtype)  # no host copy of an 8B-wide layer
    else:
        model = models.load_model(PRESET["path"], dtype=dtype, attn_implementation=args.attn_implementation)
    torch.manual_seed(args.seed)  # the same LoRA A in every process (B starts at 0)
    lora = LoraConfig(r=args.lora_r or PRESET["lora_r"], lora_alpha=PRESET["lora_alpha"],
                      lora_dropout=0.0, target_modules=PRESET["lora_targets"])
    model = get_peft_model(model, lora)
    return model.to(args.device)

def make_batch(vocab_size, device):
    """B packed LOGO rows: (B, T) input ids, position ids, segment ids."""
    n, c, q, r, m = args.num_chunks, args.chunk_len, args.question_len, args.response_len, args.num_rejected
    g = torch.Generator().manual_seed(args.seed)  # every process builds the same rows
    rows = []
    for _ in range(args.batch_size):
        ctx = synthesize_position_ids([c] * n, args.target_len - q - r, "continuous", g)  # (N*C,)
        pos = pack_position_ids(ctx, q, [r] * (m + 1))                                 # (T,)
        seg = torch.cat([torch.zeros(n * c + q, dtype=torch.long)] +
                        [torch.full((r,), j + 1) for j in range(m + 1)])               # 0 | 1 | 2..M+1
        ids = torch.randint(10, vocab_size, pos.shape, generator=g)   # above the special tokens
        rows.append((ids, pos, seg))
    return [torch.stack(x).to(device) for x in zip(*rows)]

def run_variant():
    """One layout in this process, driven by main() over stdin/stdout: a JSON line when
    ready, then for each "step" line one step and a JSON line with its times, then after
    "stop" a JSON line with the memory and the log-probs."""
    from torch.utils._triton import has_triton
    model = load(getattr(torch, args.dtype))
    model.train()  # as in training: gradient checkpointing acts in train mode only
    if args.grad_ckpt:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    cuda = model.device.type == "cuda"
    ids, pos, seg = make_batch(model.config.vocab_size, model.device)
    attention = args.attention if args.attention != "auto" else "flex" if cuda and has_triton() else "split"
    score = (lambda: model_patch.response_logps_unpacked(model, ids, pos, seg)) if \
        args.variant == "unpacked" else \
        (lambda: model_patch.response_logps(model, ids, pos, seg, attention=attention))

    def reference():
        """reference: the same packed rows through the base model (adapter off), no grad."""
        if args.variant != "reference":
            return {}
        with model.disable_adapter(), torch.no_grad():
            ref = score()[0]
        return dict(ref_chosen_logps=ref[:, 0], ref_rejected_logps=ref[:, 1:])

    say = lambda **kw: print(json.dumps(kw), flush=True)

    # Everything allocated from here on is the step's. On CPU, a limit on the address space
    # turns "does not fit" into a clean allocation error instead of the OOM killer.
    gc.collect()  # the loading's garbage is not the step's
    if cuda:
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        held = proc_status("VmRSS")
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        resource.setrlimit(resource.RLIMIT_AS, (proc_status("VmSize") + int(args.mem_limit_gib * 2**30), hard))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                         # reset the peak (VmHWM) to now
    say(ready=True, attention=attention, device=str(model.device), threads=torch.get_num_threads())
    for line in sys.stdin:
        if line.strip() != "step":
            break
        try:
            t0, c0 = time.perf_counter(), time.process_time()  # wall time, and CPU time of all threads
            ref = reference()
            logps, counts = score()                              # (B, 1+M) mean log-probs
            loss, _ = logo_loss(logps[:, 0], logps[:, 1:], beta=PRESET["beta"], gamma=PRESET["gamma"],
                                sft_weight=PRESET["sft_weight"], **ref)
            loss.backward()
            model.zero_grad(set_to_none=True)  # no update: every step runs the same weights
            if cuda:
                torch.cuda.synchronize()  # kernels run asynchronously: wait for them
            say(time=time.perf_counter() - t0, cpu=time.process_time() - c0)
            logps = logps.detach().float().cpu()  # the last step's, for the parity check
            del loss                  # free it all: the other layout runs next, on the same GPU
            torch.cuda.empty_cache() if cuda else ctypes.CDLL(None).malloc_trim(0)
        except (RuntimeError, MemoryError) as e:                 # an allocation beyond the limit
            if "alloc" not in str(e).lower() and "memory" not in str(e).lower():  # anything else is a bug
                raise
            peak = torch.cuda.max_memory_allocated() if cuda else proc_status("VmHWM")
            asked = re.search(r"allocate [\d.]+ (bytes|[KMG]iB)", str(e))   # CPU: bytes; CUDA: "2.00 GiB"
            return say(error=f"out of memory: at {(peak - held) / 2**30:.1f} GiB into the step, "
                             f"{'an allocation of ' + asked.group(0)[9:] if asked else 'an allocation'} failed")
    peak = torch.cuda.max_memory_allocated() if cuda else proc_status("VmHWM")
    say(step_mem=peak - held, peak_mem=peak, logps=logps.tolist(), counts=counts.tolist())

def main():
    B, n, c, q, r, m = (args.batch_size, args.num_chunks, args.chunk_len, args.question_len,
                        args.response_len, args.num_rejected)
    k = n * c + q                                                # prefix: context + question
    tokens = dict(packed=B * (k + (m + 1) * r), unpacked=B * (m + 1) * (k + r))  # tokens through the layers
    tokens["reference"] = tokens["packed"]
    name = (f"random {args.random_model} shape ({args.hidden_size or 'full'} wide, {args.num_layers} layers)"
            if args.random_model else args.model)
    print(f"LOGO packing benchmark: {name} {args.dtype} on {args.device}, B={B} x [{n} x {c} context + {q} question, "
          f"{m + 1} responses x {r} (M={m})], positions over {args.target_len}, "
          f"LoRA r={args.lora_r or PRESET['lora_r']} on {'/'.join(PRESET['lora_targets'])}, "
          f"gradient checkpointing {'on' if args.grad_ckpt else 'off'}", flush=True)
    # Each layout in a fresh process (memory apart), taking turns step by step, so that
    # whatever else runs on the machine slows all alike.
    procs = {v: subprocess.Popen([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--variant", v],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for v in ("packed", "unpacked") + (("reference",) if args.reference else ())}

    def ask(v, command):
        """Send a command to layout v's process; its JSON answer (or an error if it died)."""
        if command:
            procs[v].stdin.write(command + "\n")
            procs[v].stdin.flush()
        for line in procs[v].stdout:
            if line.startswith("{"):
                return json.loads(line)
            sys.stderr.write(line)                               # stray output of a library
        return dict(error=f"the process died (exit status {procs[v].wait()})")

    res = {v: dict(ask(v, None), times=[], cpu_times=[]) for v in procs}   # all loaded
    for step in range(args.warmup + args.steps):
        for v in [v for v in procs if "error" not in res[v]]:
            out = ask(v, "step")
            if "error" in out:
                res[v].update(out)
                continue
            print(f"  step {step + 1}/{args.warmup + args.steps} {v}: {out['time']:.2f} s"
                  + (" (warm-up)" if step < args.warmup else ""), file=sys.stderr, flush=True)
            if step >= args.warmup:
                res[v]["times"].append(out["time"])
                res[v]["cpu_times"].append(out["cpu"])
    for v in procs:
        if "error" not in res[v]:
            res[v].update(ask(v, "stop"))
        procs[v].stdin.close()
        procs[v].wait()

    med = lambda v, key="times": statistics.median(res[v][key])  # robust to one slow step on a shared machine
    print(f"\n{'layout':<24} {'tokens':>7}   {'step time, median (min-max)':<27}   {'CPU time':>10}"
          f"   {'step memory':>13}")
    for label, v in [("unpacked (M+1 rows)", "unpacked"), (f"packed ({res['packed'].get('attention', '?')})",
                     "packed")] + [("packed, reference-based", "reference")] * args.reference:
        x, t = res[v], res[v]["times"]
        print(f"{label:<24} {tokens[v]:>7,}   " + (f"failed: {x['error']}" if "error" in x else
              f"{med(v):>8.2f} s ({min(t):.2f}-{max(t):.2f})   {med(v, 'cpu_times'):>8.2f} s"
              f"   {x['step_mem'] / 2**20:>9,.0f} MiB"))
    flop_bound = (m + 1) * (k + r) / (k + (m + 1) * r)  # packing's saving outside attention
    failed = [f"{v} layout: {res[v]['error']}" for v in procs if "error" in res[v]]
    if failed:
        print(f"FLOP bound {flop_bound:.2f}x")
        if args.device_check:
            sys.exit("DEVICE CHECK FAILED (parity): " + "; ".join(failed))
        return

    def ratios(a, b, label, note):                               # a over b: time, CPU, memory
        print(f"{label:<24} {note[0]:>7}   {med(a) / med(b):>8.2f}x{'':<17}   "
              f"{med(a, 'cpu_times') / med(b, 'cpu_times'):>9.2f}x   "
              f"{res[a]['step_mem'] / res[b]['step_mem']:>12.2f}x   ({note[1]})")
    ratios("unpacked", "packed", "unpacked / packed",
           (f"{tokens['unpacked'] / tokens['packed']:.2f}x", f"FLOP bound {flop_bound:.2f}x"))
    if args.reference:
        ratios("reference", "packed", "reference / free", ("", "reference-based vs reference-free, packed"))
    p, u = res["packed"], res["unpacked"]
    lp, lu = torch.tensor(p["logps"]), torch.tensor(u["logps"])
    print(f"\nmean response log-probs (packed, row 0): {[round(x, 4) for x in p['logps'][0]]}")
    print(f"max |packed - unpacked| = {(lp - lu).abs().max():.2e}")
    if args.device == "cuda":
        print(f"peak GPU memory (torch.cuda.max_memory_allocated, model included): packed "
              f"{p['peak_mem'] / 2**30:.1f} GiB, unpacked {u['peak_mem'] / 2**30:.1f} GiB")
    print(f"{args.steps} timed steps after {args.warmup} warm-up; each layout in its own process, "
          f"taking turns step by step; {p['threads']} threads on {p['device']}")
    if args.dtype != "float32" or args.device_check:
        failed = parity(lp, lu, p.get("attention", "?"))
        if failed:
            sys.exit("DEVICE CHECK FAILED (parity): " + "; ".join(failed))

# Tolerances of the device check, on mean response log-probs (nats per token).
# float32 (no TF32): packed and unpacked agree to ~1e-6 on CPU (tests/test_model_patch.py);
# a response that sees another response moves its log-prob by ~1e-1 (the CPU tests).
FLOAT32_ATOL = 1e-3
# bf16: each layout's distance from float32 is rounding noise; the packed layout may be at
# most twice as far as the unpacked one, plus this much.
BF16_SLACK = 1e-2

def parity(lp, lu, attention):
    """The log-probs of both layouts against an independent float32 reference (no grad, no
    TF32: the model's own SDPA over separate rows, nothing of flex); returns what failed."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # TF32 would blur the reference
    model = load(torch.float32)
    ids, pos, seg = make_batch(model.config.vocab_size, model.device)
    with torch.no_grad():
        ref = model_patch.response_logps_unpacked(model, ids, pos, seg)[0].cpu()
        packed32 = model_patch.response_logps(model, ids, pos, seg, attention=attention)[0].cpu()
    failed = []
    d32 = (packed32 - ref).abs().max().item()  # the packed path's own error, no bf16 in it
    print(f"float32: max |packed ({attention}) - unpacked (SDPA)| = {d32:.2e} (tolerance {FLOAT32_ATOL:g})")
    if not d32 <= FLOAT32_ATOL:
        failed.append(f"float32 packed vs unpacked {d32:.2e} > {FLOAT32_ATOL:g}")
    if args.dtype != "float32":
        dp, du = (lp - ref).abs().max().item(), (lu - ref).abs().max().item()
        print(f"{args.dtype}: max |packed - float32 unpacked| = {dp:.2e}, max |unpacked - float32 "
              f"unpacked| = {du:.2e} (the {args.dtype} noise; tolerance 2 x {du:.2e} + {BF16_SLACK:g})")
        if not dp <= 2 * du + BF16_SLACK:
            failed.append(f"{args.dtype} packed is {dp:.2e} from float32, unpacked {du:.2e}")
    return failed

if __name__ == "__main__":
    run_variant() if args.variant else main()
