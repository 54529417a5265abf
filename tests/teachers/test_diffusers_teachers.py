"""Diffusers teachers (Qwen-Image, FLUX.1, SD3, SANA) against the diffusers pipelines themselves.

Every model is a tiny random one built here and saved as a local pipeline directory (tokenizers included, built
from small vocabularies written here), then loaded through load_teacher. The reference for each convention is
the installed diffusers pipeline: one Euler step from sigma = t to sigma = 0 returns x0 = x_t - t v with the
pipeline's own packing, timestep scale, text encoding and guidance, which the adapter must reproduce.
"""

import string

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusers.models.embeddings import get_timestep_embedding  # noqa: E402

from pocketdit.autoencoder import DiffusersAutoencoder  # noqa: E402
from pocketdit.teachers import (  # noqa: E402
    FluxTeacher,
    LatentSpaceMismatchError,
    QwenImageTeacher,
    SanaTeacher,
    SD3Teacher,
    check_latent_space,
    load_teacher,
)
from pocketdit.teachers.diffusers_teachers import _diffusers_class, pack_latents, unpack_latents  # noqa: E402

H, W = 8, 6  # latent grid; not square, so a swapped row/column convention shows
T = 0.3
PROMPTS = ["a red cube on a table", "two cats"]  # different lengths: Qwen-Image's padded text masks

CHARS = list(string.ascii_lowercase + string.digits + string.punctuation)


# ----------------------------------------------------------------------------------------------------
# Tiny tokenizers (the real classes, from vocabularies written here) and models
# ----------------------------------------------------------------------------------------------------
def _clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _clip_text(tokenizer, with_projection):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=16, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg).eval()


def _t5_tokenizer():
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)] + [(c, -2.0) for c in CHARS]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def _t5(tokenizer):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=37, d_kv=8, num_layers=1, num_heads=4,
                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(cfg).eval()


def _qwen_tokenizer():
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tok


def _qwen_vl(tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    n = len(tokenizer)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=n + 3, max_position_embeddings=1024,
                         rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                         bos_token_id=n - 3, eos_token_id=n - 1, pad_token_id=n - 3),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16),
        hidden_size=16, vocab_size=n + 3, vision_start_token_id=n, image_token_id=n + 1, video_token_id=n + 2,
        bos_token_id=n - 3, eos_token_id=n - 1)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def _gemma_tokenizer():
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for c in CHARS + ["\u2581"]:
        vocab[c] = len(vocab)
    return GemmaTokenizer(vocab=vocab, merges=[])


def _gemma2(tokenizer):
    from transformers import Gemma2Config, Gemma2Model

    cfg = Gemma2Config(vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=4, max_position_embeddings=1024,
                       pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return Gemma2Model(cfg).eval()


def _kl_vae(seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                         scaling_factor=0.5, shift_factor=0.1)


def _qwen_vae(seed=0):
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                  latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 2.0, 1.2])


def _dc_vae(seed=0):
    from diffusers import AutoencoderDC

    torch.manual_seed(seed)
    return AutoencoderDC(encoder_block_out_channels=(8, 16), decoder_block_out_channels=(8, 16),
                         encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
                         encoder_qkv_multiscales=((), ()), decoder_qkv_multiscales=((), ()),
                         encoder_block_types="ResBlock", decoder_block_types="ResBlock", latent_channels=4,
                         attention_head_dim=8, scaling_factor=0.7)


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler()  # shift 1, no dynamic shifting: sigmas=[t] is the step from t


def _flux_transformer(guidance_embeds):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=16, axes_dims_rope=[4, 4, 8], guidance_embeds=guidance_embeds)


def _sana_transformer(timestep_scale=1.0):
    from diffusers import SanaTransformer2DModel

    return SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=2, num_attention_heads=2,
                                  attention_head_dim=4, num_cross_attention_heads=2, cross_attention_head_dim=4,
                                  cross_attention_dim=8, caption_channels=8, sample_size=32,
                                  timestep_scale=timestep_scale)


