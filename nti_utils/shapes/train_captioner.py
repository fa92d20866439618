"""Train the embedded captioner: a tiny SegFormer + GPT-2 image-to-text model of the shapes world.

Run ``python -m nti_utils.shapes.train_captioner --workdir ~/.cache/nti-lab/captioner
--out data/toy-captioner``; rerun the same command after an interruption (``<workdir>/state.pt`` is
written atomically every ``--ckpt-every`` steps).

The model is transformers' `VisionEncoderDecoderModel`: a `SegformerModel` encoder (SegFormer's
Mix Transformer: overlapping strided-convolution patch embeddings and a depthwise 3x3 convolution in
every feed-forward block, attention over spatially reduced keys; three stages, 64 px to a 4x4 grid
of tokens, its last stage left as a token sequence, ``reshape_last_stage=False``) and a
`GPT2LMHeadModel` decoder with cross-attention, trained with teacher forcing on captions of random
scenes that are rendered afresh at every step, so it never sees an image twice. It must read images
that `Scene.render` did not draw, so most training images are drawn with this module's own
augmentations (:func:`augmented_render`): object and background shades moved off the palette,
squares and triangles turned, other supersampling and resampling filters, blur, noise and JPEG
compression. The evaluation set of differently drawn images (:mod:`nti_utils.shapes.redraw`) is a
different renderer again and is never trained on.

Two objects are captioned left to right (by center), whatever order the scene lists them in, so that
the target is a function of the image; :func:`caption_matches` compares captions as sets of objects.

The folder written by ``--out`` is a standard transformers folder (model, `ViTImageProcessor`, the
world's `CLIPTokenizer`) that `VisionEncoderDecoderModel.from_pretrained` and
:func:`nti_utils.caption.load_captioner` load.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from tqdm.auto import tqdm
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    SegformerConfig,
    SegformerModel,
    VisionEncoderDecoderModel,
    ViTImageProcessor,
)

from nti_utils.shapes.seeds import CAPTIONER_CHECK, REDRAWN
from nti_utils.shapes.tokenizer import build_tokenizer
from nti_utils.shapes.train import lr_at
from nti_utils.shapes.world import (
    BACKGROUNDS,
    OBJECT_COLORS,
    RESOLUTION,
    Scene,
    make_caption,
    parse_caption,
    random_scene,
    scene_from_seed,
)

MAX_CAPTION_TOKENS = 16
"""Longest caption in tokens with start and end (two objects: 13)."""


@dataclass(frozen=True)
class CaptionerConfig:
    """Sizes of the embedded captioner and its training recipe."""

    encoder_widths: tuple[int, ...] = (32, 64, 128)
    encoder_depths: tuple[int, ...] = (2, 2, 2)
    encoder_heads: tuple[int, ...] = (1, 2, 4)
    encoder_patches: tuple[int, ...] = (7, 3, 3)
    """Kernel sizes of the stages' overlapping patch embeddings (strides 4, 2, 2)."""
    encoder_reductions: tuple[int, ...] = (4, 2, 1)
    """Spatial reduction of each stage's keys and values."""
    width: int = 128
    decoder_layers: int = 3
    heads: int = 4
    steps: int = 3000
    batch: int = 48
    lr: float = 1e-3
    warmup: int = 200
    p_clean: float = 0.25
    p_two: float = 0.5
    seed: int = 0


def build_captioner(cfg: CaptionerConfig) -> tuple[VisionEncoderDecoderModel, object, object]:
    """A freshly initialized captioner with its image processor and tokenizer."""
    tok = build_tokenizer(model_max_length=MAX_CAPTION_TOKENS)
    # a padding token of its own (CLIP pads with its end token), so that generation can tell
    # padding from the end of a caption
    tok.add_special_tokens({"pad_token": "<|pad|>"})
    n_stages = len(cfg.encoder_widths)
    enc = SegformerConfig(
        num_encoder_blocks=n_stages,
        depths=list(cfg.encoder_depths),
        hidden_sizes=list(cfg.encoder_widths),
        num_attention_heads=list(cfg.encoder_heads),
        patch_sizes=list(cfg.encoder_patches),
        strides=[4] + [2] * (n_stages - 1),
        sr_ratios=list(cfg.encoder_reductions),
        mlp_ratios=[4] * n_stages,
        reshape_last_stage=False,  # (B, tokens, width): what the decoder's cross-attention reads
        hidden_size=cfg.encoder_widths[-1],  # read by VisionEncoderDecoderModel
    )
    dec = GPT2Config(
        vocab_size=len(tok),
        n_positions=MAX_CAPTION_TOKENS,
        n_embd=cfg.width,
        n_layer=cfg.decoder_layers,
        n_head=cfg.heads,
        add_cross_attention=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        # no pad id in the decoder's own config: labels mask padding with -100, and generation
        # pads finished captions with the generation config's id (set below), which the decoder
        # would otherwise warn about as if it were padded input
        pad_token_id=None,
    )
    model = VisionEncoderDecoderModel(encoder=SegformerModel(enc), decoder=GPT2LMHeadModel(dec))
    model.config.decoder_start_token_id = tok.bos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.config.eos_token_id = tok.eos_token_id
    model.generation_config.decoder_start_token_id = tok.bos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    # generate() alone (without nti_utils.caption) must not run past the decoder's positions (the
    # decoder start token takes one); max_new_tokens rather than max_length, which generate() warns
    # about whenever a caller also passes max_new_tokens, as nti_utils.caption does
    model.generation_config.max_new_tokens = MAX_CAPTION_TOKENS - 1
    processor = ViTImageProcessor(
        size={"height": RESOLUTION, "width": RESOLUTION},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        resample=Image.Resampling.BOX,
    )
    return model, processor, tok


