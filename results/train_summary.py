"""
The results/ summary of a finished training run (every run, trained or evaluated, leaves one
small JSON in results/). Read from the run's own files, run_config.json and
log.jsonl (train.py writes both), so it can be written right after training or later:

    python results/train_summary.py runs/logo_s0 [runs/sft_s0 ...]   # -> results/train/logo_s0.json

It holds: method (sft / logo / logo_mM, as evaluate.py names them) and seed, the resolved
training config, the data fingerprint, the git commit of this checkout (or --git_commit, the
commit the run was trained with when that is another), metrics (steps, tokens, non-finite
steps, and loss / logo / sft / reward margin / reward accuracy averaged over the first and
the last quarter of the steps), the seconds of all steps, the CPU model. A run trained again
(a new session's checkout has no weights) is checked against the summary on file: the same
data fingerprint, config and metrics (exactly: the same bits) keep that file, which names the
adapter the earlier cells were evaluated with; any difference is printed and the new summary
replaces it (`git diff results/train` shows what changed). The evaluation
summaries (results/*.json) carry the same config as train_config; results/make_table.py does
not read this folder.
"""

import argparse
import json
import os
import platform
import subprocess
import sys

import torch

KEYS = ("loss", "logo", "sft", "reward_margin", "reward_accuracy")


def git_state():
    """(commit, dirty) of this checkout (results/ left out: summaries are data), as
    evaluate.py records it; (None, None) outside git."""
    run = lambda *a: subprocess.run(["git", *a], cwd=os.path.dirname(os.path.abspath(__file__)),
                                    capture_output=True, text=True)
    head, status = run("rev-parse", "HEAD"), run("status", "--porcelain", "--untracked-files=no",
                                                 "--", "..", ":(exclude)../results")
    return (None, None) if head.returncode or status.returncode else \
        (head.stdout.strip(), bool(status.stdout.strip()))


def cpu():
    """/proc/cpuinfo's first model name with its family and model numbers, then the kernels
    torch picks: a VM's bare "AMD EPYC" hides CPU generations whose float bits differ."""
    info = {}
    if os.path.exists("/proc/cpuinfo"):
        for key, _, value in (x.partition(":") for x in open("/proc/cpuinfo").read().split("\n\n")[0].splitlines()):
            info.setdefault(key.strip(), value.strip())
    name = info.get("model name") or platform.processor() or platform.machine()
    family = f" (family {info['cpu family']} model {info['model']})" if "cpu family" in info else ""
    return f"{name}{family}, torch {torch.backends.cpu.get_cpu_capability()}"


def summarize(run_dir, git_commit=None):
    with open(os.path.join(run_dir, "run_config.json")) as f:
        cfg = json.load(f)
    steps = {}
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        for n, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                sys.exit(f"{run_dir}/log.jsonl line {n}: not JSON")
            steps[row["step"]] = row                 # a resumed run logs a step again: keep the last
    if not os.path.isdir(os.path.join(run_dir, "final")) or len(steps) != cfg["max_steps"]:
        sys.exit(f"{run_dir}: not finished ({len(steps)} of {cfg['max_steps']} steps logged, "
                 f"final/ {'present' if os.path.isdir(os.path.join(run_dir, 'final')) else 'missing'})")
    rows = [steps[s] for s in sorted(steps)]
    kept = [r for r in rows if not r.get("skipped")]         # as train.py: non-finite steps out
    q = max(1, len(kept) // 4)                               # train.py's quarters, >= 1 step
    first, last = kept[:q], kept[-q:]
    mean = lambda recs, k: sum(r[k] for r in recs) / len(recs)
    # evaluate.py's method names: sft, logo (M = 2 rejected), logo_mM
    M = int(cfg.get("num_rejected") or 2)
    method = "sft" if cfg.get("loss") == "sft" else "logo" if M == 2 else f"logo_m{M}"
    commit, dirty = git_state()
    return {"format_version": 1, "kind": "train", "method": method, "seed": cfg["seed"],
            "out_dir": cfg.get("out_dir", run_dir), "data_fingerprint": cfg.get("data_fingerprint"),
            "git_commit": git_commit or commit, "git_dirty": None if git_commit else dirty,
            "metrics": {"steps": len(rows), "tokens": sum(r["tokens"] for r in rows),
                        "nonfinite_steps": rows[-1].get("nonfinite_steps", 0),
                        "quarter_steps": len(first),
                        "first_quarter": {k: mean(first, k) for k in KEYS},
                        "last_quarter": {k: mean(last, k) for k in KEYS}},
            "step_seconds": sum(r["seconds_per_step"] for r in rows), "cpu": cpu(),
            "config": cfg}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    p.add_argument("run_dirs", nargs="+", help="train.py --out_dir folders (finished)")
    p.add_argument("--results_dir", default=os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--git_commit", default=None,
                   help="the commit the runs were trained with, when not this checkout's")
    return p.parse_args(argv)


def differences(old, new, keys=("data_fingerprint", "config", "metrics"), where=""):
    """The dotted names of the fields under `keys` where two summaries differ."""
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, sorted(set(a) | set(b)), f"{where}{k}.")
        elif a != b:
            out.append(f"{where}{k}")
    return out


def main(argv=None):
    args = parse_args(argv)
    for run in args.run_dirs:
        s = summarize(run.rstrip("/"), args.git_commit)
        path = os.path.join(args.results_dir, "train", f"{s['method']}_s{s['seed']}.json")
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
            # out_dir is where it ran, not what it trained; a flag later code removed (trust_remote_code, merge,
            # tensorboard) changed nothing while it was off
            diff = [d for d in differences(old, s) if d != "config.out_dir" and not (
                d.startswith("config.") and d[7:] not in s["config"] and old["config"].get(d[7:]) in (False, None))]
            if not diff:
                print(f"{run}: the same run as {path} (data fingerprint, config and metrics "
                      "equal): kept that file")
                continue
            print(f"{run}: NOT the run of {path}: differs in {', '.join(diff[:8])}"
                  f"{' ...' if len(diff) > 8 else ''}; writing the new summary (cells "
                  "evaluated with the earlier adapter are not this run's)")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:                   # renamed when whole
            f.write(json.dumps(s, indent=1) + "\n")
        os.replace(path + ".tmp", path)
        m = s["metrics"]
        print(f"wrote {path}: {m['steps']} steps, loss {m['first_quarter']['loss']:.3f} -> "
              f"{m['last_quarter']['loss']:.3f}, margin {m['first_quarter']['reward_margin']:.2f} "
              f"-> {m['last_quarter']['reward_margin']:.2f}, {s['step_seconds'] / 60:.1f} min of steps")


if __name__ == "__main__":
    main()
