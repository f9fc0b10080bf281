"""Project-level checks: dependency lists agree, notebooks are stored executed, layers stay clean."""

import json
import pathlib
import re

import pytest
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

# conda names differ from PyPI names for a few packages
CONDA_TO_PIP = {"pytorch-cpu": "torch", "pytorch": "torch"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower()


def test_environment_yml_names_the_same_dependencies_as_pyproject():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    runtime = {_name(r) for r in pyproject["project"]["dependencies"]}
    env = (ROOT / "environment.yml").read_text()
    conda = set()
    in_deps = False
    for line in env.splitlines():
        if line.startswith("dependencies:"):
            in_deps = True
            continue
        m = re.match(r"^  - ([A-Za-z0-9_.\-]+)", line)
        if in_deps and m:
            conda.add(CONDA_TO_PIP.get(m.group(1).lower(), m.group(1).lower()))
    conda -= {"python", "pip"}
    assert conda == runtime
    assert "-e .[notebooks,test,docs]" in env
    assert "python=3.11" in env and "conda-forge" in env


def test_torch_is_pinned_for_make_and_ranged_for_users():
    constraints = (ROOT / "constraints.txt").read_text()
    assert "torch==2.14.1" in constraints and "torchvision==0.29.1" in constraints
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not any("==" in d for d in deps)


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make run" in readme and "make test" in readme


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_executed_in_order_without_errors(path):
    # nbval skips cells whose execution_count is null: an unexecuted notebook would pass trivially
    nb = json.loads(path.read_text())
    counts = [c["execution_count"] for c in nb["cells"] if c["cell_type"] == "code"]
    assert counts, "no code cells"
    assert None not in counts, "some code cells were never executed: run `make notebooks`"
    assert counts == list(range(1, len(counts) + 1)), "cells were not executed top to bottom"
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            assert out["output_type"] != "error", f"error output in cell: {cell['source'][:80]}"
            if out.get("name") == "stderr":
                assert "Traceback" not in out.get("text", "")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_small_without_widget_state_or_timestamps(path):
    # `make notebooks` stores with store_widget_state=False and scripts/clean_notebooks.py
    nb = json.loads(path.read_text())
    assert "widgets" not in nb.get("metadata", {}), "widget state stored: run `make notebooks`"
    stamped = [i for i, c in enumerate(nb["cells"]) if "execution" in c.get("metadata", {})]
    assert not stamped, f"execution timestamps in cells {stamped}: run scripts/clean_notebooks.py"
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            assert "application/vnd.jupyter.widget-view+json" not in out.get("data", {})
    size = path.stat().st_size
    assert size < 250_000, f"{path.name} is {size / 1000:.0f} KB (limit 250 KB)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_links_its_neighbours_and_ends_with_summary_exercises_references(path):
    nb = json.loads(path.read_text())
    first = "".join(nb["cells"][0]["source"])
    i = NOTEBOOKS.index(path)
    for neighbour in NOTEBOOKS[max(0, i - 1):i] + NOTEBOOKS[i + 1:i + 2]:
        assert f"({neighbour.name})" in first, f"no link to {neighbour.name} in the first cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_ends_with_summary_and_exercises(path):
    nb = json.loads(path.read_text())
    md = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    headings = re.findall(r"^## (.+)$", md, flags=re.M)
    assert headings[-3:] == ["Summary", "Exercises", "References"], headings


LAYERS = ["qparams", "quantize", "observers", "observer", "learned", "fixed_point", "qmodule",
          "requantize", "qat_simulation", "weighted", "modules", "ops", "graph", "patterns", "passes",
          "convert", "models", "ptq"]
#: the transformer track, lowest first: the text and weight-only groups, GPTQ, AWQ, activations,
#: their rotations
LLM_LAYERS = ["text", "weight_only", "gptq", "awq", "act_quant", "rotation"]


def test_lower_layers_never_import_higher_ones():
    for i, low in enumerate(LAYERS):
        path = ROOT / "quantlab" / f"{low}.py"
        if not path.exists():
            continue
        src = path.read_text()
        for high in LAYERS[i + 1:] + ["data", "training", "plots"]:
            assert not re.search(rf"from \.{high} import|import quantlab\.{high}", src), \
                f"{low}.py imports the higher layer {high}"
    for i, low in enumerate(LLM_LAYERS):
        src = (ROOT / "quantlab" / f"{low}.py").read_text()
        for high in LLM_LAYERS[i + 1:] + ["training", "lm_training", "plots"]:
            assert not re.search(rf"from \.{high} import|import quantlab\.{high}", src), \
                f"{low}.py imports the higher layer {high}"


def test_no_stray_tool_output_is_tracked():
    # a reading tool once wrote its figures into a folder named by a misread flag ("--help/")
    import subprocess
    root = pathlib.Path(__file__).resolve().parents[1]
    files = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True).stdout.split()
    if not files:
        pytest.skip("not a git checkout")
    assert not [f for f in files if f.startswith("-") or "/-" in f]
    assert not [f for f in files if f.startswith(("build/", "nbread/"))]
