"""ShapesEval v2 (GenEval rule and strict) against training wall-clock, for the runs of a recipe sweep.

    python bench/shapes_sweep.py RUN_OR_SNAPSHOT_DIR [...] --images-per-prompt 1 --out docs/images/shapes_sweep.png

Each argument is a directory holding checkpoint-* directories (a run, or a folder of kept snapshots of one; the
run's metrics.jsonl is looked up beside it or in --metrics). Every checkpoint is sampled at 28 steps on the
held-out phrasings and scored; results are cached as JSON next to the plot (re-running only scores new
checkpoints). Wall-clock is the run's training time up to that step, from its metrics.jsonl: elapsed time between
logged steps, so resumes and pauses between sessions do not count. The table goes to BENCHMARKS.md's
"shapes-sweep" section with --write.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import setup_threads  # noqa: E402
from report import command_line, machine_description, write_section  # noqa: E402


def training_seconds(metrics: Path) -> dict[int, float]:
    """step -> training seconds up to it: each logged window's steps / steps_per_sec, summed."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    out, total, last = {0: 0.0}, 0.0, 0
    for row in sorted(rows, key=lambda r: r["step"]):
        step = int(row["step"])
        if step <= last or not row.get("steps_per_sec"):
            continue
        total += (step - last) / float(row["steps_per_sec"])
        out[step], last = total, step
    return out


def seconds_at(table: dict[int, float], step: int) -> float:
    known = sorted(table)
    below = max(s for s in known if s <= step)
    above = [s for s in known if s >= step]
    if not above or above[0] == below:
        return table[below]
    a = above[0]
    return table[below] + (table[a] - table[below]) * (step - below) / (a - below)


def evaluate_checkpoint(ckpt: Path, images_per_prompt: int, guidance: float | None) -> dict:
    from pocketdit import PocketDiTPipeline
    from pocketdit.evaluate import shapes_eval

    pipe = PocketDiTPipeline.from_pretrained(ckpt)
    fn = shapes_eval.pipeline_generate_fn(pipe, pipe.default_size or 32, shapes_eval.DEFAULT_STEPS, guidance)
    start = time.perf_counter()
    result = shapes_eval.evaluate_generator(fn, pipe.default_size or 32, images_per_prompt=images_per_prompt,
                                            batch_size=72)
    return {"scores": result["scores"], "eval_seconds": time.perf_counter() - start,
            "images_per_prompt": images_per_prompt}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--metrics", nargs="*", type=Path, default=None, help="metrics.jsonl per run (default: beside it)")
    p.add_argument("--images-per-prompt", type=int, default=1)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("docs/images/shapes_sweep.png"))
    p.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = p.parse_args(argv)
    setup_threads(args.threads)
    cache_path = args.out.with_suffix(".json")
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    for i, run in enumerate(args.runs):
        name = run.name.replace("snap_", "")
        candidates = [args.metrics[i]] if args.metrics else [run / "metrics.jsonl", run.parent / f"sweep_{name}" / "metrics.jsonl"]
        metrics = next((m for m in candidates if m.is_file()), None)
        if metrics is None:
            p.error(f"{run}: no metrics.jsonl (looked for {', '.join(map(str, candidates))}); pass --metrics")
        clock = training_seconds(metrics)
        for ckpt in sorted(run.glob("checkpoint-*")):
            key = f"{name}/{ckpt.name}"
            if key in cache and cache[key]["images_per_prompt"] == args.images_per_prompt:
                continue
            step = int(ckpt.name.split("-")[-1])
            entry = evaluate_checkpoint(ckpt, args.images_per_prompt, args.guidance)
            cfg = json.loads((ckpt / "trainer_state.json").read_text())["config"]
            entry.update(run=name, step=step, train_seconds=seconds_at(clock, step),
                         hidden_size=cfg["model"].get("hidden_size"), batch_size=cfg["data"]["batch_size"],
                         lr=cfg["optim"]["lr"], shift=cfg["schedule"]["shift"])
            cache[key] = entry
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            cache_path.write_text(json.dumps(cache, indent=1))
            s = entry["scores"]
            print(f"{key}: {entry['train_seconds'] / 60:.0f} min, GenEval rule {s['geneval']['overall']['mean']:.3f}, "
                  f"strict {s['strict']['overall']['mean']:.3f} ({entry['eval_seconds']:.0f} s to evaluate)", flush=True)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for name in sorted({e["run"] for e in cache.values()}):
        rows = sorted((e for e in cache.values() if e["run"] == name), key=lambda e: e["step"])
        minutes = [e["train_seconds"] / 60 for e in rows]
        for ax, rule in zip(axes, ("geneval", "strict")):
            mean = [e["scores"][rule]["overall"]["mean"] for e in rows]
            lo = [e["scores"][rule]["overall"]["lo"] for e in rows]
            hi = [e["scores"][rule]["overall"]["hi"] for e in rows]
            ax.plot(minutes, mean, marker="o", label=name)
            ax.fill_between(minutes, lo, hi, alpha=0.2)
    for ax, title, target in zip(axes, ("GenEval rule", "strict"), (0.80, 0.65)):
        ax.axhline(target, color="grey", ls="--", lw=1)
        ax.set_title(f"ShapesEval v2, {title} (target {target:.2f})")
        ax.set_xlabel("training wall-clock (min)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("overall score (95% interval)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(args.out)

    lines = [
        "## ShapesEval v2 against training wall-clock",
        "",
        machine_description(),
        f"- {args.images_per_prompt} image(s) per prompt, 28 steps, held-out phrasings; train min = the run's own "
        "training time (its metrics.jsonl), on the machine and thread count it trained with",
        "",
        "| run | step | train min | GenEval rule | strict | position (strict) | color_attr (strict) |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in sorted(cache, key=lambda k: (cache[k]["run"], cache[k]["step"])):
        e = cache[key]
        g, s = e["scores"]["geneval"]["overall"], e["scores"]["strict"]["overall"]
        cat = e["scores"]["strict"]["categories"]
        lines.append(
            f"| {e['run']} | {e['step']} | {e['train_seconds'] / 60:.0f} | {g['mean']:.3f} [{g['lo']:.2f}, {g['hi']:.2f}] | "
            f"{s['mean']:.3f} [{s['lo']:.2f}, {s['hi']:.2f}] | {cat['position']['mean']:.2f} | {cat['color_attr']['mean']:.2f} |"
        )
    lines += ["", f"Command: `{command_line()}`"]
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section("shapes-sweep", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
