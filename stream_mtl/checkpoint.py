"""Checkpoints of the training state: safetensors weights plus a JSON manifest, never pickle.

A checkpoint is two files in one directory, ``ckpt-<step>.safetensors`` and
``ckpt-<step>.json``. The weights file holds every tensor (model, optimiser moments, balancer
parameters); the manifest holds the sha256 of the weights file, the topology hash, the step,
the non-tensor optimiser/balancer/sampler state and the Kafka offsets trained on. Each file is
written to a temporary name, fsynced and renamed, the manifest last (a crash leaves either the
old checkpoint or a complete new one), and only the newest ``keep`` are kept.

:meth:`CheckpointStore.load_latest` verifies the newest checkpoint (manifest parses, weights
hash matches, topology hash matches, safetensors header is valid) and falls back to the
previous one when it does not; every failure is a :class:`CheckpointError` naming the file and
the hashes.

>>> import tempfile, torch
>>> store = CheckpointStore(tempfile.mkdtemp(), topology_hash="abc", keep=2)
>>> path = store.save({"w": torch.ones(2)}, {"step": 1})
>>> tensors, manifest = store.load_latest()
>>> tensors["w"].tolist(), manifest["step"], manifest["topology_hash"]
([1.0, 1.0], 1, 'abc')
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path
from typing import Any

import orjson
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from stream_mtl.log import get_logger

log = get_logger(__name__)

__all__ = ["CheckpointError", "CheckpointStore"]

FORMAT = 1
_NAME = re.compile(r"^ckpt-(\d{12})\.json$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted; the message names the file and the hashes."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointStore:
    """The checkpoints of one trainer in one directory (the newest ``keep`` are kept)."""

    def __init__(self, directory: str | Path, topology_hash: str, keep: int = 3):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.topology_hash = topology_hash
        self.keep = max(1, keep)

    def manifests(self) -> list[Path]:
        """Manifest files, newest first."""
        found = [p for p in self.dir.iterdir() if _NAME.match(p.name)]
        return sorted(found, key=lambda p: p.name, reverse=True)

    def save(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
        """Write one checkpoint (``state["step"]`` names it); returns the manifest path."""
        step = int(state.get("step", 0))
        stem = f"ckpt-{step:012d}"
        weights = save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        weights_path = self.dir / f"{stem}.safetensors"
        _write_atomic(weights_path, weights)
        manifest = {
            "format": FORMAT,
            "created": time.time(),
            "topology_hash": self.topology_hash,
            "weights_file": weights_path.name,
            "weights_sha256": _sha256(weights),
            **state,
        }
        manifest_path = self.dir / f"{stem}.json"
        _write_atomic(manifest_path, orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
        _fsync_dir(self.dir)
        self._prune()
        return manifest_path

    def _prune(self) -> None:
        kept = self.manifests()[: self.keep]
        for old in self.manifests()[self.keep :]:
            old.unlink(missing_ok=True)
        wanted = {m.with_suffix(".safetensors").name for m in kept}
        for p in self.dir.iterdir():  # older weights, and weights a crash left without a manifest
            if p.suffix == ".safetensors" and p.name not in wanted:
                p.unlink(missing_ok=True)

    def verify(self, manifest_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Load one checkpoint, or raise :class:`CheckpointError` saying what is wrong with which file."""
        try:
            manifest = orjson.loads(manifest_path.read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            raise CheckpointError(f"{manifest_path}: unreadable manifest ({exc})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise CheckpointError(f"{manifest_path}: not a stream_mtl checkpoint manifest (format {FORMAT})")
        if manifest.get("topology_hash") != self.topology_hash:
            raise CheckpointError(
                f"{manifest_path}: topology hash {manifest.get('topology_hash')} != this topology's "
                f"{self.topology_hash} (a checkpoint of another declaration)"
            )
        weights_path = self.dir / str(manifest.get("weights_file", ""))
        try:
            data = weights_path.read_bytes()
        except OSError as exc:
            raise CheckpointError(f"{weights_path}: missing weights ({exc})") from None
        got, want = _sha256(data), manifest.get("weights_sha256")
        if got != want:
            raise CheckpointError(f"{weights_path}: sha256 {got} does not match the manifest's {want}")
        try:
            tensors = load_safetensors(data)
        except (SafetensorError, ValueError) as exc:
            raise CheckpointError(f"{weights_path}: not a valid safetensors file, sha256 {got} ({exc})") from None
        return tensors, manifest

    def load_step(self, step: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The checkpoint of one step (:class:`CheckpointError` if it is missing or does not verify)."""
        return self.verify(self.dir / f"ckpt-{step:012d}.json")

    def load_latest(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The newest checkpoint that verifies, falling back past broken ones; ``None`` if there is none."""
        for path in self.manifests():
            try:
                return self.verify(path)
            except CheckpointError as exc:
                log.warning("checkpoint.rejected", file=str(path), error=str(exc))
        return None
