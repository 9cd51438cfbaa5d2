//! Tests of the real `cardvault` binary: start with no configuration file,
//! the CLI, and a SIGKILL right after acknowledged writes.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use cardvault::crypto::CryptoMode;
use serde_json::{json, Value};

use cardvault::testkit::luhn_pan;

use crate::matrix;
use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_cardvault");

struct Server {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
}

fn command(dir: &Path, db_url: &str, mode: CryptoMode) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir)
        .env_remove("CARDVAULT_CONFIG")
        .env_remove("SOFTHSM2_CONF")
        .env("CARDVAULT_LISTEN", "127.0.0.1:0")
        .env("CARDVAULT_DATABASE_URL", db_url)
        .env("CARDVAULT_CRYPTO_MODE", mode.as_str())
        .env("CARDVAULT_LOG", "debug");
    cmd
}

/// Starts `cardvault serve` with no config file in `dir` (so `./data`) and
/// waits for its listening line. Everything it logs goes to a file.
fn start(dir: &Path, db_url: &str, mode: CryptoMode, run: usize) -> Server {
    let log = dir.join(format!("server-{run}.log"));
    let mut child = command(dir, db_url, mode)
        .arg("serve")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn cardvault serve");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    let log_path = log.clone();
    std::thread::spawn(move || {
        use std::io::Write;
        let mut file = std::fs::File::create(&log_path).expect("log file");
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = writeln!(file, "{line}");
            if let Some(rest) = line.split("https://127.0.0.1:").nth(1) {
                let port: String = rest.chars().take_while(char::is_ascii_digit).collect();
                if let Ok(p) = port.parse::<u16>() {
                    let _ = tx.send(p);
                }
            }
        }
    });
    let port = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(p) => p,
        Err(_) => {
            let _ = child.kill();
            panic!(
                "server did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
    };
    Server { child, port, log }
}

fn client(dir: &Path, port: u16) -> reqwest::Client {
    let cert = std::fs::read(dir.join("data/tls/cert.pem"))
        .expect("dev certificate written under data/tls");
    client_for(&cert, ([127, 0, 0, 1], port).into())
}

