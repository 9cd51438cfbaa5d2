//! `cardvault audit report`: PCI DSS evidence the vault produces about
//! itself. Each check names the requirement it evidences, passes or fails,
//! and carries the data behind the verdict. Rendered as JSON (the serde
//! form of [`Report`]) or as one self-contained HTML page ([`html`]).
//! Nothing in a report is secret: labels, ids, counts, table/column names.

mod html;
pub mod pan_scan;

use serde::Serialize;
use serde_json::{json, Value};

use crate::config::Config;
use crate::service::{now, ServiceResult, Vault};

pub use html::html;

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub title: String,
    pub generated_at: String,
    pub backend: String,
    pub crypto_mode: String,
    pub summary: Summary,
    pub checks: Vec<Check>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// `PASS` when every check passes, else `FAIL`.
    pub verdict: String,
    pub total: usize,
    pub passed: usize,
    pub failed: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub id: String,
    pub title: String,
    /// e.g. `PCI DSS 3.5.1`.
    pub requirement: String,
    pub passed: bool,
    /// One sentence for the summary table.
    pub finding: String,
    pub data: Value,
}

fn check(
    id: &str,
    title: &str,
    requirement: &str,
    passed: bool,
    finding: String,
    data: Value,
) -> Check {
    Check {
        id: id.to_string(),
        title: title.to_string(),
        requirement: requirement.to_string(),
        passed,
        finding,
        data,
    }
}

const DAY: i64 = 86_400;

fn days(secs: i64) -> i64 {
    secs.max(0) / DAY
}

fn rfc3339(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| t.to_string())
}

/// Runs every check against the vault. Verifying the audit chain is itself
/// recorded in the audit trail (as `audit.verify` by `auditor`).
pub async fn build(vault: &Vault, cfg: &Config) -> ServiceResult<Report> {
    let t = now();
    let checks = vec![
        pan_scan_check(vault).await?,
        sad_check(vault, t).await?,
        hsm_inventory_check(vault, cfg, t).await?,
        wrapping_key_check(vault, cfg, t).await?,
        data_key_check(vault, cfg, t).await?,
        tls_check(cfg),
        chain_check(vault).await?,
        coverage_check(vault).await?,
        api_key_check(vault, cfg, t).await?,
        retention_check(cfg),
    ];
    let passed = checks.iter().filter(|c| c.passed).count();
    let failed = checks.len() - passed;
    Ok(Report {
        title: "cardvault PCI DSS evidence report".to_string(),
        generated_at: rfc3339(t),
        backend: vault.storage().backend().to_string(),
        crypto_mode: vault.keyring().mode().as_str().to_string(),
        summary: Summary {
            verdict: if failed == 0 { "PASS" } else { "FAIL" }.to_string(),
            total: checks.len(),
            passed,
            failed,
        },
        checks,
    })
}

async fn pan_scan_check(vault: &Vault) -> ServiceResult<Check> {
    let (hits, values) = vault
        .storage()
        .scan_all_columns(pan_scan::contains_pan)
        .await?;
    let n: i64 = hits.iter().map(|h| h.rows).sum();
    let finding = if hits.is_empty() {
        format!("no Luhn-valid 13–19 digit number in {values} stored values")
    } else {
        let places: Vec<String> = hits
            .iter()
            .map(|h| format!("{}.{} ({} rows)", h.table, h.column, h.rows))
            .collect();
        format!(
            "{n} stored value{} look{} like plaintext PANs: {}",
            if n == 1 { "" } else { "s" },
            if n == 1 { "s" } else { "" },
            places.join(", ")
        )
    };
    Ok(check(
        "pan_scan",
        "No plaintext PAN in any table or column",
        "PCI DSS 3.5.1",
        hits.is_empty(),
        finding,
        json!({"values_scanned": values, "hits": hits}),
    ))
}

