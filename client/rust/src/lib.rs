//! pgbus: the Rust client of pgbusd, the per-host PostgreSQL LISTEN/NOTIFY relay.
//!
//! [`PgNotifyBus`] has the API of forge_runtime's process-wide LISTEN multiplexer, so a worker
//! changes only its constructor: `PgNotifyBus::new("/run/pgbusd/pgbusd.sock", &["forge_changes"])`
//! instead of `PgNotifyBus::new(pool, &["forge_changes"])`. Instead of a PostgreSQL connection of
//! its own, the bus attaches to the host's pgbusd over a Unix socket.
//!
//! The crate is the Python client's design in Rust: [`engine`] holds every rule of the protocol
//! without I/O (bytes in, events and bytes out), the tokio driver in [`PgNotifyBus`] moves bytes
//! and wakes receivers, and both clients pass the language-neutral vectors of
//! `client/conformance/`. See docs/rust.md.

mod bus;
pub mod engine;
pub mod protocol;
pub mod router;

pub use bus::{Error, Options, PgNotifyBus, TypedReceiver, TypedRecvError, CHANNEL_BUFFER_SIZE};
pub use protocol::Document;
