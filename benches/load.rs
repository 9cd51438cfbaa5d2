//! Load tool: starts the real `cardvault serve` (release build) on
//! 127.0.0.1, provisions its own merchant and customers, drives it over TLS
//! with keep-alive HTTP/1.1 connections at a given concurrency for a bounded
//! time and request count, and prints throughput, latency percentiles and
//! the server's peak RSS per scenario, with each scenario's ratio to
//! `healthz` measured in the same run.
//!
//! ```text
//! cargo bench --bench load -- [--backends sqlite,postgres] [--modes envelope,hsm]
//!     [--scenarios healthz,add_card,get_card,list_cards,reveal,charge,healthz]
//!     [--connections 64] [--seconds 10] [--max-requests 500000]
//! ```
//! A second `healthz` is measured against the first: when the two differ by
//! more than 15% the run says so, because the ratios of the scenarios in
//! between are then off by about as much.
//! Only ever targets 127.0.0.1. Exits on its own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cardvault::testkit::luhn_pan;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_cardvault");
/// How far (in percent) the closing healthz may differ from the first one
/// before the run says its ratios are unreliable.
const DRIFT_PERCENT: f64 = 15.0;

struct Options {
    backends: Vec<String>,
    modes: Vec<String>,
    scenarios: Vec<String>,
    connections: usize,
    seconds: u64,
    max_requests: u64,
    smoke: bool,
}