async fn sad_check(vault: &Vault, t: i64) -> ServiceResult<Check> {
    let mut data = serde_json::Map::new();
    let mut leftovers = 0;
    let mut absent = Vec::new();
    // A used or expired token keeps its row (last4, times) but its sealed
    // payload (PAN and CVV) must be gone: only rows still holding one count.
    for (table, column, held) in [("card_tokens", "expires_at", "payload")] {
        match vault
            .storage()
            .count_older(table, column, t, Some(held))
            .await?
        {
            Some(n) => {
                leftovers += n;
                data.insert(table.to_string(), json!({"expired_rows": n}));
            }
            None => {
                absent.push(table);
                data.insert(table.to_string(), json!({"present": false}));
            }
        }
    }
    let finding = if leftovers > 0 {
        format!("{leftovers} CVV/one-time token rows are past their TTL")
    } else if absent.is_empty() {
        "no CVV or one-time token survives its TTL".to_string()
    } else {
        format!(
            "no CVV or token store in this build ({} absent): nothing can survive authorization",
            absent.join(", ")
        )
    };
    Ok(check(
        "sad_retention",
        "No CVV or one-time token past its TTL",
        "PCI DSS 3.3.1",
        leftovers == 0,
        finding,
        Value::Object(data),
    ))
}

async fn hsm_inventory_check(vault: &Vault, cfg: &Config, t: i64) -> ServiceResult<Check> {
    let inventory = vault.keyring().hsm_inventory().await?;
    let period = i64::try_from(cfg.keys.kek_cryptoperiod_days).unwrap_or(i64::MAX);
    // The life-cycle state of wrapping keys comes from the registry; the age
    // from the HSM's own record of when it created the object.
    let states: std::collections::HashMap<String, String> = vault
        .storage()
        .list_hsm_keys()
        .await?
        .into_iter()
        .map(|k| (k.label, k.state))
        .collect();
    let mut bad = Vec::new();
    let mut overdue = Vec::new();
    let keys: Vec<Value> = inventory
        .iter()
        .map(|k| {
            let ok = k.sensitive && !k.extractable && k.always_sensitive && k.never_extractable;
            if !ok {
                bad.push(k.label.clone());
            }
            let age = k.created_at_unix.map(|c| days(t - c));
            let state = states.get(&k.label).cloned();
            let past = state.as_deref() == Some("active") && age.is_some_and(|a| a >= period);
            if past {
                overdue.push(k.label.clone());
            }
            json!({
                "label": k.label, "type": k.key_type, "bytes": k.value_len,
                "sensitive": k.sensitive, "extractable": k.extractable,
                "always_sensitive": k.always_sensitive, "never_extractable": k.never_extractable,
                "created": k.created_at_unix.map(rfc3339), "age_days": age, "state": state,
            })
        })
        .collect();
    let finding = match (bad.is_empty(), overdue.is_empty()) {
        (true, true) => format!(
            "{} HSM keys, all sensitive and never extractable; no active wrapping key older than {period} days",
            inventory.len()
        ),
        (false, _) => format!("extractable or non-sensitive HSM keys: {}", bad.join(", ")),
        (true, false) => format!(
            "active wrapping keys older than {period} days by the HSM's clock: {}",
            overdue.join(", ")
        ),
    };
    Ok(check(
        "hsm_inventory",
        "HSM key inventory: sensitive, non-extractable, within cryptoperiod",
        "PCI DSS 3.6.1, 3.7.4",
        bad.is_empty() && overdue.is_empty(),
        finding,
        json!({"kek_cryptoperiod_days": period, "keys": keys}),
    ))
}

