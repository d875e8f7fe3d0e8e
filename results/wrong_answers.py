"""
What the wrong answers of a built-in QA evaluation say: for every model in an evaluate.py
--task qa output (TASK.json, e.g. runs/logo/eval_qa/qa.json), each wrong answer is counted
by its error pattern (paper Appendix C: hallucination / unfollow / empty) and by where its
content comes from:

  another person   it names a city, year or organisation of another person's biography in
                   the context (it read the context, and picked the wrong person's fact);
  no other's fact  it names none: an invented value, a reply drifting into the prose, or
                   the asked-about person's own other facts.

    python results/wrong_answers.py runs/logo/eval_qa/qa.json
    python results/wrong_answers.py runs/eval/logo_s{0,1,2}_qa_2K/qa.json   # + a total, seeds pooled

The records are rebuilt from the run's config by `evaluate.py --dry_run` (corpus.qa_records, the
same seed, lengths and tokenizer) and checked against the stored questions, so the counts need no
stored contexts. Prints a line per model and two examples per kind.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

# The biography template of corpus.py (BIOGRAPHY), its facts as groups, a pronoun for {He};
# tests/test_results.py checks that it finds every biography corpus.py writes.
BIOGRAPHY = ["{name} was born in {born_city} in {born_year}.",
             "{He} joined {employer} in {joined_year} as {a_role}."]
_FIELDS = re.compile(r"\{(\w+)\}")
_BIO = re.compile(r"\s".join(
    _FIELDS.sub(lambda m: {"He": "(?:He|She|They)", "a_role": r"an? [\w -]+?",
                           "name": r"(?P<name>[A-Z][\w'-]*(?: [A-Z][\w'-]*)*)"}.get(m[1], rf"(?P<{m[1]}>[^.\n]+?)"),
                re.escape(s).replace(r"\{", "{").replace(r"\}", "}")) for s in BIOGRAPHY))
FACTS = ("born_city", "born_year", "employer", "joined_year")


def biography_facts(context):
    """[{name, born_city, born_year, employer, joined_year}] of every biography in a context."""
    return [{k: m[k] for k in ("name",) + FACTS} for m in _BIO.finditer(context)]


def source_of(context, question, prediction, answers):
    """'another person' if the prediction names a fact of another person's biography in the
    context (one whose name is not in the question) that is not a gold answer, else 'no
    other's fact' (the asked-about person's own facts, repeated from the question, do not count)."""
    others = {p[k] for p in biography_facts(context) if p["name"] not in question
              for k in FACTS} - set(answers)
    return "another person" if any(v in prediction for v in others) else "no other's fact"


def rebuild(cfg):
    """The records of a qa run, from `evaluate.py --dry_run` with the run's settings."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    model = (cfg.get("resolved_model") or {}).get("name") or cfg.get("model") or "smollm2-135m"
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--task", "qa", "--dry_run", "--out_dir", tmp, "--model", model, "--seed", cfg["seed"],
                "--prompt", cfg["prompt"], "--lengths", ",".join(map(str, cfg["lengths"]))]
        argv += ["--max_samples", cfg["max_samples"]] if cfg.get("max_samples") else []
        argv += ["--no_chat_template"] if cfg.get("no_chat_template") else []
        proc = subprocess.run([sys.executable, os.path.join(root, "evaluate.py"), *map(str, argv)],
                              capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"evaluate.py --dry_run failed: {proc.stderr.strip()}")
        return [json.loads(x) for x in open(os.path.join(tmp, "qa_samples.jsonl"))]


def classify(path):
    """{label: (Counter {(pattern, source): n}, {(pattern, source): [predictions]}, questions)}
    of one evaluate.py qa output."""
    run = json.load(open(path))
    cfg = run["config"]
    if run.get("task") != "qa" or cfg.get("data"):
        sys.exit(f"{path}: not a qa evaluation of the built-in corpus")
    samples = rebuild(cfg)
    # the asked-about person's paragraph holds the gold answer: a context that does not
    # parse into biographies, one of them that person's, would be misclassified
    unparsed = sum(sum(s["record"]["answer"] in f.values() and f["name"] in s["question"]
                       for f in biography_facts(s["record"]["context"])) != 1 for s in samples)
    if unparsed:
        print(f"warning: {path}: {unparsed} of {len(samples)} contexts do not parse into "
              "biographies with the asked-about person's: their answers may be misclassified")
    out = {}
    for label, res in run["results"].items():
        if len(res["samples"]) != len(samples):
            sys.exit(f"{path}: {label} has {len(res['samples'])} answers, the config "
                     f"rebuilds {len(samples)} questions")
        kinds, examples = Counter(), {}
        for s, ans in zip(samples, res["samples"]):
            if ans["question"] != s["question"]:
                sys.exit(f"{path}: {label}: question {ans['question']!r} is not the "
                         f"rebuilt {s['question']!r} (another corpus version?)")
            if not ans["correct"]:
                key = (ans["pattern"], source_of(s["record"]["context"], s["question"],
                                                 ans["prediction"], s["answers"]))
                kinds[key] += 1
                examples.setdefault(key, []).append(ans["prediction"][:100])
        out[label] = (kinds, examples, len(samples))
    return out


def line(label, kinds, questions):
    wrong = sum(kinds.values())
    by_source = Counter()
    for (_, src), n in kinds.items():
        by_source[src] += n
    return (f"{label}: {wrong} of {questions} wrong ({', '.join(f'{src} {n}' for src, n in sorted(by_source.items()))}); "
            + ", ".join(f"{pat} / {src} {n}" for (pat, src), n in sorted(kinds.items())))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    p.add_argument("qa_json", nargs="+", help="evaluate.py --task qa outputs (TASK.json) on the "
                   "built-in corpus; with several, also a total per label, seeds pooled")
    args = p.parse_args(argv)
    totals = {}
    for path in args.qa_json:
        for label, (kinds, examples, questions) in classify(path).items():
            print(line(label, kinds, questions))
            for key in sorted(kinds):
                print(f"    {key[0]} / {key[1]}: " + " | ".join(map(repr, examples[key][:2])))
            t = totals.setdefault(re.sub(r"_s\d+$", "", label), [Counter(), 0, 0])
            t[0].update(kinds)
            t[1] += questions
            t[2] += 1
    if len(args.qa_json) > 1:
        for label, (kinds, questions, runs) in totals.items():
            print("total " + line(f"{label} ({runs} run{'s' * (runs > 1)})", kinds, questions))


if __name__ == "__main__":
    main()
