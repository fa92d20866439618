"""The benchmark entry point (``python -m nti_utils.bench --quick``) on the tiny pipeline."""

import csv
import json
import math

import numpy as np
import pytest
import torch

from nti_utils import bench
from nti_utils.bench import report
from nti_utils.bench.measure import measure
from nti_utils.bench.methods import AFTER_NTI, PLAIN_TARGET
from nti_utils.bench.report import COLUMNS
from nti_utils.models import frozen
from nti_utils.testing import tiny_pipeline

METHODS = [
    bench.DDIM_W1,
    bench.DDIM_W,
    "negative-prompt inversion",
    bench.REFERENCE,
    bench.LIBRARY,
    bench.OURS,
    bench.OURS_ONE,
    *AFTER_NTI,
    PLAIN_TARGET,
]
NTI = [bench.REFERENCE, bench.LIBRARY, bench.OURS]
MEASURES = [c for c in COLUMNS if c not in ("method", "group", "n", "sweep_inner_steps")]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    model = tmp_path_factory.mktemp("tiny-model")
    tiny_pipeline().save_pretrained(model)
    out = tmp_path_factory.mktemp("bench")
    results = bench.main(["--quick", "--model", str(model), "--out", str(out), "--no-progress"])
    return results, out


def test_outputs_are_written(quick):
    results, out = quick
    for name in ("summary.csv", "per_scene.csv", "results.json", "bench.png", "table.txt"):
        assert (out / name).stat().st_size > 0, name
    with (out / "summary.csv").open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        names = [row["method"] for row in reader]
    assert names[: len(METHODS)] == METHODS
    # the library and ours again, on the ablation scenes
    assert names[len(METHODS) : len(METHODS) + 2] == [bench.ABLATION_BASELINE, bench.OURS_BASELINE]
    assert any(n.startswith("ablation: ") for n in names)
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["scenes"] == 3 and saved["context"]["resolution"] == 32
    assert set(saved["targets"]) == {"ours, one image", "ours, batched", "Direct Inversion"}
    for t in saved["targets"].values():
        assert {"psnr", "edit_success", "wall_ratio", "wall_ratio_max", "met"} <= set(t)


def test_table_has_every_method_and_column(quick, capsys):
    results, out = quick
    table = (out / "table.txt").read_text()
    for name in METHODS:
        assert name in table
    for header in ("PSNR", "SSIM", "z MSE", "gap", "wall s", "fwd", "bwd", "mem MB", "edit ok"):
        assert header in table


def test_numbers_are_finite_and_ordered(quick):
    results, _ = quick
    by = {r["method"]: r for r in results["summary"]}
    for name in METHODS:
        row = by[name]
        assert row["n"] == 3
        for key in MEASURES:
            assert math.isfinite(row[key]), (name, key, row[key])
        scenes = [r for r in results["per_scene"] if r["method"] == name]
        assert row["edit_success"] == pytest.approx(np.mean([r["edit_success"] for r in scenes]))
    # null-text inversion reconstructs better than DDIM inversion at w = 7.5 (in latent space: the
    # tiny pipeline's random VAE caps image PSNR near 10 dB for every method)
    for name in NTI:
        assert by[name]["latent_mse"] < by[bench.DDIM_W]["latent_mse"], name
        assert by[name]["psnr"] >= by[bench.DDIM_W]["psnr"] - 0.05, name
    # ours (the reference's update rule, a shorter schedule): close reconstruction, fewer UNet rows
    assert by[bench.OURS]["psnr"] == pytest.approx(by[bench.REFERENCE]["psnr"], abs=0.05)
    assert by[bench.OURS]["unet_forward"] < by[bench.REFERENCE]["unet_forward"]
    assert by[bench.OURS]["unet_backward"] < by[bench.REFERENCE]["unet_backward"]
    # one image per call makes the batched path's updates: the same rows and reconstruction
    assert by[bench.OURS_ONE]["unet_backward"] == by[bench.OURS]["unet_backward"]
    assert by[bench.OURS_ONE]["psnr"] == pytest.approx(by[bench.OURS]["psnr"], abs=1e-3)
    # with the paper's schedule, ours is the reference's arithmetic (on the ablation scene, alone in
    # its batch): the same updates and the same reconstruction
    paper_rows = [
        r for r in results["per_scene"] if r["method"] == "ablation: ours, paper schedule"
    ]
    assert len(paper_rows) == 1
    same = {r["method"]: r for r in results["per_scene"] if r["seed"] == paper_rows[0]["seed"]}
    paper, ref = paper_rows[0], same[bench.REFERENCE]
    assert paper["unet_backward"] == ref["unet_backward"] > same[bench.OURS]["unet_backward"]
    assert paper["latent_mse"] == pytest.approx(ref["latent_mse"], rel=1e-2)
    assert by[bench.OURS_BASELINE]["n"] == 1
    steps = results["config"]["steps"]
    assert by[bench.DDIM_W]["unet_forward"] == steps and by[bench.DDIM_W]["unet_backward"] == 0
    assert by[bench.REFERENCE]["unet_backward"] > 0


