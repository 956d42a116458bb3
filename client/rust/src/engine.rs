//! The client's protocol engine: every rule of the client side of the protocol, without I/O.
//!
//! The tokio driver ([`crate::PgNotifyBus`]) owns the socket and the waiting; this module decides
//! what every byte means, what to send and when, how the generation moves and which request a
//! reply answers, in the manner of h11 (and of the Python client's `pgbus._engine`, which follows
//! the same rules: both run the vectors of `client/conformance/`). Nothing here blocks, sleeps or
//! touches a socket. The driver:
//!
//! 1. calls [`Engine::connect`] when a socket to the daemon is connected,
//! 2. gives it what it reads ([`Engine::receive`]) and reports the socket's end ([`Engine::lost`]),
//! 3. after every call writes [`Engine::data_to_send`] and handles [`Engine::poll_event`] until it
//!    returns `None` (payloads to deliver, requests answered, channels refused, the link to drop),
//! 4. reads [`Engine::generation`] to publish it.
//!
//! # The generation
//!
//! - The first attach takes the daemon's generation (0 if it never reached PostgreSQL).
//! - A daemon tick moves it by the tick's delta (the daemon reconnected to PostgreSQL).
//! - A re-attach moves it by exactly one step, published at the end of the handshake (every
//!   re-subscription answered) if the daemon is at generation 1 or more, else at its first tick.
//! - Unless the re-attach *resumed*: the Hello names the same lineage (daemon id) at the same
//!   generation as the client last saw, every re-subscription sent with `after` (the last seq the
//!   client holds on a channel the daemon had confirmed) is answered `Subscribed(channel, after)`,
//!   no tick arrived during the handshake, and no gap is owed (below). Then nothing was lost.
//! - A step is *owed*, and the next attach cannot resume, once a gap is known that no published
//!   step has covered yet: a subscribe that returned without the daemon's confirmation (made while
//!   detached, or lost with its link), a resume the daemon could not cover, a tick during an
//!   unfinished handshake, a protocol error in a daemon frame (the next attach also sends no
//!   `after`: a client never livelocks on a daemon's error).
//! - A `seq` that skips on a channel within one attachment moves it by one at once.
//! - Notifications received during a handshake are held until it ends and delivered after its
//!   step: a subscriber learns of a gap before it sees anything that came after it.
//!
//! It never moves backwards.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::protocol::{
    self as p, ClientMessage, Document, ErrorReply, FrameDecoder, Hello, ProtocolError,
    ServerMessage,
};

/// Identifies one request of the application (a subscribe, a status, a reload).
pub type RequestId = u64;

/// What became of a subscribe call at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscribeOutcome {
    /// Asked; [`Event::Answered`] with this id tells the daemon's answer.
    Sent(RequestId),
    /// Already confirmed on this attachment: nothing to ask.
    Confirmed,
    /// Not attached: kept, and sent by the next attach (whose generation step covers the wait).
    Registered,
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// The daemon does not relay the channel (by its last Hello, or by its answer).
    UnknownChannel(String),
    /// The daemon refused the request (`code`: `forbidden`, `too_many_channels`, ...).
    Refused { code: String, message: String },
    /// Not attached to the daemon.
    NotAttached,
    /// The connection ended before the answer came.
    Lost(String),
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestError::UnknownChannel(ch) => write!(
                f,
                "channel {:?} is neither registered with the daemon nor allowed by its channel patterns",
                ch
            ),
            RequestError::Refused { code, message } => write!(f, "refused ({}): {}", code, message),
            RequestError::NotAttached => f.write_str("not attached to the daemon"),
            RequestError::Lost(why) => write!(f, "the connection to pgbusd ended: {}", why),
        }
    }
}

impl std::error::Error for RequestError {}

/// The answer to a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// A subscribe: confirmed (`seq`: the channel's last seq so far).
    Subscribed {
        seq: u64,
    },
    /// A subscribe whose connection ended first: kept, the next attach sends it.
    Kept,
    Status(Document),
    Reloaded {
        pid: i64,
        version: String,
    },
    Failed(RequestError),
}

