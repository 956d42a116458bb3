//! Channel name -> broadcast sender: where the engine's deliveries go.
//!
//! The tokio broadcast channel is this client's subscription queue: at most `buffer` payloads
//! wait for a receiver; one more drops the oldest and the receiver's next `recv()` returns
//! `RecvError::Lagged(n)`, then the oldest payload kept (the semantics the Python client copies).
//! tokio rounds a broadcast channel's capacity up to a power of two.

use std::collections::HashMap;

use tokio::sync::broadcast;

struct Route {
    tx: broadcast::Sender<String>,
    /// A channel given to the constructor: wanted for the bus's lifetime, receivers or not.
    pinned: bool,
}

/// The broadcast senders of a bus, by channel.
pub struct Router {
    routes: HashMap<String, Route>,
    buffer: usize,
}

impl Router {
    /// `buffer`: the capacity of each channel's broadcast queue.
    pub fn new(buffer: usize) -> Self {
        Router {
            routes: HashMap::new(),
            buffer: buffer.max(1),
        }
    }

    /// A channel wanted for the bus's lifetime (the constructor's channels).
    pub fn pin(&mut self, channel: &str) {
        let (tx, _) = broadcast::channel(self.buffer);
        self.routes
            .insert(channel.to_owned(), Route { tx, pinned: true });
    }

    /// A receiver of a pinned channel; None for a channel not pinned (or refused since).
    pub fn subscribe_pinned(&self, channel: &str) -> Option<broadcast::Receiver<String>> {
        self.routes
            .get(channel)
            .filter(|r| r.pinned)
            .map(|r| r.tx.subscribe())
    }

    /// A receiver of `channel`, its route made if need be (a channel on demand).
    pub fn subscribe(&mut self, channel: &str) -> broadcast::Receiver<String> {
        let buffer = self.buffer;
        let route = self.routes.entry(channel.to_owned()).or_insert_with(|| {
            let (tx, _) = broadcast::channel(buffer);
            Route { tx, pinned: false }
        });
        route.tx.subscribe()
    }

    /// Hand `payloads` (in order) to every receiver of `channel`. A payload nobody receives is
    /// not an error.
    pub fn deliver(&self, channel: &str, payloads: Vec<String>) {
        if let Some(route) = self.routes.get(channel) {
            for payload in payloads {
                let _ = route.tx.send(payload);
            }
        }
    }

    /// The daemon refused `channel`: its receivers close (their `recv()` returns `Closed` once
    /// the payloads they hold are taken).
    pub fn refuse(&mut self, channel: &str) {
        self.routes.remove(channel);
    }

    /// Channels on demand that no receiver holds any more; their routes are removed.
    pub fn take_unused(&mut self) -> Vec<String> {
        let unused: Vec<String> = self
            .routes
            .iter()
            .filter(|(_, r)| !r.pinned && r.tx.receiver_count() == 0)
            .map(|(c, _)| c.clone())
            .collect();
        for channel in &unused {
            self.routes.remove(channel);
        }
        unused
    }
}
