//! The tokio driver: one Unix socket to pgbusd, moved by the engine.

use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::{timeout, Instant};

use crate::engine::{Answer, DropCause, Engine, Event, RequestError, RequestId};
use crate::protocol::{validate_channel, Document};
use crate::router::Router;

/// Per-channel broadcast buffer size (as in forge_runtime's PgNotifyBus).
pub const CHANNEL_BUFFER_SIZE: usize = 256;

/// Bytes read from the socket at once.
const READ_SIZE: usize = 256 * 1024;

/// The settings of a bus; `Options::default()` is what [`PgNotifyBus::new`] uses.
#[derive(Debug, Clone)]
pub struct Options {
    /// Shown in the daemon's status (`pgbusctl status`).
    pub name: String,
    /// Each channel's broadcast capacity (tokio rounds it up to a power of two).
    pub buffer: usize,
    /// The first re-attach delay; it doubles up to `reconnect_max`, each drawn at random below
    /// its cap so that the workers of a restarted daemon do not come back in lockstep.
    pub reconnect_initial: Duration,
    pub reconnect_max: Duration,
    /// Bounds one attach (connect and handshake), a write, and the wait for the daemon's
    /// answer to `subscribe_dynamic` and `status`.
    pub attach_timeout: Duration,
    /// How often channels on demand that no receiver holds any more are unsubscribed.
    pub sweep_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            name: String::new(),
            buffer: CHANNEL_BUFFER_SIZE,
            reconnect_initial: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            attach_timeout: Duration::from_secs(10),
            sweep_interval: Duration::from_secs(1),
        }
    }
}

/// What a request to the daemon can fail with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The daemon neither registers the channel nor allows it by a `--channel-pattern`.
    UnknownChannel(String),
    /// Not a name PostgreSQL can LISTEN on exactly (1 to 63 bytes, no NUL).
    InvalidChannel(String),
    /// The daemon refused the request (`code`: `forbidden`, `too_many_channels`, ...).
    Refused { code: String, message: String },
    /// Not attached to the daemon (for `status`).
    NotAttached,
    /// The daemon did not answer within `attach_timeout` (or the bus is not running).
    Timeout,
    /// The connection ended before the answer came.
    Lost(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::UnknownChannel(ch) => write!(
                f,
                "channel {:?} is neither registered with pgbusd nor allowed by its channel patterns",
                ch
            ),
            Error::InvalidChannel(why) => f.write_str(why),
            Error::Refused { code, message } => write!(f, "pgbusd refused ({}): {}", code, message),
            Error::NotAttached => f.write_str("not attached to pgbusd"),
            Error::Timeout => f.write_str("pgbusd did not answer in time"),
            Error::Lost(why) => write!(f, "the connection to pgbusd ended: {}", why),
        }
    }
}

impl std::error::Error for Error {}

impl From<RequestError> for Error {
    fn from(e: RequestError) -> Self {
        match e {
            RequestError::UnknownChannel(ch) => Error::UnknownChannel(ch),
            RequestError::Refused { code, message } => Error::Refused { code, message },
            RequestError::NotAttached => Error::NotAttached,
            RequestError::Lost(why) => Error::Lost(why),
        }
    }
}

