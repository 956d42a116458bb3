"""What the tests share: processes, relays, servers and clients they drive (no tests here).

- ``proxy``: a fault-injecting TCP proxy in front of PostgreSQL (cut, blackhole, throttle).
- ``unixrelay``: a Unix-socket relay between a client and the daemon that can hold frames.
- ``cluster``: a private, throwaway PostgreSQL cluster (initdb as the ``postgres`` user).
- ``natsserver``, ``fleet_helpers``: private nats-servers, and the fleet tests' common steps.
- ``fakedaemon``: a scripted daemon speaking the protocol over a real socket.
- ``bothclients``: one interface over the asyncio and the blocking client.
- ``clientproc``, ``numbered_worker``: worker processes that record what they receive.
- ``systemd_lab``, ``lab_clients``: a live systemd in private namespaces, and its workers.
- ``failpoints``: a ``sitecustomize`` that stops a daemon at a named phase of a hand-off.
"""
