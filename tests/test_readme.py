"""The README's Python code blocks run, in order, as a newcomer would paste them (embedded data).

So the README cannot drift from the code again: a renamed function, a refused model or a missing
variable fails here. The blocks run in one fresh process in a temporary folder (the files they write
stay there)."""

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_readme_has_python_blocks_to_run():
    blocks = python_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(blocks) >= 3
    assert any("quantize_model" in b for b in blocks) and any("to_npz" in b for b in blocks)


def test_every_python_block_of_the_readme_runs_in_order(tmp_path):
    blocks = python_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    script = "\n\n".join(f"# --- README block {i + 1}\n{b}" for i, b in enumerate(blocks))
    script += "\nprint('README_BLOCKS_DONE')\n"
    (tmp_path / "readme_blocks.py").write_text(script)
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg", OMP_NUM_THREADS="1",
               QUANTLAB_MNIST="embedded")
    p = subprocess.run([sys.executable, "readme_blocks.py"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0 and "README_BLOCKS_DONE" in p.stdout, p.stdout[-2000:] + p.stderr[-4000:]
    # the accuracy the README announces for its own model ("about 0.95-0.97"), with room for noise
    accuracy = float(re.search(r"^(0\.\d+)$", p.stdout, flags=re.M).group(1))
    assert 0.93 <= accuracy <= 0.99, accuracy


def test_the_readme_table_of_supported_patterns_is_generated_from_quantlab_patterns():
    # the one place that says what converts to what is quantlab.patterns; the README shows it
    from quantlab.patterns import markdown
    text = (ROOT / "README.md").read_text()
    start = text.index("<!-- patterns:")
    start = text.index("\n", start) + 1
    end = text.index("<!-- /patterns -->")
    assert text[start:end].strip() == markdown().strip(), \
        "README's table is out of date: paste the output of `python -m quantlab.patterns`"
