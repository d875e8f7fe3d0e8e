"""evaluate.py's task table: a new task is a samples function, a run function and one line
in TASKS, and gets its TASK.json, CSV, table, plot and results summary from the generic code;
--dry_run writes every prompt without loading a model; the results/ scripts that need
evaluate.py run it and read its files (they import nothing of the root scripts)."""

import ast
import json
import os
import subprocess
import sys

import pytest

import corpus
import evaluate as ev
from test_results import results_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def toy_samples(args, tok, lengths, num):
    # a prompt of L tokens per length; the tiny tokenizer: one character = one token
    return [{"length": L, "ids": tok("x" * L).input_ids} for L in lengths]


def toy_run(args, lm, tok, samples, label, cache):
    rows = [{"length": s["length"], "tokens": len(s["ids"]), "prediction": "p"} for s in samples]
    return {"lengths": {str(r["length"]): {"tokens": r["tokens"], "samples": 1} for r in rows},
            "samples": rows}


def test_a_toy_task_gets_json_csv_table_plot_and_summary_from_one_dict_line(tmp_path, monkeypatch,
                                                                           capsys):
    monkeypatch.setitem(ev.TASKS, "toy", (toy_samples, toy_run, dict(
        lengths="300,500", flags=["seed"], data=lambda a: "x", metrics=["tokens"])))
    out, results = tmp_path / "out", tmp_path / "results"
    saved = ev.main(["--task", "toy", "--model", "tiny", "--out_dir", str(out),
                     "--results_dir", str(results)])
    res = json.loads((out / "toy.json").read_text())
    assert res["results"] == saved["results"]
    assert res["results"]["base"]["lengths"] == {"300": {"tokens": 300, "samples": 1},
                                                 "500": {"tokens": 500, "samples": 1}}
    assert res["config"]["seed"] == 1234 and res["config"]["lengths"] == [300, 500]
    assert (out / "toy.csv").read_text() == "length,tokens_base\n300,300\n500,500\n"
    assert "tokens_base" in capsys.readouterr().out              # the printed table
    assert (out / "toy.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "toy_patterns.png").exists()              # no patterns: no bars
    summary = json.loads((results / "base_toy_300-500_x.json").read_text())
    assert (summary["task"], summary["method"], summary["eval_data"]) == ("toy", "base", "x")
    assert summary["metrics"]["lengths"] == res["results"]["base"]["lengths"]
    ids = [s["id"] for s in summary["metrics"]["samples"]]
    assert [i.split("/")[:2] for i in ids] == [["300", "0"], ["500", "0"]]
    assert "prediction" not in summary["metrics"]["samples"][0]


def test_dry_run_writes_every_prompt_and_loads_no_model(tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "load_for_eval", lambda *a: pytest.fail("a model was loaded"))
    out = ev.main(["--task", "qa", "--model", "tiny", "--lengths", "700", "--max_samples", "2",
                   "--dry_run", "--out_dir", str(tmp_path)])
    assert out == {"task": "qa", "samples": 2}
    rows = [json.loads(x) for x in (tmp_path / "qa_samples.jsonl").open()]
    # the held-out seed's questions (a record's question does not depend on its length)
    assert [r["question"] for r in rows] == [corpus.qa_record(i, 8000, 1234)["question"]
                                             for i in range(2)]
    for r in rows:
        assert r["prompt"].startswith("<|im_start|>user\n" + r["record"]["context"])
        assert r["prompt"].endswith(r["question"] + "<|im_end|>\n<|im_start|>assistant\n")
        assert abs(r["prompt_tokens"] - 700) < 300 and r["answers"] == [r["record"]["answer"]]


def test_results_scripts_import_no_root_script_and_edit_no_sys_path():
    for name in ("calibrate", "train_summary", "wrong_answers", "make_table"):
        tree = ast.parse(open(os.path.join(ROOT, "results", f"{name}.py")).read())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                    for a in n.names} | {n.module.split(".")[0] for n in ast.walk(tree)
                                         if isinstance(n, ast.ImportFrom) and n.module}
        assert not imported & {"evaluate", "train", "prepare", "models", "corpus"}, name
        assert "sys.path" not in open(os.path.join(ROOT, "results", f"{name}.py")).read(), name


def test_wrong_answers_copy_of_the_biography_template_is_corpus_py_s():
    assert results_script("wrong_answers").BIOGRAPHY == corpus.BIOGRAPHY


def test_wrong_answers_rebuilds_the_records_of_a_qa_run_with_evaluate_dry_run(tmp_path, capsys):
    out = tmp_path / "qa"
    ev.main(["--task", "qa", "--model", "tiny", "--lengths", "700", "--max_samples", "2",
             "--max_new_tokens", "2", "--out_dir", str(out)])
    wa = results_script("wrong_answers")
    (kinds, examples, questions), = wa.classify(str(out / "qa.json")).values()
    assert questions == 2 and sum(kinds.values()) == 2       # random weights: both wrong
    assert "warning" not in capsys.readouterr().out           # every context parsed


def test_calibrate_runs_evaluate_on_full_and_answer_paragraph_contexts(tmp_path):
    subprocess.run([sys.executable, os.path.join(ROOT, "results", "calibrate.py"), "--model", "tiny",
                    "--length", "700", "--num", "2", "--out_dir", str(tmp_path)], check=True,
                   cwd=tmp_path, capture_output=True, timeout=600)
    cal = json.loads((tmp_path / "calibration_700.json").read_text())
    assert (cal["length"], cal["seed"], cal["summary"]["full"]["n"]) == (700, 1234, 2)
    records = corpus.qa_records(2, 8000, 1234)              # the questions of the held-out seed
    assert [q["question"] for q in cal["questions"]] == [r["question"] for r in records]
    for q in cal["questions"]:
        # the answer's paragraph alone: a two-sentence biography, far shorter than the context
        assert q["critical"]["tokens"] < 250 < q["full"]["tokens"]
        assert q["full"]["correct"] is False and isinstance(q["full"]["prediction"], str)
