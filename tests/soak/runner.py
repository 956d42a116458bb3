"""The soak's runner: ``python -m tests.soak --seed S --duration D --mode single|fleet|both``.

One run of a topology: the schedule drawn from the seed (written to ``RUN_DIR/schedule.json``),
the topology started, senders committing numbered notifications straight to PostgreSQL, client
processes recording what they receive, the nemesis applying each scheduled fault as its own task
(faults overlap) and recording it. After the duration: the schedule stops, everything is healed,
a calm phase lets every client receive fresh notifications, the clients catch up and are
stopped, the topology's final checks run, everything is stopped, and the checker reads every
history. ``--mode both`` runs both topologies at once, each in its own run dir
(``OUT/single``, ``OUT/fleet``) with its own channel names.

Bounded and clean: every process started is ended, sockets and temporary directories are removed
(``--keep`` keeps them). The exit status is 1 on any violation or final-check problem.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import importlib.util
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from tests.soak import history, schedule
from tests.soak.checker import Result, check_run
from tests.soak.clients import KINDS as CLIENT_KINDS
from tests.soak.clients import Clients
from tests.soak.senders import Sender
from tests.soak.topology import SoakConfig, Topology

DSN = os.environ.get("PGBUSD_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/test")


@dataclass(frozen=True)
class Options:
    seed: int
    duration: float
    mode: str
    out: Path
    keep: bool = False
    clients: int = 8
    rate: float = 200.0
    pinned: int = 3
    on_demand: int = 3
    calm: float = 3.0
    pace: schedule.Pace = field(default_factory=schedule.Pace)
    python: str = os.environ.get("SOAK_PYTHON") or sys.executable
    dsn: str = DSN
    replay_bytes: int = 4 * 1024 * 1024
    write_budget: int = 64 * 1024

    def modes(self) -> list[str]:
        return ["single", "fleet"] if self.mode == "both" else [self.mode]

    def replay_command(self) -> str:
        return (f"python -m tests.soak --seed {self.seed} --duration {self.duration:g} "
                f"--mode {self.mode}")  # fmt: skip


@dataclass
class Outcome:
    mode: str
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    committed: int = 0
    uncertain: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    result: Result | None = None

    @property
    def failed(self) -> bool:
        return bool(self.problems) or self.result is None or bool(self.result.violations)


def topology_of(mode: str, config: SoakConfig) -> Topology:
    if mode == "single":
        from tests.soak.single import SingleTopology

        return SingleTopology(config)
    from tests.soak.fleet import FleetTopology  # type: ignore[import-not-found,unused-ignore]

    topology: Topology = FleetTopology(config)
    return topology


def config_of(opts: Options, mode: str, run_dir: Path, workdir: Path) -> SoakConfig:
    prefix = f"soak{opts.seed}p{os.getpid()}{mode[0]}"
    return SoakConfig(
        seed=opts.seed,
        duration=opts.duration,
        workdir=workdir,
        python=opts.python,
        dsn=opts.dsn,
        pinned=tuple(f"{prefix}_pin{i + 1}" for i in range(opts.pinned)),
        pattern=f"{prefix}_od*",
        replay_bytes=opts.replay_bytes,
        write_budget=opts.write_budget,
        extra={"run_dir": str(run_dir), "tag": mode[0], "keep": "1" if opts.keep else "0"},
    )


async def run_mode(opts: Options, mode: str) -> Outcome:
    outcome = Outcome(mode)
    run_dir = opts.out / mode
    if run_dir.exists():
        shutil.rmtree(run_dir)
    (run_dir / "history").mkdir(parents=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"soak-{mode[0]}-", dir="/tmp"))
    config = config_of(opts, mode, run_dir, workdir)
    topology = topology_of(mode, config)
    kinds = topology.fault_kinds() + CLIENT_KINDS
    entries = schedule.make(opts.seed, mode, opts.duration, kinds, opts.pace)
    schedule.write(run_dir / "schedule.json", opts.seed, mode, opts.duration, entries)
    od_prefix = config.pattern.rstrip("*")
    clients: Clients | None = None
    senders: list[Sender] = []
    stop_senders = asyncio.Event()
    sending: list[asyncio.Task[None]] = []
    try:
        await topology.start()
        on_demand = [f"{od_prefix}{i + 1}" for i in range(opts.on_demand)]
        on_demand = on_demand if topology.on_demand() else []
        channels = [*config.pinned, *on_demand]
        rng = random.Random(f"{opts.seed}:{mode}:senders")
        senders = [Sender(opts.dsn, ch, opts.rate / len(channels), rng.randrange(2**32),
                          run_dir / "history") for ch in channels]  # fmt: skip
        sending = [asyncio.ensure_future(s.run(stop_senders)) for s in senders]
        clients = Clients(config, run_dir, topology.sockets(), on_demand, opts.clients)
        await clients.start()
        await nemesis(topology, clients, entries, opts, run_dir, outcome)
        try:
            await topology.heal()
        except Exception as exc:  # final_checks says what is wrong; the clients' story matters
            outcome.problems.append(f"heal: {type(exc).__name__}: {exc}")
        await clients.heal()
        await asyncio.sleep(opts.calm)
        stop_senders.set()
        await asyncio.gather(*sending)
        await catch_up(run_dir, clients, senders, deadline=30.0)
        outcome.problems += await clients.stop()
        outcome.problems += await topology.final_checks()
    except Exception as exc:  # the run could not go on: say why, stop everything, fail
        outcome.problems.append(f"the run stopped: {type(exc).__name__}: {exc}")
        raise
    finally:
        stop_senders.set()
        for task in sending:
            task.cancel()
        await asyncio.gather(*sending, return_exceptions=True)
        if clients is not None:
            clients.kill_all()
        with contextlib.suppress(Exception):
            await topology.stop()
        if not opts.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        outcome.notes = list(topology.notes)
        outcome.committed = sum(s.committed for s in senders)
        outcome.uncertain = sum(s.uncertain for s in senders)
    outcome.result = await asyncio.to_thread(check_run, run_dir)
    return outcome


async def nemesis(topology: Topology, clients: Clients, entries: list[schedule.Entry],
                  opts: Options, run_dir: Path, outcome: Outcome) -> None:  # fmt: skip
    """Apply every entry of the schedule at its time, each as its own task; return once the
    duration is over and every fault started has healed."""
    rec = history.Recorder(run_dir / "history" / "nemesis.jsonl", "nemesis")
    loop = asyncio.get_running_loop()
    begin = loop.time()
    schedule.write(run_dir / "schedule.json", opts.seed, outcome.mode, opts.duration, entries,
                   start=history.now())  # fmt: skip

    async def apply(entry: schedule.Entry) -> None:
        await asyncio.sleep(max(0.0, begin + entry.at - loop.time()))
        rng = random.Random(entry.seed)
        t = history.now()
        try:
            if entry.kind in CLIENT_KINDS:
                detail = await clients.inject(entry.kind, rng, entry.duration)
            else:
                detail = await topology.inject(entry.kind, rng, entry.duration)
        except Exception as exc:
            detail = f"the fault failed: {type(exc).__name__}: {exc}"
            outcome.problems.append(f"{entry.kind} at {entry.at}s: {detail}")
        outcome.faults[entry.kind] += 1
        rec.record(history.Fault(t=t, p="nemesis", kind=entry.kind, detail=detail,
                                 t1=history.now()))  # fmt: skip

    tasks = [asyncio.ensure_future(apply(e)) for e in entries]
    try:
        await asyncio.sleep(max(0.0, begin + opts.duration - loop.time()))
        _, late = await asyncio.wait(tasks, timeout=opts.pace.max_hold + 60)
        for task in late:
            task.cancel()
            outcome.problems.append("a fault did not heal within a minute of its end")
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for task in tasks:
            task.cancel()
        rec.close()


async def catch_up(run_dir: Path, clients: Clients, senders: list[Sender], deadline: float) -> None:
    """Wait until every running client holds the last number of each channel it subscribes to
    (or ``deadline`` seconds): what is owed to it has arrived, or never will."""
    last = {s.channel: (s.last_committed, s.last_t) for s in senders}
    tails = [Tail(run_dir / "history" / f"{c.name}.jsonl") for c in clients.live if c.running]
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if all(tail.caught_up(last) for tail in tails):
            return
        await asyncio.sleep(0.2)


class Tail:
    """A client's history read as it grows: its open subscriptions, when each opened and the
    newest number each received."""

    _decoder = msgspec.json.Decoder(history.AnyEvent)

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.open: dict[str, tuple[float, int]] = {}

    def caught_up(self, last: dict[str, tuple[int, float]]) -> bool:
        with contextlib.suppress(OSError), open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
            complete = data[: data.rfind(b"\n") + 1]
            self.offset += len(complete)
            for line in complete.splitlines():
                self._take(self._decoder.decode(line))
        for ch, (since, newest) in self.open.items():
            n, t = last.get(ch, (-1, 0.0))
            if newest < n and since < t:
                return False
        return True

    def _take(self, event: history.AnyEvent) -> None:
        if isinstance(event, history.Subscribed):
            self.open[event.ch] = (event.t, -1)
        elif isinstance(event, history.Unsubscribing):
            self.open.pop(event.ch, None)
        elif isinstance(event, history.Received) and event.ch in self.open:
            since, newest = self.open[event.ch]
            self.open[event.ch] = (since, max(newest, event.n))
        elif isinstance(event, history.Ended):
            self.open.clear()


def summary(opts: Options, outcome: Outcome) -> str:
    lines = [f"=== soak seed {opts.seed}, mode {outcome.mode}, {opts.duration:g} s of faults"]
    faults = ", ".join(f"{k} {n}" for k, n in sorted(outcome.faults.items()))
    lines.append(f"faults applied: {sum(outcome.faults.values())} ({faults})")
    if outcome.result is not None:
        lines.append(outcome.result.text())
    lines += [f"problem: {problem}" for problem in outcome.problems]
    lines += [f"note: {note}" for note in outcome.notes]
    lines.append(f"run dir: {opts.out / outcome.mode}")
    return "\n".join(lines)


async def run(opts: Options) -> int:
    if "fleet" in opts.modes() and importlib.util.find_spec("tests.soak.fleet") is None:
        print("--mode fleet needs tests/soak/fleet.py (FleetTopology), which is not in this "
              "checkout; --mode single runs without it", file=sys.stderr)  # fmt: skip
        return 2
    # SIGTERM, SIGHUP and SIGINT end the run early, as a failure, with everything it started
    # stopped (run_mode's cleanup): a soak leaves nothing behind, also when it is interrupted.
    main_task = asyncio.current_task()
    assert main_task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        loop.add_signal_handler(sig, main_task.cancel)
    results = await asyncio.gather(*(run_mode(opts, m) for m in opts.modes()),
                                   return_exceptions=True)  # fmt: skip
    failed = False
    for mode, outcome in zip(opts.modes(), results, strict=True):
        if isinstance(outcome, BaseException):
            print(f"soak seed {opts.seed}, mode {mode}: the run failed: {outcome!r}")
            failed = True
            continue
        print(summary(opts, outcome))
        failed = failed or outcome.failed
    print(f"replay: {opts.replay_command()}")
    return 1 if failed else 0


def parse(argv: list[str] | None = None) -> Options:
    ap = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of faults")
    ap.add_argument("--mode", choices=["single", "fleet", "both"], default="both")
    ap.add_argument("--out", type=Path, default=Path(".run/soak"), help="where run dirs go")
    ap.add_argument("--keep", action="store_true", help="keep sockets and temporary dirs")
    ap.add_argument("--clients", type=int, default=8, help="client processes per topology")
    ap.add_argument("--rate", type=float, default=200.0, help="notifications/s per topology")
    ap.add_argument("--pinned", type=int, default=3, help="pinned channels")
    ap.add_argument("--on-demand", type=int, default=3, help="on-demand channels")
    ap.add_argument("--mean-gap", type=float, default=1.5, help="mean seconds between faults")
    ap.add_argument("--min-hold", type=float, default=0.2, help="shortest fault, seconds")
    ap.add_argument("--max-hold", type=float, default=4.0, help="longest fault, seconds")
    a = ap.parse_args(argv)
    return Options(
        seed=a.seed, duration=a.duration, mode=a.mode, out=a.out.resolve(), keep=a.keep,
        clients=a.clients, rate=a.rate, pinned=a.pinned, on_demand=a.on_demand,
        pace=schedule.Pace(a.mean_gap, a.min_hold, a.max_hold),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    try:
        return asyncio.run(run(parse(argv)))
    except asyncio.CancelledError:
        print("soak interrupted: everything it started is stopped", file=sys.stderr)
        return 130
