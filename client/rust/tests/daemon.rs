//! PgNotifyBus against the real pgbusd (from the repository's .venv) and the local PostgreSQL:
//! forge_runtime's seven tests of the seed, then the faults a worker lives through.

mod common;

use std::time::Duration;

use common::*;
use pgbus::Error;
use serde::Deserialize;

// -- the seed's seven tests ------------------------------------------------------------------------

#[tokio::test]
async fn subscribe_returns_receiver_for_registered_channel() {
    let dir = Workdir::new();
    let (a, b) = (unique("forge_changes"), unique("forge_jobs"));
    let daemon = Daemon::start(&dir.0, &[&a, &b], &[]);
    daemon.wait_listening().await;
    let bus = Bus::start(&daemon.socket, &[&a, &b]);
    let mut rx_a = bus.bus.subscribe(&a).expect("registered");
    let mut rx_b = bus.bus.subscribe(&b).expect("registered");
    bus.wait_attached().await;
    notify(&a, "to a");
    notify(&b, "to b");
    assert_eq!(recv(&mut rx_a).await, "to a");
    assert_eq!(recv(&mut rx_b).await, "to b");
    bus.stop().await;
}

#[tokio::test]
async fn subscribe_returns_none_for_unknown_channel() {
    let dir = Workdir::new();
    let daemon = Daemon::start(&dir.0, &[&unique("forge_changes")], &[]);
    daemon.wait_listening().await;
    let bus = Bus::start(&daemon.socket, &["forge_changes"]);
    assert!(bus.bus.subscribe("forge_nonexistent").is_none());
    bus.wait_attached().await;
    assert_eq!(
        bus.bus
            .subscribe_dynamic("forge_nonexistent")
            .await
            .unwrap_err(),
        Error::UnknownChannel("forge_nonexistent".into()),
        "a channel the daemon does not relay"
    );
    bus.stop().await;
}

#[tokio::test]
async fn channels_returns_all_registered_names() {
    let bus = pgbus::PgNotifyBus::new(
        "/nonexistent/pgbusd.sock",
        &[
            "forge_changes",
            "forge_jobs_available",
            "forge_workflow_wakeup",
        ],
    );
    let mut names = bus.channels();
    names.sort();
    assert_eq!(
        names,
        vec![
            "forge_changes",
            "forge_jobs_available",
            "forge_workflow_wakeup"
        ]
    );
}

#[tokio::test]
async fn fan_out_delivers_to_all_subscribers() {
    let dir = Workdir::new();
    let ch = unique("fan");
    let daemon = Daemon::start(&dir.0, &[&ch], &[]);
    daemon.wait_listening().await;
    let one = Bus::start(&daemon.socket, &[&ch]);
    let two = Bus::start(&daemon.socket, &[&ch]);
    let mut rx1 = one.bus.subscribe(&ch).unwrap();
    let mut rx2 = one.bus.subscribe(&ch).unwrap();
    let mut rx3 = two.bus.subscribe(&ch).unwrap();
    one.wait_attached().await;
    two.wait_attached().await;
    notify(&ch, "hello");
    for rx in [&mut rx1, &mut rx2, &mut rx3] {
        assert_eq!(recv(rx).await, "hello");
    }
    one.stop().await;
    two.stop().await;
}

#[tokio::test]
async fn send_without_subscribers_does_not_error() {
    let dir = Workdir::new();
    let ch = unique("orphan");
    let daemon = Daemon::start(&dir.0, &[&ch], &[]);
    daemon.wait_listening().await;
    let bus = Bus::start(&daemon.socket, &[&ch]);
    bus.wait_attached().await;
    notify(&ch, "orphan");
    let probe = bus.bus.clone();
    let ch2 = ch.clone();
    wait_until(
        Duration::from_secs(10),
        "the daemon relayed the orphan",
        || {
            let probe = probe.clone();
            let ch = ch2.clone();
            async move {
                let st = probe.status().await.ok()?;
                (st["channels"][&ch]["received"].as_u64()? >= 1).then(|| ())
            }
        },
    )
    .await;
    let mut rx = bus.bus.subscribe(&ch).unwrap();
    notify(&ch, "after");
    assert_eq!(recv(&mut rx).await, "after");
    bus.stop().await;
}

#[tokio::test]
async fn empty_channels_list_produces_empty_bus() {
    let dir = Workdir::new();
    let daemon = Daemon::start(&dir.0, &[], &[]);
    daemon.wait_listening().await;
    let bus = Bus::start(&daemon.socket, &[]);
    assert!(bus.bus.channels().is_empty());
    assert!(bus.bus.subscribe("anything").is_none());
    let mut gen = bus.bus.subscribe_reconnects();
    wait_generation(&mut gen, 1).await;
    bus.stop().await;
}