async fn wrapping_key_check(vault: &Vault, cfg: &Config, t: i64) -> ServiceResult<Check> {
    let period = i64::try_from(cfg.keys.kek_cryptoperiod_days).unwrap_or(i64::MAX);
    let mut overdue = Vec::new();
    let keys: Vec<Value> = vault
        .storage()
        .list_hsm_keys()
        .await?
        .into_iter()
        .map(|k| {
            let age = days(t - k.created_at);
            let past = k.state == "active" && age >= period;
            if past {
                overdue.push(format!("{} ({age} days)", k.label));
            }
            json!({
                "label": k.label, "kind": k.kind, "merchant": k.merchant_id, "version": k.version,
                "state": k.state, "created": rfc3339(k.created_at), "age_days": age,
                "cryptoperiod_days": period, "past_cryptoperiod": past,
            })
        })
        .collect();
    let finding = if overdue.is_empty() {
        format!(
            "{} wrapping keys, every active one within its {period}-day cryptoperiod",
            keys.len()
        )
    } else {
        format!(
            "past their cryptoperiod: {} — run `cardvault keys rotate-kek`",
            overdue.join(", ")
        )
    };
    Ok(check(
        "wrapping_key_cryptoperiod",
        "KEK and merchant wrapping keys within their cryptoperiod",
        "PCI DSS 3.6.4, 3.7.4",
        overdue.is_empty(),
        finding,
        json!({"keys": keys}),
    ))
}

async fn data_key_check(vault: &Vault, cfg: &Config, t: i64) -> ServiceResult<Check> {
    let period = i64::try_from(cfg.keys.data_key_cryptoperiod_days).unwrap_or(i64::MAX);
    let limit = i64::try_from(cfg.crypto.seal_limit).unwrap_or(i64::MAX);
    let mut problems = Vec::new();
    let keys: Vec<Value> = vault
        .storage()
        .list_data_keys()
        .await?
        .into_iter()
        .map(|k| {
            let age = days(t - k.created_at);
            let rotating = matches!(k.purpose.as_str(), "pan" | "volatile");
            let active = k.retired_at.is_none();
            if active && rotating && age >= period {
                problems.push(format!("{} past its cryptoperiod ({age} days)", k.id));
            }
            if active && k.seals_reserved > limit {
                problems.push(format!("{} past its seal limit", k.id));
            }
            json!({
                "id": k.id, "merchant": k.merchant_id, "purpose": k.purpose, "version": k.version,
                "mode": k.mode, "wrapped_by": k.wrapping_label, "seals": k.seals_reserved,
                "seal_limit": limit, "age_days": age, "retired": k.retired_at.map(rfc3339),
            })
        })
        .collect();
    let finding = if problems.is_empty() {
        format!(
            "{} data keys; every active one within its seal limit and cryptoperiod",
            keys.len()
        )
    } else {
        problems.join("; ")
    };
    Ok(check(
        "data_key_usage",
        "Data keys within usage limits and cryptoperiod",
        "PCI DSS 3.7.4 (NIST SP 800-38D)",
        problems.is_empty(),
        finding,
        json!({"data_key_cryptoperiod_days": period, "keys": keys}),
    ))
}

fn tls_check(cfg: &Config) -> Check {
    let (versions, suites) = crate::server::tls::policy(cfg);
    let weak: Vec<&String> = suites
        .iter()
        .filter(|s| {
            !(s.contains("GCM") || s.contains("CHACHA20_POLY1305"))
                || (s.starts_with("TLS_") && !s.starts_with("TLS13") && !s.contains("ECDHE"))
        })
        .collect();
    let ok = weak.is_empty() && versions.iter().all(|v| v == "TLSv1.2" || v == "TLSv1.3");
    check(
        "tls",
        "Strong cryptography in transit",
        "PCI DSS 4.2.1",
        ok,
        format!(
            "{} only; {} AEAD suites with forward secrecy; plain HTTP not offered{}",
            versions.join(" and "),
            suites.len(),
            if cfg.tls.client_ca.is_some() {
                "; mutual TLS"
            } else {
                ""
            }
        ),
        json!({"protocols": versions, "cipher_suites": suites, "mutual_tls": cfg.tls.client_ca.is_some()}),
    )
}

