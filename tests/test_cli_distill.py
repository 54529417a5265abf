"""`pocketdit distill`: plain DMD, then K-DMD with the DMD model as its few-step teacher, on nano; the output is a
normal pipeline that generate samples in its few steps without guidance, and a run resumes."""

import json

import torch

from pocketdit.cli import main
from pocketdit.pipeline import PocketDiTPipeline

torch.set_num_threads(1)

NANO = [
    "--model.preset", "nano", "--data.name", "shapes", "--data.resolution", "16", "--data.length", "16",
    "--data.batch_size", "2", "--text.max_length", "8", "--train.sample_every", "0", "--train.progress", "false",
    "--train.num_threads", "1", "--train.log_every", "1", "--autoencoder", "pixel", "--model.in_channels", "3",
]
SMALL_LORA = ["--method.lora_rank", "4", "--method.lora_alpha", "8", "--method.critic_lora_rank", "4",
              "--method.critic_lora_alpha", "8", "--method.student_update_every", "2"]


def test_dmd_then_kdmd_write_few_step_pipelines(tmp_path, capsys):
    base = tmp_path / "base"
    assert main(["train", *NANO, "--train.steps", "2", "--train.output_dir", str(base)]) == 0
    dmd = tmp_path / "dmd"
    assert main(["distill", "--method", "dmd", "--teacher", str(base), "--steps", "2", "--iterations", "3",
                 "-o", str(dmd), *NANO, *SMALL_LORA, "--method.teacher_guidance", "2.0",
                 # one log window of 3 iterations with the student trained only in the first: its terms must
                 # still reach the log (the window's mean, not the last iteration's values)
                 "--train.log_every", "3", "--method.student_update_every", "3"]) == 0
    assert "distilling with dmd to 2 steps" in capsys.readouterr().out
    records = [json.loads(x) for x in (dmd / "train" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and "dmd_loss" in records[0] and "critic_loss" in records[0]
    pipe = PocketDiTPipeline.from_pretrained(dmd)
    assert pipe.default_steps == 2 and pipe.default_guidance == 1.0
    assert not any("lora" in k for k in pipe.transformer.state_dict())

    # The distilled pipeline differs from its base only where the LoRA moved it
    base_pipe = PocketDiTPipeline.from_pretrained(base)
    moved = [k for k, v in pipe.transformer.state_dict().items() if not torch.equal(v, base_pipe.transformer.state_dict()[k])]
    assert moved and all(any(t in k for t in ("to_q", "to_k", "to_v", "to_out", "fc1", "fc2")) for k in moved)

    kdmd = tmp_path / "kdmd"
    args = ["distill", "--method", "kdmd", "--teacher", str(base), "--few-step-teacher", str(dmd), "--steps", "2",
            "-o", str(kdmd), *NANO, *SMALL_LORA, "--train.checkpoint_every", "2", "--train.sample_every", "2"]
    assert main([*args, "--iterations", "2"]) == 0
    assert main([*args, "--iterations", "4", "--resume", "auto"]) == 0
    records = [json.loads(x) for x in (kdmd / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert any("kd_out" in r and "kd_feat" in r for r in records)
    assert (kdmd / "train" / "samples" / "step-0000002.png").is_file()  # sample grids of the LoRA student
    image = tmp_path / "img.png"
    assert main(["generate", "a red circle", "-m", str(kdmd), "-o", str(image), "--seed", "1"]) == 0
    assert image.is_file()
    # the run's checkpoint holds adapters, not a model: a clear error, not a key dump
    assert main(["generate", "a red circle", "-m", str(kdmd / "train"), "-o", str(image)]) == 2
    assert "LoRA adapters of a distillation run" in capsys.readouterr().err
    # bad input
    assert main(["distill", "--method", "kdmd", "--teacher", str(base), "-o", str(tmp_path / "x"), *NANO]) == 2
    assert "few-step teacher" in capsys.readouterr().err
