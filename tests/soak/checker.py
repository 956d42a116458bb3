"""The soak's checker: proves a run's merged history keeps pgbusd's promises, or shows where not.

The promises, per client process ``P`` and channel ``ch``:

- **Nothing lost without a word.** A committed ``n`` is *owed* to ``P`` when ``P`` had ``ch``
  subscribed (``Subscribed`` at ``s``, not yet closed by ``Unsubscribing`` at ``u`` nor by ``P``'s
  end) with ``s < t0`` (its transaction began after the subscription was confirmed) and
  ``t < u`` (COMMIT returned before the unsubscribe). An owed ``n`` that ``P`` never received is
  *covered* when ``P`` was told: a ``Generation`` step (any channel) or a ``Lagged`` on ``ch`` in
  ``(t0, t_next]``, ``t_next`` being when ``P`` received the first payload of ``ch`` numbered above
  ``n`` in that subscription (or the subscription's end). A step before the loss, or one after the
  next delivery, tells nothing about it. Numbers only in ``Uncertain`` are never owed. A missing
  *tail* (nothing later delivered in that subscription) is owed only when the subscription lasted
  to its process's clean end (``Ended``, after the run's calm phase let every client catch up):
  after an unsubscribe or a kill it may have been in flight (counted ``unsettled``).
- **Nothing twice** (per process, whatever the subscriptions), **in order** (within one
  subscription, numbers strictly rise), **nothing invented** (every number received was committed
  or uncertain).
- **Generations only move forward**, per process, whatever the lineage.
- **No client fails** (an ``Ended`` with a ``why``).

The history has no subscription id: a process holds at most one subscription per channel at a
time (a second ``Subscribed`` closes the first), and receipts after an ``Unsubscribing`` count for
the subscription it closed (payloads already buffered are still read). ``(ch, n)`` names one
notification for the whole run.

The work is linear in the events (plus a few bisects per owed number not received): a million
events check in about a second. ``python -m tests.soak.checker RUN_DIR`` prints the
summary and each violation explained: the seed and its replay command, the faults around it, and
the smallest window of history that shows it.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import msgspec

from tests.soak import history
from tests.soak.history import (
    AnyEvent,
    Committed,
    Ended,
    Fault,
    Generation,
    Lagged,
    Received,
    Subscribed,
    Uncertain,
    Unsubscribing,
)

Kind = Literal["lost", "duplicate", "order", "phantom", "generation", "failed"]
KINDS: tuple[Kind, ...] = ("lost", "duplicate", "order", "phantom", "generation", "failed")

#: How far around a violation faults are shown: from this long before it to after it.
FAULTS_BEFORE = 3.0
FAULTS_AFTER = 1.0
#: At most this many faults per violation.
FAULT_LINES = 20
#: Explained in full by :meth:`Result.text`; the rest get their one line.
EXPLAINED = 10


@dataclass(frozen=True)
class Violation:
    """A broken promise. ``time`` is when it shows (a lost number: its COMMIT; the others: the
    offending event); ``since``..``until`` the window of history that shows it; ``count`` how
    many consecutive numbers one lost gap spans."""

    kind: Kind
    process: str
    channel: str | None
    n: int | None
    time: float
    message: str
    since: float | None = None
    until: float | None = None
    count: int = 1


@dataclass
class ProcessCounts:
    owed: int = 0
    received: int = 0
    covered_step: int = 0
    covered_lag: int = 0
    lost: int = 0
    #: missing at the tail of a subscription unsubscribed or killed: in flight, not owed
    unsettled: int = 0
    steps: int = 0
    lags: int = 0
    subscriptions: int = 0


@dataclass
class Counts:
    """What was checked: ``owed`` deliveries, of which ``covered_*`` were lost but told and
    ``lost`` silently; ``committed``/``uncertain`` count notifications."""

    committed: int = 0
    uncertain: int = 0
    owed: int = 0
    received: int = 0
    covered_step: int = 0
    covered_lag: int = 0
    lost: int = 0
    unsettled: int = 0
    processes: dict[str, ProcessCounts] = field(default_factory=dict)
    #: Silences: (seconds, process, channel, when it began) for each stretch of more than
    #: :data:`SILENCE` seconds in a subscription without a receipt while its channel had
    #: commits (how long the system took to deliver again after a fault).
    silences: list[tuple[float, str, str, float]] = field(default_factory=list)


@dataclass
class Analysis:
    violations: list[Violation]
    counts: Counts
    #: the ``Fault`` events of the history (the nemesis's own account)
    faults: list[Fault]
    #: the first and last event's times
    origin: float
    end: float


class PlannedFault(msgspec.Struct):
    """One fault of ``schedule.json``: ``at`` seconds after the run's start."""

    at: float
    kind: str
    duration: float = 0.0
    seed: int | None = None


