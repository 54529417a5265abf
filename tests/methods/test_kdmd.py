"""methods/kdmd.py: K-DMD and plain DMD on nano models: what each iteration trains, the update ratio, backward
simulation, the DMD gradient, LoRA fusion and the watchdog."""

import copy

import pytest
import torch

from pocketdit import flow
from pocketdit.autoencoder import PixelSpace
from pocketdit.methods.kdmd import (
    DistributionMatchingDistillation,
    KnowledgeGuidedDMD,
    LatentDriftError,
    dmd_loss,
)
from pocketdit.model import PocketDiT
from pocketdit.teachers import PocketDiTTeacher

from test_kd import FakeText, _batch, _nano


def _teacher(seed=0):
    return PocketDiTTeacher(_nano(seed), FakeText(), PixelSpace())


def _kdmd(**kw):
    kw.setdefault("lora_rank", 4)
    kw.setdefault("lora_alpha", 8)
    kw.setdefault("critic_lora_rank", 4)
    kw.setdefault("critic_lora_alpha", 8)
    return KnowledgeGuidedDMD(_nano(), FakeText(), PixelSpace(), teacher=_teacher(), few_step_teacher=_teacher(1), **kw)


def _grads(module):
    return {n: p.grad for n, p in module.named_parameters()}


def test_one_student_iteration_trains_exactly_the_lora_critic_and_projector():
    m = _kdmd()
    m.global_step = 0  # a student turn
    out = m.step(_batch())
    assert {"critic_loss", "dmd_loss", "kd_out", "kd_feat", "student_loss", "loss"} <= set(out)
    sg = _grads(m.student)
    assert all(("lora_" in n) == (g is not None) for n, g in sg.items()), "only the student's LoRA gets gradients"
    assert any(g is not None and g.abs().sum() > 0 for n, g in sg.items() if "lora_B" in n)
    cg = _grads(m.critic)
    assert all(("lora_" in n) == (g is not None) for n, g in cg.items())
    assert all(p.grad is not None for p in m.projector.parameters())
    assert all(p.grad is None for p in m.teacher.parameters()) and all(p.grad is None for p in m.few_step_teacher.parameters())


@pytest.mark.parametrize("mode", ["dmd2", "fastgen"])
def test_update_ratio(mode):
    m = _kdmd(student_update_every=3, ratio_mode=mode, feat_weight=0.0)
    turns = []
    for step in range(6):
        m.global_step = step
        for p in (*m.student.parameters(), *m.critic.parameters()):
            p.grad = None
        m.step(_batch(2))
        student = any(p.grad is not None for p in m.student.parameters())
        critic = any(p.grad is not None for p in m.critic.parameters())
        turns.append((student, critic))
    if mode == "dmd2":  # critic every iteration, the student too every 3rd
        assert turns == [(True, True), (False, True), (False, True)] * 2
    else:  # every 3rd iteration is a student step instead of a critic step
        assert turns == [(True, False), (False, True), (False, True)] * 2


def test_backward_simulation_follows_the_students_sampler():
    m = _kdmd(num_steps=4, shift=3.0)
    torch.testing.assert_close(m.sigmas[:-1], torch.tensor([1.0, 0.9, 0.75, 0.5]))
    states, masks = FakeText().encode(["a", "bb"])
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        def fn(x, t, cond):
            return m.student(x, t, states[0], masks[0]).sample
        full = flow.euler_sample(fn, noise, 4, shift=3.0)
        part = flow.euler_sample(fn, noise, 4, shift=3.0, timesteps=[1.0, 0.9, 0.75])
    torch.testing.assert_close(m.simulate(noise, 4, states[0], masks[0]), full)
    torch.testing.assert_close(m.simulate(noise, 2, states[0], masks[0]), part)
    torch.testing.assert_close(m.generate(noise, ["a", "bb"]), full)


