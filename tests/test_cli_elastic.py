"""`pocketdit train` with method elastic, then `extract`, and `--width` / `--model-width` on the other commands."""

import json

import torch

from pocketdit.cli import main
from pocketdit.model import PocketDiT
from pocketdit.pipeline import PocketDiTPipeline

torch.set_num_threads(1)

ELASTIC_TRAIN = [
    "--model.preset", "nano", "--model.num_kv_heads", "4", "--model.elastic_widths", "[0.5, 1.0]",
    "--method.name", "elastic", "--data.name", "shapes", "--data.resolution", "16", "--data.length", "16",
    "--data.batch_size", "4", "--text.max_length", "8", "--train.steps", "2", "--train.checkpoint_every", "2",
    "--train.sample_every", "0", "--train.progress", "false", "--train.num_threads", "1", "--train.log_every", "1",
]


def test_elastic_train_extract_and_width_flags(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *ELASTIC_TRAIN, "--train.output_dir", str(run)]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("loss_w1" in r and "loss_w0.5" in r and "distill_w0.5" in r for r in records)
    state = json.loads((run / "checkpoint-0000002" / "trainer_state.json").read_text())
    assert set(state["method_state"]["running"]) == {"w1", "w0.5"}
    capsys.readouterr()

    out = tmp_path / "half"
    assert main(["extract", str(run), "--width", "0.5", "-o", str(out)]) == 0
    assert "hidden 32" in capsys.readouterr().out
    standalone = PocketDiT.from_pretrained(out / "transformer")
    assert standalone.elastic_widths is None and standalone.config.hidden_size == 32
    supernet = PocketDiTPipeline.from_pretrained(run).transformer
    want = supernet.extract_width(0.5)
    for (name, a), (_, b) in zip(standalone.state_dict().items(), want.state_dict().items()):
        assert torch.equal(a, b), name
    # an existing output is not overwritten; an unlisted width and a plain model are clear errors
    assert main(["extract", str(run), "--width", "0.5", "-o", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["extract", str(run), "--width", "0.25", "-o", str(tmp_path / "q")]) == 2
    assert "not one of this supernet's widths 0.5, 1" in capsys.readouterr().err
    assert main(["extract", str(out), "--width", "0.5", "-o", str(tmp_path / "again")]) == 2
    assert "not an elastic supernet" in capsys.readouterr().err

    image = tmp_path / "half.png"
    assert main(["generate", "a red circle", "-m", str(run), "--model-width", "0.5", "-o", str(image), "--steps", "2",
                 "--seed", "3"]) == 0
    from_extracted = tmp_path / "extracted.png"
    assert main(["generate", "a red circle", "-m", str(out), "-o", str(from_extracted), "--steps", "2", "--seed", "3"]) == 0
    from PIL import Image
    import numpy as np

    assert np.array_equal(np.asarray(Image.open(image)), np.asarray(Image.open(from_extracted)))
    assert main(["generate", "a red circle", "-m", str(run), "--model-width", "0.3", "-o", str(image)]) == 2
    assert "0.5, 1" in capsys.readouterr().err
    report = tmp_path / "eval.json"
    assert main(["eval", "-m", str(run), "--width", "0.5", "--steps", "1", "--images-per-prompt", "1",
                 "--output", str(report), "--threads", "1", "--prompts", "v1"]) == 0
    assert 0.0 <= json.loads(report.read_text())["shapes_eval"]["overall"] <= 1.0
    capsys.readouterr()
    assert main(["quantize", str(run), "--scheme", "int8", "--width", "0.75", "-o", str(tmp_path / "qz")]) == 2
    assert "0.5, 1" in capsys.readouterr().err