enum Command {
    Subscribe {
        channel: String,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    Status {
        reply: oneshot::Sender<Result<Document, Error>>,
    },
}

/// What `run()` keeps between its calls: the engine (so the generation never goes back) and
/// the receiving end of the requests.
struct Driver {
    engine: Engine,
    commands: mpsc::UnboundedReceiver<Command>,
}

type Subscribers = HashMap<String, Vec<oneshot::Sender<Result<(), Error>>>>;

/// A worker's connection to pgbusd: the API of forge_runtime's `PgNotifyBus`, over the daemon's
/// Unix socket instead of a PostgreSQL connection of its own.
///
/// Create one at startup with every channel, call [`run`](Self::run) in a background task, and
/// take receivers with [`subscribe`](Self::subscribe). The bus attaches to the daemon,
/// subscribes every channel, re-attaches with jittered capped backoff when the connection ends,
/// and publishes the reconnect generation ([`subscribe_reconnects`](Self::subscribe_reconnects)):
/// it moves exactly when notifications may have been missed, so a subscriber that resyncs from
/// the database when it moves misses nothing.
pub struct PgNotifyBus {
    path: PathBuf,
    options: Options,
    /// The constructor's channels (immutable: `channels()` borrows them).
    names: Vec<String>,
    router: Arc<Mutex<Router>>,
    reconnect_tx: watch::Sender<u64>,
    attached: AtomicBool,
    commands: mpsc::UnboundedSender<Command>,
    driver: Mutex<Option<Driver>>,
}

impl PgNotifyBus {
    /// A bus for `channels` of the daemon at `socket_path`, with the default [`Options`].
    ///
    /// Each channel gets a `broadcast::channel(256)`. Nothing is connected until
    /// [`run`](Self::run) is called.
    pub fn new(socket_path: impl AsRef<Path>, channels: &[&str]) -> Self {
        Self::with_options(socket_path, channels, Options::default())
    }

    /// [`new`](Self::new) with other settings.
    pub fn with_options(
        socket_path: impl AsRef<Path>,
        channels: &[&str],
        options: Options,
    ) -> Self {
        let mut router = Router::new(options.buffer);
        let mut engine = Engine::new(i64::from(std::process::id()), &options.name);
        let mut names = Vec::with_capacity(channels.len());
        for &ch in channels {
            if names.iter().any(|n| n == ch) {
                continue;
            }
            router.pin(ch);
            engine.register(ch);
            names.push(ch.to_owned());
        }
        // Generation 0: never attached (or the daemon never reached PostgreSQL).
        let (reconnect_tx, _) = watch::channel(0u64);
        let (tx, rx) = mpsc::unbounded_channel();
        PgNotifyBus {
            path: socket_path.as_ref().to_owned(),
            options,
            names,
            router: Arc::new(Mutex::new(router)),
            reconnect_tx,
            attached: AtomicBool::new(false),
            commands: tx,
            driver: Mutex::new(Some(Driver {
                engine,
                commands: rx,
            })),
        }
    }

    /// A receiver of `channel`'s payloads (the exact strings PostgreSQL delivered), or `None` if
    /// `channel` was not given to the constructor, or the daemon refused it.
    ///
    /// A receiver that falls more than the buffer behind gets `RecvError::Lagged(n)` (the `n`
    /// oldest payloads were dropped) and then the oldest payload kept. When the daemon refuses
    /// the channel on a re-attach (dropped from its configuration, an ACL tightened), the
    /// refusal is logged at error level and the receivers close (`RecvError::Closed`).
    pub fn subscribe(&self, channel: &str) -> Option<broadcast::Receiver<String>> {
        lock(&self.router).subscribe_pinned(channel)
    }

    /// [`subscribe`](Self::subscribe), each payload decoded from JSON into `T` on `recv()`.
    pub fn subscribe_as<T: DeserializeOwned>(&self, channel: &str) -> Option<TypedReceiver<T>> {
        self.subscribe(channel).map(TypedReceiver::new)
    }

    /// The channel names given to the constructor.
    pub fn channels(&self) -> Vec<&str> {
        self.names.iter().map(String::as_str).collect()
    }

    /// The reconnect generation: 0 until the daemon first reached PostgreSQL (and this bus
    /// attached), then moved forward, never back, after every event after which notifications
    /// may have been missed: the daemon reconnected to PostgreSQL, the daemon restarted, this
    /// bus re-attached and the daemon could not replay what it missed. It moves only once the
    /// relay listens again and every channel is re-subscribed, so a resync started when it
    /// moves cannot miss a notification committed after it. A reload of the daemon
    /// (`pgbusctl reload`) and a short stall that the daemon's replay buffer covers do not move it.
    ///
    /// Snapshot `*rx.borrow()`, then treat a change to a value strictly greater than the
    /// snapshot as "resync".
    pub fn subscribe_reconnects(&self) -> watch::Receiver<u64> {
        self.reconnect_tx.subscribe()
    }

