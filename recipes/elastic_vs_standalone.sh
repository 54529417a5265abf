#!/usr/bin/env bash
# Issue 16's comparison on shapes: width 0.5 trained inside an elastic supernet vs the same width trained alone,
# both starting from the committed base (the supernet grown from it; the standalone from its 0.5 slice), the same
# data, steps and schedule. Resumable: rerun the script and each finished stage is skipped.
#   bash recipes/elastic_vs_standalone.sh [STEPS]      (default 1000; one core each, about 30 + 15 min here)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-1000}
BASE=checkpoints/shapes-base
OUT=runs/elastic_cmp
COMMON=(configs/shapes_pixel32.yaml --schedule.logit_std 1.6 --train.steps "$STEPS" --optim.schedule wsd
        --optim.decay_steps $((STEPS / 2)) --optim.min_lr_ratio 0 --optim.lr 5e-4 --train.checkpoint_every 250
        --train.sample_every 0 --train.keep_checkpoints 8)
mkdir -p "$OUT"

# The 0.5 slice of the base as a standalone model: the start of the standalone run (and of the supernet's width 0.5).
if [ ! -f "$OUT/half_init/model_index.json" ]; then
  python - "$BASE" "$OUT/half_init" <<'PY'
import sys
from pocketdit import PocketDiTPipeline
from pocketdit.checkpoint import grow_model
pipe = PocketDiTPipeline.from_pretrained(sys.argv[1])
supernet, _ = grow_model(pipe.transformer.float(), {"elastic_widths": [0.5, 1.0]})
pipe.transformer = supernet.extract_width(0.5)
pipe.save_pretrained(sys.argv[2])
PY
fi

# Elastic: the base grown into a supernet (widths 0.5 and 1), full + width 0.5 every step.
[ -f "$OUT/elastic/checkpoint-$(printf %07d "$STEPS")/trainer_state.json" ] || \
  taskset -c 0 pocketdit train "${COMMON[@]}" --model.pretrained "$BASE" --model.elastic_widths '[0.5, 1.0]' \
    --method elastic --train.output_dir "$OUT/elastic" --resume auto

# Standalone: width 0.5 alone, from the same slice.
[ -f "$OUT/half/checkpoint-$(printf %07d "$STEPS")/trainer_state.json" ] || \
  taskset -c 1 pocketdit train "${COMMON[@]}" --model.pretrained "$OUT/half_init" --model.hidden_size 96 \
    --model.num_heads 6 --model.num_kv_heads 3 --train.output_dir "$OUT/half" --resume auto
