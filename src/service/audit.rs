//! The tamper-evident audit trail: installing the audit key into the
//! storage (so every append is chained and MACed), operational events
//! (start/stop, failed authentication), HSM-signed checkpoints over the
//! chain head, and `audit verify`, which walks chain and checkpoints and
//! names the first entry edited, deleted, inserted or reordered.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;
use subtle::ConstantTimeEq;

use super::{now, ServiceResult, Vault};
use crate::crypto::AuditMacKey;
use crate::storage::chain::{entry_hash, GENESIS};
use crate::storage::{AuditEntry, ChainRow, Checkpoint};

/// Event types the audit trail must be able to show (PCI DSS 10.2), each
/// with the entry events that evidence it.
pub const REQUIRED_EVENTS: &[(&str, &[&str])] = &[
    ("card data access (reveal)", &["card.reveal"]),
    ("card create", &["card.create"]),
    ("card delete", &["card.delete"]),
    ("customer create", &["customer.create"]),
    ("customer delete", &["customer.delete"]),
    ("token use", &["token.use"]),
    ("charges", &["charge.create", "charge.authorize"]),
    ("failed authentication", &["auth.failure"]),
    ("scope denial", &["auth.scope_denied", "card.reveal:denied"]),
    ("key creation", &["key.create"]),
    ("key rotation", &["key.rotate", "key.rewrap"]),
    ("key retirement", &["key.retire", "key.destroy"]),
    ("merchant change", &["merchant.create", "merchant.shred"]),
    ("API key change", &["api_key.create", "api_key.revoke"]),
    ("audit verification run", &["audit.verify"]),
    ("service start", &["service.start"]),
    ("service stop", &["service.stop"]),
];

/// How an entry was tampered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Tamper {
    Edited,
    Deleted,
    Inserted,
    Reordered,
    /// A checkpoint whose HSM signature does not verify.
    ForgedCheckpoint,
}

impl Tamper {
    pub fn as_str(self) -> &'static str {
        match self {
            Tamper::Edited => "edited",
            Tamper::Deleted => "deleted",
            Tamper::Inserted => "inserted",
            Tamper::Reordered => "reordered",
            Tamper::ForgedCheckpoint => "forged checkpoint",
        }
    }
}

/// One finding of `audit verify`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// The audit row (`seq`) the finding names.
    pub seq: i64,
    pub kind: Tamper,
    pub message: String,
}

/// What `audit verify` found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Verification {
    pub entries: i64,
    pub chained: i64,
    /// Rows written before the chain existed (not protected).
    pub unchained: i64,
    pub checkpoints: i64,
    pub head_seq: Option<i64>,
    /// Findings in chain order; the first is the first tampered entry.
    pub findings: Vec<Finding>,
}

impl Verification {
    pub fn ok(&self) -> bool {
        self.findings.is_empty()
    }
}

impl Vault {
    /// Loads (creating on first use) the audit key and installs it into the
    /// storage; from then on every append is chained and MACed.
    pub async fn install_audit_key(&self) -> ServiceResult<()> {
        let (key, created) = self.keyring.audit_key().await?;
        let key_id = key.key_id_string();
        self.storage.set_audit_sealer(key);
        if created {
            self.record(system_entry(
                "key.create",
                Some(&key_id),
                "success",
                Some("purpose=audit"),
            ))
            .await?;
        }
        Ok(())
    }

    /// Appends one entry on its own (for events with no other write).
    pub async fn record(&self, entry: AuditEntry) -> ServiceResult<()> {
        Ok(self.storage.append_audit(&entry).await?)
    }

    /// Records a failed authentication (never the presented key).
    pub async fn record_auth_failure(
        &self,
        origin: Option<String>,
        request_id: String,
        reason: &str,
    ) {
        let entry = AuditEntry {
            at: now(),
            actor: "anonymous".to_string(),
            event: "auth.failure".to_string(),
            outcome: "denied".to_string(),
            origin,
            request_id: Some(request_id),
            detail: Some(format!("reason={reason}")),
            ..AuditEntry::default()
        };
        if let Err(e) = self.record(entry).await {
            tracing::warn!(error = %e, "could not record a failed authentication");
        }
    }

