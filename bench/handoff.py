"""7. Hand-off under load: a reload while notifications flow, and the replay buffer.

A paced sender (``--handoff-rate``, 1,000/s; each payload carries its commit time) feeds one
channel, relayed by one daemon to ``--handoff-workers`` pgbus worker processes; one direct
asyncpg listener on the same channel is the machine's own reference. Three phases, one daemon
lineage:

- **control**: the stream for ``--handoff-control-seconds`` without a reload;
- **buffer filling**: ``--handoff-seconds`` with ``--handoff-reloads`` reloads spread over it,
  while the replay buffer holds only what the stream has put there since the start (a daemon
  in its first minutes);
- **buffer full**: ``--handoff-fill`` notifications of 64 B, one per transaction, on a second
  channel of the daemon that nobody subscribes to fill the replay buffer (to its 16 MiB of
  small frames, where this stream would bring it after about three minutes), then
  ``--handoff-full-seconds`` with ``--handoff-full-reloads`` reloads: a daemon in its steady
  state.

Each reload is asked for with ``Bus.reload()`` on a fresh connection, as ``pgbusctl reload``
does. For every reload: the time from the request to the successor serving (the ``Reloaded``
reply) and to the old process's exit (a pidfd on it becomes readable). The *hand-off window*
is the request to that exit. Every delivery is put in a bucket by its commit time: inside a
window, or outside every window of its phase; the table gives p50/p99/p99.9/max of each bucket
for the relay (all workers pooled) and for the direct listener. The workers count what they
receive: a notification lost or delivered twice, or any generation step, fails the section.

Then the replay buffer's memory: two more daemons relay one channel nobody subscribes to (its
frames still go to the replay buffer), one with the default ``--replay-bytes`` (16 MiB), one
with ``--replay-bytes 0``. Their RSS is read before any traffic, after a burst of 1 KiB
notifications in one transaction (few large frames) bigger than the buffer, and after a stream
of 64 B notifications committed one per transaction (many small frames, the worst case per byte
kept). The difference between the two daemons is what the buffer costs. Finally both are
reloaded once more: the hand-off time with the buffer full against empty (the successor takes
the whole buffer over the hand-off channel).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import math
import os
import signal
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

import pgbus
from bench import sender
from bench.procs import BenchError, Daemon, Fleet, Worker, rss_kib
from bench.scenarios import Settings, channel, connect_sender, percentile
from bench.worker import Armed, Count, Counted, Done, Expect, Spec

MIB = 1024.0
#: The default --replay-bytes, measured as it ships.
DEFAULT_REPLAY_BYTES = 16 << 20


class Reload(msgspec.Struct):
    #: When the request was sent (seconds since the epoch).
    requested_at: float
    #: Request to the Reloaded reply (the successor serves the socket).
    serving_s: float
    #: Request to the old process's exit: the hand-off window.
    exit_s: float
    old_pid: int
    new_pid: int
    #: What the replay buffer held just before the request (bytes).
    replay_bytes: int = 0
    #: The longest commit-to-receipt latency of a relayed notification committed in the window.
    max_relay_ms: float = math.nan


class Stats(msgspec.Struct):
    samples: int
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float

    @classmethod
    def of(cls, values: list[float]) -> Stats:
        ordered = sorted(values)
        return cls(
            len(ordered),
            1e3 * percentile(ordered, 50),
            1e3 * percentile(ordered, 99),
            1e3 * percentile(ordered, 99.9),
            1e3 * ordered[-1] if ordered else math.nan,
        )


class Phase(msgspec.Struct):
    """One run of the stream with reloads: deliveries by when their notification was committed,
    inside a hand-off window or outside every window."""

    name: str
    seconds: float
    reloads: list[Reload]
    relay_outside: Stats
    relay_inside: Stats
    direct_outside: Stats
    direct_inside: Stats
    #: The relay's inside minus outside, at p50 and p99.
    added_p50_ms: float
    added_p99_ms: float
    #: Deliveries the pgbus workers counted against what was sent (each gets every one).
    expected: int
    delivered: int


class ReplayMemory(msgspec.Struct):
    """One daemon's RSS (MiB) as the replay buffer fills, and what the buffer holds."""

    replay_limit: int
    rss_empty_mib: float
    rss_after_large_mib: float
    rss_after_small_mib: float
    #: What the status said after each stream: bytes kept and notifications kept.
    kept_bytes_large: int
    kept_notifications_large: int
    kept_bytes_small: int
    kept_notifications_small: int
    #: A reload after the small stream: request to the old process's exit, and the successor's
    #: RSS once it serves.
    reload_exit_s: float
    successor_rss_mib: float