class Schedule(msgspec.Struct):
    """``schedule.json`` as the runner writes it; ``start`` (the run's ``time.monotonic()`` at
    offset 0) and ``duration`` are read when present."""

    seed: int | None = None
    mode: str | None = None
    duration: float | None = None
    start: float | None = None
    faults: list[PlannedFault] = msgspec.field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> Schedule:
        if not path.exists():
            return cls()
        return msgspec.json.decode(path.read_bytes(), type=cls)


class _Period:
    """One subscription of a process to a channel: open at ``s``, owed until ``u``, and the
    payloads it received (times and numbers, in order)."""

    __slots__ = ("rn", "rt", "s", "settled", "u")

    def __init__(self, s: float, u: float | None) -> None:
        self.s = s
        self.u = u
        #: Closed by its process's clean end, after the run's calm phase let every client catch
        #: up. Only then is a missing tail (nothing later delivered) a loss: a subscription
        #: closed by an unsubscribe or a kill may have had it still in flight.
        self.settled = False
        self.rt: list[float] = []
        self.rn: list[int] = []

    def end(self) -> float:
        """Until when a step or a lag may tell of a loss with no later delivery."""
        u = self.s if self.u is None else self.u
        return max(u, self.rt[-1]) if self.rt else u


class _Process:
    __slots__ = ("current", "end", "gen_t", "lag_t", "last", "last_g", "periods")

    def __init__(self) -> None:
        self.current: dict[str, _Period] = {}
        self.periods: dict[str, list[_Period]] = {}
        self.gen_t: list[float] = []
        self.lag_t: dict[str, list[float]] = {}
        self.last_g: tuple[int, float] | None = None
        self.end: float | None = None
        self.last = 0.0

    def open(self, ch: str, t: float, *, subscribed: bool) -> _Period:
        before = self.current.get(ch)
        if before is not None and before.u is None:
            before.u = t
        # A receipt with no subscription owes nothing: its period closes as it opens.
        period = _Period(t, None if subscribed else t)
        self.current[ch] = period
        self.periods.setdefault(ch, []).append(period)
        return period


#: A stretch without a receipt longer than this (while the channel has commits) is a silence
#: (the fleet's failover promise: under 1.5 s of silence on the hosts).
SILENCE = 1.5


class _Channel:
    """A channel's committed notifications in commit order, with what the owed-range needs."""

    __slots__ = ("index", "n", "sufmin", "t", "t0")

    def __init__(self) -> None:
        self.t: list[float] = []
        self.t0: list[float] = []
        self.n: list[int] = []
        self.index: dict[int, int] = {}
        self.sufmin: list[float] = []

    def seal(self) -> None:
        self.index = {n: i for i, n in enumerate(self.n)}
        # sufmin[i]: the earliest begin among commits i..: past the first i with sufmin[i] > s,
        # every commit began after s.
        self.sufmin = list(itertools.accumulate(reversed(self.t0), min))[::-1]


