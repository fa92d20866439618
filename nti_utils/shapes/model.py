"""The miniature Stable Diffusion's architecture: its sizes (:class:`ModelConfig`) and builders.

The same classes as Stable Diffusion (`AutoencoderKL`, `CLIPTextModel` + `CLIPTokenizer`,
`UNet2DConditionModel`, DDIM), randomly initialized from a config, no download. Three named
configs:

* :data:`EMBEDDED` (``ModelConfig()``): the committed embedded model (``data/toy-sd``), trained by
  :mod:`nti_utils.shapes.train`;
* :data:`TINY_TRAINER`: the trainer's ``--tiny`` sizes (tests of the trainer);
* :data:`TINY_TEST`: the test suite's random-weight pipeline (:func:`nti_utils.testing.tiny_pipeline`).

The builders draw the initial weights from torch's global RNG, so the order in which they are called
matters for reproducing a model.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from nti_utils.models import sd_ddim_scheduler


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the miniature SD (defaults: the committed embedded model, :data:`EMBEDDED`)."""

    resolution: int = 64
    """Image side; also the VAE's ``sample_size``."""
    vae_channels: tuple[int, ...] = (32, 64, 64)
    """The VAE's ``block_out_channels``: n blocks downsample n - 1 times (64 -> 16)."""
    vae_norm_groups: int = 32
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (64, 128, 128)
    unet_down: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    unet_up: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    unet_attention_head_dim: int = 8
    unet_norm_groups: int = 32
    unet_sample_size: int | None = None
    """The UNet's ``sample_size`` config entry; None: :attr:`latent_size`."""
    text_hidden: int = 128
    """The text encoder's width, also the UNet's ``cross_attention_dim``."""
    text_intermediate: int | None = None
    """The text encoder's MLP width; None: ``4 * text_hidden``."""
    text_layers: int = 2
    text_heads: int = 4
    text_projection_dim: int | None = None
    """``projection_dim`` of the text config (`CLIPTextModel` has no projection layer, so it is only
    recorded); None: ``text_hidden``."""
    max_tokens: int = 20
    """The tokenizer's padded length, also the text encoder's position embeddings."""

    @property
    def latent_size(self) -> int:
        """Side of the VAE's latents: ``resolution / 2 ** (len(vae_channels) - 1)``."""
        return self.resolution // 2 ** (len(self.vae_channels) - 1)


EMBEDDED = ModelConfig()
"""The committed embedded model (``data/toy-sd``): 64x64 images, 16x16x4 latents, 20 tokens."""

TINY_TRAINER = ModelConfig(
    vae_channels=(32, 32, 32),
    unet_channels=(32, 32, 32),
    text_hidden=32,
    text_layers=1,
    text_heads=2,
)
"""The trainer's ``--tiny`` sizes: the embedded model's layout, narrow, for tests of the trainer."""

TINY_TEST = ModelConfig(
    resolution=32,
    vae_channels=(16, 32),
    vae_norm_groups=16,
    unet_channels=(32, 64),
    unet_down=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    unet_up=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    unet_attention_head_dim=4,
    unet_norm_groups=16,
    text_hidden=32,
    text_intermediate=64,
    text_layers=2,
    text_heads=4,
    text_projection_dim=512,  # CLIPTextConfig's default
    max_tokens=16,
)
"""The test suite's pipeline (:func:`nti_utils.testing.tiny_pipeline`): cross-attention at two
resolutions, sizes unlike SD's and the embedded model's (16 tokens, 32-dim text, 32x32 images,
16x16 latents)."""


def build_vae(cfg: ModelConfig) -> AutoencoderKL:
    """A randomly initialized `AutoencoderKL` of the given sizes."""
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.vae_norm_groups,
        sample_size=cfg.resolution,
    )


def build_text_encoder(cfg: ModelConfig, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A randomly initialized `CLIPTextModel` of the given sizes over `tokenizer`'s vocabulary."""
    hidden = cfg.text_hidden
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=cfg.text_intermediate or 4 * hidden,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_tokens,
        projection_dim=cfg.text_projection_dim or hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_unet(cfg: ModelConfig, **options) -> UNet2DConditionModel:
    """A randomly initialized `UNet2DConditionModel` of the given sizes; `options` are further
    `UNet2DConditionModel` arguments, or replace those the config sets (e.g. SD 2.x's
    ``use_linear_projection=True``)."""
    kwargs = dict(
        sample_size=cfg.unet_sample_size or cfg.latent_size,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        down_block_types=cfg.unet_down,
        up_block_types=cfg.unet_up,
        block_out_channels=cfg.unet_channels,
        layers_per_block=1,
        cross_attention_dim=cfg.text_hidden,
        attention_head_dim=cfg.unet_attention_head_dim,
        norm_num_groups=cfg.unet_norm_groups,
    )
    return UNet2DConditionModel(**(kwargs | options))


def build_models(
    cfg: ModelConfig, tokenizer: CLIPTokenizer
) -> tuple[AutoencoderKL, CLIPTextModel, UNet2DConditionModel]:
    """Randomly initialized VAE, text encoder and UNet of the given sizes, built in that order."""
    vae = build_vae(cfg)
    text_encoder = build_text_encoder(cfg, tokenizer)
    unet = build_unet(cfg)
    return vae, text_encoder, unet


def assemble_pipeline(
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
) -> StableDiffusionPipeline:
    """The parts as a `StableDiffusionPipeline` with SD's DDIM scheduler and no safety checker.

    The modules are used as given (not copied, their train/eval mode kept).
    """
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sd_ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
