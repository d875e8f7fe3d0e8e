"""The commands in demo.sh and results/repro.sh parse with today's scripts: a renamed or
removed flag fails here, in seconds, not after minutes of a user's demo or a session's runs.
Nothing is run: each `python X.py ...` line is cut out of the shell script (continuations
joined, redirects and pipes dropped, shell arrays expanded where the script defines them, other shell
values replaced by a number) and given to that script's own parse_args."""

import importlib
import os
import re
import shlex
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "results"))

SCRIPTS = {"prepare.py": "prepare", "train.py": "train", "evaluate.py": "evaluate",
           "results/make_table.py": "make_table", "results/train_summary.py": "train_summary"}


def commands(path):
    """[(script, argv)] of every python command in a bash script."""
    text = open(path).read().replace("\\\n", " ")
    arrays = dict(re.findall(r"^\s*(\w+)=\(([^)]*)\)", text, re.M))   # TRAIN=(--max_steps 12)
    out = []
    for line in text.splitlines():
        m = re.search(r"\bpython ((?:results/)?\w+\.py)\b(.*)", line)
        if not m or line.lstrip().startswith("#"):
            continue
        rest = re.split(r"\s(?:\d?>|&&|\|\|?|;)", m.group(2))[0]
        rest = re.sub(r'"\$\{(\w+)\[@\]\}"', lambda a: arrays.get(a.group(1), ""), rest)
        argv = [t for t in shlex.split(rest, comments=True) if t != "$@"]
        out.append((m.group(1), ["1" if "$" in t else t for t in argv]))
    return out


@pytest.mark.parametrize("path, least", [("demo.sh", 5), ("results/repro.sh", 6)])
def test_script_commands_parse(path, least, capsys):
    found = commands(os.path.join(ROOT, path))
    assert len(found) >= least, f"{path}: found only {found}"
    for script, argv in found:
        module = importlib.import_module(SCRIPTS[script])
        try:
            module.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{path}: python {script} {' '.join(argv)}: "
                        f"{capsys.readouterr().err.strip().splitlines()[-1]}")


def test_commands_sees_a_bad_flag(tmp_path):
    """The check itself can fail: a flag no script has is refused."""
    bad = tmp_path / "bad.sh"
    bad.write_text('X=(--max_steps 3)\npython train.py "${X[@]}" --no_such_flag 1 > log\n')
    (script, argv), = commands(bad)
    assert (script, argv) == ("train.py", ["--max_steps", "3", "--no_such_flag", "1"])
    with pytest.raises(SystemExit):
        importlib.import_module("train").parse_args(argv)
