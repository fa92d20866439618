"""Invert and edit many images, on one or many processes/GPUs, resumable: ``python -m nti_utils.batch``.

Input: a folder of images and a manifest, JSONL (one object per line, wrapped here) or CSV (same fields as
columns, ``targets`` separated by ``|``, `blend_words`/`reweight`/window values as JSON)::

    {"id": "c1", "image": "c1.png", "source": "a red circle on a white background",
     "targets": ["a red square on a white background"], "edit": "replace",
     "cross_replace_steps": 0.8, "self_replace_steps": 0.4,
     "blend_words": [["circle"], ["square"]], "reweight": {"square": 2.0}}

Manifests are UTF-8 (a byte-order mark, as Excel's "CSV UTF-8" writes, is fine); other encodings
are refused with what they look like. Every field is checked for its type and range and a bad entry
(unknown field, wrong type, missing image, prompt the tokenizer cannot represent, ...) goes to
``errors.jsonl`` with the reason, the others run. `image` paths must lie inside the images folder
(``--images``, by default the manifest's): ``../x.png`` or absolute paths are bad entries unless
``--allow-outside-images`` is given.

Only `image` and `targets` are required. Without `source` the image is captioned
(``--captioner``, by default the embedded ``"toy"`` captioner, :mod:`nti_utils.caption`) and the
caption is the source prompt, recorded with where it came from in the item's ``metrics.json``
(``source``, ``source_from``). A target is a prompt, or word swaps applied to the source
(``{"circle": "square"}``: the way to edit a caption you have not read). `id` defaults to the
image's stem, `edit` to ``"replace"`` (word swap; ``"refine"`` for prompts of different lengths). `blend_words` (one list
per prompt, source first) adds a :class:`~nti_utils.local_blend.LocalBlend`, `reweight` a
:class:`~nti_utils.p2p.Reweight` on top of the edit (:func:`~nti_utils.editing.build_controller`).

Output, per item, in ``<out>/items/<id>/``: ``inversion.safetensors``
(:func:`~nti_utils.storage.save_inversion`), ``source.png`` (the reconstruction), ``edit_<k>.png``
per target, ``metrics.json`` (PSNR/SSIM of the reconstruction against the input at the model's
resolution, inner steps, seconds). Plus ``errors.jsonl`` (id, line, stage, reason of every bad item)
and ``summary.csv`` (one row per done item).

The output folder is the runner's own: a new folder, or an empty one, gets a marker file
``<out>/.nti-batch``, and a non-empty folder without it is refused (nothing in it is touched), so a
user's ``summary.csv`` or ``tmp/`` is never replaced or deleted. In its own folder the runner
deletes only its temporary item folders (``tmp/<id>.rank<r>``) and error fragments.

Resumable and loss-free: an item is written into ``<out>/tmp/`` and renamed to ``items/<id>`` as its
last step, so it is complete or absent; a rerun skips items whose folder exists (and reports one made
from other inputs or settings rather than mixing them). An item's computation depends only on the
item and the settings (seeded from a hash of its id), so a run killed mid-way and restarted writes
byte for byte what an uninterrupted run writes, whichever process handles an item. For that, timings
stay out of the saved inversion (they are in ``metrics.json``; ``save_inversion`` writes its
safetensors header with sorted keys). This holds for one device type and torch thread count (CPU
results can differ in the last bits between thread counts). One run per output folder at a time.

Scale-out with Hugging Face ``accelerate``, data parallel over items: process r takes
``pending[r::world_size]`` of the pending ids in sorted order, and the main process merges errors
and writes the summary when all are done::

    python -m nti_utils.batch --manifest m.jsonl --out runs/a     # one process
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no -m nti_utils.batch --manifest m.jsonl --out runs/a

``--multi_gpu`` is what makes ``accelerate launch`` start N processes (via torchrun): one per GPU,
or, on a machine without GPUs, N CPU processes talking over gloo (``torchrun --nproc_per_node N -m
nti_utils.batch`` does the same). ``accelerate launch --cpu --num_processes N`` starts only *one*
process outside mpirun. On the CPU each process uses ``cores // processes`` torch threads (1 for 2
processes on 2 cores, which avoids oversubscription) unless ``--threads`` says otherwise.

The package: :mod:`~nti_utils.batch.manifest` reads and checks manifests (:class:`Item`),
:mod:`~nti_utils.batch.runner` holds the settings, the runner and the command line.
"""

from nti_utils.batch.manifest import Item, load_items, parse_item, read_manifest
from nti_utils.batch.runner import BatchSettings, config_hash, main, process_item, run

__all__ = [
    "BatchSettings",
    "Item",
    "config_hash",
    "load_items",
    "main",
    "parse_item",
    "process_item",
    "read_manifest",
    "run",
]
