#!/usr/bin/env bash
# The README's main job (`make demo`): on the embedded world, build a dataset, train the paper's two
# stages from the world's "Wan2.1", then caption a held-out clip, generate a clip, generate a clip and
# its caption together, and score the model (`vigu eval`, 200 fresh clips) with a contact sheet.
#
# Every step checks for its output first and skips what is done, so a second run (or a run after an
# interruption) reuses everything finished; training resumes from its last checkpoint.
#
# Environment (all optional):
#   VIGU        the vigu command            (default: vigu; `make demo` passes .venv/bin/vigu)
#   PYTHON      the Python that has vigu    (default: python3; `make demo` passes .venv/bin/python)
#   DEMO_DIR    where everything goes       (default: runs/demo; the sampling commands' default model
#               is runs/demo/model)
#   DEMO_SET    extra recipe overrides for build-dataset and train, e.g.
#               "--set train.recall.max_steps=20 --set train.refine.max_steps=20"
#   DEMO_EVAL_ITEMS, DEMO_EVAL_STEPS   vigu eval's --items (default 200) and --steps (default: the model's)
#   DEMO_DTYPE  the sampling commands' and vigu eval's --dtype (default auto: bfloat16 where it is fast,
#               on CUDA or a CPU with AMX / AVX512-BF16, else float32; README)
#   DEMO_PROCS  processes of build-dataset and training (default 2 where the machine has 2 cores or more,
#               else 1): torchrun (gloo), the cores shared out as threads; build-dataset's processes build
#               disjoint shards of the same dataset, training's take their share of the recipe's batch, so
#               a step trains on the same number of samples (README)
set -euo pipefail

read -r -a VIGU <<< "${VIGU:-vigu}"
PYTHON=${PYTHON:-python3}
DIR=${DEMO_DIR:-runs/demo}
RECIPE=world-tiny
read -r -a OVERRIDES <<< "${DEMO_SET:-}"
CORES=$(nproc)
PROCS=${DEMO_PROCS:-$(( CORES >= 2 ? 2 : 1 ))}
SAMPLE_ARGS=(--model "$DIR/model" --dtype "${DEMO_DTYPE:-auto}")
EVAL_ARGS=(--items "${DEMO_EVAL_ITEMS:-200}")
if [[ -n ${DEMO_EVAL_STEPS:-} ]]; then EVAL_ARGS+=(--steps "$DEMO_EVAL_STEPS"); fi

started=$SECONDS
timed() {  # timed NAME COMMAND...: run COMMAND, saying how long it took
    local name=$1 began=$SECONDS
    shift
    echo "[demo] $name ..." >&2
    "$@"
    echo "[demo] $name: $((SECONDS - began)) s" >&2
}

step() {  # step NAME DONE-FILE COMMAND...: COMMAND unless DONE-FILE (its last output, written last) exists
    if [[ -e $2 ]]; then
        echo "[demo] $1: done before ($2), skipped" >&2
    else
        timed "$1" "${@:3}"
    fi
}

dataset_complete() { grep -q '"complete": true' "$DIR/data/dataset.json" 2>/dev/null; }

launch() {  # launch ARGS...: `vigu ARGS` as one process, or as $PROCS under torchrun (gloo) sharing the cores
    if (( PROCS == 1 )); then
        "${VIGU[@]}" "$@"
    else
        OMP_NUM_THREADS=$(( CORES / PROCS > 0 ? CORES / PROCS : 1 )) "$PYTHON" -m torch.distributed.run \
            --standalone --nproc_per_node "$PROCS" -m vigu_cli "$@"
    fi
}

build() {  # an interrupted build resumes by itself; N processes build disjoint shards of the same dataset
    launch build-dataset --recipe "$RECIPE" --out "$DIR/data" "${OVERRIDES[@]}"
}

