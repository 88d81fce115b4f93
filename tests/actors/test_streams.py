"""StreamManager on the CPU backend (always) and on CUDA (marked gpu)."""
from __future__ import annotations

import pickle
import threading
import time

import pytest
import torch

from actors.errors import CudaError, StreamLimitError
from actors.streams import CpuEvent, StreamManager, StreamPriority

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=DEVICES)
def sm(request):
    with StreamManager(max_streams=4, device=request.param) as manager:
        yield manager


@pytest.mark.parametrize("bad", [0, 17, -1, 2.5, "4", True, None])
def test_max_streams_out_of_range_is_value_error(bad):
    with pytest.raises(ValueError, match="max_streams"):
        StreamManager(max_streams=bad, device="cpu")


def test_default_device_is_cpu_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the default is the current CUDA device")
    with StreamManager() as manager:
        assert manager.device == torch.device("cpu") and not manager.is_cuda


def test_builtin_streams_are_distinct_and_stable(sm):
    compute, h2d, d2h = sm.get_compute_stream(), sm.get_copy_stream(0), sm.get_copy_stream(1)
    assert len({id(compute), id(h2d), id(d2h)}) == 3
    assert sm.get_copy_stream() is h2d and sm.get_compute_stream() is compute
    assert sm.active_streams() == 0  # built-ins are not user streams


@pytest.mark.parametrize("index", [-1, 2, 5])
def test_copy_stream_index_out_of_range(sm, index):
    with pytest.raises(ValueError, match="copy stream index"):
        sm.get_copy_stream(index)


def test_priorities_map_to_distinct_values_lower_is_higher(sm):
    values = {p: sm.priority_value(p) for p in StreamPriority}
    assert len(set(values.values())) == 3
    assert values[StreamPriority.HIGH] < values[StreamPriority.NORMAL] < values[StreamPriority.LOW]
    stream = sm.create_stream(StreamPriority.HIGH)
    assert stream.priority == values[StreamPriority.HIGH]


def test_create_destroy_and_counters(sm):
    a = sm.create_stream()
    b = sm.create_stream(StreamPriority.LOW)
    assert sm.active_streams() == 2 and sm.total_streams_created() == 2
    sm.destroy_stream(a)
    assert sm.active_streams() == 1 and sm.total_streams_created() == 2
    sm.destroy_stream(b)
    assert sm.active_streams() == 0


def test_limit_raises_stream_limit_error_which_is_runtime_error(sm):
    streams = [sm.create_stream() for _ in range(sm.max_streams)]
    with pytest.raises(StreamLimitError, match="max_streams=4") as info:
        sm.create_stream()
    assert isinstance(info.value, RuntimeError)
    sm.destroy_stream(streams[0])
    sm.create_stream()  # room again after a destroy


def test_bad_priority_is_value_error(sm):
    with pytest.raises(ValueError, match="StreamPriority"):
        sm.create_stream(priority=2)


def test_destroying_foreign_dead_or_non_stream_is_value_error(sm):
    with StreamManager(device=sm.device) as other:
        foreign = other.create_stream()
        with pytest.raises(ValueError, match="not a live user stream"):
            sm.destroy_stream(foreign)
    mine = sm.create_stream()
    sm.destroy_stream(mine)
    with pytest.raises(ValueError, match="not a live user stream"):
        sm.destroy_stream(mine)
    with pytest.raises(ValueError):
        sm.destroy_stream("stream")
    with pytest.raises(ValueError):
        sm.destroy_stream(sm.get_compute_stream())  # built-ins are not destroyable
    with pytest.raises(ValueError, match="not a live stream"):
        sm.sync_stream(mine)


def test_events_record_and_wait(sm):
    stream = sm.create_stream()
    with sm.use(stream):
        x = torch.randn(64, 64, device=sm.device)
        y = x @ x
    done = sm.insert_event(stream)
    sm.wait_event(sm.get_compute_stream(), done)
    with sm.use(sm.get_compute_stream()):
        z = y + 1
    sm.sync_stream(sm.get_compute_stream())
    assert done.query()
    torch.testing.assert_close(z.cpu(), (x @ x).cpu() + 1)
    sm.sync_all_streams()


def test_insert_event_reuses_given_event(sm):
    event = sm.create_event()
    assert sm.insert_event(sm.get_copy_stream(1), event) is event


def test_close_is_idempotent_and_releases_everything():
    manager = StreamManager(device="cpu")
    manager.create_stream()
    event = manager.create_event()
    assert manager.live_events() == 1
    manager.close()
    manager.close()
    assert manager.closed and manager.active_streams() == 0
    with pytest.raises(RuntimeError, match="closed"):
        manager.create_stream()
    assert manager.live_events() == 0
    del event