    /// Records a key used outside its scope (e.g. a publishable key on a
    /// secret-key route).
    pub async fn record_scope_denial(
        &self,
        principal: &super::Principal,
        origin: Option<String>,
        request_id: String,
        needed: &str,
    ) {
        let entry = AuditEntry {
            at: now(),
            actor: principal.key_id.clone(),
            merchant_id: Some(principal.merchant_id.clone()),
            event: "auth.scope_denied".to_string(),
            outcome: "denied".to_string(),
            origin,
            request_id: Some(request_id),
            detail: Some(format!("needs={needed}")),
            ..AuditEntry::default()
        };
        if let Err(e) = self.record(entry).await {
            tracing::warn!(error = %e, "could not record a scope denial");
        }
    }

    /// Signs a checkpoint over the chain head in the HSM, unless the newest
    /// checkpoint already covers it. Returns the head seq checkpointed.
    ///
    /// The chained entries are counted on from the newest checkpoint's
    /// count rather than from the start of the log, so a checkpoint costs
    /// what was appended since the last one. That count is carried forward
    /// only once the HSM confirms its signature: a count altered in the
    /// database makes this checkpoint count the whole log instead.
    pub async fn checkpoint(&self) -> ServiceResult<Option<i64>> {
        let last = self.storage.latest_checkpoint().await?;
        let counted = last.as_ref().map(|c| (c.head_seq, c.entries));
        let Some((mut head_seq, mut head_hash, mut entries)) =
            self.storage.chain_head(counted).await?
        else {
            return Ok(None);
        };
        if let Some(last) = &last {
            if last.head_seq == head_seq && last.head_hash == head_hash {
                return Ok(Some(head_seq));
            }
            let expected = self.checkpoint_signature(last).await?;
            if !bool::from(expected.as_slice().ct_eq(&last.signature)) {
                tracing::warn!(
                    checkpoint = last.seq,
                    "the newest audit checkpoint does not verify; counting the whole log"
                );
                let Some(full) = self.storage.chain_head(None).await? else {
                    return Ok(None);
                };
                (head_seq, head_hash, entries) = full;
            }
        }
        let at = now();
        let signature = self
            .keyring
            .sign_checkpoint(Checkpoint::signed_bytes(at, head_seq, &head_hash, entries))
            .await?;
        self.storage
            .insert_checkpoint(&Checkpoint {
                seq: 0,
                at,
                head_seq,
                head_hash,
                entries,
                hsm_label: crate::crypto::AUDIT_HSM_LABEL.to_string(),
                signature: signature.to_vec(),
            })
            .await?;
        Ok(Some(head_seq))
    }

    /// The signature the HSM gives `c`'s signed fields now: equal to the
    /// stored one unless the checkpoint was altered or forged.
    async fn checkpoint_signature(&self, c: &Checkpoint) -> ServiceResult<[u8; 32]> {
        Ok(self
            .keyring
            .sign_checkpoint(Checkpoint::signed_bytes(
                c.at,
                c.head_seq,
                &c.head_hash,
                c.entries,
            ))
            .await?)
    }

    /// Walks the whole chain and every checkpoint, then records the run.
    pub async fn verify_audit(&self, actor: &str) -> ServiceResult<Verification> {
        let mut rows = Vec::new();
        let mut after = 0;
        loop {
            let page = self.storage.chain_rows(after, 5_000).await?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            rows.extend(page);
        }
        let checkpoints = self.storage.list_checkpoints().await?;
        let mut keys: HashMap<String, Option<Arc<AuditMacKey>>> = HashMap::new();
        for id in rows.iter().filter_map(|r| r.mac_key_id.clone()) {
            if let std::collections::hash_map::Entry::Vacant(slot) = keys.entry(id) {
                let key = match self.keyring.audit_key_by_id(slot.key()).await {
                    Ok(k) => Some(k),
                    Err(e) if e.is_unavailable() => return Err(e.into()),
                    Err(_) => None,
                };
                slot.insert(key);
            }
        }
        let mut v = walk_chain(&rows, &keys);
        let chained = chained_counts(&rows);
        for c in &checkpoints {
            let expected = self.checkpoint_signature(c).await?;
            v.findings
                .extend(check_checkpoint(c, &expected, &rows, &chained));
        }
        v.checkpoints = checkpoints.len() as i64;
        v.findings.sort_by_key(|f| f.seq);
        let outcome = if v.ok() { "success" } else { "failure" };
        let detail = match v.findings.first() {
            Some(f) => format!(
                "entries={} first={} seq={}",
                v.entries,
                f.kind.as_str(),
                f.seq
            ),
            None => format!("entries={} checkpoints={}", v.entries, v.checkpoints),
        };
        self.record(system_entry_by(
            actor,
            "audit.verify",
            None,
            outcome,
            Some(&detail),
        ))
        .await?;
        Ok(v)
    }