    /// Whether the bus is attached to the daemon now (handshake done).
    pub fn is_attached(&self) -> bool {
        self.attached.load(Ordering::Acquire)
    }

    /// Subscribe to a channel the daemon relays on demand (one its `--channel-pattern` globs
    /// match), or to any channel it relays; returns once the daemon LISTENs on it, so a NOTIFY
    /// committed after this returned is delivered.
    ///
    /// Waits for the bus to attach if it is not attached (`run()` must be running), at most
    /// `attach_timeout` in all. The channel is unsubscribed once no receiver of it is left
    /// (checked every `sweep_interval`). Errors: [`Error::UnknownChannel`],
    /// [`Error::InvalidChannel`], [`Error::Refused`], [`Error::Timeout`].
    pub async fn subscribe_dynamic(
        &self,
        channel: &str,
    ) -> Result<broadcast::Receiver<String>, Error> {
        validate_channel(channel).map_err(Error::InvalidChannel)?;
        // The receiver first: it sees every payload delivered from the daemon's confirmation on.
        let rx = lock(&self.router).subscribe(channel);
        let (reply, answer) = oneshot::channel();
        let cmd = Command::Subscribe {
            channel: channel.to_owned(),
            reply,
        };
        self.ask(cmd, answer).await?;
        Ok(rx)
    }

    /// [`subscribe_dynamic`](Self::subscribe_dynamic), each payload decoded from JSON into `T`.
    pub async fn subscribe_dynamic_as<T: DeserializeOwned>(
        &self,
        channel: &str,
    ) -> Result<TypedReceiver<T>, Error> {
        self.subscribe_dynamic(channel)
            .await
            .map(TypedReceiver::new)
    }

    /// The daemon's status document (what `pgbusctl status --json` prints).
    pub async fn status(&self) -> Result<Document, Error> {
        let (reply, answer) = oneshot::channel();
        self.ask(Command::Status { reply }, answer).await
    }

    async fn ask<T>(
        &self,
        cmd: Command,
        answer: oneshot::Receiver<Result<T, Error>>,
    ) -> Result<T, Error> {
        if self.commands.send(cmd).is_err() {
            return Err(Error::Timeout);
        }
        match timeout(self.options.attach_timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) | Err(_) => Err(Error::Timeout),
        }
    }

