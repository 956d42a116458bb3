//! `pgbus-bench-worker SPEC`: one subscriber process of `make bench`, in Rust.
//!
//! It speaks bench.worker's line protocol (see bench/worker.py): SPEC is a JSON
//! `{"mode": "rust", "channels": [...], "connections": n, "socket": path}`; connection `i` is a
//! PgNotifyBus on `channels[i % len]`. It prints `{"event":"ready",...}`, then obeys commands on
//! stdin (`expect`, `count`, `quit`) and answers with events on stdout. A payload that starts
//! with 16 digits carries its send time in microseconds since the epoch; with `latency_out`
//! the worker writes each `receipt - send` (float64, native order) there once all arrived.

use std::io::{BufRead, Write};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use pgbus::{Options, PgNotifyBus};
use serde_json::{json, Value};
use tokio::sync::{broadcast, watch};

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn emit(v: Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", v);
    let _ = out.flush();
}

#[derive(Default)]
struct Tally {
    target: i64,
    count: i64,
    lagged: u64,
    first: f64,
    out: String,
    latencies: Option<Vec<f64>>,
}

impl Tally {
    fn add(&mut self, payloads: &[String]) {
        let t = now();
        if self.count == 0 {
            self.first = t;
        }
        let before = self.count;
        self.count += payloads.len() as i64;
        if let Some(lat) = self.latencies.as_mut() {
            for p in payloads {
                let sent = p.get(..16).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
                lat.push(t - sent as f64 * 1e-6);
            }
        }
        if before < self.target && self.target <= self.count {
            if let Some(lat) = self.latencies.take() {
                let bytes: Vec<u8> = lat.iter().flat_map(|x| x.to_ne_bytes()).collect();
                if let Err(e) = std::fs::write(&self.out, bytes) {
                    emit(json!({"event": "failed", "error": format!("{}: {}", self.out, e)}));
                }
            }
            emit(
                json!({"event": "done", "count": self.count, "first": self.first, "last": now(), "lagged": self.lagged}),
            );
        }
    }
}

fn main() {
    let spec: Value =
        serde_json::from_str(&std::env::args().nth(1).expect("SPEC")).expect("a JSON spec");
    let socket = spec["socket"].as_str().expect("socket").to_owned();
    let channels: Vec<String> = spec["channels"]
        .as_array()
        .expect("channels")
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    let connections = spec["connections"].as_u64().unwrap_or(1) as usize;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let tally = Arc::new(Mutex::new(Tally {
        target: -1,
        ..Tally::default()
    }));
    let (_stop, shutdown) = watch::channel(false);
    runtime.block_on(async {
        let mut buses = Vec::new();
        for i in 0..connections {
            let ch = channels[i % channels.len()].clone();
            let options = Options { name: format!("bench-rust-{}-{}", std::process::id(), i), buffer: 1 << 20, ..Options::default() };
            let bus = Arc::new(PgNotifyBus::with_options(&socket, &[ch.as_str()], options));
            tokio::spawn({
                let bus = bus.clone();
                let shutdown = shutdown.clone();
                async move { bus.run(shutdown).await }
            });
            let mut rx = bus.subscribe(&ch).expect("registered");
            let tally = tally.clone();
            tokio::spawn(async move {
                let mut batch = Vec::with_capacity(1024);
                loop {
                    match rx.recv().await {
                        Ok(p) => batch.push(p),
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            tally.lock().unwrap().lagged += n;
                            continue;
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                    // What else is waiting, in one go (as the Python worker's drain()).
                    while batch.len() < 4096 {
                        match rx.try_recv() {
                            Ok(p) => batch.push(p),
                            Err(_) => break,
                        }
                    }
                    tally.lock().unwrap().add(&batch);
                    batch.clear();
                }
            });
            let mut gen = bus.subscribe_reconnects();
            tokio::spawn(async move {
                // The first attach publishes the daemon's generation; any later move voids the run.
                while *gen.borrow_and_update() == 0 {
                    if gen.changed().await.is_err() {
                        return;
                    }
                }
                if gen.changed().await.is_ok() {
                    emit(json!({"event": "failed", "error": format!("connection {} moved to generation {}", i, *gen.borrow())}));
                }
            });
            buses.push(bus);
        }
        for bus in &buses {
            while !bus.is_attached() {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
        emit(json!({"event": "ready", "pid": std::process::id(), "backend_pids": []}));
        let (tx, mut commands) = tokio::sync::mpsc::unbounded_channel::<String>();
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                match line {
                    Ok(l) => {
                        if tx.send(l).is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        });
        while let Some(line) = commands.recv().await {
            let cmd: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
            match cmd["cmd"].as_str() {
                Some("expect") => {
                    let out = cmd["latency_out"].as_str().unwrap_or("").to_owned();
                    let mut t = tally.lock().unwrap();
                    *t = Tally { target: cmd["n"].as_i64().unwrap_or(0), latencies: (!out.is_empty()).then(Vec::new), out, ..Tally::default() };
                    emit(json!({"event": "armed"}));
                }
                Some("count") => {
                    let t = tally.lock().unwrap();
                    emit(json!({"event": "counted", "count": t.count, "lagged": t.lagged}));
                }
                _ => break,
            }
        }
    });
    std::process::exit(0);
}
