"""`pocketdit` command line: help, info, train (2 steps on nano), generate, eval, override errors."""

import json

import pytest
import torch

from pocketdit.cli import _split_train_argv, main

torch.set_num_threads(1)

NANO_TRAIN = [
    "--model.preset", "nano", "--data.name", "shapes", "--data.resolution", "16", "--data.length", "16",
    "--data.batch_size", "4", "--text.max_length", "8", "--train.steps", "2", "--train.checkpoint_every", "2",
    "--train.sample_every", "2", "--train.sample_steps", "2", "--train.sample_prompts", "[a red circle]",
    "--train.progress", "false", "--train.num_threads", "1", "--train.log_every", "1",
]


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("info", "train", "generate", "eval", "train-ae", "quantize", "export", "bench"):
        assert command in out


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: pocketdit" in capsys.readouterr().out


def test_info_runs_one_denoising_step(capsys):
    assert main(["info", "--preset", "nano", "--resolution", "128", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "nano" in out and "M parameters" in out and "one denoising step" in out
    assert "latent 4x16x16" in out


def test_info_bad_resolution_names_valid_sizes(capsys):
    assert main(["info", "--preset", "nano", "--resolution", "100"]) == 2
    assert "--resolution 100" in capsys.readouterr().err


def test_train_argv_split():
    args, overrides = _split_train_argv(["cfg.yaml", "--train.steps", "2", "--resume", "auto", "--optim.lr=1e-3"])
    assert args.config == "cfg.yaml" and args.resume == "auto"
    assert overrides == ["--train.steps", "2", "--optim.lr=1e-3"]
    args, overrides = _split_train_argv(["--train.steps", "2"])  # the value is not taken for the config
    assert args.config is None and overrides == ["--train.steps", "2"]
    with pytest.raises(ValueError, match="one config file"):
        _split_train_argv(["a.yaml", "b.yaml"])


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["train", "--optim.lrr", "1"], "optim.lrr"),
        (["train", "--train.steps", "many"], "train.steps"),
        (["train", "--model.depth", "3"], "model.depth"),
        (["train", "missing.yaml"], "missing.yaml"),
        (["train", "--method.name", "nope", "--train.steps", "1"], None),
    ],
)
def test_train_config_errors_name_the_key(argv, needle, capsys, tmp_path):
    if needle is None:  # an unknown method is reported when the trainer is built
        argv = argv + ["--train.output_dir", str(tmp_path)] + NANO_TRAIN[:12]
        needle = "nope"
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


