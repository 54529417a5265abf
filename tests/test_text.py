"""Text encoders: the shipped MiniLM, tiny random CLIP/T5 from local dirs, the conditioner's dropout."""

from pathlib import Path

import pytest
import torch

from pocketdit.text import (
    HFTextEncoder,
    MiniLMEncoder,
    TextConditioner,
    TextEncoder,
    TextEncoderNotFoundError,
    build_text_conditioner,
    build_text_encoder,
)

pytestmark = pytest.mark.usefixtures("one_thread")


WORDS = ["a", "red", "green", "blue", "circle", "square", "triangle", "on", "left", "of", "the", "big", "small"]


def _save_word_tokenizer(path, bos_eos=False, pad=True):
    """A tiny word-level tokenizer built offline and saved as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(special + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos_eos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]" if pad else None, unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(path)
    return len(vocab)


@pytest.fixture(scope="module")
def minilm():
    return MiniLMEncoder(max_length=16)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPTextConfig, CLIPTextModel

    d = tmp_path_factory.mktemp("tiny_clip")
    vocab = _save_word_tokenizer(d, bos_eos=True)
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=20, pad_token_id=0, bos_token_id=2,
                         eos_token_id=3, projection_dim=16)
    CLIPTextModel(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory):
    from transformers import T5Config, T5EncoderModel

    d = tmp_path_factory.mktemp("tiny_t5")
    vocab = _save_word_tokenizer(d)
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=vocab, d_model=20, d_kv=8, d_ff=40, num_layers=2, num_heads=2, pad_token_id=0,
                   eos_token_id=3, decoder_start_token_id=0)
    T5EncoderModel(cfg).save_pretrained(d)
    return d


# ---------------------------------------------------------------------------------------------------- MiniLM
def test_minilm_shapes_mask_and_determinism(minilm):
    prompts = ["a red circle", "a small blue square on the left of a big green triangle"]
    states, mask = minilm.encode(prompts)
    assert states.shape == (2, 16, 384) and states.dtype == torch.float32
    assert mask.shape == (2, 16) and mask.dtype == torch.bool
    n_tokens = [len(minilm.tokenizer(p)["input_ids"]) for p in prompts]  # includes [CLS] and [SEP]
    assert mask.sum(1).tolist() == n_tokens
    assert mask[0, : n_tokens[0]].all() and not mask[0, n_tokens[0]:].any()  # right padding
    assert minilm.embed_dim == 384 and minilm.name == "minilm-l6-v2@16"
    again, _ = minilm.encode(prompts)
    assert torch.equal(states, again)
    # Same prompt, alone or in a batch with another one: same real-token states.
    alone, _ = minilm.encode(prompts[:1])
    assert torch.allclose(alone[0, : n_tokens[0]], states[0, : n_tokens[0]], atol=1e-5)
    # Different prompts give different states.
    assert not torch.allclose(states[0, 1:3], states[1, 1:3])


def test_minilm_is_frozen(minilm):
    assert not any(p.requires_grad for p in minilm.parameters())
    minilm.train()
    assert not minilm.training and not minilm.model.training
    states, _ = minilm.encode(["a red circle"])
    assert not states.requires_grad


def test_minilm_truncates_long_prompts(minilm):
    states, mask = minilm.encode(["red " * 40])
    assert states.shape == (1, 16, 384) and mask.all()


def test_encode_rejects_bad_prompts(minilm):
    with pytest.raises(ValueError, match="empty"):
        minilm.encode([])
    with pytest.raises(TypeError, match="strings"):
        minilm.encode(["ok", 3])


# ---------------------------------------------------------------------------------------------------- local HF
def test_tiny_clip_loads_through_hf_encoder(tiny_clip_dir):
    enc = HFTextEncoder(tiny_clip_dir, max_length=12)
    assert enc.embed_dim == 24 and enc.model_type == "clip_text_model"
    states, mask = enc.encode(["a red circle", "the big blue square on the left"])
    assert states.shape == (2, 12, 24) and mask.shape == (2, 12)
    assert mask.sum(1).tolist() == [5, 9]  # <s> + words + </s>
    assert torch.isfinite(states).all()
    assert enc.name.startswith(tiny_clip_dir.name) and enc.name.endswith("@12")
    # Matches running the transformers model directly.
    from transformers import CLIPTextModel

    ref = CLIPTextModel.from_pretrained(tiny_clip_dir).eval()
    tok = enc.tokenizer(["a red circle"], padding="max_length", max_length=12, return_tensors="pt")
    with torch.no_grad():
        want = ref(**tok).last_hidden_state
    assert torch.allclose(states[:1], want, atol=1e-6)


def test_name_tracks_weights(tiny_clip_dir, tmp_path):
    import shutil

    from transformers import CLIPTextModel

    copy = tmp_path / tiny_clip_dir.name
    shutil.copytree(tiny_clip_dir, copy)
    assert HFTextEncoder(copy, max_length=8).name == HFTextEncoder(tiny_clip_dir, max_length=8).name
    model = CLIPTextModel.from_pretrained(copy)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    model.save_pretrained(copy)
    assert HFTextEncoder(copy, max_length=8).name != HFTextEncoder(tiny_clip_dir, max_length=8).name


def test_hidden_layer_selects_intermediate_states(tiny_clip_dir):
    last = HFTextEncoder(tiny_clip_dir, max_length=8)
    penult = HFTextEncoder(tiny_clip_dir, max_length=8, hidden_layer=-2)
    a, _ = last.encode(["a red circle"])
    b, _ = penult.encode(["a red circle"])
    assert a.shape == b.shape and not torch.allclose(a, b)
    assert penult.name != last.name
    with pytest.raises(ValueError, match="hidden_layer"):
        HFTextEncoder(tiny_clip_dir, max_length=8, hidden_layer=7)


def test_tiny_t5_loads_through_hf_encoder(tiny_t5_dir):
    enc = build_text_encoder(str(tiny_t5_dir), max_length=10)
    assert isinstance(enc, HFTextEncoder) and enc.embed_dim == 20
    assert type(enc.model).__name__ == "T5EncoderModel"
    states, mask = enc.encode(["green triangle", "a small red square"])
    assert states.shape == (2, 10, 20)
    assert mask.sum(1).tolist() == [2, 4]
    again, _ = enc.encode(["green triangle", "a small red square"])
    assert torch.equal(states, again)
    assert HFTextEncoder(tiny_t5_dir, max_length=10).name == enc.name  # stable across loads


def test_tiny_decoder_lm_without_pad_token(tmp_path):
    """Gemma-style decoder LM: AutoModel's last hidden state; the missing pad token falls back to eos."""
    from transformers import GemmaConfig, GemmaForCausalLM

    vocab = _save_word_tokenizer(tmp_path, bos_eos=True, pad=False)
    torch.manual_seed(0)
    cfg = GemmaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64)
    GemmaForCausalLM(cfg).save_pretrained(tmp_path)
    enc = HFTextEncoder(tmp_path, max_length=8)
    assert type(enc.model).__name__ == "GemmaModel" and enc.embed_dim == 32
    assert enc.tokenizer.pad_token == "</s>"
    states, mask = enc.encode(["a red circle", "big"])
    assert states.shape == (2, 8, 32) and mask.sum(1).tolist() == [5, 3]
    # Causal model + right padding: a prompt's real-token states do not depend on the padding after it.
    alone, _ = enc.encode(["big"])
    assert torch.allclose(alone[0, :3], states[1, :3], atol=1e-5)


