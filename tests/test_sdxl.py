"""SDXL: a tiny `StableDiffusionXLPipeline` (two text encoders, pooled embedding and time ids as the
UNet's added conditioning) saved and loaded like a real folder, through the same public functions
as SD: generation against diffusers, inversions, reconstruction, Prompt-to-Prompt, save/load."""

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from nti_utils.attention import AttentionStore
from nti_utils.conditioning import NUM_TIME_IDS, added_cond_layout, pack, unpack
from nti_utils.ddim import DDIMSchedule, invert, sample
from nti_utils.direct_inversion import direct_inversion
from nti_utils.edict import edict_inversion
from nti_utils.editing import edit
from nti_utils.images import image_to_latents
from nti_utils.inversion import (
    ddim_inversion,
    negative_prompt_inversion,
    null_text_inversion,
    reconstruct,
)
from nti_utils.models import (
    embed_prompts,
    embedding_shape,
    is_sdxl,
    load_pipeline,
    model_fingerprint,
    null_embedding,
)
from nti_utils.p2p import Replace
from nti_utils.result import InversionSettings, check_compatible
from nti_utils.sampling import generate
from nti_utils.storage import load_inversion, save_inversion
from nti_utils.testing import SDXL_POOLED_DIM, assert_same_run, tiny_pipeline, tiny_sdxl_pipeline

PROMPT = "a red circle on a white background"
SWAP = "a red square on a white background"
PROMPTS = [PROMPT, "a blue square on a black background"]
STEPS = 6


@pytest.fixture(scope="module")
def sdxl_saved(saved_and_loaded):
    return saved_and_loaded("tiny-sdxl", tiny_sdxl_pipeline)


@pytest.fixture(scope="module")
def sdxl_folder(sdxl_saved):
    return sdxl_saved[0]


@pytest.fixture(scope="module")
def sdxl(sdxl_saved):
    return sdxl_saved[1]


@pytest.fixture(scope="module")
def sdxl_z0(sdxl, small_scene):
    return image_to_latents(sdxl, small_scene.render())


@pytest.fixture(scope="module")
def inverted(sdxl, sdxl_z0):
    settings = InversionSettings(num_steps=STEPS)
    return null_text_inversion(sdxl, sdxl_z0, PROMPT, settings, progress=False)


def _mse(a, b) -> float:
    return (a.float() - b.float()).pow(2).mean().item()


# ------------------------------------------------------------------------------ loading, conditioning
def test_load_pipeline_detects_sdxl(sdxl, sdxl_folder):
    assert isinstance(sdxl, StableDiffusionXLPipeline) and is_sdxl(sdxl)
    assert sdxl.scheduler.config.prediction_type == "epsilon"
    assert not is_sdxl(tiny_pipeline())
    # the folder's text_encoder_2 alone says SDXL, whatever the index's class name
    index = sdxl_folder / "model_index.json"
    text = index.read_text()
    try:
        index.write_text(text.replace('"StableDiffusionXLPipeline"', '"DiffusionPipeline"'))
        again = load_pipeline(sdxl_folder, device="cpu", dtype=torch.float32)
        assert isinstance(again, StableDiffusionXLPipeline)
    finally:
        index.write_text(text)
    # an SDXL folder without its second tokenizer is named as incomplete
    tok2 = sdxl_folder / "tokenizer_2"
    tok2.rename(sdxl_folder / "moved")
    try:
        with pytest.raises(FileNotFoundError, match="tokenizer_2"):
            load_pipeline(sdxl_folder, device="cpu", dtype=torch.float32)
    finally:
        (sdxl_folder / "moved").rename(tok2)


