//! `fusec_serve::Server` on an ephemeral port, serving the bundled tiny Llama
//! (examples/tiny-chat: real weights from tests/fixtures, a tokenizer and a chat
//! template), talked to over plain TCP: whole and streamed (SSE) responses, 4xx JSON
//! errors, a client that disconnects, and 64 requests at concurrency 16 whose outputs
//! equal their outputs served alone and the executor's own greedy decode.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use fusec_exec::{Executor, PagedConfig, PagedSession, Session};
use fusec_model::blocks::StepDims;
use fusec_serve::{
    Engine, Pace, Paced, PagedEngine, SchedulerConfig, Server, ServerConfig, SessionEngine,
    SessionEngineConfig,
};
use fusec_text::Tokenizer;
use fusec_weights::Weights;
use serde_json::{json, Value};

fn example() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/tiny-chat/model.toml")
}

/// The tiny model's decode executor (the eager graph, on the bundled weights).
fn executor() -> Executor {
    let spec = fusec_model::load_model(&example()).expect("the example loads");
    let graph = fusec_model::Registry::builtin()
        .build(&spec)
        .expect("the graph builds");
    let weights =
        Weights::load(spec.weights.as_ref().expect("weights"), &graph).expect("weights load");
    Executor::new(graph, &weights).expect("executor")
}

fn engine(total_blocks: usize) -> SessionEngine {
    SessionEngine::new(
        executor(),
        SessionEngineConfig {
            block_size: 16,
            total_blocks,
            max_context: 128,
        },
    )
    .expect("engine")
}

/// The tiny model's paged step (eager, blocks of 16 positions) over a pool of
/// `pool_blocks` blocks.
fn paged_engine(pool_blocks: usize) -> PagedEngine {
    let spec = fusec_model::load_model(&example()).expect("the example loads");
    let graph = fusec_model::Registry::builtin()
        .architecture(&spec.architecture)
        .expect("a known family")
        .build_step(&spec.model, &StepDims::paged(16))
        .expect("the paged step builds");
    let weights =
        Weights::load(spec.weights.as_ref().expect("weights"), &graph).expect("weights load");
    let exec = Executor::new(graph, &weights).expect("executor");
    let config = PagedConfig {
        pool_blocks,
        max_len: 128,
    };
    PagedEngine::new(PagedSession::new(exec, config).expect("paged session"))
}

fn tokenizer() -> Tokenizer {
    Tokenizer::for_model(&example()).expect("the example's tokenizer")
}

fn start<E: Engine + Send + 'static>(engine: E, scheduler: SchedulerConfig) -> Server {
    let config = ServerConfig {
        model: "tiny-chat".into(),
        scheduler,
        http_threads: 2,
    };
    Server::start(
        "127.0.0.1:0".parse().expect("addr"),
        engine,
        Some(tokenizer()),
        config,
    )
    .expect("the server starts")
}

/// A response: status, headers (lowercase names) and the body, de-chunked.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The `data:` payloads of a server-sent event stream.
    fn events(&self) -> Vec<String> {
        self.body
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(str::to_string)
            .collect()
    }
}

fn send(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Reply {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("write");
    s.write_all(body).expect("write");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    parse_reply(&raw)
}

fn parse_reply(raw: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").expect("a header block");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let body = if headers.get("transfer-encoding").map(String::as_str) == Some("chunked") {
        dechunk(rest.as_bytes())
    } else {
        rest.to_string()
    };
    Reply {
        status,
        headers,
        body,
    }
}

fn dechunk(mut raw: &[u8]) -> String {
    let mut out = Vec::new();
    while let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&raw[..eol]).trim(), 16)
            .expect("a chunk size");
        if size == 0 {
            break;
        }
        out.extend_from_slice(&raw[eol + 2..eol + 2 + size]);
        raw = &raw[eol + 2 + size + 2..];
    }
    String::from_utf8(out).expect("UTF-8 body")
}

fn post(addr: SocketAddr, path: &str, body: &Value) -> Reply {
    send(addr, "POST", path, body.to_string().as_bytes())
}