def _build(kind):
    torch.manual_seed(0)
    if kind == "qwen-image":
        from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

        tok = _qwen_tokenizer()
        return QwenImagePipeline(
            scheduler=_scheduler(), vae=_qwen_vae(), text_encoder=_qwen_vl(tok), tokenizer=tok,
            transformer=QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                                    attention_head_dim=16, num_attention_heads=2,
                                                    joint_attention_dim=16, axes_dims_rope=(4, 6, 6)))
    if kind == "flux":
        from diffusers import FluxPipeline

        tok, tok2 = _clip_tokenizer(), _t5_tokenizer()
        return FluxPipeline(scheduler=_scheduler(), vae=_kl_vae(), text_encoder=_clip_text(tok, False), tokenizer=tok,
                            text_encoder_2=_t5(tok2), tokenizer_2=tok2, transformer=_flux_transformer(True))
    if kind == "sd3":
        from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

        tok, tok2, tok3 = _clip_tokenizer(), _clip_tokenizer(), _t5_tokenizer()
        return StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=4, num_layers=2,
                                              attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                                              caption_projection_dim=32, pooled_projection_dim=32, out_channels=4,
                                              pos_embed_max_size=32),
            scheduler=_scheduler(), vae=_kl_vae(), text_encoder=_clip_text(tok, True), tokenizer=tok,
            text_encoder_2=_clip_text(tok2, True), tokenizer_2=tok2, text_encoder_3=_t5(tok3), tokenizer_3=tok3)
    from diffusers import SanaPipeline

    tok = _gemma_tokenizer()
    return SanaPipeline(tokenizer=tok, text_encoder=_gemma2(tok), vae=_dc_vae(), transformer=_sana_transformer(),
                        scheduler=_scheduler())


KINDS = ["qwen-image", "flux", "sd3", "sana"]
CLASSES = {"qwen-image": QwenImageTeacher, "flux": FluxTeacher, "sd3": SD3Teacher, "sana": SanaTeacher}
PACKED = {"qwen-image": True, "flux": True, "sd3": False, "sana": False}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kind -> a saved tiny pipeline directory (built once per module, lazily)."""
    cache = {}

    def get(kind):
        if kind not in cache:
            path = tmp_path_factory.mktemp(kind.replace("-", "_"))
            _build(kind).save_pretrained(path)
            cache[kind] = path
        return cache[kind]

    return get


@pytest.fixture(scope="module")
def teachers(saved):
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = load_teacher(saved(kind))
        return cache[kind]

    return get


@pytest.fixture(scope="module")
def pipelines(saved):
    """The reference: the diffusers pipeline loaded from the same directory."""
    cache = {}

    def get(kind):
        if kind not in cache:
            cls = {"qwen-image": "QwenImagePipeline", "flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline",
                   "sana": "SanaPipeline"}[kind]
            pipe = getattr(diffusers, cls).from_pretrained(saved(kind))
            pipe.set_progress_bar_config(disable=True)
            cache[kind] = pipe
        return cache[kind]

    return get


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    yield


def _x_t(b=2, c=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, H, W, generator=g)


def _pipeline_x0(pipe, kind, x_t, prompts, guidance):
    """One Euler step of the pipeline from sigma = T to 0: x0 in its latent layout, back on the (C, H, W) grid."""
    vsf = pipe.vae_scale_factor
    common = dict(num_inference_steps=1, sigmas=[T], output_type="latent", return_dict=False)
    if kind == "qwen-image":
        out = pipe(prompt=prompts, latents=pack_latents(x_t), height=H * vsf, width=W * vsf,
                   negative_prompt=" " if guidance != 1 else None, true_cfg_scale=guidance, **common)[0]
    elif kind == "flux":
        out = pipe(prompt=prompts, latents=pack_latents(x_t), height=H * vsf, width=W * vsf, guidance_scale=guidance,
                   **common)[0]
    elif kind == "sd3":
        out = pipe(prompt=prompts, latents=x_t, height=H * vsf, width=W * vsf, guidance_scale=guidance, **common)[0]
    else:
        out = pipe(prompt=prompts, latents=x_t, height=64, width=64, guidance_scale=guidance,
                   use_resolution_binning=False, **common)[0]
    return unpack_latents(out, H, W) if PACKED[kind] else out


# ----------------------------------------------------------------------------------------------------
# Conventions
# ----------------------------------------------------------------------------------------------------
def test_pack_unpack_is_the_identity_and_the_pipelines_layout():
    from diffusers import FluxPipeline, QwenImagePipeline

    x = _x_t(b=2, c=4)
    tokens = pack_latents(x)
    assert tokens.shape == (2, (H // 2) * (W // 2), 16)
    assert torch.equal(unpack_latents(tokens, H, W), x)
    assert torch.equal(tokens, QwenImagePipeline._pack_latents(x, 2, 4, H, W))
    assert torch.equal(tokens, FluxPipeline._pack_latents(x, 2, 4, H, W))
    # the pipelines unpack from pixel sizes: latent size * vae_scale_factor
    assert torch.equal(FluxPipeline._unpack_latents(tokens, H * 8, W * 8, 8), x)
    assert torch.equal(QwenImagePipeline._unpack_latents(tokens, H * 8, W * 8, 8)[:, :, 0], x)
    # token k is the 2x2 patch at row k // (W/2), column k % (W/2), channels ordered (c, i, j)
    k = 4
    r, c = divmod(k, W // 2)
    assert torch.equal(tokens[0, k], x[0, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2].reshape(-1))


@pytest.mark.parametrize("kind", KINDS)
def test_load_teacher_picks_the_adapter_from_model_index(teachers, kind):
    teacher = teachers(kind)
    assert type(teacher) is CLASSES[kind]
    assert teacher.latent_channels == 4
    assert teacher.patch_multiple == (1 if kind == "sana" else 2)
    assert teacher.autoencoder is not None and isinstance(teacher.autoencoder, DiffusersAutoencoder)


@pytest.mark.parametrize("kind", KINDS)
def test_x0_matches_the_pipelines_euler_step(teachers, pipelines, kind):
    """x0 = x_t - t v from the adapter equals the pipeline's step from sigma = t to 0 (FlowMatchEulerDiscrete:
    prev = x + (0 - sigma) v), for the same prompts: packing, timestep scale, text encoding and v's sign at once."""
    x_t = _x_t()
    v = teachers(kind)(x_t, torch.full((2,), T), PROMPTS).velocity
    assert v.shape == x_t.shape and v.dtype == torch.float32
    expected = _pipeline_x0(pipelines(kind), kind, x_t, PROMPTS, 1.0)
    torch.testing.assert_close(x_t - T * v, expected, rtol=1e-4, atol=1e-5)


