"""Batch inversion and editing: 2 CPU processes via `accelerate launch`, crash and resume, bad items.

The runs are subprocesses on the tiny pipeline saved to a folder, 32x32 renders, 3 DDIM steps and
2 inner steps (a few seconds each, mostly start-up).
"""

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
from PIL import Image

from nti_utils.batch import BatchSettings, Item, load_items, read_manifest
from nti_utils.batch.runner import STOP_AFTER_ENV, config_hash
from nti_utils.images import latents_to_pil, load_image
from nti_utils.inversion import null_text_inversion, reconstruct
from nti_utils.metrics import psnr, ssim
from nti_utils.result import InversionSettings
from nti_utils.shapes.world import Scene, Shape
from nti_utils.storage import load_inversion
from nti_utils.testing import tiny_pipeline

ROOT = Path(__file__).resolve().parent.parent
GOOD = ["s0", "s1", "s2", "s3"]
BAD = {  # id -> (stage, a piece of the reason)
    "empty": ("validate", "source prompt is empty"),
    "line11": ("validate", "not valid JSON"),
    "misaligned": ("validate", "align token for token"),
    "missing": ("validate", "image file not found"),
    "unreadable": ("process", "UnidentifiedImageError"),
}
SRC = "a red circle on a white background"
FLAGS = ["--steps", "3", "--inner-steps", "2", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A model folder, an image folder and a manifest of 4 good items and 5 bad ones."""
    root = tmp_path_factory.mktemp("batch")
    tiny_pipeline().save_pretrained(root / "model")
    (root / "images").mkdir()
    scenes = [
        ("circle", "red", "white"),
        ("square", "blue", "gray"),
        ("triangle", "green", "white"),
        ("circle", "yellow", "black"),
    ]
    for i, (kind, color, bg) in enumerate(scenes):
        Scene((Shape(kind, color, 15, 16, 8),), bg, resolution=32).render().save(
            root / "images" / f"s{i}.png"
        )
    (root / "images" / "broken.png").write_bytes(b"not a png")
    lines = [
        {"image": "s0.png", "source": SRC, "targets": ["a purple circle on a white background"]},
        {
            "id": "s1",
            "image": "s1.png",
            "source": "a blue square on a gray background",
            "targets": ["a big blue square on a gray background"],
            "edit": "refine",
            "cross_replace_steps": {"default_": 0.8, "big": [0.0, 0.4]},
        },
        {
            "id": "s2",
            "image": "s2.png",
            "source": "a green triangle on a white background",
            "targets": ["a purple triangle on a white background"],
            "blend_words": [["triangle"], ["triangle"]],
            "self_replace_steps": [0.0, 0.5],
        },
        {
            "id": "s3",
            "image": "s3.png",
            "source": "a yellow circle on a black background",
            "targets": [
                "a purple circle on a black background",
                "a purple square on a black background",
            ],
            "reweight": {"purple": 2.0},
        },
        {"id": "missing", "image": "nope.png", "source": SRC, "targets": [SRC]},
        {"id": "empty", "image": "s0.png", "source": "  ", "targets": [SRC]},
        {
            "id": "misaligned",
            "image": "s0.png",
            "source": SRC,
            "targets": ["a reddish circle on a white background"],
            "edit": "replace",
        },
        {"id": "unreadable", "image": "broken.png", "source": SRC, "targets": [SRC]},
    ]
    text = "".join(json.dumps(x) + "\n" for x in lines)
    (root / "manifest.jsonl").write_text("# a comment\n" + text + "\n{not json\n")
    return root


def _batch(data, out, launcher=True, extra=(), env=None, returncode=0):
    """Run the command (2 processes under `accelerate launch`, or 1 plain one) and check its exit
    status; returns its output."""
    args = [
        "-m",
        "nti_utils.batch",
        "--manifest",
        str(data / "manifest.jsonl"),
        "--out",
        str(out),
        "--images",
        str(data / "images"),
        "--model",
        str(data / "model"),
        *FLAGS,
        *extra,
    ]
    if launcher:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
        launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        args = [*launch, "--main_process_port", str(port), *args]
    env = {
        **{k: v for k, v in os.environ.items() if k != STOP_AFTER_ENV},
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        **(env or {}),
    }
    cmd = [sys.executable, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == returncode, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def _table(log: str) -> dict[str, str]:
    """The summary table the command prints: label -> value."""
    rows = log[log.index("batch summary") :].splitlines()[1:]
    return {r[2:26].strip(): r[26:].strip() for r in rows if r.startswith("  ")}


def _outputs(out: Path) -> dict:
    """Every output file's content: bytes, metrics without timings, summary rows without seconds."""
    files = {}
    for f in sorted(out.rglob("*")):
        if not f.is_file():
            continue
        key = str(f.relative_to(out))
        if f.name == "metrics.json":
            files[key] = {k: v for k, v in json.loads(f.read_text()).items() if k != "seconds"}
        elif f.name == "summary.csv":
            rows = csv.DictReader(f.open())
            files[key] = [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
        else:
            files[key] = f.read_bytes()
    return files


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return out, _batch(data, out)


def test_four_items_two_processes(data, full_run, tiny_pipe):
    out, log = full_run
    table = _table(log)
    assert table["processes"] == "2" and table["done in this run"] == "4", log
    assert sorted(p.name for p in (out / "items").iterdir()) == GOOD
    assert not list((out / "tmp").iterdir())  # no temp dir left behind
    for item in GOOD:
        folder = out / "items" / item
        n_targets = 2 if item == "s3" else 1
        names = {"inversion.safetensors", "source.png", "metrics.json"}
        assert {p.name for p in folder.iterdir()} == names | {
            f"edit_{k}.png" for k in range(n_targets)
        }
        inv = load_inversion(folder / "inversion.safetensors", tiny_pipe, num_steps=3)
        assert inv.null_embeddings.shape == (3, 1, 16, 32) and inv.method == "null-text"
        m = json.loads((folder / "metrics.json").read_text())
        assert m["id"] == item and m["inner_steps"] == sum(m["inner_steps_per_step"]) <= 6
        assert m["settings"]["inversion"] | {"num_steps": 3, "inner_steps": 2} == asdict(
            InversionSettings(num_steps=3, inner_steps=2)
        )
        assert m["seconds"]["total"] >= m["seconds"]["inversion"] > 0
        # the metrics are those of the saved files, and the saved inversion reproduces them:
        # reconstructing it here gives source.png (up to float noise and 8-bit rounding)
        image = load_image(data / "images" / f"{item}.png", 32)
        source = Image.open(folder / "source.png")
        assert m["psnr"] == pytest.approx(psnr(image, source), abs=1e-9)
        assert m["ssim"] == pytest.approx(ssim(image, source), abs=1e-9)
        rec = latents_to_pil(tiny_pipe, reconstruct(tiny_pipe, inv, progress=False))[0]
        assert psnr(rec, source) > 40 and abs(psnr(image, rec) - m["psnr"]) < 0.01
        # the optimization ran: closer to the pivots than the same inversion without Adam steps
        no_updates = InversionSettings(num_steps=3, inner_steps=0)
        start = null_text_inversion(tiny_pipe, image, inv.prompt, no_updates, progress=False)
        assert m["final_latent_mse"] < 0.99 * start.step_errors[-1]
        for k in range(n_targets):  # the targets were edited
            assert Image.open(folder / f"edit_{k}.png").tobytes() != source.tobytes()
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["id"] for r in rows] == GOOD


def test_bad_items_are_listed_with_reasons(full_run):
    out, log = full_run
    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["id"] for e in errors] == sorted(BAD)
    for e in errors:
        stage, reason = BAD[e["id"]]
        assert e["stage"] == stage and reason in e["reason"], e
    assert not list(out.glob("errors.rank*"))  # fragments merged
    assert _table(log)["failed (errors.jsonl)"] == "5"