/// The generated ids and text of a response, whole or streamed, and its finish reason.
fn output(reply: &Reply) -> (Vec<u64>, String, String) {
    assert_eq!(reply.status, 200, "{}", reply.body);
    let ids_of = |c: &Value| -> Vec<u64> {
        c["token_ids"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default()
    };
    let is_stream = reply
        .headers
        .get("content-type")
        .is_some_and(|t| t.starts_with("text/event-stream"));
    if !is_stream {
        let v = reply.json();
        let c = &v["choices"][0];
        let text = c["text"]
            .as_str()
            .or(c["message"]["content"].as_str())
            .expect("text")
            .to_string();
        return (
            ids_of(c),
            text,
            c["finish_reason"].as_str().expect("finish").into(),
        );
    }
    let events = reply.events();
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let (mut ids, mut text, mut finish) = (Vec::new(), String::new(), String::new());
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).expect("a JSON chunk");
        assert!(v.get("error").is_none(), "{v}");
        let Some(c) = v["choices"].get(0) else {
            continue;
        };
        ids.extend(ids_of(c));
        if let Some(t) = c["text"].as_str().or(c["delta"]["content"].as_str()) {
            text.push_str(t);
        }
        if let Some(f) = c["finish_reason"].as_str() {
            assert!(finish.is_empty(), "two finish reasons");
            finish = f.into();
        }
    }
    (ids, text, finish)
}

/// The executor's own greedy decode of `prompt`, token by token: `n` ids.
fn direct(prompt: &[u32], n: usize) -> Vec<u64> {
    let mut s = Session::with_capacity(executor(), 1, prompt.len() + n).expect("session");
    let mut out = Vec::new();
    let mut next = 0;
    for &t in prompt {
        next = s.step(&[t as i32]).expect("step").next[0];
    }
    for i in 0..n {
        out.push(next as u64);
        if i + 1 < n {
            next = s.step(&[next]).expect("step").next[0];
        }
    }
    out
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "timed out waiting: {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn health_models_and_metrics() {
    let server = start(engine(64), SchedulerConfig::default());
    let addr = server.local_addr();
    let h = send(addr, "GET", "/health", b"");
    assert_eq!((h.status, h.json()), (200, json!({"status": "ok"})));
    let m = send(addr, "GET", "/v1/models", b"");
    assert_eq!(m.json()["data"][0]["id"], "tiny-chat");
    let metrics = send(addr, "GET", "/metrics", b"");
    assert_eq!(metrics.status, 200);
    for name in [
        "fusec_queue_length 0",
        "fusec_running_sequences 0",
        "fusec_kv_blocks_used 0",
        "fusec_kv_blocks_total 64",
        "fusec_tokens_per_second ",
    ] {
        assert!(metrics.body.contains(name), "{name} in {}", metrics.body);
    }
    let missing = send(addr, "GET", "/nope", b"");
    assert_eq!(missing.status, 404);
    assert!(missing.json()["error"]["message"].is_string());
}

#[test]
fn whole_and_streamed_completions_agree_with_the_executor() {
    let server = start(engine(64), SchedulerConfig::default());
    let addr = server.local_addr();
    let tok = tokenizer();
    let prompt = "the cat is on the hat";
    let ids = tok.encode(prompt, true).expect("encode");
    let want = direct(&ids, 12);
    let body =
        json!({"model": "tiny-chat", "prompt": prompt, "max_tokens": 12, "ignore_eos": true});
    let whole = post(addr, "/v1/completions", &body);
    let v = whole.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["prompt_tokens"], ids.len());
    assert_eq!(v["usage"]["completion_tokens"], 12);
    let (got, text, finish) = output(&whole);
    assert_eq!(got, want);
    assert_eq!(finish, "length");
    let want_ids: Vec<u32> = want.iter().map(|&i| i as u32).collect();
    assert_eq!(text, tok.decode(&want_ids, true).expect("decode"));
    // Streamed: the same ids and text, chunk by chunk, then [DONE].
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let reply = post(addr, "/v1/completions", &streamed);
    assert!(reply.headers["content-type"].starts_with("text/event-stream"));
    assert_eq!(
        output(&reply),
        (want.clone(), text.clone(), "length".into())
    );
    let events = reply.events();
    assert!(
        events.len() >= 12,
        "one chunk per token at least: {events:?}"
    );
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).expect("usage chunk");
    assert_eq!(usage["usage"]["completion_tokens"], 12);
    // Token ids in, the same ids out.
    let by_ids = json!({"model": "tiny-chat", "prompt": ids, "max_tokens": 12, "ignore_eos": true});
    assert_eq!(output(&post(addr, "/v1/completions", &by_ids)).0, want);
}