class MemoryResult(msgspec.Struct):
    large_n: int
    large_size: int
    small_n: int
    small_size: int
    small_rate: float
    default: ReplayMemory
    none: ReplayMemory


class HandoffResult(msgspec.Struct):
    rate: int
    workers: int
    control_seconds: float
    #: The stream without a reload: relay (workers pooled) and direct.
    control_relay: Stats
    control_direct: Stats
    phases: list[Phase]
    memory: MemoryResult | None = None

    @property
    def reloads(self) -> list[Reload]:
        return [r for phase in self.phases for r in phase.reloads]

    @property
    def max_exit_s(self) -> float:
        return max((r.exit_s for r in self.reloads), default=math.nan)


# -- the old process's exit --------------------------------------------------------------------


class ExitWatch:
    """Becomes done when process ``pid`` (not necessarily our child) exits: a pidfd."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[float] = self._loop.create_future()
        self._fd = os.pidfd_open(pid)
        self._loop.add_reader(self._fd, self._on_exit)

    def _on_exit(self) -> None:
        if not self.exited.done():
            self.exited.set_result(time.time())
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1


async def reload_once(socket: str, old_pid: int, timeout: float = 60.0) -> Reload:
    """Ask the daemon at ``socket`` (process ``old_pid``) to reload, as ``pgbusctl reload`` does
    (a fresh connection), and wait for the old process to exit."""
    watch = ExitWatch(old_pid)
    try:
        async with pgbus.connect(socket, name="bench-reload", attach_timeout=10) as bus:
            requested = time.time()
            reply = await bus.reload(timeout=timeout)
            serving = time.time()
        exited = await asyncio.wait_for(watch.exited, timeout)
    except pgbus.PgbusError as exc:
        raise BenchError(f"reload of pgbusd {old_pid} failed: {exc}") from exc
    except TimeoutError:
        raise BenchError(f"pgbusd {old_pid} did not hand off within {timeout:g}s") from None
    finally:
        watch.close()
    return Reload(requested, serving - requested, exited - requested, old_pid, reply.pid)


async def stop_pid(pid: int, timeout: float = 15.0) -> None:
    """Stop a daemon that is not our child (a successor), SIGTERM then SIGKILL."""
    try:
        watch = ExitWatch(pid)
    except ProcessLookupError:
        return
    try:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(watch.exited, timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    finally:
        watch.close()


class Lineage:
    """A daemon the Fleet started and the successors that took over from it: who serves now."""

    def __init__(self, fleet: Fleet, daemon: Daemon) -> None:
        self.fleet = fleet
        self.daemon = daemon
        self.pid = daemon.pid
        self.reloads: list[Reload] = []

    async def reload(self) -> Reload:
        run = await reload_once(self.daemon.socket, self.pid)
        self.pid = run.new_pid
        self.reloads.append(run)
        return run

    async def stop(self) -> None:
        if self.pid != self.daemon.pid:
            await stop_pid(self.pid)
        await self.fleet.stop_daemon(self.daemon)


# -- the stream and its buckets ---------------------------------------------------------------


def _read(path: str) -> array[float]:
    values = array("d")
    with open(path, "rb") as f:
        values.frombytes(f.read())
    os.unlink(path)
    return values


async def _stream(
    conn: Any,
    workers: list[Worker],
    ch: str,
    n: int,
    rate: int,
    out: Path,
    during: Callable[[float], Any] | None = None,
) -> list[tuple[array[float], array[float]]]:
    """Send ``n`` timed notifications at ``rate``; ``during(start)`` runs meanwhile. Returns
    each worker's (send times, latencies)."""
    paths = [f"{out}.{i}" for i in range(len(workers))]
    for w, path in zip(workers, paths, strict=True):
        w.send(Expect(n, path, sent_times=True))
    await asyncio.gather(*(w.event(Armed, 30) for w in workers))
    start = time.time()
    side = asyncio.ensure_future(during(start)) if during is not None else None
    try:
        await conn.execute(sender.paced([ch], n, rate))
        dones = [asyncio.ensure_future(w.event(Done, 60 + n / 1000)) for w in workers]
        try:
            await asyncio.gather(*dones)
        except BenchError as exc:
            # Stop reading the other workers' output before asking each for its count.
            for task in dones:
                task.cancel()
            await asyncio.gather(*dones, return_exceptions=True)
            counts: list[int] = []
            with contextlib.suppress(BenchError):
                for w in workers:
                    w.send(Count())
                    counts.append((await w.event(Counted, 10)).count)
            raise BenchError(f"{exc} (deliveries per worker: {counts}, of {n} each)") from None
        if side is not None:
            await side
    finally:
        if side is not None and not side.done():
            side.cancel()
            with contextlib.suppress(BaseException):
                await side
    # Nothing delivered twice: the counts must stay at n once everything arrived.
    await asyncio.sleep(0.2)
    for w in workers:
        w.send(Count())
    final = [(await w.event(Counted, 10)).count for w in workers]
    extra = [c - n for c in final if c != n]
    if extra:
        raise BenchError(f"workers received {extra} notifications more than were sent")
    return [(_read(path + ".sent"), _read(path)) for path in paths]