def test_max_length_beyond_positions_is_an_error(tiny_clip_dir):
    with pytest.raises(ValueError, match="exceeds"):
        HFTextEncoder(tiny_clip_dir, max_length=64)


def test_missing_and_invalid_paths_give_clear_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(TextEncoderNotFoundError, match="does not exist") as e:
        build_text_encoder(str(missing))
    assert str(missing) in str(e.value) and "minilm" in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TextEncoderNotFoundError, match="config.json"):
        HFTextEncoder(empty)
    (empty / "config.json").write_text("{}")
    with pytest.raises(TextEncoderNotFoundError, match="no weights"):
        HFTextEncoder(empty)


def test_tokenizer_in_sibling_pipeline_folder(tiny_clip_dir, tmp_path):
    import shutil

    pipe = tmp_path / "pipe"
    (pipe / "text_encoder").mkdir(parents=True)
    (pipe / "tokenizer").mkdir()
    for f in tiny_clip_dir.iterdir():
        dest = "text_encoder" if f.name in ("config.json", "model.safetensors") else "tokenizer"
        shutil.copy(f, pipe / dest / f.name)
    enc = HFTextEncoder(pipe / "text_encoder", max_length=8)
    assert enc.encode(["a red circle"])[1].sum().item() == 5
    with pytest.raises(TextEncoderNotFoundError, match="pipeline folder"):
        HFTextEncoder(pipe)


