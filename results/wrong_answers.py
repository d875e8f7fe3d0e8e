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

The records are rebuilt from the run's config (corpus.qa_records, same seed and lengths) and
checked against the stored questions, so the counts need no stored contexts. Prints a line per
model and two examples per kind.
"""

import argparse
import json
import os
import re
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import corpus  # noqa: E402

# The biography template with its facts as groups: corpus.BIOGRAPHY, a pronoun for {He}.
_FIELDS = re.compile(r"\{(\w+)\}")
_BIO = re.compile(r"\s".join(
    _FIELDS.sub(lambda m: {"He": "(?:He|She|They)", "a_role": r"an? [\w -]+?",
                           "name": r"(?P<name>[A-Z][\w'-]*(?: [A-Z][\w'-]*)*)"}.get(m[1], rf"(?P<{m[1]}>[^.\n]+?)"),
                re.escape(s).replace(r"\{", "{").replace(r"\}", "}")) for s in corpus.BIOGRAPHY))
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    p.add_argument("qa_json", help="evaluate.py --task qa output (TASK.json) on the built-in corpus")
    args = p.parse_args(argv)
    run = json.load(open(args.qa_json))
    cfg = run["config"]
    if run.get("task") != "qa" or cfg.get("data"):
        sys.exit(f"{args.qa_json}: not a qa evaluation of the built-in corpus")
    import evaluate
    from models import load_tokenizer, resolve_model
    tok = load_tokenizer(resolve_model(cfg.get("model") or "smollm2-135m")["path"])
    eargs = evaluate.parse_args(["--task", "qa", "--seed", str(cfg["seed"]), "--prompt", cfg["prompt"]]
                                + ["--no_chat_template"] * bool(cfg["no_chat_template"]))
    samples = evaluate.qa_samples(eargs, tok, cfg["lengths"], cfg["max_samples"])
    unparsed = sum(len(biography_facts(s["record"]["context"])) != corpus.PEOPLE for s in samples)
    if unparsed:
        print(f"warning: {unparsed} of {len(samples)} contexts do not parse into "
              f"{corpus.PEOPLE} biographies: their answers may be misclassified")
    for label, res in run["results"].items():
        if len(res["samples"]) != len(samples):
            sys.exit(f"{args.qa_json}: {label} has {len(res['samples'])} answers, the config "
                     f"rebuilds {len(samples)} questions")
        kinds, examples = Counter(), {}
        for s, out in zip(samples, res["samples"]):
            if out["question"] != s["question"]:
                sys.exit(f"{args.qa_json}: {label}: question {out['question']!r} is not the "
                         f"rebuilt {s['question']!r} (another corpus version?)")
            if not out["correct"]:
                key = (out["pattern"], source_of(s["record"]["context"], s["question"], out["prediction"],
                                       s["answers"]))
                kinds[key] += 1
                examples.setdefault(key, []).append(out["prediction"][:100])
        wrong = sum(kinds.values())
        print(f"{label}: {wrong} of {len(samples)} wrong; " + ", ".join(
            f"{pat} / {src} {n}" for (pat, src), n in sorted(kinds.items())))
        for key in sorted(kinds):
            print(f"    {key[0]} / {key[1]}: " + " | ".join(map(repr, examples[key][:2])))


if __name__ == "__main__":
    main()
