"""prepare.py's user errors: one line `error: <what> (<where>); <what to do>` on
stderr, exit status 2, no traceback, and no partial file left behind. Tiny preset, real
spaCy model. Most cases call prepare.main in-process (its return value is the exit status);
the first one goes through the command line to check the real exit status."""

import json
import os
import subprocess
import sys

import pytest
import safetensors.torch

import models
import prepare
from corpus import qa_record
from models import tiny_tokenizer
from train_helpers import answers_finished

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "tiny", "--max_new_tokens", "6"]


def write_jsonl(path, lines):
    with open(path, "wb") as f:
        for line in lines:
            f.write((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n")
    return str(path)


def good(i=0):
    return qa_record(i, 1200, 5)


def fails(capsys, argv, *expected):
    """Run prepare.main(argv): exit status 2, one error line naming each expected piece."""
    assert prepare.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "; " in last, last
    for piece in expected:
        assert piece in last, f"{piece!r} not in {last!r}"
    return last


def no_partial_files(out):
    """Nothing a later run could mistake for data: no shard, no temp file."""
    left = os.listdir(out) if os.path.isdir(out) else []
    assert not [f for f in left if f.startswith("shard_") or ".tmp" in f], left


def test_a_malformed_json_line_stops_with_its_file_and_line_from_the_command_line(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [good(), b'{"context": "x", "question": '])
    out = str(tmp_path / "out")
    r = subprocess.run([sys.executable, "prepare.py", "--input", src, "--out_dir", out] + TINY,
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: malformed JSON")
    assert f"({src}:2)" in r.stderr and "fix the line" in r.stderr
    no_partial_files(out)


def test_a_record_missing_its_question_names_the_field(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [good(), good(1), {"context": good()["context"]}])
    fails(capsys, TINY + ["--input", src, "--out_dir", str(tmp_path / "o")],
          "no text field 'question'", f"{src}:3")
    no_partial_files(tmp_path / "o")


def test_a_record_missing_its_context_names_the_field(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"question": "Who?", "answer": "me"}])
    fails(capsys, TINY + ["--input", src, "--out_dir", str(tmp_path / "o")],
          "no text field 'context'", f"{src}:1")
    no_partial_files(tmp_path / "o")


def test_invalid_utf8_bytes_are_reported_with_their_line(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [good(), b'{"context": "caf\xe9", "question": "q"}'])
    fails(capsys, TINY + ["--input", src, "--out_dir", str(tmp_path / "o")],
          "invalid UTF-8", f"{src}:2", "re-encode")
    no_partial_files(tmp_path / "o")


def test_an_empty_input_file_is_an_error(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("\n\n")
    fails(capsys, TINY + ["--input", str(src), "--out_dir", str(tmp_path / "o")],
          "no records", str(src))
    no_partial_files(tmp_path / "o")


# Per-record misses: skipped and counted (real corpora hold them by the hundred).
PER_RECORD_MISSES = [
    ("short_context", dict(context="Maria Lopez lives in Boston.")),      # 28 bytes < 64
    ("no_entity_overlap", dict(question="What colour is the sky on a clear day?")),
    ("empty_question", dict(question="  ")),
    ("empty_context", dict(context="")),
]


@pytest.mark.parametrize("reason,change", PER_RECORD_MISSES, ids=[m[0] for m in PER_RECORD_MISSES])
def test_a_record_that_cannot_make_a_sample_is_skipped_and_counted(tmp_path, capsys, monkeypatch, reason, change):
    monkeypatch.setattr(models, "generate_batch", answers_finished(models.generate_batch))   # train_helpers
    src = write_jsonl(tmp_path / "in.jsonl", [good(1), dict(good(), **change)])
    out = str(tmp_path / "o")
    assert prepare.main(TINY + ["--input", src, "--out_dir", out]) == 0
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["counts"]["skipped"] == {reason: 1} and meta["counts"]["kept"] == 1
    assert f"skipped 1 ({reason} 1)" in capsys.readouterr().out


def test_an_unknown_model_names_the_presets(tmp_path, capsys):
    fails(capsys, ["--model", "llama9-huge", "--out_dir", str(tmp_path / "o")],
          "unknown model 'llama9-huge'", "smollm2-135m", "--model")
    no_partial_files(tmp_path / "o")


def test_an_out_dir_with_shards_made_with_other_arguments_is_refused(tmp_path, capsys):
    out = str(tmp_path / "o")
    args = TINY + ["--num_samples", "2", "--out_dir", out]
    assert prepare.main(args) == 0
    before = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)}
    capsys.readouterr()
    fails(capsys, args + ["--delta", "3"], "holds shards made with other arguments",
          "delta: 2.0 there, 3.0 now", "another --out_dir")
    assert {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)} == before


def test_an_out_dir_with_shards_from_another_tokenizer_is_refused(tmp_path, capsys):
    out = str(tmp_path / "o")
    assert prepare.main(TINY + ["--num_samples", "2", "--out_dir", out]) == 0
    capsys.readouterr()
    other = tiny_tokenizer()
    other.add_tokens(["<extra>"])                        # another vocabulary
    folder = str(tmp_path / "other-tokenizer")
    other.save_pretrained(folder)
    same_shape = ["--chunk_len", "64", "--num_chunks", "8", "--target_len", "4096",
                  "--num_rejected", "2", "--dtype", "float32"]
    fails(capsys, ["--model", folder, "--max_new_tokens", "6", "--num_samples", "2",
                   "--out_dir", out] + same_shape,
          "other arguments or another tokenizer", "tokenizer_fingerprint")


def test_a_full_disk_while_writing_a_shard_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)                         # half a file, then the disk is full
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    out = str(tmp_path / "o")
    fails(capsys, TINY + ["--num_samples", "2", "--out_dir", out], "No space left on device",
          "shard_00000.safetensors", "finished shards are kept")
    no_partial_files(out)


def test_a_longbench_file_with_an_empty_input_and_a_record_sharing_no_entity_runs_to_the_end(tmp_path, capsys,
                                                                                          monkeypatch):
    monkeypatch.setattr(models, "generate_batch", answers_finished(models.generate_batch))   # train_helpers
    # no 'answers': the chosen is the model's own answer (the random model would never state a gold one)
    lb = lambda r, **kw: dict({"context": r["context"], "input": r["question"],
                               "length": 300, "dataset": "hotpotqa", "_id": "x"}, **kw)
    lines = [lb(good(1)), lb(good(2), input=""),                      # gov_report-style: no question
             lb(good(3), input="What colour is the sky on a clear day?"), lb(good(4))]
    src = write_jsonl(tmp_path / "lb.jsonl", lines)
    out = str(tmp_path / "o")
    assert prepare.main(TINY + ["--input", src, "--out_dir", out]) == 0
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["counts"]["skipped"] == {"empty_question": 1, "no_entity_overlap": 1}
    assert meta["counts"]["read"] == 4 and meta["counts"]["kept"] == 2
    assert "skipped 2 (empty_question 1, no_entity_overlap 1)" in capsys.readouterr().out