def _split(
    received: list[tuple[array[float], array[float]]], windows: list[tuple[float, float]]
) -> tuple[list[float], list[float]]:
    """The latencies of deliveries committed outside every window, and inside one."""
    starts = [w[0] for w in windows]
    outside: list[float] = []
    inside: list[float] = []
    for sent, latencies in received:
        for t, lat in zip(sent, latencies, strict=True):
            i = bisect.bisect_right(starts, t) - 1
            (inside if i >= 0 and t <= windows[i][1] else outside).append(lat)
    return outside, inside


def _pooled(received: list[tuple[array[float], array[float]]]) -> list[float]:
    return [lat for _, latencies in received for lat in latencies]


async def _reload_phase(
    name: str,
    seconds: float,
    count: int,
    lineage: Lineage,
    conn: Any,
    workers: list[Worker],
    ch: str,
    settings: Settings,
    log: Callable[[str], None],
) -> tuple[Phase, dict[str, Any]]:
    """The stream for ``seconds`` with ``count`` reloads spread evenly over it (the first after
    a second of steady stream); the phase and its raw series (for the chart)."""
    rate = settings.handoff_rate
    n = max(100, int(rate * seconds))
    span = max(0.0, seconds - 1.0)
    offsets = [1.0 + span * i / count for i in range(count)]
    reloads: list[Reload] = []

    async def reload_all(start: float) -> None:
        for offset in offsets:
            await asyncio.sleep(max(0.0, start + offset - time.time()))
            kept = (await lineage.daemon.status())["totals"]["replay_bytes"]
            run = await lineage.reload()
            run.replay_bytes = int(kept)
            reloads.append(run)
            log(
                f"hand-off ({name}): reload {len(reloads)}: successor serves after "
                f"{run.serving_s:.3f} s, old process exited after {run.exit_s:.3f} s "
                f"(replay buffer {kept / (1 << 20):.1f} MiB)"
            )

    out = settings.workdir / f"ho-{len(lineage.reloads)}"
    loaded = await _stream(conn, workers, ch, n, rate, out, reload_all)
    if len(reloads) != count:
        raise BenchError(f"{len(reloads)} reloads done, wanted {count}")
    status = await lineage.daemon.status()
    if status["pid"] != lineage.pid or status["generation"] != 1:
        raise BenchError(
            f"after the reloads: pid {status['pid']} (expected {lineage.pid}), "
            f"generation {status['generation']} (expected 1)"
        )
    windows = [(r.requested_at, r.requested_at + r.exit_s) for r in reloads]
    k = settings.handoff_workers
    relay, direct = loaded[:k], loaded[k:]
    for run, (start, end) in zip(reloads, windows, strict=True):
        run.max_relay_ms = 1e3 * max(
            (
                lat
                for sent, lats in relay
                for t, lat in zip(sent, lats, strict=True)
                if start <= t <= end
            ),
            default=math.nan,
        )
    r_out, r_in = _split(relay, windows)
    d_out, d_in = _split(direct, windows)
    relay_out, relay_in = Stats.of(r_out), Stats.of(r_in)
    phase = Phase(
        name,
        seconds,
        reloads,
        relay_out,
        relay_in,
        Stats.of(d_out),
        Stats.of(d_in),
        relay_in.p50_ms - relay_out.p50_ms,
        relay_in.p99_ms - relay_out.p99_ms,
        n * k,
        sum(len(lat) for _, lat in relay),
    )
    log(
        f"hand-off ({name}): {count} reloads, exit after max "
        f"{max(r.exit_s for r in reloads):.3f} s; relay p99 outside {relay_out.p99_ms:.3f} ms, "
        f"inside {relay_in.p99_ms:.3f} ms (added {phase.added_p99_ms:+.3f} ms)"
    )
    return phase, {"name": name, "relay": relay, "direct": direct, "windows": windows}


