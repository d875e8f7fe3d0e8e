"""
The README's results table, regenerated from the summaries in results/*.json alone,
so that no number in it is typed by hand. evaluate.py --results_dir results writes one summary
per evaluated model and task (schema: evaluate.py's docstring and results/README.md).

    python results/make_table.py                     # print the table (Markdown) and the tests
    python results/make_table.py --write README.md   # put it between the README's markers
    python results/make_table.py --check README.md   # exit 1 if the README's copy differs
                                                     # (tests/test_results.py runs this check)
    python results/make_table.py --write results/README.md   # its table of every run

--write and --check fill (or compare) each of the two blocks whose markers the file holds: the
results table (README.md) and the table of every run in counts (results/README.md).

One row per method (base, rope, sft, logo, logo_m1, logo_m3; those with a summary), columns:
QA accuracy at 2K and 12K, MV-NIAH recall and retrieval score at 12K, perplexity on the Paul
Graham essays at 2K and 8K, the hallucination and unfollow rates at 2K (paper Appendix C). A
cell is the mean over training seeds of each seed's value, +- the sample standard deviation
over seeds, a 95% interval (accuracies and rates: Wilson on the questions of all seeds pooled;
retrieval score and perplexity: Student's t over seeds) and the number of seeds. Several
summaries of one (method, seed) at one length (the 12K cells split over evaluation seeds) are
pooled, never counted twice: a question or perplexity measured twice is an error. Below the
table: a second one of the four error-pattern rates per QA length (paper Appendix C), then
LOGO against SFT on the same questions, an exact sign-flip permutation test of the
per-question correctness (and of the hallucination indicator) averaged over each method's
seeds (with one seed each it is the exact McNemar test). Reads results/*.json only; imports
the standard library only.
"""

import argparse
import difflib
import glob
import itertools
import json
import math
import os
import sys
from fractions import Fraction

HERE = os.path.dirname(os.path.abspath(__file__))
BEGIN, END = "<!-- results-table:begin -->", "<!-- results-table:end -->"
# results/README.md's table of every run (method and training seed) in counts
RUN_BEGIN, RUN_END = "<!-- per-run-table:begin -->", "<!-- per-run-table:end -->"
METHODS = {"base": "base (checkpoint's rope_theta)", "rope": "base, rope_theta raised, untrained",
           "sft": "SFT on the chosen responses", "logo": "LOGO (M = 2)",
           "logo_m1": "LOGO, M = 1", "logo_m3": "LOGO, M = 3"}
# (header, task, length in tokens, metric, kind): kind 'rate' = a share of counted items
# (Wilson interval), 'mean' = a score per seed (t interval over seeds)
COLUMNS = [("QA accuracy, 2K", "qa", 2048, "accuracy", "rate"),
           ("QA accuracy, 12K", "qa", 12288, "accuracy", "rate"),
           ("MV-NIAH recall, 12K", "mvniah", 12288, "recall", "rate"),
           ("retrieval score, 12K", "mvniah", 12288, "retrieval_score", "mean"),
           ("ppl, PG essays 2K", "ppl", 2048, "ppl", "mean"),
           ("ppl, PG essays 8K", "ppl", 8192, "ppl", "mean"),
           ("hallucination, 2K", "qa", 2048, "hallucination", "rate"),
           ("unfollow, 2K", "qa", 2048, "unfollow", "rate")]
PAIRED_LENGTHS = [2048, 12288]                 # QA lengths of the LOGO vs SFT test
Z95 = 1.959963984540054                        # standard normal 0.975 quantile
# Student's t 0.975 quantiles by degrees of freedom (1..30); above 30 the normal's
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results_dir", default=HERE,
                   help="folder of evaluate.py's summaries (default: this script's folder)")
    p.add_argument("--ppl_text", default="pg-essays",
                   help="the perplexity columns read summaries of this --text (its folder name)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--check", metavar="README", default=None,
                   help="exit 1 if README's text between the markers is not what this prints")
    g.add_argument("--write", metavar="README", default=None,
                   help="replace README's text between the markers with the table")
    g.add_argument("--pair", nargs=2, metavar=("BASE.json", "OTHER.json"), default=None,
                   help="two qa summaries of the same questions (the demo's base and adapter): "
                        "accuracy with its Wilson interval, error patterns, exact McNemar test")
    return p.parse_args(argv)


