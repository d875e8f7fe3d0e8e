"""results/make_table.py on hand-made summaries (means, spreads, Wilson and t intervals, the
paired sign-flip test, each against hand-computed values or an independent brute force),
evaluate.py --results_dir on the tiny model, and the README's table against the script's
output on the committed results/ folder (no number in it typed by hand)."""

import importlib.util
import argparse
import itertools
import json
import math
import os
from fractions import Fraction

import pytest
import torch

import evaluate as ev
import summaries
from test_evaluate import make_adapter
from models import tiny_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def results_script(name):
    """results/NAME.py as a module (results/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "results", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mt = results_script("make_table")


# ----------------------------------------------------------------------------------------
# Statistics against independent references.

def wilson_by_bisection(k, n, z=1.959963984540054):
    """The two roots of (k/n - p)^2 = z^2 p (1 - p) / n, found numerically (the definition of
    the Wilson interval, not its closed form)."""
    f = lambda p: (k / n - p) ** 2 - z * z * p * (1 - p) / n
    def root(a, b):                      # f changes sign on [a, b]
        for _ in range(200):
            m = (a + b) / 2
            a, b = (m, b) if (f(a) > 0) == (f(m) > 0) else (a, m)
        return (a + b) / 2
    p = k / n
    lo = 0.0 if k == 0 else root(0.0, p)
    hi = 1.0 if k == n else root(p, 1.0)
    return lo, hi


def test_wilson_interval_matches_published_values_and_its_definition():
    lo, hi = mt.wilson(8, 10)
    assert (round(lo, 3), round(hi, 3)) == (0.490, 0.943)        # the textbook example
    lo, hi = mt.wilson(0, 10)                                     # Wilson: [0, z^2/(n+z^2)]
    assert lo == 0.0 and hi == pytest.approx(3.8415 / 13.8415, abs=1e-4)
    for k, n in [(1, 20), (12, 20), (16, 20), (37, 100), (100, 100)]:
        assert mt.wilson(k, n) == pytest.approx(wilson_by_bisection(k, n), abs=1e-9)


def brute_sign_flip(diffs):
    """Every one of the 2^n sign patterns, counted by enumeration."""
    obs = abs(sum(diffs))
    hits = sum(abs(sum(s * d for s, d in zip(signs, diffs))) >= obs - 1e-12
               for signs in itertools.product((1, -1), repeat=len(diffs)))
    return hits / 2 ** len(diffs)


def test_sign_flip_test_is_exact_mcnemar_with_one_seed_and_matches_enumeration():
    # 8 questions right for LOGO only, 1 for SFT only, the rest tied: McNemar's exact test,
    # two-sided = 2 P(X <= 1), X ~ Bin(9, 1/2) = 2 (1 + 9) / 512
    diffs = [1] * 8 + [-1] + [0] * 11
    assert mt.sign_flip_p(diffs) == pytest.approx(20 / 512)
    assert mt.sign_flip_p([0, 0]) == 1.0
    # averaged over seeds: halves and thirds, against the brute force
    for d in ([0.5, 0.5, 1], [Fraction(1, 3), Fraction(-2, 3), 1, 1, Fraction(1, 2)],
              [1, -1, 1, -1, Fraction(1, 2)]):
        assert mt.sign_flip_p(d) == pytest.approx(brute_sign_flip([float(x) for x in d]))


# ----------------------------------------------------------------------------------------
# make_table on hand-made summaries (the fields evaluate.py writes that make_table reads).

def qa_file(folder, method, seed, correct, length=2048, patterns=None, eval_seed=1234):
    questions = [{"id": f"{length}/{i}/q{i}", "length": length, "correct": bool(c),
                  "pattern": (patterns or {}).get(i, "correct" if c else "unfollow")}
                 for i, c in enumerate(correct)]
    write(folder, f"{method}_s{seed}_qa_{length}_e{eval_seed}.json",
          {"method": method, "seed": seed, "task": "qa", "eval_data": f"e{eval_seed}",
           "config": {"data": None}, "metrics": {"questions": questions}})


def write(folder, name, summary):
    with open(os.path.join(folder, name), "w") as f:
        json.dump(summary, f)


def hand_made(folder):
    """SFT seeds 0 / 1: 5 and 7 of 10 right; LOGO seeds 0 / 1: 8 and 8; base 8 (the same 10
    question ids). LOGO seed 0 says 'hallucination' on its 2 misses, seed 1 on one."""
    sft = {0: [1] * 5 + [0] * 5, 1: [1] * 7 + [0] * 3}
    logo = {0: [1] * 8 + [0] * 2, 1: [1] * 8 + [0] * 2}
    for s, c in sft.items():
        qa_file(folder, "sft", s, c)
    qa_file(folder, "logo", 0, logo[0], patterns={8: "hallucination", 9: "hallucination"})
    qa_file(folder, "logo", 1, logo[1], patterns={9: "hallucination"})
    qa_file(folder, "base", None, [1] * 8 + [0] * 2)


def row_of(table, name):
    line = next(x for x in table.splitlines() if x.startswith(f"| {name} |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def fmt(x):
    return f"{x:.2f}"


def test_table_cells_are_seed_means_with_spread_and_seed_level_t_intervals(tmp_path):
    hand_made(str(tmp_path))
    table = mt.make_table(str(tmp_path))
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert header[0] == "method" and len(header) == 1 + len(mt.COLUMNS)
    acc2k, acc12k = header.index("QA accuracy, 2K") - 1, header.index("QA accuracy, 12K") - 1
    hall = header.index("hallucination, 2K") - 1
    sft = row_of(table, mt.METHODS["sft"])
    # The training seed as the unit: Student's t with 1 degree of freedom, t_0.975 = 12.7062
    # (tables), half-width t * std / sqrt(2); a rate clipped to [0, 1].
    t975 = 12.706204736
    # mean (0.5 + 0.7) / 2 = 0.6, sample std sqrt(0.01 + 0.01) = 0.1414: 0.6 -+ 1.27 -> [0, 1]
    assert sft[acc2k] == "0.60 ± 0.14 [0.00, 1.00] (2)"
    assert sft[acc12k] == "n/a"
    logo = row_of(table, mt.METHODS["logo"])
    assert logo[acc2k] == "0.80 ± 0.00 [0.80, 0.80] (2)"      # no spread over seeds
    # hallucination 2 of 10 and 1 of 10: mean 0.15, std 0.0707, half-width 12.706 * 0.05 = 0.635
    assert logo[hall] == f"0.15 ± 0.07 [0.00, {fmt(0.15 + t975 * 0.05)}] (2)"
    assert row_of(table, mt.METHODS["base"])[acc2k] == "0.80 [0.49, 0.94] (1)"   # no spread
    # row order: base, then SFT, then LOGO; no rope row without a rope summary
    names = [x.split("|")[1].strip() for x in table.splitlines()[2:5]]
    assert names == [mt.METHODS[m] for m in ("base", "sft", "logo")]
    # per-question means: LOGO 1 on q0-q7; SFT 1 on q0-q4, 1/2 on q5-q6, 0 on q7: differences
    # +1/2, +1/2, +1 -> only the 2 all-same-sign patterns of 8 reach |sum| = 2: p = 0.25
    line = next(x for x in table.splitlines() if "LOGO vs SFT, QA at 2K" in x)
    assert "10 questions answered by both" in line and "p = 0.25" in line
    assert "mean accuracy 0.800 vs 0.600 (difference +0.200)" in line
    assert "QA at 12K: n/a" in table
    # the seed as the unit: SFT 0.5 / 0.7 against LOGO 0.8 / 0.8; of the 6 ways to split the
    # four values in two pairs, {0.8, 0.8} | {0.5, 0.7} and its mirror reach |gap| = 0.2: 1/3
    line = next(x for x in table.splitlines() if "2K, the training seed as the unit" in x)
    assert "LOGO 0.80/0.80, SFT 0.50/0.70" in line and line.endswith("p = 0.333")
    assert "12K, the training seed" not in table                 # no 12K cells


def test_seed_permutation_test_against_hand_counted_splits():
    # 3 seeds each, fully separated: only the observed split and its mirror of C(6, 3) = 20
    assert mt.seed_permutation_p([0.6, 0.7, 0.8], [0.1, 0.2, 0.3]) == pytest.approx(2 / 20)
    # identical groups: every split is at least as far apart as the observed 0
    assert mt.seed_permutation_p([0.5, 0.5], [0.5, 0.5]) == 1.0
    # [1, 0] vs [0]: splits {1,0}|{0} gap 1/2, {1,0'}|{0} 1/2, {0,0'}|{1} 1: all >= 1/2
    assert mt.seed_permutation_p([1, 0], [0]) == 1.0
    # [3] vs [0, 0, 1]: gap 3 - 1/3; splits with 0 or 1 alone are smaller: p = 1/4
    assert mt.seed_permutation_p([3], [0, 0, 1]) == pytest.approx(1 / 4)


def test_pattern_table_and_the_paired_hallucination_test(tmp_path):
    hand_made(str(tmp_path))
    table = mt.make_table(str(tmp_path))
    second = table[table.index("| method | QA 2K: correct"):]
    # LOGO: seed 0 8 correct + 2 hallucination, seed 1 8 + 1 + 1 unfollow -> 0.80 / 0.15 /
    # 0.05 / 0; SFT: 5 + 5 unfollow and 7 + 3 unfollow -> 0.60 / 0 / 0.40 / 0; no 12K cells
    assert row_of(second, mt.METHODS["logo"]) == ["0.80 / 0.15 / 0.05 / 0.00 (2)", "n/a"]
    assert row_of(second, mt.METHODS["sft"]) == ["0.60 / 0.00 / 0.40 / 0.00 (2)", "n/a"]
    assert row_of(second, mt.METHODS["base"]) == ["0.80 / 0.00 / 0.20 / 0.00 (1)", "n/a"]
    # per-question hallucination, LOGO minus SFT: q8 +1/2, q9 +1, the rest 0; of the 4 sign
    # patterns of (1/2, 1) those with |sum| >= 3/2 are the 2 all-same-sign ones: p = 0.5
    line = next(x for x in table.splitlines() if "QA at 2K" in x and "hallucination" in x)
    assert "mean hallucination rate 0.150 vs 0.000 (difference +0.150)" in line
    assert line.endswith("p = 0.5")


def test_mvniah_cells_pool_evaluation_seeds_and_ppl_cells_get_a_t_interval(tmp_path):
    # LOGO seed 0 at 12K in two evaluations (2 + 3 samples, 4 values each)
    for name, n, found, heads in (("a", 2, 3, [[0.3, 0.05], [0.2, 0.0]]),
                                  ("b", 3, 5, [[0.0, 0.05], [0.2, 0.4]])):
        write(str(tmp_path), f"logo_s0_mvniah_12K_{name}.json",
              {"method": "logo", "seed": 0, "task": "mvniah", "config": {"haystack": None},
               "metrics": {"lengths": {"12288": {"values": 4 * n, "values_found": found, "n": n,
                                                 "retrieval_score": 0.0}},
                           "samples": [{"id": f"12288/{i}/{name}", "length": 12288}
                                       for i in range(n)],
                           "head_scores": heads}})
    for seed, ppl in ((0, 20.0), (1, 22.0)):
        write(str(tmp_path), f"logo_s{seed}_ppl.json",
              {"method": "logo", "seed": seed, "task": "ppl",     # the tag evaluate.py writes
               "eval_data": ev.TASKS["ppl"][2]["data"](argparse.Namespace(text="x/pg_essays/")),
               "config": {}, "metrics": {"lengths": {"2048": {"ppl": ppl, "tokens": 100}}}})
    write(str(tmp_path), "logo_s0_ppl_prose.json",             # other text: not in the table
          {"method": "logo", "seed": 0, "task": "ppl", "eval_data": "prose", "config": {},
           "metrics": {"lengths": {"8192": {"ppl": 5.0, "tokens": 100}}}})
    table = mt.make_table(str(tmp_path))
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")][1:]
    logo = dict(zip(header, row_of(table, mt.METHODS["logo"])))
    lo, hi = wilson_by_bisection(8, 20)                          # 3 + 5 of 8 + 12 values
    assert logo["MV-NIAH recall, 12K"] == f"0.40 [{fmt(lo)}, {fmt(hi)}] (1)"
    # sample-weighted head means [[0.12, 0.05], [0.2, 0.24]]; kept >= 0.1: mean 0.1867
    assert logo["retrieval score, 12K"] == "0.19 (1)"
    # mean 21, std sqrt(2), t(0.975, 1 df) = 12.706: 21 +- 12.706 sqrt(2) / sqrt(2)
    assert logo["ppl, PG essays 2K"] == "21.00 ± 1.41 [8.29, 33.71] (2)"
    assert logo["ppl, PG essays 8K"] == "n/a"


def test_a_question_in_two_summaries_is_an_error_not_counted_twice(tmp_path):
    qa_file(str(tmp_path), "sft", 0, [1, 0])
    qa_file(str(tmp_path), "sft", 0, [1, 0], eval_seed=99)     # same ids under another name
    with pytest.raises(SystemExit, match="question 2048/0/q0 of sft seed 0"):
        mt.make_table(str(tmp_path))


def test_check_fails_on_a_stale_readme_and_write_makes_it_pass(tmp_path, capsys):
    hand_made(str(tmp_path))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{mt.BEGIN}\n| old | table |\n{mt.END}\n\nafter\n")
    argv = ["--results_dir", str(tmp_path)]
    assert mt.main(argv + ["--check", str(readme)]) == 1
    assert "differs from results/*.json" in capsys.readouterr().err
    assert mt.main(argv + ["--write", str(readme)]) == 0
    assert mt.main(argv + ["--check", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# x\n\n") and text.endswith(f"{mt.END}\n\nafter\n")
    assert mt.make_table(str(tmp_path)) in text
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "No results yet" in mt.make_table(str(empty))


def test_per_run_table_counts_each_runs_patterns_values_and_perplexity(tmp_path):
    hand_made(str(tmp_path))
    write(str(tmp_path), "logo_s0_mvniah_12K_e1.json",
          {"method": "logo", "seed": 0, "task": "mvniah", "config": {"haystack": None},
           "metrics": {"lengths": {"12288": {"values": 8, "values_found": 3, "n": 2,
                                             "retrieval_score": 0.25}},
                       "samples": [{"id": f"12288/{i}", "length": 12288} for i in range(2)]}})
    write(str(tmp_path), "sft_s1_ppl.json",
          {"method": "sft", "seed": 1, "task": "ppl",
           "eval_data": ev.TASKS["ppl"][2]["data"](argparse.Namespace(text="x/pg_essays/")),
           "config": {}, "metrics": {"lengths": {"8192": {"ppl": 21.234, "tokens": 100}}}})
    table = mt.per_run_table(str(tmp_path))
    names = [x.split("|")[1].strip() for x in table.splitlines()[2:7]]
    assert names == ["base", "sft_s0", "sft_s1", "logo_s0", "logo_s1"]
    # hand_made: LOGO seed 0 8 right, its 2 misses hallucinations; seed 1 one of each
    assert row_of(table, "logo_s0") == ["8 / 2 / 0 / 0 of 10", "n/a", "3 of 8", "0.25", "n/a", "n/a"]
    assert row_of(table, "logo_s1")[:3] == ["8 / 1 / 1 / 0 of 10", "n/a", "n/a"]
    assert row_of(table, "sft_s1") == ["7 / 0 / 3 / 0 of 10", "n/a", "n/a", "n/a", "n/a", "21.23"]
    assert row_of(table, "base")[0] == "8 / 0 / 2 / 0 of 10"


def test_check_and_write_handle_each_block_the_file_holds(tmp_path, capsys):
    hand_made(str(tmp_path))
    argv = ["--results_dir", str(tmp_path)]
    both = tmp_path / "both.md"
    both.write_text(f"{mt.BEGIN}\n{mt.make_table(str(tmp_path))}\n{mt.END}\n"
                    f"mid\n{mt.RUN_BEGIN}\n| stale |\n{mt.RUN_END}\n")
    assert mt.main(argv + ["--check", str(both)]) == 1           # the main table alone is fresh
    assert mt.main(argv + ["--write", str(both)]) == 0
    assert mt.main(argv + ["--check", str(both)]) == 0
    text = both.read_text()
    assert mt.per_run_table(str(tmp_path)) in text and mt.make_table(str(tmp_path)) in text
    assert text.count("mid\n") == 1
    runs = tmp_path / "runs.md"                                 # per-run markers only
    runs.write_text(f"# r\n{mt.RUN_BEGIN}\n{mt.RUN_END}\n")
    assert mt.main(argv + ["--write", str(runs)]) == 0
    assert mt.BEGIN not in runs.read_text() and "logo_s1" in runs.read_text()
    broken = tmp_path / "broken.md"                             # an end marker without its begin
    broken.write_text(f"{mt.RUN_END}\n")
    with pytest.raises(SystemExit, match="needs one"):
        mt.main(argv + ["--check", str(broken)])


def test_the_readme_tables_are_what_make_table_prints_on_the_committed_results():
    results = os.path.join(ROOT, "results")
    for path, begin, end, maker in [("README.md", mt.OBJ_BEGIN, mt.OBJ_END, mt.objective_table),
                                    ("results/README.md", mt.BEGIN, mt.END, mt.make_table),
                                    ("results/README.md", mt.RUN_BEGIN, mt.RUN_END, mt.per_run_table)]:
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            _, inside, _ = mt.readme_block(f.read(), path, begin, end)
        assert inside.strip("\n") == maker(results), \
            f"{path}'s {maker.__name__} is stale: python results/make_table.py --write {path}"


# ----------------------------------------------------------------------------------------
# evaluate.py --results_dir on the tiny model.

def test_evaluate_writes_one_summary_per_model_with_config_counts_and_question_ids(
        tmp_path, monkeypatch):
    adapter = make_adapter(str(tmp_path / "logo_m3_seed7" / "final"), rope_theta=20000.0)
    cfg_path = os.path.join(adapter, "logo_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.update(loss="logo", num_rejected=3, seed=7, data_fingerprint="0123456789abcdef",
               lr=3e-4, check_logps=[0.5])
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"context": f"{n} was born in Oslo.", "question":
                                        f"Where was {n} born?", "answer": "Oslo"}) + "\n"
                            for n in ("Maria Lopez", "John Smith", "Peter Brown")))
    tok = tiny_tokenizer()
    replies = iter(["In Oslo.", "Paris", "", "Oslo", "Oslo!", "Peter Brown was born in Rome."])
    monkeypatch.setattr(ev, "generate", lambda *a, **k: (tok(next(replies)).input_ids, None))
    results = tmp_path / "results"
    ev.main(["--model", "tiny", "--task", "qa", "--data", str(data), "--lengths", "4K",
             "--adapter", adapter, "--compare", "--out_dir", str(tmp_path / "out"),
             "--results_dir", str(results)])
    assert sorted(os.listdir(results)) == ["base_qa_4K_qa.json", "logo_m3_s7_qa_4K_qa.json"]
    base = json.loads((results / "base_qa_4K_qa.json").read_text())
    logo = json.loads((results / "logo_m3_s7_qa_4K_qa.json").read_text())
    assert (base["method"], base["seed"], base["train_config"]) == ("base", None, None)
    assert (logo["method"], logo["seed"], logo["data_fingerprint"]) == \
        ("logo_m3", 7, "0123456789abcdef")
    assert logo["train_config"]["lr"] == 3e-4 and "check_logps" not in logo["train_config"]
    assert logo["rope_theta"] == 20000.0 and base["rope_theta"] == 10000.0   # tiny's own
    assert base["task"] == "qa" and base["lengths"] == [4096] and base["eval_data"] == "qa"
    assert base["config"]["data"] == str(data)
    assert base["torch_threads"] == torch.get_num_threads() and base["cpu"]
    assert 0 <= base["wall_s"] <= base["command_wall_s"] and base["command_wall_s"] > 0
    commit = os.popen(f"git -C {ROOT} rev-parse HEAD").read().strip()
    assert base["git_commit"] == commit and isinstance(base["git_dirty"], bool)
    # base: right, wrong (unfollow), empty; the adapter: right, right, wrong naming Peter Brown
    assert [q["correct"] for q in base["metrics"]["questions"]] == [True, False, False]
    assert [q["pattern"] for q in logo["metrics"]["questions"]] == \
        ["correct", "correct", "hallucination"]
    cell = logo["metrics"]["lengths"]["4096"]
    assert (cell["n"], cell["correct"], cell["accuracy"]) == (3, 2, pytest.approx(2 / 3))
    assert cell["pattern_counts"] == {"correct": 2, "hallucination": 1, "unfollow": 0, "empty": 0}
    # the same prompts -> the same question ids for both models (pairable), all distinct
    ids = [q["id"] for q in base["metrics"]["questions"]]
    assert ids == [q["id"] for q in logo["metrics"]["questions"]] and len(set(ids)) == 3
    assert not [f for f in os.listdir(results) if ".tmp" in f]
    # make_table: only the built-in held-out questions enter the table (not a --data file);
    # the base model on 2 of them at 2K, every reply empty: 0 of 2, Wilson [0, z^2/(2+z^2)]
    assert not row_lines(mt.make_table(str(results)))
    monkeypatch.setattr(ev, "generate", lambda *a, **k: ([], None))
    ev.main(["--model", "tiny", "--task", "qa", "--lengths", "2K", "--max_samples", "2",
             "--out_dir", str(tmp_path / "out2"), "--results_dir", str(results)])
    table = mt.make_table(str(results))
    assert [r.split("|")[1].strip() for r in row_lines(table)] == [mt.METHODS["base"]]
    assert row_of(table, mt.METHODS["base"])[0] == "0.00 [0.00, 0.66] (1)"
    empty = json.loads((results / "base_qa_2K_e1234.json").read_text())
    assert empty["eval_seed"] == 1234 and empty["metrics"]["lengths"]["2048"]["pattern_counts"][
        "empty"] == 2


def row_lines(table):
    """The main table's rows (it ends at the first blank line; the pattern table follows)."""
    main = table.split("\n\n")[0]
    return [x for x in main.splitlines()[2:] if x.startswith("| ")]


