"""Figures for the notebooks. Every function returns a matplotlib `Figure` (never displays it)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
from matplotlib.transforms import Bbox
from PIL import Image
from transformers import PreTrainedTokenizerBase

from nti_utils.align import prompt_tokens
from nti_utils.metrics import psnr, to_float_array


def image_grid(
    images: Sequence[Image.Image | np.ndarray],
    titles: Sequence[str] | None = None,
    ncols: int | None = None,
    size: float = 2.0,
    suptitle: str | None = None,
) -> Figure:
    """Images side by side (wrapping after `ncols`), with optional titles."""
    n = len(images)
    ncols = ncols or n
    nrows = (n + ncols - 1) // ncols
    fig = Figure(figsize=(size * ncols, size * nrows + (0.4 if suptitle else 0)))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(np.asarray(images[k]), interpolation="nearest")
            if titles is not None:
                ax.set_title(titles[k], fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def reconstruction_grid(
    reference: Image.Image | np.ndarray,
    outputs: dict[str, Image.Image | np.ndarray],
    size: float = 2.0,
    vmax: float | None = None,
    reference_title: str = "input",
    region: np.ndarray | dict[str, np.ndarray] | None = None,
) -> Figure:
    """The reference image and each output with its PSNR (top row), and under each output the
    difference map |reference - output| (mean over RGB, in 0-255 gray levels; bottom row), so that a
    PSNR can be seen: 20 dB is a mean error of about 26 levels, 35 dB about 4.

    Args:
        reference: the image the outputs should match, (H, W, 3).
        outputs (`dict[str, image]`): title -> image of the same size.
        vmax (`float`, *optional*): top of the difference maps' color scale, the same for every
            map so that they compare; defaults to the largest difference shown.
        region (`np.ndarray` or `dict[str, np.ndarray]`, *optional*): bool (H, W), e.g. an edit's
            region (:func:`~nti_utils.shapes.world.edit_region`), or one per output (title ->
            mask, or None for the whole image): its outline is drawn on the difference map and
            the PSNR is computed *outside* it (what an edit should have kept).

    Returns:
        `Figure` with 2 rows and 1 + len(outputs) columns (the reference's second cell is empty).
    """
    ref = to_float_array(reference)
    regions = dict(region) if isinstance(region, dict) else dict.fromkeys(outputs, region)
    if region is not None and set(regions) != set(outputs):
        raise ValueError(f"region names {sorted(regions)} are not the outputs' {sorted(outputs)}")
    for name, mask in regions.items():
        if mask is not None:
            regions[name] = mask = np.asarray(mask, dtype=bool)
            if mask.shape != ref.shape[:2]:
                raise ValueError(f"region is {mask.shape}, the images are {ref.shape[:2]}")
    diffs = {k: np.abs(ref - to_float_array(v)).mean(-1) * 255 for k, v in outputs.items()}
    top = vmax if vmax is not None else max(float(d.max()) for d in diffs.values()) or 1.0
    n = 1 + len(outputs)
    fig = Figure(figsize=(size * n * 1.1, size * 2.1))
    axes = fig.subplots(2, n, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].imshow(np.asarray(reference), interpolation="nearest")
    axes[0, 0].set_title(reference_title, fontsize=8)
    for j, (name, image) in enumerate(outputs.items(), start=1):
        axes[0, j].imshow(np.asarray(image), interpolation="nearest")
        mask = regions[name]
        if mask is None:
            axes[0, j].set_title(f"{name}\n{psnr(reference, image):.1f} dB", fontsize=8)
        else:
            outside = psnr(reference, image, mask=~mask)
            axes[0, j].set_title(f"{name}\n{outside:.1f} dB outside the region", fontsize=8)
        im = axes[1, j].imshow(diffs[name], cmap="magma", vmin=0, vmax=top, interpolation="nearest")
        if mask is not None and mask.any():
            axes[1, j].contour(mask, levels=[0.5], colors="cyan", linewidths=0.8)
        axes[1, j].set_title(f"|{reference_title} - output|", fontsize=8)
        fig.colorbar(im, ax=axes[1, j], fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def _reference_lines(ax, hlines: dict[str, float] | None) -> None:
    """Dashed gray horizontal lines, each labelled at the left edge (a bound, a baseline)."""
    for name, y in (hlines or {}).items():
        ax.axhline(y, linestyle="--", color="gray", linewidth=1)
        ax.annotate(
            name,
            (0.01, y),
            xycoords=("axes fraction", "data"),
            fontsize=8,
            va="bottom",
            color="gray",
        )


def curves(
    series: dict[str, Sequence[float]],
    xlabel: str,
    ylabel: str,
    x: Sequence[float] | None = None,
    title: str | None = None,
    hlines: dict[str, float] | None = None,
    logy: bool = False,
    size: tuple[float, float] = (5.5, 3.2),
) -> Figure:
    """Line plot of named series (same x), with optional labelled horizontal reference lines."""
    fig = Figure(figsize=size)
    ax = fig.subplots()
    for name, ys in series.items():
        xs = x if x is not None else range(len(ys))
        ax.plot(list(xs), list(ys), marker="o", markersize=3, label=name)
    _reference_lines(ax, hlines)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def labelled_scatter(
    points: dict[str, tuple[float, float]],
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    logx: bool = False,
    hlines: dict[str, float] | None = None,
    size: tuple[float, float] = (6.0, 3.6),
    legend: bool = False,
) -> Figure:
    """One labelled point per name, e.g. a method's cost (x) against its quality (y): a Pareto view.

    Args:
        points (`dict[str, tuple[float, float]]`): name -> (x, y).
        logx (`bool`, defaults to `False`): logarithmic x axis (costs that differ by factors).
        hlines (`dict[str, float]`, *optional*): labelled horizontal reference lines (a bound).
        legend (`bool`, defaults to `False`): name the points in a legend beside the axes instead
            of next to each point (for many points close together); the colors follow the order
            of `points`, so two figures of the same names match.
    """
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)  # a renderer, to measure the labels
    ax = fig.subplots()
    for name, (x, y) in points.items():
        ax.scatter([x], [y], s=30, label=name)
    if legend:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    # else each label starts (left half) or ends (right half) at its point, so that it stays inside
    # the axes and next to its own point; from left to right, each goes above or below its point,
    # farther out where it would overlap a marker or a label placed before it
    by_x = [] if legend else sorted(points, key=lambda name: points[name][0])
    labels = []
    for k, name in enumerate(by_x):
        dx, ha = (5, "left") if 2 * k < len(by_x) else (-5, "right")
        labels.append(
            ax.annotate(
                name, points[name], xytext=(dx, 6), textcoords="offset points", fontsize=8, ha=ha
            )
        )
    _reference_lines(ax, hlines)
    if logx:  # ticks at 1, 2 and 5 times the powers of ten, written out
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.12, y=0.25)  # room for the labels inside the axes
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    markers = [Bbox.from_bounds(*(ax.transData.transform(xy) - 4), 8, 8) for xy in points.values()]
    _spread_labels(labels, fig.canvas.get_renderer(), markers)
    return fig


def _spread_labels(labels: list, renderer, markers: list) -> None:
    """Give each label (in order) the first vertical offset, in points, at which its box overlaps
    none of the markers and none of the labels before it: above its point, below, then farther out
    in turn."""
    placed = list(markers)
    for label in labels:
        dx = label.xyann[0]
        for dy in (6, -12, 16, -22, 26, -32, 36, -42):
            label.xyann = (dx, dy)
            box = label.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed):
                break
        placed.append(box)


def word_attention_maps(
    maps: torch.Tensor,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    image: Image.Image | None = None,
    size: float = 1.6,
) -> Figure:
    """Cross-attention of each token of `prompt` (start and end tokens excluded), one panel each.

    Args:
        maps (`torch.Tensor`): (h, w, K) averaged maps of this prompt, e.g.
            ``store.maps(resolution)[i]``.
        tokenizer: to label panels with the tokens.
        prompt (`str`): the prompt the maps belong to.
        image (`PIL.Image.Image`, *optional*): shown first and under each map.
    """
    ids = prompt_tokens(tokenizer, prompt)[1:-1]
    labels = [tokenizer.decode([i]).strip() for i in ids]
    n = len(ids) + (image is not None)
    fig = Figure(figsize=(size * n, size + 0.3))
    axes = fig.subplots(1, n, squeeze=False)[0]
    if image is not None:
        axes[0].imshow(image)
        axes[0].set_title("image", fontsize=8)
        axes = axes[1:]
    side = image.size[0] if image is not None else maps.shape[0]
    for ax, pos, label in zip(axes, range(1, len(ids) + 1), labels):
        m = maps[..., pos][None, None].float()
        m = F.interpolate(m, size=(side, side), mode="bilinear", align_corners=False)[0, 0]
        if image is not None:
            ax.imshow(np.asarray(image.convert("L")), cmap="gray", alpha=1.0)
            ax.imshow(m.numpy(), cmap="jet", alpha=0.55)
        else:
            ax.imshow(m.numpy(), cmap="jet")
        ax.set_title(label, fontsize=8)
    for ax in fig.axes:
        ax.axis("off")
    fig.tight_layout()
    return fig


def heatmap_grid(
    maps: Sequence[np.ndarray], titles: Sequence[str], size: float = 1.8, cmap: str = "magma"
) -> Figure:
    """Small heatmaps side by side (e.g. LocalBlend masks or error maps), each with a colorbar."""
    fig = Figure(figsize=(size * len(maps) * 1.2, size))
    axes = fig.subplots(1, len(maps), squeeze=False)[0]
    for ax, m, t in zip(axes, maps, titles):
        im = ax.imshow(np.asarray(m), cmap=cmap, interpolation="nearest")
        ax.set_title(t, fontsize=8)
        ax.axis("off")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig
