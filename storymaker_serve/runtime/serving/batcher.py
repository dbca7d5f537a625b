"""In-flight batching of denoising steps: the UNet (and ControlNet) calls of every loop in flight, one call per step.

A served frame model runs each request's loop (runtime/denoise.py's `denoise`, unchanged) on its own thread of one
model instance. Their engine calls go through one `StepBatcher`: a loop that reaches its UNet call waits until every
loop in flight has reached a call too, or the calls waiting fill one execution of a function (`max_rows`), or
`max_wait_s` passed; then one of the waiting threads runs them all as one
call per function and input shape (concatenated along the batch axis, at most `max_rows` rows per call), and each
loop gets its own rows back. So N concurrent requests put N steps into one UNet execution, up to the engine
profile's batch limit, with no model instance pinned per request, and the round trip to the UNet model is paid once
per step for all of them rather than once per request and step. Loops may be at different steps: the timestep is a
per-row input. Requests whose inputs cannot be stacked (other sizes, character counts, a pose map or not) are run
as separate calls in the same round.
"""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class _Call:
    fn: str
    feeds: dict
    rows: int
    result: dict | None = None
    error: BaseException | None = None
    done: bool = False
    loop: int = field(default_factory=threading.get_ident)     # each loop runs on its own thread
    order: tuple = ()                                           # (its loop's start time, loop): oldest request first


@dataclass
class BatchStats:
    """Executions and rows per function since start (rows / executions = the mean batch)."""
    executions: dict = field(default_factory=dict)
    rows: dict = field(default_factory=dict)

    def add(self, fn: str, rows: int) -> None:
        self.executions[fn] = self.executions.get(fn, 0) + 1
        self.rows[fn] = self.rows.get(fn, 0) + rows


def _concat(arrays: list):
    """Rows of several calls as one batch: numpy arrays on the host, or torch tensors where they lie (I/O binding).
    Rows that already lie one after another in one buffer (the ControlNet's residuals of a round, split per loop, on
    their way to the UNet's round of the same loops) are viewed as one batch instead of copied: at 960x1280 that is
    252 MB per request and step."""
    first, rows = arrays[0], _adjacent(arrays)
    shape = (rows, *first.shape[1:]) if rows is not None else None
    if isinstance(first, np.ndarray):
        return np.concatenate(arrays) if shape is None else \
            np.lib.stride_tricks.as_strided(first, shape, first.strides, writeable=False)

    return torch.cat(arrays) if shape is None else torch.as_strided(first, shape, first.stride())


def _layout(a) -> tuple:
    """(buffer owner, start address, bytes, contiguous) of a numpy array (owner: its base array) or a torch tensor
    (owner: its storage)."""
    if isinstance(a, np.ndarray):
        return (id(a.base) if a.base is not None else None, a.__array_interface__["data"][0], a.nbytes,
                a.flags.c_contiguous)
    return a.untyped_storage().data_ptr(), a.data_ptr(), a.numel() * a.element_size(), a.is_contiguous()


def _adjacent(arrays: list) -> int | None:
    """The total rows if every array is contiguous, of one dtype and row shape, and starts where the one before ends
    in one underlying buffer; else None."""
    first = arrays[0]
    owner, end = _layout(first)[:2]
    if owner is None:
        return None
    for a in arrays:
        a_owner, start, nbytes, contiguous = _layout(a)
        if (a_owner != owner or a.dtype != first.dtype or tuple(a.shape[1:]) != tuple(first.shape[1:])
                or not contiguous or start != end):
            return None
        end += nbytes
    return sum(int(a.shape[0]) for a in arrays)


