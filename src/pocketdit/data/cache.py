"""Optional on-disk cache of per-sample autoencoder latents and text-encoder states.

Encoding every image and caption each epoch dominates small-model training on a CPU; with a deterministic
dataset (item ``i`` is the same every time, as ``shapes``, ``emoji``, ``folder`` and ``hf`` are) the
encoder outputs can be computed once and read back.

Layout::

    directory/
      <key>/                  key = sha256 of the JSON of key_parts (16 hex digits)
        key.json              the key_parts, for humans
        00000000.safetensors  tensors of item 0 ("latents", "text_states.0", "text_mask.0", ...)
        ...

The key covers everything that changes the stored tensors (dataset identity and resolution, autoencoder
name, text-encoder names), so changing any of them selects a fresh subdirectory and stale entries are
never reused. Each entry also records its caption; an entry whose caption no longer matches the dataset's
is recomputed (with a warning). This module takes encode *callables*, so it does not depend on the
autoencoder or text modules.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Callable, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from pocketdit.data import collate

__all__ = ["CachedFeatureDataset", "FeatureCache", "cache_key_parts", "collate_cached"]

logger = logging.getLogger(__name__)

_ENTRY_FORMAT = "1"


def cache_key_parts(
    dataset,
    autoencoder_name: str | None = None,
    text_encoder_names: Sequence[str] = (),
    **extra,
) -> dict:
    """The usual key: the dataset's repr (the datasets print their settings: root/path, resolution, seed,
    length...), its resolution, and the encoders' stable names (``autoencoder.name``, ``encoder.name``).
    Pass anything else that changes the tensors (e.g. ``max_length=32``) as keyword arguments."""
    parts = {
        "dataset": repr(dataset),
        "resolution": getattr(dataset, "resolution", None),
        "autoencoder": autoencoder_name,
        "text_encoders": list(text_encoder_names),
    }
    overlap = set(parts) & set(extra)
    if overlap:
        raise ValueError(f"extra key parts {sorted(overlap)} clash with the standard ones")
    parts.update(extra)
    return parts


class FeatureCache:
    """Per-index tensor store under ``directory/<hash of key_parts>/``.

    Args:
        directory: root cache directory (created if missing).
        key_parts: JSON-serialisable dict identifying what is cached (see `cache_key_parts`).
    """

    def __init__(self, directory: str, key_parts: dict) -> None:
        if not isinstance(key_parts, dict) or not key_parts:
            raise ValueError("key_parts must be a non-empty dict, e.g. cache_key_parts(dataset, ae.name, [te.name])")
        try:
            encoded = json.dumps(key_parts, sort_keys=True)
        except TypeError as error:
            raise ValueError(f"key_parts must be JSON-serialisable: {error}") from None
        self.key_parts = key_parts
        self.key = hashlib.sha256(encoded.encode()).hexdigest()[:16]
        self.root = os.fspath(directory)
        self.directory = os.path.join(self.root, self.key)
        os.makedirs(self.directory, exist_ok=True)
        key_file = os.path.join(self.directory, "key.json")
        if not os.path.isfile(key_file):
            tmp = f"{key_file}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as handle:
                json.dump(key_parts, handle, indent=2, sort_keys=True)
            os.replace(tmp, key_file)

    def path(self, index: int) -> str:
        return os.path.join(self.directory, f"{int(index):08d}.safetensors")

    def __contains__(self, index: int) -> bool:
        return os.path.isfile(self.path(index))

    def __len__(self) -> int:
        return sum(1 for name in os.listdir(self.directory) if name.endswith(".safetensors"))

    def get(self, index: int, caption: str | None = None) -> dict[str, torch.Tensor] | None:
        """The stored tensors of ``index``, or None if absent, unreadable (logged) or made for a different
        caption (logged)."""
        path = self.path(index)
        if not os.path.isfile(path):
            return None
        try:
            tensors = load_file(path)
            from safetensors import safe_open

            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata() or {}
        except (SafetensorError, OSError, ValueError) as error:
            logger.warning("feature cache entry %s is unreadable (%s); recomputing it", path, error)
            return None
        if caption is not None and metadata.get("caption") != caption:
            logger.warning(
                "feature cache entry %s was made for caption %r, the dataset now says %r; recomputing it",
                path, metadata.get("caption"), caption,
            )
            return None
        return tensors

    def put(self, index: int, tensors: dict[str, torch.Tensor], caption: str | None = None) -> None:
        """Write atomically (temporary file then rename), so a killed run never leaves half an entry."""
        path = self.path(index)
        tmp = f"{path}.{os.getpid()}.tmp"
        metadata = {"format": _ENTRY_FORMAT}
        if caption is not None:
            metadata["caption"] = caption
        # clone: entries are often views into one batch tensor, which safetensors refuses to save together
        save_file({k: v.detach().cpu().clone() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)

    def __repr__(self) -> str:
        return f"FeatureCache(directory={self.directory!r}, entries={len(self)})"


def _flatten_text(states, mask) -> tuple[dict[str, torch.Tensor], bool]:
    """One encoder's (states, mask) or lists of them -> {"text_states.j", "text_mask.j"}, is_list."""
    is_list = isinstance(states, (list, tuple))
    states_list = list(states) if is_list else [states]
    masks_list = list(mask) if is_list else [mask]
    if len(states_list) != len(masks_list):
        raise ValueError(f"encode_text returned {len(states_list)} state tensors but {len(masks_list)} masks")
    out = {}
    for j, (s, m) in enumerate(zip(states_list, masks_list)):
        out[f"text_states.{j}"] = s
        out[f"text_mask.{j}"] = m.bool() if m is not None else torch.ones(s.shape[:-1], dtype=torch.bool)
    out["text_is_list"] = torch.tensor(is_list)
    return out, is_list