/// What the driver must act on, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Payloads for the subscribers of `channel`, in the order PostgreSQL delivered them.
    /// `generation` is the generation they belong to: a driver publishes it before handing them
    /// on, so that a subscriber learns of a step before it sees what came after the gap.
    Deliver {
        channel: String,
        payloads: Vec<String>,
        generation: u64,
    },
    /// A request got its answer.
    Answered { id: RequestId, answer: Answer },
    /// The daemon refused `channel` (on re-attach, or on a first subscribe): its subscriptions
    /// end, loudly. The channel is no longer wanted.
    ChannelRefused {
        channel: String,
        code: String,
        message: String,
    },
    /// The handshake finished.
    Attached,
    /// The connection ended (`reason`); the engine is ready for the next one.
    Detached { reason: String },
    /// Close the socket now: the daemon broke the protocol, or said it closes this connection
    /// (a fatal `Error`). The engine already treats the connection as ended
    /// ([`Event::Detached`] follows).
    Drop { cause: DropCause },
}

/// Why the engine asks the driver to drop the link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DropCause {
    /// A protocol error in a daemon frame; the next attach starts afresh (no resume).
    Protocol(ProtocolError),
    /// The daemon's fatal `Error` (`code`, message): it closes the connection.
    Closed { code: String, message: String },
}

/// The reconnect generation, moved by what the attachments report.
#[derive(Debug, Default)]
struct Clock {
    generation: u64,
    /// The daemon's generation as last heard.
    daemon: u64,
    ever_attached: bool,
    /// A gap is known that no published step has covered yet.
    owed: bool,
    /// The last seq per channel the daemon confirmed (by `Subscribed`, then each notification).
    last_seq: HashMap<String, u64>,
}

impl Clock {
    fn advance(&mut self, step: u64) {
        if step > 0 {
            self.generation += step;
        }
    }

