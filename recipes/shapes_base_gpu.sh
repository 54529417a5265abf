#!/usr/bin/env bash
# Continue the shapes base (checkpoints/shapes-base, 4.0M parameters, 32x32 pixels) on one GPU for a fixed
# wall-clock budget: two runs side by side from the same weights, with the binding-oversampled category mix,
#   plain: 512 scenes a step
#   pairs: 256 scenes and their 256 counterfactual partners a step (--data.pairs, docs/training.md)
# each ending with a linear cool-down over its last fifth. Step counts follow the budget: a 60-step probe of both
# runs (side by side, as they will run) measures their speed first. A run that outlasts the budget is stopped
# at its last checkpoint (one every eighth of its steps). Then pick the better one with ShapesEval (docs/training.md, "The committed base now").
#
#   BUDGET=420 bash recipes/shapes_base_gpu.sh          # ROOT=runs/base_gpu, PY=python3
#   STEPS=2270 RUNS=plain bash recipes/shapes_base_gpu.sh   # a fixed step count instead: no probe, no time limit
# FROM: the weights to continue (default checkpoints/shapes-base); WORKERS: data workers per run (default 6).
#
# The attention backend is `strided` (plain SDPA): 64 tokens are too few for FlexAttention's compile to pay.
set -euo pipefail
cd "$(dirname "$0")/.."

ROOT=${ROOT:-runs/base_gpu}
BUDGET=${BUDGET:-420}              # seconds of training, probe excluded
FROM=${FROM:-checkpoints/shapes-base}
PY=${PY:-python3}
WORKERS=${WORKERS:-6}             # data workers per run (scenes are drawn on the CPU)
BATCH=${BATCH:-512}               # images a step (pairs: half scenes, half partners)
PROBE_STEPS=${PROBE_STEPS:-60}
KILL_MARGIN=${KILL_MARGIN:-90}     # seconds past BUDGET before a run is stopped
RUNS=${RUNS:-plain pairs}
MIX='{color_attr: 3, position: 3, two_object: 2, counting: 1.5, single_object: 0.5, colors: 0.5}'
COMMON=(configs/shapes_pixel32.yaml --model.pretrained "$FROM" --schedule.logit_std 1.6 --data.categories "$MIX"
        --data.length 5000000 --data.num_workers "$WORKERS" --train.attention_backend strided
        --train.mixed_precision no --train.gradient_checkpointing false --train.sample_every 0
        --train.num_threads 2 --train.progress false)
run_args() {
    case $1 in
        plain) echo "--data.batch_size $BATCH" ;;
        pairs) echo "--data.batch_size $(( BATCH / 2 )) --data.pairs true" ;;
        *) echo "unknown run $1 (plain, pairs)" >&2; return 1 ;;
    esac
}
last_rate() {  # steps/s of the last logged window
    "$PY" -c "import json,sys; print([json.loads(l) for l in open(sys.argv[1]) if 'steps_per_sec' in l][-1]['steps_per_sec'])" "$1"
}

mkdir -p "$ROOT"
t0=$(date +%s)
if [ -z "${STEPS:-}" ]; then
    for r in $RUNS; do
        # shellcheck disable=SC2046
        "$PY" -m pocketdit.cli train "${COMMON[@]}" $(run_args "$r") --train.output_dir "$ROOT/probe_$r" \
            --train.overwrite true --train.steps "$PROBE_STEPS" --train.log_every $(( PROBE_STEPS / 3 )) \
            --train.checkpoint_every 100000 >"$ROOT/probe_$r.log" 2>&1 &
    done
    wait
    echo "probe: $(( $(date +%s) - t0 )) s"
fi

pids=()
for r in $RUNS; do
    if [ -n "${STEPS:-}" ]; then
        steps=$STEPS limit=0  # timeout 0: no limit
    else
        rate=$(last_rate "$ROOT/probe_$r/metrics.jsonl")
        steps=$("$PY" -c "print(max(20, int($rate * $BUDGET) // 10 * 10))") limit=$(( BUDGET + KILL_MARGIN ))
        echo "$r: $rate steps/s in the probe -> $steps steps"
    fi
    decay=$(( steps / 5 > 0 ? steps / 5 : 1 )); every=$(( steps / 8 > 50 ? steps / 8 : 50 ))
    # shellcheck disable=SC2046
    timeout -s INT "$limit" "$PY" -m pocketdit.cli train "${COMMON[@]}" $(run_args "$r") \
        --train.output_dir "$ROOT/$r" --train.steps "$steps" --optim.schedule wsd --optim.decay_steps "$decay" \
        --optim.min_lr_ratio 0 --train.log_every 50 --train.checkpoint_every "$every" --train.keep_checkpoints 1 \
        >"$ROOT/$r.log" 2>&1 &
    pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
echo "training: $(( $(date +%s) - t0 )) s in all (last exit status $status)"
for r in $RUNS; do
    echo "$r: $(tail -n 1 "$ROOT/$r/metrics.jsonl")"
done