def test_per_scene_rows(quick):
    results, _ = quick
    rows = results["per_scene"]
    assert len({r["seed"] for r in rows}) == 3
    assert {r["edit_kind"] for r in rows} == {"shape", "color", "background"}
    ablations = [r for r in rows if r["group"] == "ablation"]
    assert ablations and {r["seed"] for r in ablations} == {rows[0]["seed"]}  # first scene only
    baseline = next(r for r in results["summary"] if r["method"] == bench.ABLATION_BASELINE)
    first_library = next(r for r in rows if r["method"] == bench.LIBRARY)
    assert baseline["n"] == 1 and baseline["psnr"] == first_library["psnr"]
    assert baseline["sweep_inner_steps"] == results["config"]["inner_steps"]
    by = {r["method"]: r for r in results["summary"]}
    for name in ("ablation: random pivots", "ablation: global null (Alg. 2)"):
        assert by[name]["n"] == 1, name  # quick: one ablation scene, one global-null scene
    glob = by["ablation: global null (Alg. 2)"]
    passes, steps = results["config"]["global_passes"], results["config"]["steps"]
    # per step and pass: ε(C) and ε(∅) forward, one backward; plus the pivots' DDIM inversion
    assert glob["unet_backward"] == passes * steps
    assert glob["unet_forward"] == 2 * passes * steps + steps
    # the plain-∅ row: the library's inversion again (the same reconstruction), edited otherwise
    library = {r["seed"]: r for r in rows if r["method"] == bench.LIBRARY}
    plain = {r["seed"]: r for r in rows if r["method"] == PLAIN_TARGET}
    assert plain.keys() == library.keys()
    for seed, r in plain.items():
        assert r["psnr"] == pytest.approx(library[seed]["psnr"], abs=1e-3)
        assert r["unet_backward"] == library[seed]["unet_backward"]
    assert any(r["edit_psnr_target"] != library[s]["edit_psnr_target"] for s, r in plain.items())


def test_measure_counts_unet_rows(tiny_pipe):
    unet = tiny_pipe.unet
    z, emb = torch.randn(2, 4, 16, 16), torch.randn(2, 16, 32, requires_grad=True)
    with measure(unet) as m, frozen(unet):  # frozen: the shared pipeline gets no weight grads
        with torch.no_grad():
            unet(z, 10, encoder_hidden_states=emb)
        unet(z[:1], 10, encoder_hidden_states=emb[:1]).sample.sum().backward()
    assert (m.forward_rows, m.backward_rows) == (3, 1)
    assert m.wall_s > 0 and m.cpu_s > 0 and m.memory_kind.startswith("CPU")
    with measure(unet) as m2, torch.no_grad():
        unet(z, 10, encoder_hidden_states=emb)
    assert m2.forward_rows == 2 and m2.backward_rows == 0
    with torch.no_grad():
        unet(z[:1], 10, encoder_hidden_states=emb[:1])
    assert m2.forward_rows == 2  # hooks removed after the block
    assert all(p.grad is None for p in unet.parameters())


def test_config_is_validated():
    with pytest.raises(ValueError, match="batch"):
        bench.BenchConfig(batch=0)


