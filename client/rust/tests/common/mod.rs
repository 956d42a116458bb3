//! What the tests against the real daemon share: a pgbusd subprocess from the repository's
//! .venv (`make install` makes it), psql for NOTIFY and faults, polling with a deadline.

#![allow(dead_code)]

use std::future::Future;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgbus::{Options, PgNotifyBus};
use tokio::sync::{broadcast, watch};

/// Short intervals so fault tests finish quickly (as tests/conftest.py's FAST).
const FAST: &[&str] = &[
    "--health-interval",
    "0.5",
    "--health-timeout",
    "1",
    "--connect-timeout",
    "2",
    "--backoff-initial",
    "0.05",
    "--backoff-max",
    "0.5",
    "--shutdown-timeout",
    "2",
    "--log-format",
    "json",
];

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

pub fn venv_bin(name: &str) -> PathBuf {
    let path = repo().join(".venv/bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: run `make install` first",
        path.display()
    );
    path
}

pub fn dsn() -> String {
    std::env::var("PGBUSD_TEST_DSN")
        .unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432/test".into())
}

/// A channel name no other test (or engineer) uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{}_{}_{:x}_{}",
        prefix,
        std::process::id(),
        nanos,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Run SQL through psql (autocommit; a DO block may COMMIT between notifications).
pub fn psql(sql: &str) -> String {
    let out = Command::new("psql")
        .args([dsn().as_str(), "-v", "ON_ERROR_STOP=1", "-qAtX", "-c", sql])
        .output()
        .expect("psql runs");
    assert!(
        out.status.success(),
        "psql {:?}: {}",
        sql,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `psql` in the background (a load), waited for with `.wait()`.
pub fn psql_background(sql: &str) -> Child {
    Command::new("psql")
        .args([dsn().as_str(), "-v", "ON_ERROR_STOP=1", "-qAtX", "-c", sql])
        .stdout(Stdio::null())
        .spawn()
        .expect("psql runs")
}

pub fn notify(channel: &str, payload: &str) {
    psql(&format!(
        "SELECT pg_notify('{}', '{}')",
        channel,
        payload.replace('\'', "''")
    ));
}

/// A private directory with a short path (a Unix socket path has at most 108 bytes).
pub struct Workdir(pub PathBuf);

impl Workdir {
    pub fn new() -> Self {
        let path = PathBuf::from(format!("/tmp/pgbrs-{}", unique("w")));
        std::fs::create_dir_all(&path).expect("workdir");
        Workdir(path)
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A pgbusd subprocess in its own process group (so that kill() also ends a reload's
/// successors, and nothing else).
pub struct Daemon {
    pub socket: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    args: Vec<String>,
}

impl Daemon {
    pub fn start(dir: &Path, channels: &[&str], extra: &[&str]) -> Daemon {
        let mut args: Vec<String> = vec!["--dsn".into(), dsn()];
        for ch in channels {
            args.push("--channel".into());
            args.push((*ch).to_owned());
        }
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let mut d = Daemon {
            socket: dir.join("pgbusd.sock"),
            log: dir.join("daemon.log"),
            child: None,
            args,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let child = Command::new(venv_bin("pgbusd"))
            .arg("--socket")
            .arg(&self.socket)
            .args(FAST)
            .args(&self.args)
            .env_remove("PGBUSD_SOCKET")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("pgbusd starts");
        self.child = Some(child);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("started").id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL to every process of the daemon (its reload successors included).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
        }
    }

    /// A new daemon process on the same socket, same arguments (a new lineage).
    pub fn restart(&mut self, args: Option<Vec<String>>) {
        self.kill();
        if let Some(args) = args {
            self.args = args;
        }
        self.spawn();
    }

    /// `pgbusctl reload` (exit 0 once the successor serves).
    pub fn reload(&self) {
        let out = Command::new(venv_bin("pgbusctl"))
            .arg("--socket")
            .arg(&self.socket)
            .arg("reload")
            .output()
            .expect("pgbusctl runs");
        assert!(
            out.status.success(),
            "reload: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Wait until the daemon serves and listens on PostgreSQL; its status then.
    pub async fn wait_listening(&self) -> serde_json::Map<String, serde_json::Value> {
        let probe = Bus::start(&self.socket, &[]);
        let status = wait_until(Duration::from_secs(20), "the daemon listening", || async {
            match probe.bus.status().await {
                Ok(st) if st["postgres"]["connected"] == true => Some(st),
                _ => None,
            }
        })
        .await;
        probe.stop().await;
        status
    }

    /// The pid of the daemon's PostgreSQL backend.
    pub async fn backend_pid(&self) -> i64 {
        self.wait_listening().await["postgres"]["backend_pid"]
            .as_i64()
            .expect("backend pid")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A bus running in the background, stopped by `stop()` (or when dropped).
pub struct Bus {
    pub bus: Arc<PgNotifyBus>,
    shutdown: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Bus {
    pub fn start(socket: &Path, channels: &[&str]) -> Bus {
        Bus::with_options(socket, channels, fast_options())
    }

    pub fn with_options(socket: &Path, channels: &[&str], options: Options) -> Bus {
        let bus = Arc::new(PgNotifyBus::with_options(socket, channels, options));
        let (shutdown, rx) = watch::channel(false);
        let task = tokio::spawn({
            let bus = bus.clone();
            async move { bus.run(rx).await }
        });
        Bus {
            bus,
            shutdown,
            task: Some(task),
        }
    }

    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        let task = self.task.take().expect("running");
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("run() returns on shutdown")
            .expect("run() does not panic");
    }

    pub async fn wait_attached(&self) {
        let bus = self.bus.clone();
        wait_until(Duration::from_secs(20), "the bus attached", || {
            let attached = bus.is_attached();
            async move {
                if attached {
                    Some(())
                } else {
                    None
                }
            }
        })
        .await
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

pub fn fast_options() -> Options {
    Options {
        reconnect_initial: Duration::from_millis(20),
        reconnect_max: Duration::from_millis(200),
        attach_timeout: Duration::from_secs(5),
        sweep_interval: Duration::from_millis(100),
        ..Options::default()
    }
}

/// Poll `check` until it gives Some, or fail after `limit`.
pub async fn wait_until<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {:?} waiting for {}",
            limit,
            what
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The next payload, within a deadline.
pub async fn recv(rx: &mut broadcast::Receiver<String>) -> String {
    tokio::time::timeout(Duration::from_secs(15), rx.recv())
        .await
        .expect("a payload in time")
        .expect("a payload")
}

/// Wait until the generation watch reads `want`.
pub async fn wait_generation(rx: &mut watch::Receiver<u64>, want: u64) {
    let deadline = Duration::from_secs(20);
    tokio::time::timeout(deadline, async {
        while *rx.borrow_and_update() != want {
            rx.changed().await.expect("the bus lives");
        }
    })
    .await
    .unwrap_or_else(|_| panic!("generation {} not reached (at {})", want, *rx.borrow()));
}
