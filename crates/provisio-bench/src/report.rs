//! What a run measured, as typed values, and how it is printed: a Markdown table per
//! round, the ratios to the baselines, their medians over rounds, and `--json`.

use std::time::Duration;

use serde_json::{Value, json};

/// Latency percentiles of one scenario's successful jobs, in milliseconds (0 when none
/// succeeded).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Slowest.
    pub max: f64,
}

impl Latency {
    /// The percentiles of `us` (microseconds; sorted in place).
    pub(crate) fn of(us: &mut [u32]) -> Self {
        us.sort_unstable();
        Self { p50: pct(us, 0.5), p99: pct(us, 0.99), max: pct(us, 1.0) }
    }
}

/// `v` sorted, in µs; the result in ms.
fn pct(v: &[u32], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    f64::from(v[i.min(v.len() - 1)]) / 1000.0
}

/// One scenario's measurements in one round.
#[derive(Debug, Default, Clone)]
pub struct Row {
    /// What was measured, e.g. `HTTPS, keep-alive` or `baseline: TLS handshake`.
    pub scenario: String,
    /// How the devices attested (`-` for the baselines).
    pub attestation: String,
    /// Jobs run: devices registered, or requests or handshakes for the baselines.
    pub ops: usize,
    /// Jobs that completed and returned success (counted, not derived from `ops`).
    pub succeeded: usize,
    /// `ops - succeeded`: jobs that failed, panicked, or were lost with a crashed worker.
    pub errors: usize,
    /// Wall-clock seconds the scenario took.
    pub secs: f64,
    /// The first request's latency (`PUT …/register`, the handshake, the trivial request).
    pub register: Latency,
    /// From the first request to `assigned` (the whole job).
    pub assigned: Latency,
    /// The server's resident memory at the end of the scenario.
    pub rss_mb: f64,
    /// CPU the server used during the scenario.
    pub server_cpu_secs: f64,
    /// CPU the load generator (this process) used during the scenario.
    pub client_cpu_secs: f64,
    /// The first failure: a job's error, or a panic (of a job or of a worker).
    pub first_error: Option<String>,
}

impl Row {
    /// Successful operations per second.
    #[must_use]
    pub fn rate(&self) -> f64 {
        self.succeeded as f64 / self.secs.max(1e-9)
    }

    /// Server CPU per successful operation, in microseconds: what one operation costs the
    /// server, whatever the load generator beside it costs.
    #[must_use]
    pub fn server_us(&self) -> f64 {
        self.server_cpu_secs * 1e6 / (self.succeeded.max(1) as f64)
    }

    /// The load generator's CPU per successful operation, in microseconds.
    #[must_use]
    pub fn client_us(&self) -> f64 {
        self.client_cpu_secs * 1e6 / (self.succeeded.max(1) as f64)
    }

    fn json(&self, round: usize) -> Value {
        let (f, t) = (self.register, self.assigned);
        json!({"round": round + 1, "scenario": self.scenario, "attestation": self.attestation, "ops": self.ops,
            "succeeded": self.succeeded, "errors": self.errors, "rate": self.rate(),
            "p50": f.p50, "p99": f.p99, "max": f.max, "total_p50": t.p50, "total_p99": t.p99, "total_max": t.max,
            "rss_mb": self.rss_mb, "server_cpu_us": self.server_us(), "client_cpu_us": self.client_us(),
            "first_error": self.first_error})
    }
}

/// A scenario compared with a baseline of the same round, in percent.
#[derive(Debug, Clone, PartialEq)]
pub struct Ratio {
    /// What is compared, e.g. `keep-alive registrations / trivial requests`; the names
    /// starting with `by server CPU:` compare the server's CPU per operation instead of rates.
    pub name: String,
    /// The ratio in percent.
    pub percent: f64,
}

/// One round: every selected scenario once.
#[derive(Debug, Clone)]
pub struct Round {
    /// One row per scenario and attestation, in the order they ran.
    pub rows: Vec<Row>,
    /// The ratios of this round's rows to its baselines (those whose rows ran).
    pub ratios: Vec<Ratio>,
}

impl Round {
    pub(crate) fn new(rows: Vec<Row>) -> Self {
        let ratios = ratios(&rows);
        Self { rows, ratios }
    }

