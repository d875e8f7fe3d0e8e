"""
Calibration of the built-in task (issue 15, step 1): does the base model find the fact
from the answer's paragraph alone, and fail from the full context? That gap is what LOGO
should close. Run before training anything; writes results/calibration/calibration_<L>.json.

    python results/calibrate.py --length 1K --num 40      # ~3.5 min on a 2-core CPU

Same prompt, decoding and answer check as `evaluate.py --task qa` (chat template, greedy,
24 new tokens, containment of the normalised gold answer), on the held-out seed 1234.
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate  # noqa: E402
from models import load_model, load_tokenizer, resolve_model  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--length", default="1K", help="prompt length in tokens (1K = 1024)")
    p.add_argument("--num", type=int, default=40)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args()
    length = evaluate.parse_lengths(args.length)[0]
    preset = resolve_model(args.model)
    tok, lm = load_tokenizer(preset["path"]), load_model(preset["path"]).eval()
    stops, t0 = evaluate.stop_token_ids(tok, lm), time.time()
    # the same sizing as evaluate.py's qa samples (a prompt of about `length` tokens)
    ev = evaluate.parse_args(["--task", "qa", "--lengths", args.length, "--seed", str(args.seed)])
    samples = evaluate.qa_samples(ev, tok, [length], args.num)
    rows = []
    for i, s in enumerate(samples):
        rec = s["record"]
        target = next(p for p in rec["context"].split("\n\n") if rec["answer"] in p)
        prompt, templated = evaluate.chat_prompt(tok, ev.prompt.format(**dict(rec, context=target)), True)
        got = {}
        for name, ids in (("full", s["ids"]), ("critical", evaluate.encode(tok, prompt, templated))):
            new, _ = evaluate.generate(lm, ids, evaluate.DEFAULT_NEW_TOKENS["qa"], stops)
            pred = evaluate.decode_answer(tok, new)
            got[name] = {"correct": evaluate.states_answer(pred, [rec["answer"]]),
                         "tokens": len(ids), "prediction": pred}
        rows.append({"index": i, "question": rec["question"], "answer": rec["answer"], **got})
        print(f"{i + 1}/{len(samples)} full {sum(r['full']['correct'] for r in rows)} "
              f"critical {sum(r['critical']['correct'] for r in rows)}", flush=True)
    summary = {k: {"correct": sum(r[k]["correct"] for r in rows), "n": len(rows),
                   "mean_tokens": sum(r[k]["tokens"] for r in rows) / len(rows)}
               for k in ("full", "critical")}
    out = {"model": args.model, "length": length, "seed": args.seed, "people": evaluate.corpus.PEOPLE,
           "summary": summary, "git_commit": evaluate.git_state()[0], "cpu": evaluate.cpu_model(),
           "wall_s": round(time.time() - t0, 1), "questions": rows}
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calibration")  # not *.json
    path = os.path.join(folder, f"calibration_{args.length}.json")
    evaluate.write_text(path, json.dumps(out, indent=1))
    print(json.dumps(summary), "->", path)


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count())
    main()
