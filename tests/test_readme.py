"""The README's file table (its `lines` column) against the files: a script that grew or
shrank since the table was written fails here. A file counts its lines (`wc -l`); a folder
the lines of its own .py and .sh files (not its subfolders)."""

import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lines(path):
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


def test_file_table_line_counts():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        rows = re.findall(r"^\| \[`([^`]+)`\]\([^)]+\) \| (\d+) \|", f.read(), re.M)
    assert len(rows) >= 10, f"README.md: the file table has {len(rows)} rows, expected >= 10"
    stale = []
    for name, stated in rows:
        path = os.path.join(ROOT, name)
        if name.endswith("/"):
            files = [p for ext in ("py", "sh") for p in glob.glob(os.path.join(path, f"*.{ext}"))]
            assert files, f"README.md's file table: {name} holds no .py or .sh file"
            actual = sum(lines(p) for p in files)
        else:
            actual = lines(path)
        if actual != int(stated):
            stale.append(f"{name}: README says {stated}, it has {actual}")
    assert not stale, "README.md's file table is stale:\n" + "\n".join(stale)
