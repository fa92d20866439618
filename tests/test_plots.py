"""Figures: what the reconstruction grid shows is the difference it claims to show."""

import numpy as np
import pytest

from nti_utils.metrics import psnr
from nti_utils.plots import labelled_scatter, reconstruction_grid


def test_reconstruction_grid_shows_each_psnr_and_the_absolute_difference_on_one_scale():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    close = np.clip(ref.astype(int) + 4, 0, 255).astype(np.uint8)
    far = np.clip(ref.astype(int) - 40, 0, 255).astype(np.uint8)
    fig = reconstruction_grid(ref, {"close": close, "far": far})
    axes = fig.axes
    titles = [ax.get_title() for ax in axes[:6]]
    assert titles[1] == f"close\n{psnr(ref, close):.1f} dB"
    assert titles[2] == f"far\n{psnr(ref, far):.1f} dB"
    maps = [ax.images[0] for ax in axes[4:6] if ax.images]  # bottom row, under the outputs
    want = np.abs(ref.astype(float) - far.astype(float)).mean(-1)
    np.testing.assert_allclose(maps[1].get_array(), want, atol=1e-9)
    for m in maps:  # one color scale for every map
        assert m.get_clim() == (0, pytest.approx(want.max()))


def test_reconstruction_grid_with_a_region_quotes_the_psnr_outside_it_and_outlines_it():
    ref = np.zeros((16, 16, 3), dtype=np.uint8)
    edited = ref.copy()
    edited[4:8, 4:8] = 255  # the edit, inside the region
    edited[12, 12] = 40  # damage outside it
    region = np.zeros((16, 16), dtype=bool)
    region[3:9, 3:9] = True
    fig = reconstruction_grid(ref, {"edit": edited}, region=region)
    want = psnr(ref, edited, mask=~region)
    assert want < 60 and want != psnr(ref, edited)
    assert fig.axes[1].get_title() == f"edit\n{want:.1f} dB outside the region"
    assert fig.axes[3].collections, "the region's outline is drawn on the difference map"
    with pytest.raises(ValueError, match="region"):
        reconstruction_grid(ref, {"edit": edited}, region=region[:8])
    # one region per output: each title quotes its own
    other = np.zeros_like(region)
    fig = reconstruction_grid(ref, {"a": edited, "b": edited}, region={"a": region, "b": other})
    assert fig.axes[1].get_title() == f"a\n{want:.1f} dB outside the region"
    assert (
        fig.axes[2].get_title() == f"b\n{psnr(ref, edited, mask=~other):.1f} dB outside the region"
    )
    with pytest.raises(ValueError, match="region names"):
        reconstruction_grid(ref, {"a": edited, "b": edited}, region={"a": region})


def test_reconstruction_grid_rejects_an_output_of_another_size():
    ref = np.zeros((16, 16, 3), dtype=np.uint8)
    with pytest.raises(ValueError):
        reconstruction_grid(ref, {"wrong": np.zeros((8, 8, 3), dtype=np.uint8)})


def test_labelled_scatter_puts_each_name_at_its_point():
    fig = labelled_scatter({"a": (10, 30.0), "b": (100, 20.0)}, "UNet rows", "PSNR", logx=True)
    ax = fig.axes[0]
    labels = {t.get_text(): t.xy for t in ax.texts}
    assert labels == {"a": (10, 30.0), "b": (100, 20.0)}
    assert ax.get_xscale() == "log"


def test_labelled_scatter_labels_do_not_overlap_and_a_legend_names_crowded_points():
    crowded = {f"method number {k}": (100 + 20 * k, 35.0 - 0.01 * k) for k in range(6)}
    fig = labelled_scatter(crowded, "UNet rows", "PSNR", logx=True, hlines={"bound": 35.0})
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in fig.axes[0].texts if t.get_text() in crowded]
    assert len(boxes) == len(crowded)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    fig = labelled_scatter(crowded, "UNet rows", "PSNR", legend=True)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(crowded)
    assert not [t for t in ax.texts if t.get_text() in crowded]