class _Checker:
    def __init__(self, origin: float) -> None:
        self.origin = origin
        self.violations: list[Violation] = []
        self.counts = Counts()
        self.processes: dict[str, _Process] = {}
        self.channels: dict[str, _Channel] = {}
        self.uncertain: dict[str, set[int]] = {}
        self.faults: list[Fault] = []
        self.end = origin

    def at(self, t: float) -> str:
        return _at(t, self.origin)

    def add(self, kind: Kind, p: str, ch: str | None, n: int | None, t: float, msg: str) -> None:
        self.violations.append(Violation(kind, p, ch, n, t, msg, since=t, until=t))

    def collect(self, events: Sequence[AnyEvent]) -> None:
        """One pass: each process's subscriptions and receipts, each channel's commits."""
        processes = self.processes
        for e in events:
            proc = processes.get(e.p)
            if proc is None:
                proc = processes[e.p] = _Process()
            proc.last = e.t
            if isinstance(e, Received):
                period = proc.current.get(e.ch)
                if period is None:
                    period = proc.open(e.ch, e.t, subscribed=False)
                period.rt.append(e.t)
                period.rn.append(e.n)
            elif isinstance(e, Committed):
                chan = self.channels.get(e.ch)
                if chan is None:
                    chan = self.channels[e.ch] = _Channel()
                for n in e.ns:
                    chan.t.append(e.t)
                    chan.t0.append(e.t0)
                    chan.n.append(n)
            elif isinstance(e, Generation):
                self.generation(proc, e)
            elif isinstance(e, Lagged):
                proc.lag_t.setdefault(e.ch, []).append(e.t)
            elif isinstance(e, Subscribed):
                proc.open(e.ch, e.t, subscribed=True)
            elif isinstance(e, Unsubscribing):
                period = proc.current.get(e.ch)
                if period is not None and period.u is None:
                    period.u = e.t
            elif isinstance(e, Uncertain):
                self.uncertain.setdefault(e.ch, set()).update(e.ns)
            elif isinstance(e, Ended):
                if proc.end is None:
                    proc.end = e.t
                if e.why:
                    msg = f"{e.p} failed at {self.at(e.t)}: {e.why}"
                    self.violations.append(
                        Violation("failed", e.p, None, None, e.t, msg, since=e.t - 1.0, until=e.t)
                    )
            elif isinstance(e, Fault):
                self.faults.append(e)
        if events:
            self.end = events[-1].t
        for proc in processes.values():
            end = proc.last if proc.end is None else proc.end
            for period in proc.current.values():
                if period.u is None:
                    period.u = max(end, period.s)
                    period.settled = proc.end is not None
        for chan in self.channels.values():
            chan.seal()

    def generation(self, proc: _Process, e: Generation) -> None:
        if proc.last_g is not None and e.g <= proc.last_g[0]:
            g, t = proc.last_g
            self.violations.append(
                Violation(
                    "generation",
                    e.p,
                    None,
                    None,
                    e.t,
                    f"{e.p}'s generation went from {g} to {e.g} at {self.at(e.t)}"
                    f" (lineage {e.lineage!r})",
                    since=t,
                    until=e.t,
                )
            )
        proc.last_g = (e.g, e.t)
        proc.gen_t.append(e.t)

    def run(self) -> None:
        counts = self.counts
        counts.committed = sum(len(c.n) for c in self.channels.values())
        counts.uncertain = sum(
            len(ns.difference(self.channels[ch].index if ch in self.channels else ()))
            for ch, ns in self.uncertain.items()
        )
        empty = _Channel()
        for p, proc in self.processes.items():
            pc = counts.processes[p] = ProcessCounts()
            pc.steps = len(proc.gen_t)
            pc.lags = sum(len(ts) for ts in proc.lag_t.values())
            for ch, periods in proc.periods.items():
                chan = self.channels.get(ch, empty)
                received = self.receipts(p, ch, periods, chan)
                pc.received += sum(len(period.rn) for period in periods)
                for period in periods:
                    if period.u != period.s:
                        pc.subscriptions += 1
                    self.owed(p, proc, ch, period, chan, received, pc)
                    self.silences(p, ch, period, chan)
            counts.owed += pc.owed
            counts.received += pc.received
            counts.covered_step += pc.covered_step
            counts.covered_lag += pc.covered_lag
            counts.lost += pc.lost
            counts.unsettled += pc.unsettled

    def silences(self, p: str, ch: str, period: _Period, chan: _Channel) -> None:
        """The silences of one subscription: from the first commit on the channel after its
        start or a receipt to the next receipt, longer than :data:`SILENCE`, and not while a
        fault held the process itself (stopped, say)."""
        start = period.s
        own = [(f.t, f.t1) for f in self.faults if f.detail.startswith(f"{p} ")]
        commits = chan.t
        for t in period.rt:
            # Silent from the first commit after the last receipt (or the start).
            first = bisect_right(commits, start)
            since = commits[first] if first < len(commits) else t
            if t - since > SILENCE and not any(a < t and since < b for a, b in own):
                self.counts.silences.append((t - since, p, ch, since))
            start = t

    def receipts(self, p: str, ch: str, periods: list[_Period], chan: _Channel) -> set[int]:
        """Duplicates, order and phantoms of ``p``'s receipts on ``ch``; returns what it got."""
        nums = list(itertools.chain.from_iterable(period.rn for period in periods))
        received = set(nums)
        phantoms = received.difference(chan.index).difference(self.uncertain.get(ch, ()))
        clean = len(received) == len(nums) and all(pd.rn == sorted(pd.rn) for pd in periods)
        if clean and not phantoms:
            return received
        seen: dict[int, float] = {}
        for period in periods:
            top: int | None = None
            top_t = period.s
            for t, n in zip(period.rt, period.rn, strict=True):
                first = seen.get(n)
                if first is not None:
                    msg = f"{p} received {ch} n={n} twice: at {self.at(first)} and {self.at(t)}"
                    self.violations.append(
                        Violation("duplicate", p, ch, n, t, msg, since=first, until=t)
                    )
                    continue
                seen[n] = t
                if n in phantoms:
                    msg = f"{p} received {ch} n={n} at {self.at(t)}, never committed nor uncertain"
                    self.add("phantom", p, ch, n, t, msg)
                elif top is not None and n < top:
                    msg = (
                        f"{p} received {ch} n={n} at {self.at(t)} after n={top}"
                        f" (at {self.at(top_t)}) in the same subscription"
                    )
                    self.violations.append(
                        Violation("order", p, ch, n, t, msg, since=top_t, until=t)
                    )
                else:
                    top, top_t = n, t
        return received

    def owed(
        self,
        p: str,
        proc: _Process,
        ch: str,
        period: _Period,
        chan: _Channel,
        received: set[int],
        pc: ProcessCounts,
    ) -> None:
        """The numbers this subscription was owed: each received, or its loss told."""
        s = period.s
        u = s if period.u is None else period.u
        lo = bisect_right(chan.t, s)
        hi = bisect_left(chan.t, u, lo)
        if lo >= hi:
            return
        j = bisect_right(chan.sufmin, s, lo, hi)
        straddling = [i for i in range(lo, j) if chan.t0[i] > s]
        pc.owed += len(straddling) + hi - j
        missing = {chan.n[i] for i in straddling}.difference(received)
        missing.update(set(chan.n[j:hi]).difference(received))
        if missing:
            self.missing(p, proc, ch, period, chan, sorted(missing), pc)

    def missing(
        self,
        p: str,
        proc: _Process,
        ch: str,
        period: _Period,
        chan: _Channel,
        numbers: list[int],
        pc: ProcessCounts,
    ) -> None:
        """Each owed number not received: covered by a step or a lag before the next delivery,
        or lost. Consecutive lost numbers with the same next delivery are one violation."""
        rt, rn = period.rt, period.rn
        top = list(itertools.accumulate(rn, max))
        gens, lags = proc.gen_t, proc.lag_t.get(ch, [])
        gap: list[tuple[int, int, float, float]] = []  # (n, next receipt index, t0, t) lost
        for n in numbers:
            i = chan.index[n]
            t0, t = chan.t0[i], chan.t[i]
            k = bisect_right(top, n)
            if k < len(rn) and rt[k] <= t:
                # Only a delivery after the commit ends the window.
                k = bisect_right(rt, t)
                while k < len(rn) and rn[k] <= n:
                    k += 1
            if k >= len(rn) and not period.settled:
                pc.owed -= 1
                pc.unsettled += 1
                continue
            t_next = rt[k] if k < len(rn) else period.end()
            g = bisect_right(gens, t0)
            if g < len(gens) and gens[g] <= t_next:
                pc.covered_step += 1
            elif (a := bisect_right(lags, t0)) < len(lags) and lags[a] <= t_next:
                pc.covered_lag += 1
            else:
                pc.lost += 1
                if gap and (gap[-1][1] != k or gap[-1][0] + 1 != n):
                    self.lost(p, ch, period, gap)
                    gap = []
                gap.append((n, k, t0, t))
                continue
            if gap:
                self.lost(p, ch, period, gap)
                gap = []
        if gap:
            self.lost(p, ch, period, gap)

    def lost(
        self, p: str, ch: str, period: _Period, gap: list[tuple[int, int, float, float]]
    ) -> None:
        n, k, t0, t = gap[0]
        last = gap[-1][0]
        before = period.rt[k - 1] if k > 0 else period.s
        which = f"n={n}" if len(gap) == 1 else f"n={n}..{last} ({len(gap)} notifications)"
        if k < len(period.rn):
            until = period.rt[k]
            after = f"next delivery n={period.rn[k]} at {self.at(until)}"
        else:
            until = period.end()
            after = f"nothing later before the subscription's end at {self.at(until)}"
        msg = (
            f"{p} lost {ch} {which}: began {self.at(t0)}, committed {self.at(t)}; {after};"
            f" no generation step nor lag on {ch} in between"
        )
        self.violations.append(
            Violation("lost", p, ch, n, t, msg, since=min(before, t0), until=until, count=len(gap))
        )


