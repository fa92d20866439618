"""Peak memory of a Prompt-to-Prompt edit at SD's 512 px: ``python -m nti_utils.bench.memory``.

One two-prompt edit (source + target, classifier-free guidance: 4 UNet rows per call) from a 64x64
latent, on a UNet with Stable Diffusion 1.5's layer layout and random weights
(:func:`sd_shaped_pipeline`: CrossAttnDownBlock2D x3 + DownBlock2D and back, 2 layers per block,
attention at the three finest levels, 8 heads, cross-attention dim 768, 77-token text), at SD's width
(320/640/1280/1280) or a reduced one (``--width``; the attention maps' sizes do not depend on it,
the convolutions' cost does). Three variants, each measured with :func:`~nti_utils.bench.measure.measure`:

* ``plain``: plain guided sampling of the same two prompts, no controller (:func:`~nti_utils.ddim.sample`,
  diffusers' own fused attention processors);
* ``p2p``: the default edit, :func:`~nti_utils.editing.edit` with the controller
  :func:`~nti_utils.editing.build_controller` gives (a :class:`~nti_utils.p2p.Replace`): only the
  cross-attention layers hand over their probabilities, the self-attention injection runs fused;
* ``materialize_all``: the same edit the way the original Prompt-to-Prompt code runs it, every
  attention layer computing its probabilities explicitly at every step and handing them to the
  controller (:class:`MaterializeAll`: a ``Replace`` with ``materialize_self=True`` whose
  :meth:`~nti_utils.attention.AttentionController.wants` is True for every layer). It stores what
  the default stores (cross-attention maps): the difference measured is materializing the
  probabilities, not storing them.

All three start from the same :class:`~nti_utils.result.InversionResult` (:func:`random_inversion`:
a random z̄_T and the empty prompt's embedding as every ∅_t, what null-text inversion starts from);
the edits run without decoding (``edit(..., decode=False)``), so no VAE work is measured.

Peak memory is the measure's: on CUDA the peak of ``torch.cuda.max_memory_allocated`` above the
level at the start, on the CPU the peak process RSS above the start, sampled every 5 ms. On the CPU
freed memory is not always handed back to the OS, so a variant run after another could find the
pages it needs already resident and show a lower peak; :func:`~nti_utils.bench.measure.release_freed_memory`
(``malloc_trim``) helps but promises nothing. So by default each variant runs in a fresh Python
process (built with the same seed, the same model); ``--in-process`` runs them one after another
in this process instead (what the tests do, at a tiny size).

Prints one row per variant: peak MiB and its ratio to plain sampling and to the materializing
edit, wall seconds per denoising step and its ratio to plain sampling, latent rows through the UNet,
and how many attention-layer calls handed over probabilities; then whether the default edit's peak
is within the goal, :data:`GOAL` x plain sampling's.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
from diffusers import StableDiffusionPipeline

from nti_utils.attention import AttentionController, LayerInfo
from nti_utils.bench.measure import measure, release_freed_memory
from nti_utils.ddim import DDIMSchedule, sample
from nti_utils.editing import build_controller, edit
from nti_utils.models import embed_prompts
from nti_utils.p2p import Replace
from nti_utils.result import InversionResult, InversionSettings
from nti_utils.shapes.model import (
    ModelConfig,
    assemble_pipeline,
    build_text_encoder,
    build_unet,
    build_vae,
)
from nti_utils.shapes.tokenizer import build_tokenizer

SD15_WIDTH = 320
"""SD 1.5's ``block_out_channels`` are this times (1, 2, 4, 4)."""
SOURCE = "a red circle on a white background"
TARGET = "a red square on a white background"
GUIDANCE = 7.5
GOAL = 1.3
"""The issue's goal: the default edit's peak memory at most this times plain sampling's."""
VARIANTS: dict[str, str] = {
    "plain": "plain guided sampling (no controller)",
    "p2p": "P2P edit, default (fused self-inject.)",
    "materialize_all": "P2P edit, all probabilities materialized",
}
"""Variant name -> its row label, in the table's order."""


