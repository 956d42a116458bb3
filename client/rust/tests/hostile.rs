//! A daemon that sends hostile frames, on a real Unix socket: the bus drops the link with a
//! clean error (no panic, no allocation beyond one frame), re-attaches, and does not resume
//! from a daemon that broke the protocol.

mod common;

use std::time::Duration;

use common::{fast_options, Workdir};
use pgbus::protocol::{self as p, ClientMessage, Hello, ServerMessage};
use pgbus::PgNotifyBus;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

async fn send(conn: &mut UnixStream, msgs: &[ServerMessage]) {
    conn.write_all(&p::encode_frame(msgs)).await.expect("write");
}

/// Read client messages until `n` arrived.
async fn read(conn: &mut UnixStream, n: usize) -> Vec<ClientMessage> {
    let mut dec = p::client_decoder();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while out.len() < n {
        let got = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
            .await
            .expect("the client speaks in time")
            .expect("read");
        assert!(got > 0, "the client closed the connection");
        dec.feed(&buf[..got], &mut out)
            .expect("a valid client frame");
    }
    out
}

/// Whether the client closed the connection (EOF) within the deadline, reading what it sends.
async fn closed_by_client(conn: &mut UnixStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

fn hello() -> ServerMessage {
    ServerMessage::Hello(Hello {
        version: p::PROTOCOL_VERSION,
        daemon_id: "fake".into(),
        generation: 1,
        channels: vec!["a".into()],
        max_frame: 4096,
        patterns: vec![],
    })
}

/// Attach a bus to the fake daemon, break the link with `hostile`, and check the next attach.
async fn drops_and_starts_afresh(hostile: &[u8]) {
    let dir = Workdir::new();
    let path = dir.0.join("fake.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let bus = std::sync::Arc::new(PgNotifyBus::with_options(&path, &["a"], fast_options()));
    let (stop, shutdown) = watch::channel(false);
    let task = tokio::spawn({
        let bus = bus.clone();
        async move { bus.run(shutdown).await }
    });
    let mut gen = bus.subscribe_reconnects();
    let mut rx = bus.subscribe("a").unwrap();

    let (mut conn, _) = listener.accept().await.expect("accept");
    send(&mut conn, &[hello()]).await;
    let msgs = read(&mut conn, 2).await;
    assert_eq!(
        msgs[1],
        ClientMessage::Subscribe {
            channel: "a".into(),
            after: None
        }
    );
    send(
        &mut conn,
        &[ServerMessage::Subscribed {
            channel: "a".into(),
            seq: 5,
        }],
    )
    .await;
    let n = ServerMessage::Notification(p::Notification {
        channel: "a".into(),
        payload: "x".into(),
        pid: 1,
        generation: 1,
        seq: 6,
    });
    send(&mut conn, &[n]).await;
    assert_eq!(rx.recv().await.unwrap(), "x");
    assert_eq!(*gen.borrow_and_update(), 1);

    conn.write_all(hostile).await.expect("write");
    assert!(
        closed_by_client(&mut conn).await,
        "the bus drops the link at once"
    );

    // The same lineage and generation: a resume would be possible, but not from this daemon.
    let (mut conn, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .expect("the bus comes back")
        .expect("accept");
    send(&mut conn, &[hello()]).await;
    let msgs = read(&mut conn, 2).await;
    assert_eq!(
        msgs[1],
        ClientMessage::Subscribe {
            channel: "a".into(),
            after: None
        },
        "no resume"
    );
    send(
        &mut conn,
        &[ServerMessage::Subscribed {
            channel: "a".into(),
            seq: 9,
        }],
    )
    .await;
    tokio::time::timeout(Duration::from_secs(10), gen.changed())
        .await
        .expect("a step")
        .unwrap();
    assert_eq!(*gen.borrow(), 2, "one step");
    assert!(!task.is_finished(), "run() goes on");
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .expect("run() does not panic");
}

#[tokio::test]
async fn a_length_prefix_of_4_gib_drops_the_link_before_any_body_arrives() {
    drops_and_starts_afresh(&[0xff, 0xff, 0xff, 0xff]).await;
}

#[tokio::test]
async fn a_length_prefix_just_over_1_mib_drops_the_link() {
    drops_and_starts_afresh(&((p::MAX_SERVER_FRAME as u32 + 1).to_be_bytes())).await;
}

#[tokio::test]
async fn garbage_drops_the_link() {
    drops_and_starts_afresh(&[0, 0, 0, 8, 0xc1, 0xde, 0xad, 0xbe, 0xef, 0xc1, 0xc1, 0xc1]).await;
}

#[tokio::test]
async fn an_empty_frame_drops_the_link() {
    drops_and_starts_afresh(&[0, 0, 0, 0]).await;
}

#[tokio::test]
async fn a_string_claiming_4_gib_inside_a_frame_drops_the_link() {
    // A str32 header claiming 4 GiB inside a 12-byte frame: nothing is reserved for it.
    drops_and_starts_afresh(&[
        0, 0, 0, 12, 0x91, 0x92, 0xa3, b'b', b'y', b'e', 0xdb, 0xff, 0xff, 0xff, 0xff, b'x',
    ])
    .await;
}

#[test]
fn the_decoder_keeps_nothing_of_a_frame_it_refuses() {
    let mut dec = p::server_decoder();
    let mut out = Vec::new();
    let err = dec.feed(&[0xff, 0xff], &mut out).map(|_| dec.buffered());
    assert_eq!(err, Ok(2), "half a header waits");
    let err = dec.feed(&[0xff, 0xff, 1, 2, 3], &mut out).unwrap_err();
    assert_eq!(err.code, p::E_FRAME_TOO_LARGE);
    assert!(
        dec.buffered() <= p::HEADER_SIZE,
        "no body kept: {}",
        dec.buffered()
    );
}

#[test]
fn decoding_deep_nesting_is_an_error_even_on_a_small_stack() {
    // 100,000 nested arrays in a status: refused by depth, without overflowing a 1 MiB stack
    // (half what a tokio worker thread has), even in a debug build.
    let mut body = vec![0x91, 0x92, 0xa6];
    body.extend_from_slice(b"status");
    body.push(0x81);
    body.extend_from_slice(&[0xa1, b'k']);
    body.extend(std::iter::repeat(0x91).take(100_000));
    body.push(0xc0);
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    let result = std::thread::Builder::new()
        .stack_size(1024 * 1024)
        .spawn(move || {
            let mut out = Vec::new();
            p::server_decoder()
                .feed(&frame, &mut out)
                .map(|_| out.len())
        })
        .unwrap()
        .join()
        .expect("no stack overflow");
    assert_eq!(result.unwrap_err().code, p::E_PROTOCOL);
}
