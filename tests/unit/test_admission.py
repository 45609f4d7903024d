"""Admission without a cluster: the pressure signals read from fake /proc and cgroup folders,
shedding decisions on a fake clock, queue-wait shedding, and probes that cancel their calls."""

import asyncio
from pathlib import Path

import pytest

from serve_app.config import DEFAULT_ROUTE_LIMITS, Admission, Shedding, overlay
from serve_app.http.admission import (
    AdmissionControl,
    HostPressure,
    PressureSources,
    StallShare,
    all_within,
    keyed,
    stall_total,
)
from serve_app.protocol.errors import APIError

pytestmark = pytest.mark.anyio  # the async tests run on asyncio (anyio's pytest plugin)

GiB = 2**30


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def write_psi(folder: Path, resource: str, total_us: float, avg10: float = 0.0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / resource).write_text(
        f"some avg10={avg10:.2f} avg60=0.00 avg300=0.00 total={int(total_us)}\n"
        "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
    )


def write_meminfo(proc: Path, total: int, available: int) -> None:
    proc.mkdir(parents=True, exist_ok=True)
    (proc / "meminfo").write_text(
        f"MemTotal:       {total // 1024} kB\n"
        f"MemFree:        {available // 1024} kB\n"
        f"MemAvailable:   {available // 1024} kB\n"
    )


@pytest.fixture
def host(tmp_path) -> PressureSources:
    """A host without cgroup v2: /proc/pressure and /proc/meminfo only, 10% of memory used."""
    proc = tmp_path / "proc"
    write_psi(proc / "pressure", "cpu", 0)
    write_psi(proc / "pressure", "memory", 0)
    write_meminfo(proc, 16 * GiB, int(14.4 * GiB))
    return PressureSources(proc=proc)


def test_stall_total_reads_the_some_line_and_absent_files_are_none(tmp_path):
    write_psi(tmp_path, "cpu", 4375393, avg10=5.83)
    assert stall_total(tmp_path / "cpu") == 4375393
    assert stall_total(tmp_path / "missing") is None
    (tmp_path / "odd").write_text("\nfull avg10=0.00 total=5\n")  # blank line, no `some`
    assert stall_total(tmp_path / "odd") is None
    assert stall_total(None) is None


def test_keyed_reads_cgroup_stat_files_and_meminfo_in_bytes(tmp_path):
    (tmp_path / "cpu.stat").write_text("usage_usec 120\nnr_throttled 3\nthrottled_usec 450\n")
    assert keyed(tmp_path / "cpu.stat")["throttled_usec"] == 450
    write_meminfo(tmp_path, 2 * GiB, GiB)
    assert keyed(tmp_path / "meminfo")["MemAvailable"] == GiB


def test_stall_share_is_the_counter_growth_over_the_window():
    share = StallShare()
    assert share.add(0.0, 0, window_s=5) == 0.0  # one sample: nothing measured yet
    assert share.add(1.0, 900_000, window_s=5) == pytest.approx(90.0)  # 0.9 s of 1 s
    assert share.add(2.0, 1_000_000, window_s=5) == pytest.approx(50.0)  # 1 s of 2 s
    # After a gap longer than the window, growth during the gap does not count.
    assert share.add(60.0, 50_000_000, window_s=5) == 0.0
    assert share.add(61.0, 50_100_000, window_s=5) == pytest.approx(10.0)
    assert share.add(62.0, None, window_s=5) is None


def test_detect_finds_the_own_cgroup_v2_folder_on_unified_and_hybrid_mounts(tmp_path):
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text("4:memory:/x\n0::/kubepods/pod1\n")
    unified = tmp_path / "unified-root"
    (unified / "kubepods" / "pod1").mkdir(parents=True)
    (unified / "kubepods" / "pod1" / "cgroup.controllers").write_text("cpu memory\n")
    assert PressureSources.detect(proc, unified).cgroup == unified / "kubepods" / "pod1"
    hybrid = tmp_path / "hybrid-root"
    write_psi(hybrid / "unified" / "kubepods" / "pod1", "cpu.pressure", 0)
    assert PressureSources.detect(proc, hybrid).cgroup == hybrid / "unified/kubepods/pod1"
    assert PressureSources.detect(proc, tmp_path / "no-cgroup2").cgroup is None
    assert PressureSources.detect(tmp_path / "no-proc", unified).cgroup is None


