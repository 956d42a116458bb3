"""The soak: seeded random faults against real processes, and a checker over every history.

Modules (one concept each):

- ``history``: the events every process records (JSON lines, one file per process) and the
  payload format that numbers each notification.
- ``topology``: what a mode (single daemon, or a fleet) offers the runner: start, the sockets
  clients attach to, its faults, heal, its final checks, stop.
- ``checker``: reads every history of a run and proves the promises, or prints the smallest
  window of history that breaks one, with the seed and the faults around it.

Times are ``time.monotonic()`` readings: CLOCK_MONOTONIC is one clock for every process of the
machine, so events of different processes compare.
"""
