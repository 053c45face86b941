//! Prometheus metrics (`GET /metrics`, OpenMetrics text), labelled by precision where it applies.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PrecisionLabel {
    pub precision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FinishLabel {
    pub precision: String,
    pub reason: String,
}

type LatencyFamily = Family<PrecisionLabel, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    pub requests: Family<PrecisionLabel, Counter>,
    /// Sequences (choices) ended, by reason: stop, length, cancelled (client gone), error.
    pub finished: Family<FinishLabel, Counter>,
    pub rejected: Counter,
    pub prompt_tokens: Family<PrecisionLabel, Counter>,
    pub generated_tokens: Family<PrecisionLabel, Counter>,
    pub queue_depth: Gauge,
    pub running: Gauge,
    pub time_to_first_token: LatencyFamily,
    pub inter_token_latency: LatencyFamily,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~33 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 17))
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("drq");
        let requests = Family::default();
        let finished = Family::default();
        let rejected = Counter::default();
        let prompt_tokens = Family::default();
        let generated_tokens = Family::default();
        let queue_depth = Gauge::default();
        let running = Gauge::default();
        let time_to_first_token = LatencyFamily::new_with_constructor(latency_histogram);
        let inter_token_latency = LatencyFamily::new_with_constructor(latency_histogram);
        registry.register("requests", "Generation requests accepted", requests.clone());
        registry.register("sequences_finished", "Sequences (choices) ended, by reason", finished.clone());
        registry.register("requests_rejected", "Requests refused because the queue was full", rejected.clone());
        registry.register("prompt_tokens", "Prompt tokens processed", prompt_tokens.clone());
        registry.register("generated_tokens", "Tokens generated", generated_tokens.clone());
        registry.register("queue_depth", "Requests waiting for a batch slot", queue_depth.clone());
        registry.register("running_sequences", "Sequences in the running batch", running.clone());
        registry.register(
            "time_to_first_token_seconds",
            "From the request's arrival to its first generated token",
            time_to_first_token.clone(),
        );
        registry.register(
            "inter_token_latency_seconds",
            "Between consecutive tokens of a sequence",
            inter_token_latency.clone(),
        );
        Self {
            registry,
            requests,
            finished,
            rejected,
            prompt_tokens,
            generated_tokens,
            queue_depth,
            running,
            time_to_first_token,
            inter_token_latency,
        }
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

pub fn precision_label(precision: &model::Precision) -> PrecisionLabel {
    PrecisionLabel { precision: precision.to_string() }
}