def test_x0_is_the_schedulers_x0_formula(teachers):
    """The same, by the scheduler's own x0 (stochastic sampling: x0 = sample - sigma * model_output) on the raw
    transformer output called with the pipeline's conventions by hand."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    teacher = teachers("flux")
    x_t = _x_t()
    embeds, pooled, text_ids = teacher._pipe.encode_prompt(PROMPTS, prompt_2=None)
    sched = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
    sched.set_timesteps(sigmas=[T])
    timestep = sched.timesteps[0]
    packed = pack_latents(x_t)
    raw = teacher.transformer(hidden_states=packed, timestep=timestep.expand(2) / 1000,
                              guidance=torch.full((2,), 1.0), pooled_projections=pooled, encoder_hidden_states=embeds,
                              txt_ids=text_ids, img_ids=FluxPipeline._prepare_latent_image_ids(2, H // 2, W // 2, "cpu",
                                                                                                torch.float32),
                              return_dict=False)[0]
    x0 = sched.step(raw, timestep, packed, generator=torch.Generator().manual_seed(0), return_dict=False)[0]
    v = teacher(x_t, T, PROMPTS).velocity
    torch.testing.assert_close(x_t - T * v, unpack_latents(x0, H, W), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_guided_x0_matches_the_pipeline(teachers, pipelines, kind):
    x_t = _x_t(seed=2)
    v = teachers(kind)(x_t, T, PROMPTS, guidance_scale=3.0).velocity
    expected = _pipeline_x0(pipelines(kind), kind, x_t, PROMPTS, 3.0)
    torch.testing.assert_close(x_t - T * v, expected, rtol=1e-4, atol=1e-5)


def _sinusoid_input(teacher, time_proj, x_t):
    seen = []

    def hook(module, args):
        seen.append(args[0].detach().float() * module.scale)  # Timesteps multiplies its input by `scale` first

    handle = time_proj.register_forward_pre_hook(hook)
    try:
        teacher(x_t, T, PROMPTS)
    finally:
        handle.remove()
    return seen[0]  # FLUX.1's guidance goes through the same module afterwards


@pytest.mark.parametrize("kind", KINDS)
def test_t_reaches_the_timestep_embedding_as_300(teachers, kind):
    teacher = teachers(kind)
    tf = teacher.transformer
    time_proj = tf.time_embed.emb.time_proj if kind == "sana" else tf.time_text_embed.time_proj
    value = _sinusoid_input(teacher, time_proj, _x_t())
    torch.testing.assert_close(value, torch.full((2,), 300.0), rtol=1e-5, atol=1e-3)
    # and the sinusoid itself is the one of timestep 300
    emb = time_proj(torch.full((2,), T if kind == "qwen-image" else 300.0))
    torch.testing.assert_close(emb, get_timestep_embedding(torch.full((2,), 300.0), 256, flip_sin_to_cos=True,
                                                           downscale_freq_shift=0), rtol=1e-4, atol=1e-4)


def test_sana_timestep_scale_multiplies_the_timestep(teachers):
    base = teachers("sana")
    torch.manual_seed(0)
    tf = _sana_transformer(timestep_scale=2.0)
    teacher = SanaTeacher(tf, base.text_encoder, base.tokenizer, vae=base.autoencoder)
    value = _sinusoid_input(teacher, tf.time_embed.emb.time_proj, _x_t())
    torch.testing.assert_close(value, torch.full((2,), 600.0), rtol=1e-5, atol=1e-3)


# ----------------------------------------------------------------------------------------------------
# Guidance rules by hand
# ----------------------------------------------------------------------------------------------------
def test_qwen_image_guidance_is_norm_rescaled_true_cfg(teachers):
    teacher = teachers("qwen-image")
    assert teacher.guidance_rule == "cfg-renorm"
    x_t, s = _x_t(seed=3), 4.0
    cond = pack_latents(teacher(x_t, T, PROMPTS).velocity)
    uncond = pack_latents(teacher(x_t, T, [None, None]).velocity)  # None = the negative prompt " "
    torch.testing.assert_close(uncond, pack_latents(teacher(x_t, T, [" ", " "]).velocity))
    comb = uncond + s * (cond - uncond)
    comb = comb * cond.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True)  # per packed token
    guided = teacher(x_t, T, PROMPTS, guidance_scale=s).velocity
    torch.testing.assert_close(guided, unpack_latents(comb, H, W), rtol=1e-5, atol=1e-6)
    plain = unpack_latents(uncond + s * (cond - uncond), H, W)
    assert not torch.allclose(guided, plain, atol=1e-4)  # the rescale is not a no-op here


@pytest.mark.parametrize("kind", ["sd3", "sana"])
def test_plain_cfg(teachers, kind):
    teacher = teachers(kind)
    assert teacher.guidance_rule == "cfg"
    x_t, s = _x_t(seed=4), 2.5
    cond = teacher(x_t, T, PROMPTS).velocity
    uncond = teacher(x_t, T, [None, None]).velocity
    guided = teacher(x_t, T, PROMPTS, guidance_scale=s).velocity
    torch.testing.assert_close(guided, uncond + s * (cond - uncond), rtol=1e-5, atol=1e-5)


def test_flux_guidance_embedding_is_one_pass(teachers):
    teacher = teachers("flux")
    assert teacher.guidance_embeds and teacher.guidance_rule == "embedded"
    calls = []
    handle = teacher.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(k["guidance"].clone()),
                                                           with_kwargs=True)
    try:
        guided = teacher(_x_t(), T, PROMPTS, guidance_scale=3.5).velocity
    finally:
        handle.remove()
    assert len(calls) == 1 and torch.equal(calls[0], torch.full((2,), 3.5))
    assert not torch.allclose(guided, teacher(_x_t(), T, PROMPTS).velocity)


def test_flux_without_guidance_embedding_is_true_cfg(teachers, pipelines):
    """A FLUX transformer without guidance_embeds (plain constructor from components) runs CFG with negative "",
    which is the pipeline's true_cfg_scale with negative_prompt=""."""
    from diffusers import FluxPipeline

    base = teachers("flux")
    torch.manual_seed(5)
    tf = _flux_transformer(False).eval()
    teacher = FluxTeacher(tf, base.text_encoder, base.tokenizer, base.text_encoder_2, base.tokenizer_2,
                          vae=base.autoencoder.vae)
    assert teacher.guidance_rule == "cfg" and not teacher.guidance_embeds
    ref = pipelines("flux")
    pipe = FluxPipeline(scheduler=ref.scheduler, vae=ref.vae, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer,
                        text_encoder_2=ref.text_encoder_2, tokenizer_2=ref.tokenizer_2, transformer=tf)
    pipe.set_progress_bar_config(disable=True)
    x_t, s = _x_t(seed=6), 3.0
    v = teacher(x_t, T, PROMPTS, guidance_scale=s).velocity
    vsf = pipe.vae_scale_factor
    out = pipe(prompt=PROMPTS, negative_prompt="", true_cfg_scale=s, latents=pack_latents(x_t), height=H * vsf,
               width=W * vsf, num_inference_steps=1, sigmas=[T], output_type="latent", return_dict=False)[0]
    torch.testing.assert_close(x_t - T * v, unpack_latents(out, H, W), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_features_are_the_last_blocks_image_tokens(teachers, kind):
    teacher = teachers(kind)
    x_t = _x_t()
    out = teacher(x_t, T, PROMPTS, output_features=True)
    p = teacher.patch_multiple
    gh, gw = H // p, W // p
    assert out.feature_grid == (gh, gw)
    assert out.features.shape == (2, gh * gw, teacher.feature_dim) and out.features.dtype == torch.float32
    tf = teacher.transformer
    assert teacher.feature_dim == tf.config.num_attention_heads * tf.config.attention_head_dim
    # the last block's image stream, not the normalised output: compare with a hook of our own
    seen = {}
    block = tf.single_transformer_blocks[-1] if kind == "flux" else tf.transformer_blocks[-1]
    handle = block.register_forward_hook(lambda m, a, o: seen.setdefault("o", o))
    try:
        teacher(x_t, T, PROMPTS)
    finally:
        handle.remove()
    ref = seen["o"][1] if isinstance(seen["o"], tuple) else seen["o"]
    torch.testing.assert_close(out.features, ref.float())
    if kind == "flux":
        return  # guidance-distilled: the scale is an input of the one pass, so it changes the features too
    # guidance does not change them: they come from the conditional pass
    guided = teacher(x_t, T, PROMPTS, guidance_scale=3.0, output_features=True)
    torch.testing.assert_close(guided.features, out.features)


# ----------------------------------------------------------------------------------------------------
# Latent space, inputs
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, other_vae", [("qwen-image", _qwen_vae), ("flux", _kl_vae), ("sd3", _kl_vae),
                                             ("sana", _dc_vae)])
