#!/usr/bin/env bash
# Issue 18's evidence on shapes for one width: plain DMD and K-DMD at 4, 2 and 1 steps against the model's own
# 28-step and undistilled 4-step samples, each scored by ShapesEval v2 (held-out phrasings, 4 images per prompt).
# K-DMD's few-step teacher is the plain-DMD 4-step model of the full width (FEW, default this tag's dmd4 when the
# width is the full one). Resumable: rerun the script and each finished stage is skipped.
#   bash recipes/kdmd_shapes.sh [TAG] [STUDENT] [WIDTH] [ITERATIONS]
#   defaults: full checkpoints/shapes-base 1.0 400  (one core: about 10 min a run, 1-4 min an eval)
#   width 0.5 of a supernet grown from the base (recipes/elastic_vs_standalone.sh makes runs/elastic_cmp/elastic):
#   FEW=runs/kdmd/full/dmd4 bash recipes/kdmd_shapes.sh half runs/elastic_cmp/elastic 0.5
#   STEPS_LIST="4" (default "4 2 1") runs only those step counts; CPU=1 pins another core
#   SHIFT: the student's schedule shift (default 3, the paper's sigmas 1.0/0.9/0.75/0.5; the teacher keeps its 3);
#     SHIFT=2 ROOT=runs/kdmd_s2 gives the shift-2 rows of docs/kdmd.md
#   METHODS (default "dmd kdmd"; add kdmd_ode for K-DMD whose few-step teacher is the teacher's own ODE solution)
#   ROOT (default runs/kdmd): where the runs go
#   DISTILL_ARGS: more `pocketdit distill` flags for every run, after the defaults (e.g. "--method.lora_rank 0
#     --method.critic_lora_rank 0" trains every weight of student and critic)
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:-full}
STUDENT=${2:-checkpoints/shapes-base}
WIDTH=${3:-1.0}
ITERS=${4:-400}
TEACHER=${TEACHER:-checkpoints/shapes-base}
CPU=${CPU:-0}
SHIFT=${SHIFT:-3}
METHODS=${METHODS:-dmd kdmd}
OUT=${ROOT:-runs/kdmd}/$TAG
FEW=${FEW:-$OUT/dmd4}
mkdir -p "$OUT/eval"
# the paper's settings where this CPU allows: teacher guidance 3 (what the base samples with), LoRA rank 32
COMMON=(configs/shapes_pixel32.yaml --teacher "$TEACHER" --student "$STUDENT" --iterations "$ITERS"
        --method.teacher_guidance 3 --method.lora_rank 32 --method.lora_alpha 64 --method.critic_lora_rank 32
        --method.critic_lora_alpha 64 --train.sample_every 200 --train.checkpoint_every 100 --resume auto
        --schedule.shift "$SHIFT" --method.teacher_shift 3 --method.watch_every 50)
read -r -a EXTRA <<< "${DISTILL_ARGS:-}"
COMMON+=("${EXTRA[@]}")
WIDTH_ARGS=()
[ "$WIDTH" = "1.0" ] || WIDTH_ARGS=(--width "$WIDTH")

distill() {  # NAME METHOD STEPS [extra ...]
  local name=$1 method=$2 steps=$3; shift 3
  local out=$OUT/$name$steps
  [ -f "$out/model_index.json" ] && return 0
  local start=$SECONDS
  taskset -c "$CPU" pocketdit distill "${COMMON[@]}" "${WIDTH_ARGS[@]}" --method "$method" --steps "$steps" -o "$out" "$@"
  echo "$name$steps: $((SECONDS - start)) s" >> "$OUT/times.txt"
}
score() {  # NAME MODEL STEPS GUIDANCE [extra ...]
  local name=$1 model=$2 steps=$3 guidance=$4; shift 4
  [ -f "$OUT/eval/$name.json" ] && return 0
  taskset -c "$CPU" pocketdit eval -m "$model" --steps "$steps" --guidance "$guidance" --threads 1 \
    --output "$OUT/eval/$name.json" "$@"
}

for steps in ${STEPS_LIST:-4 2 1}; do
  for m in $METHODS; do
    case $m in
      dmd) distill dmd dmd "$steps" ;;
      kdmd) [ -f "$FEW/model_index.json" ] || { echo "no few-step teacher at $FEW"; exit 1; }
            distill kdmd kdmd "$steps" --few-step-teacher "$FEW" ;;
      kdmd_ode) distill kdmd_ode kdmd "$steps" --method.ode_teacher_steps 28 ;;
      *) echo "unknown method $m"; exit 1 ;;
    esac
    score "$m$steps" "$OUT/$m$steps" "$steps" 1
  done
done
# the student's own many-step and undistilled few-step samples (guidance 3, as it was trained to sample)
score base28 "$STUDENT" 28 3 "${WIDTH_ARGS[@]}"
score base4 "$STUDENT" 4 3 "${WIDTH_ARGS[@]}"
[ "$SHIFT" = 3 ] || score "base4_s$SHIFT" "$STUDENT" 4 3 --shift "$SHIFT" "${WIDTH_ARGS[@]}"
python - "$OUT/eval" <<'PY'
import json, pathlib, sys
for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    r = json.loads(p.read_text())
    r = r.get("shapes_eval", r)  # pocketdit eval's report holds ShapesEval's under "shapes_eval"
    g, s = r["scores"]["geneval"]["overall"], r["scores"]["strict"]["overall"]
    print(f"{p.stem:8s} {g['mean']:.3f} [{g['lo']:.2f}, {g['hi']:.2f}]  strict {s['mean']:.3f} [{s['lo']:.2f}, {s['hi']:.2f}]")
PY