    /// The row of `scenario` and `attestation`, if it ran.
    #[must_use]
    pub fn row(&self, scenario: &str, attestation: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.scenario == scenario && r.attestation == attestation)
    }
}

/// A scenario across rounds.
#[derive(Debug, Clone, PartialEq)]
pub struct ScenarioMedian {
    /// As in [`Row::scenario`].
    pub scenario: String,
    /// As in [`Row::attestation`].
    pub attestation: String,
    /// Each round's rate.
    pub rates: Vec<f64>,
    /// Their median.
    pub rate: f64,
    /// Median server CPU per operation (µs).
    pub server_cpu_us: f64,
    /// Median load generator CPU per operation (µs).
    pub client_cpu_us: f64,
}

/// A ratio across rounds.
#[derive(Debug, Clone, PartialEq)]
pub struct RatioMedian {
    /// As in [`Ratio::name`].
    pub name: String,
    /// Each round's value (percent).
    pub per_round: Vec<f64>,
    /// Their median.
    pub median: f64,
}

/// Medians over the rounds (with `--rounds` above 1).
#[derive(Debug, Clone, PartialEq)]
pub struct Medians {
    /// One per scenario of the first round.
    pub scenarios: Vec<ScenarioMedian>,
    /// One per ratio of the first round.
    pub ratios: Vec<RatioMedian>,
}

/// The idle MQTT connections of `--mqtt-hold`, and the server's RSS before and after.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldMqtt {
    /// Connections asked for.
    pub requested: usize,
    /// Connections whose CONNACK carried return code 0 (accepted), held open to the end.
    pub accepted: usize,
    /// Connections answered with a CONNACK of another return code.
    pub refused: usize,
    /// Connections that got no CONNACK (TCP, TLS or I/O error, timeout, another packet).
    pub failed: usize,
    /// The first refusal or failure.
    pub first_failure: Option<String>,
    /// Server RSS before the first connection.
    pub rss_before_mb: f64,
    /// Server RSS with the accepted connections held.
    pub rss_after_mb: f64,
}

/// Everything a run measured.
#[derive(Debug, Clone)]
pub struct Report {
    /// Each round, in order.
    pub rounds: Vec<Round>,
    /// Medians over the rounds; `None` with one round.
    pub medians: Option<Medians>,
    /// Server spawn to its info line (ready to serve).
    pub startup: Duration,
    /// Server spawn to its key filter being built; `None` with PostgreSQL or when the
    /// server did not log it within 60 s.
    pub filter_built: Option<Duration>,
    /// Whether the server ran on the embedded store (no `--database`).
    pub embedded_store: bool,
    /// Individual enrollments preloaded into the store (`--enrollments`; the run checks
    /// that the server sees them).
    pub enrollments: usize,
    /// `--mqtt-hold`'s connections, if asked for.
    pub held_mqtt: Option<HeldMqtt>,
}

impl Report {
    /// The report as the one JSON object `--json` prints.
    #[must_use]
    pub fn to_json(&self) -> Value {
        let mut rows = Vec::new();
        let mut ratios_json = Vec::new();
        for (i, round) in self.rounds.iter().enumerate() {
            rows.extend(round.rows.iter().map(|r| r.json(i)));
            ratios_json.push(json!(
                round.ratios.iter().map(|r| json!({"ratio": r.name, "percent": r.percent})).collect::<Vec<_>>()
            ));
        }
        let medians = self.medians.as_ref().map(|m| {
            json!({
                "scenarios": m.scenarios.iter().map(|s| json!({"scenario": s.scenario, "attestation": s.attestation,
                    "rates": s.rates, "rate": s.rate, "server_cpu_us": s.server_cpu_us, "client_cpu_us": s.client_cpu_us}))
                    .collect::<Vec<_>>(),
                "ratios": m.ratios.iter().map(|r| json!({"ratio": r.name, "per_round": r.per_round, "median": r.median}))
                    .collect::<Vec<_>>(),
            })
        });
        let held = self.held_mqtt.as_ref().map(|h| {
            json!({"connections": h.requested, "accepted": h.accepted, "refused": h.refused, "failed": h.failed,
                "first_failure": h.first_failure, "rss_before_mb": h.rss_before_mb, "rss_after_mb": h.rss_after_mb})
        });
        json!({"rows": rows, "ratios": ratios_json, "medians": medians, "startup_ms": self.startup.as_millis() as u64,
            "filter_built_ms": self.filter_built.map(|t| t.as_millis() as u64), "enrollments": self.enrollments,
            "held_mqtt": held})
    }

