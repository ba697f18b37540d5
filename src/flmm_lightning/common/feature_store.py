"""The feature cache's store: what the frozen LMM computed for each sample (``FrozenFeatures``), kept in
safetensors shards so that epochs after the first, and evaluation, skip the LMM forward.

An entry is keyed by ``feature_key``: a hash of the LMM's identity (``FrozenLMM.feature_identity``: model,
weights, dtype, read-out settings), the trainer's precision and the sample's encoded LMM input
(``PromptInputs``: the chat prompt and its text, the object spans, the processed pixels and their geometry),
so a changed prompt, processor setting, image, text or LMM misses instead of serving stale features.

Layout: ``<root>/v<FORMAT_VERSION>/<identity[:32]>/<writer>-<n>.safetensors``. Each writing process (a DDP
rank, a pre-pass rank) buffers its new entries and writes them as one shard at a time: to a hidden
temporary file, then renamed into place, so that a reader sees whole shards or nothing and an interrupted fill
loses only the entries not yet written (they are computed again). The index is the union of the shard
headers, read when an entry is looked up and the folder has changed; shards are never modified, so any
number of dataloader workers read them at once, through memory maps, without locks. Each shard's metadata
holds the format, its version, the identity and a CRC-32 of every entry, checked on every read: a corrupt
entry is reported and computed again, never served.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from flmm_lightning.boundaries import FrozenFeatures, PromptInputs

logger = logging.getLogger(__name__)

FORMAT_NAME = "flmm-feature-cache"
FORMAT_VERSION = 1
SHARD_SUFFIX = ".safetensors"
# One shard per this many bytes of new entries (and at every flush).
DEFAULT_SHARD_BYTES = 256 * 2**20
# A miss looks for new shards when the folder's mtime changed, or after this many seconds (mtime is coarse).
_RESCAN_SECONDS = 2.0
# Shards a reader keeps open at once (each worker: one memory map per open shard).
_OPEN_SHARDS = 64
# The tensors of one entry: ``<key>.<part>``.
_PARTS = ("maps", "hidden", "objects", "geometry")


class FeatureCacheError(RuntimeError):
    """The feature cache cannot be written (a full disk, a folder that is not writable)."""


def _update(digest: Any, name: str, tensor: torch.Tensor) -> None:
    values = tensor.detach().cpu().contiguous()
    digest.update(f"|{name}|{values.dtype}|{tuple(values.shape)}|".encode())
    # Viewed as bytes: numpy has no bfloat16.
    digest.update(memoryview(values.reshape(-1).view(torch.uint8).numpy()).cast("B"))


def module_digest(module: nn.Module, settings: str) -> str:
    """sha256 of ``settings`` and of ``module``'s state dict (names, dtypes, shapes and values)."""
    digest = hashlib.sha256(settings.encode())
    for name, tensor in sorted(module.state_dict().items()):
        _update(digest, name, tensor)
    return digest.hexdigest()


def feature_key(identity: str, prompt: PromptInputs) -> str:
    """The cache key of one sample: ``identity`` (the LMM's and the precision's) and everything the LMM reads
    of the sample (token ids, object spans, where the utterances start, pixel inputs and grid geometry)."""
    digest = hashlib.sha256(f"{FORMAT_NAME}|v{FORMAT_VERSION}|{identity}".encode())
    _update(digest, "input_ids", prompt.input_ids)
    _update(digest, "mask_ids", prompt.mask_ids)
    digest.update(
        f"|{prompt.utterance_start}|{prompt.grid_hw}|{prompt.padded_hw}|{prompt.content_box}".encode()
    )
    for name in sorted(prompt.pixel_inputs):
        _update(digest, name, prompt.pixel_inputs[name])
    return digest.hexdigest()


def entry_bytes(
    num_objects: int,
    channels: int,
    grid_hw: tuple[int, int],
    layers: int,
    hidden_size: int,
    hidden_rows: int,
    hidden_bytes: int,
) -> int:
    """Bytes of one sample's entry in a shard (its tensors; the shard header adds about 200 bytes per entry):
    float32 maps ``[n, C, h, w]``, hidden states ``[L, u, D]`` at ``hidden_bytes`` per value, the int64 object
    of each of the ``u`` rows and 6 int64 of geometry."""
    maps = num_objects * channels * grid_hw[0] * grid_hw[1] * 4
    return maps + layers * hidden_rows * hidden_size * hidden_bytes + hidden_rows * 8 + 6 * 8


