"""The streaming executor: off-device decoder layers fetched ahead into a double buffer, overlapped with compute.

Applied as a transform on an unchanged model, in two steps around the ordinary load:

    executor = StreamingExecutor(model.model.layers, placement, store, device)
    model.load_weights(executor.wrap_loading(tensors))  # each off-device layer goes to its tier once complete
    executor.attach()                                    # buffers, views and forward hooks

While the checkpoint streams in, every off-device layer is written to its tier as soon as its last
tensor is in, and its memory is released: the model never exists whole in RAM. At run time a
forward pre-hook binds the layer's parameters and buffers to views of the buffer its bytes were
fetched into (waiting for that fetch if it is still under way) and starts fetching the next
off-device layer into the other buffer on a background thread (a side CUDA stream on a GPU); the
post-hook unbinds them. The fetch of layer i+1 thus overlaps the compute of layer i, and the first
off-device layer of the next step is fetched during the tail of this one (head, sampling).
"""

from __future__ import annotations

import ctypes
import re
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from roofline.errors import ModelLoadError
from roofline.layers.linear import Linear
from roofline.offload.placement import LayerPlacement, Tier
from roofline.offload.store import LayerStore

NUM_BUFFERS = 2  # the layer computing and the one being fetched (the planner's STREAM_BUFFER_LAYERS)
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.")


def _expected_tensors(layer: nn.Module) -> int:
    """Checkpoint tensors that fill one decoder layer (a packed linear takes one per shard)."""
    count = 0
    for module in layer.modules():
        params = [p for p in module._parameters.values() if p is not None]
        count += len(params) * (len(module.output_sizes) if isinstance(module, Linear) else 1)
    return count


def _finalize_low_bit(layer: nn.Module) -> None:
    """Pack a layer's low-bit linears now: after eviction nothing can pack them."""
    for module in layer.modules():
        if isinstance(module, Linear) and hasattr(module, "finalize"):
            module.finalize()


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
OWN_MAPPING_BYTES = 1 << 20  # tensors this large get their own mmap, so freeing them returns the pages at once


def _allocate_apart(layers: list[nn.Module]) -> None:
    """Re-allocate the (still unwritten) tensors of off-device layers, each large one in its own mapping.

    The model was built with every layer's tensors side by side on the heap; freed there, a layer's
    pages stay resident until its neighbours go too. glibc's M_MMAP_THRESHOLD (fixed here, which also
    stops its dynamic growth) gives each large tensor its own mmap, which free() unmaps.
    """
    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, OWN_MAPPING_BYTES)
    except (OSError, AttributeError):  # not glibc
        return
    for layer in layers:
        for t in list(layer.parameters()) + list(layer.buffers()):
            storage = t.untyped_storage()
            if t.device.type == "cpu" and storage.resizable() and storage.nbytes() >= OWN_MAPPING_BYTES:
                size = storage.nbytes()
                storage.resize_(0)
                storage.resize_(size)


