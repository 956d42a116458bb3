"""The local clients' side: the Unix socket and one session per attached client.

- :mod:`.session`: one client: its requests, its write budget, its resume, its shutdown.
- :mod:`.access`: who may attach and subscribe (peer credentials against the allow lists).
- :mod:`.socket`: binding the socket (lock file, stale socket, systemd socket activation).
"""