def test_raised_rope_theta_is_the_rope_method_and_a_clash_is_refused_before_loading(
        tmp_path, capsys):
    results = tmp_path / "results"
    common = ["--model", "tiny", "--task", "ppl", "--lengths", "64", "--max_tokens", "128",
              "--out_dir", str(tmp_path / "out"), "--results_dir", str(results)]
    ev.main(common + ["--rope_theta", "20000"])
    ev.main(common)                                             # the checkpoint's theta: base
    assert sorted(os.listdir(results)) == ["base_ppl_64_prose.json", "rope_ppl_64_prose.json"]
    rope = json.loads((results / "rope_ppl_64_prose.json").read_text())
    row = rope["metrics"]["lengths"]["64"]
    assert rope["rope_theta"] == 20000.0 and row["tokens"] == 128 - 2 and row["ppl"] > 1
    assert summaries.method_of(ev.parse_args(["--task", "ppl", "--rope_theta", "1e4"]), {}, False,
                               1e4) == "base"
    with pytest.raises(SystemExit) as e:                       # another rope_theta, same name
        ev.main(common + ["--rope_theta", "40000"])
    assert e.value.code == 2
    assert "holds the summary of another model" in capsys.readouterr().err
    ev.main(common + ["--rope_theta", "40000", "--results_tag", "theta4e4"])
    assert "rope_ppl_64_prose_theta4e4.json" in os.listdir(results)
    assert summaries.method_of(ev.parse_args(["--task", "qa"]), {"loss": "sft", "num_rejected": 2},
                               True, None) == "sft"
    assert summaries.method_of(ev.parse_args(["--task", "qa"]), {"loss": "logo", "num_rejected": 1},
                               True, None) == "logo_m1"


