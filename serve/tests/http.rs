//! The server over real HTTP on 127.0.0.1, on a tiny random checkpoint: every endpoint's shape,
//! streaming, determinism, every error, concurrency across precisions, overload, disconnects.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use serve::engine::EngineOptions;
use serve::http::DEFAULT_BODY_LIMIT;
use support::{stream_text, tiny_checkpoint, TestServer};

fn options() -> EngineOptions {
    EngineOptions { max_context: 256, prefill_chunk: 64, ..EngineOptions::default() }
}

fn server(dir: &tempfile::TempDir) -> TestServer {
    TestServer::start(&tiny_checkpoint(dir.path()), options(), None, DEFAULT_BODY_LIMIT)
}

fn text_of(body: &Value) -> String {
    let c = &body["choices"][0];
    c["text"].as_str().or(c["message"]["content"].as_str()).unwrap().to_string()
}

#[test]
fn endpoints_have_openai_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(&dir);
    let (status, body) = s.get("/health");
    assert_eq!((status, body.contains("ok")), (200, true));

    let (status, body) = s.get("/v1/models");
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(models["object"], "list");
    let m = &models["data"][0];
    assert_eq!((m["id"].as_str(), m["object"].as_str()), (Some("tiny"), Some("model")));
    assert_eq!(m["precisions"], json!(["2", "3", "4", "5", "6", "7", "8", "mix"]));
    assert_eq!(m["profiles"][0]["name"], "mix");
    let mean = m["profiles"][0]["mean_bits"].as_f64().unwrap();
    assert!(mean > 3.0 && mean < 6.0, "{mean}");
    assert_eq!((m["default_precision"].as_str(), m["context_length"].as_u64()), (Some("8"), Some(256)));

    let (status, c, _) = s.post(
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "the cat", "max_tokens": 5, "temperature": 0, "precision": 4}),
    );
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["object"], "text_completion");
    assert!(c["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!((c["model"].as_str(), c["precision"].as_str()), (Some("tiny"), Some("4")));
    let choice = &c["choices"][0];
    assert_eq!(choice["index"], 0);
    assert!(choice["text"].is_string() && choice["logprobs"].is_null());
    let u = &c["usage"];
    let completion = u["completion_tokens"].as_u64().unwrap();
    assert_eq!(u["prompt_tokens"].as_u64().unwrap() + completion, u["total_tokens"].as_u64().unwrap());
    match choice["finish_reason"].as_str().unwrap() {
        "length" => assert_eq!(completion, 5),
        "stop" => assert!(completion <= 5),
        other => panic!("finish_reason {other}"),
    }

    let (status, c, _) = s.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 4, "seed": 1}),
    );
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["object"], "chat.completion");
    assert!(c["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(c["precision"], "8", "the default precision");
    assert_eq!(c["choices"][0]["message"]["role"], "assistant");
    assert!(c["choices"][0]["message"]["content"].is_string());
    // The ChatML prompt: <|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n, byte tokens.
    assert!(c["usage"]["prompt_tokens"].as_u64().unwrap() > 30);

    let metrics = s.get("/metrics").1;
    for needle in [
        "drq_requests_total{precision=\"4\"} 1",
        "drq_requests_total{precision=\"8\"} 1",
        "drq_time_to_first_token_seconds_bucket{",
        "drq_inter_token_latency_seconds_count{precision=\"4\"}",
        "drq_generated_tokens_total{precision=\"4\"}",
        "drq_prompt_tokens_total{precision=\"8\"}",
        "drq_queue_depth 0",
    ] {
        assert!(metrics.contains(needle), "metrics lack {needle}:\n{metrics}");
    }
    s.wait_for_metric("drq_running_sequences", 0.0);
}

#[test]
fn streams_carry_the_same_text_as_whole_responses() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(&dir);
    for (path, body) in [
        (
            "/v1/completions",
            json!({"prompt": "the dog", "max_tokens": 12, "temperature": 0.9, "seed": 42, "precision": 3, "logprobs": 2}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 12, "temperature": 0.9, "seed": 42, "precision": "6"}),
        ),
    ] {
        let (status, whole, _) = s.post(path, &body);
        assert_eq!(status, 200, "{whole}");
        let mut streaming = body.clone();
        streaming["stream"] = json!(true);
        streaming["stream_options"] = json!({"include_usage": true});
        let chunks = s.stream(path, &streaming);
        let (text, parsed) = stream_text(&chunks);
        assert_eq!(text, text_of(&whole), "{path}");
        let finals: Vec<&Value> =
            parsed.iter().filter(|c| c["choices"].get(0).is_some_and(|x| !x["finish_reason"].is_null())).collect();
        assert_eq!(finals.len(), 1, "{path}: one chunk carries the finish_reason");
        assert_eq!(finals[0]["choices"][0]["finish_reason"], whole["choices"][0]["finish_reason"]);
        let usage = parsed.last().unwrap();
        assert_eq!(usage["choices"], json!([]), "{path}: the usage chunk has no choices");
        assert_eq!(usage["usage"], whole["usage"], "{path}");
        if path.contains("chat") {
            assert_eq!(parsed[0]["object"], "chat.completion.chunk");
            assert_eq!(
                parsed[0]["choices"][0]["delta"]["role"], "assistant",
                "the first delta opens the assistant turn"
            );
        } else {
            assert_eq!(parsed[0]["object"], "text_completion");
            // The streamed logprobs, concatenated, are the whole response's (text offsets
            // continue across chunks).
            let whole_lp = &whole["choices"][0]["logprobs"];
            for field in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
                let streamed: Vec<Value> = parsed
                    .iter()
                    .filter_map(|c| c["choices"][0]["logprobs"][field].as_array())
                    .flatten()
                    .cloned()
                    .collect();
                assert_eq!(json!(streamed), whole_lp[field], "{field}");
            }
            assert!(whole_lp["text_offset"].as_array().unwrap().last().unwrap().as_u64().unwrap() > 0, "{whole_lp}");
        }
    }
}

