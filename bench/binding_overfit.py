"""Can the model tell a binding apart at all? Overfit a handful of colour-attribution scenes and their
counterfactual partners (colours swapped, same layout, same noise), then compare the loss on those very scenes
under the true caption and the colour-swapped one.

    python bench/binding_overfit.py checkpoints/shapes-base [--scenes 8] [--steps 400]

If the gap stays near zero even on memorised scenes, the text pathway does not separate captions that differ only
in what binds to what; if it opens, the model can bind and the open question is data and optimisation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import setup_threads  # noqa: E402


def gaps(method, data, n, ts=(0.3, 0.6, 0.9)):
    """Mean loss ratio (swapped caption / true caption) - 1, in %, on the first n scenes and their partners."""
    from pocketdit import flow

    items = [data[i] for i in range(n)]
    x0 = torch.cat([torch.stack([it["image"] for it in items]), torch.stack([it["pair_image"] for it in items])])
    true = [it["caption"] for it in items] + [it["pair_caption"] for it in items]
    swapped = [it["pair_caption"] for it in items] + [it["caption"] for it in items]
    out = []
    model = method.model.eval()
    with torch.no_grad():
        enc = [method._encode_cached(c) for c in (true, swapped)]
        for tv in ts:
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
            t = torch.full((len(x0),), tv)
            x_t, target = flow.add_noise(x0, noise, t), flow.velocity_target(x0, noise)
            losses = [(model(x_t, t, s[0], m[0]).sample - target).square().mean().item() for s, m in enc]
            out.append(100 * (losses[1] / losses[0] - 1))
    model.train()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--scenes", type=int, default=8)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    setup_threads(args.threads)
    from pocketdit import PocketDiTPipeline
    from pocketdit.data import collate
    from pocketdit.data.shapes import ShapesDataset
    from pocketdit.methods.pretrain import FlowMatchingPretrain

    pipe = PocketDiTPipeline.from_pretrained(args.model)
    model = pipe.transformer.float().train()
    data = ShapesDataset(resolution=pipe.default_size or 32, length=args.scenes, seed=99, categories=["color_attr"],
                         pairs=True)
    method = FlowMatchingPretrain(model, pipe.text_conditioner, pipe.autoencoder, caption_dropout=0.0,
                                  text_cache_size=1000, shift=pipe.shift, logit_std=1.6)
    batch = collate([data[i] for i in range(args.scenes)])
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    print("| step | loss | swapped-caption gap t=0.3 / 0.6 / 0.9 |\n|---|---|---|")
    print(f"| 0 | | {' / '.join(f'{g:+.1f}%' for g in gaps(method, data, args.scenes))} |", flush=True)
    for step in range(1, args.steps + 1):
        loss = method.step(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, args.steps // 4) == 0:
            g = gaps(method, data, args.scenes)
            print(f"| {step} | {loss.item():.4f} | {' / '.join(f'{x:+.1f}%' for x in g)} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
