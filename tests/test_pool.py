"""runtime/serving/pool.py: the request threads of the frame models reuse the most recently idle thread."""
import threading
import time

from storymaker_serve.runtime.serving.pool import LifoPool


def _wait(cond, timeout=10.0):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "timed out"
        time.sleep(0.005)


def test_the_most_recently_idle_thread_takes_the_next_task():
    pool = LifoPool(4, "t")
    names, gates = [], [threading.Event(), threading.Event()]

    def task(k):
        names.append((k, threading.current_thread().name))
        if k < 2:
            gates[k].wait(10)

    pool.submit(task, 0)
    pool.submit(task, 1)                      # the first is busy: a second thread
    _wait(lambda: len(names) == 2)
    gates[1].set()                            # thread of task 1 goes idle first ...
    _wait(lambda: len(pool.idle) == 1)
    gates[0].set()                            # ... then the thread of task 0
    _wait(lambda: len(pool.idle) == 2)
    for k in range(2, 6):                     # one after another: always the thread of task 0, no new threads
        pool.submit(task, k)
        _wait(lambda k=k: len(names) == k + 1 and len(pool.idle) == 2)
    first = dict(names)[0]
    assert [n for k, n in names[2:]] == [first] * 4 and len(pool.workers) == 2
    pool.shutdown()


def test_tasks_beyond_max_workers_wait_in_order_and_a_failure_keeps_the_thread():
    pool = LifoPool(2, "t")
    gate, done = threading.Event(), []

    def task(k):
        gate.wait(10)
        if k == 1:
            raise RuntimeError("boom")        # logged; the thread serves the next task
        done.append(k)

    for k in range(6):
        pool.submit(task, k)
    assert len(pool.workers) == 2 and len(pool.backlog) == 4
    gate.set()
    _wait(lambda: len(done) == 5)
    assert sorted(done) == [0, 2, 3, 4, 5] and done[-3:] == [3, 4, 5] and len(pool.workers) == 2
    pool.shutdown()
    assert not any(w.thread.is_alive() for w in pool.workers)


def test_shutdown_drops_waiting_tasks_and_refuses_new_ones():
    import pytest

    pool = LifoPool(1, "t")
    gate, done = threading.Event(), []
    pool.submit(lambda: (gate.wait(10), done.append(0)))
    pool.submit(lambda: done.append(1))      # waits for the busy thread
    threading.Timer(0.1, gate.set).start()
    pool.shutdown()                           # the running task finishes, the waiting one is dropped
    assert done == [0]
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(print)


def test_stage_metrics_are_sent_off_the_request_path_once_per_series():
    """StageMetrics: stages and step-batcher executions only add to counters on the request's thread (a metric
    increment is a round trip to the server); flush() has a thread of its own send one increment per series."""
    from storymaker_serve.runtime.serving.sampling import StageMetrics

    sent = []

    class Family:
        COUNTER = 0

        def __init__(self, name, description, kind):
            self.name = name

        def Metric(self, labels):                                        # noqa: N802 - pb_utils' name
            fam = self

            class M:
                def increment(self, amount):
                    sent.append((fam.name, tuple(sorted(labels.items())), amount, threading.current_thread().name))
            return M()

    m = StageMetrics(type("pb", (), {"MetricFamily": Family}), "storymaker")
    for rows in (2, 4, 8):
        m.execution("unet", rows)
    with m.stage("denoise"):
        pass
    assert sent == []                                        # nothing sent yet
    m.flush()
    _wait(lambda: len(sent) == 4)
    got = {(name, dict(labels).get("engine") or dict(labels)["stage"]): amount for name, labels, amount, _ in sent}
    assert got[("storymaker_engine_rows_total", "unet")] == 14
    assert got[("storymaker_engine_executions_total", "unet")] == 3
    assert got[("storymaker_stage_count_total", "denoise")] == 1
    assert got[("storymaker_stage_seconds_total", "denoise")] >= 0
    assert {t for *_, t in sent} == {"metrics"}
    m.flush()
    time.sleep(0.05)
    assert len(sent) == 4                                    # nothing new: nothing sent