def analyze(events: Sequence[AnyEvent]) -> Analysis:
    """Every violation of the merged history, and the counts of what was checked. ``events``
    are put in time order if they are not (each process's own order kept)."""
    if any(a.t > b.t for a, b in itertools.pairwise(events)):
        events = sorted(events, key=_time)
    origin = events[0].t if events else 0.0
    checker = _Checker(origin)
    checker.collect(events)
    checker.run()
    checker.violations.sort(key=lambda v: (v.time, v.process))
    return Analysis(checker.violations, checker.counts, checker.faults, origin, checker.end)


def check(events: Sequence[AnyEvent]) -> list[Violation]:
    """The violations of the merged history (see the module's docstring), by time."""
    return analyze(events).violations


def _time(e: history.Event) -> float:
    return e.t


def replay_command(seed: int | None, mode: str | None, duration: float | None) -> str:
    d = "?" if duration is None else f"{duration:g}"
    return f"make soak SEED={'?' if seed is None else seed} MODE={mode or '?'} DURATION={d}"


def explain(
    v: Violation,
    events: Sequence[AnyEvent],
    faults: Sequence[Fault | PlannedFault],
    seed: int | None,
    mode: str | None,
    *,
    duration: float | None = None,
    start: float | None = None,
) -> str:
    """``v`` told for a person: the seed and the command that replays it, the faults around it
    (``Fault`` events, and planned ones placed from ``start``, the run's monotonic offset 0,
    by default the first event's time), and the smallest window of history that shows it.
    ``events`` must be in time order (as :func:`history.read_all` returns them)."""
    origin = events[0].t if events else 0.0
    if duration is None and events:
        duration = round(events[-1].t - origin)
    since = v.time if v.since is None else v.since
    until = v.time if v.until is None else v.until
    lines = [
        f"{v.kind}: {v.message}",
        f"seed {seed}, mode {mode}; replay: {replay_command(seed, mode, duration)}",
    ]
    lo, hi = since - FAULTS_BEFORE, until + FAULTS_AFTER
    around = _faults_around(faults, lo, hi, origin, origin if start is None else start)
    lines.append(
        f"faults from {_at(lo, origin)} to {_at(hi, origin)}:" + ("" if around else " none")
    )
    lines += [f"  {line}" for line in around]
    lines.append(f"history from {_at(since, origin)} to {_at(until, origin)}:")
    lines += _window(v, events, since, until, origin)
    return "\n".join(lines)


