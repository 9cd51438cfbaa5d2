//! The issue 6 commands through the real binary (dev mode, no config):
//! `keys rotate-kek|rotate-dek|reencrypt`, `merchant delete --shred`,
//! `audit checkpoint|verify|report`, and their exit codes.

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_cardvault");

fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .current_dir(dir)
        .env("CARDVAULT_CONFIG", dir.join("cardvault.toml"))
        .env_remove("SOFTHSM2_CONF")
        .env("CARDVAULT_LOG", "warn")
        .args(args)
        .output()
        .expect("run cardvault")
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = run(dir, args);
    assert!(
        out.status.success(),
        "cardvault {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn operator_commands_work_and_verify_fails_on_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Dev mode, as with no file; a short grace before old keys are destroyed.
    std::fs::write(
        d.join("cardvault.toml"),
        "dev = true\n[keys]\ndestroy_grace_secs = 1\n",
    )
    .unwrap();
    let created: serde_json::Value =
        serde_json::from_str(&ok(d, &["merchant", "create", "--name", "Acme", "--json"])).unwrap();
    let other: serde_json::Value =
        serde_json::from_str(&ok(d, &["merchant", "create", "--name", "Other", "--json"])).unwrap();
    let rotated = ok(d, &["keys", "rotate-kek"]);
    assert!(rotated.contains("cardvault-kek-v2"), "{rotated}");
    ok(d, &["keys", "rotate-dek"]);
    assert!(ok(d, &["keys", "reencrypt", "--batch", "10"]).contains("re-encrypted"));
    // Deleting without shredding is refused.
    let id = other["merchant_id"].as_str().unwrap();
    assert!(!run(d, &["merchant", "delete", id]).status.success());
    let shred = ok(d, &["merchant", "delete", "--shred", id]);
    assert!(shred.contains(id), "{shred}");
    ok(d, &["audit", "checkpoint"]);
    let verified = ok(d, &["audit", "verify"]);
    assert!(verified.contains("intact"), "{verified}");
    // The report is written even when checks fail (a fresh vault has not
    // seen every event type yet), and the exit code says so.
    let report = d.join("report.html");
    let out = run(
        d,
        &[
            "audit",
            "report",
            "--format",
            "html",
            "--out",
            report.to_str().unwrap(),
        ],
    );
    let html = std::fs::read_to_string(&report).expect("report written");
    assert!(html.contains("PCI DSS 3.5.1"));
    assert_eq!(
        out.status.success(),
        html.contains("<b>PASS</b>"),
        "exit code must match the verdict"
    );
    let json_out = d.join("report.json");
    let _ = run(
        d,
        &[
            "audit",
            "report",
            "--format",
            "json",
            "--out",
            json_out.to_str().unwrap(),
        ],
    );
    let parsed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_out).unwrap()).unwrap();
    assert_eq!(parsed["checks"].as_array().unwrap().len(), 10);
    let _ = created;

    // Tamper with one row (triggers dropped) and verify again.
    let db = format!("sqlite://{}", d.join("data/cardvault.db").display());
    let seq = tokio::runtime::Runtime::new().unwrap().block_on(async {
        use sqlx::Connection;
        let mut c = sqlx::SqliteConnection::connect(&db).await.unwrap();
        sqlx::query("DROP TRIGGER audit_log_no_update")
            .execute(&mut c)
            .await
            .unwrap();
        let seq: i64 = sqlx::query_scalar(
            "SELECT seq FROM audit_log WHERE event = 'merchant.create' ORDER BY seq LIMIT 1",
        )
        .fetch_one(&mut c)
        .await
        .unwrap();
        sqlx::query("UPDATE audit_log SET actor = 'someone-else' WHERE seq = ?")
            .bind(seq)
            .execute(&mut c)
            .await
            .unwrap();
        seq
    });
    let out = run(d, &["audit", "verify"]);
    assert!(
        !out.status.success(),
        "verify must exit non-zero on tampering"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("TAMPERED") && text.contains(&format!("seq {seq} was edited")),
        "{text}"
    );
}

