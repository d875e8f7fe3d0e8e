"""
Results summaries: one small JSON per model in evaluate.py's --results_dir, named
METHOD[_sSEED]_TASK[_LENGTHS]_DATA[_TAG].json (e.g. results/logo_s1_qa_2K_e1234.json), the only input of
results/make_table.py, so the README's results table is never typed by hand. evaluate.py settles their names before any
model loads (plan_summaries) and writes them last (summary_text); a task's entry in evaluate.py's TASKS names its data
tag and, where it has one, its own metrics.
"""

import hashlib
import json
import os
import platform
import re
import subprocess
from collections import Counter
from pathlib import Path

import torch

from model_patch import get_rope_theta
from models import UserError, load_config

# ----------------------------------------------------------------------------------------
# A summary's metrics (summary_text below): by default the result with its samples' ids and without the predictions;
# a task whose TASK.json layout predates that names its own fields (TASKS' "summary" in evaluate.py).
def digest(*parts):
    # sha256 of token-id lists / strings: '|' between parts, ',' between ids
    return hashlib.sha256("|".join(p if isinstance(p, str) else ",".join(map(str, p)) for p in parts)
                          .encode()).hexdigest()

def sample_ids(res, samples):
    """Per sample a stable id 'LENGTH/INDEX/HASH' (index within its length, hash of the prompt tokens: two models pair
    on a question only when they read the same prompt)."""
    seen = Counter()  # per length: the index within it
    for r, s in zip(res["samples"], samples):
        seen[r["length"]] += 1
        yield f"{r['length']}/{seen[r['length']] - 1}/{digest(s['ids'])[:10]}"

def qa_summary(res, samples):
    qs = [{"id": i, "length": r["length"], "correct": r["correct"], "pattern": r["pattern"],
           "distractor": r["distractor"]} for i, r in zip(sample_ids(res, samples), res["samples"])]
    rates = ("empty_rate", "accuracy_nonempty", "distractor_rate")
    return {"accuracy": res["accuracy"], "n": len(qs), "questions": qs, **{k: res[k] for k in rates},
            "lengths": {L: {"accuracy": v["accuracy"], "n": v["samples"], "patterns": v["patterns"],
                            "correct": sum(q["correct"] for q in qs if str(q["length"]) == L),
                            "pattern_counts": v["pattern_counts"], **{k: v[k] for k in rates}}
                        for L, v in res["lengths"].items()}}

def mvniah_summary(res, samples):
    ss = [{"id": i, "length": r["length"], "recall": r["recall"], "values": len(r["values"])}
          for i, r in zip(sample_ids(res, samples), res["samples"])]
    got = lambda L: [x for x in ss if str(x["length"]) == L]
    # recall x values = values found; head scores of one length only: make_table pools App. B's score from them
    return {"recall": res["recall"], "retrieval_score": res["retrieval_score"], "n": len(ss), "samples": ss,
            "head_scores": res["head_scores"] if len(res["lengths"]) == 1 else None,
            "lengths": {L: {"recall": v["recall"], "retrieval_score": v["retrieval_score"], "n": v["samples"],
                            "values": sum(x["values"] for x in got(L)),
                            "values_found": round(sum(x["recall"] * x["values"] for x in got(L)))}
                        for L, v in res["lengths"].items()}}

def file_tag(path):
    """runs/x/pg_essays/ -> 'pg-essays' ('_' separates a summary name's fields)."""
    return re.sub(r"[^A-Za-z0-9.-]+", "-", os.path.splitext(os.path.basename(os.path.normpath(path)))[0]) or "data"

# ----------------------------------------------------------------------------------------
# Names (method, seed, task, lengths, data), the clash check, which code and machine made it, the summary itself.
def method_of(args, adapter_cfg, with_adapter, checkpoint_theta):
    """base / rope (no adapter; rope when --rope_theta differs from the checkpoint's), sft / logo / logo_mM (the
    adapter's loss and M = num_rejected; plain logo for M = 2)."""
    if not with_adapter:
        return "rope" if args.rope_theta not in (None, checkpoint_theta) else "base"
    M = int(adapter_cfg.get("num_rejected") or 2)
    return "sft" if adapter_cfg.get("loss") == "sft" else "logo" if M == 2 else f"logo_m{M}"

