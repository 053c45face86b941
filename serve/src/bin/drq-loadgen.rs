//! `drq-loadgen`: N concurrent streaming clients against an OpenAI-compatible server for a
//! bounded time, mixing precisions; reports errors, time to first token and inter-token latency
//! (p50/p99), and tokens/s per precision. Each client is a thread with a blocking HTTP client:
//! token arrival times are read off the server-sent events as they come.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::Serialize;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    name = "drq-loadgen",
    version,
    about = "Load-test an OpenAI-compatible server with concurrent streaming clients mixing precisions"
)]
struct Args {
    /// Server base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Concurrent clients (each sends one request at a time, back to back).
    #[arg(short = 'c', long, default_value_t = 4)]
    clients: usize,
    /// Seconds during which new requests are sent (requests in flight then finish).
    #[arg(short, long, default_value_t = 30.0)]
    duration: f64,
    /// Precisions the requests cycle through (`precision` field), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "8,4,2")]
    precisions: Vec<String>,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Prompt of every request (client and request number are appended to vary it).
    #[arg(long, default_value = "Write a short story about a lighthouse keeper who")]
    prompt: String,
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Bearer token.
    #[arg(long, env = "DRQ_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One finished request.
struct Sample {
    precision: String,
    ok: bool,
    tokens: usize,
    ttft: Option<f64>,
    itl: Vec<f64>,
}

#[derive(Serialize)]
struct Summary {
    requests: usize,
    errors: usize,
    tokens: usize,
    tokens_per_second: f64,
    ttft_p50_ms: f64,
    ttft_p99_ms: f64,
    itl_p50_ms: f64,
    itl_p99_ms: f64,
}

fn main() {
    cli::run_main(|| run(Args::parse()));
}

fn run(args: Args) -> Result<()> {
    if args.clients == 0 || args.precisions.is_empty() {
        bail!("need at least one client and one precision");
    }
    let agent = ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(5)).build();
    let health = format!("{}/health", args.url.trim_end_matches('/'));
    agent.get(&health).call().with_context(|| format!("the server does not answer at {health}"))?;
    let url = format!("{}/v1/completions", args.url.trim_end_matches('/'));
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.duration);
    let samples: Vec<Sample> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..args.clients)
            .map(|client| {
                let (agent, url, args) = (&agent, &url, &args);
                scope.spawn(move || {
                    let mut out = Vec::new();
                    let mut i = 0;
                    while Instant::now() < deadline {
                        let precision = &args.precisions[(client + i) % args.precisions.len()];
                        out.push(one_request(agent, url, args, precision, client, i));
                        i += 1;
                    }
                    out
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("client thread")).collect()
    });
    let elapsed = started.elapsed().as_secs_f64();

    let mut by_precision: BTreeMap<String, Vec<&Sample>> = BTreeMap::new();
    for s in &samples {
        by_precision.entry(s.precision.clone()).or_default().push(s);
    }
    let all: Vec<&Sample> = samples.iter().collect();
    let total = summarize(&all, elapsed);
    println!(
        "{} clients, {:.1} s (sending for {:.0} s), {} tokens per request, precisions {}",
        args.clients,
        elapsed,
        args.duration,
        args.max_tokens,
        args.precisions.join(",")
    );
    println!(
        "{:<10} {:>8} {:>6} {:>8} {:>9} {:>10} {:>10} {:>9} {:>9}",
        "precision", "requests", "errors", "tokens", "tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99"
    );
    let mut rows = BTreeMap::new();
    for (precision, group) in &by_precision {
        let s = summarize(group, elapsed);
        print_row(precision, &s);
        rows.insert(precision.clone(), s);
    }
    print_row("all", &total);
    if let Some(path) = &args.json {
        let report = json!({
            "url": args.url, "clients": args.clients, "duration_s": args.duration, "elapsed_s": elapsed,
            "max_tokens": args.max_tokens, "precisions": args.precisions, "by_precision": rows, "all": total,
        });
        cli::write_atomically(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
    }
    if total.errors > 0 {
        bail!("{} of {} requests failed", total.errors, total.requests);
    }
    Ok(())
}

fn print_row(label: &str, s: &Summary) {
    println!(
        "{label:<10} {:>8} {:>6} {:>8} {:>9.1} {:>8.1}ms {:>8.1}ms {:>7.1}ms {:>7.1}ms",
        s.requests, s.errors, s.tokens, s.tokens_per_second, s.ttft_p50_ms, s.ttft_p99_ms, s.itl_p50_ms, s.itl_p99_ms
    );
}

fn one_request(agent: &ureq::Agent, url: &str, args: &Args, precision: &str, client: usize, i: usize) -> Sample {
    let mut sample = Sample { precision: precision.to_string(), ok: false, tokens: 0, ttft: None, itl: Vec::new() };
    let body = json!({
        "prompt": format!("{} (client {client}, request {i})", args.prompt),
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "seed": (client * 1_000_003 + i) as u64,
        "precision": precision,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let mut request = agent.post(url);
    if let Some(key) = &args.api_key {
        request = request.set("Authorization", &format!("Bearer {key}"));
    }
    let sent = Instant::now();
    let response = match request.send_json(body) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("request failed: {e}");
            return sample;
        }
    };
    let mut last = sent;
    for line in BufReader::new(response.into_reader()).lines() {
        let Ok(line) = line else { return sample };
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            sample.ok = true;
            break;
        }
        let Ok(chunk) = serde_json::from_str::<Value>(data) else { return sample };
        if let Some(n) = chunk["usage"]["completion_tokens"].as_u64() {
            sample.tokens = n as usize;
        }
        let has_text = chunk["choices"].get(0).and_then(|c| c["text"].as_str()).is_some_and(|t| !t.is_empty());
        if has_text {
            let now = Instant::now();
            match sample.ttft {
                None => sample.ttft = Some((now - sent).as_secs_f64()),
                Some(_) => sample.itl.push((now - last).as_secs_f64()),
            }
            last = now;
        }
    }
    sample
}

fn summarize(samples: &[&Sample], elapsed: f64) -> Summary {
    let ok: Vec<&&Sample> = samples.iter().filter(|s| s.ok).collect();
    let mut ttft: Vec<f64> = ok.iter().filter_map(|s| s.ttft).collect();
    let mut itl: Vec<f64> = ok.iter().flat_map(|s| s.itl.iter().copied()).collect();
    let tokens = ok.iter().map(|s| s.tokens).sum();
    Summary {
        requests: samples.len(),
        errors: samples.len() - ok.len(),
        tokens,
        tokens_per_second: tokens as f64 / elapsed,
        ttft_p50_ms: percentile(&mut ttft, 0.5) * 1e3,
        ttft_p99_ms: percentile(&mut ttft, 0.99) * 1e3,
        itl_p50_ms: percentile(&mut itl, 0.5) * 1e3,
        itl_p99_ms: percentile(&mut itl, 0.99) * 1e3,
    }
}

/// Nearest-rank percentile; NaN when empty.
fn percentile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}