def test_cgroup_figures_win_over_the_hosts_where_they_exist(tmp_path, host):
    cgroup = tmp_path / "cgroup"
    write_psi(cgroup, "cpu.pressure", 0)
    (cgroup / "memory.max").write_text(f"{4 * GiB}\n")
    (cgroup / "memory.current").write_text(f"{3 * GiB}\n")
    (cgroup / "memory.stat").write_text(f"anon 1\ninactive_file {GiB}\n")
    sources = PressureSources(proc=host.proc, cgroup=cgroup)
    assert sources.pressure("cpu") == cgroup / "cpu.pressure"
    assert sources.pressure("memory") == host.proc / "pressure" / "memory"  # none of its own
    # 3 GiB charged, 1 GiB of it reclaimable page cache, of a 4 GiB limit.
    assert sources.memory_percent() == pytest.approx(50.0)
    (cgroup / "memory.max").write_text("max\n")  # no limit: the host's figure
    assert sources.memory_percent() == pytest.approx(10.0)
    assert PressureSources(proc=host.proc / "none").memory_percent() is None


def test_cpu_stalls_after_start_up_do_not_count(host):
    """Start-up work (model loading) left PSI's own averages high; only stalls measured after
    the first sample count, so the first requests after /ready are not refused."""
    clock = Clock()
    write_psi(host.proc / "pressure", "cpu", 80_000_000, avg10=95.0)
    pressure = HostPressure(Shedding(interval_s=0.5), host, clock)
    assert not pressure.sample() and not pressure.cpu_stalled
    clock.now += 1
    write_psi(host.proc / "pressure", "cpu", 80_100_000, avg10=90.0)  # 10% since
    assert not pressure.sample() and not pressure.cpu_stalled
    assert pressure.cpu_stall_percent == pytest.approx(10.0)
    clock.now += 1
    write_psi(host.proc / "pressure", "cpu", 82_000_000)  # 1.9 s of 2 s: 95%
    pressure.sample()
    assert pressure.cpu_stalled and not pressure.active  # CPU alone never refuses everything


def test_cgroup_throttling_counts_as_cpu_stall(tmp_path, host):
    clock = Clock()
    cgroup = tmp_path / "cgroup"
    write_psi(cgroup, "cpu.pressure", 0)
    (cgroup / "cpu.stat").write_text("usage_usec 0\nthrottled_usec 0\n")
    pressure = HostPressure(Shedding(), PressureSources(host.proc, cgroup), clock)
    pressure.sample()
    clock.now += 1
    (cgroup / "cpu.stat").write_text("usage_usec 0\nthrottled_usec 850000\n")
    pressure.sample()
    assert pressure.cpu_stall_percent == pytest.approx(85.0) and pressure.cpu_stalled


def test_memory_use_or_memory_stalls_shed(host):
    clock = Clock()
    pressure = HostPressure(Shedding(memory_percent=50), host, clock)
    assert not pressure.sample()
    write_meminfo(host.proc, 16 * GiB, 4 * GiB)  # 75% used
    clock.now += 1
    assert pressure.sample()
    write_meminfo(host.proc, 16 * GiB, 15 * GiB)
    clock.now += 1
    assert not pressure.sample()
    write_psi(host.proc / "pressure", "memory", 900_000)  # 0.9 s of the 3 s window
    clock.now += 1
    assert pressure.sample() and pressure.memory_stall_percent == pytest.approx(30.0)


def test_sampling_is_rate_limited(host):
    clock = Clock()
    pressure = HostPressure(Shedding(memory_percent=50, interval_s=5), host, clock)
    assert not pressure.sample()
    write_meminfo(host.proc, 16 * GiB, GiB)
    clock.now += 1
    assert not pressure.sample()  # the last reading holds within interval_s
    clock.now += 5
    assert pressure.sample()


def test_missing_sources_never_shed(tmp_path):
    pressure = HostPressure(Shedding(), PressureSources(proc=tmp_path / "none"), Clock())
    assert not pressure.sample() and not pressure.cpu_stalled
    report = pressure.report()
    assert report["cpu_stall_percent"] is None and report["memory_percent"] is None


def control(sources: PressureSources, clock: Clock, **shedding) -> AdmissionControl:
    routes = {
        "chat": {"max_running": 1, "max_queued": 4, "deadline_s": 10, "shed": True},
        "embeddings": {"max_running": 1, "max_queued": 4, "deadline_s": 10},
    }
    admission = overlay(Admission(), {"routes": routes, "shedding": shedding})
    return AdmissionControl(admission, sources, clock)