#[test]
fn same_seed_and_precision_give_the_same_text() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(&dir);
    let ask = |seed: u64, precision: u32| {
        let (status, c, _) =
            s.post("/v1/completions", &json!({"prompt": "a", "max_tokens": 40, "temperature": 1.0, "top_p": 0.95, "top_k": 50, "seed": seed, "precision": precision}));
        assert_eq!(status, 200, "{c}");
        text_of(&c)
    };
    for precision in [2, 8] {
        assert_eq!(ask(7, precision), ask(7, precision), "precision {precision}");
    }
    // Across 5 seeds, sampled texts differ (40 tokens from a near-uniform tiny model).
    let texts: std::collections::BTreeSet<String> = (0..5).map(|seed| ask(seed, 8)).collect();
    assert!(texts.len() >= 4, "{texts:?}");
}

#[test]
fn n_choices_logprobs_and_stop_strings() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(&dir);
    let (status, c, _) =
        s.post("/v1/completions", &json!({"prompt": "x", "max_tokens": 6, "n": 3, "temperature": 1.0, "seed": 3}));
    assert_eq!(status, 200, "{c}");
    let choices = c["choices"].as_array().unwrap();
    assert_eq!(choices.iter().map(|c| c["index"].as_u64().unwrap()).collect::<Vec<_>>(), vec![0, 1, 2]);

    // Completions logprobs: one entry per token, `logprobs` alternatives each, sorted.
    let (_, c, _) =
        s.post("/v1/completions", &json!({"prompt": "x", "max_tokens": 5, "temperature": 0, "logprobs": 3}));
    let lp = &c["choices"][0]["logprobs"];
    let n = c["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    assert_eq!(lp["tokens"].as_array().unwrap().len(), n);
    for (top, chosen) in lp["top_logprobs"].as_array().unwrap().iter().zip(lp["token_logprobs"].as_array().unwrap()) {
        let top = top.as_object().unwrap();
        assert!(top.len() <= 3 && !top.is_empty());
        // Greedy: the chosen token is the most likely one.
        let best = top.values().map(|v| v.as_f64().unwrap()).fold(f64::MIN, f64::max);
        assert!((best - chosen.as_f64().unwrap()).abs() < 1e-6 && best <= 0.0);
    }
    let (_, c, _) = s.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "logprobs": true, "top_logprobs": 2}),
    );
    let content = c["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert!(!content.is_empty());
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 2);
    assert!(content[0]["bytes"].is_array());

    // A stop string taken from the greedy text cuts it before its first occurrence.
    let greedy = |stop: Value| {
        let (status, c, _) = s.post(
            "/v1/completions",
            &json!({"prompt": "the", "max_tokens": 30, "temperature": 0, "stop": stop, "precision": 5}),
        );
        assert_eq!(status, 200, "{c}");
        (text_of(&c), c["choices"][0]["finish_reason"].as_str().unwrap().to_string())
    };
    let (full, _) = greedy(Value::Null);
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 8, "greedy text too short for the test: {full:?}");
    let stop: String = chars[5..7].iter().collect();
    let (cut, reason) = greedy(json!([stop.clone()]));
    let expected = &full[..full.find(&stop).unwrap()];
    assert_eq!((cut.as_str(), reason.as_str()), (expected, "stop"), "stop {stop:?} in {full:?}");
}

