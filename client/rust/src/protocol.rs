//! The pgbus wire protocol: messages, framing and a bounded frame decoder, without I/O.
//!
//! The specification is `docs/protocol.md` (the Python `pgbus.protocol` module is the other
//! implementation; `client/conformance/` holds the vectors both must pass). In short: a frame is
//! a 4-byte big-endian length and a msgpack array of messages; each message is a msgpack array
//! whose first element is its tag (`["notify", channel, payload, pid, generation, seq]`).
//! A receiver ignores trailing fields it does not know, and a sender may leave out trailing
//! fields that have a default.
//!
//! Decoding is strict where the Python decoder (msgspec) is strict: a string field takes a
//! msgpack string only (not binary), an integer field an integer only (not a float or a bool),
//! unknown tags and missing fields are errors. The length prefix is checked against the limit
//! before a byte of the body is buffered, so a hostile peer cannot make the decoder allocate
//! more than one maximal frame plus one read.

use std::collections::HashMap;
use std::fmt;

use serde::de::{self, IgnoredAny, SeqAccess, Visitor};
use serde::ser::{SerializeTuple, Serializer};
use serde::{Deserialize, Deserializer, Serialize};

/// The protocol version this client speaks; a daemon with another one is refused.
pub const PROTOCOL_VERSION: u64 = 1;
/// Largest frame body a client may send.
pub const MAX_CLIENT_FRAME: usize = 4096;
/// Largest frame body the daemon sends.
pub const MAX_SERVER_FRAME: usize = 1 << 20;
/// Bytes of the length prefix.
pub const HEADER_SIZE: usize = 4;
/// PostgreSQL identifiers (and so channel names) are at most 63 bytes.
pub const MAX_CHANNEL_BYTES: usize = 63;

/// Nesting allowed in a frame body (a status document is a few levels deep). Bounds the
/// decoder's recursion, and so its stack, whatever a peer sends.
const MAX_DEPTH: usize = 64;

// Error codes carried in Error frames (and in a ProtocolError's `code`).
pub const E_PROTOCOL: &str = "protocol";
pub const E_FRAME_TOO_LARGE: &str = "frame_too_large";
pub const E_VERSION: &str = "version";
pub const E_HANDSHAKE: &str = "handshake";
pub const E_UNKNOWN_CHANNEL: &str = "unknown_channel";
pub const E_INVALID_CHANNEL: &str = "invalid_channel";
pub const E_TOO_MANY_CHANNELS: &str = "too_many_channels";
pub const E_LISTEN_REFUSED: &str = "listen_refused";
pub const E_TOO_MANY_CLIENTS: &str = "too_many_clients";
pub const E_FORBIDDEN: &str = "forbidden";
pub const E_SHUTDOWN: &str = "shutdown";
pub const E_RELOAD: &str = "reload";
pub const E_RELOAD_FAILED: &str = "reload_failed";

/// Bytes that are not a valid stream of frames for this side, or a message this side cannot
/// accept at this point. After one, the connection is unusable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    /// The short machine-readable reason (`protocol`, `frame_too_large`, `version`).
    pub code: &'static str,
    pub message: String,
}

impl ProtocolError {
    pub fn new(message: impl Into<String>) -> Self {
        ProtocolError {
            code: E_PROTOCOL,
            message: message.into(),
        }
    }

    pub fn with_code(code: &'static str, message: impl Into<String>) -> Self {
        ProtocolError {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pgbus protocol error ({}): {}", self.code, self.message)
    }
}

impl std::error::Error for ProtocolError {}

// -- messages -------------------------------------------------------------------------------------

/// The daemon's greeting, first on every connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u64,
    /// Names the lineage: the generation and every channel's seq count within it.
    pub daemon_id: String,
    pub generation: u64,
    /// The registered channels.
    pub channels: Vec<String>,
    /// The daemon's inbound frame limit.
    pub max_frame: u64,
    /// The globs (`--channel-pattern`) of the channels it also relays on demand.
    pub patterns: Vec<String>,
}

/// One notification PostgreSQL delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub channel: String,
    /// Exactly the string PostgreSQL delivered.
    pub payload: String,
    /// The sending backend's pid.
    pub pid: i64,
    /// The daemon's generation when it received it.
    pub generation: u64,
    /// Per channel and lineage: 1, 2, 3, ... A skip means notifications were missed.
    pub seq: u64,
}

