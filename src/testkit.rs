//! Test and benchmark support: fresh SoftHSM tokens in a per-process
//! directory. Not used by the vault itself.
#![allow(clippy::expect_used)]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use cardvault_hsm::{softhsm, Pin, Pkcs11Config, Pkcs11Custodian};

/// SoftHSM reads `SOFTHSM2_CONF` once, at `C_Initialize`, so a process has a
/// single token directory: this creates it on first use and points the
/// variable at it. Every caller then gets its own token inside it.
pub fn softhsm_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        sweep_dead_token_dirs();
        let dir = std::env::temp_dir().join(format!("cardvault-softhsm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create softhsm dir");
        let conf = softhsm::write_config(&dir).expect("write softhsm2.conf");
        std::env::set_var("SOFTHSM2_CONF", conf);
        dir
    })
}

/// A process cannot remove its token directory when it exits (it lives in a
/// static), so each one removes those of test processes that have ended.
/// Directories of processes still running are left alone.
fn sweep_dead_token_dirs() {
    // Liveness is read from /proc; without it, sweep nothing.
    if !std::path::Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("cardvault-softhsm-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Module path of SoftHSM on this machine.
pub fn module_path() -> PathBuf {
    softhsm::default_module_path().expect("SoftHSM is not installed (apt-get install softhsm2)")
}

/// Creates a fresh token with a unique label and returns its config.
pub fn fresh_token_config() -> Pkcs11Config {
    softhsm_dir();
    let label = crate::domain::new_id("t")[..24].to_string();
    let pin = Pin::new(crate::domain::new_id("pin"));
    let so_pin = Pin::new(crate::domain::new_id("so"));
    softhsm::init_token(&module_path(), &label, &so_pin, &pin).expect("init token");
    Pkcs11Config {
        module_path: module_path(),
        token_label: label,
        user_pin: pin,
        max_sessions: 8,
    }
}

/// A custodian over a fresh token.
pub fn fresh_custodian() -> Arc<Pkcs11Custodian> {
    Arc::new(Pkcs11Custodian::connect(fresh_token_config()).expect("connect to token"))
}

/// The Luhn check digit for `body` (digits only).
pub fn luhn_check_digit(body: &str) -> u32 {
    let sum: u32 = body
        .chars()
        .rev()
        .enumerate()
        .map(|(i, c)| {
            let d = c.to_digit(10).expect("digits only");
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
    (10 - sum % 10) % 10
}

/// A Luhn-valid 16-digit test number: `prefix`, `n` zero-padded, check digit.
pub fn luhn_pan(prefix: &str, n: u64) -> String {
    let body = format!("{prefix}{n:0>width$}", width = 15 - prefix.len());
    let check = luhn_check_digit(&body);
    format!("{body}{check}")
}

/// The PostgreSQL database tests and the load tool create theirs from:
/// `CARDVAULT_TEST_PG_URL`, by default `test` on 127.0.0.1 as `postgres`.
pub fn pg_admin_url() -> String {
    std::env::var("CARDVAULT_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// `url` with its database name replaced by `db`.
pub fn pg_url_with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority..].find('/') {
        Some(slash) => &base[..authority + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{db}?{query}"),
        None => format!("{base}/{db}"),
    }
}

/// Creates PostgreSQL database `name` on the server of `admin_url` (a URL
/// of another database there) and returns the new database's URL.
pub async fn create_pg_database(admin_url: &str, name: &str) -> Result<String, sqlx::Error> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(admin_url).await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await?;
    let _ = conn.close().await;
    Ok(pg_url_with_database(admin_url, name))
}

/// Drops PostgreSQL database `name` on the server of `admin_url` (a URL of
/// another database there), ending sessions still open on it. Errors are
/// ignored: this is cleanup.
pub async fn drop_pg_database(admin_url: &str, name: &str) {
    use sqlx::Connection;
    if let Ok(mut conn) = sqlx::PgConnection::connect(admin_url).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut conn)
            .await;
        let _ = conn.close().await;
    }
}

/// [`drop_pg_database`] for `Drop` implementations, which cannot await
/// and may run inside a runtime: a thread with its own runtime does it.
pub fn drop_pg_database_blocking(admin_url: String, name: String) {
    let dropper = std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            rt.block_on(drop_pg_database(&admin_url, &name));
        }
    });
    let _ = dropper.join();
}

#[cfg(test)]
mod tests {
    #[test]
    fn token_dirs_of_ended_processes_are_swept() {
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let dead = child.id();
        child.wait().expect("wait");
        let tmp = std::env::temp_dir();
        let dead_dir = tmp.join(format!("cardvault-softhsm-{dead}"));
        // PID 1 runs as long as the machine does.
        let live_dir = tmp.join("cardvault-softhsm-1");
        let live_existed = live_dir.exists();
        std::fs::create_dir_all(dead_dir.join("tokens")).expect("dead dir");
        std::fs::create_dir_all(&live_dir).expect("live dir");
        super::sweep_dead_token_dirs();
        assert!(
            !dead_dir.exists(),
            "an ended process's directory is removed"
        );
        assert!(live_dir.exists(), "a running process's directory is kept");
        if !live_existed {
            let _ = std::fs::remove_dir(&live_dir);
        }
    }
}
