//! `pgbus-listen SOCKET CHANNEL...`: print what a PgNotifyBus receives, one JSON object a line.
//!
//! A seed-style worker for tests and benchmarks: `{"event":"ready"}` once attached, then
//! `{"event":"payload","channel":c,"payload":p}`, `{"event":"generation","generation":g}`,
//! `{"event":"lagged","channel":c,"skipped":n}`. With `--count N` it prints only
//! `{"event":"done","received":N,"seconds":s}` once it received N payloads (timed from the first).
//! Channels matching `--dynamic` are subscribed with `subscribe_dynamic`.

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use pgbus::{Options, PgNotifyBus};
use serde_json::json;
use tokio::sync::{broadcast, mpsc, watch};

fn emit(line: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", line);
    let _ = out.flush();
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let socket = args
        .next()
        .expect("usage: pgbus-listen SOCKET [--count N] [--buffer N] CHANNEL...");
    let mut channels = Vec::new();
    let mut dynamic = Vec::new();
    let mut count: Option<u64> = None;
    let mut buffer = 256usize;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--count" => count = args.next().and_then(|n| n.parse().ok()),
            "--buffer" => buffer = args.next().and_then(|n| n.parse().ok()).unwrap_or(buffer),
            "--dynamic" => dynamic.extend(args.next()),
            _ => channels.push(arg),
        }
    }
    let names: Vec<&str> = channels.iter().map(String::as_str).collect();
    let options = Options {
        name: "pgbus-listen".into(),
        buffer,
        ..Options::default()
    };
    let bus = Arc::new(PgNotifyBus::with_options(&socket, &names, options));
    let (_shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn({
        let bus = bus.clone();
        async move { bus.run(shutdown_rx).await }
    });
    let (tx, mut rx) = mpsc::unbounded_channel::<(String, Result<String, u64>)>();
    let mut receivers: Vec<(String, broadcast::Receiver<String>)> = channels
        .iter()
        .map(|c| (c.clone(), bus.subscribe(c).expect("registered")))
        .collect();
    for c in &dynamic {
        match bus.subscribe_dynamic(c).await {
            Ok(r) => receivers.push((c.clone(), r)),
            Err(e) => {
                emit(json!({"event": "error", "channel": c, "error": e.to_string()}));
                std::process::exit(1);
            }
        }
    }
    for (channel, mut r) in receivers {
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                let item = match r.recv().await {
                    Ok(p) => Ok(p),
                    Err(broadcast::error::RecvError::Lagged(n)) => Err(n),
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if tx.send((channel.clone(), item)).is_err() {
                    return;
                }
            }
        });
    }
    let mut generations = bus.subscribe_reconnects();
    while !bus.is_attached() {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    emit(
        json!({"event": "ready", "generation": *generations.borrow_and_update(), "pid": std::process::id()}),
    );
    let mut received = 0u64;
    let mut started: Option<Instant> = None;
    loop {
        tokio::select! {
            changed = generations.changed() => {
                if changed.is_err() { return; }
                let g = *generations.borrow_and_update();
                emit(json!({"event": "generation", "generation": g}));
            }
            item = rx.recv() => match item {
                None => return,
                Some((channel, Ok(payload))) => {
                    match count {
                        None => emit(json!({"event": "payload", "channel": channel, "payload": payload})),
                        Some(n) => {
                            let start = *started.get_or_insert_with(Instant::now);
                            received += 1;
                            if received == n {
                                emit(json!({"event": "done", "received": n, "seconds": start.elapsed().as_secs_f64()}));
                                return;
                            }
                        }
                    }
                }
                Some((channel, Err(n))) => emit(json!({"event": "lagged", "channel": channel, "skipped": n})),
            }
        }
    }
}
