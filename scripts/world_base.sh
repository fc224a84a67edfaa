#!/usr/bin/env bash
# Rebuild the embedded world's pretrained "Wan2.1" (vigu_cli/assets/world-wan2.1) from scratch: the
# world's stock text-to-video model, which Uni-ViGU training starts from as a user starts from Wan2.1.
#
# 1. build a large world dataset (8,192 clips) with the untrained world model's encoders (model.base=world),
# 2. train stage `base` (text-to-video flow matching, no text stream; recipe world-tiny, train.base) in the
#    two phases the shipped model had: lr 1e-3 constant to $STABLE_STEPS, then, resumed from that checkpoint,
#    diffusers' cosine schedule (counted from step 0) down to 0 at $TOTAL_STEPS,
# 3. $PASSES more passes (default 2), each from the model before it on 8,192 new clips (data.seed=1, 2, ...) with
#    more of its training at high noise (logit-normal tau centred on sigma 0.73 instead of 0.5), lr 3e-4 by cosine
#    to 0 over $PASS_STEPS, in $WORK/pass-2, $WORK/pass-3, ...,
# 4. export the last model as a stock diffusers WanPipeline folder to $ASSET, with the logs of every run.
# Each step resumes. Phases 1-2 took about 2 h 10 min on one core of a 2-core CPU with AMX (1 s/step at batch
# 16, bf16); the shipped passes 2 and 3 ran on 2-core AMD EPYC CPUs as two processes of batch 8 (the same global
# batch of 16: VIGU="python -m torch.distributed.run --standalone --nproc_per_node 2 -m vigu_cli"
# BASE_SET="train.base.batch_size=8"), pass 2 in float32 with AVX2 only (1.05 s/step, 42 min), pass 3 in bf16
# with AVX512-BF16 (0.8 s/step, 34 min); one GPU does it all in minutes. Environment: VIGU, PYTHON (the Python
# that has vigu), WORK (default runs/world-base), ASSET (default the package's), ITEMS (clips per dataset, 8192),
# STABLE_STEPS (default the recipe's train.base.max_steps, 3500), TOTAL_STEPS (7500), PASSES (2), PASS_STEPS
# (2400), BASE_SET (recipe overrides `key=value ...`, applied last).
set -euo pipefail

read -r -a VIGU <<< "${VIGU:-vigu}"
PYTHON=${PYTHON:-python3}
WORK=${WORK:-runs/world-base}
ASSET=${ASSET:-vigu_cli/assets/world-wan2.1}
ITEMS=${ITEMS:-8192}
TOTAL_STEPS=${TOTAL_STEPS:-7500}
PASSES=${PASSES:-2}
PASS_STEPS=${PASS_STEPS:-2400}
read -r -a OVERRIDES <<< "${BASE_SET:-}"
# recipe KEY=VALUE...: ARGS = the recipe options of a command, BASE_SET's overrides last
recipe() { ARGS=(--recipe world-tiny --set model.base=world); local item; for item in "$@" "${OVERRIDES[@]}"; do ARGS+=(--set "$item"); done; }
last_step() { { echo 0; ls "$1/base/checkpoints" 2>/dev/null | sed 's/step-0*//'; } | sort -n | tail -1; }

DATA=(data.num_items="$ITEMS" data.shard_size=512 data.val_every=128 data.keep_videos=false)  # every dataset
recipe "${DATA[@]}" data.latents_dtype=bfloat16
"${VIGU[@]}" build-dataset "${ARGS[@]}" --out "$WORK/data"
STABLE=${STABLE_STEPS:-$("$PYTHON" -c "from vigu_cli.recipe import load_recipe; print(load_recipe('world-tiny').train.base.max_steps)")}
TRAIN=(train.output_dir="$WORK" train.dataset="$WORK/data")
recipe "${TRAIN[@]}" train.base.max_steps="$STABLE"  # phase 1: constant lr
if (( $(last_step "$WORK") < STABLE )); then "${VIGU[@]}" train --stage base --resume "${ARGS[@]}"; fi
recipe "${TRAIN[@]}" train.base.max_steps="$TOTAL_STEPS" train.base.lr_scheduler=cosine  # phase 2: cosine decay
if (( $(last_step "$WORK") < TOTAL_STEPS )); then "${VIGU[@]}" train --stage base --resume "${ARGS[@]}"; fi
MODEL=$WORK/base/model
for (( PASS = 2; PASS <= PASSES + 1; PASS++ )); do  # phase 3: new clips, more training at high noise
    DIR=$WORK/pass-$PASS
    recipe "${DATA[@]}" data.seed=$((PASS - 1))
    "${VIGU[@]}" build-dataset "${ARGS[@]}" --out "$DIR/data"
    recipe train.output_dir="$DIR" train.dataset="$DIR/data" train.base.init="$MODEL" \
        flow.tau_sampling=logit_normal flow.logit_mean=1.0 train.base.learning_rate=3e-4 train.base.lr_scheduler=cosine \
        train.base.warmup_steps=50 train.base.max_steps="$PASS_STEPS" train.base.compile=true \
        train.base.checkpoint_every=400 train.base.validate_every=400 train.base.val_items=64
    if (( $(last_step "$DIR") < PASS_STEPS )); then "${VIGU[@]}" train --stage base --resume "${ARGS[@]}"; fi
    MODEL=$DIR/base/model
done
recipe; "${VIGU[@]}" convert "$MODEL" "$WORK/export" --overwrite "${ARGS[@]}"
rm -rf "$ASSET.tmp"
cp -r "$WORK/export" "$ASSET.tmp"
cp "$WORK/base/metrics.jsonl" "$WORK/base/validation.jsonl" "$ASSET.tmp/"
for (( PASS = 2; PASS <= PASSES + 1; PASS++ )); do
    cp "$WORK/pass-$PASS/base/metrics.jsonl" "$ASSET.tmp/metrics-pass-$PASS.jsonl"
    cp "$WORK/pass-$PASS/base/validation.jsonl" "$ASSET.tmp/validation-pass-$PASS.jsonl"
done
rm -rf "$ASSET"
mv "$ASSET.tmp" "$ASSET"
echo "wrote $ASSET"