/// A refused request (`fatal` false) or why the daemon is about to close (`fatal` true).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReply {
    pub code: String,
    pub message: String,
    pub channel: Option<String>,
    pub fatal: bool,
}

/// A JSON-compatible document (the daemon's status).
pub type Document = serde_json::Map<String, serde_json::Value>;

/// What the daemon sends a client.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerMessage {
    Hello(Hello),
    Notification(Notification),
    /// The daemon (re)connected to PostgreSQL and LISTENs on every channel again.
    Generation {
        generation: u64,
    },
    /// A subscription is confirmed; `seq` is the channel's last seq so far.
    Subscribed {
        channel: String,
        seq: u64,
    },
    Unsubscribed {
        channel: String,
    },
    Error(ErrorReply),
    StatusReply {
        status: Document,
    },
    /// The daemon closes this connection (`shutdown`, or `reload`: re-attach at once).
    Goodbye {
        reason: String,
    },
    /// The answer to `Reload`: the successor (`pid`, running pgbusd `version`) serves.
    Reloaded {
        pid: i64,
        version: String,
    },
}

impl ServerMessage {
    /// The message's tag, as on the wire.
    pub fn tag(&self) -> &'static str {
        match self {
            ServerMessage::Hello(_) => "hello",
            ServerMessage::Notification(_) => "notify",
            ServerMessage::Generation { .. } => "gen",
            ServerMessage::Subscribed { .. } => "subscribed",
            ServerMessage::Unsubscribed { .. } => "unsubscribed",
            ServerMessage::Error(_) => "error",
            ServerMessage::StatusReply { .. } => "status",
            ServerMessage::Goodbye { .. } => "bye",
            ServerMessage::Reloaded { .. } => "reloaded",
        }
    }
}

/// What a client sends the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage {
    /// The first message: protocol version, the client's pid, a name shown in the status.
    Attach {
        version: u64,
        pid: i64,
        name: String,
    },
    /// `after`: resume: the last seq the client holds on the channel.
    Subscribe {
        channel: String,
        after: Option<u64>,
    },
    Unsubscribe {
        channel: String,
    },
    StatusRequest,
    /// An operator's request: hand the daemon over to a successor process.
    Reload {
        environment: Option<HashMap<String, String>>,
    },
}

impl ClientMessage {
    pub fn tag(&self) -> &'static str {
        match self {
            ClientMessage::Attach { .. } => "attach",
            ClientMessage::Subscribe { .. } => "subscribe",
            ClientMessage::Unsubscribe { .. } => "unsubscribe",
            ClientMessage::StatusRequest => "status?",
            ClientMessage::Reload { .. } => "reload",
        }
    }
}

// -- encoding -------------------------------------------------------------------------------------

impl Serialize for ServerMessage {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ServerMessage::Hello(h) => {
                let mut t = s.serialize_tuple(7)?;
                t.serialize_element("hello")?;
                t.serialize_element(&h.version)?;
                t.serialize_element(&h.daemon_id)?;
                t.serialize_element(&h.generation)?;
                t.serialize_element(&h.channels)?;
                t.serialize_element(&h.max_frame)?;
                t.serialize_element(&h.patterns)?;
                t.end()
            }
            ServerMessage::Notification(n) => {
                let mut t = s.serialize_tuple(6)?;
                t.serialize_element("notify")?;
                t.serialize_element(&n.channel)?;
                t.serialize_element(&n.payload)?;
                t.serialize_element(&n.pid)?;
                t.serialize_element(&n.generation)?;
                t.serialize_element(&n.seq)?;
                t.end()
            }
            ServerMessage::Generation { generation } => {
                let mut t = s.serialize_tuple(2)?;
                t.serialize_element("gen")?;
                t.serialize_element(generation)?;
                t.end()
            }
            ServerMessage::Subscribed { channel, seq } => {
                let mut t = s.serialize_tuple(3)?;
                t.serialize_element("subscribed")?;
                t.serialize_element(channel)?;
                t.serialize_element(seq)?;
                t.end()
            }
            ServerMessage::Unsubscribed { channel } => {
                let mut t = s.serialize_tuple(2)?;
                t.serialize_element("unsubscribed")?;
                t.serialize_element(channel)?;
                t.end()
            }
            ServerMessage::Error(e) => {
                let mut t = s.serialize_tuple(5)?;
                t.serialize_element("error")?;
                t.serialize_element(&e.code)?;
                t.serialize_element(&e.message)?;
                t.serialize_element(&e.channel)?;
                t.serialize_element(&e.fatal)?;
                t.end()
            }
            ServerMessage::StatusReply { status } => {
                let mut t = s.serialize_tuple(2)?;
                t.serialize_element("status")?;
                t.serialize_element(status)?;
                t.end()
            }
            ServerMessage::Goodbye { reason } => {
                let mut t = s.serialize_tuple(2)?;
                t.serialize_element("bye")?;
                t.serialize_element(reason)?;
                t.end()
            }
            ServerMessage::Reloaded { pid, version } => {
                let mut t = s.serialize_tuple(3)?;
                t.serialize_element("reloaded")?;
                t.serialize_element(pid)?;
                t.serialize_element(version)?;
                t.end()
            }
        }
    }
}

