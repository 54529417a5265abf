"""`pocketdit eval` on a fake pipeline that paints ground truth: options, the JSON report, the table, the grid."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pocketdit import cli
from pocketdit.evaluate.shapes_eval import image_seed, load_prompts, render_prompt


class FakeScheduler:
    def __init__(self, config):
        self.config = config

    @classmethod
    def from_config(cls, config, **overrides):
        return cls({**config, **overrides})


class FakePipeline:
    """The diffusers call's surface: ground-truth renders for shipped prompts (seeded by each image's own
    generator), "pt" output in [0, 1] under `.images`."""

    default_size = 32

    def __init__(self):
        self.scheduler = FakeScheduler({"shift": 3.0})
        self.calls = []
        self.by_text = {p["prompt"]: p for v in ("v1", "v2") for ph in (None, "canonical") for p in load_prompts(v, ph)}

    @property
    def shift(self):
        return self.scheduler.config["shift"]

    def set_progress_bar_config(self, **kwargs):
        pass

    def __call__(self, prompt, num_inference_steps, guidance_scale, height, width, generator, output_type):
        assert output_type == "pt" and len(generator) == len(prompt)
        seeds = [g.initial_seed() for g in generator]
        self.calls.append({"steps": num_inference_steps, "guidance": guidance_scale, "shift": self.shift,
                           "prompts": list(prompt), "seeds": seeds})
        images = [np.asarray(render_prompt(self.by_text[p], height, seed=s)) for p, s in zip(prompt, seeds)]
        return type("Output", (), {"images": torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255})


@pytest.fixture
def fake_pipe(monkeypatch):
    pipe = FakePipeline()
    monkeypatch.setattr(cli, "_load_pipeline", lambda path, device, ema: pipe)
    return pipe


def test_eval_writes_report_grid_and_table(tmp_path, fake_pipe, capsys):
    report = tmp_path / "out" / "eval.json"
    details = tmp_path / "details.json"
    assert cli.main(["eval", "-m", "fake", "--images-per-prompt", "1", "--output", str(report),
                     "--details", str(details), "--grid-size", "12"]) == 0
    out = capsys.readouterr().out
    assert "GenEval rule" in out and "strict" in out and "overall" in out and "144 prompts x 1 images" in out
    calls = fake_pipe.calls
    assert {c["steps"] for c in calls} == {28} and {c["guidance"] for c in calls} == {3.0}
    assert {c["shift"] for c in calls} == {3.0}
    data = json.loads(report.read_text())
    assert data["steps"] == 28 and data["shift"] == 3.0 and data["resolution"] == 32
    shapes = data["shapes_eval"]
    assert shapes["version"] == "v2" and shapes["phrasing"] == "heldout" and shapes["images_per_prompt"] == 1
    for rule in ("geneval", "strict"):
        overall = shapes["scores"][rule]["overall"]
        assert overall["lo"] <= overall["mean"] <= overall["hi"] and overall["mean"] >= 0.98
        assert set(shapes["scores"][rule]["categories"]) == set(shapes["num_prompts"])
    assert shapes["num_prompts"] == {c: 24 for c in shapes["num_prompts"]} and "results" not in shapes
    grid = Image.open(tmp_path / "out" / "eval_grid.png")  # next to the report by default
    assert grid.size == (8 * (128 + 8), 2 * (128 + 8 + 40))  # 12 prompts, 8 columns
    rows = json.loads(details.read_text())
    assert len(rows) == 144 and rows[0]["seed"] == image_seed(0, rows[0]["id"], 0) and "strict_reason" in rows[0]


def test_eval_options(tmp_path, fake_pipe, capsys):
    report = tmp_path / "eval.json"
    assert cli.main(["eval", "-m", "fake", "--images-per-prompt", "1", "--prompts", "v2", "--phrasing", "canonical",
                     "--steps", "5", "--shift", "1.5", "--seed", "3", "--output", str(report),
                     "--grid", str(tmp_path / "g.png")]) == 0
    data = json.loads(report.read_text())
    assert data["shapes_eval"]["phrasing"] == "canonical" and data["shift"] == 1.5 and data["steps"] == 5
    assert all(p.startswith("a photo of ") for c in fake_pipe.calls for p in c["prompts"])
    assert {c["shift"] for c in fake_pipe.calls} == {1.5} and fake_pipe.shift == 3.0  # the scheduler is put back
    assert (tmp_path / "g.png").is_file() and not (tmp_path / "eval_grid.png").exists()

    fake_pipe.calls.clear()
    assert cli.main(["eval", "-m", "fake", "--images-per-prompt", "2", "--prompts", "v1"]) == 0
    assert sum(len(c["prompts"]) for c in fake_pipe.calls) == 200
    assert "ShapesEval v1 (canonical phrasing): 100 prompts x 2 images" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["--prompts", "v1", "--phrasing", "heldout"], "not held-out"),
    (["--prompts", "v7"], "v7"),
    (["--prompts", "nowhere/p.json"], "nowhere/p.json"),
    (["--seed", "-1"], "--seed"),
])
def test_eval_option_errors_are_clear(argv, needle, fake_pipe, capsys):
    assert cli.main(["eval", "-m", "fake", *argv]) == 2
    assert needle in capsys.readouterr().err and not fake_pipe.calls