def test_embeddings_are_diffusers_encode_prompt_plus_a_row_token(sdxl):
    ref = sdxl.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
    tokens, null_tokens, pooled, null_pooled = ref
    emb, null = embed_prompts(sdxl, PROMPTS), null_embedding(sdxl)
    L = sdxl.tokenizer.model_max_length
    assert emb.shape == (2, *embedding_shape(sdxl)) and embedding_shape(sdxl)[0] == L + 1
    hidden, added = unpack(sdxl.unet, emb)
    torch.testing.assert_close(hidden, tokens)
    torch.testing.assert_close(added["text_embeds"], pooled)
    size = 32  # latent 16 x VAE factor 2
    assert added["time_ids"].tolist() == [[size, size, 0, 0, size, size]] * 2
    # force_zeros_for_empty_prompt: SDXL base's null embedding is zeros, time ids kept
    assert not null_tokens.any() and not null_pooled.any()
    n_hidden, n_added = unpack(sdxl.unet, null)
    assert not n_hidden.any() and not n_added["text_embeds"].any()
    assert n_added["time_ids"].tolist() == [[size, size, 0, 0, size, size]]
    # the layout is read from the UNet's config
    assert added_cond_layout(sdxl.unet) == SDXL_POOLED_DIM
    assert added_cond_layout(tiny_pipeline().unet) is None
    # the row token is detached: gradients reach the token embeddings only
    leaf = emb.clone().requires_grad_(True)
    h, a = unpack(sdxl.unet, leaf)
    assert h.requires_grad and not a["text_embeds"].requires_grad
    with pytest.raises(ValueError, match="do not fit in one row"):
        pack(torch.zeros(1, 4, 8), torch.zeros(1, 8 - NUM_TIME_IDS + 1), torch.zeros(1, 6))


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_generate_equals_diffusers_sdxl(sdxl, sdxl_folder, guidance):
    ref_pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    ref_pipe.set_progress_bar_config(disable=True)
    ref = ref_pipe(
        PROMPTS,
        num_inference_steps=10,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images
    ours = generate(
        sdxl, PROMPTS, 10, guidance, generator=torch.Generator().manual_seed(0), progress=False
    ).output.latents
    assert (ours - ref).abs().max().item() < 1e-4 * ref.abs().max().item()
    if guidance != 1.0:  # the added conditioning matters: without the pooled part it is off
        cond, null = embed_prompts(sdxl, PROMPTS), null_embedding(sdxl)
        cond[:, -1, :SDXL_POOLED_DIM] = 0
        sched = DDIMSchedule.from_scheduler(sdxl.scheduler, 10)
        z = torch.randn(ours.shape, generator=torch.Generator().manual_seed(0))
        wrong = sample(sdxl.unet, z, cond, sched, guidance, null, progress=False).latents
        assert (wrong - ref).abs().max().item() > 1e-2


# ------------------------------------------------------------------------------ inversion
def test_ddim_inversion_reconstructs_at_guidance_one(sdxl, sdxl_z0):
    cond = embed_prompts(sdxl, PROMPT)
    sched = DDIMSchedule.from_scheduler(sdxl.scheduler, 20)
    traj = invert(sdxl.unet, sdxl_z0, cond, sched, progress=False)
    rec = sample(sdxl.unet, traj[-1], cond, sched, 1.0, progress=False).latents
    err = _mse(rec, sdxl_z0)
    assert err < 5e-3 * sdxl_z0.var().item(), err
    # far closer than the same inversion re-sampled with guidance
    null = null_embedding(sdxl)
    guided = sample(sdxl.unet, traj[-1], cond, sched, 7.5, null, progress=False).latents
    assert err < 0.1 * _mse(guided, sdxl_z0)


def test_null_text_beats_ddim_inversion_at_guidance(sdxl, sdxl_z0, inverted):
    ddim = ddim_inversion(sdxl, sdxl_z0, PROMPT, InversionSettings(num_steps=STEPS), progress=False)
    err_nti = _mse(reconstruct(sdxl, inverted, progress=False), sdxl_z0)
    err_ddim = _mse(reconstruct(sdxl, ddim, progress=False), sdxl_z0)
    assert err_nti < 0.5 * err_ddim, (err_nti, err_ddim)
    assert sum(inverted.inner_steps) > 0
    # ∅_t: the token rows moved, the row token (pooled embedding, time ids) did not
    L = sdxl.tokenizer.model_max_length
    null = null_embedding(sdxl)
    assert inverted.null_embeddings.shape == (STEPS, 1, L + 1, embedding_shape(sdxl)[1])
    assert not torch.equal(inverted.null_embeddings[-1, :, :L], null[:, :L])
    assert torch.equal(inverted.null_embeddings[:, 0, L], null[0, L].expand(STEPS, -1))


def test_the_other_inversions_run_on_sdxl(sdxl, sdxl_z0):
    settings = InversionSettings(num_steps=STEPS)
    ddim = _mse(
        reconstruct(
            sdxl, ddim_inversion(sdxl, sdxl_z0, PROMPT, settings, progress=False), progress=False
        ),
        sdxl_z0,
    )
    for invert_fn, bound in (
        (direct_inversion, 1e-8),  # exact source row by construction
        (edict_inversion, 1e-6),  # exact up to float rounding
        (negative_prompt_inversion, 0.1 * ddim),  # the w = 1 trajectory, no guidance error
    ):
        res = invert_fn(sdxl, sdxl_z0, PROMPT, settings, progress=False)
        err = _mse(reconstruct(sdxl, res, progress=False), sdxl_z0)
        assert err < bound, (invert_fn.__name__, err, ddim)


def test_save_and_load_round_trip(sdxl, inverted, tmp_path):
    back = load_inversion(save_inversion(inverted, tmp_path / "sdxl.safetensors"), sdxl)
    assert torch.equal(back.null_embeddings, inverted.null_embeddings)
    assert torch.equal(back.latent_T, inverted.latent_T)
    assert back.model_fingerprint == model_fingerprint(sdxl)
    assert_same_run(
        reconstruct(sdxl, back, progress=False), reconstruct(sdxl, inverted, progress=False)
    )
    with pytest.raises(ValueError, match="does not match the pipeline"):
        check_compatible(inverted, tiny_pipeline())


# ------------------------------------------------------------------------------ Prompt-to-Prompt
def test_attention_store_reproduces_the_sampler_and_a_word_swap_edits(sdxl, inverted):
    prompts = [PROMPT, SWAP]
    sched = DDIMSchedule.from_scheduler(sdxl.scheduler, STEPS)
    z = inverted.latent_T.expand(2, -1, -1, -1)
    cond = embed_prompts(sdxl, prompts)
    ref = sample(sdxl.unet, z, cond, sched, 7.5, inverted.uncond_per_step(), progress=False)
    store = edit(sdxl, inverted, prompts, AttentionStore(), progress=False)
    assert_same_run(store.latents, ref.latents)
    L = sdxl.tokenizer.model_max_length
    maps = store.controller.maps(8)
    assert maps.shape == (2, 8, 8, L)  # the real token count: the row token is not attended
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 8, 8))
    ctrl = Replace(sdxl.tokenizer, prompts, STEPS, cross_replace_steps=0.8)
    out = edit(sdxl, inverted, prompts, ctrl, progress=False)
    assert len(out.images) == 2
    rec = reconstruct(sdxl, inverted, progress=False)
    assert_same_run(out.latents[:1], rec)  # source kept
    assert (out.latents[1] - out.latents[0]).abs().max().item() > 1e-3  # target changed
    assert (out.latents[1] - store.latents[1]).abs().max().item() > 1e-2  # the control acted
    # the plain ∅ in the target row: SDXL's null conditioning (row token included) at every step
    plain = edit(sdxl, inverted, prompts, progress=False, target_null="plain")
    null = embed_prompts(sdxl, [""])
    alone = sample(sdxl.unet, z[1:], cond[1:], sched, 7.5, null, progress=False)
    assert_same_run(plain.latents[:1], ref.latents[:1])
    assert_same_run(plain.latents[1:], alone.latents)


# ------------------------------------------------------------------------------ half precision
def test_float16_load_keeps_the_vae_float32_and_stays_finite(sdxl_folder, small_scene):
    half = load_pipeline(sdxl_folder, device="cpu", dtype=torch.float16)
    assert half.unet.dtype == torch.float16 and half.text_encoder_2.dtype == torch.float16
    assert half.vae.dtype == torch.float32  # force_upcast
    z0 = image_to_latents(half, small_scene.render())
    assert z0.dtype == torch.float32 and torch.isfinite(z0).all()
    settings = InversionSettings(num_steps=3, inner_steps=2)
    res = null_text_inversion(half, z0, PROMPT, settings, progress=False)
    assert res.null_embeddings.dtype == torch.float16
    assert torch.isfinite(res.null_embeddings.float()).all()
    rec = reconstruct(half, res, progress=False)
    assert rec.dtype == torch.float16 and torch.isfinite(rec.float()).all()
    gen = generate(half, PROMPT, 3, generator=torch.Generator().manual_seed(0), progress=False)
    assert torch.isfinite(gen.output.latents.float()).all() and len(gen.images) == 1