/// Acceptance 3 across real processes: a `cardvault serve` under a load of
/// card writes and reveals while separate `cardvault keys …` processes
/// rotate the KEK and the data keys and re-encrypt; the re-encryption is
/// SIGKILLed mid-way and run again. No request fails and every card ends
/// up under a live key and reveals correctly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotation_across_processes_under_load() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    std::fs::write(
        d.join("cardvault.toml"),
        "dev = true\nlisten = \"127.0.0.1:0\"\n[keys]\nmaintenance_interval_secs = 1\ndestroy_grace_secs = 1\n",
    )
    .unwrap();
    let cmd = |args: &[&str]| {
        let mut c = Command::new(BIN);
        c.current_dir(&d)
            .env("CARDVAULT_CONFIG", d.join("cardvault.toml"))
            .env_remove("SOFTHSM2_CONF")
            .env("CARDVAULT_LOG", "warn")
            .args(args);
        c
    };
    let merchant: serde_json::Value = {
        let out = cmd(&["merchant", "create", "--name", "Load", "--reveal", "--json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let sk = merchant["secret_key"].as_str().unwrap().to_string();
    let mut server = cmd(&["serve"])
        .env("CARDVAULT_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = server.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("https://127.0.0.1:").nth(1) {
                let port: String = rest.chars().take_while(char::is_ascii_digit).collect();
                if let Ok(p) = port.parse::<u16>() {
                    let _ = tx.send(p);
                }
            }
        }
    });
    let port = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("server started");
    let cert = std::fs::read(d.join("data/tls/cert.pem")).unwrap();
    let client = crate::support::client_for(&cert, ([127, 0, 0, 1], port).into());
    let base = format!("https://localhost:{port}");
    let post = {
        let (client, base, sk) = (client.clone(), base.clone(), sk.clone());
        move |path: String, body: serde_json::Value| {
            let (client, base, sk) = (client.clone(), base.clone(), sk.clone());
            async move {
                let r = client
                    .post(format!("{base}{path}"))
                    .bearer_auth(&sk)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                let s = r.status();
                (s, r.json::<serde_json::Value>().await.unwrap_or_default())
            }
        }
    };
    let (s, cus) = post(
        "/v1/customers".into(),
        serde_json::json!({"email": "load@example.com"}),
    )
    .await;
    assert_eq!(s, 201);
    let cus = cus["id"].as_str().unwrap().to_string();
    let pan = |n: u64| {
        let body = format!("411111{:09}", n);
        let sum: u32 = body
            .chars()
            .rev()
            .enumerate()
            .map(|(i, c)| {
                let d = c.to_digit(10).unwrap();
                if i % 2 == 0 {
                    let x = d * 2;
                    if x > 9 {
                        x - 9
                    } else {
                        x
                    }
                } else {
                    d
                }
            })
            .sum();
        format!("{body}{}", (10 - sum % 10) % 10)
    };
    let cards = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
    for i in 0..150 {
        let (s, c) = post(
            format!("/v1/customers/{cus}/cards"),
            serde_json::json!({"number": pan(i), "exp_month": 12, "exp_year": 2031}),
        )
        .await;
        assert_eq!(s, 201, "{c}");
        cards
            .lock()
            .unwrap()
            .push((c["id"].as_str().unwrap().to_string(), pan(i)));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut workers = Vec::new();
    for w in 0..2u64 {
        let (post, stop, failures, cards, cus) = (
            post.clone(),
            Arc::clone(&stop),
            Arc::clone(&failures),
            Arc::clone(&cards),
            cus.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let number = pan(1_000_000 + w * 100_000 + i);
                let (s, c) = post(
                    format!("/v1/customers/{cus}/cards"),
                    serde_json::json!({"number": number, "exp_month": 12, "exp_year": 2031}),
                )
                .await;
                if s != 201 {
                    failures.lock().unwrap().push(format!("create {s} {c}"));
                    continue;
                }
                cards
                    .lock()
                    .unwrap()
                    .push((c["id"].as_str().unwrap().to_string(), number));
                let pick = {
                    let all = cards.lock().unwrap();
                    all[(i as usize * 13) % all.len()].clone()
                };
                let (s, r) = post(
                    format!("/v1/cards/{}/reveal", pick.0),
                    serde_json::json!({}),
                )
                .await;
                if s != 200 || r["number"].as_str() != Some(pick.1.as_str()) {
                    failures.lock().unwrap().push(format!("reveal {s} {r}"));
                }
            }
        }));
    }
    let run_ok = |args: &[&str]| {
        let out = cmd(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let kek = tokio::task::block_in_place(|| run_ok(&["keys", "rotate-kek"]));
    assert!(kek.contains("cardvault-kek-v2"), "{kek}");
    tokio::task::block_in_place(|| run_ok(&["keys", "rotate-kek", "--all-merchants"]));
    tokio::task::block_in_place(|| run_ok(&["keys", "rotate-dek"]));
    tokio::time::sleep(std::time::Duration::from_millis(2_500)).await;
    // Re-encryption, SIGKILLed after it has made progress.
    let mut child = cmd(&["keys", "reencrypt", "--batch", "1"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut progressed = false;
    while let Some(Ok(line)) = tokio::task::block_in_place(|| lines.next()) {
        if line.starts_with("re-encrypting cards") && !line.contains(" 0/") {
            progressed = true;
            break;
        }
    }
    assert!(progressed, "no progress line from reencrypt");
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "reencrypt finished before it was killed");
    let db = format!("sqlite://{}", d.join("data/cardvault.db").display());
    let stale = |db: String| async move {
        use sqlx::Connection;
        let mut c = sqlx::SqliteConnection::connect(&db).await.unwrap();
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM cards c JOIN data_keys k ON k.id = c.dek_id WHERE k.retired_at IS NOT NULL",
        )
        .fetch_one(&mut c)
        .await
        .unwrap()
    };
    assert!(
        stale(db.clone()).await > 0,
        "the killed run left nothing to do"
    );
    let out = tokio::task::block_in_place(|| run_ok(&["keys", "reencrypt", "--batch", "25"]));
    assert!(out.contains("re-encrypted"), "{out}");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    assert_eq!(stale(db.clone()).await, 0);
    let all = cards.lock().unwrap().clone();
    for (id, number) in all {
        let (s, r) = post(format!("/v1/cards/{id}/reveal"), serde_json::json!({})).await;
        assert_eq!(
            (s.as_u16(), r["number"].as_str()),
            (200, Some(number.as_str())),
            "card {id}"
        );
    }
    let _ = nix_term(&mut server);
    let verified = tokio::task::block_in_place(|| run_ok(&["audit", "verify"]));
    assert!(verified.contains("intact"), "{verified}");
}

/// SIGTERM (graceful stop: the shutdown is audited and checkpointed).
fn nix_term(child: &mut std::process::Child) -> std::io::Result<()> {
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()?;
    child.wait().map(|_| ())
}
