"""Prompt-to-Prompt: attention hooks, controllers, alignment, edits (tiny SD-architecture pipeline)."""

import pytest
import torch

from nti_utils.align import refine_alignment, replace_mapper, word_token_indices
from nti_utils.attention import (
    AttentionController,
    AttentionStore,
    controlled_attention,
    cross_attention_resolutions,
    default_map_resolution,
    layer_infos,
)
from nti_utils.ddim import DDIMSchedule, sample
from nti_utils.editing import TARGET_NULLS, build_controller, edit
from nti_utils.inversion import ddim_inversion, null_text_inversion
from nti_utils.local_blend import LocalBlend
from nti_utils.models import embed_prompts
from nti_utils.p2p import Refine, Replace, Reweight, equalizer
from nti_utils.result import InversionSettings
from nti_utils.testing import assert_same_run

SRC = "a red circle on a white background"
SWAP = "a red square on a white background"
ADD = "a red circle and a blue square on a white background"
STEPS = 6


@pytest.fixture(scope="module")
def inverted(tiny_pipe, small_scene):
    settings = InversionSettings(num_steps=STEPS, inner_steps=3)
    return null_text_inversion(tiny_pipe, small_scene.render(), SRC, settings, progress=False)


def _plain(pipe, inv, prompts):
    sched = DDIMSchedule.from_scheduler(pipe.scheduler, STEPS)
    z = inv.latent_T.expand(len(prompts), -1, -1, -1)
    cond, nulls = embed_prompts(pipe, prompts), inv.uncond_per_step()
    return sample(pipe.unet, z, cond, sched, 7.5, nulls, progress=False).latents


class RecordEverything(AttentionController):
    """Asks for explicit probabilities everywhere and changes nothing."""

    def wants(self, info):
        return True


def test_controller_that_edits_nothing_reproduces_the_sampler(tiny_pipe, inverted):
    prompts = [SRC, SWAP]
    ref = _plain(tiny_pipe, inverted, prompts)
    out = edit(tiny_pipe, inverted, prompts, progress=False)  # AttentionStore: records only
    assert_same_run(out.latents, ref)
    everything = RecordEverything()
    out2 = edit(tiny_pipe, inverted, prompts, controller=everything, progress=False)
    assert_same_run(out2.latents, ref)
    zero_window = Replace(
        tiny_pipe.tokenizer, prompts, STEPS, cross_replace_steps=0.0, self_replace_steps=0.0
    )
    out3 = edit(tiny_pipe, inverted, prompts, controller=zero_window, progress=False)
    assert_same_run(out3.latents, ref)


def test_store_maps_sum_to_one_at_the_models_resolutions(tiny_pipe, inverted):
    out = edit(tiny_pipe, inverted, [SRC], progress=False)
    store = out.controller
    expected = cross_attention_resolutions(tiny_pipe.unet)
    assert store.resolutions() == [
        (s, s) for s in sorted(set(sum(expected.values(), [])), reverse=True)
    ]
    for side in (16, 8):
        maps = store.maps(side)
        assert maps.shape == (1, side, side, tiny_pipe.tokenizer.model_max_length)
        torch.testing.assert_close(maps.sum(-1), torch.ones(1, side, side))
    assert default_map_resolution(tiny_pipe.unet) == 8
    with pytest.raises(ValueError, match="no cross-attention maps at"):
        store.maps(3)


def test_restoring_processors_leaves_the_model_as_before(tiny_pipe):
    before = dict(tiny_pipe.unet.attn_processors)
    with pytest.raises(RuntimeError, match="boom"):
        with controlled_attention(tiny_pipe.unet, AttentionStore()):
            processors = tiny_pipe.unet.attn_processors.values()
            assert all(type(p).__name__ == "ControlledAttnProcessor" for p in processors)
            raise RuntimeError("boom")
    after = tiny_pipe.unet.attn_processors
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)


def test_word_indices_handle_multi_token_words(tiny_pipe):
    tok = tiny_pipe.tokenizer
    assert word_token_indices(tok, SRC, "circle") == [3]
    assert word_token_indices(tok, SRC, 2) == [3]
    assert word_token_indices(tok, SRC, "a") == [1, 5]
    multi = word_token_indices(tok, "a reddish circle", "reddish")
    assert len(multi) > 1 and multi == list(range(2, 2 + len(multi)))
    assert word_token_indices(tok, "a reddish circle", "circle") == [2 + len(multi)]
    with pytest.raises(ValueError, match="not in prompt"):
        word_token_indices(tok, SRC, "square")