#[test]
fn chat_completions_render_the_template_whole_and_streamed() {
    let server = start(engine(64), SchedulerConfig::default());
    let addr = server.local_addr();
    let tok = tokenizer();
    let rendered = "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n";
    let ids = tok.encode(rendered, false).expect("encode");
    let body = json!({
        "model": "tiny-chat",
        "messages": [{"role": "user", "content": "hello world"}],
        "max_tokens": 8,
    });
    let whole = post(addr, "/v1/chat/completions", &body);
    let v = whole.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["usage"]["prompt_tokens"], ids.len());
    let (got, text, finish) = output(&whole);
    // Greedy until an end-of-sequence id (0 or 2 here) or 8 tokens.
    let all = direct(&ids, 8);
    let end = all.iter().position(|&t| t == 0 || t == 2).unwrap_or(8);
    assert_eq!(got, all[..end]);
    assert_eq!(finish, if end < 8 { "stop" } else { "length" });
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let reply = post(addr, "/v1/chat/completions", &streamed);
    let events = reply.events();
    let first: Value = serde_json::from_str(&events[0]).expect("first chunk");
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(output(&reply), (got, text, finish));
}

#[test]
fn bad_requests_get_a_4xx_with_a_json_error() {
    let server = start(engine(64), SchedulerConfig::default());
    let addr = server.local_addr();
    let error = |reply: &Reply, status: u16| -> Value {
        assert_eq!(reply.status, status, "{}", reply.body);
        assert!(reply.headers["content-type"].starts_with("application/json"));
        let v = reply.json();
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{v}"
        );
        assert_eq!(v["error"]["type"], "invalid_request_error");
        v
    };
    // Malformed JSON, on both endpoints, and a body that is not JSON at all.
    for path in ["/v1/completions", "/v1/chat/completions"] {
        let v = error(
            &send(
                addr,
                "POST",
                path,
                b"{\"model\": \"tiny-chat\", \"prompt\": ",
            ),
            400,
        );
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap_or("")
                .contains("JSON"),
            "{v}"
        );
        error(&send(addr, "POST", path, b"\xff\xfe not json"), 400);
        error(&send(addr, "POST", path, b""), 400);
    }
    // Well-formed JSON of the wrong shape.
    error(
        &post(addr, "/v1/completions", &json!({"model": "tiny-chat"})),
        400,
    );
    error(
        &post(
            addr,
            "/v1/completions",
            &json!({"model": "tiny-chat", "prompt": [-1]}),
        ),
        400,
    );
    error(
        &post(
            addr,
            "/v1/chat/completions",
            &json!({"model": "tiny-chat", "messages": []}),
        ),
        400,
    );
    // An unknown model.
    let v = error(
        &post(
            addr,
            "/v1/completions",
            &json!({"model": "gpt-9", "prompt": "a"}),
        ),
        404,
    );
    assert_eq!(v["error"]["code"], "model_not_found");
    // Over the context limit (128 positions): asked, or by the prompt alone.
    let v = error(
        &post(
            addr,
            "/v1/completions",
            &json!({"model": "tiny-chat", "prompt": "a b c", "max_tokens": 200}),
        ),
        400,
    );
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let long: Vec<u32> = (0..140).map(|i| 3 + i % 100).collect();
    let v = error(
        &post(
            addr,
            "/v1/chat/completions",
            &json!({"model": "tiny-chat", "messages": [{"role": "user", "content": "the ".repeat(140)}]}),
        ),
        400,
    );
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let v = error(
        &post(
            addr,
            "/v1/completions",
            &json!({"model": "tiny-chat", "prompt": long, "max_tokens": 1}),
        ),
        400,
    );
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    // Ids beyond the vocabulary, sampling out of range, several choices, an empty prompt.
    error(
        &post(
            addr,
            "/v1/completions",
            &json!({"model": "tiny-chat", "prompt": [5, 300]}),
        ),
        400,
    );
    error(
        &post(
            addr,
            "/v1/completions",
            &json!({"model": "tiny-chat", "prompt": "a", "temperature": 2.5}),
        ),
        400,
    );
    let v = error(
        &post(
            addr,
            "/v1/completions",
            &json!({"model": "tiny-chat", "prompt": "a", "temperature": 1, "top_p": 0}),
        ),
        400,
    );
    assert_eq!(v["error"]["param"], "top_p");
    error(
        &post(
            addr,
            "/v1/completions",
            &json!({"model": "tiny-chat", "prompt": "a", "n": 2}),
        ),
        400,
    );
    error(
        &post(
            addr,
            "/v1/completions",
            &json!({"model": "tiny-chat", "prompt": ["a", "b"]}),
        ),
        400,
    );
    error(
        &post(
            addr,
            "/v1/completions",
            &json!({"model": "tiny-chat", "prompt": []}),
        ),
        400,
    );
    error(
        &post(
            addr,
            "/v1/completions",
            &json!({"model": "tiny-chat", "prompt": "a", "max_tokens": 0}),
        ),
        400,
    );
    // A body over the limit (2 MiB), and a method the endpoint does not take.
    let huge = format!(
        "{{\"model\": \"tiny-chat\", \"prompt\": \"{}\"}}",
        "a".repeat(3 << 20)
    );
    assert_eq!(
        error(&send(addr, "POST", "/v1/completions", huge.as_bytes()), 413)["error"]["type"],
        "invalid_request_error"
    );
    error(&send(addr, "GET", "/v1/completions", b""), 405);
    // Greedy values are accepted, and the server still serves after all that.
    let ok = post(
        addr,
        "/v1/completions",
        &json!({"model": "tiny-chat", "prompt": "a", "max_tokens": 2, "temperature": 0, "top_p": 1, "n": 1}),
    );
    assert_eq!(ok.status, 200, "{}", ok.body);
    let m = server.metrics();
    assert_eq!((m.scheduler.running, m.scheduler.blocks_in_use), (0, 0));
}