def _at(t: float, origin: float) -> str:
    return f"{t - origin:+.3f}s"


def _faults_around(
    faults: Sequence[Fault | PlannedFault], lo: float, hi: float, origin: float, start: float
) -> list[str]:
    found: list[tuple[float, str]] = []
    for f in faults:
        if isinstance(f, Fault):
            if f.t <= hi and f.t1 >= lo:
                span = f"{_at(f.t, origin)}..{_at(f.t1, origin)}"
                found.append((f.t, f"{span} {f.kind} ({f.p}): {f.detail}"))
        else:
            a = start + f.at
            if a <= hi and a + f.duration >= lo:
                span = f"{_at(a, origin)}..{_at(a + f.duration, origin)}"
                found.append((a, f"{span} {f.kind} (planned, seed {f.seed})"))
    found.sort(key=lambda x: x[0])
    if len(found) > FAULT_LINES:
        # The latest are the nearest to what the violation shows.
        cut = len(found) - FAULT_LINES
        return [f"... {cut} earlier faults", *[text for _, text in found[cut:]]]
    return [text for _, text in found]


#: Runs of unremarkable receipts and commits longer than this are cut to their ends.
RUN = 5
#: At most this many lines of history per violation.
WINDOW_LINES = 60


class _Row(NamedTuple):
    """One line of a violation's window; ``flow`` rows (receipts, commits) may be cut."""

    flow: bool
    what: str
    first: int | None
    last: int | None
    text: str