impl Serialize for ClientMessage {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ClientMessage::Attach { version, pid, name } => {
                let mut t = s.serialize_tuple(4)?;
                t.serialize_element("attach")?;
                t.serialize_element(version)?;
                t.serialize_element(pid)?;
                t.serialize_element(name)?;
                t.end()
            }
            ClientMessage::Subscribe { channel, after } => {
                let mut t = s.serialize_tuple(3)?;
                t.serialize_element("subscribe")?;
                t.serialize_element(channel)?;
                t.serialize_element(after)?;
                t.end()
            }
            ClientMessage::Unsubscribe { channel } => {
                let mut t = s.serialize_tuple(2)?;
                t.serialize_element("unsubscribe")?;
                t.serialize_element(channel)?;
                t.end()
            }
            ClientMessage::StatusRequest => {
                let mut t = s.serialize_tuple(1)?;
                t.serialize_element("status?")?;
                t.end()
            }
            ClientMessage::Reload { environment } => {
                let mut t = s.serialize_tuple(2)?;
                t.serialize_element("reload")?;
                t.serialize_element(environment)?;
                t.end()
            }
        }
    }
}

/// Append one frame holding `messages` to `out` (length prefix, array header, items).
pub fn encode_frame_into<M: Serialize>(out: &mut Vec<u8>, messages: &[M]) {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_SIZE]);
    // Writing msgpack into a Vec cannot fail, and every message serialises.
    rmp_serde::encode::write(out, messages).expect("a message always encodes");
    let size = (out.len() - start - HEADER_SIZE) as u32;
    out[start..start + HEADER_SIZE].copy_from_slice(&size.to_be_bytes());
}

/// One frame holding `messages`.
pub fn encode_frame<M: Serialize>(messages: &[M]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame_into(&mut out, messages);
    out
}

// -- decoding -------------------------------------------------------------------------------------

/// A string field: a msgpack string only (a binary is refused, as by the Python decoder).
struct Str(String);

impl<'de> Deserialize<'de> for Str {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Str;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Str, E> {
                Ok(Str(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Str, E> {
                Ok(Str(v))
            }
        }
        d.deserialize_str(V)
    }
}

/// A list of strings.
struct StrList(Vec<String>);

impl<'de> Deserialize<'de> for StrList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let items: Vec<Str> = Deserialize::deserialize(d)?;
        Ok(StrList(items.into_iter().map(|s| s.0).collect()))
    }
}

/// An optional string (nil or a string).
struct OptStr(Option<String>);

impl<'de> Deserialize<'de> for OptStr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v: Option<Str> = Deserialize::deserialize(d)?;
        Ok(OptStr(v.map(|s| s.0)))
    }
}

/// A map of strings to strings.
struct StrMap(HashMap<String, String>);

