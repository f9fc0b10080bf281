"""quantlab.gradebook: a folder of submissions graded into a table, a CSV and a JSON grade book."""

import csv
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from quantlab import forkserver, gradebook

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOLUTIONS = ROOT / "exercises" / "solutions"


def _notebook(path, source, lesson="a"):
    nb = {"cells": [{"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
                     "source": source}],
          "metadata": {"quantlab": {"lesson": lesson}}, "nbformat": 4, "nbformat_minor": 5}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(nb))


@pytest.fixture
def submissions(tmp_path):
    subs = tmp_path / "subs"
    (subs / "alice").mkdir(parents=True)
    shutil.copy(SOLUTIONS / "a_exercises.ipynb", subs / "alice" / "a_exercises.ipynb")
    shutil.copy(SOLUTIONS / "f_exercises.ipynb", subs / "carol_f_exercises.ipynb")
    _notebook(subs / "bob" / "a_exercises.ipynb",
              "def quant_range(num_bits=8, signed=False):\n    return 0, 2**num_bits")    # off by one
    _notebook(subs / "dave" / "work" / "a_exercises.ipynb",
              "import torch\nbig = torch.empty(2**31)   # 8 GB: over the memory limit\n")
    _notebook(subs / ".ipynb_checkpoints" / "a_exercises.ipynb", "raise SystemExit")  # skipped
    (subs / "notes.ipynb").write_text("{}")                                               # no lesson
    return subs


def test_learners_are_found_by_folder_or_file_name(submissions):
    found = [(learner, p.name) for learner, p in gradebook.find_notebooks(submissions)]
    assert sorted(found) == [("alice", "a_exercises.ipynb"), ("bob", "a_exercises.ipynb"),
                             ("carol", "carol_f_exercises.ipynb"), ("dave", "a_exercises.ipynb")]
    with pytest.raises(ValueError, match="not a folder"):
        gradebook.find_notebooks(submissions / "alice" / "a_exercises.ipynb")


