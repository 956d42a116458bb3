"""Who may attach, and who may subscribe to what: peer credentials checked against allow lists.

The socket file's mode and group are the first gate (a process that cannot open the file cannot
connect). These checks are the second: on accept the daemon reads the peer's uid, gid and
supplementary groups from the kernel (``SO_PEERCRED``, ``SO_PEERGROUPS``), which the peer cannot
forge, and compares them with ``--allow-uid`` / ``--allow-gid`` and the per-channel
``--channel-acl`` rules. Root and the daemon's own uid always pass (they could read the
database password anyway).
"""

from __future__ import annotations

import fnmatch
import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

_PEERCRED = struct.Struct("3i")
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()

    def describe(self) -> str:
        return f"pid {self.pid}, uid {self.uid}, gid {self.gid}"


UNKNOWN_PEER = Peer(-1, -1, -1)


def peer_of(sock: Any) -> Peer:
    """The credentials of the process at the other end of a connected Unix socket."""
    try:
        pid, uid, gid = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
    except (OSError, AttributeError):
        return UNKNOWN_PEER
    groups: frozenset[int] = frozenset((gid,))
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 4 * 1024)
        groups |= frozenset(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    except OSError:
        pass
    return Peer(pid, uid, gid, groups)


def resolve_uid(spec: str) -> int:
    """A uid from a number or a user name; ValueError naming it if there is no such user."""
    if spec.isdigit():
        return int(spec)
    try:
        return pwd.getpwnam(spec).pw_uid
    except KeyError:
        raise ValueError(f"no such user: {spec!r}") from None


def resolve_gid(spec: str) -> int:
    """A gid from a number or a group name; ValueError naming it if there is no such group."""
    if spec.isdigit():
        return int(spec)
    try:
        return grp.getgrnam(spec).gr_gid
    except KeyError:
        raise ValueError(f"no such group: {spec!r}") from None


@dataclass(frozen=True)
class Rule:
    """Matches peers by uid or by any of their groups. An empty rule matches nobody."""

    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()

    def matches(self, peer: Peer) -> bool:
        return peer.uid in self.uids or bool(self.gids & peer.groups)


def parse_rule(items: list[str]) -> Rule:
    """``["uid:1001", "gid:workers", ...]`` -> Rule. ValueError naming the bad item."""
    uids: set[int] = set()
    gids: set[int] = set()
    for item in items:
        kind, sep, value = item.strip().partition(":")
        if not sep or not value:
            raise ValueError(f"expected uid:USER or gid:GROUP, got {item!r}")
        if kind == "uid":
            uids.add(resolve_uid(value))
        elif kind == "gid":
            gids.add(resolve_gid(value))
        else:
            raise ValueError(f"expected uid:USER or gid:GROUP, got {item!r}")
    return Rule(frozenset(uids), frozenset(gids))


def is_glob(name: str) -> bool:
    """Whether a channel ACL's key is a shell-style glob (``*``, ``?``, ``[``) or a name."""
    return any(c in name for c in "*?[")


def parse_channel_acl(spec: str) -> tuple[str, Rule]:
    """``CHANNEL=uid:1001,gid:workers`` -> (channel, rule). The channel is everything before the
    last ``=``, so channel names may themselves contain ``=``."""
    channel, sep, rule = spec.rpartition("=")
    if not sep or not channel:
        raise ValueError(f"expected CHANNEL=uid:USER,gid:GROUP, got {spec!r}")
    return channel, parse_rule(rule.split(","))


@dataclass(frozen=True)
class AccessPolicy:
    """The resolved allow lists. ``attach`` None means: whoever can open the socket file."""

    attach: Rule | None = None
    channels: dict[str, Rule] = field(default_factory=dict)
    always: frozenset[int] = frozenset({0, os.getuid()})
    #: Who sees the whole status document besides root and the daemon's own user.
    operators: Rule = field(default_factory=Rule)

    @classmethod
    def build(
        cls,
        allow_uid: tuple[str, ...],
        allow_gid: tuple[str, ...],
        channel_acl: tuple[str, ...],
        operator_gid: tuple[str, ...] = (),
    ) -> AccessPolicy:
        attach = None
        if allow_uid or allow_gid:
            attach = parse_rule([f"uid:{u}" for u in allow_uid] + [f"gid:{g}" for g in allow_gid])
        channels = dict(parse_channel_acl(spec) for spec in channel_acl)
        operators = parse_rule([f"gid:{g}" for g in operator_gid])
        return cls(attach, channels, operators=operators)

    def sees_everything(self, peer: Peer) -> bool:
        """Whether ``peer`` is shown the whole status (every channel and client): root, the
        daemon's own user, and the members of --operator-gid groups."""
        return peer.uid in self.always or self.operators.matches(peer)

    def refuse_attach(self, peer: Peer) -> str | None:
        """Why ``peer`` may not attach, or None if it may."""
        if self.attach is None or peer.uid in self.always or self.attach.matches(peer):
            return None
        return f"uid {peer.uid} (gid {peer.gid}) is not allowed to attach to this daemon"

    def refuse_admin(self, peer: Peer) -> str | None:
        """Why ``peer`` may not give the daemon an operator's order (reload), or None."""
        if peer.uid in self.always:
            return None
        return f"uid {peer.uid} may not reload the daemon (only root and its own user may)"

    def refuse_subscribe(self, peer: Peer, channel: str) -> str | None:
        """Why ``peer`` may not subscribe to ``channel``, or None if it may. Every rule whose
        key is the channel, or a glob matching it, must let the peer in."""
        if peer.uid in self.always:
            return None
        for key, rule in self.channels.items():
            if (key == channel or (is_glob(key) and fnmatch.fnmatchcase(channel, key))) and (
                not rule.matches(peer)
            ):
                return f"uid {peer.uid} (gid {peer.gid}) may not subscribe to {channel!r}"
        return None