impl<'de> Deserialize<'de> for StrMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StrMap;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of strings")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<StrMap, A::Error> {
                let mut out = HashMap::new();
                while let Some((k, v)) = map.next_entry::<Str, Str>()? {
                    out.insert(k.0, v.0);
                }
                Ok(StrMap(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// The fields of one message, in order, after its tag.
struct Fields<'a, A> {
    seq: A,
    tag: &'a str,
    read: usize,
}

impl<'de, 'a, A: SeqAccess<'de>> Fields<'a, A> {
    /// The next field; missing is an error.
    fn field<T: Deserialize<'de>>(&mut self, name: &str) -> Result<T, A::Error> {
        self.read += 1;
        match self.seq.next_element()? {
            Some(v) => Ok(v),
            None => Err(de::Error::custom(format_args!(
                "message {:?}: missing field {:?} (field {})",
                self.tag, name, self.read
            ))),
        }
    }

    /// The next field, or `default` when the message ends before it.
    fn optional<T: Deserialize<'de>>(&mut self, default: T) -> Result<T, A::Error> {
        Ok(self.seq.next_element()?.unwrap_or(default))
    }

    /// Skip the trailing fields this side does not know.
    fn finish(mut self) -> Result<(), A::Error> {
        while self.seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }
}

/// The tag of a message.
fn read_tag<'de, A: SeqAccess<'de>>(seq: &mut A) -> Result<String, A::Error> {
    match seq.next_element::<Str>()? {
        Some(t) => Ok(t.0),
        None => Err(de::Error::custom("a message with no tag")),
    }
}

impl<'de> Deserialize<'de> for ServerMessage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ServerMessage;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a daemon message (an array whose first element is its tag)")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ServerMessage, A::Error> {
                let tag = read_tag(&mut seq)?;
                let mut f = Fields {
                    seq,
                    tag: &tag,
                    read: 0,
                };
                let msg = match tag.as_str() {
                    "hello" => ServerMessage::Hello(Hello {
                        version: f.field("version")?,
                        daemon_id: f.field::<Str>("daemon_id")?.0,
                        generation: f.field("generation")?,
                        channels: f.field::<StrList>("channels")?.0,
                        max_frame: f.field("max_frame")?,
                        patterns: f.optional(StrList(Vec::new()))?.0,
                    }),
                    "notify" => ServerMessage::Notification(Notification {
                        channel: f.field::<Str>("channel")?.0,
                        payload: f.field::<Str>("payload")?.0,
                        pid: f.field("pid")?,
                        generation: f.field("generation")?,
                        seq: f.field("seq")?,
                    }),
                    "gen" => ServerMessage::Generation {
                        generation: f.field("generation")?,
                    },
                    "subscribed" => ServerMessage::Subscribed {
                        channel: f.field::<Str>("channel")?.0,
                        seq: f.field("seq")?,
                    },
                    "unsubscribed" => ServerMessage::Unsubscribed {
                        channel: f.field::<Str>("channel")?.0,
                    },
                    "error" => ServerMessage::Error(ErrorReply {
                        code: f.field::<Str>("code")?.0,
                        message: f.field::<Str>("message")?.0,
                        channel: f.optional(OptStr(None))?.0,
                        fatal: f.optional(false)?,
                    }),
                    "status" => ServerMessage::StatusReply {
                        status: f.field("status")?,
                    },
                    "bye" => ServerMessage::Goodbye {
                        reason: f.field::<Str>("reason")?.0,
                    },
                    "reloaded" => ServerMessage::Reloaded {
                        pid: f.field("pid")?,
                        version: f.field::<Str>("version")?.0,
                    },
                    other => {
                        return Err(de::Error::custom(format_args!(
                            "unknown message type {:?}",
                            other
                        )))
                    }
                };
                f.finish()?;
                Ok(msg)
            }
        }
        d.deserialize_seq(V)
    }
}