class StepBatcher:
    """`fns`: name -> function over batched feeds (the `unet`/`controlnet` BLS calls over numpy arrays, or the
    engines' sessions over torch tensors on their device).
    `max_rows`: name -> the engine profile's batch limit. Every loop calls through `call(name, feeds)` inside
    `with batcher.loop():`."""

    def __init__(self, fns: dict, max_rows: dict, max_wait_s: float = 0.010):
        self.fns, self.max_rows, self.max_wait_s = fns, max_rows, max_wait_s
        self.cv = threading.Condition()
        self.active, self.pending, self.running = 0, [], False
        self.first_pending = 0.0
        self.started: dict[int, float] = {}     # loop (thread) -> when it entered: rounds serve the oldest first
        self.stats = BatchStats()
        self.on_execution = None            # (name, rows) after each execution: the served models' metrics

    @contextlib.contextmanager
    def loop(self):
        """A denoising loop takes part in the rounds while inside (the rounds wait for it)."""
        with self.cv:
            self.active += 1
            self.started[threading.get_ident()] = time.perf_counter()
        try:
            yield self
        finally:
            with self.cv:
                self.active -= 1
                self.started.pop(threading.get_ident(), None)
                self.cv.notify_all()

    def fn(self, name: str):
        """`name`'s function as a loop calls it: feeds -> outputs, batched with the other loops' calls."""
        return lambda feeds: self.call(name, feeds)

    def call(self, name: str, feeds: dict) -> dict:
        c = _Call(name, feeds, int(next(iter(feeds.values())).shape[0]))
        with self.cv:
            c.order = (self.started.get(c.loop, 0.0), c.loop)
            if not self.pending:
                self.first_pending = time.perf_counter()
            self.pending.append(c)
            self.cv.notify_all()
            while not c.done:
                batch = self._round() if not self.running and self.pending else None
                if batch:
                    self.running = True
                    self.cv.release()
                    try:
                        self._run(batch)
                    except BaseException as e:  # noqa: BLE001 - a fault outside the calls: every caller sees it
                        for b in batch:
                            if not b.done:
                                b.error, b.done = e, True
                    finally:
                        self.cv.acquire()
                        self.running = False
                        if self.pending:                    # calls that arrived during the round start the next
                            self.first_pending = time.perf_counter()
                        self.cv.notify_all()
                else:
                    self.cv.wait(timeout=self.max_wait_s / 4 or None)
        if c.error is not None:
            raise c.error
        return c.result

    def _round(self) -> list[_Call] | None:
        """The calls a round runs now, removed from `pending`, or None (keep waiting). All of them when every loop in
        flight is waiting on a call or the oldest call has waited max_wait_s; otherwise whole executions of each
        function whose waiting calls fill one, and the rest wait for the loops still on their way (with more loops
        than one execution holds, as at concurrency 8 with a 4-image profile: taking 5 loops' calls into a 4-loop
        execution would run one full and one 1-loop execution). Those executions take the oldest requests' calls
        first: a fixed order (the loops' threads) served the same loops first in every round, and at concurrency 16
        some clients then waited 2.5x as long as others on average (p99 2.6x p50)."""
        if len(self.pending) >= self.active or time.perf_counter() - self.first_pending >= self.max_wait_s:
            batch, self.pending = self.pending, []
            return batch
        take: list[_Call] = []
        for fn in dict.fromkeys(c.fn for c in self.pending):
            calls = sorted((c for c in self.pending if c.fn == fn), key=lambda c: c.order)
            limit, total = self.max_rows.get(fn, 1 << 30), sum(c.rows for c in calls)
            if total < limit:
                continue
            whole, rows, mine = limit * (total // limit), 0, []
            for c in calls:
                if rows + c.rows <= whole:
                    mine.append(c)
                    rows += c.rows
            take += mine or calls
        if not take:
            return None
        chosen = {id(c) for c in take}
        self.pending = [c for c in self.pending if id(c) not in chosen]
        return take

    def _run(self, batch: list[_Call]) -> None:
        groups: dict[tuple, list[_Call]] = {}
        for c in batch:
            key = (c.fn, tuple(sorted((k, tuple(v.shape[1:]), str(v.dtype)) for k, v in c.feeds.items())))
            groups.setdefault(key, []).append(c)
        for (name, _), calls in groups.items():
            limit = self.max_rows.get(name, 1 << 30)
            chunk: list[_Call] = []
            # the loops in one order every round (oldest request first, not arrival order), at most `limit` rows per
            # call: so the UNet round gets the loops' ControlNet residuals in the order that round produced them, and
            # views them (_concat)
            for c in sorted(calls, key=lambda c: c.order):
                if chunk and sum(x.rows for x in chunk) + c.rows > limit:
                    self._run_one(name, chunk)
                    chunk = []
                chunk.append(c)
            self._run_one(name, chunk)

    def _run_one(self, name: str, calls: list[_Call]) -> None:
        try:
            if len(calls) == 1:
                outs = [self.fns[name](calls[0].feeds)]
            else:
                feeds = {k: _concat([c.feeds[k] for c in calls]) for k in calls[0].feeds}
                out = self.fns[name](feeds)
                ends = np.cumsum([c.rows for c in calls])
                outs = [{k: v[e - c.rows:e] for k, v in out.items()} for c, e in zip(calls, ends)]
            rows = sum(c.rows for c in calls)
            self.stats.add(name, rows)
            if self.on_execution is not None:
                self.on_execution(name, rows)
            for c, o in zip(calls, outs):
                c.result = o
        except BaseException as e:  # noqa: BLE001 - every caller of this execution gets its error
            for c in calls:
                c.error = e
        finally:
            with self.cv:
                for c in calls:
                    c.done = True
                self.cv.notify_all()
