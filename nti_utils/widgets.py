"""Ablation panel for notebook 6: sliders for the settings of null-text inversion and
Prompt-to-Prompt, a run button, and images and metrics that update in place.

The panel is plain ipywidgets; its logic (what a click computes) lives in :meth:`AblationPanel.run`
so tests can set values and click programmatically::

    panel = AblationPanel(pipe, cases)
    panel.controls["guidance"].value = 5.0
    panel.run_button.click()
    panel.last_metrics["psnr_reconstruction"]

A notebook shows the panel by ending a cell with ``panel`` (or ``panel.widget``); nothing here
calls ``display()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import io
import time
import traceback
from collections.abc import Sequence

import ipywidgets as W
from diffusers import StableDiffusionPipeline
from PIL import Image

from nti_utils.caption import Captioner, load_captioner
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
    "target_null": "target_null",
}
"""Panel control -> the :class:`~nti_utils.shapes.edits.EditRecipe` field it sets."""

INVERSION_CONTROLS = ("case", "source", "guidance", "inner_steps", "epsilon")
"""Controls whose change needs a new null-text inversion (cached once made: about 20 s each for
the embedded model at 50 steps on a CPU)."""

EDIT_CONTROLS = (*RECIPE_CONTROLS, "reweight")
"""Controls that only change the edit: a run after changing only these reuses the inversion."""

CONTROL_HELP = {
    "case": "the edit: scene, kind (shape, color or background swap) and words; choosing one "
    "resets the edit controls to its kind's recipe",
    "source": "the source prompt: the scene's own caption, or the one the captioner writes "
    "(the edit then swaps one word of that caption)",
    "guidance": "classifier-free guidance w, used to optimize the null embeddings and to edit",
    "inner_steps": "at most this many Adam updates of the null embedding per timestep "
    "(0: plain DDIM inversion at w)",
    "epsilon": "early stop of the inner loop once the latent error is below this",
    "cross_replace": "fraction of the steps in which the target takes the source's "
    "cross-attention maps",
    "self_replace": "fraction of the steps in which the target takes the source's "
    "self-attention maps (keeps the layout)",
    "self_replace_finest": "inject self-attention in every layer up to the finest resolution",
    "blend": "LocalBlend: keep the source outside the edited object's attention mask "
    "(no effect on background swaps)",
    "blend_threshold": "LocalBlend's mask threshold",
    "blend_finest": "build LocalBlend's mask from the finest cross-attention maps",
    "target_null": "the target row's null embedding: the inversion's ∅_t (the paper's edit) or "
    "the empty prompt's plain ∅ (the source row keeps ∅_t)",
    "reweight": "factor on the target word's cross-attention (1: none)",
}
"""One line per control, shown as its tooltip (notebook 6 explains them too)."""


def _png(image: Image.Image, scale: int = 3) -> bytes:
    big = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    return buf.getvalue()


class AblationPanel:
    """Interactive ablation of inversion and editing settings on shapes-world edit cases.

    The edit controls start at the chosen case kind's :data:`~nti_utils.shapes.edits.RECIPES`
    entry (what the benchmark and notebook 5 run), and choosing another case resets them to its
    kind's recipe (and the target-word weight to 1); the inversion controls start at
    :class:`~nti_utils.result.InversionSettings`' defaults (w = 7.5, 10 inner steps, ε = 1e-5:
    notebook 5's settings). Inversions are cached by (case, inversion settings), so a run after
    changing only :data:`EDIT_CONTROLS` reruns only the edit; :data:`INVERSION_CONTROLS` need a new
    inversion (marked ``*`` in the panel).

    While a run goes the Run button is disabled (a click on it sends nothing, so clicks do not
    queue up; a click handled during a run does nothing), the status line says what is being
    computed, and the tqdm bars of the inversion and the edit appear in the panel's
    :attr:`output` area. An error is shown there (status line and traceback) and the button is
    enabled again.

    Args:
        pipe (`StableDiffusionPipeline`): the model.
        cases (`Sequence[EditCase]`): edits to choose from (see
            :func:`~nti_utils.shapes.edits.make_edit`).
        num_steps (`int`, defaults to 50): DDIM steps (fixed for the panel's life).
        captioner (`str` or :class:`~nti_utils.caption.Captioner`, defaults to ``"toy"``): writes
            the source prompt when the ``source`` control says "caption it" (loaded on first use).
        progress (`bool`, defaults to `True`): show tqdm bars (in :attr:`output`) during runs
            started with the Run button (:meth:`run` from code shows none unless asked).

    Attributes:
        controls (`dict[str, ipywidgets.Widget]`): by name: ``case``, ``source``, ``guidance``, ``inner_steps``,
            ``epsilon``, the recipe's (:data:`RECIPE_CONTROLS`: ``cross_replace``,
            ``self_replace``, ``blend``, ``blend_threshold``, ``blend_finest``,
            ``self_replace_finest``), and ``reweight``.
        run_button (`ipywidgets.Button`), status (`ipywidgets.HTML`): the status line,
        output (`ipywidgets.Output`): progress bars and errors of the latest run,
        images (`list[ipywidgets.Image]`), metrics (`ipywidgets.HTML`): the latest run's
        numbers and the settings they came from,
        widget (`ipywidgets.VBox`): the whole panel.
        last_metrics (`dict[str, float]`): numbers of the latest successful run.
        last_images (`dict[str, PIL.Image.Image]`): its images: ``input``, ``reconstruction``,
            ``edited``, ``ground truth``.
        last_inverted (`bool`): whether the latest run made a new inversion.
        runs (`int`): completed runs; inversions (:attr:`inversions`) are cached by
            (case, settings).
        busy (`bool`): a run is going.
    """

    def __init__(
        self,
        pipe: StableDiffusionPipeline,
        cases: Sequence[EditCase],
        num_steps: int = 50,
        progress: bool = True,
        captioner: str | Captioner = "toy",
    ) -> None:
        if not cases:
            raise ValueError("give at least one edit case")
        self.pipe, self.cases = pipe, list(cases)
        self.num_steps, self.progress = num_steps, progress
        self.captioner = captioner  # loaded on first use of the "caption it" source
        self._inversions: dict[tuple, InversionResult] = {}
        self.last_metrics: dict[str, float] = {}
        self.last_images: dict[str, Image.Image] = {}
        self.last_inverted = False
        self.runs = 0
        self.busy = False
        style = {"description_width": "160px"}
        layout = W.Layout(width="440px")

        def slider(cls, desc, **kw):
            return cls(description=desc, style=style, layout=layout, continuous_update=False, **kw)

        def checkbox(desc):
            return W.Checkbox(value=False, description=desc, style=style, layout=layout)

        def dropdown(desc, options):
            value = options[0][1]
            return W.Dropdown(
                options=options, value=value, description=desc, style=style, layout=layout
            )

        options = [
            (f"{c.kind}: {c.source_word} -> {c.target_word} ({i})", i) for i, c in enumerate(cases)
        ]
        inv = InversionSettings()
        self.controls: dict[str, W.Widget] = {
            "case": dropdown("edit *", options),
            "source": dropdown(
                "source prompt *",
                [("the scene's caption", "scene"), ("caption it (captioner)", "captioner")],
            ),
            "guidance": slider(
                W.FloatSlider, "guidance w *", value=inv.guidance_scale, min=1.0, max=12.0, step=0.5
            ),
            "inner_steps": slider(
                W.IntSlider, "inner steps N *", value=inv.inner_steps, min=0, max=20
            ),
            "epsilon": slider(
                W.FloatLogSlider,
                "early-stop epsilon *",
                value=inv.epsilon,
                base=10,
                min=-7,
                max=-2,
                readout_format=".0e",
            ),
            "cross_replace": slider(W.FloatSlider, "cross-attn replace", min=0, max=1, step=0.05),
            "self_replace": slider(W.FloatSlider, "self-attn replace", min=0, max=1, step=0.05),
            "self_replace_finest": checkbox("self-attn to finest"),
            "blend": checkbox("LocalBlend"),
            "blend_threshold": slider(
                W.FloatSlider, "blend threshold", min=0.05, max=0.95, step=0.05
            ),
            "blend_finest": checkbox("blend on finest maps"),
            "target_null": dropdown(
                "target-row ∅", [("inverted ∅_t (paper)", "inverted"), ("plain ∅", "plain")]
            ),
            "reweight": slider(
                W.FloatSlider, "target-word weight", value=1.0, min=0.0, max=4.0, step=0.25
            ),
        }
        for name, control in self.controls.items():
            again = "new inversion" if name in INVERSION_CONTROLS else "edit only"
            control.tooltip = f"{CONTROL_HELP[name]} ({again})"
        self.reset_recipe()
        self.controls["case"].observe(lambda _: self.reset_recipe(), names="value")
        self.run_button = W.Button(description="Run", button_style="primary", icon="play")
        self.run_button.on_click(self._on_click)
        self.status = W.HTML("")
        self.output = W.Output(layout=W.Layout(max_height="240px", overflow="auto"))
        self.images = [W.Image(format="png") for _ in range(4)]
        captions = ["input", "reconstruction", "edited", "ground truth"]
        tiles = [W.VBox([W.Label(c), im]) for c, im in zip(captions, self.images)]
        self.metrics = W.HTML()
        legend = W.HTML(
            "<small>* needs a new inversion (about 20 s on a CPU at 50 steps, then cached); "
            "the other controls only rerun the edit (a few seconds).</small>"
        )
        controls = W.VBox([*self.controls.values(), legend])
        buttons = W.HBox([self.run_button, self.status])
        self.widget = W.VBox([controls, buttons, self.output, W.HBox(tiles), self.metrics])

    def _repr_mimebundle_(self, **kwargs) -> dict:
        # the widget itself where widgets render; a readable line where they do not (a saved
        # notebook, whose widget state is stripped, or a terminal)
        data = self.widget._repr_mimebundle_(**kwargs)
        data["text/plain"] = (
            f"AblationPanel: {len(self.cases)} edit cases, {self.num_steps} steps "
            "(interactive: run the notebook in JupyterLab to use it)"
        )
        return data

    @property
    def case(self) -> EditCase:
        """The chosen edit case."""
        return self.cases[int(self.controls["case"].value)]

    @property
    def inversions(self) -> int:
        """How many inversions are cached (one per case and inversion settings used)."""
        return len(self._inversions)

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
            target_null=str(c["target_null"].value),
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

    def _key(self, case_index: int, settings: InversionSettings) -> tuple:
        return (case_index, self.controls["source"].value, dataclasses.astuple(settings))

    def _inversion(
        self, case_index: int, settings: InversionSettings, progress: bool = False
    ) -> InversionResult:
        key = self._key(case_index, settings)
        if key not in self._inversions:
            case = self.cases[case_index]
            captioned = self.controls["source"].value == "captioner"
            if captioned and not isinstance(self.captioner, Captioner):
                self.captioner = load_captioner(self.captioner, self.pipe.device)
            self._inversions[key] = null_text_inversion(
                self.pipe,
                case.source.render(),
                None if captioned else case.source.caption(),
                settings,
                progress=progress,
                captioner=self.captioner,
            )
        return self._inversions[key]

    def _on_click(self, _button: W.Button) -> None:
        # a click handler must not raise: the exception would go to JupyterLab's log console;
        # run() has already shown it in the panel
        if self.busy:
            return
        with contextlib.suppress(Exception):
            self.run(progress=self.progress)

    def _set_status(self, text: str, color: str | None = None) -> None:
        style = f' style="color:{color}"' if color else ""
        self.status.value = f"<span{style}>{html.escape(text)}</span>"

    def run(self, progress: bool = False) -> dict[str, float]:
        """Invert (cached) and edit with the current control values; update images and metrics.

        What a click on Run does (with ``progress=self.progress``). `progress` shows tqdm bars in
        :attr:`output`. Raises whatever the inversion or the edit raised, after showing it in the panel (status
        line and :attr:`output`); `RuntimeError` if a run is already going.
        """
        if self.busy:
            raise RuntimeError("the panel is already running; wait for it to finish")
        self.busy = True
        self.run_button.disabled, self.run_button.description = True, "Running..."
        self.output.outputs = ()
        start = time.perf_counter()
        error = None
        try:
            with self.output:  # tqdm's notebook bars go into the panel
                try:
                    self._compute(progress)
                except Exception as err:  # shown below; the Output would swallow it in IPython
                    error, tb = err, traceback.format_exc()
        finally:
            self.busy = False
            self.run_button.disabled, self.run_button.description = False, "Run"
        if error is not None:
            self._set_status(f"error: {type(error).__name__}: {error}", "#c00")
            self.output.append_stderr(tb)
            raise error
        self.runs += 1
        how = "new inversion" if self.last_inverted else "edit only, inversion reused"
        self._set_status(f"done (run {self.runs}, {time.perf_counter() - start:.1f} s: {how})")
        return self.last_metrics

    def _compute(self, progress: bool) -> None:
        index = int(self.controls["case"].value)
        case, settings = self.cases[index], self.settings()
        recipe, weight = self.recipe(), float(self.controls["reweight"].value)
        self.last_inverted = self._key(index, settings) not in self._inversions
        if self.last_inverted:
            self._set_status(f"running: inverting case {index} (about 20 s on a CPU)...")
        inv = self._inversion(index, settings, progress)
        if inv.prompt != case.prompts[0]:  # a caption other than the scene's: edit from it
            case = dataclasses.replace(case, source_prompt=inv.prompt)
        self._set_status("running: editing...")
        out, score = edit_case(
            self.pipe, inv, case, recipe, progress=progress, target_weight=weight
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
        self.last_images = dict(zip(["input", "reconstruction", "edited", "ground truth"], shown))
        for widget, img in zip(self.images, shown):
            widget.value = _png(img)
        rows = "".join(
            f"<tr><td>{k}</td><td>{v:.3f}</td></tr>" for k, v in self.last_metrics.items()
        )
        used = (
            f"case {index} ({case.kind}: {case.source_word} -> {case.target_word}), "
            f"source prompt {inv.prompt!r} ({inv.prompt_source}), "
            f"w {settings.guidance_scale:g}, N {settings.inner_steps}, "
            f"epsilon {settings.epsilon:.0e}, cross {recipe.cross_replace_steps:g}, "
            f"self {recipe.self_replace_steps:g}, finest self {recipe.self_replace_finest}, "
            f"blend {recipe.blend} ({recipe.blend_threshold:g}, finest {recipe.blend_finest}), "
            f"weight {weight:g}"
        )
        self.metrics.value = f"<table>{rows}</table><small>{html.escape(used)}</small>"
