//! `fusec serve` as a process: it prints where it listens, serves the fused graph with
//! the outputs `fusec run --prompt` gives (the tiny example through the paged engine
//! and through one session per sequence, and SmolLM2 when present), and refuses bad
//! settings with exit 2.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{fusec, path_str, root, scratch};
use serde_json::{json, Value};

/// A `fusec serve` child, killed when dropped.
struct Served {
    child: Child,
    addr: String,
    /// The line it printed first (the address, the engine, the KV blocks).
    banner: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(model: &Path, extra: &[&str]) -> Served {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fusec"))
        .current_dir(root())
        .args(["serve", path_str(model), "--port", "0"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("fusec serve starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("the address line");
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    Served {
        child,
        addr,
        banner: line,
    }
}

fn post(addr: &str, path: &str, body: &Value) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(300)))
        .expect("timeout");
    let body = body.to_string();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("write");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read");
    let (head, rest) = raw.split_once("\r\n\r\n").expect("headers");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    (status, serde_json::from_str(rest).expect("a JSON body"))
}

/// `fusec run --prompt`'s generated ids (its `--json`).
fn run_ids(model: &Path, args: &[&str], name: &str) -> Vec<u64> {
    let json = scratch(name).join("run.json");
    let mut all = vec!["run", path_str(model)];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--json", path_str(&json), "--force"]);
    let out = fusec(&all);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("run json")).expect("json");
    v["generated"]
        .as_array()
        .expect("generated")
        .iter()
        .filter_map(Value::as_u64)
        .collect()
}

fn choice_ids(v: &Value) -> Vec<u64> {
    v["choices"][0]["token_ids"]
        .as_array()
        .expect("token_ids")
        .iter()
        .filter_map(Value::as_u64)
        .collect()
}

#[test]
fn serves_what_fusec_run_generates() {
    let model = root().join("examples/tiny-chat/model.toml");
    let server = serve(&model, &[]);
    let prompt = "the cat is on the hat";
    let (status, v) = post(
        &server.addr,
        "/v1/completions",
        &json!({"model": "tiny-chat", "prompt": prompt, "max_tokens": 12, "ignore_eos": true}),
    );
    assert_eq!(status, 200, "{v}");
    let want = run_ids(
        &model,
        &["--prompt", prompt, "--tokens", "12", "--ignore-eos"],
        "serve-tiny",
    );
    assert_eq!(choice_ids(&v), want);
    assert!(server.banner.contains("paged engine"), "{}", server.banner);
    // The same from one session per sequence.
    let sessions = serve(&model, &["--engine", "sessions"]);
    assert!(
        sessions.banner.contains("sessions engine"),
        "{}",
        sessions.banner
    );
    let (status, v) = post(
        &sessions.addr,
        "/v1/completions",
        &json!({"model": "tiny-chat", "prompt": prompt, "max_tokens": 12, "ignore_eos": true}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(choice_ids(&v), want);
    drop(sessions);
    // Chat: the template's rendering, stopped at the end of sequence as `run --chat`.
    let (status, v) = post(
        &server.addr,
        "/v1/chat/completions",
        &json!({"model": "tiny-chat", "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 10}),
    );
    assert_eq!(status, 200, "{v}");
    let mut want = run_ids(
        &model,
        &["--chat", "--prompt", "hello world", "--tokens", "10"],
        "serve-tiny-chat",
    );
    if want.last().is_some_and(|&t| t == 0 || t == 2) {
        want.pop();
    }
    assert_eq!(choice_ids(&v), want);
}

#[test]
fn serves_smollm2_as_fusec_run_chats() {
    let Some(model) = common::smollm2() else {
        return;
    };
    let server = serve(
        &model,
        &[
            "--name",
            "smollm2",
            "--max-running",
            "4",
            "--kv-blocks",
            "64",
        ],
    );
    let question = "What is the capital of France?";
    let (status, v) = post(
        &server.addr,
        "/v1/chat/completions",
        &json!({"model": "smollm2", "messages": [{"role": "user", "content": question}], "max_tokens": 8}),
    );
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    assert!(text.contains("Paris"), "{text:?}");
    let mut want = run_ids(
        &model,
        &["--chat", "--prompt", question, "--tokens", "8"],
        "serve-smollm2",
    );
    if v["choices"][0]["finish_reason"] == "stop" {
        want.pop();
    }
    assert_eq!(choice_ids(&v), want);
}

#[test]
fn bad_settings_exit_2() {
    let model = root().join("examples/tiny-chat/model.toml");
    let m = path_str(&model);
    let cases: [&[&str]; 4] = [
        &["serve", m, "--host", "localhost:80"],
        &["serve", m, "--max-running", "8", "--token-budget", "4"],
        &["serve", m, "--tokenizer", "/nonexistent/tokenizer.json"],
        &["serve", "/nonexistent/model.toml"],
    ];
    for args in cases {
        let out = fusec(args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: "));
    }
    // A port another socket holds.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port().to_string();
    let out = fusec(&["serve", m, "--port", &port]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot listen"));
}
