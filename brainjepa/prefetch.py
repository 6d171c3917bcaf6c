"""Batches prepared ahead of the training step, in one background thread.

Window cutting and mask sampling run on the CPU; the step's GPU work does not wait on them when the
next steps' batches are already built (and, on CUDA, in pinned memory so the copy to the device is
asynchronous). Batches are pure functions of their step index (`brainjepa.data.BatchStream`), so
prefetching changes nothing but the timing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from brainjepa.masks import Masks

MicroBatches = list[tuple[torch.Tensor, Masks]]  # [(x (B, R, T), masks)] of one optimizer step


def pinned(batches: MicroBatches) -> MicroBatches:
    """Page-locked copies, so `.to(cuda, non_blocking=True)` overlaps with compute."""
    return [(x.pin_memory(), m.pin_memory()) for x, m in batches]


class Prefetcher:
    """Iterate (step, micro-batches) over `steps`, building up to `depth` steps ahead in a thread.

    `make(step)` builds one step's micro-batches. depth 0 builds each one inline when it is asked for.
    Stopping early (an exception, Ctrl-C) cancels what was queued and joins the thread.
    """

    def __init__(
        self, make: Callable[[int], MicroBatches], steps: Sequence[int], depth: int = 2, pin: bool = False
    ) -> None:
        self.make, self.steps, self.depth, self.pin = make, steps, depth, pin

    def _build(self, step: int) -> MicroBatches:
        batches = self.make(step)
        return pinned(batches) if self.pin else batches

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self) -> Iterator[tuple[int, MicroBatches]]:
        if self.depth == 0:
            for step in self.steps:
                yield step, self._build(step)
            return
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="brainjepa-prefetch")
        queue: deque[tuple[int, Future[MicroBatches]]] = deque()
        todo = iter(self.steps)
        try:
            for step in todo:
                queue.append((step, pool.submit(self._build, step)))
                if len(queue) >= self.depth:
                    break
            while queue:
                step, future = queue.popleft()
                nxt = next(todo, None)
                if nxt is not None:
                    queue.append((nxt, pool.submit(self._build, nxt)))
                yield step, future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