def test_pair_prints_wilson_intervals_patterns_and_the_exact_mcnemar_test(tmp_path):
    """The demo's comparison: base 3/8, adapter 6/8 on the same 8 questions, 4 right only
    for the adapter and 1 only for base -> McNemar p = P(|S| >= 3) over 5 coin flips =
    (1 + 5 + 5 + 1) / 32 = 0.375; intervals from the bisection reference."""
    def summary(label, correct):
        n, k = len(correct), sum(correct)
        rates = {"correct": k / n, "hallucination": (n - k) / n, "unfollow": 0.0, "empty": 0.0}
        return {"task": "qa", "label": label, "metrics": {
            "lengths": {"1024": {"accuracy": k / n, "n": n, "correct": k, "patterns": rates}},
            "questions": [{"id": f"1024/{i}/h", "length": 1024, "correct": bool(c)}
                          for i, c in enumerate(correct)]}}
    write(tmp_path, "a.json", summary("base", [1, 1, 1, 0, 0, 0, 0, 0]))
    write(tmp_path, "b.json", summary("logo", [1, 1, 0, 1, 1, 1, 1, 0]))
    text = mt.pair_text(str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    lo, hi = wilson_by_bisection(6, 8)
    assert f"accuracy 6/8 = 0.75 [95% {lo:.2f}, {hi:.2f}]" in text
    lo, hi = wilson_by_bisection(3, 8)
    assert f"accuracy 3/8 = 0.38 [95% {lo:.2f}, {hi:.2f}]" in text
    assert "hallucination 0.62" in text
    assert "4 questions right only for logo, 1 only for base (8 paired)" in text
    assert "exact McNemar p = 0.38" in text


# ----------------------------------------------------------------------------------------
# results/wrong_answers.py: where a wrong answer's content comes from.

def test_wrong_answers_finds_every_biography_and_tells_another_persons_fact():
    import corpus
    wa = results_script("wrong_answers")
    people = [dict(name="Ada Quill", born_city="Port Vane", born_year="1931", employer="Moss Group",
                   joined_year="1957", female=True, a_role="an engineer"),
              dict(name="Bo Lind", born_city="East Hale", born_year="1960", employer="Kite Press",
                   joined_year="1988", female=False, a_role="a lawyer")]
    context = ("The river waited. " + corpus._biography(people[0]) + "\n\nFog came in.\n\n"
               + corpus._biography(people[1]))
    keys = ("name",) + wa.FACTS
    assert wa.biography_facts(context) == [{k: p[k] for k in keys} for p in people]
    q = "In which city was Ada Quill, an engineer at Moss Group, born?"
    assert wa.source_of(context, q, "Ada Quill was born in East Hale.", ["Port Vane"]) == "another person"
    assert wa.source_of(context, q, "She joined Kite Press.", ["Port Vane"]) == "another person"
    # her own facts and invented values are not another person's
    assert wa.source_of(context, q, "Ada Quill joined Moss Group in 1957.", ["Port Vane"]) == "no other's fact"
    assert wa.source_of(context, q, "Ada Quill was born in Lisbon.", ["Port Vane"]) == "no other's fact"
    r = corpus.qa_record(3, 4000, seed=1234)            # a real record: all its people found
    facts = wa.biography_facts(r["context"])
    assert len(facts) == corpus.PEOPLE
    assert sum(r["answer"] in f.values() and f["name"] in r["question"] for f in facts) == 1


def test_train_summary_quarters_and_method_from_the_runs_own_files(tmp_path):
    ts = results_script("train_summary")
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    cfg = dict(loss="logo", num_rejected=3, seed=4, max_steps=8, out_dir="runs/x", data_fingerprint="ab")
    (run / "run_config.json").write_text(json.dumps(cfg))
    rows = [dict(step=s, loss=float(s), logo=0.5 * s, sft=1.0, reward_margin=s - 4.0,
                 reward_accuracy=s / 8, tokens=100, seconds_per_step=2.0, nonfinite_steps=0)
            for s in range(1, 9)]
    stale = dict(rows[5], loss=99.0)                 # step 6 logged, then redone after a resume
    lines = [json.dumps(r) for r in rows[:6]] + [json.dumps(stale)] + [json.dumps(r) for r in rows[5:]]
    (run / "log.jsonl").write_text("\n".join(lines) + "\n")
    s = ts.summarize(str(run), git_commit="c0ffee")
    assert (s["method"], s["seed"], s["git_commit"], s["data_fingerprint"]) == ("logo_m3", 4, "c0ffee", "ab")
    m = s["metrics"]
    assert (m["steps"], m["tokens"], m["quarter_steps"], s["step_seconds"]) == (8, 800, 2, 16.0)
    assert m["first_quarter"]["loss"] == 1.5 and m["last_quarter"]["loss"] == 7.5      # (1+2)/2, (7+8)/2
    assert m["last_quarter"]["reward_accuracy"] == 15 / 16
    cfg2 = dict(cfg, num_rejected=2)
    (run / "run_config.json").write_text(json.dumps(dict(cfg2, loss="sft")))
    assert ts.summarize(str(run))["method"] == "sft"
    (run / "run_config.json").write_text(json.dumps(cfg2))
    assert ts.summarize(str(run))["method"] == "logo"
    (run / "log.jsonl").write_text("\n".join(lines[:4]) + "\n")          # unfinished: refused
    with pytest.raises(SystemExit, match="not finished"):
        ts.summarize(str(run))


def test_train_summary_keeps_the_file_of_the_same_run_and_replaces_another(tmp_path, capsys):
    """A retrained run with the same bits keeps the summary on file (it names the adapter the
    earlier cells were evaluated with); one whose metrics differ in the last digit replaces it
    and says where it differs."""
    ts = results_script("train_summary")
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    cfg = dict(loss="logo", seed=1, max_steps=4, out_dir="runs/x", data_fingerprint="ab")
    (run / "run_config.json").write_text(json.dumps(cfg))

    def log(last_loss):
        rows = [dict(step=s, loss=1.0 / s, logo=0.5, sft=1.0, reward_margin=1.0, reward_accuracy=1.0,
                     tokens=10, seconds_per_step=1.0, nonfinite_steps=0) for s in range(1, 5)]
        rows[-1]["loss"] = last_loss
        (run / "log.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    log(0.25)
    ts.main([str(run), "--results_dir", str(tmp_path), "--git_commit", "aaa"])
    path = tmp_path / "train" / "logo_s1.json"
    first = path.read_text()
    (run / "run_config.json").write_text(json.dumps(dict(cfg, out_dir="elsewhere")))
    capsys.readouterr()
    ts.main([str(run), "--results_dir", str(tmp_path), "--git_commit", "bbb"])
    assert "the same run" in capsys.readouterr().out and path.read_text() == first
    # a summary written when train.py still had flags it no longer has, left off: the same run
    path.write_text(json.dumps(dict(json.loads(first), config=dict(json.loads(first)["config"],
                                                                   tensorboard=False, trust_remote_code=False))))
    ts.main([str(run), "--results_dir", str(tmp_path), "--git_commit", "bbb"])
    assert "the same run" in capsys.readouterr().out
    path.write_text(json.dumps(dict(json.loads(first), config=dict(json.loads(first)["config"], tensorboard=True))))
    ts.main([str(run), "--results_dir", str(tmp_path), "--git_commit", "bbb"])
    out = capsys.readouterr().out
    assert "NOT the run" in out and "config.tensorboard" in out          # it was on: a different run
    path.write_text(first)
    log(0.25 + 1e-15)
    ts.main([str(run), "--results_dir", str(tmp_path), "--git_commit", "bbb"])
    out = capsys.readouterr().out
    assert "NOT the run" in out and "metrics.last_quarter.loss" in out
    assert json.loads(path.read_text())["git_commit"] == "bbb"


# ----------------------------------------------------------------------------------------
# The objective experiment's table (results/objective/ARM/), on hand-made summaries.

def objective_qa(folder, method, seed, correct, length, eval_seed, empty=(), distractor=()):
    os.makedirs(folder, exist_ok=True)
    questions = [{"id": f"{length}/{i}/q{i}", "length": length, "correct": bool(c),
                  "pattern": "empty" if i in empty else "correct" if c else "hallucination",
                  "distractor": i in distractor} for i, c in enumerate(correct)]
    write(folder, f"{method}_s{seed}_qa_{length // 1024}K_e{eval_seed}.json",
          {"method": method, "seed": seed, "task": "qa", "eval_data": f"e{eval_seed}",
           "metrics": {"questions": questions, "lengths": {str(length): {}}}})


def test_objective_table_primary_test_matches_a_brute_force_permutation_and_pooled_t(tmp_path):
    import statistics
    root = tmp_path / "objective"
    hits = {"logo-l1": [30, 28, 33, 25, 31], "sft": [22, 27, 24, 29, 20]}       # of 40
    for arm, hs in hits.items():
        for seed, h in enumerate(hs):
            objective_qa(str(root / arm), "sft" if arm == "sft" else "logo", seed,
                         [1] * h + [0] * (40 - h), 12288, 2468,
                         empty=range(38, 40) if arm == "sft" else (), distractor={h})
    table = mt.objective_table(str(tmp_path))
    # independent: every split of the 10 values into 5 + 5, float means
    vals = [h / 40 for h in hits["logo-l1"] + hits["sft"]]
    obs = abs(statistics.mean(vals[:5]) - statistics.mean(vals[5:]))
    splits = list(itertools.combinations(range(10), 5))
    p = sum(abs(statistics.mean([vals[i] for i in s]) -
                statistics.mean([vals[i] for i in range(10) if i not in s])) >= obs - 1e-12
            for s in splits) / len(splits)
    assert f"p = {p:.3g}" in table and p == pytest.approx(16 / 252)    # 8 extreme splits x 2 sides
    d = statistics.mean(vals[:5]) - statistics.mean(vals[5:])
    pooled = (statistics.variance(vals[:5]) + statistics.variance(vals[5:])) / 2
    half = 2.306 * math.sqrt(pooled * (1 / 5 + 1 / 5))                 # t(0.975, 8 df)
    assert f"difference of means {d:+.3f} [95% pooled t {d - half:+.3f}, {d + half:+.3f}]" in table
    sft = row_of(table, "SFT (NLL weight 1)")
    accs = [h / 40 for h in hits["sft"]]
    assert sft[0].startswith(f"{statistics.mean(accs):.2f} ± {statistics.stdev(accs):.2f} [")
    assert sft[4].startswith("0.05 ± 0.00")                                 # 2 of 40 empty
    nonempty = [min(h, 38) / 38 for h in hits["sft"]]
    assert sft[5].startswith(f"{statistics.mean(nonempty):.2f} ± {statistics.stdev(nonempty):.2f}")
    distract = [(1 if h < 38 else 0) / 40 for h in hits["sft"]]            # question h, if wrong
    assert sft[6].startswith(f"{statistics.mean(distract):.2f} ±")
    assert sft[1] == "n/a"                                                   # no 2K summaries


def test_objective_table_grid_picks_the_best_lr_ties_to_the_lower_and_reports_it(tmp_path):
    root = tmp_path / "objective" / "grid"
    for lr, h in (("3e-4", 20), ("1e-3", 25), ("3e-3", 25)):
        objective_qa(str(root / f"sft_lr{lr}"), "sft", 0, [1] * h + [0] * (40 - h), 2048, 999)
    table = mt.objective_table(str(tmp_path))
    assert "3e-4: 20/40, 1e-3: 25/40, 3e-3: 25/40; chosen 1e-3." in table
    assert "Primary test**: not yet" in table


def test_objective_table_cpu_time_counts_each_training_run_once_and_every_summary(tmp_path):
    root = tmp_path / "objective"
    train = {"step_seconds": 1800.0, "out_dir": "runs/obj/sft_lr1e-3_s0", "cpu": "X",
             "metrics": {"first_quarter": {"reward_accuracy": 0.5}, "last_quarter": {"reward_accuracy": 1.0}}}
    for folder in ("grid/sft_lr1e-3/train", "sft/train"):                  # seed 0: one run, two copies
        os.makedirs(root / folder)
        write(str(root / folder), "sft_s0.json", train)
    write(str(root / "sft" / "train"), "sft_s1.json", dict(train, out_dir="runs/obj/sft_lr1e-3_s1",
                                                           step_seconds=3600.0))
    for length, eval_seed, wall, reused in ((12288, 2468, 5400.0, 17), (2048, 5678, 1800.0, 0)):
        objective_qa(str(root / "sft"), "sft", 0, [1] * 30 + [0] * 10, length, eval_seed)
        path = root / "sft" / f"sft_s0_qa_{length // 1024}K_e{eval_seed}.json"
        write(str(root / "sft"), path.name, dict(json.loads(path.read_text()), command_wall_s=wall,
                                                 reused_answers=reused, cpu="X"))
    table = mt.objective_table(str(tmp_path))
    # training 1800 + 3600 s = 1.5 h (the seed-0 copy once); evaluation 5400 + 1800 s = 2.0 h
    assert ("CPU time so far (one thread per job, two jobs at a time; X): training 1.5 h (2 runs, their step "
            "times), evaluation 2.0 h (the runs that wrote the summaries; 17 answers reused") in table