fn options() -> Options {
    let mut o = Options {
        backends: vec!["sqlite".into(), "postgres".into()],
        modes: vec!["envelope".into(), "hsm".into()],
        scenarios: [
            "healthz",
            "add_card",
            "get_card",
            "list_cards",
            "reveal",
            "charge",
            // Again at the end: how far the machine's speed moved while the
            // ratios above were measured against the first one.
            "healthz",
        ]
        .map(String::from)
        .to_vec(),
        connections: 64,
        seconds: 10,
        max_requests: 500_000,
        smoke: false,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo test --all-targets` runs this without `--bench`: a short smoke
    // run that fails on any error.
    if !args.iter().any(|a| a == "--bench") {
        o.backends = vec!["sqlite".into()];
        o.modes = vec!["envelope".into()];
        o.connections = 4;
        o.seconds = 2;
        o.max_requests = 100;
        o.smoke = true;
    }
    let list = |v: &str| v.split(',').map(str::to_string).collect::<Vec<_>>();
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--backends" => o.backends = list(&value),
            "--modes" => o.modes = list(&value),
            "--scenarios" => o.scenarios = list(&value),
            "--connections" => o.connections = value.parse().expect("--connections N"),
            "--seconds" => o.seconds = value.parse().expect("--seconds N"),
            "--max-requests" => o.max_requests = value.parse().expect("--max-requests N"),
            // `cargo bench` passes --bench; ignore what is not ours.
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    o
}

struct Server {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cmd(dir: &Path, db: &str, mode: &str) -> Command {
    let mut c = Command::new(BIN);
    c.current_dir(dir)
        .env_remove("CARDVAULT_CONFIG")
        .env_remove("SOFTHSM2_CONF")
        .env("CARDVAULT_LISTEN", "127.0.0.1:0")
        .env("CARDVAULT_DATABASE_URL", db)
        .env("CARDVAULT_CRYPTO_MODE", mode)
        .env("CARDVAULT_LOG", "warn,cardvault=info");
    c
}

fn pg_load_database() -> String {
    format!("cv_load_{}", std::process::id())
}

/// Drops the load run's database (it holds every card the run added: a
/// few hundred MB after a 10 s add_card).
async fn drop_pg() {
    cardvault::testkit::drop_pg_database(&cardvault::testkit::pg_admin_url(), &pg_load_database())
        .await;
}

async fn fresh_pg() -> String {
    drop_pg().await;
    cardvault::testkit::create_pg_database(&cardvault::testkit::pg_admin_url(), &pg_load_database())
        .await
        .expect("PostgreSQL")
}

fn start(backend: &str, mode: &str, db: String) -> (Server, String) {
    let dir = tempfile::tempdir().unwrap();
    let db = if backend == "sqlite" {
        format!(
            "sqlite://{}",
            dir.path().join("data/cardvault.db").display()
        )
    } else {
        db
    };
    let out = cmd(dir.path(), &db, mode)
        .args(["merchant", "create", "--name", "load", "--reveal", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m: Value = serde_json::from_slice(&out.stdout).unwrap();
    let sk = m["secret_key"].as_str().unwrap().to_string();
    let mut child = cmd(dir.path(), &db, mode)
        .arg("serve")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("https://127.0.0.1:").nth(1) {
                let p: String = rest.chars().take_while(char::is_ascii_digit).collect();
                let _ = tx.send(p.parse::<u16>().unwrap());
            }
        }
    });
    let port = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("server start");
    (Server { child, port, dir }, sk)
}

fn client(cert: &Path, port: u16) -> reqwest::Client {
    let pem = std::fs::read(cert).unwrap();
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .resolve("localhost", ([127, 0, 0, 1], port).into())
        .http1_only()
        .pool_max_idle_per_host(1)
        .build()
        .unwrap()
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// CPU seconds (user + system) a process has used so far, from
/// `/proc/<pid>/stat` (fields 14 and 15, in clock ticks of 1/100 s, the
/// Linux default for `USER_HZ`).
fn cpu_seconds(pid: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // The fields after the command name, which may hold spaces.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            Some(ticks / 100.0)
        })
        .unwrap_or(0.0)
}

/// CPU seconds used so far by every process named `postgres` (on a
/// machine where PostgreSQL serves only this run, its share of the work).
fn postgres_cpu_seconds() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|pid| pid.bytes().all(|b| b.is_ascii_digit()))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "postgres")
        })
        .map(|pid| cpu_seconds(&pid))
        .sum()
}

/// CPU seconds of the server, of PostgreSQL and of this load client.
fn cpu_now(server: u32) -> [f64; 3] {
    [
        cpu_seconds(&server.to_string()),
        postgres_cpu_seconds(),
        cpu_seconds("self"),
    ]
}

/// Fixtures: per connection, a wallet customer with three saved cards
/// (read by get_card, list_cards, reveal and charge) and a customer that
/// add_card fills, so listings stay the size a real wallet has.
struct Fixture {
    /// (wallet customer, its first card, the customer add_card adds to)
    conns: Vec<(String, String, String)>,
}

async fn provision(c: &reqwest::Client, base: &str, sk: &str, n: usize) -> Fixture {
    let post = |path: String, body: Value| {
        let req = c.post(format!("{base}{path}")).bearer_auth(sk).json(&body);
        async move {
            let r = req.send().await.unwrap();
            assert!(r.status().is_success(), "provisioning {}", r.status());
            r.json::<Value>().await.unwrap()
        }
    };
    let mut conns = Vec::new();
    for i in 0..n as u64 {
        let wallet = post(
            "/v1/customers".into(),
            json!({"email": format!("wallet{i}@example.com")}),
        )
        .await;
        let wallet = wallet["id"].as_str().unwrap().to_string();
        let mut first = String::new();
        for k in 0..3u64 {
            let card = post(
                format!("/v1/customers/{wallet}/cards"),
                json!({"number": luhn_pan("4000", 9_000_000_000 + i * 10 + k), "exp_month": 12, "exp_year": 2031}),
            )
            .await;
            if k == 0 {
                first = card["id"].as_str().unwrap().to_string();
            }
        }
        let sink = post(
            "/v1/customers".into(),
            json!({"email": format!("sink{i}@example.com")}),
        )
        .await;
        conns.push((wallet, first, sink["id"].as_str().unwrap().to_string()));
    }
    Fixture { conns }
}

struct Outcome {
    requests: u64,
    errors: u64,
    elapsed: Duration,
    latencies_us: Vec<u64>,
}

async fn run_scenario(
    name: &str,
    clients: &[reqwest::Client],
    base: &str,
    sk: &str,
    fx: &Fixture,
    opts: &Options,
    pan_counter: &Arc<AtomicU64>,
) -> Outcome {
    let deadline = Instant::now() + Duration::from_secs(opts.seconds);
    let budget = Arc::new(AtomicU64::new(opts.max_requests));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let (c, base, sk, name) = (
            c.clone(),
            base.to_string(),
            sk.to_string(),
            name.to_string(),
        );
        let (cus, card, sink) = fx.conns[i % fx.conns.len()].clone();
        let budget = Arc::clone(&budget);
        let pans = Arc::clone(pan_counter);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(4096);
            let mut errors = 0u64;
            while Instant::now() < deadline {
                if budget
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1))
                    .is_err()
                {
                    break;
                }
                let t = Instant::now();
                let req = match name.as_str() {
                    "healthz" => c.get(format!("{base}/healthz")),
                    "add_card" => {
                        let n = pans.fetch_add(1, Ordering::Relaxed);
                        c.post(format!("{base}/v1/customers/{sink}/cards"))
                            .bearer_auth(&sk)
                            .json(&json!({"number": luhn_pan("4000", 1_000_000_000 + n), "exp_month": 12, "exp_year": 2031}))
                    }
                    "get_card" => c
                        .get(format!("{base}/v1/customers/{cus}/cards/{card}"))
                        .bearer_auth(&sk),
                    "list_cards" => c
                        .get(format!("{base}/v1/customers/{cus}/cards"))
                        .bearer_auth(&sk),
                    "reveal" => c
                        .post(format!("{base}/v1/cards/{card}/reveal"))
                        .bearer_auth(&sk),
                    // A sandbox authorization and capture of the saved card.
                    "charge" => c
                        .post(format!("{base}/v1/charges"))
                        .bearer_auth(&sk)
                        .json(&json!({"amount": 1999, "currency": "USD", "customer": cus, "card": card})),
                    other => panic!("unknown scenario {other}"),
                };
                match req.send().await {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                    }
                    _ => errors += 1,
                }
                lat.push(t.elapsed().as_micros() as u64);
            }
            (lat, errors)
        }));
    }
    let mut latencies_us = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.unwrap();
        latencies_us.extend(l);
        errors += e;
    }
    Outcome {
        requests: latencies_us.len() as u64,
        errors,
        elapsed: started.elapsed(),
        latencies_us,
    }
}

/// The server's `/metrics` counters (loopback only).
async fn counters(c: &reqwest::Client, base: &str) -> std::collections::HashMap<String, f64> {
    let text = c
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(' '))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}

fn delta(
    after: &std::collections::HashMap<String, f64>,
    before: &std::collections::HashMap<String, f64>,
    name: &str,
) -> f64 {
    after.get(name).copied().unwrap_or(0.0) - before.get(name).copied().unwrap_or(0.0)
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx] as f64 / 1000.0
}

fn main() {
    let opts = options();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "load: {} connections, {} s or {} requests per scenario, client and server on this machine ({} cores)",
        opts.connections,
        opts.seconds,
        opts.max_requests,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    for backend in &opts.backends {
        for mode in &opts.modes {
            let db = if backend == "postgres" {
                rt.block_on(fresh_pg())
            } else {
                String::new()
            };
            let (server, sk) = start(backend, mode, db);
            let cert: PathBuf = server.dir.path().join("data/tls/cert.pem");
            let base = format!("https://localhost:{}", server.port);
            let pid = server.child.id();
            println!("\n## {backend} / {mode}\n");
            println!("| scenario | req/s | % of healthz | p50 ms | p90 ms | p99 ms | max ms | errors | HSM ops/req | writes/commit | writer ms/batch (units / flush / commit) | writer busy | reads/query | CPU µs/req (server / PostgreSQL / client) | peak RSS MiB |");
            println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
            rt.block_on(async {
                let clients: Vec<_> = (0..opts.connections)
                    .map(|_| client(&cert, server.port))
                    .collect();
                let fx = provision(&clients[0], &base, &sk, opts.connections).await;
                let pans = Arc::new(AtomicU64::new(0));
                let mut healthz = None;
                let mut closing_healthz = None;
                for s in &opts.scenarios {
                    let before = counters(&clients[0], &base).await;
                    let started = Instant::now();
                    let cpu_before = cpu_now(pid);
                    let o = run_scenario(s, &clients, &base, &sk, &fx, &opts, &pans).await;
                    let cpu_after = cpu_now(pid);
                    let window_s = started.elapsed().as_secs_f64();
                    let after = counters(&clients[0], &base).await;
                    let hsm = delta(&after, &before, "cardvault_hsm_operations_total");
                    let units = delta(&after, &before, "cardvault_db_write_units_total");
                    let batches = delta(&after, &before, "cardvault_db_write_batches_total");
                    // Reads per batched read query (PostgreSQL).
                    let read_queries = delta(&after, &before, "cardvault_db_read_batches_total");
                    let per_query = if read_queries == 0.0 {
                        "-".to_string()
                    } else {
                        let reads = delta(&after, &before, "cardvault_db_batched_reads_total");
                        format!("{:.1}", reads / read_queries)
                    };
                    // Writes per commit, the writer's milliseconds per
                    // batch in its three phases (units / flush / commit),
                    // and the share of the scenario's time it spent in
                    // them: near 100%, the one writer is what limits the
                    // scenario's writes.
                    let (per_commit, batch_ms, busy) = if batches == 0.0 {
                        ("-".to_string(), "-".to_string(), "-".to_string())
                    } else {
                        let phase = |p: &str| {
                            let name = format!("cardvault_db_write_seconds_total{{phase=\"{p}\"}}");
                            delta(&after, &before, &name)
                        };
                        let (units_s, flush_s, commit_s) =
                            (phase("units"), phase("flush"), phase("commit"));
                        let busy = (units_s + flush_s + commit_s) / window_s;
                        // One writer per storage: it cannot be busy for
                        // much longer than the window it was measured over
                        // (a background batch that began before the window
                        // and ended in it counts whole).
                        assert!(
                            !opts.smoke || busy <= 1.25,
                            "{s}: writer busy {busy:.3} of the scenario's time"
                        );
                        (
                            format!("{:.1}", units / batches),
                            format!(
                                "{:.2} / {:.2} / {:.2}",
                                1e3 * units_s / batches,
                                1e3 * flush_s / batches,
                                1e3 * commit_s / batches
                            ),
                            format!("{:.0}%", 100.0 * busy),
                        )
                    };
                    // CPU per request: unlike req/s, it hardly moves with
                    // the VM's spare capacity, so it tells builds apart.
                    let cpu = {
                        let per = |i: usize| {
                            1e6 * (cpu_after[i] - cpu_before[i]) / o.requests.max(1) as f64
                        };
                        format!("{:.0} / {:.0} / {:.0}", per(0), per(1), per(2))
                    };
                    let mut l = o.latencies_us;
                    l.sort_unstable();
                    let rps = o.requests as f64 / o.elapsed.as_secs_f64();
                    // The first healthz is what the ratios are to; a later
                    // one shows how far the machine's speed moved since.
                    let again = s == "healthz" && healthz.is_some();
                    if s == "healthz" && healthz.is_none() {
                        healthz = Some(rps);
                    }
                    assert!(
                        !opts.smoke || mode != "envelope" || hsm == 0.0,
                        "{s}: {hsm} HSM operations in envelope mode"
                    );
                    assert!(
                        !opts.smoke || (o.errors == 0 && o.requests > 0),
                        "{s}: {} errors",
                        o.errors
                    );
                    let ratio = healthz
                        .map(|h| format!("{:.0}%", 100.0 * rps / h))
                        .unwrap_or_else(|| "-".into());
                    let name = if again { "healthz (again)" } else { s.as_str() };
                    if again {
                        closing_healthz = Some(rps);
                    }
                    println!(
                        "| {name} | {rps:.0} | {ratio} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {:.2} | {per_commit} | {batch_ms} | {busy} | {per_query} | {cpu} | {:.0} |",
                        pct(&l, 0.50),
                        pct(&l, 0.90),
                        pct(&l, 0.99),
                        l.last().copied().unwrap_or(0) as f64 / 1000.0,
                        o.errors,
                        hsm / o.requests.max(1) as f64,
                        peak_rss_kib(pid) as f64 / 1024.0
                    );
                }
                if let (Some(first), Some(last)) = (healthz, closing_healthz) {
                    let moved = 100.0 * (last / first - 1.0);
                    if moved.abs() > DRIFT_PERCENT {
                        println!(
                            "\nhealthz moved {moved:+.0}% during this run ({first:.0} then {last:.0} req/s): \
                             the machine's speed changed, so the ratios above are off by up to that much; \
                             the CPU column is the steadier comparison."
                        );
                    }
                }
            });
            drop(server);
            if backend == "postgres" {
                rt.block_on(drop_pg());
            }
        }
    }
}