def test_grade_book_table_csv_and_json(submissions, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out_csv, out_json = tmp_path / "grades.csv", tmp_path / "grades.json"
    p = subprocess.run([sys.executable, "-m", "quantlab.check", "--grade", str(submissions),
                        "--csv", str(out_csv), "--json", str(out_json), "--memory", "1024"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "4 notebooks of 4 learners" in p.stdout and "memory limit 1024 MB" in p.stdout
    table = {line.split()[0]: line for line in p.stdout.splitlines() if line.split()
             and line.split()[0] in ("alice", "bob", "carol", "dave")}
    assert table["alice"].split()[1:9] == ["ok"] * 7 + ["7/7"]
    assert table["bob"].split()[1:3] == ["FAIL", "-"] and "0/7" in table["bob"]
    assert "2/2" in table["carol"]
    assert "ERROR" in table["dave"] and "allocate" in table["dave"]   # the memory limit held
    rows = {r["learner"]: r for r in csv.DictReader(out_csv.open())}
    assert rows["alice"]["points"] == "7" and rows["alice"]["max_points"] == "7"
    assert rows["alice"]["a5"] == "passed" and rows["alice"]["f1"] == ""
    assert rows["bob"]["a1"] == "failed" and rows["bob"]["points"] == "0"
    assert rows["carol"]["lesson"] == "f" and rows["carol"]["points"] == "2"
    data = {d["learner"]: d for d in json.loads(out_json.read_text())}
    bob_a1 = data["bob"]["results"][0]
    assert bob_a1["status"] == "failed" and bob_a1["expected"] and bob_a1["got"] and bob_a1["hint"]


def test_grade_needs_a_folder_with_notebooks(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "quantlab.check", "--grade", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and "no exercise notebook" in p.stderr


def test_nbgraders_submitted_folder_names_the_learner_by_its_first_folder(tmp_path):
    # nbgrader collects into submitted/<learner>/<assignment>/<notebook>.ipynb
    nested = tmp_path / "submitted" / "erin" / "ps1" / "a_exercises.ipynb"
    nested.parent.mkdir(parents=True)
    shutil.copy(SOLUTIONS / "a_exercises.ipynb", nested)
    assert [(learner, p.name) for learner, p in gradebook.find_notebooks(tmp_path / "submitted")] \
        == [("erin", "a_exercises.ipynb")]



def test_a_class_of_twelve_mixed_notebooks(tmp_path):
    # right, wrong, unfinished, crashing, endless and self-ending notebooks of several lessons, one folder
    subs = tmp_path / "class"
    templates = ROOT / "exercises"
    for learner, lesson in (("ann", "a"), ("ben", "b"), ("cat", "c"), ("dan", "h")):       # right
        (subs / learner).mkdir(parents=True)
        shutil.copy(SOLUTIONS / f"{lesson}_exercises.ipynb", subs / learner / f"{lesson}_exercises.ipynb")
    for learner, lesson in (("eve", "a"), ("fay", "i")):                                   # unfinished
        (subs / learner).mkdir(parents=True)
        shutil.copy(templates / f"{lesson}_exercises.ipynb", subs / learner / f"{lesson}_exercises.ipynb")
    nb = json.loads((SOLUTIONS / "c_exercises.ipynb").read_text())                          # wrong: z = 1.96
    for cell in nb["cells"]:
        cell["source"] = "".join(cell["source"]).replace("Z = 1.959964", "Z = 1.96")
    (subs / "gus").mkdir()
    (subs / "gus" / "c_exercises.ipynb").write_text(json.dumps(nb))
    _notebook(subs / "hal" / "a_exercises.ipynb",
              "def quant_range(num_bits=8, signed=False):\n"
              "    if signed:\n        return -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1\n"
              "    return 0, 2**num_bits - 1\n"
              "raise RuntimeError('a cell that crashes')\n")                                  # crashing
    _notebook(subs / "ivy" / "b_exercises.ipynb", "while True:\n    pass\n", lesson="b")    # endless
    _notebook(subs / "jon" / "a_exercises.ipynb", "import os\nos._exit(0)\n")              # ends its process
    _notebook(subs / "kim" / "f_exercises.ipynb",
              "def moving_average_range(min_val, max_val, x, averaging_constant=0.01):\n"
              "    return x.min(), x.max()\n", lesson="f")                                  # half wrong
    shutil.copy(SOLUTIONS / "g_exercises.ipynb", subs / "lou_g_exercises.ipynb")  # right, by name
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out_csv = tmp_path / "grades.csv"
    # the endless notebook is stopped at the time limit: forked from the warm fork server, the others
    # take seconds each (at most 6 s here on a loaded machine); started afresh (not Linux) each first
    # spends seconds importing torch
    limit = 30 if forkserver.available() else 60
    p = subprocess.run([sys.executable, "-m", "quantlab.check", "--grade", str(subs), "--csv", str(out_csv),
                        "--timeout", str(limit)],
                       capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "12 notebooks of 12 learners" in p.stdout, p.stdout
    rows = {r["learner"]: r for r in csv.DictReader(out_csv.open())}
    assert len(rows) == 12
    full = {learner: rows[learner]["points"] == rows[learner]["max_points"] for learner in rows}
    assert all(full[k] for k in ("ann", "ben", "cat", "dan", "lou")), rows
    assert rows["eve"]["points"] == rows["fay"]["points"] == "0" and rows["eve"]["a1"] == "not attempted"
    assert rows["gus"]["c1"] == "failed" and rows["gus"]["c3"] == "passed"
    assert rows["hal"]["a1"] == "passed" and rows["hal"]["error"]             # graded up to the crash, named
    assert rows["ivy"]["points"] == "0" and "time" in rows["ivy"]["error"]      # stopped at the time limit
    assert rows["jon"]["points"] == "0" and rows["jon"]["error"]               # never counted as passed
    assert rows["kim"]["f2"] == "failed" and rows["kim"]["f1"] == "not attempted", rows["kim"]
