"""The reconnect generation: the rules that move it, and one watcher's view of it."""

from __future__ import annotations

from typing import Protocol

from pgbus._engine.driver import DriverRoom


class GenerationClock:
    """The reconnect generation a client publishes, moved by what its attachments report.

    - The first attach takes the daemon's generation (0 if it never reached PostgreSQL).
    - Each daemon tick moves it by the tick's delta (the daemon reconnected to PostgreSQL).
    - A re-attach (the daemon restarted, or this client's connection was lost) moves it by exactly
      one step, published once the daemon is connected to PostgreSQL *and* every re-subscription is
      acknowledged: at the end of the handshake if the daemon is at generation 1 or more, else at
      its first tick. A subscriber that resyncs when it sees the step cannot miss a notification
      committed after it looked.
    - Unless the re-attach *resumed*: the same lineage at the same generation replayed every
      notification the client missed on every channel it held (see the protocol's "Resume").
      Then nothing was lost and it does not move.
    - A step once owed stays owed until it is published: a resume the daemon could not honour
      on a channel, a tick during a handshake (the daemon reconnected to PostgreSQL meanwhile:
      what was committed then is lost, whatever the seqs say), a re-attach that did not try to
      resume. If the connection ends before the handshake does, the next attach does not
      resume: it publishes the step (:attr:`owed`).
    - A ``seq`` that skips on a channel within one attachment moves it by one. The daemon never
      drops a notification for an attached client, so this is a bug or a foreign daemon; the honest
      answer is the same as for any other gap.

    It never moves backwards. The methods that can move it return True when they did, so the
    caller knows to wake whoever waits on it.
    """

    __slots__ = (
        "_attaching",
        "_daemon",
        "_ever_attached",
        "_last_seq",
        "_step_pending",
        "generation",
        "owed",
    )

    def __init__(self) -> None:
        self.generation = 0
        self._daemon = 0
        self._ever_attached = False
        self._attaching = False
        self._step_pending = False
        #: Something may have been lost since the last step, and no step covers it yet.
        self.owed = False
        self._last_seq: dict[str, int] = {}

    @property
    def daemon_generation(self) -> int:
        """The daemon's generation as this client last heard it."""
        return self._daemon

    def last_seq(self, channel: str) -> int | None:
        """The seq of the last notification (or confirmation) on ``channel`` in this lineage."""
        return self._last_seq.get(channel)

    def on_hello(self, daemon_generation: int, *, resuming: bool = False) -> None:
        """A handshake began: the daemon announced its generation. Unless the client tries to
        resume, the seqs it saw belong to a past it can no longer continue, and a step is owed."""
        self._attaching = True
        self._daemon = daemon_generation
        if not resuming:
            self._last_seq.clear()
            self.owe()

    def owe(self) -> None:
        """Notifications may have been lost and no step covers them yet (a re-attach that is
        not a resume, or a resume the daemon could not honour)."""
        if self._ever_attached:
            self.owed = True

    def forget(self, channel: str) -> None:
        """Nobody subscribes to ``channel`` any more: a later subscription starts afresh."""
        self._last_seq.pop(channel, None)

    def on_attached(self) -> bool:
        """The handshake finished: every re-subscription is acknowledged. The first attach
        takes the daemon's generation; a later one publishes the step it owes, if any."""
        self._attaching = False
        if not self._ever_attached:
            self._ever_attached = True
            return self._advance(self._daemon - self.generation)
        if not self.owed:
            return False  # a resume: nothing was lost
        if self._daemon >= 1:
            self.owed = self._step_pending = False
            return self._advance(1)
        self._step_pending = True  # the daemon's first tick publishes the step
        return False

    def on_detached(self) -> None:
        """The connection ended; a handshake still under way no longer counts (what it owed
        stays owed)."""
        self._attaching = False

    def on_tick(self, daemon_generation: int) -> bool:
        """The daemon (re)connected to PostgreSQL and LISTENs on every channel again."""
        if daemon_generation <= self._daemon:
            return False
        step = daemon_generation - self._daemon
        self._daemon = daemon_generation
        if self._attaching:
            self.owe()  # published at the end of the handshake, or by the next attach
            return False
        if self._step_pending:
            self._step_pending = self.owed = False
            step = 1
        return self._advance(step)

    def on_subscribed(self, channel: str, seq: int) -> None:
        """The daemon confirmed a subscription; its next notification carries ``seq + 1``."""
        self._last_seq[channel] = seq

    def on_notification(self, channel: str, seq: int) -> bool:
        last_seq = self._last_seq
        last = last_seq.get(channel)
        last_seq[channel] = seq
        if last is not None and seq != last + 1:
            return self._advance(1)
        return False

    def on_run(self, channel: str, seqs: list[int]) -> bool:
        """:meth:`on_notification` for consecutive notifications on one channel, at C speed when
        the seqs run on without a gap (always, from a correct daemon)."""
        first = seqs[0]
        last = self._last_seq.get(channel)
        if (last is None or first == last + 1) and seqs == list(range(first, first + len(seqs))):
            self._last_seq[channel] = seqs[-1]
            return False
        moved = False
        for seq in seqs:
            moved = self.on_notification(channel, seq) or moved
        return moved

    def _advance(self, step: int) -> bool:
        if step > 0:
            self.generation += step
            return True
        return False


class HasGeneration(Protocol):
    @property
    def generation(self) -> int: ...


class GenerationCursor:
    """What one watcher has seen of a bus's generation: the part of a watch that never waits.

    Like a tokio ``watch::Receiver<u64>``: :meth:`borrow` reads the current value, a change is a
    value greater than the last one this watcher observed. ``bus`` is the bus it watches.
    """

    def __init__(self, bus: HasGeneration, room: DriverRoom | None = None) -> None:
        self.bus = bus
        self._seen = bus.generation
        #: What the driver's bus lends it to wait (its Room).
        self._room = room

    def borrow(self) -> int:
        """The current generation (does not mark it as seen)."""
        return self.bus.generation

    def has_changed(self) -> bool:
        """Whether the generation moved past the last value this watch observed."""
        return self.bus.generation > self._seen

    def _observe(self) -> int:
        self._seen = self.bus.generation
        return self._seen
