"""Source prompts from a captioning model.

Null-text inversion needs a prompt P that describes the input image; the paper notes that a
captioning model can write it instead of the user. :func:`caption` does that with the embedded
captioner (``"toy"``, ``data/toy-captioner``, trained on the shapes world by
:mod:`nti_utils.shapes.train_captioner`; see its model card), a local
transformers folder, or a hub id already in the local cache: any image-to-text model that
transformers' `AutoModelForImageTextToText` loads (`VisionEncoderDecoderModel`, BLIP's
`BlipForConditionalGeneration`, GIT's `GitForCausalLM`, ...), called through its own `generate`
(transformers 5 has no ``"image-to-text"`` pipeline task).

Example:

```py
>>> from nti_utils.caption import caption, load_captioner
>>> caption("photo.png")                      # the embedded captioner
['a red circle on a white background']
>>> captioner = load_captioner("toy")          # load once, caption many
>>> captioner(["a.png", "b.png"])
```
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

from nti_utils.images import ImageLike, load_image
from nti_utils.models import folder_contents, no_loading_bars, resolve_device

TOY_CAPTIONER_DIR = Path(
    os.environ.get(
        "NTI_TOY_CAPTIONER", Path(__file__).resolve().parent.parent / "data" / "toy-captioner"
    )
)
"""Folder of the embedded captioner (override with the ``NTI_TOY_CAPTIONER`` environment
variable)."""

MAX_NEW_TOKENS = 40
"""Longest caption generated, in tokens."""


@dataclass
class Captioner:
    """A loaded image-to-text model, ready to caption images.

    Attributes:
        model: the transformers model (``eval()`` mode, on `device`).
        image_processor: turns PIL images into ``pixel_values`` (B, 3, H, W).
        tokenizer: decodes the generated ids.
        name (`str`): ``"toy"``, the folder or the hub id it was loaded from.
    """

    model: torch.nn.Module
    image_processor: object
    tokenizer: object
    name: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def __call__(self, images: ImageLike | Sequence[ImageLike]) -> list[str]:
        """Caption one image or a list of them (PIL images, arrays or paths).

        Returns:
            `list[str]`: one caption per image, greedy decoding, special tokens removed.

        Raises:
            ValueError: an image that cannot be read (as :func:`~nti_utils.images.load_image`), an
                empty list, or a model that produced an empty caption.
        """
        single = isinstance(images, (str, os.PathLike)) or not isinstance(images, Sequence)
        items = [images] if single else list(images)
        if not items:
            raise ValueError("got no images to caption")
        pil = [load_image(im) for im in items]
        pixels = self.image_processor(images=pil, return_tensors="pt").pixel_values
        dtype = next(self.model.parameters()).dtype
        ids = self.model.generate(
            pixel_values=pixels.to(self.device, dtype),
            max_new_tokens=_max_new_tokens(getattr(self.model, "config", None)),
            do_sample=False,
        )
        texts = [
            " ".join(t.split()) for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        ]
        for k, t in enumerate(texts):
            if not t:
                raise ValueError(
                    f"the captioner {self.name!r} produced an empty caption for image {k}; an empty "
                    "source prompt would invert silently with nothing described. Pass the prompt "
                    "yourself, or use another captioner"
                )
        return texts


def _max_new_tokens(config) -> int:
    """:data:`MAX_NEW_TOKENS`, or fewer when the text decoder has fewer positions (a tiny decoder
    that has not learned to stop must not run past its position table)."""
    if config is None:
        return MAX_NEW_TOKENS
    text = getattr(config, "decoder", None) or getattr(config, "text_config", None) or config
    positions = [getattr(text, k, None) for k in ("n_positions", "max_position_embeddings")]
    known = [p for p in positions if isinstance(p, int) and p > 1]
    return min([MAX_NEW_TOKENS] + [p - 1 for p in known])


def _check_folder(path: Path) -> None:
    """Raise a clear error when `path` is not a transformers image-to-text folder."""
    if not path.is_dir():
        raise FileNotFoundError(f"no captioner folder at {path}")
    config = path / "config.json"
    if not config.is_file():
        held = folder_contents(path)
        hint = (
            " (it looks like a diffusers pipeline)" if (path / "model_index.json").exists() else ""
        )
        raise ValueError(
            f"{path} is not a transformers model folder: no config.json ({held}){hint}. A "
            "captioner is an image-to-text model such as BLIP, GIT or a VisionEncoderDecoderModel"
        )
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, UnicodeDecodeError, AttributeError) as err:
        raise ValueError(f"{config} is not a valid JSON config ({err})") from None
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise ValueError(
            f"{path} holds a {model_type!r} model, not an image-to-text model; a captioner must be "
            "one that AutoModelForImageTextToText loads (e.g. 'blip', 'git', "
            "'vision-encoder-decoder')"
        )


def load_captioner(
    captioner: str | os.PathLike = "toy",
    device: torch.device | str | None = None,
    allow_download: bool = False,
) -> Captioner:
    """Load a captioner once, for repeated use.

    Args:
        captioner (`str` or `os.PathLike`, defaults to ``"toy"``): ``"toy"`` (the embedded
            captioner under ``data/``), a local transformers folder, or a hub id in the local
            Hugging Face cache (e.g. ``"Salesforce/blip-image-captioning-base"``).
        device (`torch.device` or `str`, *optional*): defaults to CUDA when available.
        allow_download (`bool`, defaults to `False`): let a hub id be downloaded when it is not
            cached. Off by default: this project runs offline.

    Returns:
        :class:`Captioner`.

    Raises:
        FileNotFoundError: the weights are not on this machine (the message says what to do).
        ValueError: a folder that is not an image-to-text model (naming what was found) or does
            not load.
    """
    if not isinstance(captioner, (str, os.PathLike)) or not str(captioner).strip():
        raise TypeError(
            f"captioner must be 'toy', a folder or a hub id, got {type(captioner).__name__}"
        )
    name = str(captioner)
    if name == "toy":
        if not (TOY_CAPTIONER_DIR / "config.json").is_file():
            raise FileNotFoundError(
                f"The embedded captioner is not here: {TOY_CAPTIONER_DIR}/config.json not found. "
                "Restore data/toy-captioner with git, or train it with "
                "`python -m nti_utils.shapes.train_captioner --workdir /tmp/cap --out "
                "data/toy-captioner`; or point NTI_TOY_CAPTIONER to a trained copy, or pass another "
                "captioner (a transformers image-to-text folder or a cached hub id)."
            )
        source: str | Path = TOY_CAPTIONER_DIR
    elif not isinstance(captioner, str) or Path(name).expanduser().exists():
        source = Path(name).expanduser()
        _check_folder(source)
    else:
        source = name
    try:
        kwargs = {"local_files_only": not allow_download}
        with no_loading_bars():
            model = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
            image_processor = AutoImageProcessor.from_pretrained(source, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as err:
        if isinstance(source, Path):
            raise ValueError(
                f"could not load the captioner folder {source} ({type(err).__name__}: {err}); it "
                "needs a model, an image processor and a tokenizer saved with save_pretrained"
            ) from err
        if not isinstance(err, (OSError, ValueError)):
            raise
        raise FileNotFoundError(
            f"Could not load the captioner {name!r}: it is neither a local folder nor in the local "
            "Hugging Face cache, and downloading is off (this project runs offline). On a machine "
            f"with internet, run `huggingface-cli download {name}` and copy the cache here, pass a "
            "local folder, or call load_captioner(..., allow_download=True) where allowed."
        ) from err
    model = model.to(resolve_device(device)).eval()
    return Captioner(model, image_processor, tokenizer, name)


def caption(
    images: ImageLike | Sequence[ImageLike],
    captioner: str | os.PathLike | Captioner = "toy",
    device: torch.device | str | None = None,
) -> list[str]:
    """Caption one image or a list: ``load_captioner(captioner, device)(images)``.

    Args:
        images: a PIL image, array or path, or a list of them.
        captioner (`str`, `os.PathLike` or :class:`Captioner`, defaults to ``"toy"``): what to
            load (see :func:`load_captioner`), or a captioner already loaded.
        device (`torch.device` or `str`, *optional*): where to load it.

    Returns:
        `list[str]`: one caption per image.
    """
    if not isinstance(captioner, Captioner):
        captioner = load_captioner(captioner, device)
    return captioner(images)


def source_prompt(
    image: object,
    prompt: str | None,
    captioner: str | os.PathLike | Captioner = "toy",
    device: torch.device | str | None = None,
) -> tuple[str, str]:
    """The source prompt of an inversion and where it came from: ``(prompt, "user")`` when one is
    given, else the image's caption and ``"captioner:<name>"``.

    Raises:
        ValueError: no prompt and `image` is a latent tensor (a caption needs the picture).
    """
    if prompt is not None:
        return prompt, "user"
    if isinstance(image, torch.Tensor):
        raise ValueError(
            "prompt=None asks for the image to be captioned, but got latents (a tensor); pass the "
            "image itself, or the prompt"
        )
    if not isinstance(captioner, Captioner):
        captioner = load_captioner(captioner, device)
    return captioner(image)[0], f"captioner:{captioner.name}"