def _window(
    v: Violation, events: Sequence[AnyEvent], since: float, until: float, origin: float
) -> list[str]:
    """The events of the window that tell the story: the process's own on the channel (all of
    its own when the violation has no channel), its steps and lags, the channel's commits."""
    i = bisect_left(events, since, key=_time)
    j = bisect_right(events, until, key=_time)
    marked = range(0) if v.n is None else range(v.n, v.n + v.count)
    pinned = set() if v.n is None else {v.n, v.n + v.count - 1}
    rows: list[_Row] = []
    for e in itertools.islice(events, i, j):
        row = _row(v, e, marked, pinned, origin)
        if row is not None:
            rows.append(row._replace(text=f"  {_at(e.t, origin):>11} {e.p:<12} {row.text}"))
    out: list[str] = []
    for flow, group in itertools.groupby(rows, key=lambda r: r.flow):
        run = list(group)
        if not flow or len(run) <= RUN:
            out += [r.text for r in run]
            continue
        middle = run[2:-2]
        cut = []
        for what, name in (("recv", "receipts"), ("commit", "commits"), ("maybe", "uncertain")):
            rs = [r for r in middle if r.what == what]
            if rs:
                cut.append(f"{len(rs)} {name} n={rs[0].first}..{rs[-1].last}")
        out += [run[0].text, run[1].text, f"  ... {', '.join(cut)} ...", run[-2].text]
        out.append(run[-1].text)
    if len(out) > WINDOW_LINES:
        half = WINDOW_LINES // 2
        out = [*out[:half], f"  ... {len(out) - 2 * half} lines ...", *out[-half:]]
    return out


def _row(v: Violation, e: AnyEvent, marked: range, pinned: set[int], origin: float) -> _Row | None:
    """How ``e`` shows in ``v``'s window, or None if it does not belong there. The violation's
    numbers are marked; its first and last never disappear into a cut run."""
    mine = e.p == v.process
    if isinstance(e, Received):
        if not mine or (v.channel is not None and e.ch != v.channel):
            return None
        mark = "   <--" if e.n in marked else ""
        return _Row(e.n not in pinned, "recv", e.n, e.n, f"recv   {e.ch} n={e.n}{mark}")
    if isinstance(e, Committed | Uncertain):
        if v.channel is None or e.ch != v.channel or not e.ns:
            return None
        what = "commit" if isinstance(e, Committed) else "maybe"
        a, b = e.ns[0], e.ns[-1]
        ns = f"{a}" if a == b else f"{a}..{b}"
        mark = "   <--" if any(n in marked for n in e.ns) else ""
        text = f"{what:<6} {e.ch} n={ns} (began {_at(e.t0, origin)}){mark}"
        return _Row(pinned.isdisjoint(e.ns), what, a, b, text)
    if not mine:
        return None
    if isinstance(e, Generation):
        return _Row(False, "gen", None, None, f"gen    g={e.g} lineage={e.lineage!r}")
    if isinstance(e, Ended):
        return _Row(False, "end", None, None, f"ended  {e.why or '(clean)'}")
    if isinstance(e, Fault):
        return _Row(False, "fault", None, None, f"fault  {e.kind}: {e.detail}")
    if v.channel is not None and e.ch != v.channel:
        return None
    if isinstance(e, Lagged):
        return _Row(False, "lag", None, None, f"lagged {e.ch} lost={e.lost}")
    if isinstance(e, Subscribed):
        return _Row(False, "sub", None, None, f"sub    {e.ch}")
    return _Row(False, "unsub", None, None, f"unsub  {e.ch}")


