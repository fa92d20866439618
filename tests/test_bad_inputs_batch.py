"""Bad input to the batch runner and the benchmark: manifests (encodings, CSV headers, field types,
paths outside the images folder), output folders that are not theirs, flags; nothing of the user's
is deleted or replaced.

In-process and fast: the command lines stop at their up-front checks, and the one run that loads a
model has no item to process.
"""

import json
import math

import pytest
import torch
from PIL import Image

from nti_utils import bench
from nti_utils.batch import BatchSettings, load_items, parse_item, read_manifest, runner
from nti_utils.bench import cli as bench_cli
from nti_utils.bench.report import MARKER as BENCH_MARKER
from nti_utils.result import InversionSettings
from nti_utils.testing import tiny_pipeline

SRC = "a red circle on a white background"
TGT = "a purple circle on a white background"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    Image.new("RGB", (32, 32), (200, 30, 30)).save(root / "c.png")
    (root / "sub").mkdir()
    Image.new("RGB", (32, 32)).save(root / "sub" / "d.png")
    Image.new("RGB", (32, 32)).save(root.parent / "outside.png")
    return root


def _rec(**fields):
    rec = {"image": "c.png", "source": SRC, "targets": [TGT]}
    return {k: v for k, v in {**rec, **fields}.items() if v is not ...}


# ------------------------------------------------------------------------------------ entries
@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(id=None), "`id` must be a string, got null; leave the field out"),
        (dict(id=7), "`id` must be a string, got a number .7.; write it in quotes"),
        (dict(id=["a"]), "`id` must be a string, got a list"),
        (dict(id="../evil"), "id '../evil' must be 1-128 letters"),
        (dict(image=...), "no `image` field"),
        (
            dict(image=3),
            "`image` must be a path .a string. relative to the images folder, got a number",
        ),
        (dict(image=["c.png"]), "`image` must be a path"),
        (dict(image="../outside.png"), "points outside the images folder"),
        (dict(image="sub/../../outside.png"), "points outside the images folder"),
        (dict(image="/etc/hostname"), "points outside the images folder"),
        (dict(image="nope.png"), "image file not found"),
        (dict(source=...), "no `source` field"),
        (dict(source=5), "`source` must be a string .the source prompt., got a number"),
        (dict(source="  "), "the source prompt is empty"),
        (dict(targets=...), "no `targets` field"),
        (dict(targets=5), "`targets` must be a list of prompts .or one prompt., got a number"),
        (dict(targets={"a": TGT}), "`targets` must be a list of prompts"),
        (dict(targets=[]), "`targets` must be a non-empty list"),
        (dict(targets=[TGT, 3]), r"`targets\[1\]` must be a string"),
        (dict(targets=[TGT, " "]), r"`targets\[1\]` is empty"),
        (dict(targets=[{"square": "circle"}]), "'square' is not a word of the prompt"),
        (dict(targets=[{"circle": 3}]), r"`targets\[0\]` must be a prompt or word swaps"),
        (dict(targets=[{}]), r"`targets\[0\]` must be a prompt or word swaps"),
        (dict(edit="swap"), "`edit` must be 'replace' or 'refine', got a string"),
        (dict(edit=1), "`edit` must be 'replace' or 'refine', got a number"),
        (dict(cross_replace_steps=1.5), "`cross_replace_steps` must be a fraction in .0, 1."),
        (dict(cross_replace_steps=math.nan), "`cross_replace_steps` must be a fraction"),
        (dict(cross_replace_steps="0.8"), "`cross_replace_steps` must be a fraction"),
        (dict(cross_replace_steps={"big": 2}), r"`cross_replace_steps\['big'\]` must be"),
        (dict(self_replace_steps=[0.5, 0.2]), "`self_replace_steps` must be .* start <= end"),
        (dict(self_replace_steps=[0.1, 0.2, 0.3]), "`self_replace_steps` must be"),
        (dict(self_replace_steps={"default_": 0.4}), "`self_replace_steps` must be a fraction"),
        (dict(self_replace_steps=True), "`self_replace_steps` must be a fraction"),
        (dict(blend_words="circle"), "`blend_words` must be a list with one list of words per"),
        (dict(blend_words=[["circle"]]), "2 lists here"),
        (dict(blend_words=[[1], ["circle"]]), r"`blend_words\[0\]` must be a list of words"),
        (dict(reweight=["purple", 2]), "`reweight` must be an object"),
        (dict(reweight={}), "`reweight` must be an object"),
        (dict(reweight={"purple": "two"}), r"`reweight\['purple'\]` must be a finite number"),
        (dict(reweight={"purple": math.inf}), r"`reweight\['purple'\]` must be a finite number"),
        (dict(reweight={"purple": None}), r"`reweight\['purple'\]` must be a finite number"),
        (dict(taregts=[TGT]), r"unknown field\(s\) \['taregts'\]"),
    ],
)
def test_bad_entries_say_what_is_wrong(images, fields, match):
    with pytest.raises(ValueError, match=match):
        parse_item(_rec(**fields), 1, images)