def test_latent_space_check(teachers, saved, kind, other_vae):
    teacher = teachers(kind)
    check_latent_space(teacher, DiffusersAutoencoder.from_pretrained(saved(kind)))  # the teacher's own VAE
    with pytest.raises(LatentSpaceMismatchError, match="Train the student on the teacher's autoencoder"):
        check_latent_space(teacher, DiffusersAutoencoder(other_vae(seed=1)))  # same architecture, other weights


def test_wrong_channel_count_and_size_are_clear_errors(teachers):
    teacher = teachers("qwen-image")
    with pytest.raises(LatentSpaceMismatchError, match="denoises 4-channel latents, the student's have 5"):
        teacher(torch.randn(1, 5, H, W), T, ["a"])
    with pytest.raises(ValueError, match="needs multiples of 2"):
        teacher(torch.randn(1, 4, H, W - 1), T, ["a"])


def test_prompt_cache_and_batch_composition(teachers):
    """A prompt's velocity does not depend on what else is in the batch or on the cache (Qwen-Image pads to the
    longest prompt of each batch with a mask, like the pipeline)."""
    teacher = teachers("qwen-image")
    teacher._cache.clear()
    x_t = _x_t(b=1, seed=7)
    alone = teacher(x_t, T, [PROMPTS[1]]).velocity
    assert PROMPTS[1] in teacher._cache
    batched = teacher(torch.cat([x_t, x_t]), T, [PROMPTS[0], PROMPTS[1]]).velocity
    torch.testing.assert_close(batched[1:], alone, rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="strings or None"):
        teacher.encode_prompts([3])


def test_bfloat16_teacher_keeps_a_float32_vae(saved):
    teacher = load_teacher(saved("flux"), dtype=torch.bfloat16)
    assert teacher.dtype == torch.bfloat16 and teacher.transformer.dtype == torch.bfloat16
    assert next(teacher.autoencoder.parameters()).dtype == torch.float32
    check_latent_space(teacher, DiffusersAutoencoder.from_pretrained(saved("flux")))
    out = teacher(_x_t(), T, PROMPTS, output_features=True)
    assert out.velocity.dtype == torch.float32 and torch.isfinite(out.velocity).all()


def test_missing_diffusers_class_is_a_clear_error():
    with pytest.raises(ImportError, match="does not provide; upgrade diffusers"):
        _diffusers_class("NoSuchPipeline", "flux")
