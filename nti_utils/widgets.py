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

from nti_utils.inversion import InversionResult, InversionSettings, null_text_inversion
from nti_utils.metrics import psnr
from nti_utils.p2p import LocalBlend, Replace, Reweight, edit, equalizer
from nti_utils.shapes.edits import EditCase, score_edit


def _png(image: Image.Image, scale: int = 3) -> bytes:
    big = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    return buf.getvalue()


class AblationPanel:
    """Interactive ablation of inversion and editing settings on shapes-world edit cases.

    Args:
        pipe (`StableDiffusionPipeline`): the model.
        cases (`Sequence[EditCase]`): edits to choose from (see
            :func:`~nti_utils.shapes.edits.make_edit`).
        num_steps (`int`, defaults to 50): DDIM steps (fixed for the panel's life).
        progress (`bool`, defaults to `False`): show tqdm bars while running.

    Attributes:
        controls (`dict[str, ipywidgets.Widget]`): by name: ``case``, ``guidance``, ``inner_steps``,
            ``epsilon``, ``cross_replace``, ``self_replace``, ``blend``, ``blend_threshold``,
            ``reweight``.
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
        self.pipe, self.cases, self.num_steps, self.progress = (
            pipe,
            list(cases),
            num_steps,
            progress,
        )
        self._inversions: dict[tuple, InversionResult] = {}
        self.last_metrics: dict[str, float] = {}
        self.runs = 0
        style = {"description_width": "150px"}
        layout = W.Layout(width="420px")

        def slider(cls, desc, **kw):
            return cls(description=desc, style=style, layout=layout, continuous_update=False, **kw)

        options = [
            (f"{c.kind}: {c.source_word} -> {c.target_word} ({i})", i) for i, c in enumerate(cases)
        ]
        self.controls: dict[str, W.Widget] = {
            "case": W.Dropdown(
                options=options, value=0, description="edit", style=style, layout=layout
            ),  # fmt: skip
            "guidance": slider(W.FloatSlider, "guidance w", value=7.5, min=1.0, max=12.0, step=0.5),
            "inner_steps": slider(W.IntSlider, "inner steps N", value=10, min=0, max=20),
            "epsilon": slider(
                W.FloatLogSlider, "early-stop epsilon", value=1e-5, base=10, min=-7, max=-2
            ),  # fmt: skip
            "cross_replace": slider(
                W.FloatSlider, "cross-attn replace", value=0.8, min=0, max=1, step=0.05
            ),  # fmt: skip
            "self_replace": slider(
                W.FloatSlider, "self-attn replace", value=0.4, min=0, max=1, step=0.05
            ),  # fmt: skip
            "blend": W.Checkbox(value=True, description="LocalBlend", style=style),
            "blend_threshold": slider(
                W.FloatSlider, "blend threshold", value=0.3, min=0.05, max=0.95, step=0.05
            ),  # fmt: skip
            "reweight": slider(
                W.FloatSlider, "target-word weight", value=1.0, min=0.0, max=4.0, step=0.25
            ),  # fmt: skip
        }
        self.run_button = W.Button(description="Run", button_style="primary")
        self.run_button.on_click(lambda _: self.run())
        self.status = W.Label("")
        self.images = [W.Image(format="png") for _ in range(4)]
        captions = ["input", "reconstruction", "edited", "ground truth"]
        tiles = [W.VBox([W.Label(c), im]) for c, im in zip(captions, self.images)]
        self.metrics = W.HTML()
        self.widget = W.VBox(
            [
                W.VBox(list(self.controls.values())),
                W.HBox([self.run_button, self.status]),
                W.HBox(tiles),
                self.metrics,
            ]  # fmt: skip
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
                self.pipe, case.source.render(), case.source.caption(), settings,
                progress=self.progress,
            )  # fmt: skip
        return self._inversions[key]

    def run(self) -> dict[str, float]:
        """Invert (cached) and edit with the current control values; update images and metrics."""
        c = self.controls
        self.status.value = "running..."
        case = self.cases[int(c["case"].value)]
        settings = self.settings()
        inv = self._inversion(int(c["case"].value), settings)
        tok, prompts = self.pipe.tokenizer, case.prompts
        blend = None
        if c["blend"].value and case.kind != "background":
            blend = LocalBlend(
                case.blend_words, tok, prompts, threshold=float(c["blend_threshold"].value)
            )
        ctrl = Replace(tok, prompts, self.num_steps, cross_replace_steps=float(c["cross_replace"].value),
                       self_replace_steps=float(c["self_replace"].value), local_blend=blend)  # fmt: skip
        if float(c["reweight"].value) != 1.0:
            eq = equalizer(tok, prompts, {case.target_word: float(c["reweight"].value)})
            ctrl = Reweight(tok, prompts, self.num_steps, eq, base=ctrl)
        out = edit(self.pipe, inv, prompts, ctrl, progress=self.progress)
        source = case.source.render()
        score = score_edit(case, out.images[1], source)
        self.last_metrics = {
            "psnr_reconstruction": psnr(source, out.images[0]),
            "edit_success": float(score.success),
            "psnr_vs_ground_truth": score.psnr_target,
            "psnr_outside_edit": score.psnr_outside,
            "inversion_seconds": sum(inv.timings.values()),
        }
        for widget, img in zip(
            self.images, [source, out.images[0], out.images[1], case.target.render()]
        ):
            widget.value = _png(img)
        rows = "".join(
            f"<tr><td>{k}</td><td>{v:.3f}</td></tr>" for k, v in self.last_metrics.items()
        )
        self.metrics.value = f"<table>{rows}</table>"
        self.runs += 1
        self.status.value = f"done (run {self.runs})"
        return self.last_metrics