    /// Attach, subscribe every channel, relay, re-attach when the connection ends; returns once
    /// `shutdown` is true. Spawn it as a background task. (A `shutdown` whose sender is dropped
    /// can never become true: the bus then runs until its task is aborted.)
    ///
    /// Called while another `run()` of this bus is running, it logs an error and returns.
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) {
        let mut driver = match lock(&self.driver).take() {
            Some(d) => d,
            None => {
                log::error!(
                    "pgbus: run() is already running for {}",
                    self.path.display()
                );
                return;
            }
        };
        let mut backoff = Backoff::new(self.options.reconnect_initial, self.options.reconnect_max);
        let mut shutdown_open = true;
        let mut deferred: Vec<Command> = Vec::new();
        let mut subscribers = Subscribers::new();
        loop {
            if *shutdown.borrow() {
                break;
            }
            let connected =
                timeout(self.options.attach_timeout, UnixStream::connect(&self.path)).await;
            match connected {
                Ok(Ok(stream)) => {
                    let mut link = Link {
                        bus: self,
                        engine: &mut driver.engine,
                        waiters: HashMap::new(),
                        subscribers: &mut subscribers,
                        deferred: &mut deferred,
                    };
                    let (ended, attached) = link
                        .serve(
                            stream,
                            &mut shutdown,
                            &mut shutdown_open,
                            &mut driver.commands,
                        )
                        .await;
                    self.attached.store(false, Ordering::Release);
                    if attached {
                        backoff.reset();
                    }
                    if ended == Ended::Shutdown {
                        break;
                    }
                }
                Ok(Err(e)) => log::warn!(
                    "pgbus: cannot reach pgbusd at {}: {}",
                    self.path.display(),
                    e
                ),
                Err(_) => log::warn!(
                    "pgbus: cannot reach pgbusd at {}: timed out",
                    self.path.display()
                ),
            }
            let delay = if driver.engine.take_retry_at_once() {
                Duration::ZERO
            } else {
                backoff.next_delay()
            };
            // While detached: a status is refused at once, a subscribe waits for the attach.
            let wake = Instant::now() + delay;
            loop {
                tokio::select! {
                    biased;
                    changed = shutdown.changed(), if shutdown_open => {
                        if changed.is_err() {
                            shutdown_open = false;
                        } else if *shutdown.borrow() {
                            break;
                        }
                    }
                    cmd = driver.commands.recv() => match cmd {
                        Some(Command::Status { reply }) => {
                            let _ = reply.send(Err(Error::NotAttached));
                        }
                        Some(cmd) => deferred.push(cmd),
                        None => {}
                    },
                    _ = tokio::time::sleep_until(wake) => break,
                }
            }
            if *shutdown.borrow() {
                break;
            }
        }
        for cmd in deferred.drain(..) {
            fail(cmd, Error::Lost("the bus shut down".into()));
        }
        for reply in subscribers.drain().flat_map(|(_, w)| w) {
            let _ = reply.send(Err(Error::Lost("the bus shut down".into())));
        }
        log::debug!("pgbus: shut down ({})", self.path.display());
        *lock(&self.driver) = Some(driver);
    }

    fn publish(&self, engine: &Engine) {
        self.publish_generation(engine.generation());
        self.attached.store(engine.attached(), Ordering::Release);
    }

    /// Publish `generation` if it moved on (it never goes back).
    fn publish_generation(&self, generation: u64) {
        self.reconnect_tx.send_if_modified(|g| {
            if *g < generation {
                *g = generation;
                true
            } else {
                false
            }
        });
    }
}

impl fmt::Debug for PgNotifyBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgNotifyBus")
            .field("path", &self.path)
            .field("channels", &self.names)
            .field("generation", &*self.reconnect_tx.borrow())
            .field("attached", &self.is_attached())
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Lost,
    Shutdown,
}

/// One connection's loop.
struct Link<'a> {
    bus: &'a PgNotifyBus,
    engine: &'a mut Engine,
    /// Status requests waiting for their answer.
    waiters: HashMap<RequestId, oneshot::Sender<Result<Document, Error>>>,
    /// `subscribe_dynamic` calls waiting for their channel's confirmation (on this connection
    /// or, if it ends first, on the next: the channel stays wanted).
    subscribers: &'a mut Subscribers,
    /// Subscribes that wait for the next attach.
    deferred: &'a mut Vec<Command>,
}