    /// Prints what follows the rounds' tables: the medians (with several rounds), the
    /// server's start-up, the held MQTT connections, and the JSON object with `json`.
    pub(crate) fn print_summary(&self, json: bool) {
        if let Some(m) = &self.medians {
            print_medians(self.rounds.len(), m);
        }
        println!(
            "server startup (spawn to ready, {} preloaded enrollments): {:.0} ms{}",
            self.enrollments,
            self.startup.as_secs_f64() * 1000.0,
            match (self.embedded_store, self.filter_built) {
                (true, Some(t)) => format!("; its key filter built {:.0} ms after spawn", t.as_secs_f64() * 1000.0),
                (true, None) => "; its key filter not built within 60 s".to_owned(),
                (false, _) => String::new(),
            }
        );
        if let Some(h) = &self.held_mqtt {
            println!(
                "{} idle MQTT connections held: server RSS {:.0} MB -> {:.0} MB",
                h.accepted, h.rss_before_mb, h.rss_after_mb
            );
            if h.accepted < h.requested {
                eprintln!(
                    "  MQTT connections not held: {} refused, {} failed, of {}; first: {}",
                    h.refused,
                    h.failed,
                    h.requested,
                    h.first_failure.as_deref().unwrap_or("-")
                );
            }
        }
        if json {
            println!("{}", self.to_json());
        }
    }
}

/// Prints a round's table (and each scenario's first error).
pub(crate) fn print_rows(rows: &[Row]) {
    println!(
        "| scenario | attestation | devices | errors | registrations/s | register p50 / p99 / max (ms) | register→assigned p50 / p99 / max (ms) | server RSS (MB) | server CPU per op (µs) | load generator CPU per op (µs) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let (f, t) = (r.register, r.assigned);
        println!(
            "| {} | {} | {} | {} | {:.0} | {:.2} / {:.2} / {:.2} | {:.2} / {:.2} / {:.2} | {:.0} | {:.0} | {:.0} |",
            r.scenario,
            r.attestation,
            r.ops,
            r.errors,
            r.rate(),
            f.p50,
            f.p99,
            f.max,
            t.p50,
            t.p99,
            t.max,
            r.rss_mb,
            r.server_us(),
            r.client_us()
        );
        if let Some(e) = &r.first_error {
            eprintln!("  first error in '{}': {e}", r.scenario);
        }
    }
}

/// The ratios of a round, in percent: by rate (what the targets are stated in), then by
/// the server's own CPU (which the load generator beside it does not distort).
fn ratios(rows: &[Row]) -> Vec<Ratio> {
    let find = |s: &str, a: &str| rows.iter().find(|r| r.scenario.starts_with(s) && r.attestation.starts_with(a));
    let mut out = Vec::new();
    let mut push = |name: String, percent: f64| out.push(Ratio { name, percent });
    if let (Some(ka), Some(tr)) = (find("HTTPS, keep-alive", "symmetric"), find("baseline: trivial", "-")) {
        push("keep-alive registrations / trivial requests".to_owned(), 100.0 * ka.rate() / tr.rate().max(1e-9));
        push(
            "by server CPU: keep-alive registrations / trivial requests".to_owned(),
            100.0 * tr.server_us() / ka.server_us().max(1e-9),
        );
    }
    if let (Some(ka), Some(csr)) = (find("HTTPS, keep-alive", "symmetric"), find("HTTPS with a CSR", "symmetric")) {
        push("registrations with a CSR / without".to_owned(), 100.0 * csr.rate() / ka.rate().max(1e-9));
        push(
            "by server CPU: registrations with a CSR / without".to_owned(),
            100.0 * ka.server_us() / csr.server_us().max(1e-9),
        );
    }
    if let Some(hs) = find("baseline: TLS handshake", "-") {
        for a in ["symmetric", "X.509"] {
            if let Some(nc) = find("HTTPS, new TLS", a) {
                push(
                    format!("new-connection registrations ({a}) / bare handshakes"),
                    100.0 * nc.rate() / hs.rate().max(1e-9),
                );
                push(
                    format!("by server CPU: new-connection registrations ({a}) / bare handshakes"),
                    100.0 * hs.server_us() / nc.server_us().max(1e-9),
                );
            }
        }
    }
    out
}

