"""
Benchmark of LOGO's packing: one LoRA training step (forward + backward) on LOGO-shaped
samples, packed (model_patch.response_logps: the context once, logits only where a response
token is predicted) against the authors' layout (model_patch.response_logps_unpacked: M+1
rows of context + response, full-vocabulary logits for every token).

A sample: N chunks x C tokens of context, a question of Q tokens, M+1 responses of R tokens,
positions synthesized over the preset's target window (positions.py). Token ids are random:
speed and memory do not depend on the text, and both layouts score the same tokens.

    python bench.py                                    # SmolLM2-135M, 16 x 128, R=64, M=2, bf16
    python bench.py --chunk_len 512                    # the paper's context shape (16 x 512)
    python bench.py --model tiny --dtype float32       # seconds: a random 2-layer model

Each layout runs in its own fresh subprocess (this script with --variant), so neither sees
the other's memory. How the numbers are measured:
  step time    median over --steps steps, after --warmup untimed steps (one-time costs).
  step memory  the peak resident set size of the process during the steps, minus the resident
               set once the model, LoRA and the sample are loaded. The kernel keeps the peak
               (VmHWM); we reset it (/proc/self/clear_refs) just before the first step, so
               model loading does not count. torch's CPU allocator keeps no statistics and
               tracemalloc does not see it, hence RSS. On CUDA: torch.cuda.max_memory_allocated.
  FLOP bound   (M+1)(k+r) / (k+(M+1)r) with k = N*C+Q prefix tokens, r = R: the ratio of
               tokens through the transformer, which is what packing saves (attention aside).
  max |diff|   of the (B, 1+M) mean log-probs of the two layouts.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import warnings

import model_patch
from loss import logo_loss
from positions import pack_position_ids, synthesize_position_ids

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
# model
parser.add_argument("--model", default="smollm2-135m", help="preset: smollm2-135m (the CPU demo) or tiny")
parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
parser.add_argument("--attn_implementation", default="sdpa", choices=["sdpa", "eager"],
                    help="the model's own attention (what the unpacked layout uses)")
parser.add_argument("--attention", default="auto", choices=["auto", "split", "flex", "mask"],
                    help="packed attention, see model_patch.response_logps (auto: split on CPU)")
parser.add_argument("--lora_r", type=int, default=None, help="LoRA rank (default: the preset's)")
parser.add_argument("--grad_ckpt", action="store_true", help="gradient checkpointing (both layouts)")
# sample shape
parser.add_argument("--num_chunks", type=int, default=16, help="N: context chunks")
parser.add_argument("--chunk_len", type=int, default=128, help="C: tokens per chunk (paper: 512)")
parser.add_argument("--question_len", type=int, default=32, help="Q: question tokens")
parser.add_argument("--response_len", type=int, default=64, help="R: tokens per response")
parser.add_argument("--num_rejected", type=int, default=2, help="M: rejected responses (paper: 2)")
parser.add_argument("--batch_size", type=int, default=1, help="B: samples per step")
parser.add_argument("--target_len", type=int, default=None,
                    help="K: synthesized position window (default: the preset's)")
# measurement
parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
parser.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
parser.add_argument("--mem_limit_gib", type=float, default=18.0,
                    help="address-space budget per layout on top of the loaded model; beyond it "
                         "the layout is reported as not fitting instead of waking the OOM killer")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--variant", choices=["packed", "unpacked"], default=None,
                    help="internal: run one layout in this process and print a JSON line")
args = parser.parse_args()
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")   # peft vs transformers 5


def peak_rss_reset():
    with open("/proc/self/clear_refs", "w") as f:              # "5": reset VmHWM to VmRSS
        f.write("5")


def proc_status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024             # kB -> bytes
    raise KeyError(key)


def make_sample(vocab_size, target_len, g):
    """One packed LOGO row: (T,) input ids, position ids, segment ids."""
    n, c, q, r, m = args.num_chunks, args.chunk_len, args.question_len, args.response_len, args.num_rejected
    ctx = synthesize_position_ids([c] * n, target_len - q - r, "continuous", g)   # (N*C,)
    pos = pack_position_ids(ctx, q, [r] * (m + 1))                                  # (T,)
    seg = torch.cat([torch.zeros(n * c + q, dtype=torch.long)] +
                    [torch.full((r,), j + 1) for j in range(m + 1)])                # 0 | 1 | 2..M+1
    ids = torch.randint(10, vocab_size, pos.shape, generator=g)   # skip the special tokens
    return ids, pos, seg


def run_variant():
    """Load, build the sample, time --warmup + --steps steps of one layout; print JSON."""
    from peft import LoraConfig, get_peft_model
    preset = model_patch.resolve_model(args.model)
    cuda = torch.cuda.is_available()
    model = model_patch.load_model(preset["path"], dtype=getattr(torch, args.dtype),
                                   attn_implementation=args.attn_implementation)
    model = get_peft_model(model, LoraConfig(r=args.lora_r or preset["lora_r"], lora_alpha=preset["lora_alpha"],
                                             lora_dropout=0.0, target_modules=preset["lora_targets"]))
    if cuda:
        model.cuda()
    model.train()
    if args.grad_ckpt:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    g = torch.Generator().manual_seed(args.seed)
    rows = [make_sample(model.config.vocab_size, args.target_len or preset["target_len"], g)
            for _ in range(args.batch_size)]
    ids, pos, seg = (torch.stack(x).to(model.device) for x in zip(*rows))      # (B, T) each
    from torch.utils._triton import has_triton               # as response_logps decides "auto"
    attention = args.attention if args.attention != "auto" else "flex" if cuda and has_triton() else "split"
    if args.variant == "packed":
        def score():
            return model_patch.response_logps(model, ids, pos, seg, attention=attention)
        tokens = ids.numel()
    else:
        def score():
            return model_patch.response_logps_unpacked(model, ids, pos, seg)
        tokens = int(sum(((s == 0) | (s == j)).sum() for s in seg for j in range(1, int(seg.max()) + 1)))

    # Memory: everything allocated from here on is the step's. A budget on the address
    # space turns "does not fit" into a clean allocation error instead of the OOM killer.
    held = torch.cuda.memory_allocated() if cuda else proc_status("VmRSS")
    if not cuda:
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (proc_status("VmSize") + int(args.mem_limit_gib * 2**30), hard))
        peak_rss_reset()
    else:
        torch.cuda.reset_peak_memory_stats()
    times, logps = [], None
    try:
        for step in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            lp, counts = score()                                 # (B, 1+M) mean log-probs
            loss, _ = logo_loss(lp[:, 0], lp[:, 1:], beta=preset["beta"], gamma=preset["gamma"],
                                sft_weight=preset["sft_weight"])
            loss.backward()
            model.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            print(f"  {args.variant} step {step + 1}/{args.warmup + args.steps}: {dt:.2f} s"
                  + (" (warm-up)" if step < args.warmup else ""), file=sys.stderr, flush=True)
            if step >= args.warmup:
                times.append(dt)
            logps = lp.detach().float().cpu()
            del lp, loss
    except (RuntimeError, MemoryError) as e:                     # allocation beyond the budget
        if "memory" not in str(e).lower():
            raise
        print(json.dumps(dict(oom=True, error=str(e).splitlines()[0], tokens=tokens)))
        return
    peak = torch.cuda.max_memory_allocated() if cuda else proc_status("VmHWM")
    print(json.dumps(dict(oom=False, times=times, step_mem=peak - held, tokens=tokens,
                          logps=logps.tolist(), counts=counts.tolist(), threads=torch.get_num_threads(),
                          device=str(model.device), attention=attention)))


def main():
    preset = model_patch.resolve_model(args.model)
    n, c, q, r, m = args.num_chunks, args.chunk_len, args.question_len, args.response_len, args.num_rejected
    k = n * c + q                                                # prefix (context + question)
    flop_bound = (m + 1) * (k + r) / (k + (m + 1) * r)
    print(f"LOGO packing benchmark: {args.model} {args.dtype}, B={args.batch_size} x [{n} x {c} context "
          f"+ {q} question, {m + 1} responses x {r} (M={m})], positions over "
          f"{args.target_len or preset['target_len']}, LoRA on {', '.join(preset['lora_targets'])}, "
          f"gradient checkpointing {'on' if args.grad_ckpt else 'off'}")
    results = {}
    for variant in ("packed", "unpacked"):                       # each in a fresh process
        argv = [a for a in sys.argv[1:]]
        out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--variant", variant],
                             stdout=subprocess.PIPE, text=True)
        if out.returncode != 0:
            sys.exit(f"error: the {variant} run failed (exit status {out.returncode}); its output is above")
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])

    def row(name, res):
        if res["oom"]:
            return f"{name:<22} {res['tokens']:>8,}   does not fit in {args.mem_limit_gib:g} GiB ({res['error'][:60]})"
        return (f"{name:<22} {res['tokens']:>8,}   {statistics.median(res['times']):>9.2f} s"
                f"   {res['step_mem'] / 2**20:>10,.0f} MiB")

    p, u = results["packed"], results["unpacked"]
    print(f"\n{'layout':<22} {'tokens':>8}   {'step time':>11}   {'step memory':>14}")
    print(row("unpacked (M+1 rows)", u))
    print(row(f"packed ({p['attention']})", p))
    if not (p["oom"] or u["oom"]):
        t = statistics.median(u["times"]) / statistics.median(p["times"])
        mem = u["step_mem"] / p["step_mem"]
        print(f"{'ratio unpacked/packed':<22} {u['tokens'] / p['tokens']:>7.2f}x   {t:>10.2f}x   {mem:>13.2f}x"
              f"   (FLOP bound {flop_bound:.2f}x)")
        diff = (torch.tensor(p["logps"]) - torch.tensor(u["logps"])).abs().max().item()
        eps = torch.finfo(getattr(torch, args.dtype)).eps
        print(f"max |logp packed - logp unpacked| = {diff:.2e}  (mean token log-probs "
              f"{[round(x, 3) for x in p['logps'][0]]}; {args.dtype} eps {eps:.1e})")
    print(f"medians of {args.steps} steps after {args.warmup} warm-up; {p.get('threads', '?')} threads "
          f"on {p.get('device', '?')}; each layout in its own process")


if __name__ == "__main__":
    run_variant() if args.variant else main()