def test_results_are_not_overwritten_and_a_run_resumes(quick, tmp_path, monkeypatch):
    _, out = quick
    model = tmp_path / "model"
    tiny_pipeline().save_pretrained(model)
    with pytest.raises(FileExistsError, match="--resume"):
        bench.main(["--quick", "--model", str(model), "--out", str(out), "--no-progress"])
    # an interrupted run of one batch of two scenes, saved up to the first two methods on its
    # first scene and (a row that cannot be saved alone, to check what resuming does with it)
    # ours' batch on that scene only
    flags = ["--quick", "--model", str(model), "--scenes", "2", "--batch", "2", "--no-ablations"]
    flags += ["--steps", "3"]  # fewer than --quick's, to keep the test short
    flags += ["--no-progress", "--out", str(tmp_path / "run")]
    full = bench.main(flags)
    path = tmp_path / "run" / "results.json"
    saved = json.loads(path.read_text())
    first, second = list(dict.fromkeys(r["seed"] for r in saved["per_scene"]))
    kept_pairs = {(m, first) for m in [*METHODS[:2], bench.OURS]}
    saved["per_scene"] = [r for r in saved["per_scene"] if (r["method"], r["seed"]) in kept_pairs]
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="other settings"):
        bench.main([*flags, "--resume", "--steps", "4"])
    changed = dict(saved, context=dict(saved["context"], edit_recipes={}))
    path.write_text(json.dumps(changed))
    with pytest.raises(ValueError, match="other edit settings"):
        bench.main([*flags, "--resume"])
    before = {k: v for k, v in saved["context"].items() if k != "ours_step_scale"}
    path.write_text(json.dumps(dict(saved, context=before)))  # a run from before the schedule
    with pytest.raises(ValueError, match="optimizer schedule"):
        bench.main([*flags, "--resume"])
    # a run saved before a recipe field existed resumes (it was measured at the field's default)
    recipes = saved["context"]["edit_recipes"]
    assert all(r["target_null"] == "inverted" for r in recipes.values())
    older = {k: {f: v for f, v in r.items() if f != "target_null"} for k, r in recipes.items()}
    path.write_text(json.dumps(dict(saved, context=dict(saved["context"], edit_recipes=older))))
    saves = []  # what each save of the resumed run held: the kept rows from the first save on

    def save(partial, out):
        saves.append({(r["method"], r["seed"]) for r in partial["per_scene"]})
        report.save_results(partial, out)

    monkeypatch.setattr(bench.cli, "save_results", save)
    resumed = bench.main([*flags, "--resume"])
    assert saves and all(kept_pairs <= pairs for pairs in saves)
    pairs = [(r["method"], r["seed"]) for r in resumed["per_scene"]]
    assert sorted(pairs) == sorted((r["method"], r["seed"]) for r in full["per_scene"])
    wall = {(r["method"], r["seed"]): r["wall_s"] for r in resumed["per_scene"]}
    for r in saved["per_scene"]:  # the saved rows are kept, not run again ...
        if r["method"] != bench.OURS:
            assert wall[r["method"], r["seed"]] == r["wall_s"], r["method"]
    # ... except ours on a batch it has not finished: measured per batch, it runs that batch whole
    old_ours = next(r["wall_s"] for r in saved["per_scene"] if r["method"] == bench.OURS)
    assert wall[bench.OURS, first] == wall[bench.OURS, second] != old_ours
    assert resumed["context"]["resumed_from"] == [report.run_label(saved["context"])]
    assert report.run_label(saved["context"]).startswith(saved["context"]["date"])
    assert "Resumed run" in (tmp_path / "run" / "table.txt").read_text()


def _row(name, psnr=30.0, wall=10.0, rec=1.0, edit=0.6, gap=0.05):
    return {
        "method": name,
        "psnr": psnr,
        "wall_s": wall,
        "rec_wall_s": rec,
        "cpu_s": 2 * wall,
        "edit_success": edit,
        "gap_to_vae": gap,
    }


def test_targets_compare_the_rows_as_the_issue_states_them():
    from nti_utils.bench.methods import DIRECT
    from nti_utils.bench.run import targets

    ref = _row(bench.REFERENCE, wall=30.0)
    good = [
        ref,
        _row(bench.OURS_ONE, psnr=29.95, wall=9.9, edit=0.56),  # 0.05 dB, 0.04 success short
        _row(bench.OURS, psnr=30.1, wall=3.7),  # 3.7 / 30 < 1/8
        _row(bench.DDIM_W, wall=1.0, rec=2.0),
        _row(DIRECT, wall=4.0, rec=2.5, edit=0.6, gap=0.08),  # 6.5 / 3.0 <= 2.2
    ]
    t = targets(good)
    assert all(v["met"] for v in t.values()), t
    assert t["ours, one image"]["wall_ratio"] == pytest.approx(0.33)
    assert t["Direct Inversion"]["wall_ratio"] == pytest.approx(6.5 / 3.0)
    slow_one = _row(bench.OURS_ONE, wall=10.5)  # just over a third
    lost_edits = _row(bench.OURS, wall=3.0, edit=0.5)  # 0.1 below the reference's success
    blurry = _row(bench.OURS, wall=3.0, psnr=29.8)  # 0.2 dB short
    slow_direct = _row(DIRECT, wall=5.0, rec=2.0)  # 7 / 3 > 2.2
    far_direct = _row(DIRECT, wall=1.0, gap=0.3)
    no_edits = _row(DIRECT, wall=1.0, edit=float("nan"))
    for bad, label in (
        (slow_one, "ours, one image"),
        (lost_edits, "ours, batched"),
        (blurry, "ours, batched"),
        (slow_direct, "Direct Inversion"),
        (far_direct, "Direct Inversion"),
        (no_edits, "Direct Inversion"),
    ):
        rows = [r for r in good if r["method"] != bad["method"]] + [bad]
        assert not targets(rows)[label]["met"], (label, bad)
    assert targets([ref]) == {}  # rows missing: nothing to judge