impl<'a> Link<'a> {
    /// Serve one connection until it ends; whether the handshake finished.
    async fn serve(
        &mut self,
        stream: UnixStream,
        shutdown: &mut watch::Receiver<bool>,
        shutdown_open: &mut bool,
        commands: &mut mpsc::UnboundedReceiver<Command>,
    ) -> (Ended, bool) {
        let options = &self.bus.options;
        let (mut rd, mut wr) = stream.into_split();
        self.engine.connect();
        let mut buf = vec![0u8; READ_SIZE];
        let deadline = Instant::now() + options.attach_timeout;
        let mut sweep = tokio::time::interval(options.sweep_interval);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut was_attached = false;
        let mut ended = Ended::Lost;
        while self.engine.connected() {
            let attached = self.engine.attached();
            tokio::select! {
                biased;
                changed = shutdown.changed(), if *shutdown_open => {
                    if changed.is_err() {
                        *shutdown_open = false;
                    } else if *shutdown.borrow() {
                        self.engine.lost("the bus shut down");
                        ended = Ended::Shutdown;
                    }
                }
                read = rd.read(&mut buf) => match read {
                    Ok(0) => self.engine.lost("daemon closed the connection"),
                    Ok(n) => self.engine.receive(&buf[..n]),
                    Err(e) => self.engine.lost(&e.to_string()),
                },
                cmd = commands.recv() => if let Some(cmd) = cmd {
                    if attached {
                        self.command(cmd);
                    } else if let Command::Status { reply } = cmd {
                        let _ = reply.send(Err(Error::NotAttached));
                    } else {
                        self.deferred.push(cmd);
                    }
                },
                _ = sweep.tick() => self.sweep(),
                _ = tokio::time::sleep_until(deadline), if !attached => {
                    log::warn!("pgbus: pgbusd at {} did not finish the handshake in time", self.bus.path.display());
                    self.engine.lost("the handshake timed out");
                }
            }
            was_attached |= self.handle_events();
            let out = self.engine.data_to_send();
            if !out.is_empty() && self.engine.connected() {
                match timeout(options.attach_timeout, wr.write_all(&out)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => self.engine.lost(&e.to_string()),
                    Err(_) => self.engine.lost("a write to pgbusd timed out"),
                }
                was_attached |= self.handle_events();
            }
        }
        (ended, was_attached)
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Subscribe { channel, reply } => match self.engine.subscribe(&channel) {
                Err(e) => {
                    let _ = reply.send(Err(e.into()));
                }
                Ok(_) => self.subscribers.entry(channel).or_default().push(reply),
            },
            Command::Status { reply } => match self.engine.status() {
                Err(e) => {
                    let _ = reply.send(Err(e.into()));
                }
                Ok(id) => {
                    self.waiters.insert(id, reply);
                }
            },
        }
    }

    /// Unsubscribe the channels on demand that no receiver holds any more.
    fn sweep(&mut self) {
        let unused = lock(&self.bus.router).take_unused();
        for channel in unused {
            self.engine.unsubscribe(&channel);
        }
    }

    /// Act on what the engine reported; whether it attached.
    fn handle_events(&mut self) -> bool {
        let mut attached = false;
        while let Some(event) = self.engine.poll_event() {
            match event {
                Event::Deliver {
                    channel,
                    payloads,
                    generation,
                } => {
                    self.bus.publish_generation(generation);
                    lock(&self.bus.router).deliver(&channel, payloads);
                }
                Event::Answered { id, answer } => {
                    if let Some(reply) = self.waiters.remove(&id) {
                        let _ = reply.send(match answer {
                            Answer::Status(doc) => Ok(doc),
                            Answer::Failed(e) => Err(e.into()),
                            other => Err(Error::Lost(format!("unexpected answer {:?}", other))),
                        });
                    }
                }
                Event::ChannelRefused {
                    channel,
                    code,
                    message,
                } => {
                    log::error!(
                        "pgbus: pgbusd refused channel {:?} ({}): {}; its receivers close",
                        channel,
                        code,
                        message
                    );
                    lock(&self.bus.router).refuse(&channel);
                    let error = if code == crate::protocol::E_UNKNOWN_CHANNEL {
                        Error::UnknownChannel(channel.clone())
                    } else {
                        Error::Refused { code, message }
                    };
                    for reply in self.subscribers.remove(&channel).unwrap_or_default() {
                        let _ = reply.send(Err(error.clone()));
                    }
                }
                Event::Attached => {
                    attached = true;
                    // The step (if any) before the payloads held during the handshake, which
                    // follow this event.
                    self.bus.publish(&*self.engine);
                    log::info!(
                        "pgbus: attached to pgbusd at {} (daemon {}, generation {})",
                        self.bus.path.display(),
                        self.engine.daemon_id(),
                        self.engine.generation()
                    );
                    for cmd in std::mem::take(self.deferred) {
                        self.command(cmd);
                    }
                }
                Event::Detached { reason } => {
                    log::warn!("pgbus: connection to pgbusd lost: {}", reason);
                }
                Event::Drop { cause } => match cause {
                    DropCause::Protocol(e) => log::error!("pgbus: dropping the connection: {}", e),
                    DropCause::Closed { code, message } => {
                        log::warn!(
                            "pgbus: pgbusd closes the connection ({}): {}",
                            code,
                            message
                        )
                    }
                },
            }
        }
        let engine = &*self.engine;
        self.subscribers.retain(|channel, waiters| {
            if engine.confirmed(channel) {
                for reply in waiters.drain(..) {
                    let _ = reply.send(Ok(()));
                }
                false
            } else {
                true
            }
        });
        self.bus.publish(engine);
        attached
    }
}