def pair_text(path_a, path_b):
    """The demo's comparison: two qa summaries, per length accuracy [95% Wilson interval],
    pattern rates, and the exact McNemar test on the questions both answered."""
    runs = []
    for path in (path_a, path_b):
        with open(path, encoding="utf-8") as f:
            s = json.load(f)
        if s.get("task") != "qa":
            raise SystemExit(f"error: {path}: not a qa summary (task {s.get('task')!r})")
        runs.append(s)
    lines = []
    for L in runs[0]["metrics"]["lengths"]:
        for s in runs:
            m = s["metrics"]["lengths"].get(L)
            if m is None:
                raise SystemExit(f"error: {s['label']} has no length {L}")
            lo, hi = wilson(m["correct"], m["n"])
            rates = ", ".join(f"{k} {v:.2f}" for k, v in m["patterns"].items())
            lines.append(f"{L:>6} tokens  {s['label']:<10} accuracy {m['correct']}/{m['n']} = "
                         f"{m['accuracy']:.2f} [95% {lo:.2f}, {hi:.2f}]  patterns: {rates}")
        got = [{q["id"]: q["correct"] for q in s["metrics"]["questions"] if str(q["length"]) == L}
               for s in runs]
        both = sorted(set(got[0]) & set(got[1]))
        diffs = [int(got[1][q]) - int(got[0][q]) for q in both]
        lines.append(f"{L:>6} tokens  {runs[1]['label']} - {runs[0]['label']}: "
                     f"{sum(d > 0 for d in diffs)} questions right only for {runs[1]['label']}, "
                     f"{sum(d < 0 for d in diffs)} only for {runs[0]['label']} ({len(both)} paired); "
                     f"exact McNemar p = {float(sign_flip_p(diffs)):.2g}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Statistics (standard library only, checked in tests/test_results.py against independent
# formulas and published values).

def wilson(k, n, z=Z95):
    """Wilson score interval of k successes in n trials: the p with |k/n - p| equal to
    z sqrt(p(1-p)/n). 8 of 10 -> (0.490, 0.943). (None, None) for n = 0."""
    if n == 0:
        return None, None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_std(values):
    """Mean and sample standard deviation (n - 1; None for one value)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def t_interval(values):
    """95% Student's t interval of the mean over seeds; (None, None) for one value."""
    m, s = mean_std(values)
    if s is None:
        return None, None
    df = len(values) - 1
    t = T975[df - 1] if df <= len(T975) else Z95
    half = t * s / math.sqrt(len(values))
    return m - half, m + half


def sign_flip_p(diffs):
    """Exact two-sided sign-flip permutation test of paired differences (rationals): under
    H0 each difference's sign is a fair coin; p = P(|sum| >= |observed sum|), enumerated
    exactly by dynamic programming over the sums (no sampling). With differences in
    {-1, 0, 1} (one seed per method) this is the exact McNemar test: 8 questions right for
    one only and 1 for the other only -> p = 2 (1 + 9) / 2^9 = 0.039."""
    diffs = [Fraction(d) for d in diffs if d != 0]
    if not diffs:
        return 1.0
    scale = math.lcm(*(d.denominator for d in diffs))
    ints = [abs(int(d * scale)) for d in diffs]              # integers, same sums up to scale
    observed = abs(sum(int(d * scale) for d in diffs))
    dist = {0: 1}                                            # sum -> number of sign patterns
    for d in ints:
        nxt = {}
        for s, c in dist.items():
            nxt[s + d] = nxt.get(s + d, 0) + c
            nxt[s - d] = nxt.get(s - d, 0) + c
        dist = nxt
    extreme = sum(c for s, c in dist.items() if abs(s) >= observed)
    return extreme / 2 ** len(ints)


def seed_permutation_p(a, b):
    """Exact two-sided permutation test of two groups of per-seed values (rationals): under H0
    the seed values are exchangeable between the methods; p = the share of the C(n, len(a))
    splits whose |difference of means| is at least the observed one. With 3 seeds each the
    smallest possible p is 2 / 20 = 0.1: three seeds cannot show a seed-level difference."""
    pooled = [Fraction(v) for v in a + b]
    k, n, total = len(a), len(pooled), sum(pooled)
    def gap(idx):                                  # |mean of the chosen k - mean of the rest|
        part = sum(pooled[i] for i in idx)
        return abs(part / k - (total - part) / (n - k))
    observed = gap(range(k))
    return sum(gap(idx) >= observed for idx in itertools.combinations(range(n), k)) / math.comb(n, k)


# ----------------------------------------------------------------------------------------
# Reading the summaries.

def load(results_dir):
    """Every results_dir/*.json, in name order (a file that is not JSON stops the script)."""
    out = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path, encoding="utf-8") as f:
            try:
                s = json.load(f)
            except json.JSONDecodeError as e:
                sys.exit(f"error: {path} is not valid JSON ({e.msg}, line {e.lineno}); rerun "
                         "the evaluation that wrote it or delete it")
        s["_path"] = os.path.basename(path)
        out.append(s)
    return out


