"""A per-process bound on requests that hold a thread for long (Prefer: wait, event streams):
past it they are refused at once rather than queued, so they can never take every thread of a
web process from other users."""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, Optional

from config.settings import Settings
from renderq.runtime import settings


class Admission:
    def __init__(self, bound: Callable[[Settings], int]):
        self.bound = bound
        self.lock = threading.Lock()
        self.slots: Optional[threading.BoundedSemaphore] = None  # sized on first use, from the app's settings

    @contextlib.contextmanager
    def enter(self) -> Iterator[bool]:
        """Whether this request is admitted; its slot is given back when the block ends."""
        with self.lock:
            if self.slots is None:
                self.slots = threading.BoundedSemaphore(self.bound(settings()))
        admitted = self.slots.acquire(blocking=False)
        try:
            yield admitted
        finally:
            if admitted:
                self.slots.release()