def test_an_entry_must_be_an_object(images):
    with pytest.raises(ValueError, match="must be a JSON object, got a list"):
        parse_item(["c.png"], 1, images)


@pytest.mark.parametrize(
    "fields, check",
    [
        (dict(image="../outside.png"), lambda it: it.path.name == "outside.png"),
        (dict(image="sub/d.png"), lambda it: it.id == "d"),
        (dict(targets=TGT), lambda it: it.targets == (TGT,)),
        (dict(id="007"), lambda it: it.id == "007"),
    ],
)
def test_odd_but_valid_entries(images, fields, check):
    item = parse_item(_rec(**fields), 1, images, allow_outside_images=True)
    assert check(item)


def test_word_swap_targets_apply_to_the_source(images):
    item = parse_item(_rec(targets=[{"circle": "square"}, TGT]), 1, images)
    assert item.targets == ("a red square on a white background", TGT)
    assert item.source_from == "manifest"


def test_an_entry_without_source_is_captioned_and_says_so(images):
    seen = []

    def write(path):
        seen.append(path)
        return "  a red circle on a white background "

    item = parse_item(_rec(source=..., targets=[{"red": "blue"}]), 1, images, False, write, "toy")
    assert seen == [images / "c.png"]
    assert item.source == SRC and item.source_from == "captioner:toy"
    assert item.targets == ("a blue circle on a white background",)
    with pytest.raises(ValueError, match="no captioner"):
        parse_item(_rec(source=...), 1, images)


def test_inside_paths_need_no_flag(images):
    assert parse_item(_rec(image="sub/d.png"), 1, images).path == images / "sub" / "d.png"


def test_every_bad_entry_goes_to_the_errors_and_the_rest_is_kept(images, tiny_pipe, tmp_path):
    lines = [
        _rec(id="good"),
        _rec(id="reweight", reweight=["purple", 2]),
        _rec(id="blend", blend_words=[["circle"], ["squircle"]]),
        _rec(id="digits", source="a red circle 3"),
        _rec(id="emoji", targets=["a purple \U0001f600 circle"]),
        _rec(id=None),
        {"image": 5, "source": SRC, "targets": [TGT]},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    good, errors, n = load_items(manifest, images, tiny_pipe, BatchSettings())
    assert [i.id for i in good] == ["good"] and n == 7
    reasons = {e["id"]: e["reason"] for e in errors}
    assert "`reweight` must be an object" in reasons["reweight"]
    assert "squircle" in reasons["blend"]
    assert "cannot represent: '3'" in reasons["digits"]
    assert "targets[0]" in reasons["emoji"] and "\U0001f600" in reasons["emoji"]
    assert "`id` must be a string, got null" in reasons["c"]  # named after the image
    assert "`image` must be a path" in reasons["line7"]
    assert all(e["stage"] == "validate" for e in errors)


# ------------------------------------------------------------------------------------ manifests
CSV = f"id,image,source,targets\nc1,c.png,{SRC},{TGT}\n"


@pytest.mark.parametrize(
    "name, data, match",
    [
        ("m.csv", CSV.encode("utf-16"), "is UTF-16 text"),
        ("m.jsonl", json.dumps(_rec()).encode("utf-16-le"), "NUL bytes"),
        (
            "m.csv",
            CSV.replace("c1", "caf\u00e9").encode("latin-1"),
            "not UTF-8 text: byte 0xe9 on line 2",
        ),
        ("m.csv", b"image;source;targets\nc.png;a;b\n", "no 'image', 'targets' column"),
        ("m.csv", b"image,source,targets,notes\n", r"unknown columns \['notes'\]"),
        ("m.txt", b"", "must be .jsonl or .csv"),
    ],
)
def test_whole_file_problems(tmp_path, name, data, match):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ValueError, match=match):
        read_manifest(tmp_path / name)


