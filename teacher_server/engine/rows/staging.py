"""A micro-batch's rows, copied once from the requests' bytes into reused buffers, in the dtype they were sent.

uint8 pixels stay uint8 until the device (4x fewer bytes than float32 to copy and move); the teacher normalizes them in
its patch projection (`MaskedTeacher.forward_pixels`). Float pixels (0..1) are staged as float32 on the 0..255 scale
the projection takes; a batch with any float request stages every row that way. Full images are cut to their kept
patches while they are copied. Each `Stager` has `slots` buffer sets (two by default), so batch k+1 is staged while
batch k runs; on CUDA the host buffers are pinned and one non-blocking copy per batch moves the rows to the device.

A micro-batch of one request of uint8 patches for an eager CPU forward is not copied at all: its rows are read where
they lie, in the request's bytes (the forward casts them to its dtype chunk by chunk anyway; a copy would only
stream its ~75 KB an image through memory once more).
"""

from __future__ import annotations

import math
import queue
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from maskedkd.geometry import TeacherGeometry
from teacher_server.engine.rows.decode import DecodedInput

Allocate = Callable[[int, torch.dtype], torch.Tensor]  # (elements, dtype) -> a 1-D host tensor


@dataclass
class StagedRows:
    """The rows of a micro-batch, on the forward's device."""

    pixels: torch.Tensor  # [G, K, C, P, P] uint8 (0..255), or float32 on the 0..255 scale
    indices: torch.Tensor  # [G, K] int64 positions on the teacher grid; padding 0
    counts: torch.Tensor  # [G] int64 kept patches per row (on the host: the forward groups rows by it)
    uniform: bool  # every row keeps K patches (no padding)
    slot: int  # the buffer set they live in (released after the forward)
    ready: torch.cuda.Event | None = None  # CUDA: recorded after the copy to the device

    @property
    def images(self) -> int:
        return int(self.pixels.shape[0])

    def select(self, rows: list[int]) -> StagedRows:
        """These rows only (copies; for a batch some of whose callers went away before its forward)."""
        pick = torch.tensor(rows, dtype=torch.int64)
        on_device = pick.to(self.pixels.device)
        counts = self.counts[pick]
        uniform = bool((counts == self.pixels.shape[1]).all())
        return StagedRows(self.pixels[on_device], self.indices[on_device], counts, uniform, self.slot, self.ready)

    def select_requests(self, images: Sequence[int], kept: Sequence[bool]) -> StagedRows:
        """The rows of the `kept` requests only (copies); request i holds the next `images[i]` rows."""
        starts = [0]
        for n in images:
            starts.append(starts[-1] + n)
        return self.select([r for i, keep in enumerate(kept) if keep for r in range(starts[i], starts[i + 1])])