class StreamingExecutor:
    """Keeps off-device decoder layers in a LayerStore and streams them through two device buffers."""

    def __init__(self, layers: nn.ModuleList, placement: LayerPlacement, store: LayerStore,
                 device: torch.device) -> None:
        if placement.num_layers != len(layers):
            raise ModelLoadError(f"offload placement covers {placement.num_layers} layers, the model has "
                                 f"{len(layers)}")
        self.layers = layers
        self.placement = placement
        self.store = store
        self.device = device
        self.order = placement.offloaded_layers  # forward order of streamed layers
        self._next = {layer: self.order[(i + 1) % len(self.order)] for i, layer in enumerate(self.order)}
        self._expected = {i: _expected_tensors(layers[i]) for i in self.order}
        self._seen = dict.fromkeys(self.order, 0)
        _allocate_apart([layers[i] for i in self.order])
        # what the loader filled: a layer that packs itself on its last shard (int4) replaces its weight, and
        # the loader's own reference would keep the unpacked one alive until the whole model is in
        self._loading = {i: list(layers[i].parameters()) + list(layers[i].buffers()) for i in self.order}
        self._buffers: list[torch.Tensor] = []  # [max_blob_bytes] uint8 on the device, NUM_BUFFERS of them
        self._staging: list[torch.Tensor] = []  # pinned CPU buffers disk reads land in (GPU only)
        self._bound: dict[int, list[list[tuple[nn.Module, str, bool, torch.Tensor]]]] = {}  # layer -> per buffer
        self._unbound: dict[int, list[tuple[nn.Module, str, bool, torch.Tensor]]] = {}  # meta placeholders
        self._pending: dict[int, tuple[int, Future]] = {}  # layer -> (buffer, fetch)
        self._in_use: dict[int, int] = {}  # layer computing now -> its buffer
        self._pool: ThreadPoolExecutor | None = None
        self._hooks: list = []
        self._stream = self._released = None
        self.bytes_fetched = 0  # counters for benchmarks
        self.wait_s = 0.0  # compute thread time spent waiting for a fetch

    # ---- load time ----
    def wrap_loading(self, tensors: Iterable[tuple[str, object]]) -> Iterator[tuple[str, object]]:
        """Pass checkpoint tensors on to the model's loader, moving each off-device layer out once it is full."""
        for name, tensor in tensors:
            match = _LAYER_NAME.match(name)
            layer = int(match.group(1)) if match else None
            if layer in self._seen and self._seen[layer] < 0:
                raise ModelLoadError(f"checkpoint tensor {name} arrived after its layer was offloaded")
            yield name, tensor  # the loader copies it in before asking for the next one
            if layer in self._seen and "rotary_emb" not in name:
                self._seen[layer] += 1
                if self._seen[layer] == self._expected[layer]:
                    self._evict(layer)
        for layer, seen in self._seen.items():
            if seen >= 0:  # a layer whose count did not come out exact: offload it now that loading is done
                self._evict(layer)
        self.store.finish()

    def _evict(self, layer: int) -> None:
        module = self.layers[layer]
        _finalize_low_bit(module)
        tensors = []
        for path, sub in module.named_modules():
            tensors += [(path, k, True, p.data) for k, p in sub._parameters.items() if p is not None]
            tensors += [(path, k, False, b) for k, b in sub._buffers.items() if b is not None]
        self.store.put(layer, self.placement.layer_tiers[layer], tensors)
        placeholders = []
        for path, attr, is_param, t in tensors:
            sub = module.get_submodule(path)
            meta = torch.empty(t.shape, dtype=t.dtype, device="meta")
            if t.untyped_storage().resizable():
                t.untyped_storage().resize_(0)  # in place: the memory goes even while the loader holds the tensor
            if is_param:
                placeholder = nn.Parameter(meta, requires_grad=False)
                sub._parameters[attr] = placeholder
            else:
                placeholder = sub._buffers[attr] = meta
            placeholders.append((sub, attr, is_param, placeholder))
        self._unbound[layer] = placeholders
        self._seen[layer] = -1
        for t in self._loading.pop(layer):
            if t.device.type != "meta" and t.untyped_storage().resizable():
                t.untyped_storage().resize_(0)

    # ---- run time ----
    def attach(self) -> None:
        """Allocate the device buffers, make each layer's views into them and register the forward hooks."""
        if not self.order:
            return
        size = self.store.max_blob_bytes
        is_cuda = self.device.type == "cuda"
        self._buffers = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(NUM_BUFFERS)]
        if is_cuda:
            self._staging = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(NUM_BUFFERS)]
            self._stream = torch.cuda.Stream(self.device)
            self._released = [None] * NUM_BUFFERS
        for layer in self.order:
            blob = self.store.blobs[layer]
            per_buffer = []
            for buf in self._buffers:
                views = []
                for (sub, attr, is_param, _), e in zip(self._unbound[layer], blob.entries):
                    view = buf[e.offset:e.offset + e.num_bytes].view(e.dtype).view(e.shape)
                    views.append((sub, attr, is_param, nn.Parameter(view, requires_grad=False) if is_param else view))
                per_buffer.append(views)
            self._bound[layer] = per_buffer
            module = self.layers[layer]
            self._hooks.append(module.register_forward_pre_hook(lambda m, a, i=layer: self._before(i)))
            self._hooks.append(module.register_forward_hook(lambda m, a, o, i=layer: self._after(i)))
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="roofline-offload")

    def _fetch(self, layer: int, index: int) -> torch.cuda.Event | None:
        """Bring layer's bytes into buffer `index` (runs on the fetch thread)."""
        buf, blob = self._buffers[index], self.store.blobs[layer]
        if self.device.type != "cuda":
            self.store.read_into(layer, buf)
            self.bytes_fetched += blob.num_bytes
            return None
        released = self._released[index]
        if blob.tier is Tier.DISK:
            self.store.read_into(layer, self._staging[index])  # the last copy out of it was synchronized
            source = self._staging[index][:blob.num_bytes]
        else:
            source = self.store.host_blob(layer)
        with torch.cuda.stream(self._stream):
            if released is not None:
                self._stream.wait_event(released)  # the compute stream is done with this buffer
            buf[:blob.num_bytes].copy_(source, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        if blob.tier is Tier.DISK:
            done.synchronize()  # the staging buffer is reused by the next disk read into this index
        self.bytes_fetched += blob.num_bytes
        return done

    def _submit(self, layer: int, index: int) -> None:
        self._pending[layer] = (index, self._pool.submit(self._fetch, layer, index))

    def _before(self, layer: int) -> None:
        if layer not in self._pending:  # the first step, or a forward that skipped ahead: fetch now
            busy = {i for i, _ in self._pending.values()}
            self._submit(layer, next(i for i in range(NUM_BUFFERS) if i not in busy))
        index, future = self._pending.pop(layer)
        start = time.perf_counter()
        done = future.result()
        self.wait_s += time.perf_counter() - start
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)
        for sub, attr, is_param, t in self._bound[layer][index]:
            (sub._parameters if is_param else sub._buffers)[attr] = t
        self._in_use[layer] = index
        nxt = self._next[layer]
        if nxt != layer and nxt not in self._pending:
            self._submit(nxt, 1 - index)  # the other buffer: its previous layer has finished

    def _after(self, layer: int) -> None:
        index = self._in_use.pop(layer)
        for sub, attr, is_param, t in self._unbound[layer]:
            (sub._parameters if is_param else sub._buffers)[attr] = t
        if self._released is not None:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._released[index] = event

    def close(self) -> None:
        """Stop the fetch thread, remove the hooks and the converted files."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._pending.clear()
        self._bound.clear()
        self._buffers = []
        self.store.close()
