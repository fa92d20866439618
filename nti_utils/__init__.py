"""nti_utils: Null-text Inversion and Prompt-to-Prompt on Stable Diffusion, as a small library.

Import what you need from its modules (nothing heavy is imported here, so ``import nti_utils`` is
instant)::

    from nti_utils.models import load_pipeline
    from nti_utils.inversion import null_text_inversion, reconstruct
"""

__version__ = "0.1.0"


def _quiet_pil_backend_notice() -> None:
    """transformers 5 warns, at import, that its image processors fall back to their PIL backend
    without torchvision. The library deliberately uses that backend (it needs no image processor of
    diffusers' pipelines, and its captioners' processors are PIL ones), so the notice, which
    otherwise appears in every notebook, is dropped; every other transformers message stays."""
    import logging

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "requires torchvision" not in record.getMessage()

    logging.getLogger("transformers.utils.import_utils").addFilter(_Drop())


_quiet_pil_backend_notice()