def collect(summaries, ppl_text):
    """{(method, seed): {(task, length): pooled}} with pooled
    qa:     {question id: (correct, pattern)};
    mvniah: {'found', 'values', 'n', 'heads': [(n, head_scores)], 'scores': [(n, score)]};
    ppl:    the perplexity (one per (method, seed, length))."""
    cells, where = {}, {}
    for s in summaries:
        task, m = s["task"], s["metrics"]
        # the built-in held-out data only (qa --data / mvniah --haystack are other tasks)
        if task == "qa" and s["config"].get("data") or \
                task == "mvniah" and s["config"].get("haystack") or \
                task == "ppl" and s.get("eval_data") != ppl_text or \
                task not in ("qa", "mvniah", "ppl"):
            continue
        got = cells.setdefault((s["method"], s["seed"]), {})
        if task == "qa":
            for q in m["questions"]:
                cell = got.setdefault(("qa", int(q["length"])), {})
                if q["id"] in cell:
                    sys.exit(f"error: question {q['id']} of {s['method']} seed {s['seed']} is in "
                             f"{where[q['id'], s['method'], s['seed']]} and {s['_path']}; "
                             "delete one of the two")
                where[q["id"], s["method"], s["seed"]] = s["_path"]
                cell[q["id"]] = (bool(q["correct"]), q["pattern"])
        elif task == "mvniah":
            for L, v in m["lengths"].items():
                key = ("mvniah", int(L))
                cell = got.setdefault(key, {"found": 0, "values": 0, "n": 0, "heads": [],
                                            "scores": [], "ids": set()})
                ids = {x["id"] for x in m["samples"] if str(x["length"]) == L}
                if ids & cell["ids"]:
                    sys.exit(f"error: MV-NIAH samples of {s['method']} seed {s['seed']} at {L} "
                             f"are in two summaries ({s['_path']} and an earlier one); delete one")
                cell["ids"] |= ids
                cell["found"] += v["values_found"]
                cell["values"] += v["values"]
                cell["n"] += v["n"]
                cell["scores"].append((v["n"], v["retrieval_score"]))
                if m.get("head_scores") is not None and len(m["lengths"]) == 1:
                    cell["heads"].append((v["n"], m["head_scores"]))
        else:
            for L, v in m["lengths"].items():
                key = ("ppl", int(L))
                if key in got:
                    sys.exit(f"error: two perplexities of {s['method']} seed {s['seed']} at {L} "
                             f"on {ppl_text} (one in {s['_path']}); delete one")
                got[key] = v["ppl"]
    return cells


def retrieval_head_score(heads, threshold=0.1, top_k=10):
    """evaluate.retrieval_head_score on head scores averaged over samples (Appendix B)."""
    kept = sorted((x for row in heads for x in row if x >= threshold), reverse=True)[:top_k]
    return sum(kept) / len(kept) if kept else 0.0


