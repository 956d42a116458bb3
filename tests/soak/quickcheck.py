"""A stand-in for tests/soak/checker.py while that module is not in this checkout: the same
``check_run(run_dir)`` with a result of ``.violations``, ``.counts`` and ``.text()``, proving
less (per subscription: nothing owed missing unless a step or a lag on that channel came after
its commit and before the next payload received there; no number twice or backwards).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tests.soak import history

#: Seconds after Unsubscribing that a step or a lag may still cover a loss.
GRACE = 30.0


@dataclass
class Result:
    violations: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def text(self) -> str:
        head = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        lines = [f"quick check: {head}; {len(self.violations)} violations"]
        lines += [f"  {v}" for v in self.violations[:30]]
        return "\n".join(lines)


def check_run(run_dir: Path) -> Result:
    result = Result(counts=defaultdict(int))
    commits: dict[str, dict[int, tuple[float, float]]] = defaultdict(dict)
    clients = []
    for path in sorted((run_dir / "history").glob("*.jsonl")):
        events = list(history.read(path))
        if path.name.startswith("sender-"):
            for e in events:
                if isinstance(e, history.Committed):
                    for n in e.ns:
                        commits[e.ch][n] = (e.t0, e.t)
        elif path.name != "nemesis.jsonl":
            clients.append(events)
    for events in clients:
        _check_client(events, commits, result)
    result.counts = dict(result.counts)
    return result


Commits = dict[str, dict[int, tuple[float, float]]]


def _check_client(events: list[history.AnyEvent], commits: Commits, result: Result) -> None:
    if not events:
        return
    end = events[-1].t
    opened: dict[str, float] = {}
    spans: list[tuple[str, float, float]] = []
    for e in events:
        if isinstance(e, history.Subscribed):
            opened[e.ch] = e.t
        elif isinstance(e, history.Unsubscribing) and e.ch in opened:
            spans.append((e.ch, opened.pop(e.ch), e.t))
    spans += [(ch, t, end) for ch, t in opened.items()]
    for ch, start, stop in spans:
        later = [e for e in events if start <= e.t <= stop + GRACE]
        got = [e for e in later if isinstance(e, history.Received) and e.ch == ch]
        covers = [e.t for e in later if isinstance(e, history.Generation)
                  or (isinstance(e, history.Lagged) and e.ch == ch)]  # fmt: skip
        seen: set[int] = set()
        last = -1
        for r in got:
            if r.n in seen:
                result.violations.append(f"{r.p}: {ch} {r.n} received twice (t={r.t:.3f})")
            elif r.n < last:
                result.violations.append(f"{r.p}: {ch} {r.n} after {last} (t={r.t:.3f})")
            seen.add(r.n)
            last = max(last, r.n)
        killed = not isinstance(events[-1], history.Ended)
        for n, (t0, t) in sorted(commits[ch].items()):
            if not (start < t0 and t < stop) or (killed and n > last):
                continue
            result.counts["owed"] += 1
            if n in seen:
                result.counts["received"] += 1
                continue
            after = next((r.t for r in got if r.n > n), stop + GRACE)
            if any(t0 <= c <= after for c in covers):
                result.counts["covered"] += 1
                continue
            result.violations.append(
                f"{events[0].p}: {ch} {n} (committed {t0:.3f}..{t:.3f}) never received, no step "
                f"or lag after it (subscribed {start:.3f}..{stop:.3f})"
            )
