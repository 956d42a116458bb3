//! Every vector of client/conformance/ against this crate's decoder, encoder and engine (the
//! Python client runs the same vectors: tests/test_conformance.py). The format is described in
//! client/conformance/README.md.

use std::collections::HashMap;
use std::path::PathBuf;

use pgbus::engine::{Answer, DropCause, Engine, Event, RequestError, SubscribeOutcome};
use pgbus::protocol::{self as p, ClientMessage, ServerMessage};
use pgbus::router::Router;
use serde_json::{json, Value};
use tokio::sync::broadcast::{self, error::TryRecvError};

fn vectors(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../conformance")
        .join(name);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {}", path.display(), e));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {}", path.display(), e))
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{:02x}", x)).collect()
}

fn as_json<M: serde::Serialize>(msgs: &[M]) -> Value {
    Value::Array(
        msgs.iter()
            .map(|m| serde_json::to_value(m).expect("to json"))
            .collect(),
    )
}

/// Decode `data` whole, or one byte at a time.
fn decode(side: &str, data: &[u8], bytewise: bool) -> Result<Value, p::ProtocolError> {
    fn run<M: serde::Serialize + for<'de> serde::Deserialize<'de>>(
        mut dec: p::FrameDecoder<M>,
        data: &[u8],
        bytewise: bool,
    ) -> Result<Value, p::ProtocolError> {
        let mut out = Vec::new();
        if bytewise {
            for b in data {
                dec.feed(std::slice::from_ref(b), &mut out)?;
            }
        } else {
            dec.feed(data, &mut out)?;
        }
        assert_eq!(dec.buffered(), 0, "bytes left over");
        Ok(as_json(&out))
    }
    match side {
        "server" => run(p::server_decoder(), data, bytewise),
        "client" => run(p::client_decoder(), data, bytewise),
        other => panic!("side {:?}", other),
    }
}

#[test]
fn every_frame_decodes_to_its_messages() {
    let doc = vectors("frames.json");
    for v in doc["decode"].as_array().unwrap() {
        for bytewise in [false, true] {
            let got = decode(
                v["side"].as_str().unwrap(),
                &unhex(v["hex"].as_str().unwrap()),
                bytewise,
            )
            .unwrap_or_else(|e| panic!("{}: {}", v["name"], e));
            assert_eq!(got, v["messages"], "{} (bytewise: {})", v["name"], bytewise);
        }
    }
}

#[test]
fn every_client_message_encodes_to_the_same_bytes() {
    let doc = vectors("frames.json");
    for v in doc["encode"].as_array().unwrap() {
        let msgs: Vec<ClientMessage> =
            serde_json::from_value(v["messages"].clone()).expect("messages");
        assert_eq!(
            hex(&p::encode_frame(&msgs)),
            v["hex"].as_str().unwrap(),
            "{}",
            v["name"]
        );
    }
}

#[test]
fn every_bad_frame_raises_its_error() {
    let doc = vectors("frames.json");
    for v in doc["reject"].as_array().unwrap() {
        for bytewise in [false, true] {
            match decode(
                v["side"].as_str().unwrap(),
                &unhex(v["hex"].as_str().unwrap()),
                bytewise,
            ) {
                Ok(msgs) => panic!("{}: decoded to {}", v["name"], msgs),
                Err(e) => assert_eq!(e.code, v["error"].as_str().unwrap(), "{}: {}", v["name"], e),
            }
        }
    }
}

/// One scenario run: the engine driven as the tokio driver drives it, with broadcast receivers
/// as the subscriptions.
struct Run {
    engine: Engine,
    router: Router,
    subs: HashMap<String, broadcast::Receiver<String>>,
    channel_of: HashMap<String, String>,
    requests: HashMap<u64, Vec<String>>,
    refused: HashMap<String, String>,
    answers: serde_json::Map<String, Value>,
    drop: Value,
}

