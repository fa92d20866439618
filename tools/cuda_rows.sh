#!/usr/bin/env bash
# The benchmark's rows on CUDA: the embedded model (10 held-out scenes, every method, no ablations)
# and a random-weight pipeline with SD 1.5's UNet (nti_utils.bench.memory.sd_shaped_pipeline: width
# 320, 64x64 latents, 512 px; a minimal VAE and a one-layer text encoder), 2 scenes. Writes
# OUTDIR/log.txt, each run's results.json (toy-results.json, sd15-size-random-results.json) and
# both runs' tables, one after the other, in OUTDIR/table.txt (the names in data/benchmark/cuda-h200).
#
#   bash tools/cuda_rows.sh OUTDIR          # on a machine with CUDA, from the repository root
#   bash tools/cuda_rows.sh OUTDIR quick    # a CPU smoke run of the same commands (tiny sizes)
#
# TOY_LIMIT / SD_LIMIT (seconds) stop a run early; its results.json keeps every row scored so far.
set -uo pipefail
OUTD=$1
QUICK=${2:-}
DEV=cuda TOYS=10 SDS=2 W=320 LAT=64 EXTRA=""
if [ -n "$QUICK" ]; then DEV=cpu TOYS=2 SDS=1 W=64 LAT=8 EXTRA="--steps 3 --inner-steps 2"; fi
mkdir -p "$OUTD"
log=$OUTD/log.txt
(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true) | tee "$log"
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" 2>&1 | tee -a "$log"
rm -rf /tmp/b-toy /tmp/b-sd /tmp/sd15-random
# shellcheck disable=SC2086  # EXTRA is a list of flags
timeout "${TOY_LIMIT:-0}" python3 -m nti_utils.bench --model toy --scenes $TOYS --batch $TOYS \
    --no-ablations --device $DEV $EXTRA --out /tmp/b-toy --no-progress 2>&1 | tail -40 | tee -a "$log"
echo "toy exit ${PIPESTATUS[0]}" | tee -a "$log"
cp /tmp/b-toy/results.json "$OUTD/toy-results.json" && cp /tmp/b-toy/table.txt "$OUTD/table.txt"
python3 -c "from nti_utils.bench.memory import sd_shaped_pipeline as s; s($W, $LAT).save_pretrained('/tmp/sd15-random')"
# shellcheck disable=SC2086
timeout "${SD_LIMIT:-0}" python3 -m nti_utils.bench --model /tmp/sd15-random --scenes $SDS --batch $SDS \
    --no-ablations --device $DEV $EXTRA --out /tmp/b-sd --no-progress 2>&1 | tail -40 | tee -a "$log"
echo "sd exit ${PIPESTATUS[0]}" | tee -a "$log"
cp /tmp/b-sd/results.json "$OUTD/sd15-size-random-results.json" \
    && { echo; cat /tmp/b-sd/table.txt; } >>"$OUTD/table.txt"