/// Prints a round's ratios, with what each costs in the server's CPU.
pub(crate) fn print_ratios(round: &Round) {
    println!();
    for r in round.ratios.iter().filter(|r| !r.name.starts_with("by server CPU")) {
        let note = if r.name.starts_with("keep-alive") { " (ceiling 50%: a registration is two requests)" } else { "" };
        println!("{}: {:.1}%{note}", r.name, r.percent);
    }
    let cpu = |s: &str, a: &str| {
        round.rows.iter().find(|r| r.scenario.starts_with(s) && r.attestation.starts_with(a)).map(Row::server_us)
    };
    if let (Some(ka), Some(tr)) = (cpu("HTTPS, keep-alive", "symmetric"), cpu("baseline: trivial", "-")) {
        println!(
            "by server CPU: a keep-alive registration costs {ka:.0} µs = {:.1} trivial requests ({:.0} registrations/s per server core)",
            ka / tr.max(1e-9),
            1e6 / ka.max(1e-9)
        );
    }
    if let Some(hs) = cpu("baseline: TLS handshake", "-") {
        for a in ["symmetric", "X.509"] {
            if let Some(nc) = cpu("HTTPS, new TLS", a) {
                println!(
                    "by server CPU: a new-connection registration ({a}) costs {nc:.0} µs = {:.2} bare handshakes ({:.1}% of the handshake rate)",
                    nc / hs.max(1e-9),
                    100.0 * hs / nc.max(1e-9)
                );
            }
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => f64::midpoint(v[n / 2 - 1], v[n / 2]),
    }
}

/// Across rounds: each scenario's rate and CPU per round with their medians, and each
/// ratio's.
pub(crate) fn medians(rounds: &[Round]) -> Medians {
    let mut scenarios = Vec::new();
    for r in rounds.first().map_or(&[][..], |r| r.rows.as_slice()) {
        let same: Vec<&Row> = rounds.iter().filter_map(|round| round.row(&r.scenario, &r.attestation)).collect();
        let rates: Vec<f64> = same.iter().map(|x| x.rate()).collect();
        scenarios.push(ScenarioMedian {
            scenario: r.scenario.clone(),
            attestation: r.attestation.clone(),
            rate: median(rates.clone()),
            rates,
            server_cpu_us: median(same.iter().map(|x| x.server_us()).collect()),
            client_cpu_us: median(same.iter().map(|x| x.client_us()).collect()),
        });
    }
    let mut ratios = Vec::new();
    for (i, first) in rounds.first().map_or(&[][..], |r| r.ratios.as_slice()).iter().enumerate() {
        let per_round: Vec<f64> = rounds.iter().filter_map(|r| r.ratios.get(i).map(|x| x.percent)).collect();
        ratios.push(RatioMedian { name: first.name.clone(), median: median(per_round.clone()), per_round });
    }
    Medians { scenarios, ratios }
}

fn print_medians(n: usize, m: &Medians) {
    println!("medians of {n} rounds");
    println!(
        "| scenario | attestation | registrations/s per round | median | server CPU per op (µs), median | load generator CPU per op (µs), median |"
    );
    println!("|---|---|---|---|---|---|");
    for s in &m.scenarios {
        let each: Vec<String> = s.rates.iter().map(|v| format!("{v:.0}")).collect();
        println!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.0} |",
            s.scenario,
            s.attestation,
            each.join(", "),
            s.rate,
            s.server_cpu_us,
            s.client_cpu_us
        );
    }
    println!();
    for r in &m.ratios {
        let each: Vec<String> = r.per_round.iter().map(|v| format!("{v:.1}%")).collect();
        println!("{}: median {:.1}% ({})", r.name, r.median, each.join(", "));
    }
}