def test_dmd_gradient_by_hand_and_zero_when_critic_is_teacher():
    x0_hat = torch.tensor([[[[1.0, 2.0]]], [[[0.0, 4.0]]]], requires_grad=True)
    real = torch.tensor([[[[0.0, 0.0]]], [[[1.0, 1.0]]]])
    fake = torch.tensor([[[[2.0, 1.0]]], [[[1.0, 3.0]]]])
    loss, g = dmd_loss(x0_hat, real, fake)
    # per-sample norms: mean|x0_hat - real| = 1.5 and 2.0
    want = torch.tensor([[[[2 / 1.5, 1 / 1.5]]], [[[0.0, 1.0]]]])
    torch.testing.assert_close(g, want)
    loss.backward()
    torch.testing.assert_close(x0_hat.grad, want / want.numel())  # 0.5 mse -> g / numel
    loss0, g0 = dmd_loss(x0_hat, real, real)
    assert loss0.item() == 0 and g0.abs().max() == 0
    _, g_nan = dmd_loss(real.clone(), real, fake)  # x0_hat == real: a 0/0 made finite
    assert torch.isfinite(g_nan).all()


def test_fused_student_equals_the_adapter():
    m = _kdmd()
    with torch.no_grad():
        for n, p in m.student.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    fused = m.fused_student()
    assert not any("lora" in n for n, _ in fused.named_parameters())
    assert set(fused.state_dict()) == set(PocketDiT.from_config(fused.config).state_dict())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0.9, 0.5])
    states, masks = FakeText().encode(["a", "bb"])
    with torch.no_grad():
        torch.testing.assert_close(fused(x, t, states[0], masks[0]).sample, m.student(x, t, states[0], masks[0]).sample,
                                   atol=1e-5, rtol=1e-4)


def test_plain_dmd_and_kdmd_options_are_checked():
    with pytest.raises(ValueError, match="few-step teacher"):
        KnowledgeGuidedDMD(_nano(), FakeText(), PixelSpace(), teacher=_teacher(), lora_rank=4, critic_lora_rank=4)
    with pytest.raises(ValueError, match="no few-step teacher"):
        DistributionMatchingDistillation(_nano(), FakeText(), PixelSpace(), teacher=_teacher(), few_step_teacher=_teacher())
    m = DistributionMatchingDistillation(_nano(), FakeText(), PixelSpace(), teacher=_teacher(), lora_rank=4,
                                         critic_lora_rank=0)
    m.global_step = 0
    out = m.step(_batch(2))
    assert "kd_out" not in out and "dmd_loss" in out
    assert all(p.grad is not None for p in m.critic.parameters() if p.requires_grad)  # full-parameter critic


def test_watchdog_logs_statistics_and_stops_on_drift():
    m = _kdmd(watch_every=1, watch_images=2, feat_weight=0.0)
    m.global_step = 0
    out = m.step(_batch(2))
    assert {"watch_latent_mean", "watch_pixel_std", "watch_clipped", "watch_teacher_latent_mean"} <= set(out)
    with torch.no_grad():  # make the student paint everything dark: its output bias pushes x0 down
        base = m.student.final_layer.linear
        (base.base_layer if hasattr(base, "base_layer") else base).bias.fill_(3.0)
    m.global_step = 1
    with pytest.raises(LatentDriftError, match="darkening"):
        m.step(_batch(2))


def test_feature_term_starts_at_zero_when_the_few_step_teacher_is_the_student():
    """Identity projector + normalised student tokens: a student whose few-step teacher is its own starting model
    has no feature loss to follow at the start (a random projector would start it at the features' scale)."""
    from pocketdit.methods.kd import FeatureProjector, feature_kd

    student = _nano()
    teacher = PocketDiTTeacher(copy.deepcopy(student), FakeText(), PixelSpace())
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([0.9, 0.5])
    states, masks = FakeText().encode(["a", "bb"])
    f = student(x, t, states[0], masks[0], output_features=True).features
    out = teacher(x, t, ["a", "bb"], output_features=True)
    grid = out.feature_grid
    ident = FeatureProjector({"1": f.shape[-1]}, out.features.shape[-1], init="identity")
    assert feature_kd(ident, "1", f, grid, out, student_norm=True).max() < 1e-8
    rand = FeatureProjector({"1": f.shape[-1]}, out.features.shape[-1])
    assert feature_kd(rand, "1", f, grid, out, student_norm=True).min() > 0.1
    half = FeatureProjector({"1": 4}, 6, init="identity")  # a narrower student: its channels onto the first ones
    assert torch.equal(half.proj["1"].weight, torch.eye(6, 4))
    m = _kdmd(projector_init="random")
    assert not torch.equal(m.projector.proj["1"].weight, torch.eye(*m.projector.proj["1"].weight.shape))
    assert torch.equal(_kdmd().projector.proj["1"].weight, torch.eye(*m.projector.proj["1"].weight.shape))


