"""teachers/cache.py: a teacher's recorded answers along a run's data/noise stream. A student that reads them trains
exactly as one that records them; another stream, another teacher or a missing step is a named error."""

import json

import pytest
import torch

from pocketdit.teachers import TeacherOutput
from pocketdit.teachers.cache import FORMAT, TeacherCache, TeacherCacheError, TeacherCacheMismatchError

IDENTITY = {"format": FORMAT, "teacher": "t", "guidance_scale": 1.0, "feature_dim": 8, "latent_space": "pixel"}


def _answer(b=2):
    g = torch.Generator().manual_seed(1)
    return TeacherOutput(torch.randn(b, 3, 4, 4, generator=g), torch.randn(b, 4, 8, generator=g), (2, 2))


def test_put_then_get_round_trips_in_fp16_and_checks_the_inputs(tmp_path):
    cache = TeacherCache(tmp_path / "c", IDENTITY)
    x, t, prompts = torch.randn(2, 3, 4, 4), torch.tensor([0.3, 0.9]), ["a", None]
    stored = cache.put(5, 0, x, t, prompts, _answer())
    assert (5, 0) in cache and (6, 0) not in cache and len(cache) == 1
    assert torch.equal(stored.velocity, _answer().velocity.half().float())  # what the recording run trains on
    back = TeacherCache(tmp_path / "c").get(5, 0, x, t, prompts, need_features=True)  # read-only: identity from disk
    assert torch.equal(back.velocity, stored.velocity) and torch.equal(back.features, stored.features)
    assert back.feature_grid == (2, 2)
    assert cache.get(6, 0, x, t, prompts) is None
    with pytest.raises(TeacherCacheMismatchError, match="prompt"):
        cache.get(5, 0, x, t, ["a", "b"])
    with pytest.raises(TeacherCacheMismatchError, match="timesteps"):
        cache.get(5, 0, x, torch.tensor([0.3, 0.8]), prompts)
    with pytest.raises(TeacherCacheMismatchError, match="noisy input"):
        cache.get(5, 0, x + 0.1, t, prompts)
    cache.get(5, 0, x * (1 + 1e-4), t, prompts)  # one fp16 ulp away (another machine's kernels) still matches


def test_another_teacher_setting_or_no_cache_is_an_error(tmp_path):
    TeacherCache(tmp_path / "c", IDENTITY)
    with pytest.raises(TeacherCacheMismatchError, match="guidance_scale"):
        TeacherCache(tmp_path / "c", {**IDENTITY, "guidance_scale": 3.0})
    with pytest.raises(TeacherCacheError, match="no teacher cache"):
        TeacherCache(tmp_path / "none")
    cache = TeacherCache(tmp_path / "c")
    cache.path(0).write_bytes(b"not safetensors")
    with pytest.raises(TeacherCacheError, match="unreadable"):
        cache.get(0, 0, torch.zeros(2, 3, 4, 4), torch.zeros(2), ["a", "b"])


KD_TRAIN = [
    "--model.preset", "nano", "--data.name", "shapes", "--data.resolution", "16", "--data.length", "16",
    "--data.batch_size", "4", "--text.max_length", "8", "--train.sample_every", "0", "--train.progress", "false",
    "--train.num_threads", "1", "--train.log_every", "1", "--autoencoder", "pixel", "--model.in_channels", "3",
    "--train.checkpoint_every", "3",
]


def test_students_on_a_recorded_cache_train_as_the_recording_run_did(tmp_path):
    from pocketdit.cli import main

    torch.set_num_threads(1)
    teacher, cache = tmp_path / "teacher", tmp_path / "cache"
    assert main(["train", *KD_TRAIN, "--train.steps", "1", "--train.output_dir", str(teacher)]) == 0
    kd = ["--method.name", "kd", "--method.weighting", "snapgen"]
    # 1. a KD run that records the cache as it trains (teacher live, answers stored)
    assert main(["train", *KD_TRAIN, *kd, "--method.teacher", str(teacher), "--method.teacher_cache", str(cache),
                 "--train.steps", "3", "--train.output_dir", str(tmp_path / "rec")]) == 0
    assert len(TeacherCache(cache)) == 3
    # 2. `pocketdit teacher-cache` extends it to 5 steps without training (the first 3 are checked, not recomputed)
    assert main(["teacher-cache", *KD_TRAIN, "--teacher", str(teacher), "-o", str(cache), "--steps", "5"]) == 0
    assert len(TeacherCache(cache)) == 5
    # 3. a student with the cache alone (no teacher loaded) trains exactly as the recording run, and goes on past it
    assert main(["train", *KD_TRAIN, *kd, "--method.teacher_cache", str(cache), "--train.steps", "5",
                 "--train.output_dir", str(tmp_path / "replay")]) == 0

    def losses(run):
        return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}

    rec, rep = losses(tmp_path / "rec"), losses(tmp_path / "replay")
    for step in (1, 2, 3):
        assert rec[step]["loss"] == rep[step]["loss"] and rec[step]["kd_feat_w1"] == rep[step]["kd_feat_w1"]
    assert 5 in rep
    # 4. another stream (seed) is caught at its first step; so is a step the cache does not hold
    code = main(["train", *KD_TRAIN, *kd, "--method.teacher_cache", str(cache), "--train.steps", "2",
                 "--train.seed", "1", "--train.output_dir", str(tmp_path / "other")])
    assert code == 2
    code = main(["train", *KD_TRAIN, *kd, "--method.teacher_cache", str(cache), "--train.steps", "6",
                 "--train.output_dir", str(tmp_path / "long")])
    assert code == 2
    # 5. a cache recorded for one teacher guidance cannot serve another
    code = main(["train", *KD_TRAIN, *kd, "--method.teacher", str(teacher), "--method.teacher_guidance", "2",
                 "--method.teacher_cache", str(cache), "--train.steps", "1", "--train.output_dir", str(tmp_path / "g")])
    assert code == 2
