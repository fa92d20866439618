"""nti_utils: Null-text Inversion and Prompt-to-Prompt on Stable Diffusion, as a small library.

Import what you need from its modules (nothing heavy is imported here, so ``import nti_utils`` is
instant)::

    from nti_utils.models import load_pipeline
    from nti_utils.inversion import null_text_inversion, reconstruct
"""

__version__ = "0.1.0"
