"""Scene numbers of the shapes world: which seeds are trained on and which are held out, and for what.

A scene is drawn from its number (:func:`~nti_utils.shapes.world.scene_from_seed`), so a set of
scenes is a range of numbers. Training uses ``0 .. n_train - 1``; everything that measures the model
uses numbers from :data:`HELD_OUT_SEED` on, each purpose its own block, so that no measurement tunes
on another's scenes.
"""

HELD_OUT_SEED = 10_000_000
"""Scenes numbered from here on are never trained on."""

TRAINER_CHECK = HELD_OUT_SEED
"""The trainer's held-out VAE check and the evaluator's VAE round trip (first 200)."""

NOTEBOOKS = HELD_OUT_SEED + 100
"""The notebooks' example scenes (10,000,101 ...)."""

INVERSION_STORY = HELD_OUT_SEED + 1_000
"""The evaluator's DDIM-inversion reconstructions."""

SHAPE_SWAPS = HELD_OUT_SEED + 2_000
"""The evaluator's Prompt-to-Prompt shape swaps."""

TUNING = HELD_OUT_SEED + 3_000
"""Where the per-kind edit recipes are tuned (``tools/tune_recipes.py``)."""

LOCALITY = HELD_OUT_SEED + 4_000
"""The evaluator's VAE latent-locality measure."""

TWO_OBJECTS = HELD_OUT_SEED + 5_000
"""The evaluator's two-object prompts."""

CAPTIONER_CHECK = HELD_OUT_SEED + 6_000
"""The captioner's held-out checks on the world's own renders."""

REDRAWN = HELD_OUT_SEED + 7_000
"""Scenes drawn by the second renderer (:mod:`nti_utils.shapes.redraw`) to check the captioner."""

REDRAWN_EDITS = HELD_OUT_SEED + 8_000
"""Scenes drawn by the second renderer to check the embedded model's edits."""

BENCHMARK_OFFSET = 20_000
"""The benchmark's scene i is ``HELD_OUT_SEED + BENCHMARK_OFFSET + i`` (its ``--seed-offset``)."""

CROSS_CHECK_OFFSET = 30_000
"""A second benchmark block (``--seed-offset 30000``) for checking choices made on the first."""