impl<'de> Deserialize<'de> for ClientMessage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ClientMessage;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a client message (an array whose first element is its tag)")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ClientMessage, A::Error> {
                let tag = read_tag(&mut seq)?;
                let mut f = Fields {
                    seq,
                    tag: &tag,
                    read: 0,
                };
                let msg = match tag.as_str() {
                    "attach" => ClientMessage::Attach {
                        version: f.field("version")?,
                        pid: f.field("pid")?,
                        name: f.optional(Str(String::new()))?.0,
                    },
                    "subscribe" => ClientMessage::Subscribe {
                        channel: f.field::<Str>("channel")?.0,
                        after: f.optional(None)?,
                    },
                    "unsubscribe" => ClientMessage::Unsubscribe {
                        channel: f.field::<Str>("channel")?.0,
                    },
                    "status?" => ClientMessage::StatusRequest,
                    "reload" => ClientMessage::Reload {
                        environment: f.optional::<Option<StrMap>>(None)?.map(|m| m.0),
                    },
                    other => {
                        return Err(de::Error::custom(format_args!(
                            "unknown message type {:?}",
                            other
                        )))
                    }
                };
                f.finish()?;
                Ok(msg)
            }
        }
        d.deserialize_seq(V)
    }
}

/// The body of a frame: a non-empty array of messages.
struct Batch<M>(Vec<M>);

impl<'de, M: Deserialize<'de>> Deserialize<'de> for Batch<M> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<M>(std::marker::PhantomData<M>);
        impl<'de, M: Deserialize<'de>> Visitor<'de> for V<M> {
            type Value = Batch<M>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array of messages")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Batch<M>, A::Error> {
                // The claimed count is the peer's word: never reserve more than the body holds
                // (a message takes at least two bytes).
                let hint = seq.size_hint().unwrap_or(0).min(MAX_SERVER_FRAME / 2);
                let mut out = Vec::with_capacity(hint.min(4096));
                while let Some(m) = seq.next_element::<M>()? {
                    out.push(m);
                }
                Ok(Batch(out))
            }
        }
        d.deserialize_seq(V(std::marker::PhantomData))
    }
}

/// Decode one frame body (without its length prefix) into its messages.
pub fn decode_body<M: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<Vec<M>, ProtocolError> {
    let mut de = rmp_serde::Deserializer::from_read_ref(body);
    de.set_max_depth(MAX_DEPTH);
    let batch = Batch::<M>::deserialize(&mut de)
        .map_err(|e| ProtocolError::new(format!("malformed frame: {}", e)))?;
    if value_end(body) != Some(body.len()) {
        return Err(ProtocolError::new(
            "malformed frame: bytes after the array of messages",
        ));
    }
    if batch.0.is_empty() {
        return Err(ProtocolError::new("frame holds no message"));
    }
    Ok(batch.0)
}