def test_replace_needs_aligned_prompts(tiny_pipe):
    tok = tiny_pipe.tokenizer
    assert torch.equal(replace_mapper(tok, SRC, SWAP), torch.eye(tok.model_max_length))
    with pytest.raises(ValueError, match="use a refinement edit"):
        replace_mapper(tok, SRC, "a reddish circle on a white background")
    with pytest.raises(ValueError, match="use a refinement edit"):
        Replace(tok, [SRC, ADD], STEPS)


def test_refine_alignment_maps_kept_tokens_to_the_source(tiny_pipe):
    tok = tiny_pipe.tokenizer
    al = refine_alignment(tok, SRC, ADD)
    # target: <s> a red circle and a blue square on a white background </s>
    assert al.mapper[:4].tolist() == [0, 1, 2, 3]
    assert al.alphas[4:8].tolist() == [0, 0, 0, 0]  # "and a blue square" is new
    assert al.mapper[8:13].tolist() == [4, 5, 6, 7, 8] and al.alphas[8:13].tolist() == [1] * 5
    same = refine_alignment(tok, SRC, SRC)
    assert torch.equal(same.mapper, torch.arange(tok.model_max_length))


def test_replace_gives_targets_the_source_cross_attention(tiny_pipe, inverted):
    ctrl = Replace(
        tiny_pipe.tokenizer, [SRC, SWAP], STEPS, cross_replace_steps=1.0, self_replace_steps=0.0
    )
    out = edit(tiny_pipe, inverted, [SRC, SWAP], ctrl, progress=False)
    maps = ctrl.maps(16)
    torch.testing.assert_close(maps[1], maps[0])
    ref = _plain(tiny_pipe, inverted, [SRC, SWAP])
    assert (out.latents[1] - ref[1]).abs().max() > 1e-2  # the target changed
    assert_same_run(out.latents[0], ref[0])  # the source did not


def test_reweight_composes_with_refine_and_local_blend(tiny_pipe, inverted):
    tok = tiny_pipe.tokenizer
    prompts = [SRC, ADD]
    blend = LocalBlend([["circle"], ["square"]], tok, prompts, threshold=0.5)
    base = Refine(tok, prompts, STEPS, cross_replace_steps=0.8, local_blend=blend)
    ctrl = Reweight(tok, prompts, STEPS, equalizer(tok, prompts, {"square": 3.0}), base=base)
    out = edit(tiny_pipe, inverted, prompts, ctrl, progress=False)
    assert len(out.images) == 2 and len(blend.masks) == STEPS
    mask = blend.masks[-1]
    assert mask.shape == (2, 1, 16, 16) and mask.any()
    outside = ~mask[1, 0]
    torch.testing.assert_close(out.latents[1][:, outside], out.latents[0][:, outside])
    maps = ctrl.maps(16)
    sq = word_token_indices(tok, ADD, "square")[0]
    assert maps[1, ..., sq].sum() > 0


def test_edit_checks_step_counts(tiny_pipe, inverted):
    with pytest.raises(ValueError, match="built for 10 steps"):
        ctrl = Replace(tiny_pipe.tokenizer, [SRC, SWAP], 10)
        edit(tiny_pipe, inverted, [SRC, SWAP], ctrl, progress=False)


def test_reweight_scales_the_chosen_words_after_the_base_edit(tiny_pipe):
    tok = tiny_pipe.tokenizer
    prompts = [SRC, ADD]
    base = Refine(tok, prompts, STEPS)
    ctrl = Reweight(tok, prompts, STEPS, equalizer(tok, prompts, {"square": 3.0}), base=base)
    g = torch.Generator().manual_seed(0)
    source = torch.rand(2, 64, tok.model_max_length, generator=g).softmax(-1)
    target = torch.rand(1, 2, 64, tok.model_max_length, generator=g).softmax(-1)
    want = base.replace_cross(source, target)
    sq = word_token_indices(tok, ADD, "square")
    want[..., sq] *= 3.0
    torch.testing.assert_close(ctrl.replace_cross(source, target), want)


