"""Requests larger than a batch, run as chunks of whole images in consecutive batches (the batcher's `submit`).

A request with more teacher tokens than one batch may hold (the token budget, cut to `--max-batch-ms` by the running
compute estimate) would hold the teacher for its whole forward, and a light request of another key arriving just
after it would wait that long. It is cut instead into chunks of whole images that each fit a batch. They queue one
after another under the request's key, so fair queuing serves other keys' requests between them, and the request is
answered once, when its last chunk ran, with its rows' logits in order. While another key shares the teacher
(`RecentSenders`: another key sent a request in the last 10 s, or still has some queued) the budget is cut to
`--max-batch-ms`; a key alone has it cut only to `LONE_BATCH_S` (1 s) of forward, so its requests run whole or in
large chunks, as fast as the teacher runs them, and a key that starts sending meanwhile waits about 1 s at most.

- The chunks share the request's future: a caller gone, a chunk dropped for its deadline, or a chunk's batch failing
  ends the request, and its remaining chunks are let go unrun.
- Billing is as for any request (its whole input, in the commit of the batch its last chunk ran in), so a request is
  billed once its last chunk's forward starts, and a caller leaving before then is not billed: the chunks already run
  are the server's loss, never the caller's. Its ledger row's queue time runs until its last chunk's forward started,
  and its batch size is that chunk's batch.
- Each chunk carries the deadline by which it must end for the chunks after it still to end in time, by the compute
  estimate when it was cut, so a request that cannot finish is dropped before its first chunk runs.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence

import torch

from teacher_server.engine.batching.batch_job import BatchJob, ChunkOf, SplitRequest
from teacher_server.engine.rows.answers import Answer

# A chunk holds at least this many teacher tokens: a CPU's GEMMs on fewer rows run well below its rate (one thread,
# the tiny 32 px ViT, per image: bf16 1.23 ms at 512 tokens against 1.19 at 1,024 and 5.5 at 33; float32 3.4 / 3.2 /
# 6.5).
MIN_CHUNK_TOKENS = 512
SHARED_S = 10.0  # a key that sent a request this recently shares the teacher: another key's large requests are cut
# A key alone: batches (and chunks of its larger requests) of about this much forward at most, so that a key starting
# to send waits about this long at most. Far above a CPU forward's cache-sized pieces (CPU_CHUNK_TOKENS), so it costs
# the key alone next to nothing; on a GPU the token budget binds long before.
LONE_BATCH_S = 1.0


def image_ranges(tokens_per_image: torch.Tensor, budget: int) -> list[tuple[int, int]]:
    """(start, stop) ranges of images in order, as few as `budget` tokens a range allows, and of near-equal tokens
    (256 images at a budget of 100 give 86, 85, 85, not 100, 100, 56). `tokens_per_image`: [B] int64."""
    images = int(tokens_per_image.shape[0])
    cumulative = tokens_per_image.cumsum(0)  # [B]
    total = int(cumulative[-1])
    parts = min(images, -(-total // max(budget, 1)))
    shares = torch.tensor([k * total / parts for k in range(1, parts)], dtype=torch.float64)
    cuts = (torch.searchsorted(cumulative.double(), shares) + 1).clamp(1, images - 1).tolist()  # after the image
    bounds = [0, *sorted(set(cuts)), images]
    return list(itertools.pairwise(bounds))


def shaped_ranges(tokens_per_image: torch.Tensor, budget: int, sizes: Sequence[int]) -> list[tuple[int, int]]:
    """(start, stop) ranges of images in order, each of the largest of `sizes` (the batch sizes the forward was
    prepared for, `--compile-shapes`) that fits `budget` (else the smallest), the last one what is left: chunks that
    run unpadded where near-equal ones would be padded up to the next prepared size."""
    images, widest = int(tokens_per_image.shape[0]), int(tokens_per_image.max())
    size = max((s for s in sizes if s * widest <= budget), default=min(sizes))
    return [(start, min(start + size, images)) for start in range(0, images, size)]


class RecentSenders:
    """The keys that sent a request in the last `window_s` seconds. Only while another key shares the teacher is a
    batch bounded by `--max-batch-ms` and a larger request cut into chunks of that size: a key alone has nobody
    waiting behind its forwards, and on a CPU teacher chunks and small batches cost it 10-25% of its throughput
    (DeiT-S and the CIFAR ViT, 32-image requests; docs/performance-notes.md, section 27). Its batches are bounded by
    `LONE_BATCH_S` instead."""

    def __init__(self, window_s: float = SHARED_S) -> None:
        self.window_s = window_s
        self._last: dict[int, float] = {}  # key id -> time.monotonic() of its last request

    def sent(self, key_id: int, now: float) -> None:
        """A request of `key_id` arrived at `now`."""
        self._last[key_id] = now

    def several(self, now: float, queued_tokens: Callable[[int], int]) -> bool:
        """Whether more than one key sent a request within `window_s` of `now` or still has `queued_tokens`."""
        return len(self._recent(now, queued_tokens)) > 1

    def besides(self, key_id: int, now: float, queued_tokens: Callable[[int], int]) -> bool:
        """Whether a key other than `key_id` sent a request within `window_s` of `now` or still has `queued_tokens`:
        a request of `key_id` will share the teacher with it."""
        return any(k != key_id for k in self._recent(now, queued_tokens))

    def _recent(self, now: float, queued_tokens: Callable[[int], int]) -> dict[int, float]:
        for key_id, sent in list(self._last.items()):
            if now - sent > self.window_s and not queued_tokens(key_id):
                del self._last[key_id]
        return self._last


def split_job(
    job: BatchJob, *, budget: int, prefix: int, seconds: Callable[[int], float], sizes: Sequence[int] = ()
) -> list[BatchJob]:
    """`job` as the chunks to queue in its place, or [job] when it fits `budget` tokens (or is one image). `prefix`:
    the teacher's prefix tokens per image; `seconds(tokens)`: the compute estimate of a forward; `sizes`: the batch
    sizes the forward was prepared for (none: any size runs as well)."""
    budget = max(budget, MIN_CHUNK_TOKENS)
    if job.tokens <= budget or job.images < 2:
        return [job]
    per_image = job.input.keep_counts + prefix  # [B] int64
    ranges = shaped_ranges(per_image, budget, sizes) if sizes else image_ranges(per_image, budget)
    if len(ranges) == 1:
        return [job]
    tokens = [int(per_image[start:stop].sum()) for start, stop in ranges]
    request = SplitRequest(job, len(ranges))
    chunks: list[BatchJob] = []
    for index, (start, stop) in enumerate(ranges):
        after_s = sum(seconds(t) for t in tokens[index + 1 :])  # the later chunks' forwards, one batch each
        chunks.append(
            dataclasses.replace(
                job,
                input=job.input.rows(start, stop),
                tokens=tokens[index],
                deadline=None if job.deadline is None else job.deadline - after_s,
                part=ChunkOf(request, index),
            )
        )
    return chunks


def whole_requests(ran: Sequence[tuple[BatchJob, Answer]]) -> list[tuple[BatchJob, Answer]]:
    """The forward's (job, answer) pairs with each chunk's answer kept by its request: a split request appears, with
    its whole answer, after its last chunk ran; requests that were not split pass as they are."""
    out: list[tuple[BatchJob, Answer]] = []
    for job, answer in ran:
        if job.part is None:
            out.append((job, answer))
        elif (whole := job.part.request.add(job.part.index, answer)) is not None:
            out.append((job.part.request.job, whole))
    return out