def _unflatten_text(entry: dict[str, torch.Tensor]):
    count = sum(1 for k in entry if k.startswith("text_states."))
    states = [entry[f"text_states.{j}"] for j in range(count)]
    masks = [entry[f"text_mask.{j}"] for j in range(count)]
    if bool(entry["text_is_list"]):
        return states, masks
    return states[0], masks[0]


class CachedFeatureDataset(Dataset):
    """Wraps a map-style dataset and adds ``"latents"`` (C, h, w) and ``"text_states"`` / ``"text_mask"``
    ((L, D) and (L,) bool, or lists of them, one per encoder, if ``encode_text`` returns lists) to each
    sample, computing them on first use and reading them from the cache afterwards.

    Args:
        dataset: map-style dataset of ``{"image", "caption", "meta"}`` samples, deterministic per index.
        cache: a `FeatureCache` whose key describes the dataset and both encoders.
        encode_image: images (B, 3, H, W) in [-1, 1] -> latents (B, C, h, w), e.g. ``autoencoder.encode``.
        encode_text: captions list[str] -> (states (B, L, D), mask (B, L)) or (list of states, list of masks),
            e.g. ``text_encoder.encode``. Caption dropout must happen after the cache (on the masks), not in
            this callable, or the dropped version would be stored.

    Either encoder may be None to cache only the other.
    """

    def __init__(
        self,
        dataset,
        cache: FeatureCache,
        encode_image: Callable[[torch.Tensor], torch.Tensor] | None = None,
        encode_text: Callable[[list[str]], tuple] | None = None,
    ) -> None:
        if encode_image is None and encode_text is None:
            raise ValueError("pass encode_image and/or encode_text; there is nothing to cache otherwise")
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"CachedFeatureDataset needs a map-style dataset, got {type(dataset).__name__}")
        self.dataset = dataset
        self.cache = cache
        self.encode_image = encode_image
        self.encode_text = encode_text

    def __len__(self) -> int:
        return len(self.dataset)

    def _needed(self) -> set[str]:
        needed = set()
        if self.encode_image is not None:
            needed.add("latents")
        if self.encode_text is not None:
            needed.add("text_is_list")
        return needed

    @torch.no_grad()
    def _encode(self, samples: list[dict]) -> list[dict[str, torch.Tensor]]:
        entries: list[dict[str, torch.Tensor]] = [{} for _ in samples]
        if self.encode_image is not None:
            latents = self.encode_image(torch.stack([s["image"] for s in samples]))
            if not isinstance(latents, torch.Tensor) or latents.shape[0] != len(samples):
                raise ValueError(f"encode_image must return a (B, C, h, w) tensor, got {getattr(latents, 'shape', latents)}")
            for entry, latent in zip(entries, latents):
                entry["latents"] = latent.float()
        if self.encode_text is not None:
            states, mask = self.encode_text([s["caption"] for s in samples])
            flat, is_list = _flatten_text(states, mask)
            for i, entry in enumerate(entries):
                for name, value in flat.items():
                    entry[name] = value if name == "text_is_list" else value[i]
        return entries

    def _attach(self, sample: dict, entry: dict[str, torch.Tensor]) -> dict:
        sample = dict(sample)
        if "latents" in entry:
            sample["latents"] = entry["latents"]
        if "text_is_list" in entry:
            sample["text_states"], sample["text_mask"] = _unflatten_text(entry)
        return sample

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not -len(self.dataset) <= index < len(self.dataset):
            raise IndexError(f"index {index} out of range for a dataset of length {len(self.dataset)}")
        index %= len(self.dataset)  # one cache entry per item, whatever sign the index had
        sample = self.dataset[index]
        entry = self.cache.get(index, sample["caption"])
        if entry is None or not self._needed() <= set(entry):
            entry = self._encode([sample])[0]
            self.cache.put(index, entry, sample["caption"])
        return self._attach(sample, entry)

    def fill(self, batch_size: int = 32, progress: bool = True) -> int:
        """Encode every missing entry now, in batches (faster than one at a time). Returns how many were
        computed."""
        from tqdm.auto import tqdm

        missing = [i for i in range(len(self.dataset)) if i not in self.cache]
        for start in tqdm(range(0, len(missing), batch_size), desc="caching features", disable=not progress):
            indices = missing[start : start + batch_size]
            samples = [self.dataset[i] for i in indices]
            for i, sample, entry in zip(indices, samples, self._encode(samples)):
                self.cache.put(i, entry, sample["caption"])
        return len(missing)


def collate_cached(samples: list[dict]) -> dict:
    """`pocketdit.data.collate` plus stacked ``latents`` and ``text_states`` / ``text_mask`` (padded to the
    longest sequence in the batch with mask False)."""
    batch = collate(samples)
    if "latents" in samples[0]:
        batch["latents"] = torch.stack([s["latents"] for s in samples])
    if "text_states" in samples[0]:
        is_list = isinstance(samples[0]["text_states"], (list, tuple))
        per_encoder = len(samples[0]["text_states"]) if is_list else 1
        states_out, masks_out = [], []
        for j in range(per_encoder):
            states = [s["text_states"][j] if is_list else s["text_states"] for s in samples]
            masks = [s["text_mask"][j] if is_list else s["text_mask"] for s in samples]
            length = max(x.shape[0] for x in states)
            states_out.append(torch.stack([torch.nn.functional.pad(x, (0, 0, 0, length - x.shape[0])) for x in states]))
            masks_out.append(torch.stack([torch.nn.functional.pad(m, (0, length - m.shape[0]), value=False) for m in masks]))
        batch["text_states"] = states_out if is_list else states_out[0]
        batch["text_mask"] = masks_out if is_list else masks_out[0]
    return batch
