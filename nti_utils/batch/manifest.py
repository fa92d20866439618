"""Manifests of :mod:`nti_utils.batch`: reading JSONL or CSV, and checking every entry into an
:class:`Item` (fields, image file, unique ids, prompts against the model's tokenizer) before any
work starts."""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nti_utils.align import prompt_tokens
from nti_utils.p2p import EDITS, AttentionEdit, build_controller

if TYPE_CHECKING:
    from nti_utils.batch.runner import BatchSettings

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_TEXT_COLUMNS = ("id", "image", "source", "edit")
"""CSV columns kept as text; the others are read as JSON or numbers where they look like it."""


@dataclass(frozen=True)
class Item:
    """One manifest entry, checked: an image, its source prompt, target prompts and edit options.

    Attributes:
        id (`str`): names the output folder ``items/<id>``; defaults to the image's stem.
        line (`int`): where it is in the manifest (1-based; error reports cite it).
        image (`str`): the path as the manifest gives it; `path` is where it was found.
        source (`str`), targets (`tuple[str, ...]`): the source prompt and the edited prompts.
        edit (`str`): ``"replace"`` (:class:`~nti_utils.p2p.Replace`) or ``"refine"``.
        cross_replace_steps, self_replace_steps: as :class:`~nti_utils.p2p.AttentionEdit` takes
            them (JSON lists become ``(start, end)`` windows).
        blend_words (`tuple`, *optional*): words per prompt for a :class:`~nti_utils.p2p.LocalBlend`.
        reweight (`dict[str, float]`, *optional*): word -> factor for :class:`~nti_utils.p2p.Reweight`.
    """

    id: str
    line: int
    image: str
    path: Path
    source: str
    targets: tuple[str, ...]
    edit: str = "replace"
    cross_replace_steps: object = 0.8
    self_replace_steps: object = 0.4
    blend_words: tuple | None = None
    reweight: dict | None = None

    @property
    def prompts(self) -> list[str]:
        """The source prompt, then the targets."""
        return [self.source, *self.targets]

    def spec(self) -> dict:
        """What the item's outputs depend on (all fields but `line` and `path`)."""
        return {k: v for k, v in asdict(self).items() if k not in ("line", "path")}

    def controller(self, tokenizer, num_steps: int) -> AttentionEdit:
        """The Prompt-to-Prompt controller (raises `ValueError` for prompts that do not fit it)."""
        return build_controller(
            tokenizer,
            self.prompts,
            num_steps,
            edit=self.edit,
            cross_replace_steps=self.cross_replace_steps,
            self_replace_steps=self.self_replace_steps,
            blend_words=self.blend_words,
            reweight=self.reweight,
        )


def _tuples(v):
    """JSON lists -> tuples (step windows), recursively through dicts."""
    if isinstance(v, dict):
        return {k: _tuples(x) for k, x in v.items()}
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def _cell(v):
    """A CSV cell: JSON if it looks like it, a number if it is one, else the text."""
    v = v.strip()
    if v[:1] in "[{":
        return json.loads(v)
    try:
        return float(v)
    except ValueError:
        return v


def read_manifest(path: str | Path) -> list[tuple[int, dict | str]]:
    """(line number, record) per entry of a JSONL or CSV manifest; unparsable lines give the
    reason as a string instead of a record."""
    path = Path(path)
    if path.suffix.lower() not in (".csv", ".jsonl", ".json", ".ndjson"):
        raise ValueError(f"manifest {path} must be .jsonl or .csv, got {path.suffix!r}")
    text = path.read_text(encoding="utf-8")
    rows: list[tuple[int, dict | str]] = []
    if path.suffix.lower() == ".csv":
        for n, row in enumerate(csv.DictReader(io.StringIO(text)), start=2):
            rec = {k.strip(): v for k, v in row.items() if k and v is not None and v.strip()}
            try:
                rec = {k: v if k in _TEXT_COLUMNS else _cell(v) for k, v in rec.items()}
            except json.JSONDecodeError as err:
                rows.append((n, f"bad JSON in a cell: {err}"))
                continue
            if isinstance(rec.get("targets"), str):
                rec["targets"] = [t.strip() for t in rec["targets"].split("|")]
            rows.append((n, rec))
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip() and not line.lstrip().startswith("#"):
                try:
                    rec = json.loads(line)
                    rows.append((n, rec if isinstance(rec, dict) else "not a JSON object"))
                except json.JSONDecodeError as err:
                    rows.append((n, f"not valid JSON: {err}"))
    return rows


def parse_item(rec: dict, line: int, images: Path) -> Item:
    """Build an :class:`Item` from a manifest record; `ValueError` says what is wrong with it."""
    if not isinstance(rec.get("image"), str) or not rec["image"].strip():
        raise ValueError("no `image` field (a path relative to the images folder)")
    path = images / rec["image"]
    item_id = str(rec.get("id", Path(rec["image"]).stem))
    if not _ID.fullmatch(item_id):
        raise ValueError(f"id {item_id!r} must be 1-128 letters, digits, '.', '_' or '-'")
    source = rec.get("source")
    if not isinstance(source, str) or not source.strip():
        raise ValueError("the source prompt is empty")
    targets = rec.get("targets")
    targets = [targets] if isinstance(targets, str) else targets
    if not targets or not all(isinstance(t, str) and t.strip() for t in targets):
        raise ValueError("`targets` must be a non-empty list of non-empty prompts")
    edit = rec.get("edit", "replace")
    if edit not in EDITS:
        raise ValueError(f"`edit` must be 'replace' or 'refine', got {edit!r}")
    if not path.is_file():
        raise ValueError(f"image file not found: {path}")
    return Item(
        id=item_id,
        line=line,
        image=rec["image"],
        path=path,
        source=source.strip(),
        targets=tuple(t.strip() for t in targets),
        edit=edit,
        cross_replace_steps=_tuples(rec.get("cross_replace_steps", 0.8)),
        self_replace_steps=_tuples(rec.get("self_replace_steps", 0.4)),
        blend_words=_tuples(rec.get("blend_words")),
        reweight=rec.get("reweight"),
    )


def load_items(
    manifest: Path, images: Path, pipe, settings: BatchSettings
) -> tuple[list[Item], list[dict], int]:
    """Read and check every manifest entry before any work: fields, image file present, ids unique,
    and against the model's tokenizer (prompt length, token alignment of replace edits, blend and
    reweight words). Returns (good items, error records, number of entries)."""
    good, errors, seen = [], [], {}
    tok = pipe.tokenizer
    rows = read_manifest(manifest)
    for line, rec in rows:
        item_id = f"line{line}"
        if isinstance(rec, dict):
            item_id = str(rec.get("id") or Path(str(rec.get("image") or "")).stem or item_id)
        try:
            if isinstance(rec, str):
                raise ValueError(rec)
            item = parse_item(rec, line, images)
            if item.id in seen:
                raise ValueError(
                    f"duplicate id (first on line {seen[item.id]}); give lines distinct ids"
                )
            seen[item.id] = line
            for prompt in item.prompts:
                if len(prompt_tokens(tok, prompt)) > tok.model_max_length:
                    raise ValueError(
                        f"prompt {prompt!r} is longer than the model's {tok.model_max_length} tokens"
                    )
            item.controller(tok, settings.inversion.num_steps)
            good.append(item)
        except (ValueError, TypeError, KeyError, IndexError) as err:
            errors.append({"id": item_id, "line": line, "stage": "validate", "reason": str(err)})
    return good, errors, len(rows)