#[tokio::test]
async fn reconnect_subscriber_starts_at_zero_and_observes_ticks() {
    let dir = Workdir::new();
    let ch = unique("ticks");
    // The bus starts before the daemon: nothing attached yet.
    let bus = Bus::start(&dir.0.join("pgbusd.sock"), &[&ch]);
    let mut gen = bus.bus.subscribe_reconnects();
    assert_eq!(*gen.borrow(), 0, "a fresh bus is at generation 0");
    let daemon = Daemon::start(&dir.0, &[&ch], &[]);
    wait_generation(&mut gen, 1).await;
    let pid = daemon.backend_pid().await;
    psql(&format!("SELECT pg_terminate_backend({})", pid));
    wait_generation(&mut gen, 2).await;
    bus.stop().await;
}

// -- faults ------------------------------------------------------------------------------------------

/// After a NOTIFY round trip, the generation reads `want` and has not moved since it was read.
async fn settled(
    bus: &Bus,
    rx: &mut tokio::sync::broadcast::Receiver<String>,
    ch: &str,
    gen: &mut tokio::sync::watch::Receiver<u64>,
    want: u64,
) {
    let marker = unique("marker");
    notify(ch, &marker);
    loop {
        if recv(rx).await == marker {
            break;
        }
    }
    assert_eq!(*gen.borrow_and_update(), want);
    assert!(!gen.has_changed().unwrap(), "no further step");
    assert!(bus.bus.is_attached());
}

#[tokio::test]
async fn a_terminated_backend_is_exactly_one_step() {
    let dir = Workdir::new();
    let ch = unique("term");
    let daemon = Daemon::start(&dir.0, &[&ch], &[]);
    let pid = daemon.backend_pid().await;
    let bus = Bus::start(&daemon.socket, &[&ch]);
    let mut rx = bus.bus.subscribe(&ch).unwrap();
    let mut gen = bus.bus.subscribe_reconnects();
    wait_generation(&mut gen, 1).await;
    psql(&format!("SELECT pg_terminate_backend({})", pid));
    wait_generation(&mut gen, 2).await;
    settled(&bus, &mut rx, &ch, &mut gen, 2).await;
    bus.stop().await;
}

#[tokio::test]
async fn a_killed_daemon_is_one_step_once_its_successor_listens() {
    let dir = Workdir::new();
    let ch = unique("kill");
    let mut daemon = Daemon::start(&dir.0, &[&ch], &[]);
    daemon.wait_listening().await;
    let bus = Bus::start(&daemon.socket, &[&ch]);
    let mut rx = bus.bus.subscribe(&ch).unwrap();
    let mut gen = bus.bus.subscribe_reconnects();
    wait_generation(&mut gen, 1).await;
    daemon.restart(None); // SIGKILL, then a new process: a new lineage
    wait_generation(&mut gen, 2).await;
    settled(&bus, &mut rx, &ch, &mut gen, 2).await;
    bus.stop().await;
}

#[tokio::test]
async fn a_reload_under_load_moves_nothing_loses_nothing_and_repeats_nothing() {
    let dir = Workdir::new();
    let ch = unique("reload");
    let daemon = Daemon::start(&dir.0, &[&ch], &[]);
    daemon.wait_listening().await;
    let options = pgbus::Options {
        buffer: 1 << 16,
        ..fast_options()
    };
    let bus = Bus::with_options(&daemon.socket, &[&ch], options);
    let mut rx = bus.bus.subscribe(&ch).unwrap();
    let mut gen = bus.bus.subscribe_reconnects();
    wait_generation(&mut gen, 1).await;
    const N: u32 = 3000;
    // One notification per transaction, about 1,000 a second, while the daemon hands over.
    let mut load = psql_background(&format!(
        "DO $$ BEGIN FOR i IN 1..{} LOOP PERFORM pg_notify('{}', i::text); COMMIT; \
         PERFORM pg_sleep(0.001); END LOOP; END $$",
        N, ch
    ));
    assert_eq!(recv(&mut rx).await, "1", "the load runs");
    daemon.reload();
    for i in 2..=N {
        assert_eq!(recv(&mut rx).await, i.to_string(), "in order, each once");
    }
    assert!(load.wait().unwrap().success());
    settled(&bus, &mut rx, &ch, &mut gen, 1).await;
    assert!(rx.try_recv().is_err(), "nothing twice");
    bus.stop().await;
}

/// A worker process (the crate's pgbus-listen), its JSON lines read by a thread.
struct Worker {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<serde_json::Value>,
}