impl Run {
    fn events(&mut self) {
        while let Some(ev) = self.engine.poll_event() {
            match ev {
                Event::Deliver {
                    channel, payloads, ..
                } => self.router.deliver(&channel, payloads),
                Event::Answered { id, answer } => {
                    let text = match answer {
                        Answer::Subscribed { .. } => "subscribed".to_owned(),
                        Answer::Kept => "kept".to_owned(),
                        Answer::Status(_) => "status".to_owned(),
                        Answer::Reloaded { .. } => "reloaded".to_owned(),
                        Answer::Failed(RequestError::UnknownChannel(_)) => {
                            "unknown_channel".to_owned()
                        }
                        Answer::Failed(RequestError::Refused { code, .. }) => {
                            format!("refused:{}", code)
                        }
                        Answer::Failed(RequestError::Lost(_)) => "lost".to_owned(),
                        Answer::Failed(RequestError::NotAttached) => "not_attached".to_owned(),
                    };
                    for name in self.requests.get(&id).cloned().unwrap_or_default() {
                        self.answers.insert(name, Value::String(text.clone()));
                    }
                }
                Event::ChannelRefused { channel, code, .. } => {
                    self.router.refuse(&channel);
                    self.refused.insert(channel, code);
                }
                Event::Drop { cause } => {
                    self.drop = json!(match cause {
                        DropCause::Protocol(_) => "protocol",
                        DropCause::Closed { .. } => "closed",
                    })
                }
                Event::Attached | Event::Detached { .. } => {}
            }
        }
    }

    fn sweep(&mut self) {
        for channel in self.router.take_unused() {
            self.engine.unsubscribe(&channel);
        }
    }

    fn receive(&mut self, data: &[u8], bytewise: bool) {
        if bytewise {
            for b in data {
                self.engine.receive(std::slice::from_ref(b));
                self.events();
            }
        } else {
            self.engine.receive(data);
        }
    }

    fn drain(&mut self, name: &str) -> Value {
        let channel = self.channel_of[name].clone();
        let rx = self
            .subs
            .get_mut(name)
            .unwrap_or_else(|| panic!("no subscription {}", name));
        let mut items = Vec::new();
        loop {
            match rx.try_recv() {
                Ok(payload) => items.push(Value::String(payload)),
                Err(TryRecvError::Lagged(n)) => items.push(json!({ "lagged": n })),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Closed) => {
                    items.push(json!({ "refused": self.refused.get(&channel).cloned().unwrap_or_default() }));
                    break;
                }
            }
        }
        Value::Array(items)
    }
}

