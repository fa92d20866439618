"""Train the embedded model: a miniature Stable Diffusion on the colored-shapes world.

Run ``python -m nti_utils.shapes.train --workdir ~/.cache/nti-lab/train --out data/toy-sd``.
Three phases, each resumable from ``<workdir>/state.pt`` (written atomically every
``--ckpt-every`` steps; rerun the same command after an interruption). ``--init-from data/toy-sd``
continues training from an exported model (its VAE kept, a fresh UNet schedule) when the
checkpoint is gone:

1. **VAE** (`AutoencoderKL`, 64x64x3 -> 16x16x4): reconstruction MSE + L1 with a tiny KL term.
2. **Latent cache**: encode every training render once (posterior mean), set the VAE's
   ``scaling_factor`` to 1 / std of the latents so the UNet sees unit-variance latents, as in SD.
3. **UNet + text encoder** jointly: epsilon prediction with SD's noise schedule, min-SNR loss
   weighting (Hang et al. 2023, gamma = 5), ~10% captions dropped to "" so that classifier-free
   guidance works, AdamW with warm-up and cosine decay, EMA weights (exported). With
   ``--attn-weight`` > 0 a cross-attention supervision term from the renderer's masks is added
   (:mod:`nti_utils.shapes.attn_loss`): without it the maps stay near-uniform.

The committed model took two runs (see its model card): this recipe from scratch with the defaults,
then ``--init-from`` that model with ``--unet-steps 1500 --unet-lr 3e-4 --warmup 100
--attn-weight 0.02``.

The result is saved as a standard diffusers `StableDiffusionPipeline` folder (safetensors).

The model's sizes and builders live in :mod:`nti_utils.shapes.model` (the default
:data:`~nti_utils.shapes.model.EMBEDDED`; ``--tiny``: :data:`~nti_utils.shapes.model.TINY_TRAINER`),
the held-out scene numbers in :mod:`nti_utils.shapes.seeds` (the VAE check renders
:data:`~nti_utils.shapes.seeds.TRAINER_CHECK` on); this module holds the training recipe.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPTextModel

from nti_utils.attention import AttentionStore, controlled_attention, default_map_resolution
from nti_utils.models import sd_ddim_scheduler
from nti_utils.sampling import generate
from nti_utils.shapes import seeds
from nti_utils.shapes.attn_loss import AttentionSupervision, build_targets, shape_attention_inside
from nti_utils.shapes.data import (
    corrupt_caption,
    render_dataset,
    single_object_prompts,
    to_tensor,
    vae_psnr,
)
from nti_utils.shapes.model import (
    EMBEDDED,
    TINY_TRAINER,
    ModelConfig,
    assemble_pipeline,
    build_models,
)
from nti_utils.shapes.score import score_caption
from nti_utils.shapes.tokenizer import build_tokenizer


@dataclass(frozen=True)
class TrainConfig:
    """Optimization settings (defaults: the run that produced the committed weights)."""

    n_train: int = 20_000
    n_held_out: int = 200
    p_two: float = 0.3
    vae_steps: int = 2500
    vae_batch: int = 16
    vae_lr: float = 1e-3
    kl_weight: float = 1e-7
    unet_steps: int = 3000
    unet_batch: int = 64
    unet_lr: float = 6e-4
    warmup: int = 250
    min_lr_ratio: float = 0.05
    ema_decay: float = 0.999
    snr_gamma: float = 5.0
    p_uncond: float = 0.1
    p_wrong: float = 0.0
    p_wrong_shape: float | None = None  # None: shape words use p_wrong too
    p_wrong_background: float | None = None  # None: background words use p_wrong too
    attn_weight: float = 0.0
    sample_every: int = 500
    eval_steps: int = 25  # DDIM steps of the adherence check every sample_every steps
    ckpt_every: int = 100
    seed: int = 0


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up then cosine decay to ``min_ratio * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


class Trainer:
    """Holds models, data and optimizer state of a resumable training run."""

    def __init__(
        self, workdir: Path, mcfg: ModelConfig, tcfg: TrainConfig, init_from: Path | None = None
    ) -> None:
        self.workdir, self.mcfg, self.tcfg = workdir, mcfg, tcfg
        workdir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(tcfg.seed)
        self.tokenizer = build_tokenizer(mcfg.max_tokens)
        self.vae, self.text_encoder, self.unet = build_models(mcfg, self.tokenizer)
        self.scheduler = sd_ddim_scheduler()
        self.phase, self.step = "vae", 0
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=tcfg.vae_lr, weight_decay=0.0)
        params = [*self.unet.parameters(), *self.text_encoder.parameters()]
        self.opt = torch.optim.AdamW(params, lr=tcfg.unet_lr, weight_decay=0.01)
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
        self.ema_text = copy.deepcopy(self.text_encoder).requires_grad_(False)
        self.latents: torch.Tensor | None = None
        self.fixed_scale = False  # True when continuing from an exported model
        self.log: list[dict] = []
        data = workdir / "data.npz"
        if data.exists():
            z = np.load(data, allow_pickle=False)
            self.images, self.captions = z["images"], list(z["captions"])
        else:
            self.images, self.captions = render_dataset(range(tcfg.n_train), tcfg.p_two)
            np.savez(data, images=self.images, captions=np.array(self.captions))
        self.attn_tokens = self.attn_regions = None
        if tcfg.attn_weight > 0:
            self._load_attention_targets()
        held_out = range(seeds.TRAINER_CHECK, seeds.TRAINER_CHECK + tcfg.n_held_out)
        self.held_out, _ = render_dataset(held_out, tcfg.p_two)
        self.rng = np.random.default_rng(tcfg.seed)
        if not self._state_path().exists() and init_from is not None:
            self._init_from(init_from)
        self._resume()

    def _init_from(self, folder: Path) -> None:
        """Start from an exported pipeline: keep its VAE (so latents keep their meaning), continue
        the UNet and text encoder from its (EMA) weights with a fresh optimizer and schedule."""
        pipe = StableDiffusionPipeline.from_pretrained(folder)
        for name in ("vae", "text_encoder", "unet"):
            getattr(self, name).load_state_dict(getattr(pipe, name).state_dict())
        self.ema_unet.load_state_dict(pipe.unet.state_dict())
        self.ema_text.load_state_dict(pipe.text_encoder.state_dict())
        self.vae.register_to_config(scaling_factor=pipe.vae.config.scaling_factor)
        self.fixed_scale = True
        self.phase, self.step = "cache", 0
        print(f"initialized from {folder}: VAE kept, UNet phase continues from its weights")

    def _load_attention_targets(self) -> None:
        """Token positions and mask regions of every training caption (cached in the workdir)."""
        path = self.workdir / "attn_targets.npz"
        if path.exists():
            z = np.load(path, allow_pickle=False)
            tokens, regions = z["tokens"], z["regions"]
        else:
            n_objects = [c.count(" and ") + 1 for c in self.captions]
            tokens, regions = build_targets(
                range(len(self.captions)), n_objects, self.tokenizer, self.mcfg.latent_size
            )
            np.savez(path, tokens=tokens, regions=regions)
        self.attn_tokens = torch.from_numpy(tokens)
        self.attn_regions = torch.from_numpy(regions)

    # ------------------------------------------------------------------------- checkpoints
    def _state_path(self) -> Path:
        return self.workdir / "state.pt"

    def _resume(self) -> None:
        path = self._state_path()
        if not path.exists():
            return
        st = torch.load(path, weights_only=False)
        for name in ("vae", "text_encoder", "unet", "ema_unet", "ema_text", "vae_opt", "opt"):
            getattr(self, name).load_state_dict(st[name])
        self.phase, self.step, self.log = st["phase"], st["step"], st["log"]
        self.latents = st["latents"]
        self.vae.register_to_config(scaling_factor=st["scaling_factor"])
        self.rng.bit_generator.state = st["rng"]
        torch.set_rng_state(st["torch_rng"])
        print(f"resumed at phase {self.phase}, step {self.step}")

    def save(self) -> None:
        st = {
            name: getattr(self, name).state_dict()
            for name in ("vae", "text_encoder", "unet", "ema_unet", "ema_text", "vae_opt", "opt")
        }
        st.update(
            phase=self.phase,
            step=self.step,
            log=self.log,
            latents=self.latents,
            scaling_factor=self.vae.config.scaling_factor,
            rng=self.rng.bit_generator.state,
            torch_rng=torch.get_rng_state(),
            model_config=asdict(self.mcfg),
            train_config=asdict(self.tcfg),
        )
        tmp = self._state_path().with_suffix(".tmp")
        torch.save(st, tmp)
        os.replace(tmp, self._state_path())

    def _record(self, **row: object) -> None:
        row = {"phase": self.phase, "step": self.step, "time": time.time(), **row}
        self.log.append(row)
        with open(self.workdir / "log.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    # ------------------------------------------------------------------------- phase 1
    def train_vae(self) -> None:
        t = self.tcfg
        self.vae.train()
        bar = tqdm(total=t.vae_steps, initial=self.step, desc="VAE")
        while self.step < t.vae_steps:
            for g in self.vae_opt.param_groups:
                g["lr"] = lr_at(self.step, t.vae_steps, t.vae_lr, 100, 0.02)
            idx = self.rng.integers(0, len(self.images), t.vae_batch)
            x = to_tensor(self.images[idx])
            post = self.vae.encode(x).latent_dist
            y = self.vae.decode(post.sample()).sample
            rec = F.mse_loss(y, x) + 0.5 * F.l1_loss(y, x)
            loss = rec + t.kl_weight * post.kl().mean()
            self.vae_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.vae.parameters(), 1.0)
            self.vae_opt.step()
            self.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{rec.item():.4f}")
            if self.step % 50 == 0:
                self._record(loss=rec.item())
            if self.step % t.ckpt_every == 0 or self.step == t.vae_steps:
                self.save()
            if self.step % (5 * t.sample_every) == 0 or self.step == t.vae_steps:
                self.vae.eval()
                psnr = vae_psnr(self.vae, self.held_out)
                self.vae.train()
                self._record(held_out_psnr=psnr)
                bar.write(f"VAE step {self.step}: held-out PSNR {psnr:.2f} dB")
        bar.close()
        self.vae.eval()
        self.phase, self.step = "cache", 0
        self.save()

    # ------------------------------------------------------------------------- phase 2
    def cache_latents(self) -> None:
        self.vae.eval().requires_grad_(False)
        out = []
        with torch.no_grad():
            for i in tqdm(range(0, len(self.images), 250), desc="encode"):
                out.append(self.vae.encode(to_tensor(self.images[i : i + 250])).latent_dist.mean)
        z = torch.cat(out)
        scale = self.vae.config.scaling_factor if self.fixed_scale else float(1.0 / z.std())
        self.vae.register_to_config(scaling_factor=scale)
        self.latents = z * scale
        self._record(latent_std=float(z.std()), scaling_factor=scale)
        print(f"latent std {float(z.std()):.3f} -> scaling factor {scale:.4f}")
        self.phase, self.step = "unet", 0
        self.save()

    # ------------------------------------------------------------------------- phase 3
    def _embed(self, encoder: CLIPTextModel, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.mcfg.max_tokens,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return encoder(ids)[0]

    def train_unet(self) -> None:
        t = self.tcfg
        self.vae.requires_grad_(False)
        self.unet.train()
        self.text_encoder.train()
        alphas = self.scheduler.alphas_cumprod
        snr = alphas / (1 - alphas)
        params = [*self.unet.parameters(), *self.text_encoder.parameters()]
        ema_params = [*self.ema_unet.parameters(), *self.ema_text.parameters()]
        supervise = t.attn_weight > 0  # cross-attention supervision (see shapes.attn_loss)
        ctx = controlled_attention(self.unet, AttentionSupervision()) if supervise else None
        bar = tqdm(total=t.unet_steps, initial=self.step, desc="UNet")
        with ctx or contextlib.nullcontext() as sup:
            while self.step < t.unet_steps:
                for g in self.opt.param_groups:
                    g["lr"] = lr_at(self.step, t.unet_steps, t.unet_lr, t.warmup, t.min_lr_ratio)
                idx = self.rng.integers(0, len(self.latents), t.unet_batch)
                drop = self.rng.random(t.unet_batch) < t.p_uncond
                caps = [
                    ""
                    if d
                    else corrupt_caption(
                        self.captions[i], t.p_wrong, self.rng, t.p_wrong_shape, t.p_wrong_background
                    )
                    for i, d in zip(idx, drop)
                ]
                z0 = self.latents[idx]
                noise = torch.randn_like(z0)
                ts = torch.randint(0, self.scheduler.config.num_train_timesteps, (t.unet_batch,))
                zt = self.scheduler.add_noise(z0, noise, ts)
                if sup is not None:
                    sup.begin(t.unet_batch, tuple(z0.shape[-2:]))
                pred = self.unet(zt, ts, self._embed(self.text_encoder, caps)).sample
                # min-SNR-gamma weighting for epsilon prediction: w = min(SNR, gamma) / SNR
                w = torch.clamp(snr[ts], max=t.snr_gamma) / snr[ts]
                eps_loss = (w * (pred - noise).pow(2).flatten(1).mean(1)).mean()
                loss, stats = eps_loss, {}
                if sup is not None:
                    tokens = self.attn_tokens[idx].clone()
                    tokens[torch.from_numpy(drop)] = -1  # captions dropped to "" name nothing
                    attn_loss, stats = sup.loss(tokens, self.attn_regions[idx])
                    loss = eps_loss + t.attn_weight * attn_loss
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                self.opt.step()
                decay = min(t.ema_decay, (1 + self.step) / (10 + self.step))
                with torch.no_grad():
                    torch._foreach_lerp_(ema_params, params, 1 - decay)
                self.step += 1
                bar.update(1)
                bar.set_postfix(
                    loss=f"{eps_loss.item():.4f}", **{k: f"{v:.3f}" for k, v in stats.items()}
                )
                if self.step % 25 == 0:
                    self._record(loss=eps_loss.item(), **stats)
                if self.step % t.ckpt_every == 0 or self.step == t.unet_steps:
                    self.save()
                if self.step % t.sample_every == 0 or self.step == t.unet_steps:
                    self.quick_eval(bar)
        bar.close()
        self.phase = "done"
        self.save()

    def pipeline(self, ema: bool = True) -> StableDiffusionPipeline:
        """The current weights (EMA by default) as a `StableDiffusionPipeline`."""
        return assemble_pipeline(
            self.vae,
            self.ema_text if ema else self.text_encoder,
            self.tokenizer,
            self.ema_unet if ema else self.unet,
        )

    def quick_eval(self, bar: tqdm, guidances: tuple[float, ...] = (1.0, 7.5)) -> None:
        """Sample the 45 single-object prompts (``eval_steps`` DDIM steps) at each guidance scale, score them
        (background, color, shape, all right) and, at the last scale, the shape word's
        cross-attention mass inside the object (at the resolution P2P reads); save that grid."""
        pipe = self.pipeline()
        prompts = single_object_prompts()
        for guidance in guidances:
            store = AttentionStore()
            with torch.no_grad():
                out = generate(
                    pipe,
                    prompts,
                    self.tcfg.eval_steps,
                    guidance,
                    torch.Generator().manual_seed(0),
                    controller=store,
                    progress=False,
                )
            images = out.images
            maps = store.maps(default_map_resolution(pipe.unet))
            scores = [score_caption(im, p) for im, p in zip(images, prompts)]
            inside = [
                shape_attention_inside(maps[j], pipe.tokenizer, p, im)
                for j, (im, p) in enumerate(zip(images, prompts))
            ]
            inside = [v for v in inside if v is not None]
            row = {
                "background": float(np.mean([s.background for s in scores])),
                "color": float(np.mean([s.colors[0] for s in scores])),
                "shape": float(np.mean([s.shapes[0] for s in scores])),
                "all": float(np.mean([s.all for s in scores])),
                "attention_inside": float(np.mean(inside)) if inside else float("nan"),
            }
            self._record(eval=row, guidance=guidance)
            bar.write(f"UNet step {self.step}, w = {guidance}: adherence {row}")
        grid = np.stack([np.asarray(im) for im in images]).reshape(5, 9, 64, 64, 3)
        grid = grid.transpose(0, 2, 1, 3, 4).reshape(5 * 64, 9 * 64, 3)
        (self.workdir / "samples").mkdir(exist_ok=True)
        Image.fromarray(grid).save(self.workdir / "samples" / f"step_{self.step:06d}.png")

    def export(self, out: Path) -> None:
        """Save the EMA pipeline as a diffusers folder (safetensors) at `out`."""
        pipe = self.pipeline()
        pipe.save_pretrained(out, safe_serialization=True)
        print(f"saved pipeline to {out}")

    def run(self) -> None:
        """Run the phases not done yet. A finished run asked for more UNet steps continues training
        (the cosine schedule is stretched to the new total, so the learning rate rises again)."""
        if self.phase == "done" and self.step < self.tcfg.unet_steps:
            self.phase = "unet"
        if self.phase == "vae":
            self.train_vae()
        if self.phase == "cache":
            self.cache_latents()
        if self.phase == "unet":
            self.train_unet()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("~/.cache/nti-lab/train").expanduser())
    p.add_argument("--out", type=Path, default=None, help="export the pipeline folder here")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    defaults = TrainConfig()
    cli_fields = (
        "n_train",
        "n_held_out",
        "vae_steps",
        "unet_steps",
        "vae_batch",
        "unet_batch",
        "sample_every",
        "eval_steps",
        "ckpt_every",
        "unet_lr",
        "warmup",
        "attn_weight",
        "p_wrong",
        "ema_decay",
        "min_lr_ratio",
    )
    for field in cli_fields:
        value = getattr(defaults, field)
        p.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    shape_help = "probability of a wrong shape word (default: --p-wrong)"
    p.add_argument("--p-wrong-shape", type=float, default=None, help=shape_help)
    bg_help = "probability of a wrong background word (default: --p-wrong)"
    p.add_argument("--p-wrong-background", type=float, default=None, help=bg_help)
    p.add_argument(
        "--tiny",
        action="store_true",
        help="the tiny model sizes of nti_utils.shapes.model.TINY_TRAINER (tests of the trainer)",
    )
    init_help = (
        "continue from an exported pipeline folder (e.g. data/toy-sd) instead of training from "
        "scratch: its VAE is kept, the UNet phase restarts"
    )
    p.add_argument("--init-from", type=Path, default=None, help=init_help)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tcfg = TrainConfig(
        **{k: getattr(args, k) for k in cli_fields},
        p_wrong_shape=args.p_wrong_shape,
        p_wrong_background=args.p_wrong_background,
    )
    mcfg = TINY_TRAINER if args.tiny else EMBEDDED
    trainer = Trainer(args.workdir, mcfg, tcfg, init_from=args.init_from)
    trainer.run()
    if args.out is not None:
        trainer.export(args.out)


if __name__ == "__main__":
    main()