def test_excel_csv_with_a_byte_order_mark_reads(tmp_path):
    (tmp_path / "m.csv").write_bytes(CSV.encode("utf-8-sig"))
    [(line, rec)] = read_manifest(tmp_path / "m.csv")
    assert line == 2 and rec["image"] == "c.png" and rec["id"] == "c1"


def test_unquoted_commas_in_a_csv_row_are_an_error(tmp_path):
    (tmp_path / "m.csv").write_text(CSV + "c2,c.png,a red circle, on a white background,x\n")
    rows = read_manifest(tmp_path / "m.csv")
    assert (
        isinstance(rows[1][1], str)
        and "put cells that contain commas in double quotes" in rows[1][1]
    )


def test_a_csv_nan_cell_is_refused(images, tmp_path):
    (tmp_path / "m.csv").write_text(
        f"id,image,source,targets,cross_replace_steps\nc1,c.png,{SRC},{TGT},nan\n"
    )
    [(line, rec)] = read_manifest(tmp_path / "m.csv")
    with pytest.raises(ValueError, match="`cross_replace_steps` must be a fraction"):
        parse_item(rec, line, images)


# ------------------------------------------------------------------------------------ the command
@pytest.fixture
def manifest(images, tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(_rec(id="c1")) + "\n")
    return path


def _cli(manifest, out, *flags):
    return ["--manifest", str(manifest), "--out", str(out), "--no-progress", *flags]


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--guidance", "nan"], "guidance_scale must be a finite number, got nan"),
        (["--guidance", "inf"], "guidance_scale must be a finite number, got inf"),
        (["--guidance", "x"], "invalid float value"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--inner-steps", "-1"], "--inner-steps >= 0"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--images", "/no/such/folder"], "is not a folder"),
    ],
)
def test_bad_flags_are_refused_up_front(manifest, tmp_path, capsys, flags, match):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        runner.main(_cli(manifest, out, *flags))
    assert exit_info.value.code == 2
    assert match in capsys.readouterr().err
    assert not out.exists()  # nothing was made


def test_a_folder_the_runner_did_not_make_is_left_alone(manifest, tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "tmp").mkdir(parents=True)
    (out / "tmp" / "thesis.tex").write_text("years of work")
    (out / "summary.csv").write_text("my,own\n")
    (out / "errors.jsonl").write_text("{}\n")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit):
        runner.main(_cli(manifest, out))
    assert "was not made by nti_utils.batch (no .nti-batch file)" in capsys.readouterr().err
    with pytest.raises(FileExistsError, match="choose a new or empty folder"):
        runner.run(manifest, out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    "layout, match",
    [("file", "is a file; give a folder"), ("under a file", "cannot be created: .* is a file")],
)
def test_out_must_be_a_folder(manifest, tmp_path, capsys, layout, match):
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" if layout == "file" else tmp_path / "f" / "run"
    with pytest.raises(NotADirectoryError, match=match):
        runner.check_out(out)
    with pytest.raises(SystemExit):
        runner.main(_cli(manifest, out))
    assert "--out" in capsys.readouterr().err
    assert (tmp_path / "f").read_text() == "x"


def test_new_empty_and_marked_folders_are_accepted(tmp_path):
    assert runner.check_out(tmp_path / "new" / "run") == tmp_path / "new" / "run"
    (tmp_path / "empty").mkdir()
    runner.check_out(tmp_path / "empty")
    marked = tmp_path / "marked"
    runner.claim_out(marked)
    (marked / "summary.csv").write_text("the runner's\n")
    runner.check_out(marked)
    assert (marked / runner.MARKER).is_file()


def test_batch_settings_are_checked():
    with pytest.raises(ValueError, match="must be an InversionSettings"):
        BatchSettings(inversion={"guidance_scale": math.nan})
    with pytest.raises(ValueError, match="seed must be an integer"):
        BatchSettings(seed="0")
    with pytest.raises(ValueError, match="model must be 'toy' or a folder"):
        BatchSettings(model=None)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_pipeline().save_pretrained(path)
    return path