async fn send(
    c: &reqwest::Client,
    port: u16,
    method: reqwest::Method,
    path: &str,
    key: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = c
        .request(method, format!("https://localhost:{port}{path}"))
        .bearer_auth(key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    match req.send().await {
        Ok(r) => {
            let s = r.status().as_u16();
            (s, r.json().await.unwrap_or(Value::Null))
        }
        Err(_) => (0, Value::Null),
    }
}

async fn sigkill_after_acknowledged_writes(backend: Backend, mode: CryptoMode) {
    let dir = tempfile::tempdir().unwrap();
    // Declared before the server, so it is dropped after it.
    let db = db_for(backend, &dir.path().join("data")).await;
    let db_url = db.url.clone();
    // The CLI creates the merchant (and with it the data dir, token, keys).
    let out = command(dir.path(), &db_url, mode)
        .args([
            "merchant",
            "create",
            "--name",
            "Crash Test",
            "--reveal",
            "--json",
        ])
        .output()
        .expect("merchant create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let created: Value = serde_json::from_slice(&out.stdout).expect("merchant JSON");
    let sk = created["secret_key"].as_str().unwrap().to_string();
    assert!(created["merchant_id"].as_str().unwrap().starts_with("mer_"));
    assert!(created["publishable_key"]
        .as_str()
        .unwrap()
        .starts_with("pk_"));

    let mut server = start(dir.path(), &db_url, mode, 1);
    let c = client(dir.path(), server.port);
    let (s, cus) = send(
        &c,
        server.port,
        reqwest::Method::POST,
        "/v1/customers",
        &sk,
        Some(json!({"email": "crash@example.com"})),
    )
    .await;
    assert_eq!(s, 201, "{cus}");
    let cus = cus["id"].as_str().unwrap().to_string();

    // Sixteen writers add cards (so the group-commit writer batches them);
    // once 160 are acknowledged, SIGKILL while the writers are still sending.
    let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<(String, String)>();
    let mut writers = Vec::new();
    for w in 0..16u64 {
        let (c, sk, cus, tx, port) = (
            c.clone(),
            sk.clone(),
            cus.clone(),
            ack_tx.clone(),
            server.port,
        );
        writers.push(tokio::spawn(async move {
            for i in 0..10_000u64 {
                let pan = luhn_pan("4000", 7_000_000_000 + w * 100_000 + i);
                let (s, card) = send(
                    &c,
                    port,
                    reqwest::Method::POST,
                    &format!("/v1/customers/{cus}/cards"),
                    &sk,
                    Some(json!({"number": pan, "exp_month": 12, "exp_year": 2031})),
                )
                .await;
                if s == 0 {
                    break;
                }
                if s == 201 {
                    let _ = tx.send((card["id"].as_str().unwrap().to_string(), pan));
                }
            }
        }));
    }
    drop(ack_tx);
    let mut acked = Vec::new();
    while acked.len() < 160 {
        let Some(a) = tokio::time::timeout(Duration::from_secs(60), ack_rx.recv())
            .await
            .expect("cards acknowledged")
        else {
            break;
        };
        acked.push(a);
    }
    server.child.kill().expect("SIGKILL");
    let _ = server.child.wait();
    for w in writers {
        let _ = w.await;
    }
    // Anything acknowledged before the kill landed too.
    while let Ok(a) = ack_rx.try_recv() {
        acked.push(a);
    }
    assert!(acked.len() >= 160);
    // The audit chain the interrupted batches were appending to is intact.
    let verify = command(dir.path(), &db_url, mode)
        .args(["audit", "verify"])
        .output()
        .expect("audit verify");
    assert!(
        verify.status.success(),
        "audit chain broken after SIGKILL: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );

    let mut server = start(dir.path(), &db_url, mode, 2);
    let c = client(dir.path(), server.port);
    for (card, pan) in &acked {
        let (s, v) = send(
            &c,
            server.port,
            reqwest::Method::POST,
            &format!("/v1/cards/{card}/reveal"),
            &sk,
            None,
        )
        .await;
        assert_eq!(s, 200, "acknowledged card {card} lost after SIGKILL: {v}");
        assert_eq!(v["number"].as_str(), Some(pan.as_str()));
    }
    let _ = server.child.kill();
    let _ = server.child.wait();

    // Nothing the two server runs logged holds a PAN or the secret key.
    for run in [1, 2] {
        let log = std::fs::read_to_string(dir.path().join(format!("server-{run}.log"))).unwrap();
        assert!(!log.contains(&sk), "secret key in server log");
        for (_, pan) in &acked {
            assert!(!log.contains(pan.as_str()), "PAN in server log");
        }
    }
    let _ = server.log;
}
matrix!(sigkill_after_acknowledged_writes);

/// The newcomer's path: `cardvault serve` with no configuration creates
/// the data dir, SoftHSM token, certificate and database, answers over TLS
/// and refuses plain HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_with_no_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!(
        "sqlite://{}",
        dir.path().join("data/cardvault.db").display()
    );
    let mut server = start(dir.path(), &db, CryptoMode::Envelope, 1);
    for f in [
        "data/tls/cert.pem",
        "data/tls/key.pem",
        "data/cardvault.db",
        "data/hsm/softhsm2.conf",
        "data/hsm/user.pin",
    ] {
        assert!(dir.path().join(f).exists(), "{f} missing");
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("data/tls/key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "private key readable by others");
    let c = client(dir.path(), server.port);
    let r = c
        .get(format!("https://localhost:{}/readyz", server.port))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Plain HTTP on the same port gets no HTTP answer.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/healthz", server.port))
        .send()
        .await;
    assert!(plain.map(|r| !r.status().is_success()).unwrap_or(true));
    let _ = server.child.kill();
    let _ = server.child.wait();
}

/// Insecure settings are refused at start-up.
#[test]
fn insecure_settings_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cardvault.toml");
    std::fs::write(&cfg, "dev = true\n[tls]\nmin_version = \"1.0\"\n").unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .arg("serve")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("min_version"));
    // Outside dev mode the development certificate is refused.
    let tls = dir.path().join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    cardvault::server::tls::ensure_dev_certificate(&tls.join("cert.pem"), &tls.join("key.pem"))
        .unwrap();
    let prod = format!(
        "dev = false\ndata_dir = \"{d}\"\n[tls]\ncert = \"{d}/tls/cert.pem\"\nkey = \"{d}/tls/key.pem\"\n[hsm]\nmodule = \"/usr/lib/softhsm/libsofthsm2.so\"\n",
        d = dir.path().display()
    );
    let c: cardvault::config::Config = toml::from_str(&prod).unwrap();
    let err = cardvault::server::tls::server_config(&c)
        .unwrap_err()
        .to_string();
    assert!(err.contains("development certificate"), "{err}");
}

fn merchant_via_cli(dir: &Path, db_url: &str, mode: CryptoMode, name: &str) -> String {
    let out = command(dir, db_url, mode)
        .args(["merchant", "create", "--name", name, "--reveal", "--json"])
        .output()
        .expect("merchant create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("merchant JSON");
    v["secret_key"].as_str().unwrap().to_string()
}

/// The token's directory under the dev data dir (SoftHSM keeps one per token).
fn token_dir(dir: &Path) -> std::path::PathBuf {
    let tokens = dir.join("data/hsm/tokens");
    let mut entries: Vec<_> = std::fs::read_dir(&tokens)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(entries.len(), 1, "one dev token");
    entries.remove(0)
}

async fn readyz(c: &reqwest::Client, port: u16) -> (u16, Value) {
    let r = c
        .get(format!("https://localhost:{port}/readyz"))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// The HSM goes away (its token directory moved) and comes back: the vault
/// fails closed with 503 where it needs the HSM, keeps serving from loaded
/// keys in envelope mode, and recovers without a restart.
async fn hsm_outage_and_recovery(backend: Backend, mode: CryptoMode) {
    let dir = tempfile::tempdir().unwrap();
    // Declared before the server, so it is dropped after it.
    let db = db_for(backend, &dir.path().join("data")).await;
    let db_url = db.url.clone();
    let sk_a = merchant_via_cli(dir.path(), &db_url, mode, "A");
    let sk_b = merchant_via_cli(dir.path(), &db_url, mode, "B");
    let mut server = start(dir.path(), &db_url, mode, 1);
    let port = server.port;
    let c = client(dir.path(), port);
    let post = reqwest::Method::POST;
    let (_, cus_a) = send(
        &c,
        port,
        post.clone(),
        "/v1/customers",
        &sk_a,
        Some(json!({"email": "a@example.com"})),
    )
    .await;
    let cus_a = cus_a["id"].as_str().unwrap().to_string();
    let (_, cus_b) = send(
        &c,
        port,
        post.clone(),
        "/v1/customers",
        &sk_b,
        Some(json!({"email": "b@example.com"})),
    )
    .await;
    let cus_b = cus_b["id"].as_str().unwrap().to_string();
    let add = |sk: String, cus: String, pan: String| {
        let c = c.clone();
        async move {
            send(
                &c,
                port,
                reqwest::Method::POST,
                &format!("/v1/customers/{cus}/cards"),
                &sk,
                Some(json!({"number": pan, "exp_month": 12, "exp_year": 2031})),
            )
            .await
        }
    };
    let (s, card) = add(sk_a.clone(), cus_a.clone(), luhn_pan("4000", 8_100_000_001)).await;
    assert_eq!(s, 201, "{card}");
    let card = card["id"].as_str().unwrap().to_string();
    let reveal = |sk: String, card: String| {
        let c = c.clone();
        async move {
            send(
                &c,
                port,
                reqwest::Method::POST,
                &format!("/v1/cards/{card}/reveal"),
                &sk,
                None,
            )
            .await
        }
    };
    assert_eq!(reveal(sk_a.clone(), card.clone()).await.0, 200);

    // The HSM disappears.
    let token = token_dir(dir.path());
    let parked = dir.path().join("parked-token");
    std::fs::rename(&token, &parked).unwrap();

    let (s, r) = readyz(&c, port).await;
    assert_eq!(s, 503, "{r}");
    assert_eq!(r["hsm"], "down");
    let (s, e) = add(sk_b.clone(), cus_b.clone(), luhn_pan("4000", 8_100_000_002)).await;
    assert_eq!(
        s, 503,
        "a merchant whose keys are not loaded cannot add a card: {e}"
    );
    assert_eq!(e["error"]["code"], "service_unavailable");
    match mode {
        CryptoMode::Envelope => {
            let (s, v) = add(sk_a.clone(), cus_a.clone(), luhn_pan("4000", 8_100_000_003)).await;
            assert_eq!(s, 201, "cached keys keep serving: {v}");
            let (s, v) = reveal(sk_a.clone(), card.clone()).await;
            assert_eq!(s, 200, "{v}");
            assert_eq!(
                v["number"].as_str().unwrap(),
                luhn_pan("4000", 8_100_000_001)
            );
        }
        CryptoMode::Hsm => {
            let (s, v) = add(sk_a.clone(), cus_a.clone(), luhn_pan("4000", 8_100_000_003)).await;
            assert_eq!(s, 503, "{v}");
            let (s, v) = reveal(sk_a.clone(), card.clone()).await;
            assert_eq!(s, 503, "{v}");
        }
    }
    // Nothing was written by the failed attempts.
    let (_, list_b) = send(
        &c,
        port,
        reqwest::Method::GET,
        &format!("/v1/customers/{cus_b}/cards"),
        &sk_b,
        None,
    )
    .await;
    assert_eq!(list_b["data"].as_array().unwrap().len(), 0);

    // The HSM comes back: everything works again without a restart.
    std::fs::rename(&parked, &token).unwrap();
    let mut ready = false;
    for _ in 0..60 {
        if readyz(&c, port).await.0 == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        ready,
        "vault did not recover: {}",
        std::fs::read_to_string(&server.log).unwrap_or_default()
    );
    let (s, v) = add(sk_b.clone(), cus_b.clone(), luhn_pan("4000", 8_100_000_002)).await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = reveal(sk_a.clone(), card.clone()).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = add(sk_a.clone(), cus_a.clone(), luhn_pan("4000", 8_100_000_004)).await;
    assert_eq!(s, 201, "{v}");
    let _ = server.child.kill();
    let _ = server.child.wait();
}
matrix!(hsm_outage_and_recovery);

/// SIGTERM: the listener closes, a request already in flight completes,
/// and the process exits cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!(
        "sqlite://{}",
        dir.path().join("data/cardvault.db").display()
    );
    let sk = merchant_via_cli(dir.path(), &db, CryptoMode::Envelope, "Term");
    let mut server = start(dir.path(), &db, CryptoMode::Envelope, 1);
    let c = client(dir.path(), server.port);
    let port = server.port;
    // Many writes in flight when the signal arrives: every one that got a
    // response got a complete, successful one.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let (c, sk) = (c.clone(), sk.clone());
        tasks.push(tokio::spawn(async move {
            send(
                &c,
                port,
                reqwest::Method::POST,
                "/v1/customers",
                &sk,
                Some(json!({"email": format!("t{i}@example.com")})),
            )
            .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    let pid = server.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    for t in tasks {
        let (s, v) = t.await.unwrap();
        assert!(s == 201 || s == 0, "a request cut short: {s} {v}");
    }
    let status = server.child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(log.contains("shutting down"), "{log}");
}

/// Killing the vault while a webhook is being delivered loses nothing: the
/// delivery row is still pending, and the restarted vault sends it.
async fn webhook_outbox_survives_sigkill(backend: Backend, mode: CryptoMode) {
    use crate::webhooks::{verify_signature, Mode, Receiver};
    let dir = tempfile::tempdir().unwrap();
    // Declared before the server, so it is dropped after it.
    let db = db_for(backend, &dir.path().join("data")).await;
    let db_url = db.url.clone();
    let sk = merchant_via_cli(dir.path(), &db_url, mode, "Webhooks");
    let receiver = Receiver::start(Mode::Hang).await;
    let mut server = start(dir.path(), &db_url, mode, 0);
    let c = client(dir.path(), server.port);
    let post = reqwest::Method::POST;
    let (s, ep) = send(
        &c,
        server.port,
        post.clone(),
        "/v1/webhook_endpoints",
        &sk,
        Some(json!({"url": receiver.url, "events": ["charge.succeeded"]})),
    )
    .await;
    assert_eq!(s, 201, "{ep}");
    let secret = ep["secret"].as_str().unwrap().to_string();
    let (s, cus) = send(
        &c,
        server.port,
        post.clone(),
        "/v1/customers",
        &sk,
        Some(json!({"email": "w@example.com"})),
    )
    .await;
    assert_eq!(s, 201, "{cus}");
    let cus = cus["id"].as_str().unwrap().to_string();
    let (s, card) = send(
        &c,
        server.port,
        post.clone(),
        &format!("/v1/customers/{cus}/cards"),
        &sk,
        Some(json!({"number": "4242424242424242", "exp_month": 12, "exp_year": 2031})),
    )
    .await;
    assert_eq!(s, 201, "{card}");
    let (s, ch) = send(
        &c,
        server.port,
        post.clone(),
        "/v1/charges",
        &sk,
        Some(json!({"amount": 4200, "currency": "usd", "customer": cus})),
    )
    .await;
    assert_eq!(s, 201, "{ch}");
    // Wait until the delivery is in flight, then kill the vault.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while receiver.calls() == 0 {
        assert!(std::time::Instant::now() < deadline, "no delivery attempt");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    *receiver.mode.lock().unwrap() = Mode::FailThenOk(0);
    let mut server = start(dir.path(), &db_url, mode, 1);
    let delivered = receiver.wait_delivered(1, Duration::from_secs(60)).await;
    let (sig, body) = &delivered[0];
    assert!(verify_signature(sig, &secret, body), "{sig}");
    let event: Value = serde_json::from_str(body).unwrap();
    assert_eq!(event["type"], "charge.succeeded");
    assert_eq!(event["data"]["object"]["id"], ch["id"]);
    let _ = server.child.kill();
    let _ = server.child.wait();
    let _ = &server.log;
}
matrix!(webhook_outbox_survives_sigkill);
