"""PocketDiTPipeline (a diffusers DiffusionPipeline): the diffusers call, seeding, CFG and negative prompts,
equality with flow.euler_sample, swapped schedulers, validation, save/load (model_index.json, the earlier
pipeline.json format, DiffusionPipeline.from_pretrained) and the shift a training checkpoint carries."""

import json
import socket

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

from pocketdit import flow
from pocketdit.autoencoder import PixelSpace
from pocketdit.model import InvalidResolutionError, PocketDiT
from pocketdit.pipeline import PocketDiTPipeline, make_grid, make_scheduler

torch.set_num_threads(1)


class FakeText:
    embed_dims = (32,)

    def encode(self, prompts):
        states = torch.stack(
            [torch.randn(6, 32, generator=torch.Generator().manual_seed(sum(map(ord, p)))) for p in prompts]
        )
        return [states], [torch.ones(len(prompts), 6, dtype=torch.bool)]


def trained_like_model(text_dims=(32,)):
    torch.manual_seed(0)
    model = PocketDiT.from_preset("nano", in_channels=3, text_embed_dims=text_dims)
    # A fresh model has zero-initialised output and cross-attention layers (it predicts 0 and ignores text);
    # give them weights so that outputs depend on noise, prompt and guidance, as a trained model's do.
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0 and p.ndim > 1:
                p.normal_(0, 0.05)
    return model.eval()


