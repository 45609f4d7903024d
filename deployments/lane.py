"""A single worker thread with a bounded queue, for work that must not hold up other work.

`asyncio.to_thread` shares the event loop's default executor: many slow calls there (one per
escalated classify input) would queue ahead of the decode loop's forward passes. A lane has its
own thread, and refuses work past `depth` waiting calls instead of queueing it without end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class Lane:
    def __init__(self, depth: int, name: str) -> None:
        self.depth = depth
        self.pending = 0  # changed on the event loop only, so it needs no lock
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def full(self) -> bool:
        return self.pending >= self.depth

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` on the lane's thread. Check `full()` first: this does not refuse."""
        self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        finally:
            self.pending -= 1