/// Where the msgpack value at the start of `data` ends (None: it does not end within `data`).
/// Iterative: no recursion and no allocation, whatever the counts claim.
fn value_end(data: &[u8]) -> Option<usize> {
    let mut pending: u64 = 1;
    let mut pos = 0usize;
    let be = |at: usize, n: usize| -> Option<u64> {
        let bytes = data.get(at..at + n)?;
        Some(bytes.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    };
    while pending > 0 {
        let marker = *data.get(pos)?;
        pending -= 1;
        pos += 1;
        let skip: u64 = match marker {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => 0,
            0x80..=0x8f => {
                pending += 2 * u64::from(marker & 0x0f);
                0
            }
            0x90..=0x9f => {
                pending += u64::from(marker & 0x0f);
                0
            }
            0xa0..=0xbf => u64::from(marker & 0x1f),
            0xc1 => return None,
            0xc4 | 0xd9 => 1 + be(pos, 1)?,
            0xc5 | 0xda => 2 + be(pos, 2)?,
            0xc6 | 0xdb => 4 + be(pos, 4)?,
            0xc7 => 2 + be(pos, 1)?,
            0xc8 => 3 + be(pos, 2)?,
            0xc9 => 5 + be(pos, 4)?,
            0xca => 4,
            0xcb => 8,
            0xcc | 0xd0 => 1,
            0xcd | 0xd1 => 2,
            0xce | 0xd2 => 4,
            0xcf | 0xd3 => 8,
            0xd4 => 2,
            0xd5 => 3,
            0xd6 => 5,
            0xd7 => 9,
            0xd8 => 17,
            0xdc => {
                pending += be(pos, 2)?;
                2
            }
            0xdd => {
                pending += be(pos, 4)?;
                4
            }
            0xde => {
                pending += 2 * be(pos, 2)?;
                2
            }
            0xdf => {
                pending += 2 * be(pos, 4)?;
                4
            }
        };
        pos = pos.checked_add(usize::try_from(skip).ok()?)?;
        if pos > data.len() {
            return None;
        }
    }
    Some(pos)
}

/// Incremental frame parser: give it bytes, get back complete messages.
///
/// Only the part of a frame still under way is buffered: the buffered bytes never exceed one
/// maximal frame plus the last input. A length prefix over the limit, or of zero, is an error
/// before any of its body is kept. After an error the stream is unusable.
pub struct FrameDecoder<M> {
    max_frame: usize,
    buf: Vec<u8>,
    _kind: std::marker::PhantomData<fn() -> M>,
}

impl<M: for<'de> Deserialize<'de>> FrameDecoder<M> {
    pub fn new(max_frame: usize) -> Self {
        FrameDecoder {
            max_frame,
            buf: Vec::new(),
            _kind: std::marker::PhantomData,
        }
    }

    /// Bytes received that are not yet part of a complete frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Decode `data` after whatever was buffered; appends the messages it completes to `out`.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<M>) -> Result<(), ProtocolError> {
        let mut data = data;
        if !self.buf.is_empty() {
            // Complete the frame under way: its header, then (checked) its body.
            if self.buf.len() < HEADER_SIZE {
                let take = (HEADER_SIZE - self.buf.len()).min(data.len());
                self.buf.extend_from_slice(&data[..take]);
                data = &data[take..];
                if self.buf.len() < HEADER_SIZE {
                    return Ok(());
                }
            }
            let need = HEADER_SIZE + self.frame_size()?;
            let take = (need - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() < need {
                return Ok(());
            }
            let decoded = decode_body::<M>(&self.buf[HEADER_SIZE..]);
            self.buf.clear();
            out.extend(decoded?);
        }
        let used = self.parse(data, out)?;
        self.buf.extend_from_slice(&data[used..]);
        if self.buf.len() >= HEADER_SIZE {
            self.frame_size()?;
        }
        Ok(())
    }

    /// The checked size of the frame whose header is buffered.
    fn frame_size(&self) -> Result<usize, ProtocolError> {
        let size =
            u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        self.check(size)?;
        Ok(size)
    }

    fn check(&self, size: usize) -> Result<(), ProtocolError> {
        if size > self.max_frame {
            return Err(ProtocolError::with_code(
                E_FRAME_TOO_LARGE,
                format!(
                    "frame of {} bytes exceeds the limit of {}",
                    size, self.max_frame
                ),
            ));
        }
        if size == 0 {
            return Err(ProtocolError::new("empty frame"));
        }
        Ok(())
    }

    /// Decode the complete frames at the start of `data`; returns the bytes they take.
    fn parse(&self, data: &[u8], out: &mut Vec<M>) -> Result<usize, ProtocolError> {
        let mut pos = 0;
        while data.len() - pos >= HEADER_SIZE {
            let size = u32::from_be_bytes([data[pos], data[pos + 1], data[pos + 2], data[pos + 3]])
                as usize;
            self.check(size)?;
            let stop = pos + HEADER_SIZE + size;
            if stop > data.len() {
                break;
            }
            out.extend(decode_body::<M>(&data[pos + HEADER_SIZE..stop])?);
            pos = stop;
        }
        Ok(pos)
    }
}

/// The decoder a client uses for what the daemon sends.
pub fn server_decoder() -> FrameDecoder<ServerMessage> {
    FrameDecoder::new(MAX_SERVER_FRAME)
}

/// The decoder a daemon uses for what a client sends.
pub fn client_decoder() -> FrameDecoder<ClientMessage> {
    FrameDecoder::new(MAX_CLIENT_FRAME)
}

/// `Ok(())` if PostgreSQL can LISTEN on `name` exactly as written: 1 to 63 bytes, no NUL.
pub fn validate_channel(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("channel name is empty".into());
    }
    if name.contains('\0') {
        return Err(format!("channel name {:?} contains a NUL byte", name));
    }
    if name.len() > MAX_CHANNEL_BYTES {
        return Err(format!(
            "channel name {:?} is {} bytes long; PostgreSQL allows at most {}",
            name,
            name.len(),
            MAX_CHANNEL_BYTES
        ));
    }
    Ok(())
}