def seed_value(pooled, task, metric):
    """(value, successes, trials) of one seed's cell; successes/trials for rates only."""
    if task == "qa":
        rows = list(pooled.values())
        hits = sum(c for c, _ in rows) if metric == "accuracy" else \
            sum(p == metric for _, p in rows)
        return hits / len(rows), hits, len(rows)
    if task == "mvniah":
        if metric == "recall":
            return pooled["found"] / pooled["values"], pooled["found"], pooled["values"]
        n = sum(w for w, _ in pooled["heads"])
        if len(pooled["heads"]) == len(pooled["scores"]) and n:
            # pooled over evaluations: the sample-weighted per-head mean, then the cut
            rows = len(pooled["heads"][0][1])
            mean = [[sum(w * h[i][j] for w, h in pooled["heads"]) / n
                     for j in range(len(pooled["heads"][0][1][i]))] for i in range(rows)]
            return retrieval_head_score(mean), None, None
        total = sum(w for w, _ in pooled["scores"])
        return sum(w * v for w, v in pooled["scores"]) / total, None, None
    return pooled, None, None


def cell_text(per_seed, kind, digits):
    """'mean +- std [lo, hi] (seeds)' of a list of seed_value tuples; 'n/a' if empty."""
    if not per_seed:
        return "n/a"
    values = [v for v, _, _ in per_seed]
    m, s = mean_std(values)
    if kind == "rate" and len(values) == 1:   # one run: its questions are the only spread
        lo, hi = wilson(per_seed[0][1], per_seed[0][2])
    else:                                     # the training seed as the unit: 300 answers of 3
        lo, hi = t_interval(values)           # adapters to 100 questions are not 300 draws
        if kind == "rate" and lo is not None:  # a rate stays in [0, 1]
            lo, hi = max(lo, 0.0), min(hi, 1.0)
    text = f"{m:.{digits}f}"
    if s is not None:
        text += f" ± {s:.{digits}f}"
    if lo is not None:
        text += f" [{lo:.{digits}f}, {hi:.{digits}f}]"
    return text + f" ({len(values)})"


PATTERNS = ("correct", "hallucination", "unfollow", "empty")   # paper Appendix C


def pattern_lines(cells, methods):
    """A second table: per method and QA length the four error-pattern rates, each the mean
    over training seeds of that seed's share of questions."""
    lines = ["| method | " + " | ".join(f"QA {L // 1024}K: " + " / ".join(PATTERNS)
                                        for L in PAIRED_LENGTHS) + " |",
             "|---|" + "---:|" * len(PAIRED_LENGTHS)]
    for method in methods:
        row = [METHODS.get(method, method)]
        for L in PAIRED_LENGTHS:
            seeds = [c[("qa", L)] for (mt, _), c in cells.items() if mt == method and ("qa", L) in c]
            if not seeds:
                row.append("n/a")
                continue
            rates = [sum(seed_value(pooled, "qa", p)[0] for pooled in seeds) / len(seeds)
                     for p in PATTERNS]
            row.append(" / ".join(f"{r:.2f}" for r in rates) + f" ({len(seeds)})")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def paired_lines(cells):
    """LOGO against SFT on the questions both answered, per QA length: accuracy, and the
    hallucination rate (the paper's claim is fewer hallucinations for LOGO)."""
    lines = []
    for what, hit in (("accuracy", lambda c, p: c), ("hallucination rate",
                                                     lambda c, p: p == "hallucination")):
        for L in PAIRED_LENGTHS:
            per = {}
            for method in ("logo", "sft"):
                seeds = [c[("qa", L)] for (mt, _), c in cells.items()
                         if mt == method and ("qa", L) in c]
                ids = {}
                for pooled in seeds:
                    for qid, (correct, pattern) in pooled.items():
                        ids.setdefault(qid, []).append(int(hit(correct, pattern)))
                per[method] = (len(seeds), {q: Fraction(sum(v), len(v)) for q, v in ids.items()})
            common = sorted(set(per["logo"][1]) & set(per["sft"][1]))
            head = f"- LOGO vs SFT, QA at {L // 1024}K: "
            if not common:
                lines.append(head + "n/a (no question answered by both)")
                continue
            diffs = [per["logo"][1][q] - per["sft"][1][q] for q in common]
            a = sum(per["logo"][1][q] for q in common) / len(common)
            b = sum(per["sft"][1][q] for q in common) / len(common)
            lines.append(head + f"{len(common)} questions answered by both (seeds: LOGO "
                         f"{per['logo'][0]}, SFT {per['sft'][0]}), mean {what} {float(a):.3f} vs "
                         f"{float(b):.3f} (difference {float(a - b):+.3f}), "
                         f"two-sided p = {sign_flip_p(diffs):.3g}")
    # the seed as the unit: each seed's accuracy, and an exact permutation test of them
    for L in PAIRED_LENGTHS:
        # seed_value's (hits, questions) of each seed, in seed order as the table's cells
        per = {method: [Fraction(*seed_value(cells[method, s][("qa", L)], "qa", "accuracy")[1:])
                        for s in sorted((s for mt, s in cells if mt == method
                                         and ("qa", L) in cells[mt, s]), key=str)]
               for method in ("logo", "sft")}
        if min(map(len, per.values())) < 2:          # one seed each: p = 1 whatever happens
            continue
        show = {m: "/".join(f"{float(v):.2f}" for v in vals) for m, vals in per.items()}
        lines.append(f"- LOGO vs SFT, QA at {L // 1024}K, the training seed as the unit: "
                     f"accuracy per seed LOGO {show['logo']}, SFT {show['sft']}, exact "
                     f"permutation test of the seed values, two-sided p = "
                     f"{seed_permutation_p(per['logo'], per['sft']):.3g}")
    return lines