#[test]
fn bad_requests_get_openai_errors() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = tiny_checkpoint(dir.path());
    let s = TestServer::start(&checkpoint, options(), None, 2048);
    let long_prompt: Vec<u32> = (0..256).map(|i| i % 300).collect();
    for (path, body, status, param) in [
        ("/v1/completions", json!({"prompt": "a", "precision": 9}), 400, Some("precision")),
        ("/v1/completions", json!({"prompt": "a", "precision": "fast"}), 400, Some("precision")),
        ("/v1/completions", json!({"prompt": "a", "temperature": -1}), 400, Some("temperature")),
        ("/v1/completions", json!({"prompt": long_prompt}), 400, Some("prompt")),
        ("/v1/completions", json!({"prompt": "a", "max_tokens": 1000}), 400, Some("max_tokens")),
        ("/v1/completions", json!({"prompt": "a", "n": 17}), 400, None),
        ("/v1/completions", json!({"prompt": [5, 300]}), 400, None),
        ("/v1/completions", json!({"prompt": "a", "model": "gpt-4"}), 404, Some("model")),
        ("/v1/completions", json!({"max_tokens": 3}), 400, None),
        ("/v1/chat/completions", json!({"messages": []}), 400, Some("messages")),
        ("/v1/chat/completions", json!({"messages": [{"role": "wizard", "content": "x"}]}), 400, Some("messages")),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}),
            400,
            Some("top_logprobs"),
        ),
    ] {
        let (got, body_out, _) = s.post(path, &body);
        assert_eq!(got, status, "{body}: {body_out}");
        let e = &body_out["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{body_out}");
        assert!(e["type"].is_string(), "{body_out}");
        if let Some(param) = param {
            assert_eq!(e["param"], param, "{body}: {body_out}");
        }
    }
    let (status, e, _) = s.post_raw("/v1/completions", "{not json", &[]);
    assert_eq!(status, 400, "{e}");
    assert!(e["error"]["message"].is_string());
    let (status, e, _) = s.post_raw("/v1/completions", &json!({"prompt": "a".repeat(4000)}).to_string(), &[]);
    assert_eq!(status, 413, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("too large"));
    let (status, _) = s.get("/v2/nothing");
    assert_eq!(status, 404);
    // The server still answers after all of that.
    let (status, _, _) = s.post("/v1/completions", &json!({"prompt": "a", "max_tokens": 2}));
    assert_eq!(status, 200);
}

#[test]
fn an_api_key_guards_v1_only() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(&tiny_checkpoint(dir.path()), options(), Some("sekrit"), DEFAULT_BODY_LIMIT);
    let body = json!({"prompt": "a", "max_tokens": 2}).to_string();
    for headers in [vec![], vec![("Authorization", "Bearer wrong")], vec![("Authorization", "sekrit")]] {
        let (status, e, _) = s.post_raw("/v1/completions", &body, &headers);
        assert_eq!(status, 401, "{headers:?}");
        assert_eq!(e["error"]["code"], "invalid_api_key");
    }
    let (status, _, _) = s.post_raw("/v1/completions", &body, &[("Authorization", "Bearer sekrit")]);
    assert_eq!(status, 200);
    assert_eq!(s.get("/v1/models").0, 401);
    assert_eq!(s.get("/health").0, 200);
}

