"""methods/kd.py: output and feature KD from a teacher, fixed and timestep-aware weighting, on a plain model and a
supernet; the trainer keeps the projectors in checkpoints and resumes them exactly."""

import json
import math

import pytest
import torch
import torch.nn as nn

from pocketdit.autoencoder import PixelSpace, TinyAutoencoder
from pocketdit.methods.kd import (
    FeatureProjector,
    KnowledgeDistillation,
    outlier_mask,
    snapgen_alpha,
    timestep_aware_scaling,
)
from pocketdit.model import PocketDiT
from pocketdit.teachers import LatentSpaceMismatchError, PocketDiTTeacher, check_latent_space


class FakeText:
    """A frozen 'encoder': a fixed random state per prompt; the null condition is zeros with an all-False mask."""

    embed_dims = (32,)
    dropout_probs = [0.0]

    def encode(self, prompts):
        states = torch.stack([torch.randn(6, 32, generator=torch.Generator().manual_seed(len(p))) for p in prompts])
        return [states], [torch.ones(len(prompts), 6, dtype=torch.bool)]

    def unconditional(self, batch_size, device=None):
        return [torch.zeros(batch_size, 6, 32)], [torch.zeros(batch_size, 6, dtype=torch.bool)]


def _nano(seed=0, **kw):
    torch.manual_seed(seed)
    model = PocketDiT.from_preset("nano", in_channels=3, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _batch(n=4):
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(n, 3, 16, 16, generator=g) * 2 - 1, "caption": [f"c{'x' * i}" for i in range(n)]}


def test_snapgen_scaling_matches_its_formula_by_hand():
    task = torch.tensor([1.0, 3.0])
    kd = torch.tensor([4.0, 12.0])
    alpha = torch.tensor([0.5, 0.25])
    r = 2.0 / 8.0  # mean task / mean kd
    want = ((0.5 * 1 + 0.5 * r * 4) + (0.25 * 3 + 0.75 * r * 12)) / 2
    assert timestep_aware_scaling(task, kd, alpha).item() == pytest.approx(want)
    # the ratio is detached: KD's gradient is (1 - a) r, not through r
    kd_param = kd.clone().requires_grad_(True)
    timestep_aware_scaling(task, kd_param, alpha).backward()
    torch.testing.assert_close(kd_param.grad, (1 - alpha) * r / 2)
    # a(t): alpha_max at t = 0.5, alpha_min + (max - min) e^{-1/2} one std of logit away, alpha_min at the ends
    t = torch.tensor([0.5, 1 / (1 + math.exp(-1.0)), 1.0])
    a = snapgen_alpha(t, 0.2, 0.8, 1.0)
    torch.testing.assert_close(a[:2], torch.tensor([0.8, 0.2 + 0.6 * math.exp(-0.5)]))
    assert a[2].item() == pytest.approx(0.2, abs=1e-6)


def test_kd_losses_are_zero_when_the_student_is_the_teacher():
    student = _nano()
    teacher = PocketDiTTeacher(_nano(), FakeText(), PixelSpace())
    method = KnowledgeDistillation(student, FakeText(), PixelSpace(), teacher=teacher, task_weight=0.0,
                                   feature_norm=False, caption_dropout=0.0)
    with torch.no_grad():  # identity projector: the student's features are the teacher's
        method.projector.proj["1"].weight.copy_(torch.eye(64))
        method.projector.proj["1"].bias.zero_()
    out = method.step(_batch())
    assert out["kd_out_w1"].item() < 1e-10 and out["kd_feat_w1"].item() < 1e-10 and out["loss"].item() < 1e-10
    assert out["task_w1"].item() > 0.1  # the data term is still measured (weight 0)


def test_teacher_gets_its_null_condition_where_the_student_caption_was_dropped():
    teacher = PocketDiTTeacher(_nano(), FakeText(), PixelSpace())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0.4, 0.7])
    mixed = teacher(x, t, ["a red circle", None]).velocity
    null = teacher(x, t, cond=teacher.encode_prompts([None, None])).velocity
    states, masks = FakeText().unconditional(2)
    direct = teacher.transformer(x, t, states[0], masks[0]).sample
    torch.testing.assert_close(null, direct)
    torch.testing.assert_close(mixed[1], direct[1])
    assert (mixed[0] - direct[0]).abs().max() > 1e-4


def test_projectors_per_width_and_grid_alignment():
    student = _nano(num_kv_heads=4, elastic_widths=[0.5, 1.0])
    teacher_model = _nano(seed=1, hidden_size=48, num_heads=3, num_kv_heads=3, patch_size=4)
    teacher = PocketDiTTeacher(teacher_model, FakeText(), PixelSpace())
    method = KnowledgeDistillation(student, FakeText(), PixelSpace(), teacher=teacher, caption_dropout=0.0)
    proj = method.projector.proj
    assert {k: (m.in_features, m.out_features) for k, m in proj.items()} == {"0_5": (32, 48), "1": (64, 48)}
    feats = torch.randn(2, 64, 32)  # student 8x8 tokens at width 0.5
    y = method.projector("0_5", feats, (8, 8), (4, 4))  # teacher (patch 4) has 4x4 tokens
    assert y.shape == (2, 16, 48)
    out = method.step(_batch())
    (sub,) = method.widths_for_step(0)
    assert {"kd_out_w1", "kd_feat_w1", f"kd_feat_w{sub:g}", f"distill_w{sub:g}"} <= set(out)
    assert proj["0_5"].weight.grad is not None and proj["1"].weight.grad is not None