/// A sampled request with a seed gives the same tokens every time, streamed or whole;
/// another seed or none gives others, and temperature 0 is greedy.
#[test]
fn sampled_requests_follow_their_seed() {
    let server = start(engine(64), SchedulerConfig::default());
    let addr = server.local_addr();
    let body = |extra: Value| {
        let mut b = json!({"model": "tiny-chat", "prompt": "the cat is", "max_tokens": 16, "ignore_eos": true});
        for (k, v) in extra.as_object().expect("an object") {
            b[k] = v.clone();
        }
        b
    };
    let ids = |extra: Value| output(&post(addr, "/v1/completions", &body(extra))).0;
    let seeded = ids(json!({"temperature": 1.0, "seed": 7}));
    assert_eq!(seeded, ids(json!({"temperature": 1.0, "seed": 7})));
    assert_eq!(
        seeded,
        ids(json!({"temperature": 1.0, "seed": 7, "stream": true}))
    );
    assert_ne!(seeded, ids(json!({"temperature": 1.0, "seed": 8})));
    let greedy = ids(json!({}));
    assert_ne!(seeded, greedy, "sampling chose other tokens than greedy");
    assert_eq!(greedy, ids(json!({"temperature": 0, "seed": 7})));
    // Without a seed, each request draws from a generator of its own.
    assert_ne!(
        ids(json!({"temperature": 1.0})),
        ids(json!({"temperature": 1.0}))
    );
}