def test_edits_by_kind_splits_success_and_outside_psnr_per_kind():
    def row(method, kind, ok, outside):
        return {
            "method": method,
            "edit_kind": kind,
            "edit_success": ok,
            "edit_psnr_background": outside,
        }

    per_scene = [
        row("a", "shape", 1.0, 30.0),
        row("a", "shape", 0.0, 20.0),
        row("a", "color", 1.0, 40.0),
        row("b", "shape", 0.0, 24.0),
        {"method": "sweep", "edit_kind": "shape"},  # no edits (the inner-step sweep)
    ]
    rows = report.edits_by_kind(per_scene, ["b", "a", "sweep"])
    assert [r["method"] for r in rows] == ["b", "a"]
    shape, color = rows[1]["shape"], rows[1]["color"]
    assert (shape["n"], shape["success"], shape["psnr_outside_mean"]) == (2, 0.5, 25.0)
    assert shape["psnr_outside_ge_25"] == 0.5 and shape["success_and_ge_25"] == 0.5
    assert (color["n"], color["success"], color["psnr_outside_mean"]) == (1, 1.0, 40.0)
    assert "color" not in rows[0] and rows[0]["shape"]["psnr_outside_ge_25"] == 0.0


def test_table_lists_edits_by_kind(quick):
    _, out = quick
    table = (out / "table.txt").read_text()
    assert "edits by kind" in table
    for kind in ("shape", "color", "background"):
        assert f"{kind} (n, ok" in table


def test_rows_text_prints_the_named_rows_from_a_saved_run(quick):
    _, out = quick
    results = report.load_results(out / "results.json")
    text = report.rows_text(results, [bench.OURS, bench.REFERENCE])
    lines = text.splitlines()
    assert lines[0].startswith("method") and "PSNR" in lines[0]
    assert lines[2].startswith(bench.OURS) and lines[3].startswith(bench.REFERENCE)
    assert len(lines) == 4
    # without the machine's timings (as the notebooks print them): the other columns unchanged
    plain = report.rows_text(results, [bench.OURS, bench.REFERENCE], timings=False).splitlines()
    assert "wall s" not in plain[0] and "mem MB" not in plain[0] and "bwd" in plain[0]
    assert "wall s" in lines[0]
    for full, short in zip(lines[2:], plain[2:]):
        assert (
            set(short.split()) <= set(full.split()) and len(short.split()) == len(full.split()) - 4
        )
    with pytest.raises(KeyError, match="no benchmark rows"):
        report.rows_text(results, ["no such method"])
    # a saved run's missing numbers (null in JSON: a method that does not edit) read back as NaN,
    # so the figure can be drawn again from the file
    assert any(math.isnan(r["edit_success"]) for r in results["summary"])
    assert len(report.plot(results).axes) == 3


def test_kinds_text_prints_the_named_methods_edits_by_kind(quick):
    _, out = quick
    results = report.load_results(out / "results.json")
    lines = report.kinds_text(results, [bench.REFERENCE, bench.OURS]).splitlines()
    assert lines[0].startswith("edits by kind") and len(lines) == 4
    assert lines[2].startswith(bench.REFERENCE) and lines[3].startswith(bench.OURS)
    # each kind's cells: scenes, success rate, share >= 25 dB outside, mean outside, from per_scene
    mine = [r for r in results["per_scene"] if r["method"] == bench.OURS]
    kinds = list(dict.fromkeys(r["edit_kind"] for r in mine))
    cells = lines[3][len(bench.OURS) :].split()
    for k, kind in enumerate(kinds):
        of_kind = [r for r in mine if r["edit_kind"] == kind]
        assert int(cells[4 * k]) == len(of_kind)
        assert float(cells[4 * k + 1]) == pytest.approx(
            np.mean([r["edit_success"] for r in of_kind]), abs=0.005
        )
    assert report.kinds_text(results) in report.format_table(results)
    with pytest.raises(KeyError, match="no edit rows"):
        report.kinds_text(results, ["no such method"])


def test_load_results_says_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m nti_utils.bench"):
        report.load_results(tmp_path / "results.json")
    (tmp_path / "results.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a benchmark"):
        report.load_results(tmp_path / "results.json")