# ---------------------------------------------------------------------------------------------------- conditioner
def test_conditioner_dropout_statistics_and_determinism(minilm, tiny_t5_dir):
    t5 = HFTextEncoder(tiny_t5_dir, max_length=6)
    cond = TextConditioner([minilm, t5], dropout_probs=[0.3, 0.0])
    assert cond.embed_dims == (384, 20)
    prompts = ["a red circle"] * 8
    states, masks = cond.encode(prompts)
    # Draw many keep decisions: rate close to 1 - p, independent per encoder.
    keep = cond.sample_keep(20000, torch.Generator().manual_seed(0))
    assert abs(keep[0].float().mean().item() - 0.7) < 0.02
    assert keep[1].all()
    # Dropping on real outputs: a dropped sample has an all-False mask and zero states, others unchanged.
    g1 = torch.Generator().manual_seed(123)
    s1, m1 = cond.encode(prompts, generator=g1, train=True)
    g2 = torch.Generator().manual_seed(123)
    s2, m2 = cond.encode(prompts, generator=g2, train=True)
    assert all(torch.equal(a, b) for a, b in zip(s1 + m1, s2 + m2))
    dropped = ~m1[0].any(1)
    assert torch.equal(s1[0][dropped], torch.zeros_like(s1[0][dropped]))
    assert torch.equal(s1[0][~dropped], states[0][~dropped]) and torch.equal(m1[0][~dropped], masks[0][~dropped])
    assert torch.equal(m1[1], masks[1])  # p = 0: never dropped
    # Eval mode never drops.
    s3, m3 = cond.encode(prompts, generator=torch.Generator().manual_seed(123), train=False)
    assert all(torch.equal(a, b) for a, b in zip(s3 + m3, states + masks))


def test_conditioner_rejects_bad_probabilities(minilm):
    with pytest.raises(ValueError, match=r"dropout_probs\[0\]"):
        TextConditioner([minilm], dropout_probs=[1.5])
    with pytest.raises(ValueError, match="entries"):
        TextConditioner([minilm], dropout_probs=[0.1, 0.1])


def test_conditioner_feeds_nano_pocketdit(minilm, tiny_clip_dir):
    from pocketdit.model import PocketDiT

    clip = HFTextEncoder(tiny_clip_dir, max_length=8)
    cond = TextConditioner([minilm, clip], dropout_probs=[0.5, 0.5])
    torch.manual_seed(0)
    model = PocketDiT.from_preset("nano", text_embed_dims=cond.embed_dims).eval()
    with torch.no_grad():  # DiT-style zero init makes the output 0; perturb so the text's effect is visible
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    states, masks = cond.encode(["a red circle", "a blue square"], generator=torch.Generator().manual_seed(1),
                                train=True)
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        out = model(x, t, states, masks).sample
        un_s, un_m = cond.unconditional(2)
        uncond = model(x, t, un_s, un_m).sample
        full = model(x, t, *cond.encode(["a red circle", "a blue square"])).sample
    assert out.shape == x.shape and torch.isfinite(out).all() and torch.isfinite(uncond).all()
    assert not torch.allclose(full, uncond)


