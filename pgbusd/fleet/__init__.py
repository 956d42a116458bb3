"""Fleet mode: one PostgreSQL listener for a whole fleet of hosts, through NATS JetStream.

The building blocks, each in its own module; :mod:`~pgbusd.fleet.roles` wires them into the
daemon (docs/fleet.md):

- :mod:`~pgbusd.fleet.subjects`: the stream's subjects and the rule for its name.
- :mod:`~pgbusd.fleet.schema`: what a stream message is (msgpack Structs), the headers, the
  versioning rule, and :class:`~pgbusd.fleet.schema.StreamState`: lineage, generation and the
  per-channel seq vector, which every reader of the stream computes identically.
- :mod:`~pgbusd.fleet.publisher`: :class:`StreamPublisher`, the bridge's ordered, pipelined,
  fenced writer into the stream.
- :mod:`~pgbusd.fleet.lease`: :class:`PublisherLease`, one publisher among bridges (a key in a
  JetStream key-value bucket, TTL and compare-and-set).
- :mod:`~pgbusd.fleet.bridge`: :class:`Bridge`, the bridge role: it holds what PostgreSQL
  delivers, publishes while it holds the lease, and takes over exactly where the previous
  publisher stopped (marker notifications), or with one generation step when it cannot.
- :mod:`~pgbusd.fleet.reader`: :class:`StreamReader`, the stream read in order from a sequence,
  across reconnects and server restarts, with gaps reported.
- :mod:`~pgbusd.fleet.source`: :class:`HostSource`, the host role's feed: stamped
  notifications and ticks for the hub, a state file, resume after a restart.
- :mod:`~pgbusd.fleet.roles`: the two roles in the daemon (``--publish``, ``--source``): what
  the server runs for each.

Only this package imports ``nats`` (the optional ``fleet`` extra).
"""
