"""Keep committed notebooks clean for review: ``python tools/clean_notebooks.py notebooks/*.ipynb``.

For each notebook: cell ids become stable (``NN-cell-KK``, from the file's number and the cell's
position), cell metadata keeps only ``tags``, notebook metadata keeps only the kernel and language
info, widget state and execution timings are dropped, and outputs stay. Run it after executing or
editing a notebook, before committing; ``--check`` exits 1 if a file would change (for CI/hooks).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

KEEP_NB_META = ("kernelspec", "language_info")


def clean(nb: dict, stem: str) -> dict:
    prefix = stem.split("_")[0]
    nb["metadata"] = {k: nb["metadata"][k] for k in KEEP_NB_META if k in nb.get("metadata", {})}
    if "language_info" in nb["metadata"]:
        nb["metadata"]["language_info"] = {"name": "python"}
    nb["nbformat"], nb["nbformat_minor"] = 4, 5
    for k, cell in enumerate(nb["cells"]):
        cell["id"] = f"{prefix}-cell-{k:02d}"
        tags = cell.get("metadata", {}).get("tags")
        cell["metadata"] = {"tags": tags} if tags else {}
        if cell["cell_type"] == "code":
            for out in cell.get("outputs", []):
                out.get("metadata", {}).pop("application/vnd.jupyter.widget-view+json", None)
                data = out.get("data", {})
                data.pop("application/vnd.jupyter.widget-view+json", None)
    return nb


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("paths", nargs="+", type=Path)
    p.add_argument("--check", action="store_true", help="only report files that would change")
    args = p.parse_args(argv)
    changed = []
    for path in args.paths:
        before = path.read_text()
        after = (
            json.dumps(clean(json.loads(before), path.stem), indent=1, ensure_ascii=False) + "\n"
        )
        if after != before:
            changed.append(path)
            if not args.check:
                path.write_text(after)
    for path in changed:
        print(f"{'would clean' if args.check else 'cleaned'} {path}")
    return 1 if (args.check and changed) else 0


if __name__ == "__main__":
    sys.exit(main())