def plan_summaries(args, runs, lengths, data):
    """{label: summary fields known before loading}, at METHOD[_sSEED]_TASK[_LENGTHS]_DATA[_TAG].json (lengths in K
    where they divide). A file written for another model (adapter or rope_theta asked for) is never replaced; a rerun of
    the same model is."""
    theta = None if args.rope_theta is None else get_rope_theta(load_config(args.preset["path"]))  # no weights loaded
    plans, cfg = {}, args.adapter_cfg
    for label, with_adapter, rope in runs:
        method = method_of(args, cfg, with_adapter, theta)
        seed = cfg.get("seed") if with_adapter else None             # base / rope: untrained
        parts = [method + (f"_s{seed}" if seed is not None else ""), args.task] + (
            ["-".join(f"{L // 1024}K" if L % 1024 == 0 else str(L) for L in lengths)] if lengths else [])
        parts += [data] + ([file_tag(args.results_tag)] if args.results_tag else [])
        path = os.path.join(args.results_dir, "_".join(parts) + ".json")
        adapter = os.path.normpath(args.adapter) if with_adapter else None
        # written atomically: a summary on file is whole
        old = json.loads(Path(path).read_text("utf-8")) if os.path.isfile(path) else \
            {"adapter": adapter, "rope_theta_arg": rope}
        if (old.get("adapter"), old.get("rope_theta_arg")) != (adapter, rope):
            raise UserError(f"{path} holds the summary of another model (adapter {old.get('adapter')}, rope_theta "
                            f"{old.get('rope_theta_arg')}); pass --results_tag NAME to keep both, or delete the file")
        plans[label] = dict(path=path, method=method, seed=seed, label=label, adapter=adapter, rope_theta_arg=rope)
    return plans

def git_state():
    """(commit, dirty) of this checkout; dirty = tracked code differs from the commit (results/ left out: summaries
    are data). (None, None) outside git."""
    git = lambda *a: subprocess.run(["git", *a], cwd=os.path.dirname(os.path.abspath(__file__)),
                                    capture_output=True, text=True, timeout=30, check=True).stdout
    try:
        status = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results")
        return git("rev-parse", "HEAD").strip(), bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None

def cpu_model(cpuinfo="/proc/cpuinfo"):
    """'model name (family F model M), torch AVX2': a VM's bare 'AMD EPYC' hides CPU generations whose float bits and
    speeds differ; then the kernels torch picked."""
    # the first processor's block; a field's first value
    block = Path(cpuinfo).read_text("utf-8", errors="replace").split("\n\n")[0] if os.path.exists(cpuinfo) else ""
    fields = dict(reversed([[s.strip() for s in line.split(":", 1)] for line in block.splitlines() if ":" in line]))
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return f"{name}, torch {torch.backends.cpu.get_cpu_capability()}"

def summary_text(args, spec, plan, config, res, samples, data, total):
    """The summary of one model (plan: plan_summaries' fields, its path taken out) as JSON; spec: its TASKS entry."""
    cfg, adapter, (commit, dirty) = args.adapter_cfg, plan["adapter"] is not None, git_state()   # which code made it
    metrics = spec["summary"](res, samples) if "summary" in spec else {**res, "samples": [
        {**{k: v for k, v in r.items() if k != "prediction"}, "id": i} for r, i in zip(res["samples"],
                                                                                      sample_ids(res, samples))]}
    return json.dumps({
        "format_version": 1, "task": args.task, "model": args.preset["name"], **plan,
        "eval_seed": args.seed if "seed" in spec["flags"] and not args.data else None,
        "eval_data": data, "lengths": config["lengths"],
        "data_fingerprint": cfg.get("data_fingerprint") if adapter else None,
        "git_commit": commit, "git_dirty": dirty, "metrics": metrics,
        # wall_s: this run's only (answers from an earlier, killed run of the command are free)
        "command_wall_s": round(total, 2), "reused_answers": res.get("reused_answers"), "cpu": cpu_model(),
        "device": args.device, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "config": {k: v for k, v in config.items() if k != "adapter_config"},
        # the training config without the reload check's log-probs (numbers, not settings)
        "train_config": {k: v for k, v in cfg.items() if k != "check_logps"} or None if adapter else None,
    }, indent=1, default=str, ensure_ascii=False) + "\n"