def method_order(cells):
    """The methods with a cell, in METHODS' order (others after, by name)."""
    return sorted({m for m, _ in cells}, key=lambda m: (list(METHODS).index(m)
                                                        if m in METHODS else len(METHODS), m))


def per_run_table(results_dir, ppl_text="pg-essays"):
    """results/README.md's table: one row per run (method and training seed) in counts, the
    numbers the README's cells are made of."""
    cells = collect(load(results_dir), ppl_text)
    mv = next(L for _, task, L, _, _ in COLUMNS if task == "mvniah")
    ppl = [L for _, task, L, _, _ in COLUMNS if task == "ppl"]
    lines = ["| run | " + " | ".join(f"QA {L // 1024}K: " + " / ".join(PATTERNS)
                                     for L in PAIRED_LENGTHS)
             + f" | MV-NIAH {mv // 1024}K values found | retrieval score, {mv // 1024}K | "
             + " | ".join(f"ppl {L // 1024}K" for L in ppl) + " |",
             "|---|" + "---:|" * (len(PAIRED_LENGTHS) + 2 + len(ppl))]
    for method in method_order(cells):
        for seed in sorted((s for m, s in cells if m == method), key=str):
            got, row = cells[method, seed], [method if seed is None else f"{method}_s{seed}"]
            for L in PAIRED_LENGTHS:
                q = got.get(("qa", L))
                row.append("n/a" if q is None else " / ".join(
                    str(seed_value(q, "qa", p)[1]) for p in PATTERNS) + f" of {len(q)}")
            m = got.get(("mvniah", mv))
            row += ["n/a", "n/a"] if m is None else [
                f"{m['found']} of {m['values']}",
                f"{seed_value(m, 'mvniah', 'retrieval_score')[0]:.2f}"]
            row += [f"{got['ppl', L]:.2f}" if ("ppl", L) in got else "n/a" for L in ppl]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines + ["", "QA: counts of the four error patterns (paper Appendix C; "
                              "`accuracy` counts the correct ones) of the questions asked; "
                              "MV-NIAH: needle values found of those hidden. Generated by "
                              "`python results/make_table.py --write results/README.md`."])