def sd_config(width: int = SD15_WIDTH, latent_size: int = 64) -> ModelConfig:
    """SD 1.5's UNet layout at channel width `width` (SD's: 320) and a 77-token, 768-wide text side
    (a one-layer text encoder: its cost is not what is measured), for `latent_size` latents (64:
    SD's 512 px images). The VAE is a minimal one of the right scale factor (8), never run here.

    Raises:
        ValueError: a width that is not a positive multiple of 32 (the group norms' 32 groups, 8
            heads), or a latent size not divisible by 8 (three downsamplings).
    """
    if not (isinstance(width, int) and width >= 32 and width % 32 == 0):
        raise ValueError(f"width must be a positive multiple of 32 (SD 1.5: 320), got {width!r}")
    if not (isinstance(latent_size, int) and latent_size >= 8 and latent_size % 8 == 0):
        raise ValueError(
            f"latent_size must be a multiple of 8 (SD at 512 px: 64), got {latent_size!r}"
        )
    return ModelConfig(
        resolution=8 * latent_size,
        vae_channels=(8, 8, 8, 8),
        vae_norm_groups=8,
        latent_channels=4,
        unet_channels=(width, 2 * width, 4 * width, 4 * width),
        unet_down=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        unet_up=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        unet_attention_head_dim=8,  # diffusers' name for SD 1.x's 8 heads
        unet_norm_groups=32,
        text_hidden=768,
        text_intermediate=768,
        text_layers=1,
        text_heads=12,
        max_tokens=77,
    )


def sd_shaped_pipeline(
    width: int = SD15_WIDTH, latent_size: int = 64, seed: int = 0
) -> StableDiffusionPipeline:
    """A pipeline with SD 1.5's UNet layout (:func:`sd_config`, 2 layers per block) and random
    weights drawn from `seed` (CPU, float32, eval mode), the shapes world's tokenizer padded to 77."""
    cfg = sd_config(width, latent_size)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(cfg.max_tokens)
    unet = build_unet(cfg, layers_per_block=2)
    vae = build_vae(cfg)
    text_encoder = build_text_encoder(cfg, tokenizer)
    pipe = assemble_pipeline(vae.eval(), text_encoder.eval(), tokenizer, unet.eval())
    pipe.register_to_config(_name_or_path=f"random-sd15-layout-w{width}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_inversion(
    pipe: StableDiffusionPipeline,
    num_steps: int,
    prompt: str = SOURCE,
    guidance_scale: float = GUIDANCE,
    seed: int = 0,
) -> InversionResult:
    """An :class:`InversionResult` to edit from: z̄_T ~ N(0, I) drawn from `seed` at the UNet's
    sample size, and the empty prompt's embedding as ∅_t at every step (where null-text inversion
    starts from). Marked ``method="random"``: no image was inverted."""
    g = torch.Generator().manual_seed(seed)
    c, s = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    z = torch.randn((1, c, s, s), generator=g)
    null = embed_prompts(pipe, "").cpu().float()
    return InversionResult(
        latent_T=z,
        null_embeddings=null[None].expand(num_steps, -1, -1, -1).clone(),
        prompt=prompt,
        method="random",
        settings=InversionSettings(num_steps=num_steps, guidance_scale=guidance_scale),
    )


class MaterializeAll(Replace):
    """The edit the way the original Prompt-to-Prompt code runs it: every attention layer computes
    its probabilities (B, heads, Q, K) explicitly at every step and hands them to the controller;
    the self-attention injection copies the source's probabilities to the targets
    (``materialize_self=True``). Same output as :class:`~nti_utils.p2p.Replace` (up to rounding)."""

    def __init__(self, tokenizer, prompts, num_steps, **kwargs) -> None:
        super().__init__(tokenizer, prompts, num_steps, materialize_self=True, **kwargs)

    def wants(self, info: LayerInfo) -> bool:
        return True


@dataclass
class RequestCount:
    """Attention-layer calls of a run: all of them, and those that handed their probabilities to
    the controller (:meth:`~nti_utils.attention.AttentionController.wants` True), per layer name."""

    calls: Counter = field(default_factory=Counter)
    materialized: Counter = field(default_factory=Counter)


def count_requests(controller: AttentionController) -> RequestCount:
    """Count the layer calls in which `controller` asks for probabilities, by wrapping this
    instance's ``wants`` (the attention processor asks it once per layer call)."""
    counts, wants = RequestCount(), controller.wants

    def counted(info: LayerInfo) -> bool:
        w = wants(info)
        counts.calls[info.name] += 1
        counts.materialized[info.name] += bool(w)
        return w

    controller.wants = counted
    return counts