def test_crashed_run_restarted_gives_identical_outputs(data, full_run, tmp_path):
    out = tmp_path / "crashed"
    # one process that dies (SIGKILL) after placing s0, with s1 written to tmp/ but not renamed
    crash = {STOP_AFTER_ENV: "1"}
    _batch(data, out, launcher=False, env=crash, returncode=-9 if os.name == "posix" else 137)
    assert [p.name for p in (out / "items").iterdir()] == ["s0"]
    assert [p.name for p in (out / "tmp").iterdir()] == ["s1.rank0"]
    assert not (out / "summary.csv").exists() and not (out / "errors.jsonl").exists()
    table = _table(_batch(data, out))  # restart, on 2 processes
    assert table["skipped (done before)"] == "1" and table["done in this run"] == "3"
    assert not list((out / "tmp").iterdir())  # the half-done item's leftovers are gone
    assert _outputs(out) == _outputs(full_run[0])


def test_settings_nest_the_inversion_settings_and_hash_stably(data):
    item = Item("s0", 1, "s0.png", data / "images" / "s0.png", SRC, (SRC,))
    moved = Item("s0", 7, "s0.png", Path("elsewhere/s0.png"), SRC, (SRC,))
    base = BatchSettings()
    assert base.inversion == InversionSettings() and (base.model, base.seed) == ("toy", 0)
    h = config_hash(item, base, "model")
    assert h == config_hash(item, BatchSettings(), "model") == config_hash(moved, base, "model")
    assert len(h) == 16 and int(h, 16) >= 0
    fewer_steps = BatchSettings(inversion=InversionSettings(inner_steps=3))
    others = [
        config_hash(item, fewer_steps, "model"),
        config_hash(item, BatchSettings(seed=1), "model"),
        config_hash(item, base, "another model"),
        config_hash(Item("s0", 1, "s0.png", item.path, SRC, (SRC,), edit="refine"), base, "model"),
    ]
    assert len({h, *others}) == 5