@dataclass
class Result:
    """A run checked: its violations, its counts, and the text that tells them."""

    analysis: Analysis
    schedule: Schedule
    events: list[AnyEvent]

    @property
    def violations(self) -> list[Violation]:
        return self.analysis.violations

    @property
    def counts(self) -> Counts:
        return self.analysis.counts

    def explain(self, v: Violation) -> str:
        s = self.schedule
        faults: list[Fault | PlannedFault] = [*self.analysis.faults, *s.faults]
        return explain(v, self.events, faults, s.seed, s.mode, duration=s.duration, start=s.start)

    def text(self, explained: int = EXPLAINED) -> str:
        parts = [summarize(self.analysis, self.schedule)]
        for number, v in enumerate(self.violations[:explained], 1):
            parts.append(f"--- violation {number} of {len(self.violations)} ---\n{self.explain(v)}")
        rest = self.violations[explained:]
        if rest:
            shown = [f"  {v.kind}: {v.message}" for v in rest[: 4 * explained]]
            more = len(rest) - len(shown)
            parts.append(
                "\n".join(["--- the others ---", *shown] + ([f"  ... {more} more"] if more else []))
            )
        return "\n".join(parts)


def silences_line(silences: list[tuple[float, str, str, float]], origin: float) -> str:
    """How long deliveries stopped: the count of silences, their median, 95th percentile and
    longest (whose and when)."""
    if not silences:
        return f"silences (no receipt for over {SILENCE:g} s while committed): none"
    # Not counted: those while a fault held the client itself (a client stopped or churned).
    lengths = sorted(s[0] for s in silences)
    longest = max(silences)
    p95 = lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))]
    return (
        f"silences (no receipt for over {SILENCE:g} s while committed): {len(lengths)}, median"
        f" {lengths[len(lengths) // 2]:.1f} s, p95 {p95:.1f} s, longest {longest[0]:.1f} s"
        f" ({longest[1]} on {longest[2]} from +{longest[3] - origin:.3f}s)"
    )


def summarize(analysis: Analysis, schedule: Schedule) -> str:
    c = analysis.counts
    duration = schedule.duration
    if duration is None:
        duration = round(analysis.end - analysis.origin)
    by_kind = {kind: [v for v in analysis.violations if v.kind == kind] for kind in KINDS}
    found = [
        f"{kind} {len(vs)}"
        + (f" ({sum(v.count for v in vs)} notifications)" if kind == "lost" else "")
        for kind, vs in by_kind.items()
        if vs
    ]
    lines = [
        f"soak check: seed {schedule.seed}, mode {schedule.mode}, {duration:g} s"
        f" (replay: {replay_command(schedule.seed, schedule.mode, duration)})",
        f"notifications committed: {c.committed} (and {c.uncertain} uncertain)",
        f"deliveries checked: {c.owed} owed, {c.received} received",
        f"lost but covered: {c.covered_step} by a generation step, {c.covered_lag} by a lag",
        f"in flight at an unsubscribe or a kill (not owed): {c.unsettled}",
        f"faults: {len(analysis.faults)} applied, {len(schedule.faults)} planned",
        "violations: " + (", ".join(found) if found else "none"),
        silences_line(c.silences, analysis.origin),
        "per process:",
    ]
    for p, pc in sorted(c.processes.items()):
        if not (pc.owed or pc.received or pc.steps or pc.lags):
            continue
        lines.append(
            f"  {p}: {pc.subscriptions} subscriptions, owed {pc.owed}, received {pc.received},"
            f" covered {pc.covered_step} by step / {pc.covered_lag} by lag, lost {pc.lost};"
            f" {pc.steps} generation events, {pc.lags} lags"
        )
    return "\n".join(lines)


def check_run(run_dir: Path) -> Result:
    """Check a run directory: ``history/*.jsonl`` and ``schedule.json``."""
    events = history.read_all(sorted((run_dir / "history").glob("*.jsonl")))
    schedule = Schedule.load(run_dir / "schedule.json")
    return Result(analyze(events), schedule, events)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.soak.checker", description="Check a soak run's history."
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    args = parser.parse_args(argv)
    result = check_run(args.run_dir)
    print(result.text())
    return 1 if result.violations else 0


if __name__ == "__main__":
    sys.exit(main())
