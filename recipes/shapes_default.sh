#!/usr/bin/env bash
# The shipped default models (issue 19), end to end on shapes: base -> elastic supernet -> few-step K-DMD per width
# -> 4-bit palettization with self-distillation -> torch-free graphs -> installed as built-in models. Each stage is
# skipped when its output exists, so rerunning the script resumes it; stage times go to runs/default/times.txt.
#   bash recipes/shapes_default.sh                 start from the committed base (checkpoints/shapes-base)
#   FROM_SCRATCH=1 bash recipes/shapes_default.sh  train the base too (about 4 h on one core of this CPU)
#   ROOT=runs/e2e INSTALL_DIR=runs/e2e/installed bash recipes/shapes_default.sh   a reproduction that leaves the
#     shipped checkpoints/ alone (ROOT default runs/default, INSTALL_DIR default checkpoints)
# KD (docs/distillation.md) is not a stage: it pays for a student trained from scratch, and here every shipped
# width starts from the base (the half width inside a supernet grown from it, which distils from its full width).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${ROOT:-runs/default}
INSTALL_DIR=${INSTALL_DIR:-checkpoints}
export CPU=${CPU:-0}  # the core every stage is pinned to
mkdir -p "$OUT" "$INSTALL_DIR"
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
  stage base "$OUT/base/checkpoint-0014500" taskset -c "$CPU" pocketdit train configs/shapes_pixel32.yaml \
    --train.output_dir "$OUT/base" --train.steps 14500 --schedule.logit_std 1.6 --optim.schedule wsd \
    --optim.decay_steps 2500 --optim.min_lr_ratio 0 --train.keep_checkpoints 2 --resume auto
  stage base-pipeline "$BASE/model_index.json" python -c "
import sys; from pocketdit import PocketDiTPipeline
PocketDiTPipeline.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])" "$OUT/base/checkpoint-0014500" "$BASE"
fi

# 1. elastic supernet (widths 0.5 and 1) grown from the base: 1000 steps, full + width 0.5 every step
SUPERNET=$OUT/supernet
stage supernet "$SUPERNET/checkpoint-0001000/trainer_state.json" taskset -c "$CPU" pocketdit train configs/shapes_pixel32.yaml \
  --model.pretrained "$BASE" --model.elastic_widths '[0.5, 1.0]' --method elastic --schedule.logit_std 1.6 \
  --train.steps 1000 --optim.schedule wsd --optim.decay_steps 500 --optim.min_lr_ratio 0 --optim.lr 5e-4 \
  --train.checkpoint_every 250 --train.sample_every 0 --train.keep_checkpoints 2 --train.output_dir "$SUPERNET" \
  --resume auto

# 2. four-step plain DMD per width (recipes/kdmd_shapes.sh, scored with the width's own 28- and 4-step rows). Plain DMD
#    ships: neither K-DMD variant beat it here (docs/kdmd.md). Every weight of student and critic trains (no LoRA:
#    at 4M parameters it is cheap, and it scored 0.594 against LoRA rank 32's 0.573); the student's schedule is
#    shift 2 for the full width and 1 for the half (the teacher keeps its 3): the undistilled base samples better
#    at 4 steps with them than with the paper's sigmas (docs/kdmd.md, second round).
FULL_PARAMS="--method.lora_rank 0 --method.critic_lora_rank 0"
DISTILL_ARGS=$FULL_PARAMS METHODS=dmd STEPS_LIST=4 SHIFT=${FULL_SHIFT:-2} ROOT="$OUT/kdmd" \
  bash recipes/kdmd_shapes.sh full "$BASE" 1.0
DISTILL_ARGS=$FULL_PARAMS METHODS=dmd STEPS_LIST=4 SHIFT=${HALF_SHIFT:-1} ROOT="$OUT/kdmd" \
  bash recipes/kdmd_shapes.sh half "$SUPERNET/checkpoint-0001000" 0.5

# 3. palettize (4-bit k-means, sensitive layers 8-bit, 4.6 bits on average: the full-parameter DMD student loses
#    0.026 at 4.3 bits / 500 steps and 0.010 at 4.6 / 1000) + self-distillation, scored against fp32; 4. torch-free graphs;
# 5. install as the built-in models (model cards: checkpoints/shapes-4step*/README.md) and score what ships
for tag in full half; do
  q=$OUT/pal_dmd4_$tag
  name=shapes-4step; [ "$tag" = half ] && name=shapes-4step-0.5
  stage "palettize-$tag" "$q/model_index.json" taskset -c "$CPU" pocketdit quantize "$OUT/kdmd/$tag/dmd4" \
    --scheme palettize4 --target-avg-bits 4.6 --finetune-steps 1000 --finetune-indices --eval --eval-steps 4 \
    --shapes-eval -o "$q"
  stage "install-$tag" "$OUT/installed-$tag" bash -c "mkdir -p $INSTALL_DIR/$name && \
    cp -r $q/autoencoder $q/model_index.json $q/scheduler $q/text_conditioner $q/transformer $INSTALL_DIR/$name/ && \
    taskset -c $CPU python -c 'import sys; from pocketdit.export.lite import write_lite; write_lite(sys.argv[1], threads=1)' \
      $INSTALL_DIR/$name && touch $OUT/installed-$tag"
  stage "eval-$tag" "$OUT/eval-$tag.json" taskset -c "$CPU" pocketdit eval -m "$INSTALL_DIR/$name" --steps 4 --guidance 1 \
    --threads 1 --output "$OUT/eval-$tag.json"
done
cat "$OUT/times.txt" "$OUT"/kdmd/*/times.txt  # the distillations' times are kdmd_shapes.sh's, per width