def _same_controller(a, b) -> None:
    """Two controllers do the same edit: class, windows, mappers, blend and equalizer."""
    assert type(a) is type(b) and a.prompts == b.prompts and a.num_steps == b.num_steps
    assert torch.equal(a.cross_alphas, b.cross_alphas) and a.self_window == b.self_window
    assert a.self_replace_max_side == b.self_replace_max_side
    for name in ("mapper", "token_alphas", "equalizer"):
        if hasattr(a, name):
            assert torch.equal(getattr(a, name), getattr(b, name))
    assert (a.local_blend is None) == (b.local_blend is None)
    if a.local_blend is not None:
        la, lb = a.local_blend, b.local_blend
        assert torch.equal(la.alpha, lb.alpha)
        assert (la.threshold, la.resolution) == (lb.threshold, lb.resolution)
    if isinstance(a, Reweight):
        assert (a.base is None) == (b.base is None)
        if a.base is not None:
            _same_controller(a.base, b.base)


def test_build_controller_builds_what_the_classes_build(tiny_pipe):
    tok = tiny_pipe.tokenizer
    swap, add = [SRC, SWAP], [SRC, ADD]
    _same_controller(build_controller(tok, swap, STEPS), Replace(tok, swap, STEPS))
    built = build_controller(
        tok,
        add,
        STEPS,
        edit="refine",
        cross_replace_steps={"default_": 0.8, "square": (0.0, 0.4)},
        self_replace_steps=(0.1, 0.5),
        self_replace_max_side=16,
    )
    want = Refine(
        tok,
        add,
        STEPS,
        cross_replace_steps={"default_": 0.8, "square": (0.0, 0.4)},
        self_replace_steps=(0.1, 0.5),
        self_replace_max_side=16,
    )
    _same_controller(built, want)
    words = [["circle"], ["square"]]
    built = build_controller(
        tok,
        swap,
        STEPS,
        blend_words=words,
        blend_threshold=0.5,
        blend_resolution=16,
        reweight={"square": 2.0},
    )
    blend = LocalBlend(words, tok, swap, threshold=0.5, resolution=16)
    base = Replace(tok, swap, STEPS)  # the base only maps; the wrapper blends
    eq = equalizer(tok, swap, {"square": 2.0})
    want = Reweight(tok, swap, STEPS, eq, base=base, local_blend=blend)
    _same_controller(built, want)
    assert built.local_blend is not None and built.base.local_blend is None
    # empty blend words and re-weightings add nothing
    _same_controller(
        build_controller(tok, swap, STEPS, blend_words=[], reweight={}), Replace(tok, swap, STEPS)
    )
    with pytest.raises(ValueError, match="`edit` must be one of"):
        build_controller(tok, swap, STEPS, edit="swap")
    with pytest.raises(ValueError, match="use a refinement edit"):
        build_controller(tok, add, STEPS)
    with pytest.raises(ValueError, match="not in prompt"):
        build_controller(tok, swap, STEPS, reweight={"triangle": 2.0})


def test_plain_target_null_changes_only_the_target_rows(tiny_pipe, inverted, small_scene):
    prompts = [SRC, SWAP, "a blue circle on a white background"]
    ref = _plain(tiny_pipe, inverted, prompts)
    out = edit(tiny_pipe, inverted, prompts, progress=False, target_null="plain")
    assert_same_run(out.latents[:1], ref[:1])  # the source row keeps ∅_t and retraces the image
    assert (out.latents[1:] - ref[1:]).abs().amax() > 1e-3  # ∅_t were optimized: they matter
    # written out: the target rows sampled alone from z̄_T with the empty prompt's ∅ at every step
    sched = DDIMSchedule.from_scheduler(tiny_pipe.scheduler, STEPS)
    null = embed_prompts(tiny_pipe, [""])
    z = inverted.latent_T.expand(2, -1, -1, -1)
    alone = sample(
        tiny_pipe.unet, z, embed_prompts(tiny_pipe, prompts[1:]), sched, 7.5, null, progress=False
    ).latents
    assert_same_run(out.latents[1:], alone)
    # an inversion whose ∅_t is the plain ∅ already (DDIM inversion) edits the same either way
    settings = InversionSettings(num_steps=STEPS)
    ddim = ddim_inversion(tiny_pipe, small_scene.render(), SRC, settings, progress=False)
    a, b = (edit(tiny_pipe, ddim, prompts[:2], progress=False, target_null=n) for n in TARGET_NULLS)
    assert_same_run(a.latents, b.latents)
    with pytest.raises(ValueError, match="target_null must be one of"):
        edit(tiny_pipe, inverted, prompts[:2], progress=False, target_null="empty")