fn fail(cmd: Command, error: Error) {
    match cmd {
        Command::Subscribe { reply, .. } => {
            let _ = reply.send(Err(error));
        }
        Command::Status { reply } => {
            let _ = reply.send(Err(error));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding it cannot leave a Router or a Driver half-changed in a way that
    // matters more than stopping the bus would.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Exponential backoff with full jitter: a delay drawn from (0, min(max, initial * 2^n)].
struct Backoff {
    initial: Duration,
    maximum: Duration,
    failures: u32,
    rng: u64,
}

impl Backoff {
    fn new(initial: Duration, maximum: Duration) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ (u64::from(std::process::id()) << 32);
        Backoff {
            initial,
            maximum,
            failures: 0,
            rng: seed | 1,
        }
    }

    fn next_delay(&mut self) -> Duration {
        let base = self
            .initial
            .saturating_mul(1u32 << self.failures.min(20))
            .min(self.maximum);
        self.failures = self.failures.saturating_add(1);
        // xorshift64*: enough to spread the workers of one host.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = (self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64;
        base.mul_f64(1.0 - r)
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

/// A receiver whose payloads are decoded from JSON into `T` (by serde) on `recv()`.
pub struct TypedReceiver<T> {
    rx: broadcast::Receiver<String>,
    _type: PhantomData<fn() -> T>,
}

/// Why a [`TypedReceiver`] returned no value.
#[derive(Debug)]
pub enum TypedRecvError {
    /// The receiver fell behind: the `n` oldest payloads were dropped; resync.
    Lagged(u64),
    /// Nothing more will come (the bus is gone, or the daemon refused the channel).
    Closed,
    /// This payload did not decode into `T`; the next `recv()` goes on with the next one.
    Decode {
        payload: String,
        error: serde_json::Error,
    },
}

impl fmt::Display for TypedRecvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TypedRecvError::Lagged(n) => write!(f, "lagged: {} payloads dropped", n),
            TypedRecvError::Closed => f.write_str("the channel is closed"),
            TypedRecvError::Decode { payload, error } => {
                write!(f, "payload {:?} did not decode: {}", payload, error)
            }
        }
    }
}

impl std::error::Error for TypedRecvError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TypedRecvError::Decode { error, .. } => Some(error),
            _ => None,
        }
    }
}

impl<T: DeserializeOwned> TypedReceiver<T> {
    pub fn new(rx: broadcast::Receiver<String>) -> Self {
        TypedReceiver {
            rx,
            _type: PhantomData,
        }
    }

    /// The next payload, decoded.
    pub async fn recv(&mut self) -> Result<T, TypedRecvError> {
        match self.rx.recv().await {
            Ok(payload) => decode(payload),
            Err(broadcast::error::RecvError::Lagged(n)) => Err(TypedRecvError::Lagged(n)),
            Err(broadcast::error::RecvError::Closed) => Err(TypedRecvError::Closed),
        }
    }

    /// The next payload if one is waiting (`Ok(None)` if none is).
    pub fn try_recv(&mut self) -> Result<Option<T>, TypedRecvError> {
        match self.rx.try_recv() {
            Ok(payload) => decode(payload).map(Some),
            Err(broadcast::error::TryRecvError::Empty) => Ok(None),
            Err(broadcast::error::TryRecvError::Lagged(n)) => Err(TypedRecvError::Lagged(n)),
            Err(broadcast::error::TryRecvError::Closed) => Err(TypedRecvError::Closed),
        }
    }

    /// The raw receiver.
    pub fn into_inner(self) -> broadcast::Receiver<String> {
        self.rx
    }
}

fn decode<T: DeserializeOwned>(payload: String) -> Result<T, TypedRecvError> {
    match serde_json::from_str(&payload) {
        Ok(v) => Ok(v),
        Err(error) => Err(TypedRecvError::Decode { payload, error }),
    }
}