#[test]
fn stop_strings_end_the_text_and_the_request() {
    let server = start(engine(64), SchedulerConfig::default());
    let addr = server.local_addr();
    let body = json!({"model": "tiny-chat", "prompt": "the cat is on the hat", "max_tokens": 12, "ignore_eos": true});
    let (_, text, _) = output(&post(addr, "/v1/completions", &body));
    // Stop at the text's second character (greedy text of the random model).
    let stop: String = text.chars().skip(1).take(2).collect();
    let cut = text.find(&stop).expect("the stop is in the text");
    for stream in [false, true] {
        let mut b = body.clone();
        b["stop"] = json!([stop.clone()]);
        b["stream"] = json!(stream);
        let (_, got, finish) = output(&post(addr, "/v1/completions", &b));
        assert_eq!(
            (got.as_str(), finish.as_str()),
            (&text[..cut], "stop"),
            "stream {stream}"
        );
    }
    wait_until("the stopped requests leave", || {
        server.metrics().scheduler.running == 0
    });
    assert_eq!(server.metrics().scheduler.blocks_in_use, 0);
}

#[test]
fn a_client_that_disconnects_frees_its_sequence() {
    // 20 ms per step: 100 tokens take 2 s, long after the client is gone.
    let slow = Paced::new(engine(64), Pace(Duration::from_millis(20)));
    let server = start(slow, SchedulerConfig::default());
    let addr = server.local_addr();
    let body = json!({"model": "tiny-chat", "prompt": "the cat", "max_tokens": 100, "ignore_eos": true, "stream": true});
    let mut s = TcpStream::connect(addr).expect("connect");
    let text = body.to_string();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
        text.len()
    );
    s.write_all(head.as_bytes()).expect("write");
    // Read until the first token's chunk has come.
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains("token_ids\":[") {
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "the stream ended early");
        seen.extend_from_slice(&buf[..n]);
    }
    assert_eq!(server.metrics().scheduler.running, 1);
    drop(s);
    wait_until("the disconnected request is cancelled", || {
        let m = server.metrics();
        m.scheduler.cancelled == 1 && m.scheduler.running == 0
    });
    let m = server.metrics();
    assert_eq!(m.scheduler.blocks_in_use, 0);
    assert_eq!(m.scheduler.finished, 0);
    assert!(m.scheduler.tokens_generated < 100, "{m:?}");
    // A client waiting for a whole response that hangs up is cancelled too.
    let mut whole = body.clone();
    whole["stream"] = json!(false);
    let mut s = TcpStream::connect(addr).expect("connect");
    let text = whole.to_string();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
        text.len()
    );
    s.write_all(head.as_bytes()).expect("write");
    wait_until("the whole request runs", || {
        server.metrics().scheduler.running == 1
    });
    drop(s);
    wait_until("the hung-up request is cancelled", || {
        let m = server.metrics();
        m.scheduler.cancelled == 2 && m.scheduler.running == 0
    });
    assert_eq!(server.metrics().scheduler.blocks_in_use, 0);
    // The server goes on serving.
    let ok = post(
        addr,
        "/v1/completions",
        &json!({"model": "tiny-chat", "prompt": "a", "max_tokens": 2}),
    );
    assert_eq!(ok.status, 200);
}

/// The 64 requests: prompts as text or ids, whole or streamed, completions or chat
/// (greedy or sampled with a seed), of various lengths.
fn requests() -> Vec<(&'static str, Value)> {
    let words = [
        "the", "cat", "is", "on", "hat", "hello", "world", "what", "capital", "of", "France",
        "Paris",
    ];
    (0..64usize)
        .map(|i| {
            let n = 2 + (i * 7) % 19;
            let text: Vec<&str> = (0..n)
                .map(|k| words[(i * 5 + k * 3) % words.len()])
                .collect();
            let text = text.join(" ");
            let max_tokens = 4 + (i * 11) % 37;
            let stream = i % 2 == 1;
            match i % 4 {
                0 | 1 => (
                    "/v1/completions",
                    json!({
                        "model": "tiny-chat", "prompt": text, "max_tokens": max_tokens,
                        "stream": stream, "ignore_eos": i % 8 < 4,
                    }),
                ),
                2 => {
                    let ids: Vec<u32> = (0..n + 3)
                        .map(|k| ((i * 31 + k * 17) % 250) as u32 + 3)
                        .collect();
                    (
                        "/v1/completions",
                        json!({
                            "model": "tiny-chat", "prompt": ids, "max_tokens": max_tokens,
                            "stream": stream, "ignore_eos": true,
                        }),
                    )
                }
                _ => {
                    let mut body = json!({
                        "model": "tiny-chat", "messages": [{"role": "user", "content": text}],
                        "max_tokens": max_tokens, "stream": stream,
                    });
                    // Every other chat request samples, with a seed of its own.
                    if i % 8 == 7 {
                        body["temperature"] = json!(0.8);
                        body["top_p"] = json!(0.95);
                        body["seed"] = json!(i);
                    }
                    ("/v1/chat/completions", body)
                }
            }
        })
        .collect()
}