def join_rows(parts: Sequence[StagedRows]) -> StagedRows:
    """Several batches' rows as one batch, in order (copies): as wide as the widest, padding zeros. For rows already
    on the forward's device (`ready` unset); the pixels must share a dtype."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0].pixels
    width = max(int(p.pixels.shape[1]) for p in parts)
    total = sum(p.images for p in parts)
    pixels = first.new_zeros((total, width, *first.shape[2:]))  # [sum G, K_max, C, P, P]
    indices = parts[0].indices.new_zeros((total, width))  # [sum G, K_max]
    start = 0
    for part in parts:
        rows, k = int(part.pixels.shape[0]), int(part.pixels.shape[1])
        pixels[start : start + rows, :k] = part.pixels
        indices[start : start + rows, :k] = part.indices
        start += rows
    counts = torch.cat([p.counts for p in parts])
    uniform = bool((counts == width).all())
    return StagedRows(pixels, indices, counts, uniform, slot=0)


class _Slot:
    """One buffer set: flat host buffers (pinned on CUDA), viewed as [G, K, ...] for each batch, so a batch's rows are
    contiguous whatever its size and K (a compiled forward sees the layout it was compiled for); on CUDA also their
    device twins."""

    def __init__(
        self, geometry: TeacherGeometry, max_images: int, device: torch.device, allocate: Allocate | None = None
    ) -> None:
        self.patch = (geometry.in_chans, geometry.patch_size, geometry.patch_size)
        self.capacity = max_images * geometry.num_patches  # patches one batch holds at most
        self.pin = device.type == "cuda"
        self.device = device
        self.allocate: Allocate = allocate or (lambda n, dtype: torch.empty(n, dtype=dtype, pin_memory=self.pin))
        self.raw = self.allocate(self.capacity * math.prod(self.patch), torch.uint8)
        self.indices = self.allocate(self.capacity, torch.int64).zero_()
        self.counts = torch.zeros(max_images, dtype=torch.int64)
        self.scaled: torch.Tensor | None = None  # float32 twin of `raw`, made when a float request first comes
        self.on_device: dict[str, torch.Tensor] = {}

    def views(self, g: int, k: int, float_rows: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pixels [g, k, C, P, P], indices [g, k], counts [g]) over the start of the buffers."""
        if float_rows and self.scaled is None:
            self.scaled = self.allocate(self.raw.numel(), torch.float32)
        flat = self.scaled if float_rows else self.raw
        assert flat is not None
        pixels = flat[: g * k * math.prod(self.patch)].view(g, k, *self.patch)
        return pixels, self.indices[: g * k].view(g, k), self.counts[:g]

    def device_view(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """A device tensor shaped like `like`, over a flat device buffer kept per name and dtype."""
        key = f"{name}-{like.dtype}"
        buf = self.on_device.get(key)
        if buf is None or buf.numel() < like.numel():
            size = self.raw.numel() if name == "pixels" else self.indices.numel()
            buf = self.on_device[key] = torch.empty(size, dtype=like.dtype, device=self.device)
        return buf[: like.numel()].view(like.shape)


class Stager:
    """`acquire()` a free slot, `stage(inputs, slot)` fills it, `release(slot)` after the forward read it. The
    caller admits at most `slots` batches at once (the batcher's semaphore), so a free slot is always there."""

    def __init__(
        self,
        geometry: TeacherGeometry,
        *,
        max_images: int,
        device: torch.device,
        slots: int = 2,
        allocate: Allocate | None = None,
        in_place: bool = False,
    ) -> None:
        """`allocate`: where the host buffers live (default: this process's memory, pinned on CUDA; an ingest worker
        passes shared_host.shared_host_tensor, so the device process reads the rows where they were staged).
        `in_place`: a lone request of uint8 patches is handed over as its own rows, uncopied (for an eager forward in
        this process on the CPU: nothing else reads the rows from the buffers, and no compiled graph guards on them)."""
        if in_place and (device.type != "cpu" or allocate is not None):
            raise ValueError("rows read in place are for a forward in this process on the CPU")
        self.geometry = geometry
        self.device = device
        self.slots = slots
        self.in_place = in_place
        self._buffers = [_Slot(geometry, max_images, device, allocate) for _ in range(slots)]
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(slots):
            self._free.put(i)
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def acquire(self) -> int:
        return self._free.get_nowait()

    def release(self, slot: int) -> None:
        self._free.put(slot)

    def stage(self, inputs: Sequence[DecodedInput], slot: int) -> StagedRows:
        """Copy the inputs' rows into `slot` (padded to the widest K) and, on CUDA, to the device."""
        if self.in_place and len(inputs) == 1 and inputs[0].kind == "patches" and inputs[0].raw_scale:
            x = inputs[0]  # the same rows a copy would hold: decode zeroed the padded positions already
            return StagedRows(x.pixels, x.keep_indices, x.keep_counts, bool((x.keep_counts == x.k).all()), slot)
        s = self._buffers[slot]
        g = sum(x.images for x in inputs)
        k = max(x.k for x in inputs)
        pixels, indices, counts = s.views(g, k, float_rows=any(not x.raw_scale for x in inputs))
        row = 0
        for x in inputs:
            rows = slice(row, row + x.images)
            _copy_kept(x, pixels[rows, : x.k], self.geometry)
            indices[rows, : x.k].copy_(x.keep_indices)
            if x.k < k:
                indices[rows, x.k :].zero_()
            counts[rows].copy_(x.keep_counts)
            row += x.images
        uniform = bool((counts == k).all())
        if self._stream is None:
            return StagedRows(pixels, indices, counts, uniform, slot)
        with torch.cuda.stream(self._stream):
            moved = (s.device_view("pixels", pixels), s.device_view("indices", indices))
            moved[0].copy_(pixels, non_blocking=True)
            moved[1].copy_(indices, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self._stream)
        return StagedRows(moved[0], moved[1], counts, uniform, slot, ready)


def _copy_kept(x: DecodedInput, out: torch.Tensor, geometry: TeacherGeometry) -> None:
    """Write `x`'s kept patches into `out` [B, K, C, P, P] (uint8 as sent, or float32 on the 0..255 scale)."""
    if x.kind == "patches":
        out.copy_(x.pixels)
    else:  # images [B, C, H, W]: gather the kept patches straight from the image bytes
        b, c, p = x.images, geometry.in_chans, geometry.patch_size
        gh, gw = geometry.grid_size
        grid = x.pixels[:, :, : gh * p, : gw * p].reshape(b, c, gh, p, gw, p)  # a view when the image fits the grid
        rows = torch.arange(b).unsqueeze(1)  # [B, 1]
        out.copy_(grid[rows, :, x.keep_indices // gw, :, x.keep_indices % gw, :])  # [B, K, C, P, P]
    if not x.raw_scale:
        out.mul_(255.0)
