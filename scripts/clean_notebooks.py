"""Strip what churns or bloats from stored notebooks: widget state and execution timestamps.

Usage: python scripts/clean_notebooks.py notebooks/*.ipynb
Removes ``metadata.widgets`` (notebook level), ``metadata.execution`` (cell level, the timestamps
that change on every run) and widget-view outputs whose only content is the widget reference
(keeping their text/plain fallback). Rewrites a file only when something changed.
"""

from __future__ import annotations

import json
import pathlib
import sys

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def clean(nb: dict) -> dict:
    nb.get("metadata", {}).pop("widgets", None)
    for cell in nb.get("cells", []):
        cell.get("metadata", {}).pop("execution", None)
        for out in cell.get("outputs", []):
            data = out.get("data")
            if data and WIDGET_MIME in data:
                del data[WIDGET_MIME]
    return nb


def main(paths: list[str]) -> int:
    for name in paths:
        path = pathlib.Path(name)
        text = path.read_text()
        cleaned = json.dumps(clean(json.loads(text)), indent=1, ensure_ascii=False) + "\n"
        if cleaned != text:
            path.write_text(cleaned)
            print(f"cleaned {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
