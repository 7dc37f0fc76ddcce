"""The end of a distributed run: what the refresh sync check holds, and the drain of gloo's worker threads at exit.

The exit itself is a race (a gloo worker releasing a finished collective's tensors while the interpreter finalizes),
so whether runs end cleanly is counted by ``benchmarks/exit_runs.py`` over many runs, not asserted by one run here.
These tests check the pieces: the check holds the job's store only while it checks, and the drain waits for a
worker that still runs Python before it lets the interpreter finalize.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from pathlib import Path

import pytest

from anon_hf.distributed import sync

linux_only = pytest.mark.skipif(
    not Path("/proc/self/task").is_dir(), reason="the drain watches threads through /proc (Linux)"
)


def _name_this_thread(name: bytes) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    PR_SET_NAME = 15
    assert libc.prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0) == 0


@linux_only
def test_the_drain_returns_at_once_without_gloo_workers():
    started = time.monotonic()
    assert sync.drain_gloo_workers(timeout=5.0) is True
    assert time.monotonic() - started < 1.0


@linux_only
def test_the_drain_waits_until_a_worker_running_python_is_idle():
    # A thread named as gloo names its workers runs Python (it needs the GIL, as a worker freeing a collective's
    # tensors does) for a while, then sleeps on an event, as an idle worker waits for work.
    finished, release = threading.Event(), threading.Event()

    def worker():
        _name_this_thread(b"pt_gloo_runloop")
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            sum(range(1000))
        finished.set()
        release.wait()

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        time.sleep(0.05)
        assert sync._gloo_worker_activity()  # the drain sees it
        assert sync.drain_gloo_workers(timeout=10.0) is True
        assert finished.is_set()
    finally:
        release.set()
        thread.join()


@linux_only
def test_the_drain_gives_up_after_its_timeout_on_a_worker_that_never_idles():
    stop = threading.Event()

    def busy():
        _name_this_thread(b"pt_gloo_runloop")
        while not stop.is_set():
            time.sleep(0.001)  # wakes every millisecond: never idle

    thread = threading.Thread(target=busy)
    thread.start()
    try:
        started = time.monotonic()
        assert sync.drain_gloo_workers(timeout=0.3) is False
        assert time.monotonic() - started < 2.0
    finally:
        stop.set()
        thread.join()


class FakeStore:
    """The store calls the check makes, on a dict."""

    def __init__(self, data):
        self.data = data

    def set(self, key, value):
        self.data[key] = value.encode() if isinstance(value, str) else value

    def check(self, keys):
        return all(k in self.data for k in keys)

    def get(self, key):
        return self.data[key]


def test_the_check_holds_the_jobs_store_only_while_it_checks(monkeypatch):
    data = {}
    monkeypatch.setattr(sync.dist, "is_available", lambda: True)
    monkeypatch.setattr(sync.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(sync.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(sync.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(sync.dist, "PrefixStore", lambda prefix, store: FakeStore(data))
    monkeypatch.setattr("torch.distributed.distributed_c10d._get_default_store", lambda: object())
    registered = []
    monkeypatch.setattr(sync, "_drain_registered", False)
    monkeypatch.setattr(sync.atexit, "register", registered.append)
    checker = sync.RefreshSyncChecker()
    checker.count_call()
    checker.count_call()
    assert registered == [sync.drain_gloo_workers]  # once per process, from the first step of a distributed run
    checker.check(1)
    assert checker._store is None and checker._ranks is None
    assert data["refresh0/rank0"] == b"2,1"
    data["refresh1/rank1"] = b"3,2"  # the neighbour refreshed at another step: the error still names it
    with pytest.raises(sync.RefreshOutOfSyncError, match="rank 1"):
        checker.check(3)
    assert checker._store is None and checker._ranks is None


def test_a_single_process_registers_no_drain(monkeypatch):
    registered = []
    monkeypatch.setattr(sync, "_drain_registered", False)
    monkeypatch.setattr(sync.atexit, "register", registered.append)
    sync.RefreshSyncChecker().count_call()
    assert registered == []