# ------------------------------------------------------------------------------ captions
def ordered_caption(scene: Scene) -> str:
    """The caption the captioner learns: the scene's, with its objects listed left to right."""
    objects = sorted(scene.objects, key=lambda o: (o.cx, o.cy))
    return make_caption(tuple((o.color, o.kind) for o in objects), scene.background)


def caption_matches(predicted: str, truth: str) -> dict[str, bool]:
    """Compare a predicted caption with the true one, objects as a set (order free).

    Returns:
        ``{"exact": ..., "background": ..., "objects": ...}``; a caption outside the world's
        grammar matches nothing.
    """
    want_objects, want_bg = parse_caption(truth)
    try:
        got_objects, got_bg = parse_caption(predicted)
    except ValueError:
        return {"exact": False, "background": False, "objects": False}
    objects = sorted(got_objects) == sorted(want_objects)
    return {
        "exact": objects and got_bg == want_bg,
        "background": got_bg == want_bg,
        "objects": objects,
    }


# ------------------------------------------------------------------------------ augmentation
def _vertices(obj, scale: float, degrees: float) -> list[tuple[float, float]]:
    left, top, right, bottom = (v * scale for v in obj.bbox())
    cx, cy = (left + right) / 2, (top + bottom) / 2
    if obj.kind == "square":
        pts = [(left, top), (right, top), (right, bottom), (left, bottom)]
    else:
        pts = [(cx, top), (right, bottom), (left, bottom)]
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    return [(cx + c * (x - cx) - s * (y - cy), cy + s * (x - cx) + c * (y - cy)) for x, y in pts]


def augmented_render(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """Draw `scene` with random shades, turns, supersampling, blur, noise and JPEG (training
    only; deterministic given `rng`)."""
    scale = int(rng.choice([1, 2, 3, 4, 6]))
    res = scene.resolution

    def shade(rgb, amount):
        return tuple(int(np.clip(v + rng.uniform(-amount, amount), 0, 255)) for v in rgb)

    bg = np.asarray(BACKGROUNDS[scene.background], dtype=float) + rng.uniform(-30, 30)
    big = Image.new("RGB", (res * scale,) * 2, shade(np.clip(bg, 0, 255), 12))
    draw = ImageDraw.Draw(big)
    for obj in scene.objects:
        fill = shade(OBJECT_COLORS[obj.color], 36)
        if obj.kind == "circle":
            draw.ellipse(tuple(v * scale for v in obj.bbox()), fill=fill)
        else:
            draw.polygon(_vertices(obj, scale, float(rng.uniform(-15, 15))), fill=fill)
    filt = [Image.Resampling.BOX, Image.Resampling.BILINEAR, Image.Resampling.LANCZOS]
    img = big.resize((res, res), filt[int(rng.integers(len(filt)))])
    if rng.random() < 0.4:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.2, 1.0))))
    arr = np.asarray(img, dtype=np.float32)
    if rng.random() < 0.7:
        arr = arr + rng.normal(0, rng.uniform(0, 8), arr.shape)
    img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    if rng.random() < 0.25:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(35, 95)))
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return img


def training_batch(cfg: CaptionerConfig, rng: np.random.Generator, processor, tok):
    """One batch: pixel values (B, 3, 64, 64) and labels (B, L) with -100 after the end token."""
    images, captions = [], []
    for _ in range(cfg.batch):
        scene = random_scene(rng, p_two=cfg.p_two)
        clean = rng.random() < cfg.p_clean
        images.append(scene.render() if clean else augmented_render(scene, rng))
        captions.append(ordered_caption(scene))
    pixels = processor(images, return_tensors="pt").pixel_values
    ids = tok(
        captions, padding="max_length", max_length=MAX_CAPTION_TOKENS, return_tensors="pt"
    ).input_ids
    labels = ids[:, 1:].clone()  # the decoder starts from <|startoftext|> on its own
    ends = (labels == tok.eos_token_id).int().cumsum(1)
    labels[(ends > 1) | ((ends == 1) & (labels != tok.eos_token_id))] = -100
    return pixels, labels


