"""The soak's checker, on histories written by hand: each illegal one caught as what it is, each
legal one passed (no database, no daemon; the CLI in a real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

from tests.soak import checker
from tests.soak.checker import PlannedFault, Violation, check, explain
from tests.soak.history import (
    AnyEvent,
    Committed,
    Ended,
    Fault,
    Generation,
    Lagged,
    Received,
    Recorder,
    Subscribed,
    Uncertain,
    Unsubscribing,
)

ROOT = Path(__file__).resolve().parent.parent
CLIENT, SENDER, CH = "c1", "sender", "a"


def began(n: int) -> float:
    """The sender's n-th transaction begins at 2 + n, commits 0.1 s later; the client receives
    it 0.05 s after that."""
    return 2.0 + n


def committed(n: int) -> float:
    return began(n) + 0.1


def delivered(n: int) -> float:
    return began(n) + 0.15


def commit(n: int, ch: str = CH) -> Committed:
    return Committed(t=committed(n), p=SENDER, ch=ch, ns=[n], t0=began(n))


def recv(n: int, t: float | None = None, ch: str = CH) -> Received:
    return Received(t=delivered(n) if t is None else t, p=CLIENT, ch=ch, n=n)


def run(
    *,
    skip: Iterable[int] = (),
    extra: Iterable[AnyEvent] = (),
    ns: Iterable[int] = range(1, 11),
) -> list[AnyEvent]:
    """The client subscribes at 1.0 and ends at 20.0; the sender commits ``ns``; the client
    receives each but ``skip``; ``extra`` events are merged in by time."""
    events: list[AnyEvent] = [
        Generation(t=0.5, p=CLIENT, g=1, lineage="d1"),
        Subscribed(t=1.0, p=CLIENT, ch=CH),
        Ended(t=20.0, p=CLIENT),
        Ended(t=20.0, p=SENDER),
    ]
    skipped = set(skip)
    for n in ns:
        events.append(commit(n))
        if n not in skipped:
            events.append(recv(n))
    events += extra
    events.sort(key=lambda e: e.t)
    return events


def kinds(events: list[AnyEvent]) -> list[tuple[str, int | None]]:
    return [(v.kind, v.n) for v in check(events)]


# Illegal histories: each caught, as the right kind.


def test_a_silent_gap_is_lost() -> None:
    assert kinds(run(skip=[5])) == [("lost", 5)]


def test_consecutive_silent_losses_are_one_violation_counting_each() -> None:
    result = checker.analyze(run(skip=[5, 6, 7]))
    [v] = result.violations
    assert (v.kind, v.n, v.count) == ("lost", 5, 3)
    assert result.counts.lost == 3


def test_a_loss_at_the_tail_with_nothing_later_is_lost() -> None:
    assert kinds(run(skip=[10])) == [("lost", 10)]


def test_a_duplicate_is_caught_and_is_not_also_a_reordering() -> None:
    assert kinds(run(extra=[recv(5, t=delivered(5) + 0.01)])) == [("duplicate", 5)]


def test_a_duplicate_across_subscriptions_is_caught() -> None:
    events = run(
        extra=[
            Unsubscribing(t=12.5, p=CLIENT, ch=CH),
            Subscribed(t=13.0, p=CLIENT, ch=CH),
            recv(10, t=13.5),
        ]
    )
    assert kinds(events) == [("duplicate", 10)]


def test_a_reordering_is_caught() -> None:
    events = run(skip=[5, 6], extra=[recv(6, t=8.16), recv(5, t=8.17)])
    assert kinds(events) == [("order", 5)]


def test_a_step_before_the_loss_does_not_cover_it() -> None:
    step = Generation(t=began(5) - 0.1, p=CLIENT, g=2, lineage="d1")
    assert kinds(run(skip=[5], extra=[step])) == [("lost", 5)]


def test_a_lag_on_another_channel_does_not_cover_a_loss() -> None:
    lag = Lagged(t=committed(5) + 0.2, p=CLIENT, ch="b", lost=1)
    assert kinds(run(skip=[5], extra=[lag])) == [("lost", 5)]


def test_a_step_after_the_next_delivery_does_not_cover_a_loss() -> None:
    step = Generation(t=delivered(6) + 0.01, p=CLIENT, g=2, lineage="d1")
    assert kinds(run(skip=[5], extra=[step])) == [("lost", 5)]


def test_a_step_of_another_process_does_not_cover_a_loss() -> None:
    step = Generation(t=committed(5) + 0.2, p="c2", g=2, lineage="d1")
    assert kinds(run(skip=[5], extra=[step])) == [("lost", 5)]


def test_a_phantom_is_caught() -> None:
    assert kinds(run(extra=[recv(99, t=15.0)])) == [("phantom", 99)]


@pytest.mark.parametrize(("first", "then"), [(3, 2), (2, 2)], ids=["back", "equal"])
def test_a_generation_that_does_not_move_forward_is_caught(first: int, then: int) -> None:
    # The history begins at g=1.
    steps: list[AnyEvent] = [
        Generation(t=3.0, p=CLIENT, g=first, lineage="d2"),
        Generation(t=4.0, p=CLIENT, g=then, lineage="d1"),
    ]
    [v] = check(run(extra=steps))
    assert (v.kind, v.process, v.time) == ("generation", CLIENT, 4.0)


def test_a_generation_going_on_in_a_new_lineage_is_legal() -> None:
    steps: list[AnyEvent] = [
        Generation(t=3.0, p=CLIENT, g=2, lineage="d2"),
        Generation(t=4.0, p=CLIENT, g=3, lineage="d1"),
    ]
    assert check(run(extra=steps)) == []


def test_a_failed_client_is_caught() -> None:
    events = [e for e in run() if not (isinstance(e, Ended) and e.p == CLIENT)]
    events.append(Ended(t=20.0, p=CLIENT, why="recv raised BusClosedError"))
    [v] = check(events)
    assert (v.kind, v.process) == ("failed", CLIENT)
    assert "BusClosedError" in v.message


# Legal histories: no violation.


def test_a_clean_run_has_no_violation_and_counts_every_delivery() -> None:
    result = checker.analyze(run())
    assert result.violations == []
    counts = result.counts
    assert (counts.committed, counts.owed, counts.received, counts.lost) == (10, 10, 10, 0)
    assert counts.processes[CLIENT].subscriptions == 1


def test_a_gap_covered_by_a_later_step_is_legal() -> None:
    step = Generation(t=committed(5) + 0.3, p=CLIENT, g=2, lineage="d2")
    result = checker.analyze(run(skip=[5], extra=[step]))
    assert result.violations == []
    assert (result.counts.covered_step, result.counts.covered_lag) == (1, 0)


def test_a_gap_covered_by_a_lag_on_its_channel_up_to_the_next_delivery_is_legal() -> None:
    lag = Lagged(t=delivered(6), p=CLIENT, ch=CH, lost=1)
    result = checker.analyze(run(skip=[5], extra=[lag]))
    assert result.violations == []
    assert (result.counts.covered_step, result.counts.covered_lag) == (0, 1)


def test_a_tail_loss_covered_by_a_step_before_the_end_is_legal() -> None:
    step = Generation(t=19.0, p=CLIENT, g=2, lineage="d2")
    assert check(run(skip=[10], extra=[step])) == []


def test_a_commit_that_began_before_the_subscribe_is_not_owed() -> None:
    early = Committed(t=1.5, p=SENDER, ch=CH, ns=[0], t0=0.9)
    result = checker.analyze(run(extra=[early]))
    assert result.violations == []
    assert result.counts.owed == 10


def test_a_commit_after_the_unsubscribe_is_not_owed() -> None:
    unsub = Unsubscribing(t=began(8), p=CLIENT, ch=CH)
    assert check(run(skip=[8, 9, 10], extra=[unsub])) == []


def test_a_receipt_after_the_unsubscribe_counts() -> None:
    # Recorded before the subscription is closed: what was buffered is still read.
    unsub = Unsubscribing(t=committed(10) + 0.01, p=CLIENT, ch=CH)
    assert check(run(extra=[unsub])) == []


def test_a_tail_in_flight_at_an_unsubscribe_is_not_owed_but_a_gap_before_it_is() -> None:
    # 10 committed just before the unsubscribe may still have been on its way: not owed. 5 was
    # followed by deliveries: lost.
    unsub = Unsubscribing(t=committed(10) + 0.01, p=CLIENT, ch=CH)
    result = checker.analyze(run(skip=[5, 10], extra=[unsub]))
    assert [(v.kind, v.n) for v in result.violations] == [("lost", 5)]
    assert result.counts.unsettled == 1


def test_a_tail_missing_from_a_killed_client_is_not_owed() -> None:
    # Its last record (a receipt on another channel) comes after 9 and 10 committed.
    last = Received(t=19.0, p=CLIENT, ch="b", n=1)
    events = [
        e
        for e in run(skip=[9, 10], extra=[last, Committed(t=18.0, p="s2", ch="b", ns=[1], t0=0.1)])
        if not (isinstance(e, Ended) and e.p == CLIENT)
    ]
    result = checker.analyze(events)
    assert result.violations == []
    assert result.counts.unsettled == 2


def test_an_uncertain_notification_never_received_is_legal_and_one_received_is_no_phantom() -> None:
    maybe: list[AnyEvent] = [
        Uncertain(t=15.0, p=SENDER, ch=CH, ns=[11], t0=14.5),
        Uncertain(t=16.0, p=SENDER, ch=CH, ns=[12], t0=15.5),
        recv(12, t=16.1),
    ]
    result = checker.analyze(run(extra=maybe))
    assert result.violations == []
    assert (result.counts.committed, result.counts.uncertain) == (10, 2)


def test_a_resubscribe_after_an_unsubscribe_is_owed_anew() -> None:
    churn: list[AnyEvent] = [
        Unsubscribing(t=delivered(4) + 0.01, p=CLIENT, ch=CH),
        Subscribed(t=began(6) - 0.1, p=CLIENT, ch=CH),
    ]
    result = checker.analyze(run(skip=[5], extra=churn))
    assert result.violations == []
    assert result.counts.processes[CLIENT].subscriptions == 2
    assert result.counts.owed == 9
    # The second subscription is owed what it missed.
    assert kinds(run(skip=[5, 7], extra=churn)) == [("lost", 7)]


# What a violation is told with.


def lost_five() -> tuple[Violation, list[AnyEvent]]:
    faults = [
        Fault(t=began(5) - 0.5, p="nemesis", kind="kill-daemon", detail="SIGKILL d1", t1=7.3),
        Fault(t=17.0, p="nemesis", kind="far-away", detail="not near the loss", t1=18.0),
    ]
    events = run(skip=[5], extra=faults)
    [v] = check(events)
    return v, events


def test_explain_names_the_seed_its_replay_and_the_fault_around_the_loss() -> None:
    v, events = lost_five()
    faults = [f for f in events if isinstance(f, Fault)]
    planned = [PlannedFault(at=5.5, kind="proxy-cut", duration=1.0, seed=7)]
    text = explain(v, events, [*faults, *planned], 1234, "single", duration=600.0, start=0.5)
    assert "seed 1234" in text
    assert "make soak SEED=1234 MODE=single DURATION=600" in text
    assert "kill-daemon" in text
    assert "proxy-cut" in text
    assert "far-away" not in text
    # The window: the delivery before, the commit of the lost one, the delivery after.
    assert f"recv   {CH} n=4" in text
    assert f"commit {CH} n=5" in text
    assert f"recv   {CH} n=6" in text
    assert "n=3" not in text


def test_explain_cuts_long_runs_of_receipts() -> None:
    events = run(ns=range(1, 301), extra=[recv(3, t=delivered(290))])
    [v] = check(events)
    assert v.kind == "duplicate"
    text = explain(v, events, [], 1, "single")
    assert len(text.splitlines()) < 30
    assert "receipts n=" in text


# The command line and the runner's entry.


def write_run(run_dir: Path, events: list[AnyEvent]) -> None:
    recorders: dict[str, Recorder] = {}
    for e in events:
        if e.p not in recorders:
            recorders[e.p] = Recorder(run_dir / "history" / f"{e.p}.jsonl", e.p)
        recorders[e.p].record(e)
    for r in recorders.values():
        r.close()
    schedule = {
        "seed": 4242,
        "mode": "fleet",
        "duration": 60,
        "faults": [{"at": 6.0, "kind": "kill-host", "duration": 1.0, "seed": 9}],
    }
    (run_dir / "schedule.json").write_text(json.dumps(schedule))


def cli(run_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.soak.checker", str(run_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_cli_fails_a_violating_run_and_names_its_seed(tmp_path: Path) -> None:
    write_run(tmp_path, lost_five()[1])
    done = cli(tmp_path)
    assert done.returncode == 1, done.stderr
    assert "make soak SEED=4242 MODE=fleet DURATION=60" in done.stdout
    assert "violations: lost 1" in done.stdout
    assert "kill-daemon" in done.stdout
    assert "kill-host" in done.stdout


def test_the_cli_passes_a_legal_run(tmp_path: Path) -> None:
    step = Generation(t=committed(5) + 0.3, p=CLIENT, g=2, lineage="d2")
    write_run(tmp_path, run(skip=[5], extra=[step]))
    done = cli(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "violations: none" in done.stdout
    assert "1 by a generation step" in done.stdout


def test_check_run_gives_the_runner_violations_counts_and_text(tmp_path: Path) -> None:
    write_run(tmp_path, run(skip=[5, 6]))
    result = checker.check_run(tmp_path)
    assert [(v.kind, v.n, v.count) for v in result.violations] == [("lost", 5, 2)]
    assert result.counts.owed == 10
    assert result.counts.received == 8
    assert "SEED=4242" in result.text()


def test_a_stretch_without_receipts_while_commits_go_on_is_a_silence() -> None:
    # Nothing received from 3 on (covered by a step), then 8 at its time: a silence from 3's
    # commit to 8's receipt; none when a fault held the client itself meanwhile.
    step = [Generation(t=delivered(8) - 0.01, p=CLIENT, g=2, lineage="d1")]
    result = checker.analyze(run(skip=range(3, 8), extra=step))
    ((length, process, channel, since),) = result.counts.silences
    assert (process, channel, since) == (CLIENT, CH, committed(3))
    assert length == pytest.approx(delivered(8) - committed(3))
    assert "silences (no receipt for over 1.5 s while committed): 1, median 5." in (
        checker.summarize(result, checker.Schedule())
    )
    stopped = Fault(
        t=4.0, p="nemesis", kind="client-stop", detail=f"{CLIENT} (pid 1) stopped", t1=9.0
    )
    assert checker.analyze(run(skip=range(3, 8), extra=[*step, stopped])).counts.silences == []
    assert checker.analyze(run()).counts.silences == []