def _ode_kdmd(**kw):
    for k, v in (("lora_rank", 4), ("lora_alpha", 8), ("critic_lora_rank", 4), ("critic_lora_alpha", 8)):
        kw.setdefault(k, v)
    return KnowledgeGuidedDMD(_nano(), FakeText(), PixelSpace(), teacher=_teacher(), **kw)


def test_ode_teacher_is_the_teachers_own_guided_sampler():
    """ode_teacher_steps: from t = 1 the target is exactly the teacher's N-step guided Euler sampler; from a later t
    it continues on the same schedule's times below t. The teacher keeps its own shift when the student's differs."""
    m = _ode_kdmd(ode_teacher_steps=6, teacher_guidance=2.0, shift=2.0, teacher_shift=3.0)
    torch.testing.assert_close(m.sigmas, flow.timestep_schedule(4, 2.0))
    captions = ["a", "bb"]
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    def fn(x, t, cond):
        return m.teacher(x, t, captions if cond else [None, None]).velocity

    x0 = flow.euler_sample(fn, noise, 6, shift=3.0, guidance_scale=2.0)
    out = m.teacher_ode(noise, torch.ones(2), captions)
    torch.testing.assert_close(noise - out.velocity, x0, atol=1e-5, rtol=1e-5)  # t = 1: x0 = x_t - v
    times = flow.timestep_schedule(6, 3.0).tolist()
    x_mid = flow.euler_sample(fn, noise, 6, shift=3.0, guidance_scale=2.0, timesteps=times[:3])
    t_mid = torch.full((2,), times[2])
    later = m.teacher_ode(x_mid, t_mid, captions)
    torch.testing.assert_close(flow.predict_x0(x_mid, later.velocity, t_mid), x0, atol=1e-5, rtol=1e-5)
    off = m.teacher_ode(noise, torch.full((2,), 0.8), captions, output_features=True)  # 0.8 is not on the schedule
    assert off.features is not None and torch.isfinite(off.velocity).all()
    with pytest.raises(ValueError, match="one time"):
        m.teacher_ode(noise, torch.tensor([1.0, 0.5]), captions)


def test_kdmd_with_the_ode_teacher_trains_the_student_and_is_checked():
    m = _ode_kdmd(ode_teacher_steps=4)
    m.global_step = 0
    out = m.step(_batch(2))
    assert {"dmd_loss", "kd_out", "kd_feat"} <= set(out) and out["kd_out"] > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in m.student.named_parameters() if "lora_B" in n)
    assert all(p.grad is None for p in m.teacher.parameters())
    assert m.projector.proj["1"].weight.shape[0] == m.teacher.feature_dim
    with pytest.raises(ValueError, match="not both"):
        _ode_kdmd(ode_teacher_steps=4, few_step_teacher=_teacher(1))
    with pytest.raises(ValueError, match="ode_teacher_steps must be"):
        _ode_kdmd(ode_teacher_steps=-1)
    with pytest.raises(ValueError, match="teacher_shift must be"):
        _ode_kdmd(ode_teacher_steps=4, teacher_shift=0.0)
    assert _ode_kdmd(ode_teacher_steps=4, shift=2.0).teacher_shift == 2.0  # default: the student's
    with pytest.raises(ValueError, match="no few-step teacher"):
        DistributionMatchingDistillation(_nano(), FakeText(), PixelSpace(), teacher=_teacher(), ode_teacher_steps=4)