# ------------------------------------------------------------------------------ checks
def check_captioner(captioner, n: int = 300, batch: int = 50) -> dict[str, float]:
    """Measure a captioner on held-out scenes (:mod:`nti_utils.shapes.seeds`).

    Args:
        captioner: a :class:`nti_utils.caption.Captioner` (or any callable from images to
            captions).
        n (`int`, defaults to 300): scenes per set.

    Returns:
        ``single_exact`` (single-object world renders, caption exactly right), ``two_all_right``
        (two-object world renders, both objects and the background right), ``redrawn_exact``
        (scenes of one or two objects drawn by :mod:`nti_utils.shapes.redraw`, exactly right), and
        ``ms_per_caption`` (wall time per image in batches of `batch`).
    """
    from nti_utils.shapes.redraw import Style, redraw

    sets = {
        "single_exact": [(scene_from_seed(CAPTIONER_CHECK + i, 1), None) for i in range(n)],
        "two_all_right": [(scene_from_seed(CAPTIONER_CHECK + n + i, 2), None) for i in range(n)],
        "redrawn_exact": [
            (scene_from_seed(REDRAWN + i), Style.from_seed(REDRAWN + i)) for i in range(n)
        ],
    }
    out, seconds, count = {}, 0.0, 0
    for key, items in sets.items():
        images = [s.render() if st is None else redraw(s, st) for s, st in items]
        got = []
        for k in range(0, len(images), batch):
            t0 = time.perf_counter()
            got += captioner(images[k : k + batch])
            seconds, count = seconds + time.perf_counter() - t0, count + len(images[k : k + batch])
        hits = [caption_matches(g, s.caption())["exact"] for g, (s, _) in zip(got, items)]
        out[key] = float(np.mean(hits))
    out["ms_per_caption"] = 1000 * seconds / count
    return out


# ------------------------------------------------------------------------------ training
def train(
    workdir: Path,
    out: Path | None,
    cfg: CaptionerConfig,
    ckpt_every: int = 250,
    check_n: int = 300,
    progress: bool = True,
) -> VisionEncoderDecoderModel:
    """Train (resuming from ``workdir/state.pt``), export to `out` and print
    :func:`check_captioner` on `check_n` scenes per set (0: no check). Returns the model."""
    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model, processor, tok = build_captioner(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    state_path, step = workdir / "state.pt", 0
    rng = np.random.default_rng(cfg.seed)
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        if state["config"] != asdict(cfg):
            raise ValueError(
                f"{state_path} was written with other settings ({state['config']}); use another "
                "--workdir or the same settings"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, rng = state["step"], state["rng"]
        print(f"resuming from step {step}")

    model.train()
    bar = tqdm(
        range(step, cfg.steps),
        desc="captioner",
        initial=step,
        total=cfg.steps,
        disable=not progress,
    )
    for step in bar:
        pixels, labels = training_batch(cfg, rng, processor, tok)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.steps, cfg.lr, cfg.warmup, min_ratio=0.0)
        # causal decoder: the padding after the end token cannot affect the tokens before it
        mask = torch.ones_like(labels)
        loss = model(pixel_values=pixels, labels=labels, decoder_attention_mask=mask).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % ckpt_every == 0 or step + 1 == cfg.steps:
            tmp = state_path.with_suffix(".tmp")
            torch.save(
                {
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "step": step + 1,
                    "rng": rng,
                    "config": asdict(cfg),
                    "time": time.time(),
                },
                tmp,
            )
            os.replace(tmp, state_path)
    model.eval()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        processor.save_pretrained(out)
        tok.save_pretrained(out)
        print(f"saved to {out}")
    if check_n:
        from nti_utils.caption import Captioner

        checks = check_captioner(Captioner(model, processor, tok, "trained"), check_n)
        print("held-out checks:", checks)
    return model


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--out", type=Path)
    p.add_argument("--steps", type=int, default=CaptionerConfig.steps)
    p.add_argument("--batch", type=int, default=CaptionerConfig.batch)
    p.add_argument("--lr", type=float, default=CaptionerConfig.lr, help="peak AdamW learning rate")
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument(
        "--check-n", type=int, default=300, help="held-out scenes per check set (0: none)"
    )
    a = p.parse_args(argv)
    train(
        a.workdir,
        a.out,
        CaptionerConfig(steps=a.steps, batch=a.batch, lr=a.lr),
        a.ckpt_every,
        a.check_n,
    )


if __name__ == "__main__":
    main()
