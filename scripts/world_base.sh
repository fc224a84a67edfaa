#!/usr/bin/env bash
# Rebuild the embedded world's pretrained "Wan2.1" (vigu_cli/assets/world-wan2.1) from scratch: the
# world's stock text-to-video model, which Uni-ViGU training starts from as a user starts from Wan2.1.
#
# 1. build a large world dataset (8,192 clips) with the untrained world model's encoders (model.base=world),
# 2. train stage `base` (text-to-video flow matching, no text stream; recipe world-tiny, train.base) in the
#    two phases the shipped model had: lr 1e-3 constant to train.base.max_steps (3,500), then, resumed from
#    that checkpoint, diffusers' cosine schedule (counted from step 0) down to 0 at $TOTAL_STEPS,
# 3. export the result as a stock diffusers WanPipeline folder into the package, with its logs.
# Each step resumes. About 2 h 10 min on one core of the 2-core CPU machine (1 s/step at batch 16, bf16);
# one GPU does it in minutes. Environment: VIGU, WORK (default runs/world-base), TOTAL_STEPS (default 7500),
# PYTHON (the Python that has vigu), BASE_SET (extra recipe overrides).
set -euo pipefail

read -r -a VIGU <<< "${VIGU:-vigu}"
PYTHON=${PYTHON:-python3}
WORK=${WORK:-runs/world-base}
TOTAL_STEPS=${TOTAL_STEPS:-7500}
ASSET=vigu_cli/assets/world-wan2.1
read -r -a OVERRIDES <<< "${BASE_SET:-}"
COMMON=(--recipe world-tiny --set model.base=world "${OVERRIDES[@]}")

"${VIGU[@]}" build-dataset "${COMMON[@]}" --out "$WORK/data" --set data.num_items=8192 --set data.shard_size=512 \
    --set data.val_every=128 --set data.keep_videos=false --set data.latents_dtype=bfloat16
TRAIN=(train "${COMMON[@]}" --stage base --resume --set "train.output_dir=$WORK" --set "train.dataset=$WORK/data")
STABLE=$("$PYTHON" -c "from vigu_cli.recipe import load_recipe; print(load_recipe('world-tiny').train.base.max_steps)")
last_step() { { echo 0; ls "$WORK/base/checkpoints" 2>/dev/null | sed 's/step-0*//'; } | sort -n | tail -1; }
if (( $(last_step) < STABLE )); then "${VIGU[@]}" "${TRAIN[@]}"; fi  # phase 1: constant lr
if (( $(last_step) < TOTAL_STEPS )); then  # phase 2: cosine decay
    "${VIGU[@]}" "${TRAIN[@]}" --set "train.base.max_steps=$TOTAL_STEPS" --set train.base.lr_scheduler=cosine
fi
"${VIGU[@]}" convert "$WORK/base/model" "$WORK/export" "${COMMON[@]}"
rm -rf "$ASSET.tmp"
cp -r "$WORK/export" "$ASSET.tmp"
cp "$WORK/base/metrics.jsonl" "$WORK/base/validation.jsonl" "$ASSET.tmp/"
rm -rf "$ASSET"
mv "$ASSET.tmp" "$ASSET"
echo "wrote $ASSET"
