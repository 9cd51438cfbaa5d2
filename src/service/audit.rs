//! The tamper-evident audit trail: installing the audit key into the
//! storage (so every append is chained and MACed), operational events
//! (start/stop, failed authentication), HSM-signed checkpoints over the
//! chain head, and `audit verify`, which walks chain and checkpoints and
//! names the first entry edited, deleted, inserted or reordered.

use std::collections::{HashMap, HashSet};
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
    ///
    /// The log is read in pages and walked as it streams, up to the last
    /// row when the walk starts: memory holds a page, the checkpoints and
    /// the findings, not the log. An intact chain is walked once. When the
    /// walk finds a break, the database lists the hashes that more than
    /// one row holds and the chain is walked again, so that an entry
    /// replayed from earlier in the log is named as inserted. A replayed
    /// entry always breaks the chain where it sits (no chain comes back to
    /// a hash it passed), so the first walk misses none.
    pub async fn verify_audit(&self, actor: &str) -> ServiceResult<Verification> {
        let checkpoints = self.storage.list_checkpoints().await?;
        let mut signed = Vec::with_capacity(checkpoints.len());
        for c in checkpoints {
            let expected = self.checkpoint_signature(&c).await?;
            let verifies = bool::from(expected.as_slice().ct_eq(&c.signature));
            signed.push((c, verifies));
        }
        // After the checkpoints: every head they sign is at or before it.
        let end = self.storage.chain_end().await?;
        let mut keys = HashMap::new();
        let (mut v, breaks) = self
            .walk_chain(ChainWalk::new(signed.clone(), None), end, &mut keys)
            .await?;
        if breaks {
            let replays: HashSet<[u8; 32]> = self
                .storage
                .chain_duplicate_hashes(end)
                .await?
                .into_iter()
                .filter_map(|h| <[u8; 32]>::try_from(h).ok())
                .collect();
            // With no hash repeated, the second walk would find the same.
            if !replays.is_empty() {
                (v, _) = self
                    .walk_chain(ChainWalk::new(signed, Some(replays)), end, &mut keys)
                    .await?;
            }
        }
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

    /// Feeds `walk` the log up to `end`, page by page, loading each audit
    /// key the first time a row names it.
    async fn walk_chain(
        &self,
        mut walk: ChainWalk,
        end: i64,
        keys: &mut HashMap<String, Option<Arc<AuditMacKey>>>,
    ) -> ServiceResult<(Verification, bool)> {
        let mut after = 0;
        while after < end {
            let page = self.storage.chain_rows(after, VERIFY_PAGE).await?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            for id in page.iter().filter_map(|r| r.mac_key_id.as_ref()) {
                if !keys.contains_key(id) {
                    let key = match self.keyring.audit_key_by_id(id).await {
                        Ok(k) => Some(k),
                        Err(e) if e.is_unavailable() => return Err(e.into()),
                        Err(_) => None,
                    };
                    keys.insert(id.clone(), key);
                }
            }
            let mac_ok = |id: &str, hash: &[u8; 32], mac: &[u8]| mac_verifies(keys, id, hash, mac);
            for row in page.into_iter().take_while(|r| r.seq <= end) {
                walk.push(row, &mac_ok);
            }
        }
        Ok(walk.finish(&|id, hash, mac| mac_verifies(keys, id, hash, mac)))
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

/// Whether a MAC verifies: `(key_id, hash, mac)`.
pub type MacCheck<'a> = dyn Fn(&str, &[u8; 32], &[u8]) -> bool + 'a;

/// [`MacCheck`] over the audit keys loaded so far (`None`: a key id the
/// keyring does not know, whose MACs never verify).
fn mac_verifies(
    keys: &HashMap<String, Option<Arc<AuditMacKey>>>,
    key_id: &str,
    hash: &[u8; 32],
    mac: &[u8],
) -> bool {
    keys.get(key_id)
        .and_then(|k| k.as_ref())
        .is_some_and(|k| k.verify(hash, mac))
}

/// Rows `audit verify` reads per query.
const VERIFY_PAGE: u32 = 5_000;

/// A finding that depends on whether the hash an entry was chained after
/// shows up later in the log (the entry was reordered) or never (the one
/// before it was deleted). Decided when the walk ends.
struct Unplaced {
    finding: usize,
    /// Position of the entry in the log.
    index: i64,
    prev: [u8; 32],
    /// The seq of the row before it, if any.
    before: Option<i64>,
}

/// What is known of a row that was chained after by an [`Unplaced`] entry:
/// the position and seq of the last row with that hash.
struct LastSeen {
    index: i64,
    seq: i64,
}

/// A checkpoint and whether its signature verified in the HSM.
struct PendingCheckpoint {
    /// Its place in the order the checkpoints were listed.
    order: usize,
    checkpoint: Checkpoint,
}

/// The chain walk, fed the log one row at a time in `seq` order. It
/// classifies the first break at each place the chain stops holding, then
/// resynchronises on the stored hash, and checks every checkpoint when the
/// rows pass its head. Memory is the checkpoints, the findings and 16 bytes
/// per chained entry, not the rows.
pub struct ChainWalk {
    v: Verification,
    /// Whether a chained row has been seen: rows before the first one were
    /// written before the chain existed.
    started: bool,
    /// The hash the next entry must be chained after.
    expected: [u8; 32],
    /// Hashes more than one row holds (`None`: not known, and not
    /// checked), and those of them walked so far.
    replays: Option<HashSet<[u8; 32]>>,
    seen: HashSet<[u8; 32]>,
    /// The walk looks one row ahead: this row waits for the next one.
    pending: Option<ChainRow>,
    /// The seq of the row before `pending`.
    before_pending: Option<i64>,
    /// Position of `pending` in the log.
    pending_index: i64,
    unplaced: Vec<Unplaced>,
    /// For each hash an [`Unplaced`] entry was chained after, the last row
    /// seen with it.
    chained_after: HashMap<[u8; 32], Option<LastSeen>>,
    /// Checkpoints not yet checked, by descending head seq.
    checkpoints: Vec<PendingCheckpoint>,
    /// Findings on checkpoints, with the order they were listed in.
    checkpoint_findings: Vec<(usize, Finding)>,
    /// Rows so far with a hash, and the last row so far (seq and hash).
    hashed: i64,
    last: Option<(i64, Option<Vec<u8>>)>,
}

impl ChainWalk {
    /// A walk that will also check `checkpoints`, each given with whether
    /// its signature verifies in the HSM. `replays` are the hashes more
    /// than one row of the log holds: a row repeating an earlier one is
    /// then named as inserted. Without them a replayed row is still a break
    /// (an intact chain never repeats a hash), named by how it links.
    pub fn new(checkpoints: Vec<(Checkpoint, bool)>, replays: Option<HashSet<[u8; 32]>>) -> Self {
        let mut checkpoint_findings = Vec::new();
        let mut pending = Vec::with_capacity(checkpoints.len());
        let count = checkpoints.len();
        for (order, (c, verifies)) in checkpoints.into_iter().enumerate() {
            if verifies {
                pending.push(PendingCheckpoint {
                    order,
                    checkpoint: c,
                });
            } else {
                checkpoint_findings.push((
                    order,
                    Finding {
                        seq: c.head_seq,
                        kind: Tamper::ForgedCheckpoint,
                        message: format!(
                            "checkpoint {} over seq {} does not verify in the HSM ({})",
                            c.seq, c.head_seq, c.hsm_label
                        ),
                    },
                ));
            }
        }
        pending.sort_by_key(|p| std::cmp::Reverse(p.checkpoint.head_seq));
        ChainWalk {
            v: Verification {
                checkpoints: count as i64,
                ..Verification::default()
            },
            started: false,
            expected: GENESIS,
            replays,
            seen: HashSet::new(),
            pending: None,
            before_pending: None,
            pending_index: 0,
            unplaced: Vec::new(),
            chained_after: HashMap::new(),
            checkpoints: pending,
            checkpoint_findings,
            hashed: 0,
            last: None,
        }
    }

    /// The next row of the log; rows must come in ascending `seq`.
    /// `mac_ok(key_id, hash, mac)` tells whether a MAC verifies.
    pub fn push(&mut self, row: ChainRow, mac_ok: &MacCheck<'_>) {
        self.check_checkpoints_before(Some(row.seq));
        self.v.entries += 1;
        self.v.head_seq = Some(row.seq);
        self.hashed += i64::from(row.hash.is_some());
        self.last = Some((row.seq, row.hash.clone()));
        if let Some(pending) = self.pending.take() {
            self.step(&pending, Some(as32(&row.prev_hash)), mac_ok);
            self.before_pending = Some(pending.seq);
        }
        // After the step: the row before may be waiting for this hash.
        if let Some(h) = as32(&row.hash) {
            if let Some(last) = self.chained_after.get_mut(&h) {
                *last = Some(LastSeen {
                    index: self.v.entries - 1,
                    seq: row.seq,
                });
            }
        }
        self.pending_index = self.v.entries - 1;
        self.pending = Some(row);
    }

    /// Ends the walk: the last row, the checkpoints past the end of the
    /// log, and the findings in chain order; with whether the chain itself
    /// (not a checkpoint) broke anywhere.
    pub fn finish(mut self, mac_ok: &MacCheck<'_>) -> (Verification, bool) {
        if let Some(pending) = self.pending.take() {
            self.step(&pending, None, mac_ok);
        }
        self.check_checkpoints_before(None);
        let mut v = self.v;
        let breaks = !v.findings.is_empty();
        for u in self.unplaced {
            let seq = v.findings[u.finding].seq;
            v.findings[u.finding] = match self.chained_after.get(&u.prev) {
                Some(Some(last)) if last.index > u.index => Finding {
                    seq,
                    kind: Tamper::Reordered,
                    message: format!(
                        "entry seq {seq} is out of order: the entry it was chained after now sits at seq {}",
                        last.seq
                    ),
                },
                _ => Finding {
                    seq,
                    kind: Tamper::Deleted,
                    message: format!(
                        "an entry before seq {seq} was deleted: the entry it was chained after is missing{}",
                        u.before
                            .map(|b| format!(" (expected after seq {b})"))
                            .unwrap_or_default()
                    ),
                },
            };
        }
        self.checkpoint_findings.sort_by_key(|(order, _)| *order);
        v.findings
            .extend(self.checkpoint_findings.into_iter().map(|(_, f)| f));
        v.findings.sort_by_key(|f| f.seq);
        (v, breaks)
    }

    /// Walks `r`. `next_prev` is `None` at the end of the log, else the
    /// hash its successor was chained after (if it has a valid one).
    fn step(&mut self, r: &ChainRow, next_prev: Option<Option<[u8; 32]>>, mac_ok: &MacCheck<'_>) {
        if !self.started {
            if r.hash.is_none() {
                self.v.unchained += 1;
                return;
            }
            self.started = true;
        }
        self.v.chained += 1;
        let (Some(prev), Some(hash), Some(mac), Some(key_id)) = (
            as32(&r.prev_hash),
            as32(&r.hash),
            r.mac.as_ref(),
            r.mac_key_id.as_ref(),
        ) else {
            self.v.findings.push(Finding {
                seq: r.seq,
                kind: Tamper::Edited,
                message: format!(
                    "entry seq {} was edited: its chain fields are missing",
                    r.seq
                ),
            });
            return;
        };
        let mac_ok = mac_ok(key_id, &hash, mac);
        let content_ok = bool::from(entry_hash(&prev, &r.entry, key_id).ct_eq(&hash));
        let linked = prev == self.expected;
        let replayed = self
            .replays
            .as_ref()
            .is_some_and(|r| r.contains(&hash) && !self.seen.insert(hash));
        if replayed {
            self.v.findings.push(Finding {
                seq: r.seq,
                kind: Tamper::Inserted,
                message: format!(
                    "entry seq {} was inserted: it replays an earlier entry",
                    r.seq
                ),
            });
            return;
        }
        if mac_ok && content_ok && linked {
            self.expected = hash;
            return;
        }
        let next_links_past = next_prev.is_none_or(|p| p == Some(self.expected));
        let finding = if mac_ok && !content_ok {
            Finding {
                seq: r.seq,
                kind: Tamper::Edited,
                message: format!(
                    "entry seq {} was edited: its fields no longer match the hash sealed when it was written",
                    r.seq
                ),
            }
        } else if !mac_ok && next_links_past {
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
            // Reordered or deleted: decided at the end, once it is known
            // whether a later row holds the hash it was chained after.
            self.unplaced.push(Unplaced {
                finding: self.v.findings.len(),
                index: self.pending_index,
                prev,
                before: self.before_pending,
            });
            self.chained_after.entry(prev).or_default();
            Finding {
                seq: r.seq,
                kind: Tamper::Deleted,
                message: String::new(),
            }
        };
        // Inserted rows are skipped: the chain continues from the last good
        // hash. Anything else resynchronises on this row.
        if finding.kind != Tamper::Inserted {
            self.expected = hash;
        }
        self.v.findings.push(finding);
    }

    /// Checks the checkpoints whose head is before `seq` (all of them when
    /// `None`) against the rows so far: a checkpoint's head must still be
    /// in the chain, with as many chained entries up to it as when it was
    /// signed.
    fn check_checkpoints_before(&mut self, seq: Option<i64>) {
        while let Some(p) = self.checkpoints.last() {
            if seq.is_some_and(|s| p.checkpoint.head_seq >= s) {
                break;
            }
            let Some(p) = self.checkpoints.pop() else {
                break;
            };
            let c = &p.checkpoint;
            let finding = match &self.last {
                Some((seq, hash)) if *seq == c.head_seq => {
                    if hash.as_deref() != Some(c.head_hash.as_slice()) {
                        None // reported by the walk
                    } else if self.hashed != c.entries {
                        Some(Finding {
                            seq: c.head_seq,
                            kind: if self.hashed < c.entries {
                                Tamper::Deleted
                            } else {
                                Tamper::Inserted
                            },
                            message: format!(
                                "checkpoint {} counted {} entries up to seq {}, the log now has {}",
                                c.seq, c.entries, c.head_seq, self.hashed
                            ),
                        })
                    } else {
                        None
                    }
                }
                last => Some(Finding {
                    seq: c.head_seq,
                    kind: Tamper::Deleted,
                    message: format!(
                        "entry seq {} was deleted: checkpoint {} signed it as the chain head; the log now ends at seq {} before it",
                        c.head_seq,
                        c.seq,
                        last.as_ref().map_or(0, |(s, _)| *s)
                    ),
                }),
            };
            if let Some(f) = finding {
                self.checkpoint_findings.push((p.order, f));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const KEYS: [&str; 2] = ["dek_a", "dek_b"];

    /// A stand-in for the audit MAC: the hash masked by the key id.
    fn fake_mac(key_id: &str, hash: &[u8; 32]) -> Vec<u8> {
        hash.iter().map(|b| b ^ key_id.as_bytes()[4]).collect()
    }

    fn mac_ok(key_id: &str, hash: &[u8; 32], mac: &[u8]) -> bool {
        KEYS.contains(&key_id) && fake_mac(key_id, hash) == mac
    }

    fn sealed(seq: i64, prev: [u8; 32], key_id: &str) -> ChainRow {
        let entry = AuditEntry {
            at: seq,
            actor: "key_x".to_string(),
            event: format!("e{seq}"),
            outcome: "success".to_string(),
            ..AuditEntry::default()
        };
        let hash = entry_hash(&prev, &entry, key_id);
        ChainRow {
            seq,
            entry,
            prev_hash: Some(prev.to_vec()),
            hash: Some(hash.to_vec()),
            mac: Some(fake_mac(key_id, &hash)),
            mac_key_id: Some(key_id.to_string()),
        }
    }

    /// `unchained` rows from before the chain, then `n` chained ones (the
    /// key rotates halfway), at seqs 10, 20, ... so rows fit between.
    fn log(unchained: usize, n: usize) -> Vec<ChainRow> {
        let mut rows = Vec::new();
        let mut prev = GENESIS;
        for i in 0..unchained + n {
            let seq = 10 * (i as i64 + 1);
            if i < unchained {
                let mut r = sealed(seq, prev, KEYS[0]);
                (r.prev_hash, r.hash, r.mac, r.mac_key_id) = (None, None, None, None);
                rows.push(r);
                continue;
            }
            let r = sealed(seq, prev, KEYS[usize::from(i >= unchained + n / 2)]);
            prev = as32(&r.hash).unwrap();
            rows.push(r);
        }
        rows
    }

    /// A seq free between `rows[at - 1]` and `rows[at]`, if any.
    fn free_seq(rows: &[ChainRow], at: usize, rng: &mut StdRng) -> Option<i64> {
        let lo = at.checked_sub(1).map_or(0, |i| rows[i].seq);
        let hi = rows.get(at).map_or(lo + 10, |r| r.seq);
        (hi - lo > 1).then(|| rng.gen_range(lo + 1..hi))
    }

    /// One random edit, deletion, insertion, replay, move or truncation.
    fn tamper(rows: &mut Vec<ChainRow>, rng: &mut StdRng) {
        if rows.is_empty() {
            return;
        }
        let i = rng.gen_range(0..rows.len());
        match rng.gen_range(0..10) {
            0 => rows[i].entry.detail = Some("edited".to_string()),
            1 => {
                rows.remove(i);
            }
            2 | 3 => {
                // Forged (a MAC that does not verify, or an unknown key),
                // or a replay of an earlier row.
                let at = rng.gen_range(0..=rows.len());
                let Some(seq) = free_seq(rows, at, rng) else {
                    return;
                };
                let mut r = if rng.gen_bool(0.5) {
                    let prev = at
                        .checked_sub(1)
                        .and_then(|p| as32(&rows[p].hash))
                        .unwrap_or(GENESIS);
                    let mut r = sealed(seq, prev, KEYS[0]);
                    if rng.gen_bool(0.5) {
                        r.mac = Some(vec![1; 32]);
                    } else {
                        r.mac_key_id = Some("dek_z".to_string());
                    }
                    r
                } else {
                    rows[rng.gen_range(0..rows.len())].clone()
                };
                r.seq = seq;
                rows.insert(at, r);
            }
            4 | 5 => {
                // Moved to another place in the log.
                let mut r = rows.remove(i);
                let at = rng.gen_range(0..=rows.len());
                let Some(seq) = free_seq(rows, at, rng) else {
                    rows.insert(i, r);
                    return;
                };
                r.seq = seq;
                rows.insert(at, r);
            }
            6 => {
                // Two rows' contents swapped, their seqs kept.
                let j = rng.gen_range(0..rows.len());
                let (a, b) = (rows[i].seq, rows[j].seq);
                rows.swap(i, j);
                (rows[i].seq, rows[j].seq) = (a, b);
            }
            7 => rows[i].hash = None,
            8 => rows[i].mac = Some(vec![0; 32]),
            _ => rows.truncate(i),
        }
    }

    /// The walk as it was before it streamed, with the log in memory and
    /// every checkpoint checked by a scan: the oracle.
    fn in_memory(rows: &[ChainRow], checkpoints: &[(Checkpoint, bool)]) -> Verification {
        let mut v = Verification {
            entries: rows.len() as i64,
            head_seq: rows.last().map(|r| r.seq),
            checkpoints: checkpoints.len() as i64,
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
        let mut seen = HashSet::new();
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
            let mac_ok = mac_ok(key_id, &hash, mac);
            let content_ok = entry_hash(&prev, &r.entry, key_id) == hash;
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
            let next_links_past =
                rows.get(i + 1).and_then(|n| as32(&n.prev_hash)) == Some(expected);
            let (kind, message) = if mac_ok && !content_ok {
                (Tamper::Edited, format!("entry seq {} was edited: its fields no longer match the hash sealed when it was written", r.seq))
            } else if !mac_ok && (next_links_past || i + 1 == rows.len()) {
                (Tamper::Inserted, format!("entry seq {} was inserted: it is not sealed by the audit key and the chain skips it", r.seq))
            } else if !mac_ok {
                (Tamper::Edited, format!("entry seq {} was edited or forged: its MAC does not verify under audit key {key_id}", r.seq))
            } else {
                match position.get(&prev) {
                    Some(&j) if j > i => (Tamper::Reordered, format!("entry seq {} is out of order: the entry it was chained after now sits at seq {}", r.seq, rows[j].seq)),
                    _ => (Tamper::Deleted, format!(
                        "an entry before seq {} was deleted: the entry it was chained after is missing{}",
                        r.seq,
                        if i > 0 { format!(" (expected after seq {})", rows[i - 1].seq) } else { String::new() }
                    )),
                }
            };
            if kind != Tamper::Inserted {
                expected = hash;
            }
            v.findings.push(Finding {
                seq: r.seq,
                kind,
                message,
            });
        }
        for (c, verifies) in checkpoints {
            let upto: Vec<&ChainRow> = rows.iter().filter(|r| r.seq <= c.head_seq).collect();
            let counted = upto.iter().filter(|r| r.hash.is_some()).count() as i64;
            let finding = if !verifies {
                Some((
                    Tamper::ForgedCheckpoint,
                    format!(
                        "checkpoint {} over seq {} does not verify in the HSM ({})",
                        c.seq, c.head_seq, c.hsm_label
                    ),
                ))
            } else {
                match upto.last() {
                    Some(r) if r.seq == c.head_seq => {
                        if r.hash.as_deref() != Some(c.head_hash.as_slice()) || counted == c.entries {
                            None
                        } else {
                            let kind = if counted < c.entries { Tamper::Deleted } else { Tamper::Inserted };
                            Some((kind, format!("checkpoint {} counted {} entries up to seq {}, the log now has {counted}", c.seq, c.entries, c.head_seq)))
                        }
                    }
                    last => Some((Tamper::Deleted, format!(
                        "entry seq {} was deleted: checkpoint {} signed it as the chain head; the log now ends at seq {} before it",
                        c.head_seq, c.seq, last.map_or(0, |r| r.seq)
                    ))),
                }
            };
            if let Some((kind, message)) = finding {
                v.findings.push(Finding {
                    seq: c.head_seq,
                    kind,
                    message,
                });
            }
        }
        v.findings.sort_by_key(|f| f.seq);
        v
    }

    fn walk(
        rows: &[ChainRow],
        checkpoints: &[(Checkpoint, bool)],
        replays: Option<HashSet<[u8; 32]>>,
    ) -> (Verification, bool) {
        let mut walk = ChainWalk::new(checkpoints.to_vec(), replays);
        for r in rows {
            walk.push(r.clone(), &mac_ok);
        }
        walk.finish(&mac_ok)
    }

    /// As `verify_audit` walks: once, and again knowing the repeated
    /// hashes if the chain broke.
    fn streamed(rows: &[ChainRow], checkpoints: &[(Checkpoint, bool)]) -> Verification {
        let (v, breaks) = walk(rows, checkpoints, None);
        if !breaks {
            return v;
        }
        let mut counts: HashMap<Vec<u8>, usize> = HashMap::new();
        for h in rows.iter().filter_map(|r| r.hash.clone()) {
            *counts.entry(h).or_default() += 1;
        }
        let replays = counts
            .into_iter()
            .filter(|(_, n)| *n > 1)
            .filter_map(|(h, _)| <[u8; 32]>::try_from(h).ok())
            .collect();
        walk(rows, checkpoints, Some(replays)).0
    }

    /// Checkpoints signed over the untampered log, listed out of head
    /// order, one of them forged and one past its end.
    fn checkpoints(rows: &[ChainRow], rng: &mut StdRng) -> Vec<(Checkpoint, bool)> {
        let mut out = Vec::new();
        for n in 0..rng.gen_range(0..6) {
            let head = rng.gen_range(0..rows.len() + 1);
            let (head_seq, head_hash) = match rows.get(head) {
                Some(r) => (r.seq, r.hash.clone().unwrap_or(vec![3; 32])),
                None => (10 * (rows.len() as i64 + 2), vec![4; 32]),
            };
            let entries = rows
                .iter()
                .filter(|r| r.seq <= head_seq && r.hash.is_some())
                .count() as i64;
            let c = Checkpoint {
                seq: n + 1,
                at: 0,
                head_seq,
                head_hash,
                entries,
                hsm_label: "audit".to_string(),
                signature: vec![7; 32],
            };
            out.push((c, rng.gen_range(0..8) != 0));
        }
        out
    }

    fn same(a: &Verification, b: &Verification, case: u64) {
        let counts =
            |v: &Verification| (v.entries, v.chained, v.unchained, v.checkpoints, v.head_seq);
        assert_eq!(counts(a), counts(b), "case {case}");
        assert_eq!(a.findings, b.findings, "case {case}");
    }

    #[test]
    fn the_streamed_walk_finds_what_the_walk_in_memory_found() {
        let mut kinds = Vec::new();
        for case in 0..3_000u64 {
            let mut rng = StdRng::seed_from_u64(case);
            let clean = log(rng.gen_range(0..3), rng.gen_range(0..25));
            let signed = checkpoints(&clean, &mut rng);
            let mut rows = clean;
            for _ in 0..rng.gen_range(0..4) {
                tamper(&mut rows, &mut rng);
            }
            let want = in_memory(&rows, &signed);
            same(&streamed(&rows, &signed), &want, case);
            kinds.extend(
                want.findings
                    .iter()
                    .map(|f| f.kind)
                    .filter(|k| !kinds.contains(k))
                    .collect::<Vec<_>>(),
            );
        }
        // Every kind of finding came up, so every branch was compared.
        assert_eq!(kinds.len(), 5, "{kinds:?}");
    }

    #[test]
    fn a_replayed_entry_breaks_the_chain_even_unnamed() {
        // The first walk does not know the repeated hashes; a replay must
        // still break the chain there, or the second walk never runs.
        let mut rows = log(0, 8);
        let copy = ChainRow {
            seq: 45,
            ..rows[2].clone()
        };
        rows.insert(4, copy);
        let (_, breaks) = walk(&rows, &[], None);
        assert!(breaks);
        let v = streamed(&rows, &[]);
        assert_eq!(v.findings.len(), 1, "{:?}", v.findings);
        assert_eq!(v.findings[0].kind, Tamper::Inserted);
        assert!(v.findings[0].message.contains("replays an earlier entry"));
    }

    #[test]
    fn an_untampered_log_verifies() {
        let rows = log(2, 40);
        let mut rng = StdRng::seed_from_u64(1);
        let signed: Vec<_> = checkpoints(&rows, &mut rng)
            .into_iter()
            .map(|(c, _)| (c, true))
            .filter(|(c, _)| c.head_seq <= rows.last().unwrap().seq)
            .collect();
        let v = streamed(&rows, &signed);
        assert!(v.ok(), "{:?}", v.findings);
        assert_eq!((v.entries, v.chained, v.unchained), (42, 40, 2));
    }

    #[test]
    fn a_row_moved_down_is_reordered_not_deleted() {
        // The entry the next row was chained after sits just after it.
        let mut rows = log(0, 6);
        let moved = rows.remove(2);
        rows.insert(3, ChainRow { seq: 45, ..moved });
        let v = streamed(&rows, &[]);
        assert_eq!(v.findings[0].kind, Tamper::Reordered, "{:?}", v.findings);
        assert!(v.findings[0].message.contains("now sits at seq 45"));
    }
}
