"""pocketdit.lite: the torch-free generation path (onnxruntime + numpy) gives the eager pipeline's images: its
noise is torch.randn's, its MiniLM is transformers', its sigmas are the scheduler's; `pocketdit generate` takes
it when the model ships it and the request fits, and says why not when forced."""

import numpy as np
import pytest
import torch

from pocketdit.lite import LitePipeline, MiniLMNumpy, flow_sigmas, has_lite, torch_randn


@pytest.mark.parametrize("seed", [0, 7, 2**31 + 5, 2**40 + 3])
@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (1, 3, 5, 7), (2, 16), (1, 4, 3, 3)])
def test_noise_is_torch_randn_of_the_same_seed(seed, shape):
    want = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).numpy()
    assert np.abs(torch_randn(seed, shape) - want).max() < 1e-6


def test_sigmas_are_the_pipeline_schedulers():
    from pocketdit.pipeline import make_scheduler

    for steps, shift in ((4, 3.0), (1, 3.0), (28, 1.0), (2, 2.5)):
        sched = make_scheduler(shift)
        sched.set_timesteps(sigmas=list(np.linspace(1.0, 0.0, steps + 1)[:-1]))
        assert np.array_equal(sched.sigmas.numpy(), flow_sigmas(steps, shift))


def test_minilm_in_numpy_matches_the_encoder(recwarn):
    from pocketdit.text import MiniLMEncoder

    prompts = ["two red circles above a blue square", "a", "a circle " * 12]
    torch_states, torch_mask = MiniLMEncoder(max_length=12).encode(prompts)
    states, mask = MiniLMNumpy(12).encode(prompts)
    assert np.array_equal(torch_mask.numpy(), mask)
    assert np.abs(torch_states.numpy()[mask] - states[mask]).max() < 1e-4


def _tiny_pipeline(path, steps=2, guidance=2.0):
    from pocketdit.autoencoder import PixelSpace
    from pocketdit.model import PocketDiT
    from pocketdit.pipeline import PocketDiTPipeline, make_scheduler
    from pocketdit.text import build_text_conditioner

    text = build_text_conditioner("minilm", max_lengths=[8])
    torch.manual_seed(0)
    model = PocketDiT.from_preset("nano", in_channels=3, text_embed_dims=(384,))
    with torch.no_grad():  # a fresh model predicts 0; give every weight a value (fp16-exact, as checkpoints are)
        for p in model.parameters():
            p.copy_((p + torch.randn_like(p) * 0.05).half().float())
    pipe = PocketDiTPipeline(model, make_scheduler(3.0), text, PixelSpace(), default_size=16, default_steps=steps,
                             default_guidance=guidance)
    pipe.save_pretrained(path)
    return PocketDiTPipeline.from_pretrained(path)


def test_write_lite_then_generate_gives_the_eager_images(tmp_path, one_thread):
    from pocketdit.cli import main
    from pocketdit.export.lite import write_lite
    from PIL import Image

    pipe = _tiny_pipeline(tmp_path / "p")
    meta = write_lite(tmp_path / "p", prompts=("a red circle", "two squares"), seeds=(0, 3), threads=1)
    assert has_lite(tmp_path / "p") and meta["graphs"] == {"1": "denoiser-w1.onnx"}
    par = meta["parity_vs_eager"]["widths"]["1"]
    assert par["images"] == 4 and (par["min_psnr_db"] is None or par["min_psnr_db"] >= 35)
    lite = LitePipeline(tmp_path / "p", threads=1)
    for steps, guidance in ((2, 2.0), (3, 1.0)):
        got = lite("a blue diamond", num_inference_steps=steps, guidance_scale=guidance, seed=5)
        with torch.no_grad():
            want = np.asarray(pipe("a blue diamond", num_inference_steps=steps, guidance_scale=guidance, seed=5).images[0])
        assert got.shape == want.shape == (16, 16, 3) and np.abs(got.astype(int) - want).max() <= 1

    out_lite, out_torch = tmp_path / "lite.png", tmp_path / "torch.png"
    common = ["generate", "a red circle", "a green square", "-m", str(tmp_path / "p"), "--num-images", "2", "--threads", "1"]
    assert main([*common, "--runtime", "lite", "-o", str(out_lite)]) == 0
    assert main([*common, "--runtime", "torch", "-o", str(out_torch)]) == 0
    a, b = (np.asarray(Image.open(p)).astype(int) for p in (out_lite, out_torch))
    assert a.shape == b.shape and np.abs(a - b).max() <= 1
    # a request the graphs do not cover: forced lite is an error naming why; auto falls back to torch
    assert main([*common, "--runtime", "lite", "--size", "32", "-o", str(tmp_path / "x.png")]) == 2
    assert main([*common, "--runtime", "lite", "--model-width", "0.5", "-o", str(tmp_path / "x.png")]) == 2
    assert main([*common, "--size", "32", "-o", str(tmp_path / "big.png")]) == 0
    assert Image.open(tmp_path / "big.png").size[1] > Image.open(out_torch).size[1]


def test_fp16_storage_keeps_what_fp16_cannot_hold(tmp_path):
    import onnx
    from onnx import helper, numpy_helper

    from pocketdit.export.lite import compress_fp16

    exact = np.arange(128, dtype=np.float32).reshape(2, 64) / 4
    inexact = exact + np.float32(1e-4)
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 64])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 64])
    graph = helper.make_graph([helper.make_node("Add", ["x", "a"], ["s"]), helper.make_node("Add", ["s", "b"], ["y"])],
                              "g", [x], [y], [numpy_helper.from_array(exact, "a"), numpy_helper.from_array(inexact, "b")])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    compress_fp16(path)
    inits = {i.name: i.data_type for i in onnx.load(str(path)).graph.initializer}
    assert inits == {"a__fp16": onnx.TensorProto.FLOAT16, "b": onnx.TensorProto.FLOAT}
    import onnxruntime as ort

    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": np.ones((2, 64), np.float32)})[0]
    assert np.array_equal(out, np.ones((2, 64), np.float32) + exact + inexact)


def test_lite_is_torch_free():
    import subprocess
    import sys

    code = "import sys, pocketdit.lite; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