def make_controller(variant: str, pipe: StableDiffusionPipeline, num_steps: int):
    """The controller of a variant (None for ``"plain"``), for [:data:`SOURCE`, :data:`TARGET`]."""
    prompts = [SOURCE, TARGET]
    if variant == "plain":
        return None
    if variant == "p2p":
        return build_controller(pipe.tokenizer, prompts, num_steps)
    if variant == "materialize_all":
        return MaterializeAll(pipe.tokenizer, prompts, num_steps)
    raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")


@dataclass
class VariantResult:
    """One variant's measurement (see :func:`run_variant`)."""

    variant: str
    steps: int
    peak_mem_mb: float
    wall_s: float
    forward_rows: int
    layer_calls: int
    materialized_calls: int
    memory_kind: str
    layers_materialized: list[str] = field(default_factory=list)
    layers_called: list[str] = field(default_factory=list)
    latents: torch.Tensor | None = field(default=None, repr=False)

    @property
    def wall_s_per_step(self) -> float:
        return self.wall_s / self.steps

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("latents")
        return d


def run_variant(
    pipe: StableDiffusionPipeline, variant: str, steps: int = 3, seed: int = 0
) -> VariantResult:
    """Run one variant's `steps`-step sampling of [:data:`SOURCE`, :data:`TARGET`] at w = 7.5 from
    :func:`random_inversion` and measure it (embedding the prompts included, decoding excluded).

    ``"plain"`` is :func:`~nti_utils.ddim.sample` with the inversion's z̄_T and ∅_t and no
    controller; ``"p2p"`` and ``"materialize_all"`` are :func:`~nti_utils.editing.edit` with the
    controller of :func:`make_controller`.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
    inv = random_inversion(pipe, steps, seed=seed)
    prompts = [SOURCE, TARGET]
    controller = make_controller(variant, pipe, steps)
    counts = count_requests(controller) if controller is not None else RequestCount()
    dev, dtype = pipe.unet.device, pipe.unet.dtype
    schedule = DDIMSchedule.from_scheduler(pipe.scheduler, steps)
    z = inv.latent_T.to(dev, dtype).expand(len(prompts), -1, -1, -1).clone()
    nulls = [u.to(dev, dtype) for u in inv.uncond_per_step()]
    release_freed_memory()
    with measure(pipe.unet) as m:
        if controller is None:
            cond = embed_prompts(pipe, prompts)
            latents = sample(pipe.unet, z, cond, schedule, GUIDANCE, nulls, progress=False).latents
        else:
            latents = edit(pipe, inv, prompts, controller, progress=False, decode=False).latents
    if controller is not None:
        del controller.wants  # the class's own again
    return VariantResult(
        variant=variant,
        steps=steps,
        peak_mem_mb=m.peak_mem_mb,
        wall_s=m.wall_s,
        forward_rows=m.forward_rows,
        layer_calls=sum(counts.calls.values()),
        materialized_calls=sum(counts.materialized.values()),
        memory_kind=m.memory_kind,
        layers_materialized=sorted(k for k, v in counts.materialized.items() if v),
        layers_called=sorted(counts.calls),
        latents=latents.detach().cpu(),
    )


def format_table(results: list[VariantResult], header: str = "") -> str:
    """The table: a row per variant with peak MiB, its ratio to ``plain`` and to
    ``materialize_all`` (where measured), wall s per step and its ratio to ``plain``, UNet rows and
    materialized / all attention-layer calls; then the goal line."""
    by = {r.variant: r for r in results}
    plain, everything = by.get("plain"), by.get("materialize_all")

    def ratio(a: float, b: VariantResult | None, attr: str) -> str:
        return f"{a / getattr(b, attr):.2f}" if b is not None and getattr(b, attr) > 0 else "-"

    cols = (
        f"{'variant':<42}{'peak MiB':>10}{'x plain':>9}{'x all-mat.':>11}{'s/step':>9}"
        f"{'x plain':>9}{'rows':>6}{'probs calls':>14}"
    )
    lines = [header] if header else []
    lines += [cols, "-" * len(cols)]
    for r in results:
        calls = f"{r.materialized_calls}/{r.layer_calls}" if r.layer_calls else "-"
        lines.append(
            f"{VARIANTS[r.variant]:<42}{r.peak_mem_mb:>10.1f}"
            f"{ratio(r.peak_mem_mb, plain, 'peak_mem_mb'):>9}"
            f"{ratio(r.peak_mem_mb, everything, 'peak_mem_mb'):>11}"
            f"{r.wall_s_per_step:>9.2f}{ratio(r.wall_s_per_step, plain, 'wall_s_per_step'):>9}"
            f"{r.forward_rows:>6}{calls:>14}"
        )
    if plain is not None and "p2p" in by:
        q = by["p2p"].peak_mem_mb / plain.peak_mem_mb
        verdict = "met" if q <= GOAL else "NOT met"
        lines.append(
            f"goal: default P2P edit peak <= {GOAL} x plain sampling's: {q:.2f} x, {verdict}"
        )
    if results:
        lines.append(f"memory: {results[0].memory_kind}")
    return "\n".join(lines)


def describe(pipe: StableDiffusionPipeline, steps: int, device: str) -> str:
    """The header line: model width and size, latent size, steps, device, threads, torch."""
    unet = pipe.unet
    width = unet.config.block_out_channels[0]
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    s = unet.config.sample_size
    full = " (SD 1.5's full width)" if width == SD15_WIDTH else f" (SD 1.5: {SD15_WIDTH})"
    return (
        f"SD 1.5 UNet layout, random weights, width {width}{full}: block_out_channels "
        f"{tuple(unet.config.block_out_channels)}, {params:.0f}M parameters; {s}x{s} latent "
        f"({8 * s} px), 2 prompts x CFG = 4 rows per UNet call, {steps} DDIM steps, w = {GUIDANCE}; "
        f"{device}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
        f"{platform.machine()}"
    )


_MARK = "MEMORY-BENCH-RESULT "


def _run_in_subprocess(variant: str, a: argparse.Namespace) -> tuple[VariantResult, str]:
    """One variant in a fresh Python process: its result and the header line it printed."""
    cmd = [sys.executable, "-m", "nti_utils.bench.memory", "--variant", variant]
    for flag in ("width", "latent", "steps", "device", "seed"):
        cmd += [f"--{flag}", str(getattr(a, flag))]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    line = next(x for x in reversed(proc.stdout.splitlines()) if x.startswith(_MARK))
    got = json.loads(line[len(_MARK) :])
    return VariantResult(**got["result"]), got["header"]


def main(argv: list[str] | None = None) -> list[VariantResult]:
    """Command line: measure the variants (each in a fresh process unless ``--in-process``) and
    print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=SD15_WIDTH, help="UNet channel width (SD: 320)")
    p.add_argument("--latent", type=int, default=64, help="latent side (64: 512 px)")
    p.add_argument("--steps", type=int, default=3, help="DDIM steps (3: the first injects)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    p.add_argument("--in-process", action="store_true", help="run every variant in this process")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # one variant, JSON out (the subprocesses)
    a = p.parse_args(argv)
    if a.steps < 1:
        p.error("--steps must be >= 1")
    try:
        sd_config(a.width, a.latent)
    except ValueError as err:
        p.error(str(err))
    variants = a.variant.split(",") if a.variant else a.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {list(VARIANTS)}")
    if a.variant or a.in_process:
        pipe = sd_shaped_pipeline(a.width, a.latent, a.seed).to(a.device)
        header = describe(pipe, a.steps, a.device)
        results = []
        for v in variants:
            print(f"measuring {v} ...", file=sys.stderr, flush=True)
            results.append(run_variant(pipe, v, a.steps, a.seed))
        if a.variant:  # a subprocess of the command below: hand the results back
            for r in results:
                print(_MARK + json.dumps({"header": header, "result": r.to_json()}), flush=True)
            return results
    else:
        results = []
        for v in variants:
            print(f"measuring {v} in a fresh process ...", file=sys.stderr, flush=True)
            r, header = _run_in_subprocess(v, a)
            results.append(r)
    mode = "all variants in one process" if a.in_process else "each variant in a fresh process"
    print(format_table(results, f"{header}; {mode}"))
    bad = [r.variant for r in results if not math.isfinite(r.peak_mem_mb)]
    if bad:
        print(f"no peak memory measured for {bad}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