def make_table(results_dir, ppl_text="pg-essays"):
    """The Markdown between the README's markers, from results_dir/*.json alone."""
    header = "| method | " + " | ".join(c[0] for c in COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(COLUMNS)
    summaries = load(results_dir)
    if not summaries:
        return "\n".join([header, rule, "", "No results yet: results/ holds no summaries "
                          "(evaluate.py --results_dir results writes them)."])
    cells = collect(summaries, ppl_text)
    methods = method_order(cells)
    rows = []
    for method in methods:
        seeds = sorted((seed for mt, seed in cells if mt == method), key=str)
        row = [METHODS.get(method, method)]
        for _, task, L, metric, kind in COLUMNS:
            per_seed = [seed_value(cells[method, s][task, L], task, metric)
                        for s in seeds if (task, L) in cells[method, s]]
            row.append(cell_text(per_seed, kind, 2))
        rows.append("| " + " | ".join(row) + " |")
    notes = [
        "",
        "Each cell: mean over training seeds ± sample standard deviation over seeds (n - 1; "
        "none with one seed) [95% interval] (number of seeds; base and rope are untrained: one). "
        "Every interval takes the training seed as the unit: Student's t over the seeds' values; "
        "rates clipped to [0, 1]; with one run (base, rope), accuracies and rates get a Wilson score interval on its "
        "questions (MV-NIAH recall: on its needle values, 4 per sample, not independent, so too "
        "narrow), retrieval score and perplexity none. n/a: not run. Generated by "
        "`python results/make_table.py` from "
        f"{len(summaries)} summaries in results/.",
        "",
        "Error patterns of the QA answers (paper Appendix C; share of the questions, mean "
        "over seeds (number of seeds)):",
        "",
    ] + pattern_lines(cells, methods) + [
        "",
        "Paired tests on the same questions: each question's correctness (or hallucination) "
        "averaged over a method's seeds, exact sign-flip permutation test of the differences "
        "(the exact McNemar test with one seed each); then the same comparison with the "
        "training seed as the unit (per-seed accuracies exchanged between the methods):",
        "",
    ] + paired_lines(cells)
    return "\n".join([header, rule] + rows + notes)


# ----------------------------------------------------------------------------------------
# The objective experiment (results/README.md, "The objective experiment"): LOGO with
# lambda = 1 against SFT, 5 training seeds each, results/objective/ARM/ (objective.sh).

OBJ_BEGIN, OBJ_END = "<!-- objective-table:begin -->", "<!-- objective-table:end -->"
OBJ_ARMS = {"sft": "SFT (NLL weight 1)", "logo-l1": "LOGO, lambda = 1",
            "logo-l01": "LOGO, lambda = 0.1 (paper)", "logo-ref": "LOGO, lambda = 1, reference-based",
            "context": "untrained, rope_theta 2.5e5"}
# (header, task, length, evaluation data tag, metric); metric of a question list or 'ppl'
OBJ_COLUMNS = [("**QA 12K accuracy** (primary)", "qa", 12288, "e2468", "accuracy"),
               ("QA 2K accuracy", "qa", 2048, "e5678", "accuracy"),
               ("ppl 2K", "ppl", 2048, "pg-essays", "ppl"),
               ("ppl 8K", "ppl", 8192, "pg-essays", "ppl"),
               ("12K empty", "qa", 12288, "e2468", "empty_rate"),
               ("12K accuracy, non-empty", "qa", 12288, "e2468", "accuracy_nonempty"),
               ("12K distractor fact", "qa", 12288, "e2468", "distractor_rate"),
               ("2K empty", "qa", 2048, "e5678", "empty_rate"),
               ("2K distractor fact", "qa", 2048, "e5678", "distractor_rate")]
OBJ_PRIMARY = ("logo-l1", "sft")


def question_rate(questions, metric):
    """(rate, hits, trials) over one summary's questions at one length, from the per-question
    fields (correct, pattern, distractor); None when no question counts."""
    if metric == "accuracy":
        rows, hit = questions, lambda q: q["correct"]
    elif metric == "empty_rate":
        rows, hit = questions, lambda q: q["pattern"] == "empty"
    elif metric == "accuracy_nonempty":
        rows, hit = [q for q in questions if q["pattern"] != "empty"], lambda q: q["correct"]
    else:                                                    # distractor_rate: known ones
        rows, hit = [q for q in questions if q.get("distractor") is not None], lambda q: q["distractor"]
    k = sum(bool(hit(q)) for q in rows)
    return (k / len(rows), k, len(rows)) if rows else None


def objective_cells(folder):
    """{(task, length, data, metric): {seed: (value, hits, trials)}} of one arm's folder."""
    cells = {}
    for s in load(folder) if os.path.isdir(folder) else []:
        for _, task, L, data, metric in OBJ_COLUMNS:
            if s["task"] != task or s.get("eval_data") != data or str(L) not in s["metrics"]["lengths"]:
                continue
            if task == "ppl":
                got = (s["metrics"]["lengths"][str(L)]["ppl"], None, None)
            else:
                got = question_rate([q for q in s["metrics"]["questions"] if int(q["length"]) == L], metric)
            if got is not None:
                seeds = cells.setdefault((task, L, data, metric), {})
                if s["seed"] in seeds:
                    sys.exit(f"error: two {task} summaries of seed {s['seed']} at {L} in {folder}")
                seeds[s["seed"]] = got
    return cells


def objective_table(results_dir, ppl_text="pg-essays"):
    """The README's table of the objective experiment: arms x endpoints, the lr grid, the
    primary test (exact permutation test of the per-seed 12K accuracies), training
    reward accuracy, perplexity against the untrained model."""
    root = os.path.join(results_dir, "objective")
    arms = {arm: objective_cells(os.path.join(root, arm)) for arm in OBJ_ARMS}
    lines = ["| arm | " + " | ".join(c[0] for c in OBJ_COLUMNS) + " |",
             "|---|" + "---:|" * len(OBJ_COLUMNS)]
    for arm, cells in arms.items():
        if cells:
            lines.append(f"| {OBJ_ARMS[arm]} | " + " | ".join(cell_text(
                [v for _, v in sorted(cells.get(c[1:], {}).items(), key=lambda x: str(x[0]))],
                "mean" if c[4] == "ppl" else "rate", 2) for c in OBJ_COLUMNS) + " |")
    lines += ["", "Each cell: mean over training seeds ± standard deviation [95% Student's t "
              "interval over seeds, rates clipped to [0, 1]; the untrained row: a Wilson interval "
              "on its questions] (seeds). QA 12K: 40 questions of evaluation seed 2468, beyond "
              "the native 8K window; QA 2K: 100 of seed 5678; distractor fact: wrong answers "
              "stating another in-context person's value of the asked fact (corpus ground truth). "
              "Generated by `python results/make_table.py` from results/objective/.", ""]
    a, b = OBJ_PRIMARY
    key = OBJ_COLUMNS[0][1:]
    va, vb = (arms[x].get(key, {}) for x in (a, b))
    if len(va) >= 2 and len(vb) >= 2:
        fa, fb = ([Fraction(h, n) for _, h, n in v.values()] for v in (va, vb))
        ma, mb = sum(fa) / len(fa), sum(fb) / len(fb)
        ss = sum((x - ma) ** 2 for x in fa) + sum((x - mb) ** 2 for x in fb)
        df = len(fa) + len(fb) - 2
        half = T975[df - 1] * math.sqrt(float(ss) / df * (1 / len(fa) + 1 / len(fb)))
        lines.append(f"**Primary test** ({OBJ_ARMS[a]} vs {OBJ_ARMS[b]}, QA 12K accuracy per "
                     f"training seed: {' / '.join(f'{float(x):.3f}' for x in fa)} vs "
                     f"{' / '.join(f'{float(x):.3f}' for x in fb)}): difference of means "
                     f"{float(ma - mb):+.3f} [95% pooled t {float(ma - mb) - half:+.3f}, "
                     f"{float(ma - mb) + half:+.3f}], exact two-sided permutation test of the "
                     f"{len(fa)} + {len(fb)} seed values p = {seed_permutation_p(fa, fb):.3g} "
                     f"(alpha 0.05; the smallest p possible: "
                     f"{2 / math.comb(len(fa) + len(fb), len(fa)):.3g}).")
    else:
        lines.append(f"**Primary test**: not yet ({len(va)} and {len(vb)} seeds of "
                     f"{OBJ_ARMS[a]} and {OBJ_ARMS[b]} with a 12K summary; 5 each planned).")
    ctx = arms["context"]
    for L in (2048, 8192):
        base = ctx.get(("ppl", L, ppl_text, "ppl"), {})
        if base:
            ref = next(iter(base.values()))[0]
            rel = [f"{OBJ_ARMS[arm]} {100 * (sum(v[0] for v in c.values()) / len(c) / ref - 1):+.1f}%"
                   for arm, cells in arms.items() if arm != "context"
                   for c in [cells.get(("ppl", L, ppl_text, "ppl"))] if c]
            if rel:
                lines.append(f"- Perplexity at {L // 1024}K against the untrained model "
                             f"({ref:.2f}; goal: within 5%): " + ", ".join(rel) + ".")
    grid = {}
    for path in sorted(glob.glob(os.path.join(root, "grid", "*_lr*"))):
        arm, lr = os.path.basename(path).rsplit("_lr", 1)
        for s in load(path):
            if s["task"] == "qa" and s.get("eval_data") == "e999":
                grid.setdefault(arm, {})[lr] = question_rate(s["metrics"]["questions"], "accuracy")
    for arm, accs in grid.items():
        best = max(sorted(accs, key=float), key=lambda lr: accs[lr][0])
        lines.append(f"- lr grid, {OBJ_ARMS.get(arm, arm)} (seed 0; QA 2K, validation seed 999): "
                     + ", ".join(f"{lr}: {h}/{n}" for lr, (_, h, n) in sorted(accs.items(), key=lambda x: float(x[0])))
                     + (f"; chosen {best}." if len(accs) == 3 else f"; best so far {best} (grid incomplete)."))
    for arm in OBJ_ARMS:
        runs = []
        for path in sorted(glob.glob(os.path.join(root, arm, "train", "*.json"))):
            with open(path, encoding="utf-8") as f:
                m = json.load(f)["metrics"]
            runs.append((m["first_quarter"]["reward_accuracy"], m["last_quarter"]["reward_accuracy"]))
        if runs:
            lines.append(f"- Training reward accuracy, {OBJ_ARMS[arm]}, first -> last quarter of the "
                         f"steps (mean of {len(runs)} runs): {sum(r[0] for r in runs) / len(runs):.2f}"
                         f" -> {sum(r[1] for r in runs) / len(runs):.2f}.")
    # The experiment's CPU time so far: a training run once (seed 0's summary is in grid/ and in its arm's
    # train/), every evaluation summary's command wall time (answers a killed run left are reused, not timed).
    train_s, eval_s, reused, cpus = {}, 0.0, 0, set()
    for path in glob.glob(os.path.join(root, "**", "*.json"), recursive=True):
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        cpus.add(d.get("cpu"))
        if "step_seconds" in d:
            train_s[d["out_dir"]] = d["step_seconds"]
        elif "command_wall_s" in d:
            eval_s, reused = eval_s + d["command_wall_s"], reused + (d.get("reused_answers") or 0)
    if train_s or eval_s:
        lines.append(f"- CPU time so far (one thread per job, two jobs at a time; {', '.join(sorted(map(str, cpus)))}): "
                     f"training {sum(train_s.values()) / 3600:.1f} h ({len(train_s)} runs, their step times), "
                     f"evaluation {eval_s / 3600:.1f} h (the runs that wrote the summaries; {reused} answers reused "
                     "from killed runs are not timed).")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------

def readme_block(text, path, begin=BEGIN, end=END):
    """(before, inside, after) the markers; exits 2 when they are missing."""
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        sys.exit(f"error: {path} needs one {begin} line and one {end} line after it; add them "
                 "where the table goes")
    before, rest = text.split(begin)
    inside, after = rest.split(end)
    return before, inside, after


# (markers, what goes between them): --write / --check handle those a file holds
BLOCKS = ((BEGIN, END, make_table), (RUN_BEGIN, RUN_END, per_run_table),
          (OBJ_BEGIN, OBJ_END, objective_table))


def main(argv=None):
    args = parse_args(argv)
    if args.pair:
        print(pair_text(*args.pair))
        return 0
    path = args.check or args.write
    if path is None:
        print(make_table(args.results_dir, args.ppl_text))
        return 0
    with open(path, encoding="utf-8") as f:
        text = f.read()
    # a file with neither pair of markers: readme_block's error, for the results table
    blocks = [b for b in BLOCKS if b[0] in text or b[1] in text] or BLOCKS[:1]
    stale = 0
    for begin, end, maker in blocks:
        before, inside, after = readme_block(text, path, begin, end)
        table = maker(args.results_dir, args.ppl_text)
        if args.write:
            text = before + begin + "\n\n" + table + "\n\n" + end + after
        elif inside.strip("\n") != table:
            stale += 1
            diff = difflib.unified_diff(inside.strip("\n").splitlines(), table.splitlines(),
                                        f"{path} (now)", "make_table.py", lineterm="")
            print("\n".join(diff), file=sys.stderr)
    if args.check:
        if not stale:
            print(f"{path}: the results table is up to date")
            return 0
        print(f"error: {path}'s results table differs from results/*.json; run: python "
              f"results/make_table.py --write {path}", file=sys.stderr)
        return 1
    tmp = f"{path}.tmp{os.getpid()}"                 # temporary name, then rename
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    print(f"wrote the results table into {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