impl Worker {
    fn start(socket: &std::path::Path, args: &[&str]) -> Worker {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pgbus-listen"))
            .arg(socket)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("pgbus-listen starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx
                    .send(serde_json::from_str(&line).expect("a JSON line"))
                    .is_err()
                {
                    return;
                }
            }
        });
        Worker { child, lines }
    }

    fn next(&self) -> serde_json::Value {
        self.lines
            .recv_timeout(Duration::from_secs(30))
            .expect("a line from the worker in time")
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.id().to_string();
        assert!(std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success());
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn a_subscriber_stalled_past_the_write_budget_resumes_from_the_replay_buffer() {
    let dir = Workdir::new();
    let ch = unique("stall");
    // A budget of 2 MiB: more than one frame (1 MiB), so the catch-up can go through it.
    let daemon = Daemon::start(&dir.0, &[&ch], &["--write-budget", "2097152"]);
    daemon.wait_listening().await;
    let worker = Worker::start(&daemon.socket, &["--buffer", "65536", &ch]);
    assert_eq!(worker.next()["event"], "ready");
    worker.signal("-STOP");
    // 5,000 payloads of 1 KiB: past the budget and the socket's buffer (half the budget),
    // well within the 16 MiB replay buffer.
    const N: u32 = 5000;
    psql(&format!(
        "SELECT pg_notify('{}', lpad(i::text, 1024, '0')) FROM generate_series(1, {}) i",
        ch, N
    ));
    let probe = Bus::start(&daemon.socket, &[]);
    wait_until(
        Duration::from_secs(20),
        "the stalled worker cut",
        || async {
            let st = probe.bus.status().await.ok()?;
            (st["totals"]["clients_cut_slow"].as_u64()? >= 1).then(|| ())
        },
    )
    .await;
    worker.signal("-CONT");
    for i in 1..=N {
        let ev = worker.next();
        assert_eq!(ev["event"], "payload", "a resume moves nothing: {}", ev);
        assert_eq!(
            ev["payload"].as_str().unwrap().trim_start_matches('0'),
            i.to_string()
        );
    }
    probe.stop().await;
}

#[tokio::test]
async fn a_channel_of_a_pattern_is_subscribed_on_demand_with_typed_payloads() {
    #[derive(Debug, Deserialize, PartialEq)]
    struct Job {
        id: u64,
        queue: String,
    }
    let dir = Workdir::new();
    let prefix = unique("dyn");
    let daemon = Daemon::start(
        &dir.0,
        &[],
        &["--channel-pattern", &format!("{}_*", prefix)],
    );
    daemon.wait_listening().await;
    let bus = Bus::start(&daemon.socket, &[]);
    let ch = format!("{}_jobs", prefix);
    let mut jobs = bus
        .bus
        .subscribe_dynamic_as::<Job>(&ch)
        .await
        .expect("allowed by the pattern");
    notify(&ch, r#"{"id": 7, "queue": "mail"}"#);
    notify(&ch, "not json");
    notify(&ch, r#"{"id": 8, "queue": "sms"}"#);
    let limit = Duration::from_secs(10);
    let first = tokio::time::timeout(limit, jobs.recv()).await.unwrap();
    assert_eq!(
        first.unwrap(),
        Job {
            id: 7,
            queue: "mail".into()
        }
    );
    match tokio::time::timeout(limit, jobs.recv()).await.unwrap() {
        Err(pgbus::TypedRecvError::Decode { payload, .. }) => assert_eq!(payload, "not json"),
        other => panic!("{:?}", other),
    }
    let third = tokio::time::timeout(limit, jobs.recv()).await.unwrap();
    assert_eq!(
        third.unwrap(),
        Job {
            id: 8,
            queue: "sms".into()
        }
    );
    let st = bus.bus.status().await.expect("status");
    assert!(
        st["channels"].get(&ch).is_some(),
        "the daemon listens on it: {:?}",
        st["channels"]
    );
    bus.stop().await;
}

#[tokio::test]
async fn a_channel_refused_on_reattach_closes_its_receivers() {
    let dir = Workdir::new();
    let (kept, dropped) = (unique("kept"), unique("dropped"));
    let mut daemon = Daemon::start(&dir.0, &[&kept, &dropped], &[]);
    daemon.wait_listening().await;
    let bus = Bus::start(&daemon.socket, &[&kept, &dropped]);
    let mut rx_kept = bus.bus.subscribe(&kept).unwrap();
    let mut rx_dropped = bus.bus.subscribe(&dropped).unwrap();
    let mut gen = bus.bus.subscribe_reconnects();
    wait_generation(&mut gen, 1).await;
    let args = vec![
        "--dsn".to_owned(),
        dsn(),
        "--channel".to_owned(),
        kept.clone(),
    ];
    daemon.restart(Some(args));
    let closed = tokio::time::timeout(Duration::from_secs(20), rx_dropped.recv())
        .await
        .expect("in time");
    assert_eq!(
        closed,
        Err(tokio::sync::broadcast::error::RecvError::Closed)
    );
    assert!(
        bus.bus.subscribe(&dropped).is_none(),
        "refused: no longer relayed"
    );
    wait_generation(&mut gen, 2).await;
    notify(&kept, "still here");
    assert_eq!(recv(&mut rx_kept).await, "still here");
    bus.stop().await;
}