/// Sends every request from `clients` threads at once; the outputs in request order.
fn serve_all(addr: SocketAddr, clients: usize) -> Vec<(Vec<u64>, String, String)> {
    let reqs = requests();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut out = vec![None; reqs.len()];
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let Some((path, body)) = reqs.get(i) else {
                            return mine;
                        };
                        mine.push((i, output(&post(addr, path, body))));
                    }
                })
            })
            .collect();
        for h in handles {
            for (i, o) in h.join().expect("a client thread") {
                out[i] = Some(o);
            }
        }
    });
    out.into_iter()
        .map(|o| o.expect("every request answered"))
        .collect()
}

#[test]
fn sixty_four_requests_at_concurrency_16_equal_their_outputs_served_alone() {
    // 40 blocks of 16 positions (640) for 16 sequences of up to 80: sequences are
    // preempted and recomputed along the way.
    let config = SchedulerConfig {
        max_running: 16,
        token_budget: 48,
        prefill_chunk: 8,
    };
    let server = start(engine(40), config);
    let addr = server.local_addr();
    let concurrent = serve_all(addr, 16);
    let m = server.metrics();
    assert_eq!(m.requests_submitted, 64);
    assert_eq!(m.scheduler.finished, 64, "{m:?}");
    assert_eq!(m.scheduler.failed + m.scheduler.cancelled, 0);
    assert!(m.scheduler.preemptions > 0, "the run must preempt: {m:?}");
    assert_eq!((m.scheduler.running, m.scheduler.blocks_in_use), (0, 0));
    // Each alone, one at a time, on a fresh server.
    drop(server);
    let alone_server = start(engine(40), config);
    let alone = serve_all(alone_server.local_addr(), 1);
    assert_eq!(alone_server.metrics().scheduler.preemptions, 0);
    for (i, (c, a)) in concurrent.iter().zip(&alone).enumerate() {
        assert_eq!(c, a, "request {i}: {:?}", requests()[i].1);
        assert!(!c.0.is_empty(), "request {i} generated nothing");
    }
    // And the id prompts equal the executor's own greedy decode.
    for (i, (_, body)) in requests().iter().enumerate().filter(|(i, _)| i % 4 == 2) {
        let prompt: Vec<u32> = body["prompt"]
            .as_array()
            .expect("ids")
            .iter()
            .filter_map(|v| v.as_u64().map(|x| x as u32))
            .collect();
        let n = body["max_tokens"].as_u64().expect("max_tokens") as usize;
        assert_eq!(concurrent[i].0, direct(&prompt, n), "request {i}");
    }
}

#[test]
fn sixty_four_requests_batched_in_the_paged_engine_equal_their_outputs_served_alone() {
    // The same run through the paged engine: every step batched runs of the running
    // sequences (20: a run of 16 and one of 4) over one pool of 40 blocks, with
    // preemptions; each output equals the session engine's alone.
    let config = SchedulerConfig {
        max_running: 20,
        token_budget: 48,
        prefill_chunk: 8,
    };
    let server = start(paged_engine(40), config);
    let concurrent = serve_all(server.local_addr(), 16);
    let m = server.metrics();
    assert_eq!(m.scheduler.finished, 64, "{m:?}");
    assert_eq!(m.scheduler.failed + m.scheduler.cancelled, 0);
    assert!(m.scheduler.preemptions > 0, "the run must preempt: {m:?}");
    assert_eq!((m.scheduler.running, m.scheduler.blocks_in_use), (0, 0));
    drop(server);
    let alone_server = start(engine(40), config);
    let alone = serve_all(alone_server.local_addr(), 1);
    for (i, (c, a)) in concurrent.iter().zip(&alone).enumerate() {
        assert_eq!(c, a, "request {i}: {:?}", requests()[i].1);
    }
}
