"""Cross-attention supervision used to train the embedded model (nti_utils.shapes.attn_loss)."""

import numpy as np
import torch

from nti_utils.align import word_token_indices
from nti_utils.attention import LayerInfo
from nti_utils.shapes.attn_loss import AttentionSupervision, attention_mass_inside, scene_targets
from nti_utils.shapes.tokenizer import build_tokenizer
from nti_utils.shapes.world import Scene, Shape

CROSS = LayerInfo("down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor", "down", True)


def two_object_scene() -> Scene:
    objects = (Shape("circle", "red", 16.0, 16.0, 10.0), Shape("square", "red", 46.0, 44.0, 9.0))
    return Scene(objects, "gray")


def test_scene_targets_name_the_right_tokens_and_regions():
    tok = build_tokenizer(20)
    scene = two_object_scene()
    caption = scene.caption()  # "a red circle and a red square on a gray background"
    tokens, regions = scene_targets(scene, tok, 16)
    red = word_token_indices(tok, caption, "red")  # both occurrences, in order
    assert tokens.tolist() == [
        red[0],
        word_token_indices(tok, caption, "circle")[0],
        red[1],
        word_token_indices(tok, caption, "square")[0],
        word_token_indices(tok, caption, "gray")[0],
    ]
    masks = scene.masks()
    assert regions.shape == (5, 16, 16)
    for slot, obj in ((0, 0), (1, 0), (2, 1), (3, 1)):
        assert np.isclose(regions[slot].mean(), masks[obj].mean(), atol=1e-6)
    # the two objects are apart: circle's region is top left, square's bottom right
    assert regions[1][:8, :8].sum() > 0 and regions[1][8:, 8:].sum() == 0
    assert regions[3][8:, 8:].sum() > 0 and regions[3][:8, :8].sum() == 0
    np.testing.assert_allclose(regions[4], 1 - regions[1] - regions[3], atol=1e-6)

    one = Scene((scene.objects[0],), "white")
    tokens1, regions1 = scene_targets(one, tok, 16)
    assert tokens1[2] == tokens1[3] == -1 and not regions1[2:4].any()


def test_supervision_loss_is_zero_when_attention_sits_in_the_region():
    sup = AttentionSupervision()
    sup.begin(2, (4, 4))
    regions = torch.zeros(2, 1, 4, 4)
    regions[:, 0, :2, :2] = 1.0  # top-left quarter
    tokens = torch.tensor([[1], [1]])
    inside = torch.zeros(2, 2, 16, 3)  # (B, heads, Q, K): each query's distribution over tokens
    inside[..., 0] = 1.0
    inside[:, :, [0, 1, 4, 5]] = torch.tensor([0.0, 1.0, 0.0])  # token 1 only inside the quarter
    sup(inside, CROSS)
    loss, stats = sup.loss(tokens, regions)
    assert loss.item() < 1e-4 and stats["mass"] > 0.9999 and stats["pixel_mass"] > 0.9999
    # uniform attention over 3 tokens: a quarter of the word's mass is inside (token side 0.75)
    # and the quarter's pixels give the word a third of their attention (pixel side 2/3)
    sup.begin(2, (4, 4))
    probs = torch.full((2, 2, 16, 3), 1 / 3, requires_grad=True)
    sup(probs, CROSS)
    loss, _ = sup.loss(tokens, regions)
    assert abs(loss.item() - (0.75 + 2 / 3)) < 1e-6
    loss.backward()
    assert probs.grad is not None and probs.grad.abs().sum() > 0
    # slots marked -1 (dropped captions, absent objects) are skipped
    sup.begin(2, (4, 4))
    sup(probs, CROSS)
    loss, _ = sup.loss(torch.tensor([[1], [-1]]), regions)
    assert abs(loss.item() - (0.75 + 2 / 3)) < 1e-6


def test_attention_mass_inside_measures_share_in_mask():
    maps = torch.full((8, 8, 3), 1 / 3)
    mask = np.zeros((64, 64), dtype=bool)
    mask[:32] = True
    assert abs(attention_mass_inside(maps, [1], mask) - 0.5) < 1e-6
    maps = torch.zeros(8, 8, 3)
    maps[:2, :, 2] = 1.0
    assert attention_mass_inside(maps, [2], mask) > 0.99
