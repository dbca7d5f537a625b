"""runtime.serving.batcher.StepBatcher: concurrent loops' engine calls become one call per round (no server)."""
import threading

import numpy as np
import pytest

from storymaker_serve.runtime.serving.batcher import StepBatcher


def _engine(log):
    def fn(feeds):
        log.append(feeds["sample"].shape[0])
        return {"noise_pred": feeds["sample"] * 2 + feeds["timestep"][:, None]}
    return fn


def _loops(batcher, n_loops, steps, rows=2, shape=(3,), fn="unet", barrier=True):
    """n_loops threads, each calling `steps` times with its own values; returns each loop's outputs."""
    results = [[] for _ in range(n_loops)]
    start = threading.Barrier(n_loops)

    def loop(k):
        with batcher.loop():
            if barrier:
                start.wait()
            for i in range(steps):
                x = np.full((rows, *shape), k * 100 + i, np.float32)
                out = batcher.call(fn, {"sample": x, "timestep": np.full((rows,), float(i), np.float32)})
                results[k].append(out["noise_pred"])
    ts = [threading.Thread(target=loop, args=(k,)) for k in range(n_loops)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    return results


def test_concurrent_loops_share_each_execution_and_get_their_own_rows():
    log = []
    b = StepBatcher({"unet": _engine(log)}, {"unet": 8}, max_wait_s=5.0)   # rounds wait for every loop
    res = _loops(b, 4, 5)
    assert log == [8] * 5                                   # 4 loops x 2 rows in one call per step
    for k in range(4):
        for i, out in enumerate(res[k]):
            np.testing.assert_array_equal(out, np.full((2, 3), (k * 100 + i) * 2 + i, np.float32))
    assert b.stats.executions["unet"] == 5 and b.stats.rows["unet"] == 40


def test_rows_per_call_never_exceed_the_profile_limit():
    log = []
    b = StepBatcher({"unet": _engine(log)}, {"unet": 4}, max_wait_s=5.0)
    _loops(b, 3, 2)
    assert max(log) <= 4 and sum(log) == 3 * 2 * 2


def test_unstackable_calls_run_separately_in_the_same_round():
    log = []
    b = StepBatcher({"unet": _engine(log)}, {"unet": 8}, max_wait_s=5.0)
    out = {}

    def loop(k, shape):
        with b.loop():
            out[k] = b.call("unet", {"sample": np.ones((2, *shape), np.float32), "timestep": np.zeros(2, np.float32)})
    ts = [threading.Thread(target=loop, args=(0, (3,))), threading.Thread(target=loop, args=(1, (5,)))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert sorted(log) == [2, 2] and out[0]["noise_pred"].shape == (2, 3) and out[1]["noise_pred"].shape == (2, 5)


def test_an_error_reaches_every_caller_of_that_execution_and_the_next_round_runs():
    calls = []

    def fn(feeds):
        calls.append(feeds["sample"].shape[0])
        if len(calls) == 1:
            raise RuntimeError("engine failed")
        return {"noise_pred": feeds["sample"]}
    b = StepBatcher({"unet": fn}, {"unet": 8}, max_wait_s=5.0)
    errors, start = [], threading.Barrier(2)

    def loop():
        with b.loop():
            start.wait()
            try:
                b.call("unet", {"sample": np.ones((2, 1), np.float32)})
            except RuntimeError as e:
                errors.append(str(e))
    ts = [threading.Thread(target=loop) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert errors == ["engine failed"] * 2
    assert b.call("unet", {"sample": np.ones((2, 1), np.float32)})["noise_pred"].shape == (2, 1)


def test_a_loop_that_stops_calling_does_not_stall_the_others():
    """A loop that leaves (cancelled, finished) lowers the count the rounds wait for; one that stays inside without
    calling only delays them by max_wait_s."""
    log = []
    b = StepBatcher({"unet": _engine(log)}, {"unet": 8}, max_wait_s=0.05)
    idle = threading.Event()

    def stalled():
        with b.loop():
            idle.wait(10)
    t = threading.Thread(target=stalled)
    t.start()
    res = _loops(b, 2, 3, barrier=False)
    idle.set()
    t.join()
    assert all(len(r) == 3 for r in res) and sum(log) == 2 * 3 * 2


@pytest.mark.parametrize("n", [1, 8])
def test_single_and_many_loops_get_identical_numbers(n):
    b = StepBatcher({"unet": _engine([])}, {"unet": 16}, max_wait_s=5.0)
    res = _loops(b, n, 3)
    ref = [[np.full((2, 3), (k * 100 + i) * 2 + i, np.float32) for i in range(3)] for k in range(n)]
    for r, e in zip(res, ref):
        for a, x in zip(r, e):
            np.testing.assert_array_equal(a, x)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_rows_split_from_one_output_are_rebatched_without_a_copy(lib):
    """A round's ControlNet output, split per loop, goes to the UNet round of the same loops as one view of that
    output (no copy of the residuals); rows in another order, with a gap or from other buffers are concatenated.
    The result equals concatenation in every case."""
    import torch

    from storymaker_serve.runtime.serving.batcher import _concat

    base = np.arange(48, dtype=np.float32).reshape(8, 3, 2)
    if lib == "torch":
        base = torch.from_numpy(base)
    cat = (lambda xs: np.concatenate(xs)) if lib == "numpy" else (lambda xs: torch.cat(xs))
    ptr = (lambda a: a.__array_interface__["data"][0]) if lib == "numpy" else (lambda a: a.data_ptr())
    cases = {"adjacent": ([base[0:2], base[2:4], base[4:8]], True), "reordered": ([base[2:4], base[0:2]], False),
             "gap": ([base[0:2], base[4:6]], False), "other buffer": ([base[0:2], base[2:4] * 1], False)}
    for name, (parts, view) in cases.items():
        got = _concat(parts)
        assert np.array_equal(np.asarray(got), np.asarray(cat(parts))), name
        assert (ptr(got) == ptr(base)) == view, name


def test_controlnet_residuals_reach_the_unet_round_as_a_view():
    """Three loops, each a ControlNet call then a UNet call with its residuals per step: the batcher runs every round
    in one loop order (not arrival order), so each UNet round gets the residuals as a view of the ControlNet round's
    output (no copy), and every loop still gets its own rows back."""
    outputs, shared = [], []

    def controlnet(feeds):
        outputs.append(feeds["sample"] * 10)
        return {"res": outputs[-1]}

    def unet(feeds):
        shared.append(any(np.shares_memory(feeds["res"], o) for o in outputs[-1:]) and feeds["res"].shape[0] == 6)
        return {"noise_pred": feeds["res"] + 1}

    b = StepBatcher({"controlnet": controlnet, "unet": unet}, {"controlnet": 8, "unet": 8}, max_wait_s=5.0)
    results = [[] for _ in range(3)]
    start = threading.Barrier(3)

    def loop(k):
        with b.loop():
            start.wait()
            for i in range(4):
                x = np.full((2, 3), k * 100 + i, np.float32)
                res = b.call("controlnet", {"sample": x})["res"]
                results[k].append(b.call("unet", {"sample": x, "res": res})["noise_pred"])
    ts = [threading.Thread(target=loop, args=(k,)) for k in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert shared == [True] * 4, shared
    for k in range(3):
        for i in range(4):
            assert np.array_equal(results[k][i], np.full((2, 3), (k * 100 + i) * 10 + 1, np.float32))


def test_a_round_starts_when_its_calls_fill_an_execution():
    """4 loops in flight, 2 rows each, 4 rows per execution: two loops that reach their call fill one execution, so
    it runs at once instead of waiting max_wait_s for the two loops still on their way (which then fill the next)."""
    import time

    log = []
    b = StepBatcher({"unet": _engine(log)}, {"unet": 4}, max_wait_s=30.0)
    ready, release, times = threading.Barrier(4), threading.Event(), {}

    def loop(k):
        with b.loop():
            ready.wait()
            if k >= 2:                          # two loops are busy elsewhere until the first two got their rows
                release.wait(30)
            t = time.perf_counter()
            out = b.call("unet", {"sample": np.full((2, 3), k, np.float32), "timestep": np.zeros(2, np.float32)})
            times[k] = time.perf_counter() - t
            np.testing.assert_array_equal(out["noise_pred"], np.full((2, 3), 2 * k, np.float32))
            if k == 1:
                release.set()
    ts = [threading.Thread(target=loop, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert log == [4, 4] and max(times.values()) < 10.0       # two full executions, no max_wait_s timeout


def test_a_filled_round_leaves_the_calls_beyond_whole_executions_for_the_next():
    """6 loops in flight, 2 rows each, 4 rows per execution: when 3 loops wait, one execution of 2 loops runs and
    the third loop's call waits for the next round (with the loops still on their way) instead of running alone."""
    import time

    from storymaker_serve.runtime.serving.batcher import _Call

    b = StepBatcher({"unet": _engine([])}, {"unet": 4}, max_wait_s=30.0)
    b.active = 6
    calls = [_Call("unet", {}, 2, loop=k) for k in range(4)]
    b.pending, b.first_pending = calls[:3], time.perf_counter()
    assert b._round() == calls[:2] and b.pending == calls[2:3]
    assert b._round() is None and b.pending == calls[2:3]   # 2 rows: no whole execution yet
    b.pending.append(calls[3])
    assert b._round() == calls[2:] and b.pending == []
    b.pending, b.first_pending = calls[:3], time.perf_counter() - 60
    assert b._round() == calls[:3]                          # waited max_wait_s: everything runs


def test_an_execution_that_cannot_take_every_waiting_call_takes_the_oldest_requests_first():
    """Five loops in flight, three waiting with 2 rows each, 4 rows per execution: the round runs the two oldest
    requests' calls and the newest waits, whatever the order of their threads or arrivals. A fixed order by thread
    served the same loops first in every round, so some clients waited far longer than others (the p99 tail)."""
    from storymaker_serve.runtime.serving.batcher import _Call

    b = StepBatcher({"unet": _engine([])}, {"unet": 4}, max_wait_s=30.0)
    b.active = 5
    feeds = {"sample": np.zeros((2, 3), np.float32)}
    loops = [30, 10, 20]                                   # thread idents; the highest started first
    calls = [_Call("unet", feeds, 2, loop=ident) for ident in loops]
    for started, c in zip((1.0, 3.0, 2.0), calls):
        c.order = (started, c.loop)
    b.pending, b.first_pending = list(reversed(calls)), 1e18   # newest arrived first; no timeout
    taken = b._round()
    assert [c.loop for c in taken] == [30, 20] and [c.loop for c in b.pending] == [10]
