"""Execute notebooks headless, in order, into an output folder; print one line per notebook.

Usage: python scripts/run_notebooks.py --out build/notebooks notebooks/*.ipynb
The committed notebooks are read, never written. Exit status 1 if any notebook fails.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import subprocess
import sys
import time

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError


def run_one(path: pathlib.Path, out_dir: pathlib.Path, timeout: int) -> tuple[bool, float, str]:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent.resolve())}})
    start = time.perf_counter()
    ok, why = True, ""
    try:
        # the kernel's own stderr holds only ipykernel's start-up notices; cell errors and
        # warnings reach the notebook through its outputs
        client.execute(stderr=subprocess.DEVNULL)
    except CellExecutionError as e:
        ok, why = False, re.sub(r"\x1b\[[0-9;]*m", "", str(e).strip().splitlines()[-1])[:200]
    except Exception as e:  # kernel death, timeout
        ok, why = False, f"{type(e).__name__}: {e}"[:200]
    seconds = time.perf_counter() - start
    nbformat.write(nb, out_dir / path.name)
    return ok, seconds, why


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("notebooks", nargs="+", type=pathlib.Path)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("build/notebooks"))
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for path in sorted(args.notebooks):
        ok, seconds, why = run_one(path, args.out, args.timeout)
        failed += not ok
        print(f"{path.name:45s} {seconds:7.1f} s  {'pass' if ok else 'FAIL'}  {why}", flush=True)
    print(f"{len(args.notebooks) - failed} passed, {failed} failed; executed copies in {args.out}/")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
