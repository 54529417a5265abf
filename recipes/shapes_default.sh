#!/usr/bin/env bash
# The shipped default models (issue 19), end to end on shapes: base -> elastic supernet -> few-step K-DMD per width
# -> 4-bit palettization with self-distillation -> torch-free graphs -> installed as built-in models. Each stage is
# skipped when its output exists, so rerunning the script resumes it; stage times go to runs/default/times.txt.
#   bash recipes/shapes_default.sh                 start from the committed base (checkpoints/shapes-base)
#   FROM_SCRATCH=1 bash recipes/shapes_default.sh  train the base too (about 4 h on one core of this CPU)
#     (the CPU phases only: the committed base adds 2710 GPU steps, recipes/shapes_base_gpu.sh and
#     checkpoints/shapes-base/README.md)
#   ROOT=runs/e2e INSTALL_DIR=runs/e2e/installed bash recipes/shapes_default.sh   a reproduction that leaves the
#     shipped checkpoints/ alone (ROOT default runs/default, INSTALL_DIR default checkpoints)
#   CPU=0 CPU2=1 bash recipes/shapes_default.sh   two cores: the full width's DMD and palettization run beside the
#     supernet and the half width's (each chain pinned to its core)
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
supernet() {  # CORE
  stage supernet "$SUPERNET/checkpoint-0001000/trainer_state.json" taskset -c "$1" pocketdit train \
    configs/shapes_pixel32.yaml --model.pretrained "$BASE" --model.elastic_widths '[0.5, 1.0]' --method elastic \
    --schedule.logit_std 1.6 --train.steps 1000 --optim.schedule wsd --optim.decay_steps 500 --optim.min_lr_ratio 0 \
    --optim.lr 5e-4 --train.checkpoint_every 250 --train.sample_every 0 --train.keep_checkpoints 2 \
    --train.output_dir "$SUPERNET" --resume auto
}

# 2. four-step distillation per width (recipes/kdmd_shapes.sh, scored with the width's own 28- and 4-step rows).
#    Full width: K-DMD whose few-step teacher is the base's own guided 28-step ODE from the student's x_t
#    (kdmd_ode: 0.743 against plain DMD's 0.707 at the same 400 iterations; DMD needs 1200 for 0.747). Half width:
#    plain DMD (0.333; K-DMD did not beat it there, docs/kdmd.md). Every weight of student and critic trains (no
#    LoRA: at 4M parameters it is cheap, and it scored 0.594 against LoRA rank 32's 0.573 on the earlier base); the
#    student's schedule is shift 2 for the full width and 1 for the half (the teacher keeps its 3): the undistilled
#    base samples better at 4 steps with them than with the paper's sigmas (docs/kdmd.md, second round).
FULL_PARAMS="--method.lora_rank 0 --method.critic_lora_rank 0"
distil() {  # TAG STUDENT WIDTH SHIFT METHOD CORE
  DISTILL_ARGS=$FULL_PARAMS METHODS=$5 STEPS_LIST=4 SHIFT=$4 ROOT="$OUT/kdmd" CPU=$6 TEACHER=$BASE \
    bash recipes/kdmd_shapes.sh "$1" "$2" "$3"
}

# 3. palettize (4-bit k-means, sensitive layers 8-bit, 4.6 bits on average: the full-parameter DMD student loses
#    0.026 at 4.3 bits / 500 steps and 0.010 at 4.6 / 1000) + self-distillation, scored against fp32; 4. torch-free graphs;
# 5. install as the built-in models (model cards: checkpoints/shapes-4step*/README.md) and score what ships
ship() {  # TAG MODEL CORE
  local tag=$1 model=$2 core=$3 q=$OUT/pal_$2_$1 name=shapes-4step
  [ "$tag" = half ] && name=shapes-4step-0.5
  stage "palettize-$tag-$model" "$q/model_index.json" taskset -c "$core" pocketdit quantize "$OUT/kdmd/$tag/$model" \
    --scheme palettize4 --target-avg-bits 4.6 --finetune-steps 1000 --finetune-indices --eval --eval-steps 4 \
    --shapes-eval -o "$q"
  stage "install-$tag-$model" "$OUT/installed-$tag-$model" bash -c "mkdir -p $INSTALL_DIR/$name && \
    cp -r $q/autoencoder $q/model_index.json $q/scheduler $q/text_conditioner $q/transformer $INSTALL_DIR/$name/ && \
    taskset -c $core python -c 'import sys; from pocketdit.export.lite import write_lite; write_lite(sys.argv[1], threads=1)' \
      $INSTALL_DIR/$name && touch $OUT/installed-$tag-$model"
  stage "eval-$tag-$model" "$OUT/eval-$tag-$model.json" taskset -c "$core" pocketdit eval -m "$INSTALL_DIR/$name" \
    --steps 4 --guidance 1 --threads 1 --output "$OUT/eval-$tag-$model.json"
}

full_width() { distil full "$BASE" 1.0 "${FULL_SHIFT:-2}" kdmd_ode "$1"; ship full kdmd_ode4 "$1"; }
half_width() {
  supernet "$1"
  distil half "$SUPERNET/checkpoint-0001000" 0.5 "${HALF_SHIFT:-1}" dmd "$1"
  ship half dmd4 "$1"
}
if [ -n "${CPU2:-}" ]; then  # two cores: the full width's chain beside the supernet and the half width's
  full_width "$CPU2" & full=$!
  half_width "$CPU"
  wait "$full"
else
  full_width "$CPU"
  half_width "$CPU"
fi
cat "$OUT/times.txt" "$OUT"/kdmd/*/times.txt  # the distillations' times are kdmd_shapes.sh's, per width