process_batch() {  # process_batch STAGE: the stage's batch (DEMO_SET applied) split over $PROCS processes
    "$PYTHON" - "$RECIPE" "$1" "$PROCS" "${OVERRIDES[@]}" <<'PY'
import sys
from vigu_cli.recipe import load_recipe
recipe, stage, procs = sys.argv[1], sys.argv[2], int(sys.argv[3])
batch = getattr(load_recipe(recipe, [a for a in sys.argv[4:] if a != "--set"]).train, stage).batch_size
if batch % procs:
    sys.exit(f"train.{stage}.batch_size={batch} does not split over DEMO_PROCS={procs} processes: set DEMO_PROCS to a divisor")
print(batch // procs)
PY
}

train() {  # train STAGE: --resume continues from the last checkpoint, or starts when there is none
    local args=(train --recipe "$RECIPE" --stage "$1" --resume --set "train.output_dir=$DIR"
                --set "train.dataset=$DIR/data" "${OVERRIDES[@]}")
    if (( PROCS > 1 )); then
        local batch
        batch=$(process_batch "$1")
        args+=(--set "train.$1.batch_size=$batch")
    fi
    launch "${args[@]}"
}

install_model() {  # the refine model becomes $DIR/model: a copy renamed into place
    rm -rf "$DIR/.model.tmp"
    cp -r "$DIR/refine/model" "$DIR/.model.tmp"
    mv -T "$DIR/.model.tmp" "$DIR/model"
}

held_out_clip() {  # the dataset's first held-out item: "<mp4>\t<its reference caption>"
    "$PYTHON" - "$DIR/data" <<'PY'
import sys
from pathlib import Path
from vigu_cli.data.cache import split_lines
root = Path(sys.argv[1])
line = split_lines(root, "val")[0]
print(f"{root / line.video}\t{line.caption}")
PY
}

evaluate() {  # the table goes to the terminal and to eval.txt; eval.json, the step's mark, comes last
    "${VIGU[@]}" eval "${SAMPLE_ARGS[@]}" "${EVAL_ARGS[@]}" --json "$DIR/.eval.json.tmp" \
        --sheet "$DIR/sheet.html" | tee "$DIR/.eval.txt.tmp"
    mv "$DIR/.eval.txt.tmp" "$DIR/eval.txt"
    mv "$DIR/.eval.json.tmp" "$DIR/eval.json"
}

mkdir -p "$DIR"
if dataset_complete; then echo "[demo] build-dataset: done before ($DIR/data), skipped" >&2; else timed build-dataset build; fi
step "train recall" "$DIR/recall/model/model_index.json" train recall
step "train refine" "$DIR/refine/model/model_index.json" train refine
step "install model" "$DIR/model/model_index.json" install_model

IFS=$'\t' read -r CLIP REFERENCE < <(held_out_clip)
echo "[demo] held-out clip $CLIP, reference caption: $REFERENCE" >&2
step caption "$DIR/caption/000-$(basename "$CLIP" .mp4).json" \
    "${VIGU[@]}" caption "$CLIP" "${SAMPLE_ARGS[@]}" --out "$DIR/caption"
step generate "$DIR/generate/000-a-red-circle-moving-left.json" \
    "${VIGU[@]}" generate "a red circle moving left" "${SAMPLE_ARGS[@]}" --out "$DIR/generate"
step joint "$DIR/joint/000-a-blue-square-moving-up.json" \
    "${VIGU[@]}" joint "a blue square moving up" "${SAMPLE_ARGS[@]}" --out "$DIR/joint"
step eval "$DIR/eval.json" evaluate

cat <<SUMMARY

[demo] done in $((SECONDS - started)) s; everything is under $DIR:
  caption of $CLIP: $(cat "$DIR"/caption/*.txt)
  (its reference: $REFERENCE)
  generate "a red circle moving left": $(ls "$DIR"/generate/*.mp4)
  joint "a blue square moving up": $(ls "$DIR"/joint/*.mp4): $(cat "$DIR"/joint/*.txt)
  contact sheet: $DIR/sheet.html and $DIR/sheet.png; scores: $DIR/eval.json
SUMMARY
cat "$DIR/eval.txt"
