"""A disk record of a teacher's answers along one training run's data and noise stream.

Knowledge distillation asks the teacher about the exact (x_t, t, prompts) of each step. The trainer's stream is
deterministic (data order, caption dropout, timesteps and noise all come from the seed), so the teacher's answers
for a run can be computed once, stored, and read back by every later student trained on the same stream: other
widths, architectures, learning rates, weightings. A student that reads the cache costs what plain training costs
plus a file read; a teacher too big to sit next to the student can run elsewhere beforehand
(`pocketdit teacher-cache`).

Layout::

    directory/
      cache.json                    the teacher's identity and output layout (what the entries depend on)
      00000012-r0.safetensors       step 12, data-parallel rank 0: x_t, t (for checking), velocity, features (fp16)

Each entry keeps the inputs it answers for; reading it for inputs that differ (another seed, batch size, schedule,
caption dropout, dataset) is a `TeacherCacheMismatchError`, never a silent wrong target. Values are stored in fp16
and a run that records the cache trains on the stored (rounded) values too, so recording and replaying runs are
the same training.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .base import TeacherOutput

__all__ = ["TeacherCache", "TeacherCacheError", "TeacherCacheMismatchError"]

FORMAT = 1
STORE_DTYPE = torch.float16
# x_t is stored in fp16; a recomputed x_t of the same stream rounds to the same value (or one ulp away on another
# machine's kernels): 2e-3 relative is far below what another noise draw or image changes.
X_TOL = 2e-3


class TeacherCacheError(ValueError):
    """The teacher cache cannot serve this run (missing entry, other teacher, unreadable file)."""


class TeacherCacheMismatchError(TeacherCacheError):
    """A cache entry answers other inputs than this run's (another data/noise stream)."""