def test_edit_refuses_mismatched_or_malformed_arguments(tiny_pipe, inverted):
    tok = tiny_pipe.tokenizer
    with pytest.raises(TypeError, match="got the string 'a red circle"):
        edit(tiny_pipe, inverted, SRC, progress=False)
    with pytest.raises(TypeError, match=r"prompts\[1\] must be a string"):
        edit(tiny_pipe, inverted, [SRC, 3], progress=False)
    ctrl = Replace(tok, [SRC, SWAP], STEPS)
    with pytest.raises(ValueError, match="controller was built for the prompts"):
        edit(tiny_pipe, inverted, [SRC, "a red triangle on a white background"], ctrl)
    other = "a red square on a white background"
    with pytest.raises(ValueError, match="prompts\\[0\\] must be the inversion's source prompt"):
        edit(tiny_pipe, inverted, [other, SRC], Replace(tok, [other, SRC], STEPS))
    out = edit(
        tiny_pipe,
        inverted,
        [other, SRC],
        Replace(tok, [other, SRC], STEPS),
        allow_other_source=True,
        progress=False,
    )
    assert len(out.images) == 2
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="guidance_scale must be a finite number, got"):
            edit(tiny_pipe, inverted, [SRC, SWAP], ctrl, guidance_scale=bad)


def test_controllers_refuse_typos_and_bad_values(tiny_pipe):
    tok = tiny_pipe.tokenizer
    swap, add = [SRC, SWAP], [SRC, ADD]
    with pytest.raises(ValueError, match="cross_replace_steps has a window for 'sqaure'"):
        Replace(tok, swap, STEPS, cross_replace_steps={"default_": 0.8, "sqaure": 0.4})
    # a word of the source only takes part in no target's replacement: a mistake too
    with pytest.raises(ValueError, match="not a word of any target prompt"):
        Replace(tok, swap, STEPS, cross_replace_steps={"circle": 0.4})
    with pytest.raises(TypeError, match="got the string"):
        Replace(tok, SRC, STEPS)
    for t in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="LocalBlend threshold must be a number in"):
            LocalBlend([["circle"], ["square"]], tok, swap, threshold=t)
    blend = LocalBlend([["circle"], ["circle"]], tok, add)
    with pytest.raises(ValueError, match="local_blend was built for the prompts"):
        Replace(tok, swap, STEPS, local_blend=blend)
    for f in (float("nan"), float("inf"), "2"):
        with pytest.raises(ValueError, match="re-weighting factor of 'square' must be a finite"):
            equalizer(tok, add, {"square": f})
    eq = equalizer(tok, add, {"square": 2.0})
    with pytest.raises(ValueError, match=r"equalizer must be a tensor of shape \(1, 16\)"):
        Reweight(tok, add, STEPS, eq[0], base=Refine(tok, add, STEPS))
    with pytest.raises(ValueError, match="equalizer factors must be finite"):
        Reweight(tok, add, STEPS, eq * float("inf"), base=Refine(tok, add, STEPS))
    with pytest.raises(ValueError, match="base was built for"):
        Reweight(tok, add, STEPS, eq, base=Refine(tok, add, STEPS + 1))
    with pytest.raises(ValueError, match="Reweight without a base"):
        Reweight(tok, add, STEPS, eq)