def test_feature_mask_drops_massive_activations():
    f = torch.zeros(1, 10, 8)
    f[0, 3, 2] = 1000.0
    m = outlier_mask(f, 2.0)
    assert not m[0, 3, 2] and m.sum() == 79


def test_a_teacher_on_another_latent_space_is_an_error():
    teacher = PocketDiTTeacher(_nano(), FakeText(), PixelSpace())
    ae = TinyAutoencoder(latent_channels=3, encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                         norm_num_groups=4)
    with pytest.raises(LatentSpaceMismatchError, match="shared_autoencoder"):
        check_latent_space(teacher, ae)
    check_latent_space(teacher, ae, shared_autoencoder=True)
    check_latent_space(teacher, PixelSpace())
    with pytest.raises(LatentSpaceMismatchError):
        KnowledgeDistillation(_nano(), FakeText(), ae, teacher=teacher)


KD_TRAIN = [
    "--model.preset", "nano", "--data.name", "shapes", "--data.resolution", "16", "--data.length", "16",
    "--data.batch_size", "4", "--text.max_length", "8", "--train.sample_every", "0", "--train.progress", "false",
    "--train.num_threads", "1", "--train.log_every", "1", "--autoencoder", "pixel", "--model.in_channels", "3",
]


def test_kd_through_the_cli_checkpoints_its_projector_and_resumes_exactly(tmp_path):
    from pocketdit.cli import main

    torch.set_num_threads(1)
    teacher = tmp_path / "teacher"
    assert main(["train", *KD_TRAIN, "--train.steps", "1", "--train.output_dir", str(teacher)]) == 0
    kd = ["--method.name", "kd", "--method.teacher", str(teacher), "--method.weighting", "snapgen",
          "--train.checkpoint_every", "2"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", *KD_TRAIN, *kd, "--train.steps", "4", "--train.output_dir", str(full)]) == 0
    assert main(["train", *KD_TRAIN, *kd, "--train.steps", "2", "--train.output_dir", str(part)]) == 0
    assert (part / "checkpoint-0000002" / "method_modules.safetensors").is_file()
    assert (part / "checkpoint-0000002" / "method_optimizer.pt").is_file()
    assert main(["train", *KD_TRAIN, *kd, "--train.steps", "4", "--train.output_dir", str(part), "--resume", "auto"]) == 0

    def losses(run):
        return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r}

    a, b = losses(full), losses(part)
    for step in (3, 4):
        assert a[step]["loss"] == b[step]["loss"] and a[step]["kd_feat_w1"] == b[step]["kd_feat_w1"]
    assert {"task_w1", "kd_out_w1", "kd_feat_w1"} <= set(a[4])


def test_contrastive_term_pushes_the_wrong_caption_loss_above_the_true_one():
    from pocketdit.methods.pretrain import FlowMatchingPretrain

    model = _nano(seed=3)
    method = FlowMatchingPretrain(model, FakeText(), PixelSpace(), caption_dropout=0.0, contrastive_weight=1.0,
                                  contrastive_margin=0.05, contrastive_min_t=0.0)
    batch = _batch(4)
    plain = FlowMatchingPretrain(_nano(seed=3), FakeText(), PixelSpace(), caption_dropout=0.0)
    torch.testing.assert_close(plain.step(dict(batch))["loss"], method.step(dict(batch))["loss"])  # no negatives: off
    batch["negative_caption"] = [c + "!" for c in batch["caption"]]  # other states from FakeText
    out = method.step(batch)
    assert {"contrast_gap", "contrast_active", "flow_loss"} <= set(out)
    assert out["contrast_active"].item() > 0  # a fresh model hardly tells the captions apart
    hinge = out["loss"] - out["flow_loss"]
    assert 0 < hinge.item() <= 0.05 + 1e-6 - out["contrast_gap"].item() + 1e-3
    out["loss"].backward()
    assert model.down_blocks[0].cross_attn.to_q.weight.grad.abs().sum() > 0


def test_counterfactual_pairs_share_noise_and_timestep():
    from pocketdit.methods.pretrain import FlowMatchingPretrain

    method = FlowMatchingPretrain(_nano(), FakeText(), PixelSpace(), caption_dropout=0.0)
    batch = _batch(3)
    plain = FlowMatchingPretrain(_nano(), FakeText(), PixelSpace(), caption_dropout=0.0)
    x_plain = plain.noisy_batch(dict(batch))[0]
    batch["pair_image"] = -batch["image"]
    batch["pair_caption"] = [c + "?" for c in batch["caption"]]
    x_t, t, target, states, masks = method.noisy_batch(batch)
    assert x_t.shape[0] == 6 and torch.equal(t[:3], t[3:])
    noise = target + torch.cat([batch["image"], batch["pair_image"]])  # target = noise - x0
    torch.testing.assert_close(noise[:3], noise[3:])
    torch.testing.assert_close(states[3:], FakeText().encode(batch["pair_caption"])[0][0])
    assert x_plain.shape[0] == 3  # without partners nothing changes
