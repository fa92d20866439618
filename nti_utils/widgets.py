"""Ablation panel for notebook 6: sliders for the settings of null-text inversion and
Prompt-to-Prompt, a run button, and images and metrics that update in place.

The panel is plain ipywidgets; its logic (what a click computes) lives in :meth:`AblationPanel.run`
so tests can set values and click programmatically::

    panel = AblationPanel(pipe, cases)
    panel.controls["guidance"].value = 5.0
    panel.run_button.click()
    panel.last_metrics["psnr_reconstruction"]
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence

import ipywidgets as W
from diffusers import StableDiffusionPipeline
from PIL import Image

from nti_utils.inversion import null_text_inversion
from nti_utils.metrics import psnr
from nti_utils.result import InversionResult, InversionSettings
from nti_utils.shapes.edits import RECIPES, EditCase, EditRecipe, edit_case

RECIPE_CONTROLS = {
    "cross_replace": "cross_replace_steps",
    "self_replace": "self_replace_steps",
    "blend": "blend",
    "blend_threshold": "blend_threshold",
    "blend_finest": "blend_finest",
    "self_replace_finest": "self_replace_finest",
}
"""Panel control -> the :class:`~nti_utils.shapes.edits.EditRecipe` field it sets."""


def _png(image: Image.Image, scale: int = 3) -> bytes:
    big = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    return buf.getvalue()


class AblationPanel:
    """Interactive ablation of inversion and editing settings on shapes-world edit cases.

    The edit controls start at the chosen case kind's :data:`~nti_utils.shapes.edits.RECIPES`
    entry (what the benchmark runs), and choosing another case resets them to its kind's recipe
    (and the target-word weight to 1); the inversion controls start at
    :class:`~nti_utils.result.InversionSettings`' defaults.

    Args:
        pipe (`StableDiffusionPipeline`): the model.
        cases (`Sequence[EditCase]`): edits to choose from (see
            :func:`~nti_utils.shapes.edits.make_edit`).
        num_steps (`int`, defaults to 50): DDIM steps (fixed for the panel's life).
        progress (`bool`, defaults to `False`): show tqdm bars while running.

    Attributes:
        controls (`dict[str, ipywidgets.Widget]`): by name: ``case``, ``guidance``, ``inner_steps``,
            ``epsilon``, the recipe's (:data:`RECIPE_CONTROLS`: ``cross_replace``,
            ``self_replace``, ``blend``, ``blend_threshold``, ``blend_finest``,
            ``self_replace_finest``), and ``reweight``.
        run_button (`ipywidgets.Button`), images (`list[ipywidgets.Image]`),
        metrics (`ipywidgets.HTML`), widget (`ipywidgets.VBox`): the whole panel.
        last_metrics (`dict[str, float]`): numbers of the latest run.
        runs (`int`): completed runs; inversions are cached by (case, settings).
    """

    def __init__(
        self,
        pipe: StableDiffusionPipeline,
        cases: Sequence[EditCase],
        num_steps: int = 50,
        progress: bool = False,
    ) -> None:
        if not cases:
            raise ValueError("give at least one edit case")
        self.pipe, self.cases = pipe, list(cases)
        self.num_steps, self.progress = num_steps, progress
        self._inversions: dict[tuple, InversionResult] = {}
        self.last_metrics: dict[str, float] = {}
        self.runs = 0
        style = {"description_width": "150px"}
        layout = W.Layout(width="420px")

        def slider(cls, desc, **kw):
            return cls(description=desc, style=style, layout=layout, continuous_update=False, **kw)

        def checkbox(desc):
            return W.Checkbox(value=False, description=desc, style=style)

        options = [
            (f"{c.kind}: {c.source_word} -> {c.target_word} ({i})", i) for i, c in enumerate(cases)
        ]
        inv = InversionSettings()
        self.controls: dict[str, W.Widget] = {
            "case": W.Dropdown(
                options=options, value=0, description="edit", style=style, layout=layout
            ),
            "guidance": slider(
                W.FloatSlider, "guidance w", value=inv.guidance_scale, min=1.0, max=12.0, step=0.5
            ),
            "inner_steps": slider(
                W.IntSlider, "inner steps N", value=inv.inner_steps, min=0, max=20
            ),
            "epsilon": slider(
                W.FloatLogSlider, "early-stop epsilon", value=inv.epsilon, base=10, min=-7, max=-2
            ),
            "cross_replace": slider(W.FloatSlider, "cross-attn replace", min=0, max=1, step=0.05),
            "self_replace": slider(W.FloatSlider, "self-attn replace", min=0, max=1, step=0.05),
            "self_replace_finest": checkbox("self-attn to finest"),
            "blend": checkbox("LocalBlend"),
            "blend_threshold": slider(
                W.FloatSlider, "blend threshold", min=0.05, max=0.95, step=0.05
            ),
            "blend_finest": checkbox("blend on finest maps"),
            "reweight": slider(
                W.FloatSlider, "target-word weight", value=1.0, min=0.0, max=4.0, step=0.25
            ),
        }
        self.reset_recipe()
        self.controls["case"].observe(lambda _: self.reset_recipe(), names="value")
        self.run_button = W.Button(description="Run", button_style="primary")
        self.run_button.on_click(lambda _: self.run())
        self.status = W.Label("")
        self.images = [W.Image(format="png") for _ in range(4)]
        captions = ["input", "reconstruction", "edited", "ground truth"]
        tiles = [W.VBox([W.Label(c), im]) for c, im in zip(captions, self.images)]
        self.metrics = W.HTML()
        controls = W.VBox(list(self.controls.values()))
        buttons = W.HBox([self.run_button, self.status])
        self.widget = W.VBox([controls, buttons, W.HBox(tiles), self.metrics])

    @property
    def case(self) -> EditCase:
        """The chosen edit case."""
        return self.cases[int(self.controls["case"].value)]

    def reset_recipe(self) -> None:
        """Set the edit controls to the chosen case kind's recipe (and no re-weighting)."""
        recipe = RECIPES[self.case.kind]
        for name, field in RECIPE_CONTROLS.items():
            self.controls[name].value = getattr(recipe, field)
        self.controls["reweight"].value = 1.0

    def recipe(self) -> EditRecipe:
        """The edit recipe from the controls."""
        c = self.controls
        return EditRecipe(
            cross_replace_steps=float(c["cross_replace"].value),
            self_replace_steps=float(c["self_replace"].value),
            blend=bool(c["blend"].value),
            blend_threshold=float(c["blend_threshold"].value),
            blend_finest=bool(c["blend_finest"].value),
            self_replace_finest=bool(c["self_replace_finest"].value),
        )

    def settings(self) -> InversionSettings:
        """Inversion settings from the controls."""
        c = self.controls
        return InversionSettings(
            num_steps=self.num_steps,
            guidance_scale=float(c["guidance"].value),
            inner_steps=int(c["inner_steps"].value),
            epsilon=float(c["epsilon"].value),
        )

    def _inversion(self, case_index: int, settings: InversionSettings) -> InversionResult:
        key = (case_index, dataclasses.astuple(settings))
        if key not in self._inversions:
            case = self.cases[case_index]
            self._inversions[key] = null_text_inversion(
                self.pipe,
                case.source.render(),
                case.source.caption(),
                settings,
                progress=self.progress,
            )
        return self._inversions[key]

    def run(self) -> dict[str, float]:
        """Invert (cached) and edit with the current control values; update images and metrics."""
        self.status.value = "running..."
        case = self.case
        inv = self._inversion(int(self.controls["case"].value), self.settings())
        weight = float(self.controls["reweight"].value)
        out, score = edit_case(
            self.pipe, inv, case, self.recipe(), progress=self.progress, target_weight=weight
        )
        source = case.source.render()
        self.last_metrics = {
            "psnr_reconstruction": psnr(source, out.images[0]),
            "edit_success": float(score.success),
            "psnr_vs_ground_truth": score.psnr_target,
            "psnr_outside_edit": score.psnr_outside,
            "inversion_seconds": sum(inv.timings.values()),
        }
        shown = [source, out.images[0], out.images[1], case.target.render()]
        for widget, img in zip(self.images, shown):
            widget.value = _png(img)
        rows = "".join(
            f"<tr><td>{k}</td><td>{v:.3f}</td></tr>" for k, v in self.last_metrics.items()
        )
        self.metrics.value = f"<table>{rows}</table>"
        self.runs += 1
        self.status.value = f"done (run {self.runs})"
        return self.last_metrics
