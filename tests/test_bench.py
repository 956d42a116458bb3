"""The benchmark suite (make bench), run small: every section, the table, the JSON and the chart.

This checks that ``make bench`` works and reports its figures side by side; it asserts
no speed (timings belong in the benchmark's own output, never in a test).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DSN

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    *("--burst", "400", "--burst-many", "100", "--sizes", "64,1024", "--repeat", "1"),
    *("--fanout", "1,3", "--fanout-burst", "200"),
    *("--rates", "200", "--latency-seconds", "0.5"),
    *("--scale-clients", "20", "--scale-channels", "4", "--scale-rate", "100"),
    *("--scale-seconds", "0.5", "--idle-seconds", "0.5"),
    *("--dbcost-k", "1,2", "--dbcost-seconds", "1"),
    *("--handoff-rate", "200", "--handoff-workers", "2", "--handoff-seconds", "2"),
    *("--handoff-reloads", "1", "--handoff-control-seconds", "0.5"),
    *("--handoff-fill", "300", "--handoff-full-seconds", "2", "--handoff-full-reloads", "1"),
    *("--replay-large-mib", "1", "--replay-small-n", "500"),
    *("--ondemand-channels", "10", "--ondemand-storm", "20"),
]


def test_bench_runs_every_section_side_by_side_and_writes_table_json_and_chart(
    tmp_path: Path,
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--dsn", DSN, "--out", str(tmp_path), *TINY],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    table = result.stdout
    for heading in (
        "1. Throughput",
        "2. Fan-out",
        "3. Latency",
        "4. Scale",
        "5. Database cost",
        "6. Fleet relay",
        "7. Hand-off under load",
        "8. Channels on demand",
        "Targets",
    ):
        assert heading in table, f"{heading!r} missing from the table"

    res = json.loads((tmp_path / "latest.json").read_text())
    assert res["errors"] == []
    assert len(res["commit"]) >= 7
    assert {(t["size"], t["shape"]) for t in res["throughput"]} == {
        (size, shape) for size in (64, 1024) for shape in ("one transaction", "many")
    }
    for t in res["throughput"]:
        assert t["direct"] > 0
        assert t["relay"] > 0
        assert t["ratio"] == t["relay"] / t["direct"]
    for f in res["fanout"]:
        assert (f["direct"]["backends"], f["relay"]["backends"]) == (f["k"], 1)
        assert f["direct"]["deliveries_per_s"] > 0
        assert f["relay"]["deliveries_per_s"] > 0
        assert f["relay"]["pss_mib"]["daemon"] > 0
    assert [f["k"] for f in res["fanout"]] == [1, 3]
    (lat,) = res["latency"]
    assert lat["direct"]["samples"] == lat["relay"]["samples"] == 100
    assert lat["added_p50_ms"] == lat["relay"]["p50_ms"] - lat["direct"]["p50_ms"]
    scale = res["scale"]
    assert scale["clients"] == 20
    assert scale["idle"]["rss_mib"] > 0
    assert scale["deliveries"] == scale["load_latency"]["samples"] > 0

    cost = res["dbcost"]
    assert cost["baseline"] > 0
    assert [p["k"] for p in cost["points"]] == [1, 2]
    for p in cost["points"]:
        assert p["errors"] == {}
        assert set(p["commits"]) == {"direct", "per_host", "bridge"}
        assert all(v > 0 for v in p["commits"].values())
        assert p["listeners"] == {"direct": p["k"], "per_host": p["k"], "bridge": 1}
    assert (tmp_path / "latest-dbcost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    fleet = res["fleet"]
    assert [b["shape"] for b in fleet["bursts"]] == ["one transaction", "many"]
    for b in fleet["bursts"]:
        assert b["single"] > 0
        assert b["fleet"] > 0
        assert b["ratio"] == b["fleet"] / b["single"]
    assert fleet["fleet_latency"]["samples"] == fleet["single_latency"]["samples"] == 100
    assert (
        fleet["added_p50_ms"]
        == fleet["fleet_latency"]["p50_ms"] - fleet["single_latency"]["p50_ms"]
    )

    handoff = res["handoff"]
    assert handoff["control_relay"]["samples"] == 2 * 100
    assert [p["name"] for p in handoff["phases"]] == ["buffer filling", "buffer full"]
    for phase in handoff["phases"]:
        (reload,) = phase["reloads"]
        assert 0 < reload["serving_s"] <= reload["exit_s"]
        assert reload["new_pid"] != reload["old_pid"]
        # Every worker got every notification of the phase, once (checked by the section); they
        # fall inside or outside the hand-off window by their commit time.
        assert phase["delivered"] == phase["expected"] == 2 * 400
        assert phase["relay_outside"]["samples"] + phase["relay_inside"]["samples"] == 800
        assert phase["relay_inside"]["samples"] > 0
        assert phase["added_p99_ms"] == (
            phase["relay_inside"]["p99_ms"] - phase["relay_outside"]["p99_ms"]
        )
    # The second phase's reload found the fill channel's 300 notifications in the buffer.
    filling, full = (p["reloads"][0]["replay_bytes"] for p in handoff["phases"])
    assert full > filling > 0
    memory = handoff["memory"]
    assert memory["default"]["replay_limit"] == 16 << 20
    assert memory["none"]["replay_limit"] == 0
    assert memory["default"]["kept_notifications_small"] == 1024 + 500
    assert memory["none"]["kept_notifications_small"] == 0
    assert (tmp_path / "latest-handoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    ondemand = res["ondemand"]
    assert ondemand["subscribe"]["samples"] == ondemand["add_listener"]["samples"] == 10
    assert [(s["path"], s["clients"]) for s in ondemand["storms"]] == [
        ("pgbus", 1),
        ("pgbus", 10),
        ("direct", 1),
        ("direct", 10),
        ("batched", 1),
    ]
    for storm in ondemand["storms"]:
        assert storm["channels"] == 20
        assert len(storm["runs"]) == 1
        assert storm["seconds"] > 0

    charts = list(tmp_path.glob("bench-*.png"))
    assert len(charts) == 1
    assert charts[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