def test_a_run_deletes_only_its_own_temporary_files(model, images, tmp_path):
    out = tmp_path / "run"
    runner.claim_out(out)
    (out / "tmp" / "c1.rank0").mkdir(parents=True)  # a killed run's leftover: the runner's
    (out / "tmp" / "notes.txt").write_text("mine")  # not the runner's
    manifest = tmp_path / "m.jsonl"
    bad = [_rec(id="rw", reweight=["purple", 2]), _rec(id="gone", image="nope.png")]
    manifest.write_text("".join(json.dumps(x) + "\n" for x in bad))
    settings = BatchSettings(model=str(model))
    summary = runner.run(manifest, out, images, settings, threads=1, cpu=True, progress=False)
    assert summary["failed"] == 2 and summary["done"] == 0
    assert sorted(p.name for p in (out / "tmp").iterdir()) == ["notes.txt"]
    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert {e["id"]: e["stage"] for e in errors} == {"gone": "validate", "rw": "validate"}
    with pytest.raises(ValueError, match="more than the model's 1000 training timesteps"):
        big = BatchSettings(model=str(model), inversion=InversionSettings(num_steps=5000))
        runner.run(manifest, out, images, big, threads=1, cpu=True, progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="has no entries"):
        runner.run(empty, out, images, settings, threads=1, cpu=True, progress=False)


# ------------------------------------------------------------------------------------ benchmark
def test_bench_inner_sweep_must_be_integers(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--inner-sweep", "a,b"])
    assert "expected comma-separated integers such as 0,1,2,5, got 'a,b'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"config": {"scenes": 3}, "per_sc', "truncated or not valid JSON"),
        ("", "truncated or not valid JSON"),
        ("[]", "not a benchmark's results.json"),
        ('{"config": {}, "context": {}, "per_scene": [1]}', "not a benchmark's results.json"),
    ],
)
def test_bench_resume_from_a_broken_results_file(tmp_path, content, match):
    (tmp_path / "results.json").write_text(content)
    with pytest.raises(ValueError, match=match):
        bench.main(["--quick", "--out", str(tmp_path), "--resume", "--no-progress"])


def test_bench_leaves_other_folders_alone(tmp_path):
    (tmp_path / "summary.csv").write_text("my data\n")
    (tmp_path / "table.txt").write_text("my table\n")
    for flags in ([], ["--overwrite"]):
        with pytest.raises(FileExistsError, match="is not a benchmark output folder"):
            bench.main(["--quick", "--out", str(tmp_path), "--no-progress", *flags])
    assert (tmp_path / "summary.csv").read_text() == "my data\n"
    assert (tmp_path / "table.txt").read_text() == "my table\n"
    (tmp_path / BENCH_MARKER).touch()  # a benchmark's folder (marked when it started)
    bench_cli.check_out(tmp_path)


@pytest.mark.parametrize(
    "layout, match", [("file", "is a file"), ("under a file", "cannot be created")]
)
def test_bench_out_must_be_a_folder(tmp_path, layout, match):
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" if layout == "file" else tmp_path / "f" / "bench"
    with pytest.raises(NotADirectoryError, match=match):
        bench.main(["--quick", "--out", str(out), "--no-progress"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_bench_cuda_without_cuda(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--device", "cuda", "--out", str(tmp_path / "b")])
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(scenes=2.5), "BenchConfig.scenes must be an integer"),
        (dict(batch=True), "BenchConfig.batch must be an integer"),
        (dict(dtype="float64"), "dtype must be one of"),
        (dict(inner_sweep=[0, 1]), "inner_sweep must be a tuple of integers"),
        (dict(guidance=math.nan), "guidance_scale must be a finite number"),
    ],
)
def test_bench_config_types(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bench.BenchConfig(**kwargs)


@pytest.mark.parametrize("name, want", [("IMG 1234.png", "IMG_1234"), ("_DSC0001.png", "DSC0001")])
def test_photo_file_names_give_safe_default_ids(tmp_path, name, want):
    Image.new("RGB", (8, 8)).save(tmp_path / name)
    rec = {"image": name, "source": "a red circle", "targets": ["a red square"]}
    assert parse_item(rec, 1, tmp_path).id == want