    /// Event types present in the log against [`REQUIRED_EVENTS`].
    pub async fn event_coverage(&self) -> ServiceResult<Vec<(String, bool, i64)>> {
        let counts = self.storage.audit_event_counts().await?;
        // `event:outcome` names one outcome of an event only.
        let count = |spec: &str| -> i64 {
            let (event, outcome) = spec
                .split_once(':')
                .map_or((spec, None), |(e, o)| (e, Some(o)));
            counts
                .iter()
                .filter(|(e, o, _)| e == event && outcome.is_none_or(|want| o == want))
                .map(|(_, _, n)| *n)
                .sum()
        };
        Ok(REQUIRED_EVENTS
            .iter()
            .map(|(name, events)| {
                let n: i64 = events.iter().map(|e| count(e)).sum();
                (name.to_string(), n > 0, n)
            })
            .collect())
    }
}

impl AuditMacKey {
    fn key_id_string(&self) -> String {
        crate::storage::AuditSealer::key_id(self).to_string()
    }
}

/// An entry by the operator/system, outside any API request.
pub fn system_entry(
    event: &str,
    resource: Option<&str>,
    outcome: &str,
    detail: Option<&str>,
) -> AuditEntry {
    system_entry_by("system", event, resource, outcome, detail)
}

pub fn system_entry_by(
    actor: &str,
    event: &str,
    resource: Option<&str>,
    outcome: &str,
    detail: Option<&str>,
) -> AuditEntry {
    AuditEntry {
        at: now(),
        actor: actor.to_string(),
        event: event.to_string(),
        resource: resource.map(str::to_string),
        outcome: outcome.to_string(),
        detail: detail.map(str::to_string),
        ..AuditEntry::default()
    }
}

fn as32(b: &Option<Vec<u8>>) -> Option<[u8; 32]> {
    b.as_deref().and_then(|b| b.try_into().ok())
}

