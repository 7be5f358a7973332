"""Off-device layer weights as opaque byte blobs: a host tier and a disk tier, one converted file each.

Every tensor of a decoder layer (floating point, or the packed int4/int8 blocks and scales of a
quantized layer) is laid end to end in one blob, so fetching a layer is one read into a buffer and
the layer's tensors become views of it. Host tier: with a GPU, pinned RAM; on a CPU-only machine,
the file's pages in the page cache (memory the kernel may reclaim, outside the process's anonymous
memory the limit counts). Disk tier: read with os.preadv into a preallocated buffer, then
posix_fadvise(DONTNEED) so the page cache never holds the layer and "disk" is measured as disk.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field

import torch

from roofline.offload.placement import Tier

BLOB_ALIGN = 4096  # blob offsets in the files: page aligned
TENSOR_ALIGN = 64  # tensor offsets inside a blob: cache-line aligned, so every dtype's view is aligned


def _round_up(n: int, align: int) -> int:
    return -(-n // align) * align


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes, without t.numpy(): that would make its storage unresizable, and the
    executor frees an offloaded layer's storage in place."""
    return memoryview((ctypes.c_char * (t.numel() * t.element_size())).from_address(t.data_ptr())).cast("B")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a layer inside its blob."""

    module_path: str  # relative to the decoder layer ("" for the layer itself)
    attr: str  # parameter or buffer name
    is_param: bool
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # bytes from the blob's start
    num_bytes: int


@dataclass
class LayerBlob:
    """Where one layer's bytes live and how they split into tensors."""

    layer: int
    tier: Tier
    offset: int  # in the tier's file
    num_bytes: int
    entries: list[TensorEntry] = field(default_factory=list)


class LayerStore:
    """Writes layer blobs once at load time and reads them back into caller-owned buffers."""

    def __init__(self, directory: str | None, pin_host: bool) -> None:
        self.owns_dir = directory is None  # a temporary directory is removed on close
        self.directory = tempfile.mkdtemp(prefix="roofline-offload-") if directory is None else directory
        os.makedirs(self.directory, exist_ok=True)
        self.pin_host = pin_host  # a GPU is present: the host tier is pinned RAM, not the file's pages
        self.blobs: dict[int, LayerBlob] = {}
        paths = [os.path.join(self.directory, f"{tier.value}-{os.getpid()}-{id(self)}.bin") for tier in Tier
                 if tier is not Tier.DEVICE]
        self._fds = {tier: os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
                     for tier, path in zip((Tier.HOST, Tier.DISK), paths)}
        # the files go when the store is closed, collected, or the process exits, whichever comes first
        self._cleanup = weakref.finalize(self, _remove, paths, self.directory if self.owns_dir else None)
        self._sizes = {Tier.HOST: 0, Tier.DISK: 0}
        self._pinned: dict[int, torch.Tensor] = {}  # layer -> pinned blob (GPU host tier)
        self._host_map: mmap.mmap | None = None
        self._host_view: torch.Tensor | None = None  # uint8 view of the mapped host file (CPU host tier)

    @property
    def max_blob_bytes(self) -> int:
        """Size of the largest blob: what one streaming buffer must hold."""
        return max((b.num_bytes for b in self.blobs.values()), default=0)

    def put(self, layer: int, tier: Tier, tensors: list[tuple[str, str, bool, torch.Tensor]]) -> LayerBlob:
        """Append a layer's (module path, attr, is_param, tensor) list to `tier`'s file as one blob."""
        entries, offset = [], 0
        for module_path, attr, is_param, t in tensors:
            num_bytes = t.numel() * t.element_size()
            entries.append(TensorEntry(module_path, attr, is_param, t.dtype, tuple(t.shape), offset, num_bytes))
            offset = _round_up(offset + num_bytes, TENSOR_ALIGN)
        blob = LayerBlob(layer, tier, self._sizes[tier], _round_up(max(offset, 1), BLOB_ALIGN), entries)
        pinned = torch.zeros(blob.num_bytes, dtype=torch.uint8).pin_memory() \
            if tier is Tier.HOST and self.pin_host else None
        for entry, (_, _, _, t) in zip(entries, tensors):
            raw = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
            if pinned is not None:
                pinned[entry.offset:entry.offset + entry.num_bytes] = raw
            elif entry.num_bytes:  # straight from the tensor's memory: no second copy of the layer is made
                os.pwrite(self._fds[tier], _bytes_of(raw), blob.offset + entry.offset)
        if pinned is not None:
            self._pinned[layer] = pinned
        self._sizes[tier] += blob.num_bytes
        self.blobs[layer] = blob
        return blob

    def finish(self) -> None:
        """After the last put: push the disk file out of the page cache and map the host file."""
        for tier, size in self._sizes.items():
            os.ftruncate(self._fds[tier], size)  # the padding after a blob's last tensor reads as zeros
        disk = self._fds[Tier.DISK]
        if self._sizes[Tier.DISK]:
            os.fsync(disk)  # dirty pages cannot be dropped; written ones can
            os.posix_fadvise(disk, 0, 0, os.POSIX_FADV_DONTNEED)
        if self._sizes[Tier.HOST] and not self.pin_host:
            # a private mapping: pages come from the page cache (file-backed, reclaimable); nothing writes them
            self._host_map = mmap.mmap(self._fds[Tier.HOST], self._sizes[Tier.HOST], access=mmap.ACCESS_COPY)
            self._host_view = torch.frombuffer(self._host_map, dtype=torch.uint8)

    def read_into(self, layer: int, out: torch.Tensor) -> None:
        """Copy layer's blob into the CPU uint8 buffer `out` (disk tier: pread, then drop its cached pages)."""
        blob = self.blobs[layer]
        if blob.tier is Tier.HOST:
            source = self._pinned[layer] if self.pin_host else self._host_view[blob.offset:blob.offset + blob.num_bytes]
            out[:blob.num_bytes].copy_(source)
            return
        fd = self._fds[Tier.DISK]
        view = memoryview(out.numpy())[:blob.num_bytes]
        done = 0
        while done < blob.num_bytes:  # preadv may return short reads
            n = os.preadv(fd, [view[done:]], blob.offset + done)
            if n <= 0:
                raise OSError(f"offload file ended early reading layer {layer}")
            done += n
        os.posix_fadvise(fd, blob.offset, blob.num_bytes, os.POSIX_FADV_DONTNEED)

    def host_blob(self, layer: int) -> torch.Tensor:
        """The pinned blob of a host-tier layer (GPU only), for a non-blocking copy to the device."""
        return self._pinned[layer]

    def close(self) -> None:
        """Close the files, unmap, and remove the directory when it was a temporary one."""
        self._host_view = None
        if self._host_map is not None:
            try:
                self._host_map.close()
            except BufferError:  # a view is still alive somewhere; the mapping goes with the process
                pass
            self._host_map = None
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
        self._pinned.clear()
        self._cleanup()


def _remove(paths: list[str], directory: str | None) -> None:
    """Delete the converted files, and the directory when the store made it."""
    for path in paths:
        if os.path.exists(path):
            os.remove(path)
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)
