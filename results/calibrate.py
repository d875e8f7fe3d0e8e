"""
Calibration of the built-in task: does the base model find the fact from the answer's
paragraph alone, and fail from the full context? That gap is what LOGO should close (the
paper's Sec. 1: models read a short context but lose the fact in a long one). Run before
training anything; writes results/calibration/calibration_<L>.json.

    python results/calibrate.py --length 1K --num 40      # ~3.5 min on a 2-core CPU

Runs evaluate.py three times and reads its files: --dry_run for the held-out records (seed
1234), --task qa on them (the full context), --task qa --data on the same questions with
only the paragraph holding the answer. The same prompt, decoding and answer check, then, as
`evaluate.py --task qa` (chat template, greedy, 24 new tokens, the normalised gold answer
inside the normalised reply).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def evaluate(*argv):
    """Run evaluate.py (a failure ends this script with its exit status)."""
    proc = subprocess.run([sys.executable, os.path.join(os.path.dirname(HERE), "evaluate.py"),
                           *map(str, argv)])
    if proc.returncode:
        sys.exit(proc.returncode)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--length", default="1K", help="prompt length in tokens (1K = 1024)")
    p.add_argument("--num", type=int, default=40)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out_dir", default=os.path.join(HERE, "calibration"),
                   help="where calibration_<L>.json goes (not results/*.json: no summary)")
    args = p.parse_args(argv)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        common = ["--task", "qa", "--model", args.model, "--lengths", args.length,
                  "--max_samples", args.num]
        evaluate(*common, "--seed", args.seed, "--dry_run", "--out_dir", f"{tmp}/records")
        records = [json.loads(x)["record"] for x in open(f"{tmp}/records/qa_samples.jsonl")]
        with open(f"{tmp}/critical.jsonl", "w") as f:       # the paragraph holding the answer
            for r in records:
                target = next(x for x in r["context"].split("\n\n") if r["answer"] in x)
                f.write(json.dumps({"context": target, "question": r["question"],
                                    "answer": r["answer"]}) + "\n")
        evaluate(*common, "--seed", args.seed, "--out_dir", f"{tmp}/full", "--results_dir", f"{tmp}/summary")
        evaluate(*common, "--data", f"{tmp}/critical.jsonl", "--out_dir", f"{tmp}/critical")
        got = {k: json.load(open(f"{tmp}/{k}/qa.json"))["results"]["base"]["samples"]
               for k in ("full", "critical")}
        rows = [{"index": i, "question": r["question"], "answer": r["answer"],
                 **{k: {"correct": got[k][i]["correct"], "tokens": got[k][i]["prompt_tokens"],
                        "prediction": got[k][i]["prediction"]} for k in got}}
                for i, r in enumerate(records)]
        summary = {k: {"correct": sum(r[k]["correct"] for r in rows), "n": len(rows),
                       "mean_tokens": sum(r[k]["tokens"] for r in rows) / len(rows)} for k in got}
        run = json.load(open(os.path.join(f"{tmp}/summary", os.listdir(f"{tmp}/summary")[0])))
        out = {"model": args.model, "length": run["lengths"][0], "seed": args.seed, "summary": summary,
               "git_commit": run["git_commit"], "cpu": run["cpu"],
               "wall_s": round(time.time() - t0, 1), "questions": rows}
    path = os.path.join(args.out_dir, f"calibration_{args.length}.json")
    os.makedirs(args.out_dir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(path + ".tmp", path)
    print(json.dumps(summary), "->", path)


if __name__ == "__main__":
    main()