def test_rerun_skips_done_items_and_refuses_other_settings(data, full_run, tmp_path):
    out = shutil.copytree(full_run[0], tmp_path / "rerun")
    before = {p: p.stat().st_mtime_ns for p in (out / "items").rglob("*")}
    table = _table(_batch(data, out, launcher=False))
    assert table["skipped (done before)"] == "4" and table["done in this run"] == "0"
    _batch(data, out, launcher=False, extra=["--seed", "1"])
    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert {e["id"] for e in errors if e["stage"] == "resume"} == set(GOOD)
    assert {p: p.stat().st_mtime_ns for p in (out / "items").rglob("*")} == before


def test_csv_manifest_and_validation(tmp_path, data, tiny_pipe):
    (tmp_path / "m.csv").write_text(
        "id,image,source,targets,edit,reweight\n"
        f"a,s0.png,{SRC},a purple circle on a white background|a red square on a white background,,\n"
        f'b,s0.png,{SRC},a purple circle on a white background,refine,"{{""purple"": 2}}"\n'
        f"a,s0.png,{SRC},{SRC},,\n"
    )
    rows = read_manifest(tmp_path / "m.csv")
    assert rows[0][1]["targets"] == [
        "a purple circle on a white background",
        "a red square on a white background",
    ]
    assert rows[1][1]["reweight"] == {"purple": 2}
    good, errors, n = load_items(tmp_path / "m.csv", data / "images", tiny_pipe, BatchSettings())
    assert [i.id for i in good] == ["a", "b"] and n == 3 and good[1].edit == "refine"
    assert errors[0]["line"] == 4 and "duplicate id" in errors[0]["reason"]
    with pytest.raises(ValueError, match="jsonl or .csv"):
        read_manifest(tmp_path / "m.txt")