def test_thread_safety_many_threads_create_use_destroy():
    manager = StreamManager(max_streams=16, device="cpu")
    errors: list[BaseException] = []
    limit_hits = 0
    lock = threading.Lock()

    def churn() -> None:
        nonlocal limit_hits
        for _ in range(500):
            try:
                s = manager.create_stream(StreamPriority.LOW)
            except StreamLimitError:
                with lock:
                    limit_hits += 1
                continue
            try:
                manager.insert_event(s)
                manager.destroy_stream(s)
            except BaseException as err:  # collected and asserted below
                errors.append(err)

    threads = [threading.Thread(target=churn) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert manager.active_streams() == 0
    assert manager.total_streams_created() + limit_hits == 24 * 500
    manager.close()


def test_ten_thousand_rapid_create_destroy_cycles(sm):
    for _ in range(10_000):
        sm.destroy_stream(sm.create_stream())
    assert sm.active_streams() == 0 and sm.total_streams_created() == 10_000


def test_cpu_event_times_with_host_clock():
    start, end = CpuEvent(True), CpuEvent(True)
    start.record()
    time.sleep(0.02)
    end.record()
    assert 15 <= start.elapsed_time(end) <= 500
    with pytest.raises(RuntimeError):
        CpuEvent().elapsed_time(end)


@pytest.mark.parametrize("error", [StreamLimitError(9, 8), CudaError("creating a HIGH stream", "out of memory")])
def test_errors_survive_pickling(error):
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is type(error) and str(clone) == str(error)


# -- CUDA only ---------------------------------------------------------------------------------

_CYCLES_PER_MS: list[float] = []


def _spin(ms: float, stream) -> None:
    """Keep the current stream busy for about ``ms`` milliseconds with one kernel."""
    if not _CYCLES_PER_MS:
        torch.cuda._sleep(1_000_000)  # warm-up, then calibrate
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(10_000_000)
        end.record()
        end.synchronize()
        _CYCLES_PER_MS.append(10_000_000 / start.elapsed_time(end))
    torch.cuda._sleep(int(ms * _CYCLES_PER_MS[0]))


def _timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


@pytest.mark.gpu
def test_use_sets_the_current_stream_nests_and_restores_on_error():
    with StreamManager(device="cuda") as manager:
        a, b = manager.create_stream(), manager.create_stream()
        outer = torch.cuda.current_stream()
        with manager.use(a):
            assert torch.cuda.current_stream() == a
            with pytest.raises(RuntimeError, match="inner"):
                with manager.use(b):
                    assert torch.cuda.current_stream() == b
                    raise RuntimeError("inner")
            assert torch.cuda.current_stream() == a
            x = torch.ones(4, device="cuda") * 3  # queued on a
        assert torch.cuda.current_stream() == outer
        a.synchronize()
        assert x.sum().item() == 12


@pytest.mark.gpu
def test_two_streams_really_overlap():
    with StreamManager(device="cuda") as manager:
        a, b = manager.create_stream(), manager.create_stream()

        def on(stream):
            with manager.use(stream):
                _spin(50, stream)

        _timed(lambda: on(a))  # warm-up
        alone = _timed(lambda: on(a)) + _timed(lambda: on(b))
        together = _timed(lambda: (on(a), on(b)))
        assert together < 0.7 * alone, (together, alone)


@pytest.mark.gpu
def test_consumer_waiting_on_event_sees_producers_fresh_data():
    with StreamManager(device="cuda") as manager:
        producer, consumer = manager.create_stream(), manager.create_stream()
        for trial in range(5):
            src = torch.randn(1 << 22, device="cuda")
            dst = torch.empty_like(src)
            torch.cuda.synchronize()
            with manager.use(producer):
                _spin(20, producer)  # the consumer would read stale data without the wait
                dst.copy_(src * 2 + trial)
            ready = manager.insert_event(producer)
            manager.wait_event(consumer, ready)
            with manager.use(consumer):
                seen = dst.clone()
            manager.sync_stream(consumer)
            torch.testing.assert_close(seen, src * 2 + trial)


@pytest.mark.gpu
def test_no_leaked_streams_or_events_on_cuda():
    manager = StreamManager(device="cuda")
    streams = [manager.create_stream() for _ in range(4)]
    events = [manager.insert_event(s) for s in streams]
    assert manager.live_events() == len(events) == 4
    manager.close()
    assert manager.active_streams() == 0 and manager.live_events() == 0
