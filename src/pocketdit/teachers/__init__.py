"""Teachers for knowledge distillation and K-DMD: one contract (base.py), in PocketDiT's units.

    teacher = load_teacher("runs/big")                         # a PocketDiT run/checkpoint/pipeline
    teacher = load_teacher("weights/Qwen-Image", dtype=torch.bfloat16)  # a local diffusers pipeline directory
    out = teacher(x_t, t, prompts, guidance_scale=1.0, output_features=True)
    out.velocity, out.features, out.feature_grid
"""

from .base import (
    TEACHERS,
    LatentSpaceMismatchError,
    Teacher,
    TeacherOutput,
    check_latent_space,
    latent_space_signature,
    register_teacher,
)
from .pocketdit_teacher import PocketDiTTeacher

# Diffusers teachers (Qwen-Image, FLUX.1, SD3, SANA). The module imports no optional diffusers class: one missing
# from an older diffusers is a clear ImportError only when that adapter is built.
from . import diffusers_teachers  # noqa: F401
from .diffusers_teachers import FluxTeacher, QwenImageTeacher, SanaTeacher, SD3Teacher

__all__ = [
    "TEACHERS",
    "LatentSpaceMismatchError",
    "Teacher",
    "TeacherOutput",
    "check_latent_space",
    "latent_space_signature",
    "register_teacher",
    "PocketDiTTeacher",
    "QwenImageTeacher",
    "FluxTeacher",
    "SD3Teacher",
    "SanaTeacher",
    "load_teacher",
]


def load_teacher(spec, width=None, device=None, dtype=None, kind=None):
    """A teacher from a local path: a PocketDiT run/checkpoint/pipeline, or a diffusers pipeline directory
    (model_index.json naming one of the supported transformers), or the name of a built-in model
    (pocketdit.checkpoints). `kind` forces an adapter by name."""
    from pathlib import Path

    p = Path(str(spec)).expanduser()
    if not p.exists():
        from ..checkpoints import builtin_model_path, builtin_models

        if str(spec) in builtin_models():
            p = builtin_model_path(str(spec))
    if not p.exists():
        raise FileNotFoundError(f"teacher not found: {p} (pass a PocketDiT run, checkpoint or pipeline directory, or a "
                                "local diffusers pipeline directory)")
    if kind is None:
        kind = _detect_kind(p)
    if kind not in TEACHERS:
        raise ValueError(f"unknown teacher kind {kind!r}; known: {sorted(TEACHERS)}")
    if kind == "pocketdit":
        return PocketDiTTeacher.from_pretrained(p, width=width, device=device, dtype=dtype)
    if width is not None:
        raise ValueError(f"--width applies to PocketDiT supernet teachers, not to a {kind} teacher")
    return TEACHERS[kind].from_pretrained(p, device=device, dtype=dtype)


def _detect_kind(p):
    import json

    index = p / "model_index.json"
    if index.is_file():
        try:
            cls = json.loads(index.read_text()).get("transformer", [None, None])[1]
        except (json.JSONDecodeError, AttributeError, IndexError, TypeError):
            cls = None
        if cls in (None, "PocketDiT", "QuantizedPocketDiT"):
            return "pocketdit"
        for name, adapter in TEACHERS.items():
            if getattr(adapter, "transformer_class", None) == cls:
                return name
        raise ValueError(f"{index}: transformer class {cls!r} has no teacher adapter; supported: "
                         + ", ".join(sorted(f"{getattr(a, 'transformer_class', 'PocketDiT')}" for a in TEACHERS.values())))
    return "pocketdit"