async def test_cpu_stalls_refuse_only_requests_that_would_queue(host):
    clock = Clock()
    admission = control(host, clock, interval_s=0.1)
    admission.pressure.sample()
    clock.now += 1
    write_psi(host.proc / "pressure", "cpu", 990_000)  # 99% stalled
    first = await admission.enter("chat")  # a free slot: admitted despite the stalls
    with pytest.raises(APIError) as shed:
        await admission.enter("chat")  # it would queue behind a stalled CPU
    assert shed.value.status == 503 and shed.value.body.code == "resource_pressure"
    assert int(shed.value.headers["Retry-After"]) >= 1
    # A route without `shed` queues as usual.
    held = await admission.enter("embeddings")
    waiting = asyncio.ensure_future(admission.enter("embeddings"))
    await asyncio.sleep(0)
    assert admission.gates["embeddings"].report()["queued"] == 1
    held.release()
    (await waiting).release()
    first.release()
    assert admission.gates["chat"].report()["rejected"] == {"resource_pressure": 1}


async def test_memory_pressure_refuses_shed_routes_even_with_free_slots(host):
    admission = control(host, Clock(), memory_percent=5)
    with pytest.raises(APIError) as shed:
        await admission.enter("chat")
    assert shed.value.body.code == "resource_pressure"
    (await admission.enter("embeddings")).release()
    assert admission.report()["shedding"]["active"]


async def test_a_queue_waiting_past_its_share_of_the_deadline_refuses_newcomers(host):
    clock = Clock()
    admission = control(host, clock, queue_wait_fraction=0.5)
    gate = admission.gates["embeddings"]  # deadline 10 s: refuse once the oldest waited 5 s
    held = await admission.enter("embeddings")
    oldest = asyncio.ensure_future(admission.enter("embeddings"))
    await asyncio.sleep(0)
    clock.now += 4.9
    second = asyncio.ensure_future(admission.enter("embeddings"))  # still queues
    await asyncio.sleep(0)
    assert gate.report()["queued"] == 2 and gate.oldest_wait() == pytest.approx(4.9)
    clock.now += 0.2
    with pytest.raises(APIError) as refused:
        await admission.enter("embeddings")
    assert refused.value.status == 503 and refused.value.body.code == "queue_wait"
    # The queue moves: its oldest is now the second, which has waited 0.2 s.
    held.release()
    (await oldest).release()
    assert gate.oldest_wait() == pytest.approx(0.0)
    (await second).release()
    (await admission.enter("embeddings")).release()
    assert gate.report()["rejected"] == {"queue_wait": 1}
    assert gate.running == 0 and not gate.waiters


async def test_a_full_queue_is_refused_before_its_wait_is_measured(host):
    clock = Clock()
    admission = control(host, clock)
    held = await admission.enter("chat")
    waiters = [asyncio.ensure_future(admission.enter("chat")) for _ in range(4)]
    await asyncio.sleep(0)
    with pytest.raises(APIError) as refused:
        await admission.enter("chat")
    assert refused.value.body.code == "queue_full"
    held.release()
    for waiter in waiters:
        (await waiter).release()


async def test_background_work_waits_for_cpu_stalls_to_pass(host):
    clock = Clock()
    admission = control(host, clock)
    admission.pressure.sample()
    clock.now += 1
    write_psi(host.proc / "pressure", "cpu", 950_000)
    assert admission.background("chat") is None
    clock.now += 1
    write_psi(host.proc / "pressure", "cpu", 1_000_000)  # 50% over the 2 s window
    ticket = admission.background("chat")
    assert ticket is not None
    ticket.release()


def test_management_routes_have_their_own_limits():
    manage = DEFAULT_ROUTE_LIMITS["manage"]
    assert manage.max_running < 4  # below the Documents replica's 4 pooled connections
    assert not manage.shed


class Call:
    """A handle call that answers after `delay_s` and records its cancellation."""

    def __init__(self, value: object, delay_s: float = 0.0) -> None:
        self.value, self.delay_s, self.cancelled = value, delay_s, False

    def __await__(self):
        return self._answer().__await__()

    async def _answer(self) -> object:
        await asyncio.sleep(self.delay_s)
        return self.value

    def cancel(self) -> None:
        self.cancelled = True


async def test_all_within_returns_every_result_in_order():
    async def ping() -> str:
        return "pong"

    calls = [Call("a"), Call("b", 0.01)]
    assert await all_within(1.0, calls, ping()) == ["a", "b", "pong"]
    assert not any(call.cancelled for call in calls)


async def test_all_within_cancels_the_calls_when_it_gives_up():
    calls = [Call("fast"), Call("slow", 10.0)]
    with pytest.raises(TimeoutError):
        await all_within(0.05, calls)
    assert all(call.cancelled for call in calls)

    async def database_down() -> None:
        raise ConnectionError("down")

    calls = [Call("slow", 10.0)]
    with pytest.raises(ConnectionError):
        await all_within(1.0, calls, database_down())
    assert calls[0].cancelled