def test_train_generate_and_eval_on_nano(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *NANO_TRAIN, "--train.output_dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert "done: step 2" in out
    assert (run / "checkpoint-0000002" / "ema" / "diffusion_pytorch_model.safetensors").is_file()
    assert (run / "samples" / "step-0000002.png").is_file()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2

    image = tmp_path / "out.png"
    assert main(["generate", "a red circle", "-m", str(run), "-o", str(image), "--steps", "2"]) == 0
    from PIL import Image

    assert Image.open(image).size == (16, 16)  # the training resolution is the default size
    assert main(["generate", "a red circle", "-m", str(run), "-o", str(image), "--steps", "2", "--upscale", "4"]) == 0
    assert Image.open(image).size == (64, 64)
    assert main(["generate", "a red circle", "-m", str(run), "-o", str(image), "--size", "18"]) == 2
    assert "Nearest valid image sizes" in capsys.readouterr().err

    report = tmp_path / "eval.json"
    assert main(["eval", "-m", str(run), "--steps", "1", "--images-per-prompt", "1", "--output", str(report),
                 "--threads", "1"]) == 0
    result = json.loads(report.read_text())["shapes_eval"]
    assert 0.0 <= result["overall"] <= 1.0 and result["resolution"] == 16
    assert set(result["categories"]) == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}

    # palettize the trained pipeline: trajectory calibration, LUT fine-tuning, PSNR and ShapesEval vs fp32
    out_dir = tmp_path / "pal4"
    assert main(["quantize", str(run), "--scheme", "palettize4", "-o", str(out_dir), "--calibration-prompts", "2",
                 "--eval-steps", "2", "--finetune-steps", "2", "--finetune-indices", "--eval", "--eval-images", "2",
                 "--shapes-eval", "--shapes-eval-images", "1"]) == 0
    summary = json.loads((out_dir / "quantize_report.json").read_text())
    assert 4.0 < summary["average_bits"] <= 4.3 and summary["file_bytes"] < summary["fp32_param_bytes"] / 4
    assert summary["image_psnr_db"] > 5.0 and len(summary["image_psnr_db_per_image"]) == 2
    assert summary["finetune"]["indices"] and summary["finetune"]["lr"] == 3e-5 and summary["finetune"]["steps"] == 2
    assert min(summary["image_psnr_db_per_image"]) <= summary["image_psnr_db_median"] <= max(summary["image_psnr_db_per_image"])
    assert 0.0 <= summary["shapes_eval_quantized"] <= 1.0 and summary["shapes_eval_images_per_prompt"] == 1
    assert set(summary["shapes_eval_fp32_categories"]) == set(result["categories"])
    assert Image.open(out_dir / summary["eval_grid"]).size[0] > 2 * 16
    assert main(["generate", "a red circle", "-m", str(out_dir), "-o", str(image), "--steps", "2"]) == 0
    # the quantized pipeline is a diffusers pipeline directory too
    from diffusers import DiffusionPipeline

    assert json.loads((out_dir / "model_index.json").read_text())["transformer"] == ["pocketdit.quantize", "QuantizedPocketDiT"]
    quantized_pipe = DiffusionPipeline.from_pretrained(str(out_dir))
    assert quantized_pipe.transformer._pocketdit_quantization["scheme"] == "palettize4"

    # calibration follows the guided sampler: per step, the conditional and the unconditional (null text)
    # calls stacked on the same latents, along the trajectory the pipeline itself samples
    from pocketdit.quantize.calibration import trajectory_calibration
    from pocketdit.quantize.cli import _load_pipeline

    pipe, model = _load_pipeline(str(run))
    prompts = ["a red circle", "two squares"]
    batches = trajectory_calibration(pipe, prompts, num_steps=2, guidance_scale=2.0)
    assert len(batches) == 2
    for b in batches:
        x, mask = b["hidden_states"], b["encoder_attention_mask"]
        assert x.shape[0] == 4 and torch.equal(x[:2], x[2:])
        assert (mask[:2].sum(-1) > 0).all() and mask[2:].sum() == 0 and b["encoder_hidden_states"][2:].abs().sum() == 0
    images = pipe(prompts, num_inference_steps=2, guidance_scale=2.0, seed=0, output_type="pt").images * 2 - 1
    with torch.no_grad():
        v = model(**batches[1]).sample
    from pocketdit import flow

    t = flow.timestep_schedule(2, pipe.shift)
    guided = v[2:] + 2.0 * (v[:2] - v[2:])
    x0 = batches[1]["hidden_states"][:2] + (t[2] - t[1]) * guided
    assert torch.allclose(pipe.autoencoder.decode(x0).clamp(-1, 1), images, atol=1e-4)


def test_quantize_finetune_flags_without_steps_are_a_clear_error(tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tmp_path), "--scheme", "palettize4", "-o", str(out), "--finetune-indices"]) == 2
    assert "--finetune-steps" in capsys.readouterr().err and not out.exists()


def test_generate_from_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "x", "-m", str(tmp_path / "none"), "-o", str(tmp_path / "o.png")]) == 2
    assert "not found" in capsys.readouterr().err


def test_generate_without_model_uses_the_builtin_default(tmp_path):
    import numpy as np
    from PIL import Image

    out = tmp_path / "out.png"  # the README's main command: the 4-step default, torch-free path
    assert main(["generate", "two red circles above a blue square", "-o", str(out), "--threads", "1"]) == 0
    assert Image.open(out).size == (32, 32)
    eager = tmp_path / "eager.png"
    assert main(["generate", "two red circles above a blue square", "-o", str(eager), "--runtime", "torch",
                 "--threads", "1"]) == 0
    a, b = (np.asarray(Image.open(p)).astype(int) for p in (out, eager))
    assert np.abs(a - b).max() <= 1  # the same picture on both paths
    half = tmp_path / "half.png"  # the default's other width is its own distilled model
    assert main(["generate", "a red circle", "-o", str(half), "--model-width", "0.5", "--threads", "1"]) == 0
    assert Image.open(half).size == (32, 32)
    assert main(["generate", "a red circle", "-o", str(half), "--model-width", "0.25"]) == 2


def test_generate_without_model_names_the_missing_builtin(tmp_path, capsys, monkeypatch):
    import pocketdit.checkpoints as builtin

    monkeypatch.setattr(builtin, "_ROOT", tmp_path)  # an install without built-in weights
    assert main(["generate", "x", "-o", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert f"built-in model '{builtin.DEFAULT_MODEL}' is not installed" in err and "-m" in err
    assert not (tmp_path / "o.png").exists()


def test_forwarded_commands_reach_their_backend(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--help"])
    assert exit_.value.code == 0
    assert "--format" in capsys.readouterr().out