def make_pipe(shift=1.0, **kwargs):
    pipe = PocketDiTPipeline(trained_like_model(), make_scheduler(shift), FakeText(), PixelSpace(), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


KW = dict(num_inference_steps=3, height=16, width=16, output_type="pt")


def test_generates_images_of_the_requested_size_in_every_output_type():
    pipe = make_pipe()
    images = pipe(["a red circle", "a blue square"], num_inference_steps=3, height=16, width=24, seed=0).images
    assert len(images) == 2
    assert all(im.size == (24, 16) and im.mode == "RGB" for im in images)
    t = pipe("a red circle", **KW).images
    assert t.shape == (1, 3, 16, 16) and t.min() >= 0 and t.max() <= 1  # diffusers' "pt": [0, 1]
    a = pipe("a red circle", **{**KW, "output_type": "np"}, seed=1).images
    assert isinstance(a, np.ndarray) and a.shape == (1, 16, 16, 3) and 0 <= a.min() and a.max() <= 1
    lat = pipe("a red circle", **{**KW, "output_type": "latent"}, seed=1).images
    assert lat.shape == (1, 3, 16, 16)
    assert torch.allclose(torch.from_numpy(a).permute(0, 3, 1, 2), (lat.clamp(-1, 1) + 1) / 2, atol=1e-6)
    (tup,) = pipe("a red circle", **KW, seed=1, return_dict=False)
    assert torch.equal(tup, pipe("a red circle", **KW, seed=1).images)


def test_seeding_is_reproducible_and_per_image():
    pipe = make_pipe()
    a = pipe(["x", "y"], seed=1, **KW).images
    b = pipe(["x", "y"], generator=torch.Generator().manual_seed(1), **KW).images
    c = pipe(["x", "y"], seed=2, **KW).images
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # one seed (or generator) per image: an image does not depend on its batch
    batch = pipe(["x", "y"], seed=[5, 6], **KW).images
    alone = pipe(["y"], seed=[6], **KW).images
    gens = pipe(["x", "y"], generator=[torch.Generator().manual_seed(s) for s in (5, 6)], **KW).images
    assert torch.allclose(batch[1:], alone, atol=1e-5) and torch.equal(batch, gens)
    with pytest.raises(ValueError, match="seeds for 2 images"):
        pipe(["x", "y"], seed=[1], **KW)
    with pytest.raises(ValueError, match="3 generators for 2 images"):
        pipe(["x", "y"], generator=[torch.Generator() for _ in range(3)], **KW)
    with pytest.raises(ValueError, match="either generator or seed"):
        pipe("x", seed=1, generator=torch.Generator(), **KW)


def test_num_images_per_prompt_repeats_each_prompt():
    pipe = make_pipe()
    out = pipe(["x", "y"], num_images_per_prompt=2, seed=[1, 2, 3, 4], **KW).images
    assert out.shape == (4, 3, 16, 16)
    assert torch.allclose(out[2], pipe("y", seed=[3], **KW).images[0], atol=1e-5)  # order: x, x, y, y
    with pytest.raises(ValueError, match="seeds for 4 images"):
        pipe(["x", "y"], num_images_per_prompt=2, seed=[1, 2], **KW)


def test_guidance_changes_the_result_and_scale_one_skips_uncond():
    model = trained_like_model()
    pipe = PocketDiTPipeline(model, make_scheduler(), FakeText(), PixelSpace())
    pipe.set_progress_bar_config(disable=True)
    calls = []
    model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    kw = dict(num_inference_steps=2, height=16, width=16, output_type="pt", seed=0)
    g1 = pipe(["a"], guidance_scale=1.0, **kw).images
    assert len(calls) == 2
    g4 = pipe(["a"], guidance_scale=4.0, **kw).images
    assert len(calls) == 2 + 4
    assert not torch.allclose(g1, g4)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_default_scheduler_equals_flow_euler_sample(guidance):
    shift = 2.5
    pipe = make_pipe(shift)
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    got = pipe(["a", "b"], num_inference_steps=4, guidance_scale=guidance, height=16, width=16, latents=noise,
               output_type="latent").images
    states, masks = FakeText().encode(["a", "b"])

    def denoise(x, t, conditional):
        s, m = (states[0], masks[0]) if conditional else (torch.zeros_like(states[0]), torch.zeros_like(masks[0]))
        return pipe.transformer(x, t, s, m).sample.float()

    ref = flow.euler_sample(denoise, noise, 4, shift=shift, guidance_scale=guidance)
    assert torch.allclose(got, ref, atol=1e-5)
    # the scheduler shifted linspace(1, 0) once and appended 0: flow's schedule
    assert torch.allclose(pipe.scheduler.sigmas, flow.timestep_schedule(4, shift), atol=1e-6)
    assert pipe.shift == shift


def test_negative_prompt_replaces_the_null_condition():
    model = trained_like_model()
    pipe = PocketDiTPipeline(model, make_scheduler(), FakeText(), PixelSpace())
    pipe.set_progress_bar_config(disable=True)
    masks = []
    model.register_forward_hook(lambda m, args, out: masks.append(args[3].clone()))
    kw = dict(num_inference_steps=2, height=16, width=16, output_type="pt", seed=0, guidance_scale=3.0)
    plain = pipe(["a", "b"], **kw).images
    assert masks[1].sum() == 0  # the unconditional call: all-False masks
    masks.clear()
    neg = pipe(["a", "b"], negative_prompt="blurry", **kw).images
    assert masks[1].all()  # the negative prompt's own masks
    assert not torch.allclose(plain, neg)
    same = pipe(["a", "b"], negative_prompt=["blurry", "blurry"], **kw).images
    assert torch.equal(neg, same)
    with pytest.raises(ValueError, match="negative prompts"):
        pipe(["a", "b"], negative_prompt=["x", "y", "z"], **kw)


def test_callback_on_step_end_sees_and_replaces_latents():
    pipe = make_pipe()
    seen = []

    def callback(p, i, t, kwargs):
        seen.append((i, float(t), kwargs["latents"].shape))
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == 2 else {}

    out = pipe("a", callback_on_step_end=callback, seed=0, **{**KW, "output_type": "latent"}).images
    assert [s[0] for s in seen] == [0, 1, 2] and seen[0][2] == (1, 3, 16, 16)
    assert seen[0][1] == pytest.approx(1000.0)  # scheduler timesteps: sigma * num_train_timesteps
    assert torch.equal(out, torch.zeros_like(out))
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe("a", callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["prompt_embeds"], **KW)


@pytest.mark.parametrize("scheduler", [
    lambda: FlowMatchHeunDiscreteScheduler(shift=2.0),
    lambda: FlowMatchEulerDiscreteScheduler(shift=2.0, stochastic_sampling=True),
])
def test_other_diffusers_flow_schedulers_can_be_swapped_in(scheduler):
    pipe = make_pipe(2.0)
    euler = pipe("a", seed=0, **KW).images
    pipe.scheduler = scheduler()
    assert pipe.config.scheduler[1] == type(pipe.scheduler).__name__
    a = pipe("a", seed=0, **KW).images
    b = pipe("a", seed=0, **KW).images
    assert a.shape == euler.shape and torch.isfinite(a).all() and torch.equal(a, b)
    assert not torch.allclose(a, euler)


def test_invalid_inputs_are_clear_errors():
    pipe = make_pipe()
    with pytest.raises(InvalidResolutionError, match=r"Nearest valid image sizes: .*16x16"):
        pipe(["a"], num_inference_steps=1, height=18, width=16)
    with pytest.raises(ValueError, match="no prompts"):
        pipe([], **KW)
    with pytest.raises(ValueError, match="output_type"):
        pipe("a", **{**KW, "output_type": "jpeg"})
    with pytest.raises(ValueError, match=r"latents must have shape \(2, 3, 16, 16\)"):
        pipe(["a", "b"], latents=torch.zeros(1, 3, 16, 16), **KW)
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['steps'\\]"):
        pipe("a", steps=3)


def test_the_earlier_call_keywords_are_errors_that_name_their_replacements():
    pipe = make_pipe(1.0)
    with pytest.raises(TypeError, match="'num_steps' -> num_inference_steps"):
        pipe(["x"], num_steps=3, height=16, width=16)
    with pytest.raises(TypeError, match="'progress' -> pipe.set_progress_bar_config"):
        pipe(prompts=["x"], progress=False)


def test_mismatched_components_are_rejected():
    with pytest.raises(ValueError, match="text widths"):
        PocketDiTPipeline(trained_like_model(text_dims=(48,)), make_scheduler(), FakeText(), PixelSpace())
    with pytest.raises(ValueError, match="latent channels"):
        PocketDiTPipeline(PocketDiT.from_preset("nano", text_embed_dims=(32,)), make_scheduler(), FakeText(), PixelSpace())


def test_unsavable_component_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="text_conditioner: FakeText has no save_pretrained"):
        make_pipe().save_pretrained(tmp_path / "pipe")


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_save_and_load_round_trip(tmp_path, no_network):
    from pocketdit.text import TextConditioner, build_text_conditioner

    text = build_text_conditioner("minilm", dropout_probs=0.0, max_lengths=8)
    pipe = PocketDiTPipeline(trained_like_model(text_dims=text.embed_dims), make_scheduler(2.5), text, PixelSpace(),
                             default_size=16, default_steps=3, default_guidance=2.0)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(output_type="pt", seed=3)
    before = pipe(["a green triangle"], **kw).images
    d = pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((d / "model_index.json").read_text())
    assert index["_class_name"] == "PocketDiTPipeline"
    assert index["transformer"] == ["pocketdit.model", "PocketDiT"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["text_conditioner"] == ["pocketdit.text", "TextConditioner"]
    assert index["autoencoder"] == ["pocketdit.autoencoder", "PixelSpace"]
    assert (index["default_size"], index["default_steps"], index["default_guidance"]) == (16, 3, 2.0)
    assert json.loads((d / "scheduler" / "scheduler_config.json").read_text())["shift"] == 2.5
    text_cfg = json.loads((d / "text_conditioner" / "config.json").read_text())
    assert text_cfg["text_encoders"] == ["minilm"] and text_cfg["max_lengths"] == [8]
    assert sorted(p.name for p in (d / "text_conditioner").iterdir()) == ["config.json"]  # a reference, no weights
    assert sorted(p.name for p in (d / "autoencoder").iterdir()) == ["config.json"]
    assert (d / "transformer" / "diffusion_pytorch_model.safetensors").is_file()

    loaded = PocketDiTPipeline.from_pretrained(d, device="cpu")  # .to() with a parameterless autoencoder
    assert isinstance(loaded.text_conditioner, TextConditioner) and isinstance(loaded.autoencoder, PixelSpace)
    assert (loaded.default_size, loaded.default_steps, loaded.default_guidance, loaded.shift) == (16, 3, 2.0, 2.5)
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(before, loaded(["a green triangle"], **kw).images)

    from pocketdit.export import load_parts

    parts = load_parts(d)  # what `pocketdit export` deploys
    assert (parts.shift, parts.default_size) == (2.5, 16) and isinstance(parts.autoencoder, PixelSpace)
    assert parts.text_conditioner.max_lengths == (8,)

    generic = DiffusionPipeline.from_pretrained(str(d))  # diffusers' own loader, offline
    assert type(generic) is PocketDiTPipeline and generic.shift == 2.5
    generic.set_progress_bar_config(disable=True)
    assert torch.equal(before, generic(["a green triangle"], **kw).images)


def test_earlier_pipeline_json_directory_is_converted_on_load(tmp_path):
    model = trained_like_model(text_dims=(384,))
    d = tmp_path / "old"
    model.save_pretrained(str(d / "transformer"))
    (d / "pipeline.json").write_text(json.dumps({
        "_class_name": "PocketDiTPipeline", "text_encoders": ["minilm"], "text_max_lengths": [8],
        "autoencoder": "pixel", "default_size": 16, "default_steps": 2, "default_guidance": 2.0, "default_shift": 1.7,
    }))
    with pytest.warns(FutureWarning, match="earlier format"):
        pipe = PocketDiTPipeline.from_pretrained(d)
    assert (pipe.shift, pipe.default_size, pipe.default_steps, pipe.default_guidance) == (1.7, 16, 2, 2.0)
    assert pipe.text_conditioner.max_lengths == (8,)
    pipe.set_progress_bar_config(disable=True)
    before = pipe("a red circle", seed=0, output_type="pt").images
    pipe.save_pretrained(d)  # re-saved in place: the new layout replaces pipeline.json
    assert (d / "model_index.json").is_file() and not (d / "pipeline.json").exists()
    again = PocketDiTPipeline.from_pretrained(d)
    again.set_progress_bar_config(disable=True)
    assert torch.equal(before, again("a red circle", seed=0, output_type="pt").images)


def test_missing_pipeline_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="pipeline not found"):
        PocketDiTPipeline.from_pretrained(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model_index.json").write_text(json.dumps({"_class_name": "PocketDiTPipeline"}))
    with pytest.raises(ValueError, match="no 'transformer', 'scheduler', 'text_conditioner', 'autoencoder' entries"):
        PocketDiTPipeline.from_pretrained(tmp_path / "bad")


def test_checkpoint_carries_the_schedule_shift(tmp_path):
    from pocketdit.config import load_config
    from pocketdit.trainer import build_trainer

    run = tmp_path / "run"
    cfg = load_config(None, [
        "--model.preset", "nano", "--data.name", "shapes", "--data.resolution", "16", "--data.length", "8",
        "--data.batch_size", "2", "--text.max_length", "8", "--train.steps", "1", "--train.checkpoint_every", "1",
        "--train.sample_every", "0", "--train.progress", "false", "--train.num_threads", "1",
        "--train.output_dir", str(run), "--schedule.shift", "2.5",
    ])
    trainer = build_trainer(cfg)
    assert trainer.method.shift == 2.5  # training's timestep sampling
    trainer.train()
    pipe = PocketDiTPipeline.from_pretrained(run)
    assert pipe.scheduler.config.shift == 2.5 and pipe.default_size == 16  # sampling, from the same value

    # an older checkpoint: no schedule section; it sampled with train.sample_shift (default 1.0)
    state_file = next(run.glob("checkpoint-*")) / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["schedule"]
    state["config"]["train"]["sample_shift"] = 1.5
    state_file.write_text(json.dumps(state))
    text = pipe.text_conditioner  # reuse the loaded encoder
    assert PocketDiTPipeline.from_pretrained(run, text_conditioner=text).shift == 1.5
    del state["config"]["train"]["sample_shift"]
    state_file.write_text(json.dumps(state))
    assert PocketDiTPipeline.from_checkpoint(run, text_conditioner=text).shift == 1.0


def test_make_grid_layout():
    from PIL import Image

    ims = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(5)]
    grid = make_grid(ims, ncols=3, scale=2, pad=1)
    assert grid.size == (3 * 17 + 1, 2 * 17 + 1)
    assert grid.getpixel((1 + 17 + 3, 4)) == (40, 0, 0)  # second image, upscaled