class TeacherCache:
    """Entries keyed by (step, rank) under `directory` (see the module docstring).

    Args:
        directory: the cache directory (created on the first `put`).
        identity: what the stored answers depend on (teacher, width, guidance, dtype, feature layout, latent space);
            compared with the directory's `cache.json`, which it creates. None: read-only use of an existing cache,
            whose identity is then `self.identity`.
    """

    def __init__(self, directory, identity: Optional[dict] = None):
        self.directory = Path(directory)
        self.meta_path = self.directory / "cache.json"
        stored = self._read_meta()
        if identity is None:
            if stored is None:
                raise TeacherCacheError(
                    f"no teacher cache at {self.directory} (no cache.json): record one first with `pocketdit "
                    "teacher-cache CONFIG --teacher T -o DIR`, or give the teacher too so that training records it"
                )
            self.identity = stored
        else:
            identity = json.loads(json.dumps(identity))  # tuples -> lists, as they come back from disk
            if stored is not None and stored != identity:
                diff = sorted(k for k in set(stored) | set(identity) if stored.get(k) != identity.get(k))
                shown = "; ".join(f"{k}: cache {stored.get(k)!r}, now {identity.get(k)!r}" for k in diff)
                raise TeacherCacheMismatchError(
                    f"the teacher cache at {self.directory} was recorded for another teacher setting ({shown}); "
                    "use a fresh directory for this one"
                )
            self.identity = identity
            if stored is None:
                self.directory.mkdir(parents=True, exist_ok=True)
                tmp = self.meta_path.with_suffix(".json.tmp")
                tmp.write_text(json.dumps(identity, indent=2))
                os.replace(tmp, self.meta_path)

    def _read_meta(self) -> Optional[dict]:
        if not self.meta_path.is_file():
            return None
        try:
            meta = json.loads(self.meta_path.read_text())
        except (OSError, ValueError) as e:
            raise TeacherCacheError(f"cannot read {self.meta_path}: {e}") from None
        if meta.get("format") != FORMAT:
            raise TeacherCacheError(f"{self.meta_path}: format {meta.get('format')!r}, this version reads {FORMAT}")
        return meta

    @property
    def feature_dim(self) -> Optional[int]:
        return self.identity.get("feature_dim")

    def path(self, step: int, rank: int = 0) -> Path:
        return self.directory / f"{int(step):08d}-r{int(rank)}.safetensors"

    def __contains__(self, key) -> bool:
        return self.path(*key).is_file()

    def __len__(self) -> int:
        return sum(1 for _ in self.directory.glob("*-r*.safetensors")) if self.directory.is_dir() else 0

    # ------------------------------------------------------------------------------------------------
    def put(self, step: int, rank: int, x_t: torch.Tensor, t: torch.Tensor, prompts: Sequence[Optional[str]],
            out: TeacherOutput) -> TeacherOutput:
        """Store the teacher's answer for this step's inputs; returns it as stored (fp16-rounded, fp32)."""
        tensors = {"x_t": x_t.detach().to("cpu", STORE_DTYPE).contiguous(),
                   "t": t.detach().to("cpu", torch.float32).reshape(-1).contiguous(),
                   "velocity": out.velocity.detach().to("cpu", STORE_DTYPE).contiguous()}
        if out.features is not None:
            tensors["features"] = out.features.detach().to("cpu", STORE_DTYPE).contiguous()
        meta = {"prompts": json.dumps(list(prompts)),
                "feature_grid": json.dumps(None if out.feature_grid is None else list(out.feature_grid))}
        path = self.path(step, rank)
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)  # an interrupted write leaves no half entry behind
        return self._output(tensors, meta, x_t.device)

    def get(self, step: int, rank: int, x_t: torch.Tensor, t: torch.Tensor, prompts: Sequence[Optional[str]],
            need_features: bool = False) -> Optional[TeacherOutput]:
        """The stored answer for this step, checked against the inputs; None when the step was not recorded."""
        path = self.path(step, rank)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            stored_prompts = json.loads(meta["prompts"])
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            raise TeacherCacheError(f"teacher cache entry {path} is unreadable ({e}); delete it to recompute it") from None
        where = f"teacher cache {self.directory}, step {step} (rank {rank})"
        hint = ("this run's data, seed, batch size, timestep schedule or caption dropout differ from the run that "
                "recorded the cache; use the recording run's settings or a fresh cache directory")
        if tensors["x_t"].shape != x_t.shape:
            raise TeacherCacheMismatchError(f"{where}: recorded x_t of shape {tuple(tensors['x_t'].shape)}, this "
                                            f"step's is {tuple(x_t.shape)}: {hint}")
        if stored_prompts != list(prompts):
            i = next(i for i, (a, b) in enumerate(zip(stored_prompts, prompts)) if a != b)
            raise TeacherCacheMismatchError(f"{where}: sample {i} was recorded for prompt {stored_prompts[i]!r}, this "
                                            f"step has {prompts[i]!r}: {hint}")
        if not torch.allclose(tensors["t"], t.detach().cpu().float().reshape(-1), atol=1e-6, rtol=0):
            raise TeacherCacheMismatchError(f"{where}: recorded timesteps differ from this step's: {hint}")
        x = x_t.detach().cpu().float()
        if ((tensors["x_t"].float() - x).abs() > X_TOL * (1 + x.abs())).any():
            raise TeacherCacheMismatchError(f"{where}: recorded x_t differs from this step's noisy input: {hint}")
        if need_features and "features" not in tensors:
            raise TeacherCacheError(f"{where} holds no teacher features (recorded with feature KD off); feature KD "
                                    "needs a cache recorded with it on")
        return self._output(tensors, meta, x_t.device)

    @staticmethod
    def _output(tensors: dict, meta: dict, device) -> TeacherOutput:
        grid = json.loads(meta.get("feature_grid", "null"))
        features = tensors.get("features")
        return TeacherOutput(tensors["velocity"].to(device, torch.float32),
                             None if features is None else features.to(device, torch.float32),
                             None if grid is None else tuple(grid))

    def __repr__(self) -> str:
        return f"TeacherCache({str(self.directory)!r}, {len(self)} entries)"
