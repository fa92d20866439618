"""Manifests of :mod:`nti_utils.batch`: reading JSONL or CSV (UTF-8, with or without a byte-order
mark), and checking every entry into an :class:`Item` (fields and their types, image file inside
the images folder, unique ids, prompts against the model's tokenizer) before any work starts."""

from __future__ import annotations

import csv
import io
import json
import numbers
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nti_utils.align import check_prompt, swap_words
from nti_utils.editing import EDITS, build_controller
from nti_utils.p2p import AttentionEdit
from nti_utils.result import is_finite_real

if TYPE_CHECKING:
    from nti_utils.batch.runner import BatchSettings

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_TEXT_COLUMNS = ("id", "image", "source", "edit")
"""CSV columns kept as text; the others are read as JSON or numbers where they look like it."""
FIELDS = (
    "id",
    "image",
    "source",
    "targets",
    "edit",
    "cross_replace_steps",
    "self_replace_steps",
    "blend_words",
    "reweight",
)
"""The fields of a manifest entry (any other is an error: a misspelt field would be ignored)."""
REQUIRED = ("image", "targets")
"""The fields every entry needs; without `source` the image is captioned (:mod:`nti_utils.caption`)."""


@dataclass(frozen=True)
class Item:
    """One manifest entry, checked: an image, its source prompt, target prompts and edit options.

    Attributes:
        id (`str`): names the output folder ``items/<id>``; defaults to the image's stem.
        line (`int`): where it is in the manifest (1-based; error reports cite it).
        image (`str`): the path as the manifest gives it; `path` is where it was found.
        source (`str`), targets (`tuple[str, ...]`): the source prompt and the edited prompts
            (word swaps of the manifest, ``{"circle": "square"}``, applied to the source).
        source_from (`str`): ``"manifest"``, or ``"captioner:<name>"`` when the manifest gave no
            source and the image was captioned.
        edit (`str`): ``"replace"`` (:class:`~nti_utils.p2p.Replace`) or ``"refine"``.
        cross_replace_steps, self_replace_steps: as :class:`~nti_utils.p2p.AttentionEdit` takes
            them (JSON lists become ``(start, end)`` windows).
        blend_words (`tuple`, *optional*): words per prompt for a :class:`~nti_utils.local_blend.LocalBlend`.
        reweight (`dict[str, float]`, *optional*): word -> factor for :class:`~nti_utils.p2p.Reweight`.
    """

    id: str
    line: int
    image: str
    path: Path
    source: str
    targets: tuple[str, ...]
    source_from: str = "manifest"
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


