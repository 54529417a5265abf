"""Turn a training checkpoint into a built-in model: checkpoints/NAME/ (a saved pipeline, fp16 EMA weights).

    python scripts/release_builtin.py runs/shapes_pixel32/checkpoint-0004000 --name shapes-base \
        --resume-copy checkpoints/shapes-base-resume

Writes the pipeline (model_index.json, transformer/ in fp16 safetensors, scheduler/, text_conditioner/,
autoencoder/), the run's config as config.yaml (`pocketdit train checkpoints/NAME/config.yaml` retrains it) and
a short README with the step and the command. --resume-copy also keeps the checkpoint's full training state
(fp32 weights, EMA, optimizer, RNG: what `--train.resume PATH` needs) in a directory outside the installed
package, so a later session can continue the same run exactly.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--name", default="shapes-base")
    p.add_argument("--resume-copy", type=Path, default=None)
    args = p.parse_args(argv)

    import torch
    import yaml

    from pocketdit import PocketDiTPipeline
    from pocketdit.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(args.checkpoint)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    out = ROOT / "checkpoints" / args.name
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = PocketDiTPipeline.from_pretrained(ckpt)  # EMA weights
    pipe.transformer.to(torch.float16)  # halves the file; loading casts back to fp32
    pipe.save_pretrained(tmp)
    config = state["config"]
    (tmp / "config.yaml").write_text(
        f"# The config that trained checkpoints/{args.name} (its trainer_state.json, step {state['step']}).\n"
        + yaml.safe_dump(config, sort_keys=False)
    )
    (tmp / "README.md").write_text(
        f"# {args.name}\n\nEMA weights (fp16) of step {state['step']} of `{config['train']['output_dir']}`; "
        f"config in `config.yaml`.\n\nTrain it again:\n\n```bash\npocketdit train checkpoints/{args.name}/config.yaml "
        f"--train.steps {state['step']}\n```\n\nScores, curves and what was tried: docs/training.md.\n"
    )
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    print(out)
    if args.resume_copy is not None:
        dest = args.resume_copy / ckpt.name
        shutil.rmtree(args.resume_copy, ignore_errors=True)
        shutil.copytree(ckpt, dest)
        (args.resume_copy / "latest").write_text(ckpt.name + "\n")
        print(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