def test_build_text_conditioner_from_specs(tiny_t5_dir):
    cond = build_text_conditioner(f"minilm,{tiny_t5_dir}", dropout_probs=0.2, max_lengths=[8, 6])
    assert cond.embed_dims == (384, 20) and cond.max_lengths == (8, 6) and cond.dropout_probs == [0.2, 0.2]
    with pytest.raises(ValueError, match="no text encoder"):
        build_text_conditioner("")


def test_conditioner_saves_references_not_weights(tiny_clip_dir, minilm, tmp_path):
    import json

    cond = TextConditioner([minilm, HFTextEncoder(tiny_clip_dir, max_length=8, hidden_layer=-2)], dropout_probs=0.3)
    cond.save_pretrained(tmp_path / "text")
    assert sorted(p.name for p in (tmp_path / "text").iterdir()) == ["config.json"]
    config = json.loads((tmp_path / "text" / "config.json").read_text())
    assert config["text_encoders"] == ["minilm", str(Path(tiny_clip_dir).resolve())]
    assert config["max_lengths"] == [16, 8] and config["hidden_layers"] == [-1, -2]
    # DiffusionPipeline passes these loading kwargs to every ModelMixin component
    back = TextConditioner.from_pretrained(tmp_path / "text", torch_dtype=None, device_map=None, low_cpu_mem_usage=False)
    assert back.dropout_probs == [0.0, 0.0] and back.names == cond.names
    for a, b in zip(cond.encode(["a red circle"])[0], back.encode(["a red circle"])[0]):
        assert torch.equal(a, b)

    class Custom(TextEncoder):
        def __init__(self):
            super().__init__()
            self.model, self.max_length, self.embed_dim, self.name = torch.nn.Linear(1, 1), 4, 1, "custom"

    with pytest.raises(ValueError, match="has no spec"):
        TextConditioner([Custom()]).save_pretrained(tmp_path / "custom")
    with pytest.raises(TextEncoderNotFoundError, match="not a saved TextConditioner"):
        TextConditioner.from_pretrained(tmp_path / "missing")


def test_caption_dropout_draws_encoder_by_encoder_and_takes_any_conditioner():
    from pocketdit.text import caption_dropout, caption_dropout_probs, encode_prompts

    class Duck:  # not a TextConditioner: encode() only
        embed_dims = (4, 2)
        dropout_probs = 0.5

        def encode(self, prompts):
            b = len(prompts)
            return [torch.ones(b, 3, 4), torch.ones(b, 5, 2)], [torch.ones(b, n, dtype=torch.bool) for n in (3, 5)]

    duck = Duck()
    probs = caption_dropout_probs(duck)
    assert probs == [0.5, 0.5] and caption_dropout_probs(duck, [0.1, 0.2]) == [0.1, 0.2]
    states, masks = encode_prompts(duck, ["a"] * 64)
    out_s, out_m = caption_dropout(states, masks, probs, generator=torch.Generator().manual_seed(3))
    # the draw order a resumed run relies on: one uniform per sample for encoder 0, then for encoder 1
    g = torch.Generator().manual_seed(3)
    expected = [torch.rand(64, generator=g) >= p for p in probs]
    for s, m, keep in zip(out_s, out_m, expected):
        assert torch.equal(m.any(dim=1), keep) and torch.equal(s.flatten(1).any(dim=1), keep)
    assert 0 < int(expected[0].sum()) < 64
    assert states[0].all()  # inputs untouched