async def handoff(
    settings: Settings,
    fleet: Fleet,
    log: Callable[[str], None],
    series: dict[str, Any] | None = None,
) -> HandoffResult:
    """The section; ``series`` (if given) receives each phase's raw (send time, latency) pairs
    and windows, for the chart."""
    ch, fill_ch = channel("handoff"), channel("handoff_fill")
    daemon = await fleet.daemon([ch, fill_ch], *settings.daemon_args)
    lineage = Lineage(fleet, daemon)
    workers: list[Worker] = []
    conn = None
    try:
        workers = await fleet.workers(
            [Spec("pgbus", [ch], socket=daemon.socket) for _ in range(settings.handoff_workers)]
            + [Spec("direct", [ch], dsn=settings.dsn)]
        )
        conn = await connect_sender(settings.dsn)
        rate = settings.handoff_rate
        k = settings.handoff_workers
        # Warm-up, then the control phase: the same stream, no reload.
        await _stream(conn, workers, ch, max(50, rate // 10), rate, settings.workdir / "ho-w")
        n_control = max(100, int(rate * settings.handoff_control_seconds))
        control = await _stream(conn, workers, ch, n_control, rate, settings.workdir / "ho-c")
        log(f"hand-off control phase: {n_control:,} notifications at {rate:,}/s")
        phases: list[Phase] = []
        raw: list[dict[str, Any]] = []

        async def reload_phase(name: str, seconds: float, reloads: int) -> None:
            phase, data = await _reload_phase(
                name, seconds, reloads, lineage, conn, workers, ch, settings, log
            )
            phases.append(phase)
            raw.append(data)

        if settings.handoff_reloads > 0:
            await reload_phase("buffer filling", settings.handoff_seconds, settings.handoff_reloads)
        if settings.handoff_full_reloads > 0:
            received = (await daemon.status())["channels"][fill_ch]["received"]
            await conn.execute(sender.burst_many_transactions(fill_ch, settings.handoff_fill, 64))
            await _caught_up([daemon], fill_ch, received + settings.handoff_fill)
            kept, _ = await _kept(daemon, fill_ch)
            log(f"hand-off: replay buffer filled to {kept / (1 << 20):.1f} MiB")
            await reload_phase(
                "buffer full", settings.handoff_full_seconds, settings.handoff_full_reloads
            )
        res = HandoffResult(
            rate,
            k,
            settings.handoff_control_seconds,
            Stats.of(_pooled(control[:k])),
            Stats.of(_pooled(control[k:])),
            phases,
        )
        if series is not None:
            series["phases"] = raw
    finally:
        if conn is not None:
            await conn.close()
        await fleet.stop_workers(workers)
        await lineage.stop()
    if settings.replay_large_mib > 0 or settings.replay_small_n > 0:
        res.memory = await replay_memory(settings, fleet, log)
    return res


# -- the replay buffer's memory ---------------------------------------------------------------


async def _kept(daemon: Daemon, ch: str) -> tuple[int, int]:
    """Bytes the replay buffer holds, and how many notifications of ``ch`` it holds."""
    status = await daemon.status()
    state = status["channels"][ch]
    oldest = state["replay_from"] or state["received"] + 1
    return int(status["totals"]["replay_bytes"]), int(state["received"]) - oldest + 1


async def _caught_up(daemons: list[Daemon], ch: str, received: int) -> None:
    """Wait until every daemon has received ``received`` notifications on ``ch``."""
    deadline = time.monotonic() + 120
    for daemon in daemons:
        while (await daemon.status())["channels"][ch]["received"] < received:
            if time.monotonic() > deadline:
                raise BenchError("a replay-memory daemon did not receive the whole stream")
            await asyncio.sleep(0.1)


async def replay_memory(
    settings: Settings, fleet: Fleet, log: Callable[[str], None]
) -> MemoryResult:
    ch = channel("replay")
    large_size, small_size = 1024, 64
    large_n = int(settings.replay_large_mib * (1 << 20)) // large_size
    small_n = settings.replay_small_n
    lineages: list[Lineage] = []
    conn = None
    try:
        for replay in (DEFAULT_REPLAY_BYTES, 0):
            daemon = await fleet.daemon([ch], *settings.daemon_args, "--replay-bytes", str(replay))
            lineages.append(Lineage(fleet, daemon))
        daemons = [lin.daemon for lin in lineages]
        await asyncio.sleep(1.0)  # settled after start-up
        empty = [rss_kib(d.pid) / MIB for d in daemons]
        conn = await connect_sender(settings.dsn)
        await conn.execute(sender.burst_one_transaction(ch, large_n, large_size))
        await _caught_up(daemons, ch, large_n)
        await asyncio.sleep(0.5)
        after_large = [rss_kib(d.pid) / MIB for d in daemons]
        kept_large = [await _kept(d, ch) for d in daemons]
        start = time.monotonic()
        await conn.execute(sender.burst_many_transactions(ch, small_n, small_size))
        small_rate = small_n / (time.monotonic() - start)
        await _caught_up(daemons, ch, large_n + small_n)
        await asyncio.sleep(0.5)
        after_small = [rss_kib(d.pid) / MIB for d in daemons]
        kept_small = [await _kept(d, ch) for d in daemons]
        reloads = [await lin.reload() for lin in lineages]
        await asyncio.sleep(0.5)
        successor_rss = [rss_kib(lin.pid) / MIB for lin in lineages]
    finally:
        if conn is not None:
            await conn.close()
        for lin in lineages:
            await lin.stop()
    sides = [
        ReplayMemory(
            limit,
            empty[i],
            after_large[i],
            after_small[i],
            *kept_large[i],
            *kept_small[i],
            reloads[i].exit_s,
            successor_rss[i],
        )
        for i, limit in enumerate((DEFAULT_REPLAY_BYTES, 0))
    ]
    log(
        f"replay buffer: daemon RSS {sides[0].rss_empty_mib:.1f} MiB empty, "
        f"{sides[0].rss_after_small_mib:.1f} MiB full of small frames "
        f"(without a buffer: {sides[1].rss_after_small_mib:.1f} MiB); reload with it full "
        f"{sides[0].reload_exit_s:.3f} s, empty {sides[1].reload_exit_s:.3f} s"
    )
    return MemoryResult(large_n, large_size, small_n, small_size, small_rate, *sides)


# -- the chart -----------------------------------------------------------------------------------


def _binned(
    received: list[tuple[array[float], array[float]]], t0: float, width: float
) -> tuple[list[float], list[float], list[float]]:
    """(bin start s, median ms, max ms) of the deliveries, by commit time in bins of ``width``."""
    bins: dict[int, list[float]] = {}
    for sent, latencies in received:
        for t, lat in zip(sent, latencies, strict=True):
            bins.setdefault(int((t - t0) / width), []).append(lat)
    xs, p50, top = [], [], []
    for b in sorted(bins):
        values = sorted(bins[b])
        xs.append(b * width)
        p50.append(1e3 * max(values[len(values) // 2], 1e-6))
        top.append(1e3 * max(values[-1], 1e-6))
    return xs, p50, top


def chart(series: dict[str, Any], res: HandoffResult, path: Path, commit: str, date: str) -> None:
    """Commit-to-receipt latency over each phase with reloads (median and max per 100 ms of
    commit time), relay and direct, the hand-off windows shaded; one row per phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases: list[dict[str, Any]] = series.get("phases", [])
    if not phases:
        return
    fig, axes = plt.subplots(len(phases), 1, figsize=(11, 4.2 * len(phases)), squeeze=False)
    styles = {"relay": ("#d62728", "pgbus via pgbusd"), "direct": ("#1f77b4", "direct asyncpg")}
    for row, (data, phase) in enumerate(zip(phases, res.phases, strict=True)):
        ax = axes[row][0]
        t0 = min(float(sent[0]) for sent, _ in data["relay"] if len(sent))
        for start, end in data["windows"]:
            ax.axvspan(start - t0, end - t0, color="#ffbb78", alpha=0.5, lw=0)
        for side in ("direct", "relay"):
            color, label = styles[side]
            xs, p50, top = _binned(data[side], t0, 0.1)
            ax.plot(xs, top, color=color, lw=0.8, label=f"{label}: max per 100 ms")
            ax.plot(xs, p50, color=color, lw=0.8, linestyle=":", label=f"{label}: median")
        ax.set_yscale("log")
        ax.set_ylabel("commit to receipt (ms, log)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7.5, loc="upper right")
        kept = max((r.replay_bytes for r in phase.reloads), default=0) / (1 << 20)
        ax.set_title(
            f"{phase.name} (replay buffer up to {kept:.1f} MiB): {len(phase.reloads)} reloads, "
            f"old process gone after max {max(r.exit_s for r in phase.reloads):.2f} s; "
            f"added p99 inside {phase.added_p99_ms:+.1f} ms",
            fontsize=9.5,
        )
    axes[-1][0].set_xlabel(
        "commit time (s since the phase's stream started); shaded: reload request to old exit"
    )
    fig.suptitle(
        f"Hand-off under load: {res.rate:,}/s to {res.workers} pgbus workers "
        f"(commit {commit}, {date})",
        fontsize=10.5,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
