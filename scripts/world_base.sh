#!/usr/bin/env bash
# Rebuild the embedded world's pretrained "Wan2.1" (vigu_cli/assets/world-wan2.1) from scratch: the
# world's stock text-to-video model, which Uni-ViGU training starts from as a user starts from Wan2.1.
#
# 1. build a large world dataset with the untrained world model's encoders (model.base=world),
# 2. train stage `base` (text-to-video flow matching, no text stream; recipe world-tiny, train.base),
# 3. export the result as a stock diffusers WanPipeline folder into the package, with its logs.
# Each step resumes. Hours on 2 CPU cores; one GPU does it in minutes. Environment: VIGU, WORK (default
# runs/world-base), BASE_SET (extra recipe overrides).
set -euo pipefail

read -r -a VIGU <<< "${VIGU:-vigu}"
WORK=${WORK:-runs/world-base}
ASSET=vigu_cli/assets/world-wan2.1
read -r -a OVERRIDES <<< "${BASE_SET:-}"
COMMON=(--recipe world-tiny --set model.base=world "${OVERRIDES[@]}")

"${VIGU[@]}" build-dataset "${COMMON[@]}" --out "$WORK/data" --set data.num_items=8192 --set data.shard_size=512 \
    --set data.val_every=128 --set data.keep_videos=false --set data.latents_dtype=bfloat16
if [[ ! -e $WORK/base/model/model_index.json ]]; then
    "${VIGU[@]}" train "${COMMON[@]}" --stage base --resume --set "train.output_dir=$WORK" --set "train.dataset=$WORK/data"
fi
"${VIGU[@]}" convert "$WORK/base/model" "$WORK/export" "${COMMON[@]}"
rm -rf "$ASSET.tmp"
cp -r "$WORK/export" "$ASSET.tmp"
cp "$WORK/base/metrics.jsonl" "$WORK/base/validation.jsonl" "$ASSET.tmp/"
rm -rf "$ASSET"
mv "$ASSET.tmp" "$ASSET"
echo "wrote $ASSET"
