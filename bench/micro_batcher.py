"""MicroBatcher: concurrent `route(text)` calls gathered into one Router.route_batch, the opt-in
micro-batching `zooter bench --triton` compares beside threads sharing one Router (engine
`in-process-batched`). It stays a bench engine: on CPU it was slower (docs/triton.md), so the Router
does not offer it.
"""

from __future__ import annotations

import time


class MicroBatcher:
    """`route(text)` calls from many threads gathered, for at most `window_ms` or `max_batch` queries,
    into one Router.route_batch call. route_batch runs each query alone (issue 20), so gathering no
    longer changes decisions, and it saves no work either.
    """

    def __init__(self, router, window_ms: float = 1.0, max_batch: int = 32):
        import queue
        import threading

        self.router, self.window, self.max_batch = router, window_ms / 1000, max_batch
        self.pending: queue.SimpleQueue = queue.SimpleQueue()
        self.worker = threading.Thread(target=self._run, name="micro-batcher", daemon=True)
        self.worker.start()

    def route(self, text):
        from concurrent.futures import Future

        done: Future = Future()
        self.pending.put((text, done))
        return done.result()

    def close(self) -> None:
        self.pending.put(None)
        self.worker.join()

    def _run(self) -> None:
        import queue

        while True:
            first = self.pending.get()
            if first is None:
                return
            batch, deadline = [first], time.perf_counter() + self.window
            while len(batch) < self.max_batch:
                try:
                    item = self.pending.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if item is None:
                    self.pending.put(None)
                    break
                batch.append(item)
            try:
                decisions = self.router.route_batch([text for text, _ in batch], batch_size=len(batch))
                for (_, done), decision in zip(batch, decisions):
                    done.set_result(decision)
            except Exception as err:   # handed to every waiting caller
                for _, done in batch:
                    done.set_exception(err)