async fn chain_check(vault: &Vault) -> ServiceResult<Check> {
    let v = vault.verify_audit("auditor").await?;
    let finding = match v.findings.first() {
        Some(f) => format!("TAMPERED: {}", f.message),
        None => format!(
            "{} entries chained and MAC-verified; {} HSM-signed checkpoints hold",
            v.chained, v.checkpoints
        ),
    };
    Ok(check(
        "audit_chain",
        "Audit trail intact (hash chain, MACs, HSM-signed checkpoints)",
        "PCI DSS 10.3.2, 10.3.4",
        v.ok() && v.unchained == 0,
        finding,
        serde_json::to_value(&v).unwrap_or(Value::Null),
    ))
}

async fn coverage_check(vault: &Vault) -> ServiceResult<Check> {
    let coverage = vault.event_coverage().await?;
    let missing: Vec<&str> = coverage
        .iter()
        .filter(|(_, ok, _)| !ok)
        .map(|(n, _, _)| n.as_str())
        .collect();
    let finding = if missing.is_empty() {
        format!("all {} required event types are recorded", coverage.len())
    } else {
        format!("never recorded yet: {}", missing.join(", "))
    };
    Ok(check(
        "event_coverage",
        "Audit trail covers every required event type",
        "PCI DSS 10.2.1, 10.2.2",
        missing.is_empty(),
        finding,
        json!({"events": coverage.iter().map(|(n, ok, c)| json!({"event": n, "present": ok, "entries": c})).collect::<Vec<_>>()}),
    ))
}

async fn api_key_check(vault: &Vault, cfg: &Config, t: i64) -> ServiceResult<Check> {
    let max_age = i64::try_from(cfg.keys.api_key_max_age_days).unwrap_or(i64::MAX);
    let mut problems = Vec::new();
    let keys: Vec<Value> = vault
        .storage()
        .list_api_keys()
        .await?
        .into_iter()
        .map(|k| {
            let age = days(t - k.created_at);
            let idle = days(t - k.last_used_at.unwrap_or(k.created_at));
            let active = k.revoked_at.is_none();
            if active && age >= max_age {
                problems.push(format!("{} is {age} days old", k.id));
            }
            if active && idle >= 90 {
                problems.push(format!("{} unused for {idle} days", k.id));
            }
            json!({
                "id": k.id, "merchant": k.merchant_id, "kind": k.kind.as_str(), "scopes": k.scopes,
                "created": rfc3339(k.created_at), "age_days": age,
                "last_used": k.last_used_at.map(rfc3339), "revoked": k.revoked_at.map(rfc3339),
            })
        })
        .collect();
    let finding = if problems.is_empty() {
        format!(
            "{} API keys (stored hashed); none older than {max_age} days or idle 90 days",
            keys.len()
        )
    } else {
        problems.join("; ")
    };
    Ok(check(
        "api_keys",
        "API keys: age, scopes and last use",
        "PCI DSS 7.2.4, 8.2.6, 8.3.9",
        problems.is_empty(),
        finding,
        json!({"max_age_days": max_age, "keys": keys}),
    ))
}

fn retention_check(cfg: &Config) -> Check {
    let ok = cfg.audit.retention_days >= 365;
    check(
        "retention",
        "Audit log retention and data retention settings",
        "PCI DSS 10.5.1, 3.2.1",
        ok,
        format!(
            "audit retention {} days (at least 365 required; the vault never deletes audit entries); idempotency records {} day(s); checkpoints every {} s",
            cfg.audit.retention_days, cfg.audit.idempotency_retention_days, cfg.audit.checkpoint_interval_secs
        ),
        json!({
            "audit_retention_days": cfg.audit.retention_days,
            "idempotency_retention_days": cfg.audit.idempotency_retention_days,
            "checkpoint_interval_secs": cfg.audit.checkpoint_interval_secs,
        }),
    )
}