fn run_scenario(scenario: &Value, bytewise: bool) -> Result<(), String> {
    let client = &scenario["client"];
    let pid = client["pid"].as_i64().unwrap_or(42);
    let name = client["name"].as_str().unwrap_or("");
    let buffer = scenario["buffer"].as_u64().unwrap_or(16) as usize;
    let mut run = Run {
        engine: Engine::new(pid, name),
        router: Router::new(buffer),
        subs: HashMap::new(),
        channel_of: HashMap::new(),
        requests: HashMap::new(),
        refused: HashMap::new(),
        answers: serde_json::Map::new(),
        drop: Value::Null,
    };
    for (i, step) in scenario["steps"].as_array().unwrap().iter().enumerate() {
        let at = |what: &str, got: &Value, want: &Value| {
            format!(
                "step {} ({}): {}: got {}, want {}",
                i + 1,
                step,
                what,
                got,
                want
            )
        };
        run.answers.clear();
        run.drop = Value::Null;
        let mut outcome = Value::Null;
        if let Some(ch) = step.get("want") {
            let ch = ch.as_str().unwrap();
            let sub = step["as"].as_str().unwrap().to_owned();
            run.subs.insert(sub.clone(), run.router.subscribe(ch));
            run.channel_of.insert(sub, ch.to_owned());
            run.engine.register(ch);
        } else if step.get("connect").is_some() {
            run.engine.connect();
        } else if let Some(msgs) = step.get("receive") {
            let msgs: Vec<ServerMessage> =
                serde_json::from_value(msgs.clone()).map_err(|e| e.to_string())?;
            run.receive(&p::encode_frame(&msgs), bytewise);
        } else if let Some(h) = step.get("receive_hex") {
            run.receive(&unhex(h.as_str().unwrap()), bytewise);
        } else if step.get("lost").is_some() {
            run.engine.lost("the test cut it");
        } else if let Some(ch) = step.get("subscribe") {
            let ch = ch.as_str().unwrap();
            let sub = step["as"].as_str().unwrap().to_owned();
            let rx = run.router.subscribe(ch);
            outcome = json!(match run.engine.subscribe(ch) {
                Ok(SubscribeOutcome::Sent(id)) => {
                    run.requests.entry(id).or_default().push(sub.clone());
                    "sent"
                }
                Ok(SubscribeOutcome::Confirmed) => "confirmed",
                Ok(SubscribeOutcome::Registered) => "registered",
                Err(RequestError::UnknownChannel(_)) => "unknown_channel",
                Err(e) => return Err(format!("step {}: subscribe: {}", i + 1, e)),
            });
            if outcome == json!("unknown_channel") {
                drop(rx);
                run.sweep();
            } else {
                run.subs.insert(sub.clone(), rx);
                run.channel_of.insert(sub, ch.to_owned());
            }
        } else if let Some(sub) = step.get("close") {
            run.subs.remove(sub.as_str().unwrap());
            run.sweep();
        } else if let Some(req) = step.get("status") {
            outcome = json!(match run.engine.status() {
                Ok(id) => {
                    run.requests
                        .insert(id, vec![req.as_str().unwrap().to_owned()]);
                    "sent"
                }
                Err(RequestError::NotAttached) => "not_attached",
                Err(e) => return Err(format!("step {}: status: {}", i + 1, e)),
            });
        } else {
            return Err(format!("step {}: no action in {}", i + 1, step));
        }
        run.events();

        let mut sent = Vec::new();
        p::client_decoder()
            .feed(&run.engine.data_to_send(), &mut sent)
            .map_err(|e| e.to_string())?;
        let sent = as_json(&sent);
        let want = step.get("sent").cloned().unwrap_or_else(|| json!([]));
        if sent != want {
            return Err(at("sent", &sent, &want));
        }
        if let Some(want) = step.get("outcome") {
            if &outcome != want {
                return Err(at("outcome", &outcome, want));
            }
        }
        let answers = Value::Object(run.answers.clone());
        let want = step.get("answers").cloned().unwrap_or_else(|| json!({}));
        if answers != want {
            return Err(at("answers", &answers, &want));
        }
        let want = step.get("drop").cloned().unwrap_or(Value::Null);
        if run.drop != want {
            return Err(at("drop", &run.drop, &want));
        }
        for (key, got) in [
            ("attached", json!(run.engine.attached())),
            ("generation", json!(run.engine.generation())),
            ("retry_at_once", json!(run.engine.retry_at_once())),
        ] {
            if let Some(want) = step.get(key) {
                if &got != want {
                    return Err(at(key, &got, want));
                }
            }
        }
        if let Some(recv) = step.get("recv").and_then(Value::as_object) {
            for (sub, want) in recv {
                let got = run.drain(sub);
                if &got != want {
                    return Err(at(&format!("recv {}", sub), &got, want));
                }
            }
        }
    }
    Ok(())
}

#[test]
fn every_engine_scenario_holds_whatever_the_reads() {
    let doc = vectors("engine.json");
    let mut failures = Vec::new();
    for scenario in doc["scenarios"].as_array().unwrap() {
        for bytewise in [false, true] {
            if let Err(e) = run_scenario(scenario, bytewise) {
                failures.push(format!(
                    "{} (bytewise: {}): {}",
                    scenario["name"], bytewise, e
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
