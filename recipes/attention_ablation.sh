#!/usr/bin/env bash
# Issue 19's attention ablation at shapes scale: the base recipe's model (configs/shapes_pixel32.yaml) trained from
# scratch with each Down/Up token mixer -- ASSA (global branch over 2x2-conv-compressed keys/values + blockwise
# neighbourhood attention, gated), dense, global branch only, local (blockwise) branch only -- for the same steps,
# data and seed, then ShapesEval v2 on held-out phrasings. A second ASSA run with another seed measures how far two
# runs of one variant differ, which is what a difference between variants has to beat. At 32x32 pixels the Down/Up
# stages have 8x8 tokens, so the config's 4 neighbourhood blocks of 2 rows, radius 1, let each query see 48 of the 64
# tokens; one more ASSA run with 8 blocks (a window of 3 x 1 rows: 24 of 64 tokens, nearer the 19% a 1024^2 image's
# 16 blocks give) asks whether the global branch makes up for a narrower window.
# Resumable: rerun the script and finished runs and evals are skipped.
#   bash recipes/attention_ablation.sh                 STEPS=3000, two runs at a time (one per core)
#   STEPS=1000 VARIANTS="assa dense" bash recipes/attention_ablation.sh
# Writes runs/attention_ablation/table.md, val_loss.md (held-out flow-matching loss, and each run minus the first
# paired over the same scenes, noise and timesteps) and showcase.png (one row per run, the same prompts and seed);
# ROOT= to put them elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${ROOT:-runs/attention_ablation}
STEPS=${STEPS:-3000}
VARIANTS=${VARIANTS:-"assa dense global local assa:1 assa:0:8"}  # TYPE[:SEED[:BLOCKS]] (seed 0, 4 blocks by default)
IMAGES=${IMAGES:-4}                                   # ShapesEval images per prompt
CORES=${CORES:-"0 1"}
mkdir -p "$OUT"
CKPT=checkpoint-$(printf %07d "$STEPS")

run_name() {  # VARIANT -> the run's directory name under $OUT
  local type seed blocks
  IFS=: read -r type seed blocks <<< "$1"
  echo "${type}_seed${seed:-0}${blocks:+_blocks$blocks}"
}

train_and_eval() {  # VARIANT CORE
  local type seed blocks name core=$2
  IFS=: read -r type seed blocks <<< "$1"
  seed=${seed:-0}
  name=$(run_name "$1")
  if [ ! -f "$OUT/$name/$CKPT/trainer_state.json" ]; then
    local start=$SECONDS
    taskset -c "$core" pocketdit train configs/shapes_pixel32.yaml --model.attention_types "$type" \
      ${blocks:+--model.num_blocks "$blocks"} \
      --train.seed "$seed" --data.seed "$seed" --train.steps "$STEPS" --schedule.logit_std 1.6 \
      --optim.schedule wsd --optim.decay_steps $((STEPS / 3)) --optim.min_lr_ratio 0 --train.sample_every 0 \
      --train.keep_checkpoints 1 --train.output_dir "$OUT/$name" --resume auto > "$OUT/$name.log" 2>&1 \
      || { echo "$name: training failed; the end of $OUT/$name.log:" >&2; tail -n 5 "$OUT/$name.log" >&2; return 1; }
    echo "$name train: $((SECONDS - start)) s" >> "$OUT/times.txt"
  fi
  if [ ! -f "$OUT/$name.json" ]; then
    taskset -c "$core" pocketdit eval -m "$OUT/$name/$CKPT" --images-per-prompt "$IMAGES" \
      --output "$OUT/$name.json" >> "$OUT/$name.log" 2>&1 \
      || { echo "$name: eval failed; the end of $OUT/$name.log:" >&2; tail -n 5 "$OUT/$name.log" >&2; return 1; }
  fi
}

# Run the variants two at a time, one per listed core.
read -r -a cores <<< "$CORES"
read -r -a variants <<< "$VARIANTS"
for ((i = 0; i < ${#variants[@]}; i += ${#cores[@]})); do
  pids=()
  for ((j = 0; j < ${#cores[@]} && i + j < ${#variants[@]}; j++)); do
    train_and_eval "${variants[i + j]}" "${cores[j]}" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
done

names=()
for v in "${variants[@]}"; do names+=("$(run_name "$v")"); done

python - "$OUT" "$CKPT" "${names[@]}" <<'PY'
import json, sys
from pathlib import Path

out, ckpt, names = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
cats = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
rows = ["| Down/Up mixer | blocks | seed | overall [95%] | strict | " + " | ".join(cats) + " |",
        "|---|---|---|---|---|" + "---|" * len(cats)]
for name in names:
    model = json.loads((out / name / ckpt / "transformer" / "config.json").read_text())
    kind, seed = model["attention_types"], json.loads((out / name / "config.json").read_text())["train"]["seed"]
    blocks = model["num_blocks"] if kind in ("assa", "local") else "-"
    scores = json.loads((out / f"{name}.json").read_text())["shapes_eval"]["scores"]
    g, s = scores["geneval"], scores["strict"]["overall"]
    o = g["overall"]
    rows.append(f"| {kind} | {blocks} | {seed} | {o['mean']:.3f} [{o['lo']:.2f}, {o['hi']:.2f}] | {s['mean']:.3f} | "
                + " | ".join(f"{g['categories'][c]['mean']:.2f}" for c in cats) + " |")
table = "\n".join(rows) + "\n"
(out / "table.md").write_text(table)
print(f"{ckpt}\n" + table)
PY

# Cheap beside training (a minute or two): recomputed on every call, so they always list this call's variants.
ckpts=("${names[@]/#/$OUT/}")
ckpts=("${ckpts[@]/%//$CKPT}")
taskset -c "${cores[0]}" python bench/val_loss.py "${ckpts[@]}" > "$OUT/val_loss.md.tmp"
mv "$OUT/val_loss.md.tmp" "$OUT/val_loss.md"
cat "$OUT/val_loss.md"
taskset -c "${cores[0]}" python bench/showcase.py "${ckpts[@]/%/:28:3}" -o "$OUT/showcase.png"