def _decode(path: Path) -> str:
    """The manifest's text: UTF-8, a UTF-8 byte-order mark (Excel's "CSV UTF-8") dropped; other
    encodings are refused with what they look like."""
    raw = path.read_bytes()
    for bom, name in (
        (b"\xff\xfe\x00\x00", "UTF-32"),
        (b"\x00\x00\xfe\xff", "UTF-32"),
        (b"\xff\xfe", "UTF-16"),
        (b"\xfe\xff", "UTF-16"),
    ):
        if raw.startswith(bom):
            raise ValueError(
                f"manifest {path} is {name} text (it starts with a {name} byte-order mark); save "
                "it as UTF-8 (in Excel: 'CSV UTF-8 (Comma delimited)'; in an editor: encoding "
                "UTF-8)"
            )
    if b"\x00" in raw:
        raise ValueError(
            f"manifest {path} holds NUL bytes: it is UTF-16/UTF-32 text without a byte-order mark "
            "or not text at all; save it as UTF-8"
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ValueError(
            f"manifest {path} is not UTF-8 text: byte 0x{raw[err.start]:02x} on line {line} is not "
            "valid UTF-8 (Latin-1 or Windows-1252 files do this, e.g. for accented letters); save "
            "it as UTF-8"
        ) from None


def read_manifest(path: str | Path) -> list[tuple[int, dict | str]]:
    """(line number, record) per entry of a JSONL or CSV manifest; unparsable lines give the
    reason as a string instead of a record.

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: problems of the whole file: another suffix, an encoding other than UTF-8, a
            CSV header without the required columns or with unknown ones.
    """
    path = Path(path)
    if path.suffix.lower() not in (".csv", ".jsonl", ".json", ".ndjson"):
        raise ValueError(f"manifest {path} must be .jsonl or .csv, got {path.suffix!r}")
    if path.is_dir():
        raise ValueError(f"manifest {path} is a folder, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"no manifest at {path}")
    text = _decode(path)
    rows: list[tuple[int, dict | str]] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        header = [k.strip() for k in reader.fieldnames or []]
        missing = [k for k in REQUIRED if k not in header]
        unknown = [k for k in header if k and k not in FIELDS]
        if missing or unknown:
            raise ValueError(
                f"CSV manifest {path}: "
                + (f"no {', '.join(repr(k) for k in missing)} column; " if missing else "")
                + (f"unknown columns {unknown}; " if unknown else "")
                + f"its header is {header}, the columns are {list(FIELDS)} "
                f"({', '.join(REQUIRED)} required)"
            )
        for n, row in enumerate(reader, start=2):
            if row.get(None):
                rows.append(
                    (
                        n,
                        f"{len(header) + len(row[None])} cells but the header has {len(header)} "
                        "columns: put cells that contain commas in double quotes",
                    )
                )
                continue
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


_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", bool: "true/false"}


def _desc(v: object) -> str:
    """A value as the manifest's author sees it: its JSON type and value."""
    if v is None:
        return "null"
    kind = next((n for t, n in _JSON_TYPES.items() if type(v) is t), None)
    if kind is None:
        kind = "a number" if isinstance(v, numbers.Real) else type(v).__name__
    text = json.dumps(v) if isinstance(v, (dict, list, str, int, float)) else repr(v)
    return f"{kind} ({text if len(text) <= 60 else text[:57] + '...'})"


def _steps(v: object, name: str, per_word: bool):
    """A step window: a fraction in [0, 1] or [start, end]; for `per_word`, also an object of
    those by word (with "default_"). JSON lists become tuples."""
    allowed = "a fraction in [0, 1] or a [start, end] pair of fractions"
    if per_word and isinstance(v, dict):
        for word, w in v.items():
            _steps(w, f"{name}[{word!r}]", False)
        return {k: _tuples(w) for k, w in v.items()}
    if isinstance(v, (list, tuple)):
        if len(v) != 2 or not all(is_finite_real(x) for x in v) or not 0 <= v[0] <= v[1] <= 1:
            raise ValueError(f"`{name}` must be {allowed} with start <= end, got {_desc(v)}")
        return tuple(v)
    if not is_finite_real(v) or not 0 <= v <= 1:
        extra = ', or an object {"word": window, "default_": window}' if per_word else ""
        raise ValueError(f"`{name}` must be {allowed}{extra}, got {_desc(v)}")
    return v


def _inside(path: str, folder: Path) -> bool:
    """Whether `path` (relative to `folder`, or absolute) names a file inside `folder`, by its
    normalized text (``..`` resolved; symlinks inside the folder are the folder's own)."""
    base = os.path.normpath(os.path.abspath(folder))
    full = os.path.normpath(os.path.join(base, path))
    return full.startswith(base.rstrip(os.sep) + os.sep)


def parse_item(
    rec: dict,
    line: int,
    images: Path,
    allow_outside_images: bool = False,
    captioner: Callable[[Path], str] | None = None,
    captioner_name: str = "",
) -> Item:
    """Build an :class:`Item` from a manifest record; `ValueError` says what is wrong with it
    (the field, the value received and what is allowed).

    Args:
        rec (`dict`): the record.
        line (`int`): its line in the manifest.
        images (`Path`): the images folder; `image` paths are relative to it.
        allow_outside_images (`bool`, defaults to `False`): accept `image` paths that lead outside
            `images` (``../x.png``, absolute paths); refused by default.
        captioner (`Callable[[Path], str]`, *optional*): writes the source prompt of an entry
            without one (called with the image's path, after every other field is checked);
            without it such an entry is an error.
        captioner_name (`str`): recorded in the item's `source_from`.
    """
    if not isinstance(rec, dict):
        raise ValueError(f"an entry must be a JSON object, got {_desc(rec)}")
    unknown = [k for k in rec if k not in FIELDS]
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; the fields are {list(FIELDS)}")
    image = rec.get("image")
    if image is None or (isinstance(image, str) and not image.strip()):
        raise ValueError("no `image` field (a path relative to the images folder)")
    if not isinstance(image, str):
        raise ValueError(
            f"`image` must be a path (a string) relative to the images folder, got {_desc(image)}"
        )
    if not allow_outside_images and not _inside(image, images):
        raise ValueError(
            f"`image` {image!r} points outside the images folder {images}; images must lie inside "
            "it (pass --allow-outside-images, or allow_outside_images=True, to allow other paths)"
        )
    path = images / image
    if "id" in rec:
        item_id = rec["id"]
        if not isinstance(item_id, str):
            hint = (
                "; leave the field out to use the image's stem"
                if item_id is None
                else "; write it in quotes"
                if is_finite_real(item_id)
                else ""
            )
            raise ValueError(f"`id` must be a string, got {_desc(item_id)}{hint}")
    else:  # the image's stem, made a safe folder name ("IMG 1234.jpg" -> "IMG_1234")
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", Path(image).stem).lstrip("._-")[:128]
        item_id = stem or f"line{line}"
    if not _ID.fullmatch(item_id):
        raise ValueError(
            f"id {item_id!r} must be 1-128 letters, digits, '.', '_' or '-' (starting with a "
            "letter or digit)"
        )
    source = rec.get("source")
    if source is not None and not isinstance(source, str):
        raise ValueError(f"`source` must be a string (the source prompt), got {_desc(source)}")
    if source is not None and not source.strip():
        raise ValueError(
            "the source prompt is empty; leave the `source` field out to caption the image"
        )
    targets = rec.get("targets")
    if targets is None:
        raise ValueError("no `targets` field (a list of edited prompts)")
    targets = [targets] if isinstance(targets, str) else targets
    if not isinstance(targets, (list, tuple)):
        raise ValueError(
            f"`targets` must be a list of prompts (or one prompt), got {_desc(targets)}"
        )
    if not targets:
        raise ValueError("`targets` must be a non-empty list of non-empty prompts")
    for k, t in enumerate(targets):
        if isinstance(t, dict):  # word swaps, applied to the source below
            if not t or not all(isinstance(a, str) and isinstance(b, str) for a, b in t.items()):
                raise ValueError(
                    f'`targets[{k}]` must be a prompt or word swaps {{"word": "new word"}}, got '
                    f"{_desc(t)}"
                )
            continue
        if not isinstance(t, str):
            raise ValueError(
                f'`targets[{k}]` must be a string (a prompt) or word swaps {{"word": "new word"}}, '
                f"got {_desc(t)}"
            )
        if not t.strip():
            raise ValueError(
                f"`targets[{k}]` is empty: `targets` must be a non-empty list of non-empty prompts"
            )
    edit = rec.get("edit", "replace")
    if edit not in EDITS:
        raise ValueError(f"`edit` must be 'replace' or 'refine', got {_desc(edit)}")
    cross = _steps(rec.get("cross_replace_steps", 0.8), "cross_replace_steps", True)
    self_steps = _steps(rec.get("self_replace_steps", 0.4), "self_replace_steps", False)
    blend = rec.get("blend_words")
    n_prompts = 1 + len(targets)
    if blend is not None:
        shape = "a list with one list of words per prompt (source first)"
        if not isinstance(blend, (list, tuple)) or len(blend) != n_prompts:
            raise ValueError(
                f"`blend_words` must be {shape}, {n_prompts} lists here, got {_desc(blend)}"
            )
        for k, words in enumerate(blend):
            words = [words] if isinstance(words, str) else words
            if not isinstance(words, (list, tuple)) or not all(
                isinstance(w, str) and w.strip() for w in words
            ):
                raise ValueError(
                    f"`blend_words[{k}]` must be a list of words (strings), got {_desc(blend[k])}"
                )
    reweight = rec.get("reweight")
    if reweight is not None:
        if not isinstance(reweight, dict) or not reweight:
            raise ValueError(
                f'`reweight` must be an object {{"word": factor, ...}}, got {_desc(reweight)}'
            )
        for word, factor in reweight.items():
            if not is_finite_real(factor):
                raise ValueError(
                    f"`reweight[{word!r}]` must be a finite number (the attention factor), got "
                    f"{_desc(factor)}"
                )
    if not path.is_file():
        raise ValueError(f"image file not found: {path}")
    source_from = "manifest"
    if source is None:
        if captioner is None:
            raise ValueError(
                "no `source` field (the prompt that describes the image) and no captioner to "
                "write it"
            )
        source, source_from = captioner(path), f"captioner:{captioner_name}"
    source = source.strip()
    targets = [swap_words(source, t) if isinstance(t, dict) else t.strip() for t in targets]
    return Item(
        id=item_id,
        line=line,
        image=image,
        path=path,
        source=source,
        targets=tuple(targets),
        source_from=source_from,
        edit=edit,
        cross_replace_steps=cross,
        self_replace_steps=self_steps,
        blend_words=_tuples(blend),
        reweight=reweight,
    )


def _record_id(rec: object, line: int) -> str:
    """The id an error record of this entry gets (its id, else its image's stem, else the line)."""
    if isinstance(rec, dict):
        if isinstance(rec.get("id"), str) and rec["id"].strip():
            return rec["id"]
        if isinstance(rec.get("image"), str) and Path(rec["image"]).stem:
            return Path(rec["image"]).stem
    return f"line{line}"


def load_items(
    manifest: Path,
    images: Path,
    pipe,
    settings: BatchSettings,
    rows: list[tuple[int, dict | str]] | None = None,
    allow_outside_images: bool = False,
) -> tuple[list[Item], list[dict], int]:
    """Read and check every manifest entry before any work: fields and their types, image file
    present (inside `images` unless `allow_outside_images`), ids unique, and against the model's
    tokenizer (characters it can represent, prompt length, token alignment of replace edits, blend
    and reweight words). Every bad entry becomes an error record, whatever is wrong with it.
    Entries without a `source` are captioned with ``settings.captioner`` (loaded once, only if an
    entry needs it; a captioner that is not there is an error of the run, raised before any work).
    Returns (good items, error records, number of entries).

    Args:
        rows: the manifest as :func:`read_manifest` read it, if it was read already.
    """
    good, errors, seen = [], [], {}
    tok = pipe.tokenizer
    rows = read_manifest(manifest) if rows is None else rows
    write_source = None
    if any(isinstance(rec, dict) and "source" not in rec for _, rec in rows):
        from nti_utils.caption import load_captioner  # loaded only when an entry needs it

        captioner = load_captioner(settings.captioner, pipe.device)

        def write_source(path: Path) -> str:
            return captioner(path)[0]

    for line, rec in rows:
        try:
            if isinstance(rec, str):
                raise ValueError(rec)
            item = parse_item(
                rec, line, images, allow_outside_images, write_source, settings.captioner
            )
            if item.id in seen:
                raise ValueError(
                    f"duplicate id (first on line {seen[item.id]}); give lines distinct ids"
                )
            seen[item.id] = line
            check_prompt(tok, item.source, "the source prompt")
            for k, prompt in enumerate(item.targets):
                check_prompt(tok, prompt, f"targets[{k}]")
            item.controller(tok, settings.inversion.num_steps)
            good.append(item)
        except Exception as err:  # every bad entry is reported, whatever it is
            reason = str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"
            errors.append(
                {"id": _record_id(rec, line), "line": line, "stage": "validate", "reason": reason}
            )
    return good, errors, len(rows)