def _tensors(features: FrozenFeatures) -> tuple[torch.Tensor, ...]:
    geometry = torch.tensor([*features.padded_hw, *features.content_box], dtype=torch.int64)
    return (
        features.attention_maps.detach().to("cpu").contiguous(),
        features.hidden_states.detach().to("cpu").contiguous(),
        features.hidden_objects.detach().to(device="cpu", dtype=torch.int64).contiguous(),
        geometry,
    )


def _checksum(tensors: tuple[torch.Tensor, ...]) -> int:
    crc = 0
    for tensor in tensors:
        crc = zlib.crc32(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B"), crc)
    return crc


@dataclass
class FeatureCacheStats:
    """What this process's store did since it was created (``served``/``computed``: counted by the model
    core per sample; the dataloader workers' own look-ups stay in the workers)."""

    served: int = 0  # samples whose LMM features came from the cache
    computed: int = 0  # samples whose LMM features were computed (and queued, when new)
    corrupt: int = 0  # entries or shards that failed their checks (computed again)
    writes: int = 0  # entries written
    shards: int = 0  # shards written


class FeatureStore:
    """Frozen LMM features by ``feature_key``, in the safetensors shards under ``root`` (see the module).

    ``identity``: the LMM's ``feature_identity`` and the trainer's precision, joined by the caller; entries
    of other identities live in other folders. Picklable: a dataloader worker gets a reader (no pending
    entries, shards opened again on first use).
    """

    def __init__(
        self, root: str | os.PathLike, identity: str, shard_bytes: int = DEFAULT_SHARD_BYTES
    ) -> None:
        self.root = Path(root).expanduser()
        self.identity = identity
        self.directory = self.root / f"v{FORMAT_VERSION}" / hashlib.sha256(identity.encode()).hexdigest()[:32]
        self.shard_bytes = shard_bytes
        self.stats = FeatureCacheStats()
        self._index: dict[str, Path] = {}  # key -> shard
        self._checksums: dict[str, int] = {}
        self._scanned: set[str] = set()
        self._folder_mtime: int | None = None
        self._scanned_at = 0.0
        self._handles: dict[Path, Any] = {}
        self._pending: dict[str, tuple[torch.Tensor, ...]] = {}
        self._pending_bytes = 0
        self._writer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._written = 0

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_handles={}, _pending={}, _pending_bytes=0, stats=FeatureCacheStats())
        state["_writer"] = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        return state

    # ------------------------------------------------------------------------------------------ reading
    def get(self, key: str) -> FrozenFeatures | None:
        """The entry of ``key`` (CPU tensors), or None: not there yet, or failed its checks (reported)."""
        if key not in self._index:
            self._refresh()
        shard = self._index.get(key)
        if shard is None:
            return None
        try:
            handle = self._handle(shard)
            tensors = tuple(handle.get_tensor(f"{key}.{part}") for part in _PARTS)
        except (SafetensorError, OSError) as error:
            return self._corrupt(key, f"{shard}: {error}")
        if _checksum(tensors) != self._checksums.get(key):
            return self._corrupt(key, f"{shard}: entry {key[:16]} fails its CRC-32")
        maps, hidden, objects, geometry = tensors
        values = geometry.tolist()
        return FrozenFeatures(
            attention_maps=maps,
            hidden_states=hidden,
            hidden_objects=objects,
            padded_hw=(values[0], values[1]),
            content_box=(values[2], values[3], values[4], values[5]),
        )

    def __contains__(self, key: str) -> bool:
        if key not in self._index:
            self._refresh()
        return key in self._index or key in self._pending

    def __len__(self) -> int:
        self._refresh()
        return len(self._index)

    def _handle(self, shard: Path) -> Any:
        """An open (memory-mapped) shard; the least recently opened is closed beyond ``_OPEN_SHARDS``."""
        if shard not in self._handles:
            if len(self._handles) >= _OPEN_SHARDS:
                del self._handles[next(iter(self._handles))]
            self._handles[shard] = safe_open(str(shard), framework="pt", device="cpu")
        return self._handles[shard]

    def _corrupt(self, key: str, reason: str) -> None:
        self.stats.corrupt += 1
        logger.warning("feature cache: %s; computing it again", reason)
        self._index.pop(key, None)
        return None

    def _refresh(self) -> None:
        """Adds the shards written since the last look (the folder's mtime changes when one is renamed in)."""
        try:
            mtime = self.directory.stat().st_mtime_ns
        except FileNotFoundError:
            return
        if mtime == self._folder_mtime and time.monotonic() - self._scanned_at < _RESCAN_SECONDS:
            return
        self._folder_mtime, self._scanned_at = mtime, time.monotonic()
        for path in sorted(self.directory.glob(f"*{SHARD_SUFFIX}")):
            if path.name in self._scanned or path.name.startswith("."):
                continue
            self._scanned.add(path.name)
            self._add_shard(path)

    def _add_shard(self, path: Path) -> None:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                metadata = handle.metadata() or {}
                names = list(handle.keys())
        except (SafetensorError, OSError) as error:
            self.stats.corrupt += 1
            logger.warning(
                "feature cache: unreadable shard %s (%s); its entries are computed again", path, error
            )
            return
        if (
            metadata.get("format") != FORMAT_NAME
            or metadata.get("version") != str(FORMAT_VERSION)
            or metadata.get("identity") != self.identity
        ):
            self.stats.corrupt += 1
            logger.warning(
                "feature cache: %s is not a shard of this cache (format, version or identity)", path
            )
            return
        try:
            checksums = {key: int(value) for key, value in json.loads(metadata["checksums"]).items()}
        except (KeyError, ValueError, TypeError, AttributeError):
            self.stats.corrupt += 1
            logger.warning("feature cache: %s has no valid checksums; its entries are computed again", path)
            return
        present = set(names)
        for key, checksum in checksums.items():
            if all(f"{key}.{part}" in present for part in _PARTS):
                self._index[key] = path
                self._checksums[key] = checksum

    # ------------------------------------------------------------------------------------------ writing
    def put(self, key: str, features: FrozenFeatures) -> None:
        """Queues ``features`` under ``key``; a shard is written once ``shard_bytes`` are queued."""
        if key in self._pending:
            return
        tensors = _tensors(features)
        self._pending[key] = tensors
        self._pending_bytes += sum(t.numel() * t.element_size() for t in tensors)
        if self._pending_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> Path | None:
        """Writes the queued entries as one shard (temporary file, then renamed); returns its path, None when
        nothing was queued. Raises ``FeatureCacheError`` when the disk cannot take it (nothing is left
        behind; the entries stay queued)."""
        if not self._pending:
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{self._writer}-{self._written:06d}{SHARD_SUFFIX}"
        path = self.directory / name
        temporary = self.directory / f".{name}.tmp"
        free = shutil.disk_usage(self.directory).free
        if free < self._pending_bytes:
            raise FeatureCacheError(
                f"feature cache {self.directory}: {self._pending_bytes} bytes to write, {free} free on its "
                "disk; free space, point data.feature_cache at a larger disk, or set data.feature_cache=null"
            )
        tensors = {
            f"{key}.{part}": t
            for key, parts in self._pending.items()
            for part, t in zip(_PARTS, parts, strict=True)
        }
        metadata = {
            "format": FORMAT_NAME,
            "version": str(FORMAT_VERSION),
            "identity": self.identity,
            "checksums": json.dumps({key: _checksum(parts) for key, parts in self._pending.items()}),
        }
        try:
            save_file(tensors, str(temporary), metadata=metadata)
            with open(temporary, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except OSError as error:
            temporary.unlink(missing_ok=True)
            hint = " (the disk is full)" if error.errno == errno.ENOSPC else ""
            raise FeatureCacheError(
                f"feature cache: cannot write shard {path}{hint}: {error}; free space or set "
                "data.feature_cache=null"
            ) from error
        self.stats.writes += len(self._pending)
        self.stats.shards += 1
        self._written += 1
        self._pending.clear()
        self._pending_bytes = 0
        return path
