"""Every vector of client/conformance/ against the Python client's decoder, encoder and engine.

The Rust client runs the same vectors (client/rust/tests/conformance.rs): one specification,
tested by both clients. The format is described in client/conformance/README.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

import pgbus
from pgbus import protocol as p
from pgbus._engine import Attachment, Engine, PayloadQueue, Request
from pgbus.errors import ProtocolError

VECTORS = Path(__file__).resolve().parent.parent / "client" / "conformance"
FRAMES: dict[str, Any] = json.loads((VECTORS / "frames.json").read_text())
SCENARIOS: list[dict[str, Any]] = json.loads((VECTORS / "engine.json").read_text())["scenarios"]


def _decoder(side: str) -> p.FrameDecoder[Any]:
    return p.server_decoder() if side == "server" else p.client_decoder()


def _decode(side: str, data: bytes, bytewise: bool) -> list[Any]:
    decoder = _decoder(side)
    chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
    messages: list[Any] = []
    for chunk in chunks:
        messages += decoder.feed(chunk)
    assert decoder.buffered == 0, "bytes left over"
    return [msgspec.to_builtins(m) for m in messages]


def _named(vectors: list[dict[str, Any]]) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("vector", vectors, ids=[v["name"] for v in vectors])


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@_named(FRAMES["decode"])
def test_every_frame_decodes_to_its_messages(vector: dict[str, Any], bytewise: bool) -> None:
    got = _decode(vector["side"], bytes.fromhex(vector["hex"]), bytewise)
    assert got == vector["messages"]


@_named(FRAMES["encode"])
def test_every_client_message_encodes_to_the_same_bytes(vector: dict[str, Any]) -> None:
    messages = [msgspec.convert(m, p.ClientMessage) for m in vector["messages"]]
    assert p.encode_frame(*messages).hex() == vector["hex"]


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@_named(FRAMES["reject"])
def test_every_bad_frame_raises_its_error(vector: dict[str, Any], bytewise: bool) -> None:
    with pytest.raises(ProtocolError) as err:
        _decode(vector["side"], bytes.fromhex(vector["hex"]), bytewise)
    assert err.value.code == vector["error"]


class _Run:
    """One scenario run: the engine driven as the clients drive it."""

    def __init__(self, scenario: dict[str, Any], bytewise: bool) -> None:
        client = scenario.get("client", {})
        self.engine = Engine(name=client.get("name", ""), pid=client.get("pid", 42))
        self.buffer: int = scenario.get("buffer", 16)
        self.bytewise = bytewise
        self.att: Attachment | None = None
        self.subs: dict[str, PayloadQueue[str]] = {}
        #: id(request) -> the request (kept alive, so its id is not reused) and who it answers.
        self.names: dict[int, tuple[Request, list[str]]] = {}

    def _sub(self, channel: str) -> PayloadQueue[str]:
        return PayloadQueue(self.engine, channel, self.buffer, None)

    def act(self, step: dict[str, Any]) -> tuple[Any, list[Request], bool]:
        """Do the step's action: its outcome, the requests answered, whether to drop the link."""
        engine = self.engine
        outcome: Any = None
        replies: list[Request] = []
        drop = False
        if "want" in step:
            sub = self.subs[step["as"]] = self._sub(step["want"])
            engine.subscriptions.setdefault(sub.channel, []).append(sub)
        elif "connect" in step:
            self.att = engine.attach()
        elif "receive" in step or "receive_hex" in step:
            if "receive" in step:
                messages = [msgspec.convert(m, p.ServerMessage) for m in step["receive"]]
                data = p.encode_frame(*messages)
            else:
                data = bytes.fromhex(step["receive_hex"])
            assert self.att is not None
            chunks = [data[i : i + 1] for i in range(len(data))] if self.bytewise else [data]
            for chunk in chunks:
                changes = self.att.receive_data(chunk)
                replies += changes.replies
                drop |= changes.drop
        elif "lost" in step:
            assert self.att is not None
            replies += self.att.lost().replies
        elif "subscribe" in step:
            sub = self._sub(step["subscribe"])
            try:
                request = engine.subscribe(sub)
            except pgbus.UnknownChannelError:
                outcome = "unknown_channel"
            else:
                self.subs[step["as"]] = sub
                if request is not None:
                    self.names.setdefault(id(request), (request, []))[1].append(step["as"])
                    outcome = "sent"
                elif self.att is not None and sub.channel in self.att.subscribed:
                    outcome = "confirmed"
                else:
                    outcome = "registered"
        elif "close" in step:
            engine.remove(self.subs.pop(step["close"]))
        elif "status" in step:
            try:
                request = engine.request(p.StatusRequest())
            except pgbus.DaemonUnavailableError:
                outcome = "not_attached"
            else:
                self.names[id(request)] = (request, [step["status"]])
                outcome = "sent"
        else:
            raise AssertionError(f"no action in {step}")
        return outcome, replies, drop

    def answers(self, replies: list[Request]) -> dict[str, str]:
        out: dict[str, str] = {}
        for request in replies:
            if id(request) not in self.names:
                continue  # the engine's own (a handshake's re-subscription, an unsubscribe)
            try:
                reply = request.result()
            except pgbus.UnknownChannelError:
                text = "unknown_channel"
            except pgbus.RequestRefusedError as exc:
                text = f"refused:{exc.code}"
            except pgbus.DaemonUnavailableError:
                text = "lost"
            else:
                text = {
                    type(None): "kept",
                    p.Subscribed: "subscribed",
                    p.StatusReply: "status",
                    p.Reloaded: "reloaded",
                }[type(reply)]
            for name in self.names[id(request)][1]:
                out[name] = text
        return out

    def sent(self) -> list[Any]:
        att = self.att
        if att is None:
            return []
        data = att.data_to_send()
        if att.ended:
            return []  # a driver writes nothing to a connection that ended
        return [msgspec.to_builtins(m) for m in p.client_decoder().feed(data)]

    def drain(self, name: str) -> list[Any]:
        sub = self.subs[name]
        items: list[Any] = []
        while sub._ready():
            try:
                items.append(sub._next())
            except pgbus.LaggedError as exc:
                items.append({"lagged": exc.skipped})
            except pgbus.SubscriptionRefusedError as exc:
                items.append({"refused": exc.code})
                break
        return items


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@_named(SCENARIOS)
def test_every_engine_scenario_holds(vector: dict[str, Any], bytewise: bool) -> None:
    run = _Run(vector, bytewise)
    for number, step in enumerate(vector["steps"], 1):
        where = f"step {number}: {json.dumps(step)}"
        outcome, replies, drop = run.act(step)
        assert run.sent() == step.get("sent", []), where
        if "outcome" in step:
            assert outcome == step["outcome"], where
        assert run.answers(replies) == step.get("answers", {}), where
        got_drop = None
        if drop:
            assert run.att is not None
            failure = run.att.failure
            got_drop = "protocol" if isinstance(failure, ProtocolError) else "closed"
        assert got_drop == step.get("drop"), where
        engine = run.engine
        for key, got in (
            ("attached", engine.attached),
            ("generation", engine.generation),
            ("retry_at_once", engine.retry_at_once),
        ):
            if key in step:
                assert got == step[key], f"{where}: {key}"
        for name, want in step.get("recv", {}).items():
            assert run.drain(name) == want, f"{where}: recv {name}"
