"""Builds the next steps' batches ahead of the step, in a background thread, and measures the wait.

Training asks for one step's data at a time; tokenization, packing, image decoding and reading
indexed samples happen here while the previous step computes (the GPU step, and torch's CPU kernels,
release the GIL; PIL's decoders and SentencePiece do too). ``depth`` steps are kept ready.
``wait_s`` is the time the step actually stood waiting -- the number the progress line reports: in
steady state it is ~0; when it is not, the data path is the bottleneck.

The producer is any iterator of items; each item carries its own data position (the stream's
``state_dict()`` after producing it), so a checkpoint records the position of the last *consumed*
step, never of the prefetched ones. An exception in the producer is raised in the consumer, at the
step that needed the item.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Iterator

_DONE = object()


class Prefetcher:
    def __init__(self, items: Iterator, depth: int = 2, name: str = "data-prefetch"):
        self.depth = depth
        self.wait_s = 0.0  # total seconds the consumer waited
        self.waits = 0
        if depth <= 0:  # synchronous: the same items, built on the step's path
            self._items, self._thread = items, None
            return
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._final: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items,), name=name, daemon=True)
        self._thread.start()

    def _run(self, items: Iterator) -> None:
        try:
            for item in items:
                while not self._stop.is_set():
                    try:
                        self._queue.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._put_final((_DONE, None))
        except BaseException as e:  # noqa: BLE001 -- handed to the consumer, raised there
            self._put_final((None, e))

    def _put_final(self, entry) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return
            except queue.Full:
                continue

    def next(self):
        """The next item; the time spent waiting for it is added to ``wait_s``."""
        t0 = time.perf_counter()
        if self._thread is None:
            item = next(self._items)
        else:
            if self._final is not None:  # the producer has ended: say so again
                raise self._final
            item, error = self._queue.get()
            if error is not None or item is _DONE:
                self._final = error if error is not None else StopIteration()
                raise self._final
        self.wait_s += time.perf_counter() - t0
        self.waits += 1
        return item

    def take_wait(self) -> float:
        """Seconds waited since the last call (the progress line's window)."""
        w, self.wait_s = self.wait_s, 0.0
        return w

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()  # checked between items: the thread ends after the one it is building
            self._thread.join(timeout=120)
