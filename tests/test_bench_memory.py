"""The memory benchmark of a Prompt-to-Prompt edit (nti_utils.bench.memory) at a tiny size: its
table and which layers each variant materializes. No timing or memory thresholds."""

import contextlib
import io
import math

import pytest
import torch

from nti_utils.attention import layer_infos
from nti_utils.bench.memory import (
    VARIANTS,
    MaterializeAll,
    main,
    make_controller,
    sd_config,
    sd_shaped_pipeline,
)

STEPS = 3  # the default self_replace_steps=0.4 then injects at step 0


@pytest.fixture(scope="module")
def measured():
    """The command line's run at a tiny size, all variants in this process: results and table."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        results = main(["--width", "32", "--latent", "16", "--steps", str(STEPS), "--in-process"])
    return results, out.getvalue()


@pytest.fixture(scope="module")
def layers():
    pipe = sd_shaped_pipeline(width=32, latent_size=16)
    return pipe, layer_infos(pipe.unet)


def test_the_table_has_the_three_variants_with_finite_numbers(measured):
    results, table = measured
    assert [r.variant for r in results] == list(VARIANTS)
    for r in results:
        assert math.isfinite(r.peak_mem_mb) and math.isfinite(r.wall_s) and r.wall_s > 0
        assert r.forward_rows == 4 * STEPS  # source + target, [∅; C]
        assert torch.isfinite(r.latents).all()
    rows = [
        line for line in table.splitlines() if any(line.startswith(v) for v in VARIANTS.values())
    ]
    assert len(rows) == 3
    for line in rows:
        numbers = line[42:].split()
        assert "nan" not in line.lower() and "inf" not in line.lower()
        assert all(math.isfinite(float(x)) for x in numbers[:5])
    assert "width 32" in table and "goal: default P2P edit peak <= 1.3 x plain" in table


def test_materializing_variant_asks_every_layer_the_default_only_cross(measured, layers):
    results, _ = measured
    pipe, infos = layers
    by = {r.variant: r for r in results}
    every = sorted(infos)
    cross = sorted(n for n, i in infos.items() if i.is_cross)
    assert 0 < len(cross) < len(every)
    everything, default, plain = by["materialize_all"], by["p2p"], by["plain"]
    assert everything.layers_called == everything.layers_materialized == every
    assert everything.materialized_calls == everything.layer_calls == STEPS * len(every)
    assert default.layers_called == every and default.layers_materialized == cross
    assert default.materialized_calls == STEPS * len(cross)
    assert plain.layer_calls == plain.materialized_calls == 0
    # the same edit either way: the fused self-attention injection equals the materialized one, to
    # float32 rounding (explicit softmax vs fused attention; latents up to ~13 with these untamed
    # random weights at w = 7.5: the source row, which no controller changes, differs by ~2e-5 too)
    torch.testing.assert_close(default.latents, everything.latents, atol=1e-4, rtol=1e-4)
    assert (default.latents[1] - plain.latents[1]).abs().max() > 1e-4  # the edit did something


def test_controllers_wants(layers):
    pipe, infos = layers
    for variant, cls_check in (("p2p", False), ("materialize_all", True)):
        ctrl = make_controller(variant, pipe, STEPS)
        assert isinstance(ctrl, MaterializeAll) is cls_check
        ctrl.attach(pipe.unet)
        ctrl.begin(2, (16, 16))
        for step in range(STEPS):
            ctrl.cur_step = step
            for info in infos.values():
                assert ctrl.wants(info) is (True if cls_check else info.is_cross)
    assert make_controller("plain", pipe, STEPS) is None


def test_sd_config_is_sd15_shaped():
    cfg = sd_config()
    assert cfg.unet_channels == (320, 640, 1280, 1280)
    assert cfg.text_hidden == 768 and cfg.max_tokens == 77 and cfg.latent_size == 64
    with pytest.raises(ValueError, match="multiple of 32"):
        sd_config(width=100)