/// The chain walk (pure, for tests): classifies the first break at each
/// place the chain stops holding, then resynchronises on the stored hash.
pub fn walk_chain(
    rows: &[ChainRow],
    keys: &HashMap<String, Option<Arc<AuditMacKey>>>,
) -> Verification {
    let mut v = Verification {
        entries: rows.len() as i64,
        head_seq: rows.last().map(|r| r.seq),
        ..Verification::default()
    };
    let first_chained = rows
        .iter()
        .position(|r| r.hash.is_some())
        .unwrap_or(rows.len());
    v.unchained = first_chained as i64;
    let position: HashMap<[u8; 32], usize> = rows
        .iter()
        .enumerate()
        .filter_map(|(i, r)| as32(&r.hash).map(|h| (h, i)))
        .collect();
    let mut expected = GENESIS;
    let mut seen = std::collections::HashSet::new();
    for i in first_chained..rows.len() {
        let r = &rows[i];
        v.chained += 1;
        let (Some(prev), Some(hash), Some(mac), Some(key_id)) = (
            as32(&r.prev_hash),
            as32(&r.hash),
            r.mac.as_ref(),
            r.mac_key_id.as_ref(),
        ) else {
            v.findings.push(Finding {
                seq: r.seq,
                kind: Tamper::Edited,
                message: format!(
                    "entry seq {} was edited: its chain fields are missing",
                    r.seq
                ),
            });
            continue;
        };
        let mac_ok = keys
            .get(key_id)
            .and_then(|k| k.as_ref())
            .is_some_and(|k| k.verify(&hash, mac));
        let content_ok = bool::from(entry_hash(&prev, &r.entry, key_id).ct_eq(&hash));
        let linked = prev == expected;
        if !seen.insert(hash) {
            v.findings.push(Finding {
                seq: r.seq,
                kind: Tamper::Inserted,
                message: format!(
                    "entry seq {} was inserted: it replays an earlier entry",
                    r.seq
                ),
            });
            continue;
        }
        if mac_ok && content_ok && linked {
            expected = hash;
            continue;
        }
        let next_links_past = rows.get(i + 1).and_then(|n| as32(&n.prev_hash)) == Some(expected);
        let finding = if mac_ok && !content_ok {
            Finding {
                seq: r.seq,
                kind: Tamper::Edited,
                message: format!(
                    "entry seq {} was edited: its fields no longer match the hash sealed when it was written",
                    r.seq
                ),
            }
        } else if !mac_ok && (next_links_past || i + 1 == rows.len()) {
            Finding {
                seq: r.seq,
                kind: Tamper::Inserted,
                message: format!(
                    "entry seq {} was inserted: it is not sealed by the audit key and the chain skips it",
                    r.seq
                ),
            }
        } else if !mac_ok {
            Finding {
                seq: r.seq,
                kind: Tamper::Edited,
                message: format!(
                    "entry seq {} was edited or forged: its MAC does not verify under audit key {key_id}",
                    r.seq
                ),
            }
        } else {
            match position.get(&prev) {
                Some(&j) if j > i => Finding {
                    seq: r.seq,
                    kind: Tamper::Reordered,
                    message: format!(
                        "entry seq {} is out of order: the entry it was chained after now sits at seq {}",
                        r.seq, rows[j].seq
                    ),
                },
                _ => Finding {
                    seq: r.seq,
                    kind: Tamper::Deleted,
                    message: format!(
                        "an entry before seq {} was deleted: the entry it was chained after is missing{}",
                        r.seq,
                        if i > 0 {
                            format!(" (expected after seq {})", rows[i - 1].seq)
                        } else {
                            String::new()
                        }
                    ),
                },
            }
        };
        // Inserted rows are skipped: the chain continues from the last good
        // hash. Anything else resynchronises on this row.
        if finding.kind != Tamper::Inserted {
            expected = hash;
        }
        v.findings.push(finding);
    }
    v
}

/// The number of chained entries in `rows[..=i]`, for each `i`.
fn chained_counts(rows: &[ChainRow]) -> Vec<i64> {
    rows.iter()
        .scan(0, |n, r| {
            *n += i64::from(r.hash.is_some());
            Some(*n)
        })
        .collect()
}