def test_reweight_without_a_base_scales_the_source_maps_as_the_original(tiny_pipe, inverted):
    """google/prompt-to-prompt's AttentionReweight: ``attn_base[None] * equalizer`` (the source's
    maps), not the target's own."""
    tok = tiny_pipe.tokenizer
    prompts = [SRC, SRC]
    eq = equalizer(tok, prompts, {"circle": 2.0})
    ctrl = Reweight(tok, prompts, STEPS, eq, cross_replace_steps=1.0, self_replace_steps=0.0)
    g = torch.Generator().manual_seed(0)
    source = torch.rand(2, 64, tok.model_max_length, generator=g).softmax(-1)
    target = torch.rand(1, 2, 64, tok.model_max_length, generator=g).softmax(-1)
    torch.testing.assert_close(ctrl.replace_cross(source, target), source[None] * eq[:, None, None])
    out = edit(tiny_pipe, inverted, prompts, ctrl, progress=False)
    maps = ctrl.maps(16)  # what was used, averaged: the target's are the source's times eq
    torch.testing.assert_close(maps[1], maps[0] * eq[0])
    ref = _plain(tiny_pipe, inverted, prompts)
    assert (out.latents[1] - ref[1]).abs().max() > 1e-2
    assert_same_run(out.latents[0], ref[0])


def test_reweight_with_a_base_keeps_its_arguments_and_changes_nothing(tiny_pipe):
    tok = tiny_pipe.tokenizer
    prompts = [SRC, ADD]
    blend = LocalBlend([["circle"], ["square"]], tok, prompts)
    base = Refine(tok, prompts, STEPS, cross_replace_steps=0.8, local_blend=blend)
    eq = equalizer(tok, prompts, {"square": 3.0})
    eq_before = eq.clone()
    # not given: the base's windows and blend; the base keeps its own
    ctrl = Reweight(tok, prompts, STEPS, eq, base=base)
    assert ctrl.local_blend is blend and base.local_blend is blend
    assert torch.equal(ctrl.cross_alphas, base.cross_alphas)
    assert ctrl.self_window == base.self_window
    # given: the caller's (as AttentionReweight's own arguments in the original)
    own = LocalBlend([["circle"], ["circle"]], tok, prompts)
    ctrl2 = Reweight(
        tok,
        prompts,
        STEPS,
        eq,
        base=base,
        cross_replace_steps=0.5,
        self_replace_steps=(0.0, 0.2),
        local_blend=own,
    )
    assert ctrl2.local_blend is own and base.local_blend is blend
    assert torch.equal(
        ctrl2.cross_alphas, Refine(tok, prompts, STEPS, cross_replace_steps=0.5).cross_alphas
    )
    assert ctrl2.self_window == (0, int(0.2 * STEPS))
    assert torch.equal(eq, eq_before)
    eq.mul_(0)  # the controller holds its own copy
    assert ctrl2.equalizer.max() == 3.0


def test_fused_self_attention_injection_equals_the_materialized_one(tiny_pipe, inverted):
    tok = tiny_pipe.tokenizer
    prompts = [SRC, SWAP]
    kw = dict(cross_replace_steps=0.5, self_replace_steps=(0.0, 0.7), self_replace_max_side=16)
    handed = []

    class Spy(Replace):
        def __call__(self, probs, info):
            handed.append(info.is_cross)
            return super().__call__(probs, info)

    fused = Spy(tok, prompts, STEPS, **kw)
    explicit = Replace(tok, prompts, STEPS, materialize_self=True, **kw)
    a = edit(tiny_pipe, inverted, prompts, fused, progress=False).latents
    b = edit(tiny_pipe, inverted, prompts, explicit, progress=False).latents
    assert_same_run(a, b)
    none = Replace(tok, prompts, STEPS, cross_replace_steps=0.5, self_replace_steps=0.0)
    c = edit(tiny_pipe, inverted, prompts, none, progress=False).latents
    assert (a[1] - c[1]).abs().max() > 1e-2  # the injection did something
    # fused, only cross-attention probabilities were materialized
    assert handed and all(handed)


def test_layer_infos_know_their_resolution(tiny_pipe):
    store = AttentionStore(max_side=8)
    store.begin(1, (16, 16))
    infos = layer_infos(tiny_pipe.unet).values()
    sides = {(i.place, i.is_cross): set() for i in infos}
    for i in infos:
        sides[(i.place, i.is_cross)].add(store.layer_resolution(i))
    res = cross_attention_resolutions(tiny_pipe.unet)
    for place in ("down", "mid", "up"):
        assert sides.get((place, True), set()) == {(s, s) for s in res[place]}
    # a store with max_side asks only for the layers it keeps
    assert {store.layer_resolution(i) for i in infos if store.wants(i)} == {(8, 8)}