#[test]
fn concurrent_requests_at_mixed_precisions_match_their_solo_answers() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(&dir);
    let body = |i: usize| json!({"prompt": format!("request {i} says"), "max_tokens": 20 + i, "temperature": 0.7, "seed": i, "precision": 2 + i % 7});
    // Alone, one at a time.
    let solo: Vec<String> = (0..14).map(|i| text_of(&s.post("/v1/completions", &body(i)).1)).collect();
    // All at once: they share decode steps across precisions and join/leave between steps.
    let together: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..14)
            .map(|i| {
                let s = &s;
                let b = body(i);
                scope.spawn(move || {
                    if i % 2 == 0 {
                        let (status, c, _) = s.post("/v1/completions", &b);
                        assert_eq!(status, 200, "{c}");
                        text_of(&c)
                    } else {
                        let mut b = b;
                        b["stream"] = json!(true);
                        stream_text(&s.stream("/v1/completions", &b)).0
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(together, solo, "a request's answer must not depend on what else is in the batch");
    s.wait_for_metric("drq_running_sequences", 0.0);
}

#[test]
fn a_full_queue_answers_503_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let opts = EngineOptions { max_batch: 1, max_queue: 1, ..options() };
    let s = TestServer::start(&tiny_checkpoint(dir.path()), opts, None, DEFAULT_BODY_LIMIT);
    let results: Vec<(u16, Value, Option<String>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                scope.spawn(|| {
                    s.post(
                        "/v1/completions",
                        &json!({"prompt": "a", "max_tokens": 200, "temperature": 0, "stop": "\u{1}never"}),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let refused: Vec<_> = results.iter().filter(|r| r.0 == 503).collect();
    let served = results.iter().filter(|r| r.0 == 200).count();
    assert!(
        !refused.is_empty() && served >= 1 && refused.len() + served == 8,
        "{:?}",
        results.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    for (_, e, retry) in refused {
        assert_eq!(retry.as_deref(), Some("1"));
        assert_eq!(e["error"]["code"], "overloaded");
    }
    assert!(s.metric("drq_requests_rejected_total") >= 1.0);
}

#[test]
fn a_client_that_disconnects_stops_its_generation() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(&dir);
    let body =
        json!({"prompt": "a", "max_tokens": 250, "temperature": 0, "stream": true, "stop": "\u{1}never"}).to_string();
    let mut tcp = TcpStream::connect(s.addr).unwrap();
    write!(tcp, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut reader = BufReader::new(tcp.try_clone().unwrap());
    let mut line = String::new();
    while !line.starts_with("data: ") {
        line.clear();
        reader.read_line(&mut line).unwrap();
    }
    drop(reader);
    tcp.shutdown(std::net::Shutdown::Both).unwrap();
    drop(tcp);
    let cancelled = "drq_sequences_finished_total{precision=\"8\",reason=\"cancelled\"}";
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.metric(cancelled) < 1.0 {
        assert!(Instant::now() < deadline, "the generation was not cancelled:\n{}", s.get("/metrics").1);
        std::thread::sleep(Duration::from_millis(20));
    }
    s.wait_for_metric("drq_running_sequences", 0.0);
    let generated = s.metric("drq_generated_tokens_total{precision=\"8\"}");
    assert!(generated < 250.0, "{generated} tokens generated for a client that left");
}

#[test]
fn a_profile_is_served_by_name_with_each_weight_at_its_bits() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_checkpoint(dir.path());
    let s = TestServer::start(&path, options(), None, DEFAULT_BODY_LIMIT);
    let checkpoint = model::checkpoint::Checkpoint::open(&path).unwrap();
    let resident = model::ResidentModel::from_checkpoint(&checkpoint).unwrap();
    let tokenizer = checkpoint.tokenizer().unwrap();
    let prompt = tokenizer.encode("the cat", false).unwrap().get_ids().to_vec();
    let eos = checkpoint.config().eos_token_ids.clone();
    let mut texts = Vec::new();
    for precision in ["mix", "3", "6"] {
        let t = model::Transformer::from_resident(
            &resident,
            &precision.parse().unwrap(),
            &kernels::KernelConfig::default(),
        )
        .unwrap();
        let expected = tokenizer.decode(&support::runtime_greedy(&t, &prompt, 30, &eos), true).unwrap();
        let (status, c, _) = s.post(
            "/v1/completions",
            &json!({"prompt": "the cat", "max_tokens": 30, "temperature": 0, "precision": precision}),
        );
        assert_eq!(status, 200, "{c}");
        assert_eq!(c["precision"], precision);
        assert_eq!(text_of(&c), expected, "{precision}");
        texts.push(expected);
    }
    assert!(
        texts[0] != texts[1] || texts[0] != texts[2],
        "the profile should differ from a uniform precision: {texts:?}"
    );
    assert!(s.get("/metrics").1.contains("drq_requests_total{precision=\"mix\"} 1"));
}
