#!/usr/bin/env bash
# The shipped default models (issue 19), end to end on shapes: base -> elastic supernet -> few-step K-DMD per width
# -> 4-bit palettization with self-distillation -> torch-free graphs -> installed as built-in models. Each stage is
# skipped when its output exists, so rerunning the script resumes it; stage times go to runs/default/times.txt.
#   bash recipes/shapes_default.sh                 start from the committed base (checkpoints/shapes-base)
#   FROM_SCRATCH=1 bash recipes/shapes_default.sh  train the base too (about 4 h on one core of this CPU)
# KD (docs/distillation.md) is not a stage: it pays for a student trained from scratch, and here every shipped
# width starts from the base (the half width inside a supernet grown from it, which distils from its full width).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=runs/default
mkdir -p "$OUT"
stage() {  # NAME DONE_FILE COMMAND...
  local name=$1 done_file=$2; shift 2
  [ -e "$done_file" ] && return 0
  local start=$SECONDS
  "$@"
  echo "$name: $((SECONDS - start)) s" >> "$OUT/times.txt"
}

# 0. base: one run with the committed base's final schedule (its own history is in checkpoints/shapes-base/README.md)
BASE=checkpoints/shapes-base
if [ "${FROM_SCRATCH:-0}" = 1 ]; then
  BASE=$OUT/base/pipeline
  stage base "$OUT/base/checkpoint-0014500" taskset -c 0 pocketdit train configs/shapes_pixel32.yaml \
    --train.output_dir "$OUT/base" --train.steps 14500 --schedule.logit_std 1.6 --optim.schedule wsd \
    --optim.decay_steps 2500 --optim.min_lr_ratio 0 --train.keep_checkpoints 2 --resume auto
  stage base-pipeline "$BASE/model_index.json" python -c "
import sys; from pocketdit import PocketDiTPipeline
PocketDiTPipeline.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])" "$OUT/base/checkpoint-0014500" "$BASE"
fi

# 1. elastic supernet (widths 0.5 and 1) grown from the base: 1000 steps, full + width 0.5 every step
SUPERNET=$OUT/supernet
stage supernet "$SUPERNET/checkpoint-0001000/trainer_state.json" taskset -c 0 pocketdit train configs/shapes_pixel32.yaml \
  --model.pretrained "$BASE" --model.elastic_widths '[0.5, 1.0]' --method elastic --schedule.logit_std 1.6 \
  --train.steps 1000 --optim.schedule wsd --optim.decay_steps 500 --optim.min_lr_ratio 0 --optim.lr 5e-4 \
  --train.checkpoint_every 250 --train.sample_every 0 --train.keep_checkpoints 2 --train.output_dir "$SUPERNET" \
  --resume auto

# 2. four-step distillation per width (recipes/kdmd_shapes.sh: plain DMD and K-DMD, each scored; the full width's DMD
#    model is the few-step teacher). Plain DMD ships: K-DMD did not beat it here (docs/kdmd.md).
start=$SECONDS
STEPS_LIST=4 bash recipes/kdmd_shapes.sh full "$BASE" 1.0
STEPS_LIST=4 FEW=runs/kdmd/full/dmd4 bash recipes/kdmd_shapes.sh half "$SUPERNET/checkpoint-0001000" 0.5
echo "distillation (both widths, DMD and K-DMD, with evals): $((SECONDS - start)) s" >> "$OUT/times.txt"

# 3. palettize (4-bit k-means, sensitive layers 8-bit) + self-distillation, scored against fp32; 4. torch-free graphs;
# 5. install as the built-in models (model cards: checkpoints/shapes-4step*/README.md) and score what ships
for tag in full half; do
  q=$OUT/pal_dmd4_$tag
  name=shapes-4step; [ "$tag" = half ] && name=shapes-4step-0.5
  stage "palettize-$tag" "$q/model_index.json" taskset -c 0 pocketdit quantize "runs/kdmd/$tag/dmd4" \
    --scheme palettize4 --finetune-steps 500 --finetune-indices --eval --eval-steps 4 --shapes-eval -o "$q"
  stage "install-$tag" "$OUT/installed-$tag" bash -c "mkdir -p checkpoints/$name && \
    cp -r $q/autoencoder $q/model_index.json $q/scheduler $q/text_conditioner $q/transformer checkpoints/$name/ && \
    taskset -c 0 python -c 'import sys; from pocketdit.export.lite import write_lite; write_lite(sys.argv[1], threads=1)' \
      checkpoints/$name && touch $OUT/installed-$tag"
  stage "eval-$tag" "$OUT/eval-$tag.json" taskset -c 0 pocketdit eval -m "checkpoints/$name" --steps 4 --guidance 1 \
    --threads 1 --output "$OUT/eval-$tag.json"
done
cat "$OUT/times.txt"