    /// One step, now (or at the daemon's first tick, while it is at generation 0).
    fn step(&mut self) {
        if self.daemon >= 1 {
            self.owed = false;
            self.advance(1);
        } else {
            self.owed = true;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Connected, waiting for Hello.
    Hello,
    /// Attach and every re-subscription sent, replies outstanding.
    Handshake,
    Attached,
}

#[derive(Debug)]
enum Pending {
    /// `handshake`: one of the re-subscriptions the Hello sent.
    Subscribe {
        id: Option<RequestId>,
        channel: String,
        after: Option<u64>,
        handshake: bool,
    },
    Unsubscribe {
        channel: String,
    },
    Status {
        id: RequestId,
    },
    Reload {
        id: RequestId,
    },
}

/// One connection to the daemon, from its connect to its end.
struct Attachment {
    state: State,
    decoder: FrameDecoder<ServerMessage>,
    pending: VecDeque<Pending>,
    /// Handshake re-subscriptions not yet answered.
    handshake: usize,
    /// Channels the daemon confirmed on this connection.
    subscribed: HashSet<String>,
    /// Subscribe requests in flight, by channel (concurrent subscribers share one).
    subscribing: HashMap<String, Option<RequestId>>,
    /// Whether this attach continues the last one without a gap, as far as known so far.
    resuming: bool,
    /// Why this connection ended, or must end.
    failure: Option<String>,
    /// Runs of notifications received during the handshake (channel, payloads, seqs),
    /// delivered when it ends, after the step it publishes (see `Engine::end` for one cut short).
    held: Vec<(String, Vec<String>, Vec<u64>)>,
}

/// The client's state across attachments, and the application's requests.
pub struct Engine {
    pid: i64,
    name: String,
    clock: Clock,
    daemon_id: String,
    channels: Vec<String>,
    patterns: Vec<String>,
    /// Channels wanted, in the order they were first wanted (re-subscribed in that order).
    wanted: Vec<String>,
    wanted_set: HashSet<String>,
    attach_count: u64,
    /// The last connection ended on a protocol error: the next attach sends no `after`.
    no_resume: bool,
    /// A reload's Goodbye: re-attach without a backoff delay.
    retry_at_once: bool,
    /// Subscribes whose connection ended before the answer, by channel: the next attach sends
    /// them afresh, and its answer answers them.
    carried: HashMap<String, RequestId>,
    att: Option<Attachment>,
    out: Vec<u8>,
    events: VecDeque<Event>,
    next_id: RequestId,
    messages: Vec<ServerMessage>,
}

impl Engine {
    pub fn new(pid: i64, name: &str) -> Self {
        Engine {
            pid,
            name: name.to_owned(),
            clock: Clock::default(),
            daemon_id: String::new(),
            channels: Vec::new(),
            patterns: Vec::new(),
            wanted: Vec::new(),
            wanted_set: HashSet::new(),
            attach_count: 0,
            no_resume: false,
            retry_at_once: false,
            carried: HashMap::new(),
            att: None,
            out: Vec::new(),
            events: VecDeque::new(),
            next_id: 1,
            messages: Vec::new(),
        }
    }

    // -- state ------------------------------------------------------------------------------------

    /// The reconnect generation to publish.
    pub fn generation(&self) -> u64 {
        self.clock.generation
    }

    /// Attached to a daemon, handshake finished.
    pub fn attached(&self) -> bool {
        matches!(
            self.att,
            Some(Attachment {
                state: State::Attached,
                ..
            })
        )
    }

    /// A connection is live (from its connect until its end).
    pub fn connected(&self) -> bool {
        self.att.is_some()
    }

    /// Handshakes completed so far.
    pub fn attach_count(&self) -> u64 {
        self.attach_count
    }

    /// The daemon id (lineage) of the last Hello.
    pub fn daemon_id(&self) -> &str {
        &self.daemon_id
    }

    /// The daemon's registered channels (by its last Hello).
    pub fn channels(&self) -> &[String] {
        &self.channels
    }

    /// The daemon's globs of channels it relays on demand (by its last Hello).
    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    /// Whether the daemon asked to be re-attached to at once (a reload's Goodbye).
    pub fn retry_at_once(&self) -> bool {
        self.retry_at_once
    }

    /// Whether the daemon asked to be re-attached to at once (a reload's Goodbye); reading it
    /// resets it.
    pub fn take_retry_at_once(&mut self) -> bool {
        std::mem::replace(&mut self.retry_at_once, false)
    }

    /// Whether `channel` is confirmed on the live attachment.
    pub fn confirmed(&self, channel: &str) -> bool {
        self.att
            .as_ref()
            .map_or(false, |a| a.subscribed.contains(channel))
    }

    /// Whether `channel` is wanted (subscribed, or to be subscribed by the next attach).
    pub fn wanted(&self, channel: &str) -> bool {
        self.wanted_set.contains(channel)
    }

    /// The bytes to write to the daemon now (empty when there are none).
    pub fn data_to_send(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// The next thing the driver must act on.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    // -- the connection ---------------------------------------------------------------------------

    /// A socket to the daemon is connected; the daemon speaks first.
    ///
    /// # Panics
    /// While another connection is live (a driver bug: one bus, one connection).
    pub fn connect(&mut self) {
        assert!(self.att.is_none(), "the previous connection has not ended");
        self.retry_at_once = false;
        self.att = Some(Attachment {
            state: State::Hello,
            decoder: p::server_decoder(),
            pending: VecDeque::new(),
            handshake: 0,
            subscribed: HashSet::new(),
            subscribing: HashMap::new(),
            resuming: false,
            failure: None,
            held: Vec::new(),
        });
    }

    /// Bytes read from the socket.
    pub fn receive(&mut self, data: &[u8]) {
        let mut messages = std::mem::take(&mut self.messages);
        let decoded = match self.att.as_mut() {
            None => return,
            Some(att) => att.decoder.feed(data, &mut messages),
        };
        // Handle what decoded before an error: it came first.
        let mut iter = messages.drain(..).peekable();
        while let Some(msg) = iter.next() {
            if self.att.is_none() {
                break;
            }
            let before_hello = matches!(
                self.att,
                Some(Attachment {
                    state: State::Hello,
                    ..
                })
            );
            if let ServerMessage::Notification(n) = msg {
                if before_hello {
                    self.drop_link(ProtocolError::new("expected hello, got notify"));
                    break;
                }
                // A run of notifications on one channel is one delivery.
                let channel = n.channel;
                let mut payloads = vec![n.payload];
                let mut seqs = vec![n.seq];
                while let Some(ServerMessage::Notification(next)) = iter.peek() {
                    if next.channel != channel {
                        break;
                    }
                    if let Some(ServerMessage::Notification(next)) = iter.next() {
                        payloads.push(next.payload);
                        seqs.push(next.seq);
                    }
                }
                self.deliver(channel, payloads, &seqs);
            } else {
                self.control(msg);
            }
        }
        drop(iter);
        self.messages = messages;
        if let Err(error) = decoded {
            if self.att.is_some() {
                self.drop_link(error);
            }
        }
    }

    /// The socket ended (EOF, reset, or the driver gave up on it).
    pub fn lost(&mut self, reason: &str) {
        if self.att.is_some() {
            self.end(reason.to_owned());
        }
    }

    // -- the application's requests ---------------------------------------------------------------

    /// Whether the daemon relays `channel` (by its last Hello): registered, or matched by one of
    /// its globs.
    pub fn relays(&self, channel: &str) -> bool {
        self.channels.iter().any(|c| c == channel)
            || self.patterns.iter().any(|g| glob_match(g, channel))
    }

    /// Want `channel` before any attach: the first handshake subscribes it (the constructor's
    /// channels). Not checked against the daemon's channels (the daemon answers).
    pub fn register(&mut self, channel: &str) {
        self.want(channel);
    }

    /// Subscribe to `channel`. Refused at once (UnknownChannel) for a channel the daemon does not
    /// relay by its last Hello. Concurrent subscribes to one channel share one request.
    pub fn subscribe(&mut self, channel: &str) -> Result<SubscribeOutcome, RequestError> {
        if self.attach_count > 0 && !self.relays(channel) {
            return Err(RequestError::UnknownChannel(channel.to_owned()));
        }
        self.want(channel);
        if let Some(&id) = self.carried.get(channel) {
            return Ok(SubscribeOutcome::Sent(id));
        }
        let state = self.att.as_ref().map(|a| a.state);
        match state {
            None | Some(State::Hello) => {
                // Returned without the daemon's confirmation: a step covers the wait.
                self.clock.owed = true;
                Ok(SubscribeOutcome::Registered)
            }
            Some(_) => {
                let att = self.att.as_mut().expect("connected");
                if let Some(inflight) = att.subscribing.get(channel) {
                    if let Some(id) = inflight {
                        return Ok(SubscribeOutcome::Sent(*id));
                    }
                    // A handshake re-subscription is in flight: ask to hear its answer.
                    let id = self.next_id;
                    self.next_id += 1;
                    att.subscribing.insert(channel.to_owned(), Some(id));
                    for p in att.pending.iter_mut() {
                        if let Pending::Subscribe {
                            id: slot @ None,
                            channel: c,
                            ..
                        } = p
                        {
                            if c == channel {
                                *slot = Some(id);
                                break;
                            }
                        }
                    }
                    return Ok(SubscribeOutcome::Sent(id));
                }
                if att.subscribed.contains(channel) {
                    return Ok(SubscribeOutcome::Confirmed);
                }
                let id = self.next_id;
                self.next_id += 1;
                self.request_subscribe(channel.to_owned(), None, Some(id), false);
                Ok(SubscribeOutcome::Sent(id))
            }
        }
    }

    /// Nobody wants `channel` any more: unsubscribe it, and forget its seq (a later subscribe
    /// starts afresh). A subscribe still in flight is undone when its answer arrives.
    pub fn unsubscribe(&mut self, channel: &str) {
        if !self.wanted_set.remove(channel) {
            return;
        }
        self.wanted.retain(|c| c != channel);
        self.clock.last_seq.remove(channel);
        self.carried.remove(channel);
        if let Some(att) = self.att.as_mut() {
            if att.subscribed.remove(channel) {
                att.pending.push_back(Pending::Unsubscribe {
                    channel: channel.to_owned(),
                });
                let msg = ClientMessage::Unsubscribe {
                    channel: channel.to_owned(),
                };
                p::encode_frame_into(&mut self.out, &[msg]);
            }
        }
    }

    /// Ask the daemon for its status document.
    pub fn status(&mut self) -> Result<RequestId, RequestError> {
        self.request(|id| (Pending::Status { id }, ClientMessage::StatusRequest))
    }

    /// Ask the daemon to hand over to a successor (an operator's request).
    pub fn reload(
        &mut self,
        environment: Option<HashMap<String, String>>,
    ) -> Result<RequestId, RequestError> {
        self.request(|id| {
            (
                Pending::Reload { id },
                ClientMessage::Reload { environment },
            )
        })
    }

    fn request(
        &mut self,
        make: impl FnOnce(RequestId) -> (Pending, ClientMessage),
    ) -> Result<RequestId, RequestError> {
        if !self.attached() {
            return Err(RequestError::NotAttached);
        }
        let id = self.next_id;
        self.next_id += 1;
        let (pending, msg) = make(id);
        self.att
            .as_mut()
            .expect("attached")
            .pending
            .push_back(pending);
        p::encode_frame_into(&mut self.out, &[msg]);
        Ok(id)
    }

    fn want(&mut self, channel: &str) {
        if self.wanted_set.insert(channel.to_owned()) {
            self.wanted.push(channel.to_owned());
        }
    }

    fn request_subscribe(
        &mut self,
        channel: String,
        after: Option<u64>,
        id: Option<RequestId>,
        handshake: bool,
    ) {
        let att = self.att.as_mut().expect("connected");
        att.subscribing.insert(channel.clone(), id);
        if handshake {
            att.handshake += 1;
        }
        let msg = ClientMessage::Subscribe {
            channel: channel.clone(),
            after,
        };
        att.pending.push_back(Pending::Subscribe {
            id,
            channel,
            after,
            handshake,
        });
        p::encode_frame_into(&mut self.out, &[msg]);
    }

    // -- what the daemon says ---------------------------------------------------------------------

    fn deliver(&mut self, channel: String, payloads: Vec<String>, seqs: &[u64]) {
        if let Some(att) = self.att.as_mut() {
            if att.state == State::Handshake {
                // A subscriber learns of a gap before it sees anything that came after it.
                att.held.push((channel, payloads, seqs.to_vec()));
                return;
            }
        }
        if let Some(last) = self.clock.last_seq.get_mut(&channel) {
            let mut gaps = 0;
            for &seq in seqs {
                if seq != last.wrapping_add(1) {
                    gaps += 1;
                }
                *last = seq;
            }
            self.clock.advance(gaps);
        }
        if self.wanted_set.contains(&channel) {
            let generation = self.clock.generation;
            self.events.push_back(Event::Deliver {
                channel,
                payloads,
                generation,
            });
        }
    }

    fn control(&mut self, msg: ServerMessage) {
        let state = self.att.as_ref().expect("connected").state;
        match msg {
            ServerMessage::Hello(hello) => self.on_hello(hello),
            ServerMessage::Error(_) | ServerMessage::Goodbye { .. } if state == State::Hello => {
                self.closing(msg)
            }
            _ if state == State::Hello => {
                self.drop_link(ProtocolError::new(format!(
                    "expected hello, got {}",
                    msg.tag()
                )));
            }
            ServerMessage::Generation { generation } => self.on_tick(generation),
            other => self.closing(other),
        }
    }

    /// A fatal Error, a Goodbye, or else a reply.
    fn closing(&mut self, msg: ServerMessage) {
        match msg {
            ServerMessage::Error(e) if e.fatal => {
                let why = format!("daemon closed the connection: {}", e.message);
                self.att.as_mut().expect("connected").failure = Some(why.clone());
                let cause = DropCause::Closed {
                    code: e.code,
                    message: e.message,
                };
                self.events.push_back(Event::Drop { cause });
                self.end(why);
            }
            ServerMessage::Goodbye { reason } => self.goodbye(reason),
            other => self.on_reply(other),
        }
    }

    fn goodbye(&mut self, reason: String) {
        self.retry_at_once = reason == p::E_RELOAD;
        if let Some(att) = self.att.as_mut() {
            att.failure = Some(format!("daemon said goodbye: {}", reason));
        }
    }

    fn on_hello(&mut self, hello: Hello) {
        let att = self.att.as_ref().expect("connected");
        if att.state != State::Hello {
            self.drop_link(ProtocolError::new("a second hello on one connection"));
            return;
        }
        if hello.version != p::PROTOCOL_VERSION {
            self.drop_link(ProtocolError::with_code(
                p::E_VERSION,
                format!(
                    "daemon speaks protocol {}, this client {}",
                    hello.version,
                    p::PROTOCOL_VERSION
                ),
            ));
            return;
        }
        // Resume (see the module docs): the same lineage at the same generation. Channels the
        // daemon had confirmed ask for what came after their last seq; the others start afresh.
        let same = self.attach_count > 0
            && !self.no_resume
            && !self.clock.owed
            && hello.daemon_id == self.daemon_id
            && hello.generation == self.clock.daemon;
        if !same {
            // What the client held belongs to a past it cannot continue: a re-attach owes its
            // step until a handshake publishes it (one cut off first passes it on).
            self.clock.last_seq.clear();
            if self.clock.ever_attached {
                self.clock.owed = true;
            }
        }
        self.no_resume = false;
        self.daemon_id = hello.daemon_id;
        self.channels = hello.channels;
        self.patterns = hello.patterns;
        self.clock.daemon = hello.generation;
        let pid = self.pid;
        let name = self.name.clone();
        {
            let att = self.att.as_mut().expect("connected");
            att.state = State::Handshake;
            att.resuming = same;
        }
        p::encode_frame_into(
            &mut self.out,
            &[ClientMessage::Attach {
                version: p::PROTOCOL_VERSION,
                pid,
                name,
            }],
        );
        let channels = self.wanted.clone();
        for channel in channels {
            let after = self.clock.last_seq.get(&channel).copied();
            let id = self.carried.remove(&channel);
            self.request_subscribe(channel, after, id, true);
        }
        self.maybe_attached();
    }

    fn on_tick(&mut self, generation: u64) {
        let clock = &mut self.clock;
        if generation <= clock.daemon {
            return;
        }
        let delta = generation - clock.daemon;
        clock.daemon = generation;
        let att = self.att.as_mut().expect("connected");
        if att.state == State::Handshake {
            // Published at the end of the handshake; whatever it was, this attach is no resume.
            att.resuming = false;
            if clock.ever_attached {
                clock.owed = true;
            }
            return;
        }
        if clock.owed {
            clock.owed = false;
            clock.advance(1);
        } else {
            clock.advance(delta);
        }
    }

    fn on_reply(&mut self, msg: ServerMessage) {
        let att = self.att.as_mut().expect("connected");
        let pending = match att.pending.front() {
            Some(p) => p,
            None => {
                let what = format!("unexpected {}: no request is waiting", msg.tag());
                self.drop_link(ProtocolError::new(what));
                return;
            }
        };
        let fits = match (pending, &msg) {
            (_, ServerMessage::Error(_)) => true,
            (Pending::Subscribe { channel, .. }, ServerMessage::Subscribed { channel: c, .. })
            | (Pending::Unsubscribe { channel }, ServerMessage::Unsubscribed { channel: c }) => {
                if c != channel {
                    let what = format!("reply for {:?}, expected {:?}", c, channel);
                    self.drop_link(ProtocolError::new(what));
                    return;
                }
                true
            }
            (Pending::Status { .. }, ServerMessage::StatusReply { .. })
            | (Pending::Reload { .. }, ServerMessage::Reloaded { .. }) => true,
            _ => false,
        };
        if !fits {
            let what = format!(
                "unexpected {} in reply to {}",
                msg.tag(),
                pending_tag(pending)
            );
            self.drop_link(ProtocolError::new(what));
            return;
        }
        let pending = att.pending.pop_front().expect("a pending request");
        self.settle(pending, msg);
        if self
            .att
            .as_ref()
            .map_or(false, |a| a.state == State::Handshake)
        {
            self.maybe_attached();
        }
    }

    fn settle(&mut self, pending: Pending, reply: ServerMessage) {
        match pending {
            Pending::Subscribe {
                id,
                channel,
                after,
                handshake,
            } => {
                let att = self.att.as_mut().expect("connected");
                if handshake {
                    att.handshake -= 1;
                }
                if att.subscribing.get(&channel) == Some(&id) {
                    att.subscribing.remove(&channel);
                }
                match reply {
                    ServerMessage::Error(e) => {
                        self.refused(&channel, &e);
                        if let Some(id) = id {
                            let answer = Answer::Failed(refusal(&channel, &e));
                            self.events.push_back(Event::Answered { id, answer });
                        }
                    }
                    ServerMessage::Subscribed { seq, .. } => {
                        if after.map_or(false, |after| seq != after) {
                            // The daemon no longer holds what came after: a gap.
                            att.resuming = false;
                            self.clock.owed = true;
                        }
                        if self.wanted_set.contains(&channel) {
                            self.clock.last_seq.insert(channel.clone(), seq);
                            att.subscribed.insert(channel.clone());
                        } else {
                            // Every subscriber gave up meanwhile.
                            att.pending.push_back(Pending::Unsubscribe {
                                channel: channel.clone(),
                            });
                            let msg = ClientMessage::Unsubscribe { channel };
                            p::encode_frame_into(&mut self.out, &[msg]);
                        }
                        if let Some(id) = id {
                            let answer = Answer::Subscribed { seq };
                            self.events.push_back(Event::Answered { id, answer });
                        }
                    }
                    _ => unreachable!("checked by on_reply"),
                }
            }
            Pending::Unsubscribe { .. } => {}
            Pending::Status { id } => {
                let answer = match reply {
                    ServerMessage::StatusReply { status } => Answer::Status(status),
                    ServerMessage::Error(e) => Answer::Failed(RequestError::Refused {
                        code: e.code,
                        message: e.message,
                    }),
                    _ => unreachable!("checked by on_reply"),
                };
                self.events.push_back(Event::Answered { id, answer });
            }
            Pending::Reload { id } => {
                let answer = match reply {
                    ServerMessage::Reloaded { pid, version } => Answer::Reloaded { pid, version },
                    ServerMessage::Error(e) => Answer::Failed(RequestError::Refused {
                        code: e.code,
                        message: e.message,
                    }),
                    _ => unreachable!("checked by on_reply"),
                };
                self.events.push_back(Event::Answered { id, answer });
            }
        }
    }

    fn maybe_attached(&mut self) {
        let att = self.att.as_mut().expect("connected");
        if att.handshake == 0 {
            att.state = State::Attached;
            let resumed = att.resuming;
            let held = std::mem::take(&mut att.held);
            self.attach_count += 1;
            let clock = &mut self.clock;
            if !clock.ever_attached {
                clock.ever_attached = true;
                clock.owed = false;
                let step = clock.daemon.saturating_sub(clock.generation);
                clock.advance(step);
            } else if !resumed || clock.owed {
                clock.step();
            }
            self.events.push_back(Event::Attached);
            for (channel, payloads, seqs) in held {
                self.deliver(channel, payloads, &seqs);
            }
        }
    }

    fn refused(&mut self, channel: &str, e: &ErrorReply) {
        if self.wanted_set.remove(channel) {
            self.wanted.retain(|c| c != channel);
        }
        self.clock.last_seq.remove(channel);
        self.carried.remove(channel);
        self.events.push_back(Event::ChannelRefused {
            channel: channel.to_owned(),
            code: e.code.clone(),
            message: e.message.clone(),
        });
    }

    // -- the end ----------------------------------------------------------------------------------

    /// The daemon broke the protocol: end now, tell the driver; the next attach starts afresh.
    fn drop_link(&mut self, error: ProtocolError) {
        self.no_resume = true;
        self.clock.last_seq.clear();
        if self.clock.ever_attached {
            self.clock.owed = true;
        }
        let reason = error.to_string();
        self.events.push_back(Event::Drop {
            cause: DropCause::Protocol(error),
        });
        self.end(reason);
    }

    fn end(&mut self, reason: String) {
        let att = match self.att.take() {
            Some(att) => att,
            None => return,
        };
        let reason = att.failure.clone().unwrap_or(reason);
        // What a handshake cut short held: delivered if it owes no step (a first attach, a
        // resume so far), dropped if it does (the step the next attach publishes covers it).
        let mut att = att;
        if !self.clock.owed {
            for (channel, payloads, seqs) in std::mem::take(&mut att.held) {
                self.deliver(channel, payloads, &seqs);
            }
        }
        // What was not written yet belongs to the dead connection.
        self.out.clear();
        for pending in att.pending {
            match pending {
                Pending::Subscribe {
                    id: Some(id),
                    channel,
                    ..
                } => {
                    let confirmed = self.clock.last_seq.contains_key(&channel);
                    if self.wanted_set.contains(&channel) && !confirmed {
                        // Never confirmed: the next attach sends it afresh and answers it.
                        self.carried.insert(channel, id);
                    } else {
                        // A re-subscription of a confirmed channel: the next attach sends it.
                        let answer = Answer::Kept;
                        self.events.push_back(Event::Answered { id, answer });
                    }
                }
                Pending::Status { id } | Pending::Reload { id } => {
                    let answer = Answer::Failed(RequestError::Lost(reason.clone()));
                    self.events.push_back(Event::Answered { id, answer });
                }
                Pending::Subscribe { id: None, .. } | Pending::Unsubscribe { .. } => {}
            }
        }
        self.events.push_back(Event::Detached { reason });
    }
}

fn pending_tag(p: &Pending) -> &'static str {
    match p {
        Pending::Subscribe { .. } => "subscribe",
        Pending::Unsubscribe { .. } => "unsubscribe",
        Pending::Status { .. } => "status?",
        Pending::Reload { .. } => "reload",
    }
}

/// The error a subscribe gets when the daemon refuses `channel`.
pub fn refusal(channel: &str, e: &ErrorReply) -> RequestError {
    if e.code == p::E_UNKNOWN_CHANNEL {
        RequestError::UnknownChannel(channel.to_owned())
    } else {
        RequestError::Refused {
            code: e.code.clone(),
            message: e.message.clone(),
        }
    }
}

/// Shell-style glob matching as the daemon does it (Python's `fnmatch.fnmatchcase`): `*`, `?`,
/// `[seq]`, `[!seq]`, exact case.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    glob_at(&p, &n)
}

fn glob_at(p: &[char], n: &[char]) -> bool {
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() {
            match p[pi] {
                '*' => {
                    star = Some((pi, ni));
                    pi += 1;
                    continue;
                }
                '?' => {
                    pi += 1;
                    ni += 1;
                    continue;
                }
                '[' => {
                    if let Some((matched, next)) = class_match(&p[pi..], n[ni]) {
                        if matched {
                            pi += next;
                            ni += 1;
                            continue;
                        }
                    } else if n[ni] == '[' {
                        pi += 1;
                        ni += 1;
                        continue;
                    }
                }
                c => {
                    if c == n[ni] {
                        pi += 1;
                        ni += 1;
                        continue;
                    }
                }
            }
        }
        match star {
            Some((sp, sn)) => {
                pi = sp + 1;
                ni = sn + 1;
                star = Some((sp, sn + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// A `[...]` class at the start of `p`: whether `c` matches, and its length; None when the
/// bracket is not closed (then it is a literal `[`, as in fnmatch).
fn class_match(p: &[char], c: char) -> Option<(bool, usize)> {
    let mut i = 1;
    let negate = i < p.len() && p[i] == '!';
    if negate {
        i += 1;
    }
    let start = i;
    let mut matched = false;
    while i < p.len() {
        if p[i] == ']' && i > start {
            return Some((matched != negate, i + 1));
        }
        if i + 2 < p.len() && p[i + 1] == '-' && p[i + 2] != ']' {
            if p[i] <= c && c <= p[i + 2] {
                matched = true;
            }
            i += 3;
        } else {
            if p[i] == c {
                matched = true;
            }
            i += 1;
        }
    }
    None
}