/// A checkpoint must verify in the HSM and its head must still be in the
/// chain, with as many chained entries up to it as when it was signed.
/// `rows` are in `seq` order and `chained` is [`chained_counts`] of them:
/// a checkpoint costs a binary search, not a walk of the log (a year of
/// checkpoints every five minutes is about 105,000 of them).
fn check_checkpoint(
    c: &Checkpoint,
    expected_sig: &[u8; 32],
    rows: &[ChainRow],
    chained: &[i64],
) -> Option<Finding> {
    if !bool::from(expected_sig.as_slice().ct_eq(&c.signature)) {
        return Some(Finding {
            seq: c.head_seq,
            kind: Tamper::ForgedCheckpoint,
            message: format!(
                "checkpoint {} over seq {} does not verify in the HSM ({})",
                c.seq, c.head_seq, c.hsm_label
            ),
        });
    }
    let upto = rows.partition_point(|r| r.seq <= c.head_seq);
    let chained_upto = upto.checked_sub(1).map_or(0, |i| chained[i]);
    let before = rows[..upto].last();
    match before.filter(|r| r.seq == c.head_seq) {
        None => {
            let last = before.map_or(0, |r| r.seq);
            Some(Finding {
                seq: c.head_seq,
                kind: Tamper::Deleted,
                message: format!(
                    "entry seq {} was deleted: checkpoint {} signed it as the chain head; the log now ends at seq {last} before it",
                    c.head_seq, c.seq
                ),
            })
        }
        Some(r) if r.hash.as_deref() != Some(c.head_hash.as_slice()) => None, // reported by the walk
        Some(_) if chained_upto != c.entries => Some(Finding {
            seq: c.head_seq,
            kind: if chained_upto < c.entries {
                Tamper::Deleted
            } else {
                Tamper::Inserted
            },
            message: format!(
                "checkpoint {} counted {} entries up to seq {}, the log now has {chained_upto}",
                c.seq, c.entries, c.head_seq
            ),
        }),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn row(seq: i64, chained: bool) -> ChainRow {
        ChainRow {
            seq,
            entry: AuditEntry::default(),
            prev_hash: None,
            hash: chained.then(|| seq.to_le_bytes().repeat(4)),
            mac: None,
            mac_key_id: None,
        }
    }

    fn checkpoint(head_seq: i64, head_hash: Vec<u8>, entries: i64) -> Checkpoint {
        Checkpoint {
            seq: 1,
            at: 0,
            head_seq,
            head_hash,
            entries,
            hsm_label: "audit".to_string(),
            signature: vec![7; 32],
        }
    }

    /// What `check_checkpoint` decides, by a scan of the whole log.
    fn by_scan(c: &Checkpoint, rows: &[ChainRow]) -> Option<(Tamper, i64)> {
        let chained_upto = rows
            .iter()
            .filter(|r| r.hash.is_some() && r.seq <= c.head_seq)
            .count() as i64;
        match rows.iter().find(|r| r.seq == c.head_seq) {
            None => Some((Tamper::Deleted, c.head_seq)),
            Some(r) if r.hash.as_deref() != Some(c.head_hash.as_slice()) => None,
            Some(_) if chained_upto < c.entries => Some((Tamper::Deleted, c.head_seq)),
            Some(_) if chained_upto > c.entries => Some((Tamper::Inserted, c.head_seq)),
            Some(_) => None,
        }
    }

    #[test]
    fn checkpoints_are_checked_as_a_scan_of_the_log_would() {
        // Unchained rows first (written before the chain existed), gaps
        // where rows were deleted, and a stretch of unchained rows inside.
        let rows: Vec<ChainRow> = (1..=60)
            .filter(|s| s % 7 != 0)
            .map(|s| row(s, s > 5 && !(30..33).contains(&s)))
            .collect();
        let chained = chained_counts(&rows);
        let mut cases = 0;
        for head in 0..=62 {
            let hash = row(head, true).hash.unwrap();
            let true_count = rows
                .iter()
                .filter(|r| r.hash.is_some() && r.seq <= head)
                .count() as i64;
            for (head_hash, entries) in [
                (hash.clone(), true_count),
                (hash.clone(), true_count + 2),
                (hash, true_count - 1),
                (vec![0; 32], true_count),
            ] {
                let c = checkpoint(head, head_hash, entries);
                let got = check_checkpoint(&c, &[7; 32], &rows, &chained);
                assert_eq!(
                    got.as_ref().map(|f| (f.kind, f.seq)),
                    by_scan(&c, &rows),
                    "head {head}, entries {entries}"
                );
                cases += usize::from(got.is_some());
            }
        }
        // Every branch was taken: deleted heads, miscounts, and passes.
        assert!(cases > 100, "{cases}");
        let missing = check_checkpoint(
            &checkpoint(14, row(14, true).hash.unwrap(), 8),
            &[7; 32],
            &rows,
            &chained,
        )
        .unwrap();
        assert!(
            missing
                .message
                .contains("the log now ends at seq 13 before it"),
            "{}",
            missing.message
        );
        let forged = check_checkpoint(
            &checkpoint(10, row(10, true).hash.unwrap(), 5),
            &[8; 32],
            &rows,
            &chained,
        )
        .unwrap();
        assert_eq!(forged.kind, Tamper::ForgedCheckpoint);
    }
}
