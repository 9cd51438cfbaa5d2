//! Storage tests: one set of checks, each taking `&dyn Storage`, run against
//! SQLite (a file in a temp dir) and PostgreSQL (a fresh `cv_<random>`
//! database per test, created through `CARDVAULT_TEST_PG_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`, and dropped afterwards).
//! PostgreSQL being down fails the tests; `CARDVAULT_SKIP_PG=1` skips them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use super::*;

// ---------------------------------------------------------------- fixtures

struct SqliteDb {
    storage: SqliteStorage,
    _dir: tempfile::TempDir,
}

async fn sqlite_db() -> SqliteDb {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("vault.db").display());
    let storage = SqliteStorage::connect(&url, 4).await.unwrap();
    storage.migrate().await.unwrap();
    storage.set_audit_sealer(std::sync::Arc::new(TestSealer));
    SqliteDb { storage, _dir: dir }
}

/// A fixed-key audit sealer: these tests exercise storage, not the keyring.
struct TestSealer;

impl super::AuditSealer for TestSealer {
    fn key_id(&self) -> &str {
        "dek_test_audit"
    }
    fn mac(&self, data: &[u8]) -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest([b"test-audit-key".as_slice(), data].concat()).into()
    }
}

/// A throw-away PostgreSQL database, dropped (best effort) with the value,
/// also when the test panicked.
struct PgDb {
    storage: Option<PgStorage>,
    admin_url: String,
    name: String,
}

impl PgDb {
    async fn create() -> Option<PgDb> {
        if std::env::var_os("CARDVAULT_SKIP_PG").is_some() {
            eprintln!("CARDVAULT_SKIP_PG set: skipping PostgreSQL test");
            return None;
        }
        let admin_url = crate::testkit::pg_admin_url();
        let name = format!("cv_{:016x}", rand::random::<u64>());
        let url = crate::testkit::create_pg_database(&admin_url, &name)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "PostgreSQL at {admin_url}: {e}; start it \
                     (pg_ctlcluster --skip-systemctl-redirect 15 main start) \
                     or set CARDVAULT_SKIP_PG=1"
                )
            });
        // Owned before connecting, so a failure below still drops the database.
        let mut db = PgDb {
            storage: None,
            admin_url: admin_url.clone(),
            name: name.clone(),
        };
        let storage = PgStorage::connect(&url, 4).await.unwrap();
        storage.migrate().await.unwrap();
        storage.set_audit_sealer(std::sync::Arc::new(TestSealer));
        db.storage = Some(storage);
        Some(db)
    }

    fn storage(&self) -> &PgStorage {
        self.storage.as_ref().unwrap()
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        drop(self.storage.take());
        crate::testkit::drop_pg_database_blocking(self.admin_url.clone(), self.name.clone());
    }
}

use crate::testkit::pg_url_with_database as with_database;

/// Runs each named check against both backends.
macro_rules! on_both_backends {
    ($($check:ident),* $(,)?) => {
        mod sqlite_backend {
            $(
                #[tokio::test]
                async fn $check() {
                    let db = super::sqlite_db().await;
                    super::$check(&db.storage).await;
                }
            )*
        }
        mod postgres_backend {
            $(
                #[tokio::test]
                async fn $check() {
                    let Some(db) = super::PgDb::create().await else { return };
                    super::$check(db.storage()).await;
                }
            )*
        }
    };
}

on_both_backends!(
    migrations_are_idempotent,
    merchants_and_api_keys,
    customer_crud_and_update_semantics,
    customer_listing_and_paging,
    other_merchants_see_nothing,
    card_lifecycle_and_default_card,
    concurrent_duplicate_cards_dedupe,
    delete_customer_removes_cards_and_audits,
    idempotency_keys,
    data_keys_and_seal_reservations,
    audit_append_and_list,
    chain_head_counts_on_from_a_known_count,
    batched_writes_fail_alone_and_keep_the_chain,
    mixed_batches_keep_every_write,
    batched_charge_writes_check_versions_per_row,
    unsettled_charges_are_found,
    pending_refunds_are_found,
    pending_charge_actions_are_found,
    deliveries_are_leased_once,
    concurrent_card_reads_answer_each_key,
);

// ---------------------------------------------------------------- builders

fn audit(event: &str, merchant: Option<&str>, resource: Option<&str>) -> AuditEntry {
    AuditEntry {
        at: 1_700_000_000,
        actor: "key_test".to_string(),
        merchant_id: merchant.map(str::to_string),
        event: event.to_string(),
        resource: resource.map(str::to_string),
        outcome: "success".to_string(),
        origin: Some("127.0.0.1".to_string()),
        request_id: Some("req_1".to_string()),
        detail: None,
    }
}

fn api_key(merchant: &str, id: &str, hash_byte: u8) -> ApiKeyRecord {
    ApiKeyRecord {
        id: id.to_string(),
        merchant_id: merchant.to_string(),
        kind: ApiKeyKind::Secret,
        hash: [hash_byte; 32],
        scopes: vec!["cards:reveal".to_string()],
        created_at: 1_000,
        last_used_at: None,
        revoked_at: None,
    }
}

/// Creates merchant `id` with one secret key whose hash is `[hash_byte; 32]`.
async fn merchant(s: &dyn Storage, id: &str, hash_byte: u8) {
    let m = MerchantRecord {
        id: id.to_string(),
        name: format!("Merchant {id}"),
        created_at: 1_000,
    };
    let key = api_key(id, &format!("key_{id}"), hash_byte);
    s.create_merchant(&m, &[key], &audit("merchant.create", Some(id), Some(id)))
        .await
        .unwrap();
}

fn customer(merchant: &str, id: &str, email: &str) -> CustomerRecord {
    CustomerRecord {
        id: id.to_string(),
        merchant_id: merchant.to_string(),
        email: email.to_string(),
        first_name: None,
        last_name: None,
        phone: None,
        document: None,
        billing_address: None,
        metadata: Metadata::new(),
        default_card_id: None,
        created_at: 1_000,
    }
}

async fn add_customer(s: &dyn Storage, merchant: &str, id: &str) -> CustomerRecord {
    let c = customer(merchant, id, &format!("{id}@example.com"));
    s.insert_customer(&c, &audit("customer.create", Some(merchant), Some(id)))
        .await
        .unwrap();
    c
}

fn card(merchant: &str, customer: &str, id: &str, fingerprint_byte: u8) -> CardRecord {
    CardRecord {
        id: id.to_string(),
        merchant_id: merchant.to_string(),
        customer_id: customer.to_string(),
        pan_ciphertext: vec![0xC1, fingerprint_byte, 0x5E, 0xA1],
        dek_id: "dek_test".to_string(),
        fingerprint: vec![fingerprint_byte; 32],
        bin: "42424242".to_string(),
        last4: "4242".to_string(),
        pan_length: 16,
        brand: "visa".to_string(),
        funding: "credit".to_string(),
        exp_month: 12,
        exp_year: 2030,
        holder_name: Some("Ada Lovelace".to_string()),
        alias: None,
        status: "active".to_string(),
        created_at: 1_000,
    }
}

async fn add_card(s: &dyn Storage, c: &CardRecord) -> CardInsert {
    s.insert_card(c, &audit("card.create", Some(&c.merchant_id), Some(&c.id)))
        .await
        .unwrap()
}

async fn default_card(s: &dyn Storage, merchant: &str, customer: &str) -> Option<String> {
    s.get_customer(merchant, customer)
        .await
        .unwrap()
        .unwrap()
        .default_card_id
}

async fn all_audit(s: &dyn Storage) -> Vec<AuditRow> {
    s.list_audit(0, 10_000).await.unwrap()
}

fn events(rows: &[AuditRow], event: &str) -> Vec<Option<String>> {
    rows.iter()
        .filter(|r| r.entry.event == event)
        .map(|r| r.entry.resource.clone())
        .collect()
}

fn ids<T>(items: &[T], id: impl Fn(&T) -> &str) -> Vec<String> {
    items.iter().map(|i| id(i).to_string()).collect()
}

// ---------------------------------------------------------------- checks

async fn migrations_are_idempotent(s: &dyn Storage) {
    // Already migrated once by the fixture.
    s.migrate().await.unwrap();
    s.migrate().await.unwrap();
    s.health().await.unwrap();
    assert!(matches!(s.backend(), "sqlite" | "postgres"));
    merchant(s, "mer_a", 1).await;
    s.migrate().await.unwrap();
    assert!(s.get_merchant("mer_a").await.unwrap().is_some());
}

async fn merchants_and_api_keys(s: &dyn Storage) {
    let m = MerchantRecord {
        id: "mer_a".to_string(),
        name: "Shop A".to_string(),
        created_at: 1_000,
    };
    let secret = api_key("mer_a", "key_secret", 1);
    let publishable = ApiKeyRecord {
        id: "key_pub".to_string(),
        kind: ApiKeyKind::Publishable,
        scopes: vec![],
        ..api_key("mer_a", "key_pub", 2)
    };
    let revoked = ApiKeyRecord {
        revoked_at: Some(1_500),
        ..api_key("mer_a", "key_revoked", 3)
    };
    s.create_merchant(
        &m,
        &[secret.clone(), publishable.clone(), revoked],
        &audit("merchant.create", Some("mer_a"), Some("mer_a")),
    )
    .await
    .unwrap();

    assert_eq!(s.get_merchant("mer_a").await.unwrap(), Some(m.clone()));
    assert_eq!(s.get_merchant("mer_missing").await.unwrap(), None);
    assert_eq!(
        s.find_api_key(&[1; 32]).await.unwrap(),
        Some(secret.clone())
    );
    assert_eq!(s.find_api_key(&[2; 32]).await.unwrap(), Some(publishable));
    assert_eq!(
        s.find_api_key(&[3; 32]).await.unwrap(),
        None,
        "revoked key found"
    );
    assert_eq!(s.find_api_key(&[9; 32]).await.unwrap(), None);

    s.touch_api_key("key_secret", 2_000).await.unwrap();
    let touched = s.find_api_key(&[1; 32]).await.unwrap().unwrap();
    assert_eq!(touched.last_used_at, Some(2_000));
    // A late, older touch does not move it backwards.
    s.touch_api_key("key_secret", 1_500).await.unwrap();
    let touched = s.find_api_key(&[1; 32]).await.unwrap().unwrap();
    assert_eq!(touched.last_used_at, Some(2_000));
    s.touch_api_key("key_missing", 2_000).await.unwrap();

    // Same merchant id again: conflict, and none of its keys is stored.
    let again = s
        .create_merchant(
            &m,
            &[api_key("mer_a", "key_new", 4)],
            &audit("merchant.create", Some("mer_a"), Some("mer_a")),
        )
        .await;
    assert!(matches!(again, Err(StorageError::Conflict(_))), "{again:?}");
    assert_eq!(s.find_api_key(&[4; 32]).await.unwrap(), None);

    // A key hash clash rolls back the whole merchant.
    let b = MerchantRecord {
        id: "mer_b".to_string(),
        ..m.clone()
    };
    let clash = s
        .create_merchant(
            &b,
            &[api_key("mer_b", "key_b", 1)],
            &audit("merchant.create", Some("mer_b"), Some("mer_b")),
        )
        .await;
    assert!(matches!(clash, Err(StorageError::Conflict(_))), "{clash:?}");
    assert_eq!(s.get_merchant("mer_b").await.unwrap(), None);

    let log = all_audit(s).await;
    assert_eq!(
        events(&log, "merchant.create"),
        vec![Some("mer_a".to_string())],
        "only the committed merchant is audited"
    );
}

async fn customer_crud_and_update_semantics(s: &dyn Storage) {
    merchant(s, "mer_a", 1).await;
    let mut metadata = Metadata::new();
    metadata.insert("plan".to_string(), "gold".to_string());
    let c = CustomerRecord {
        first_name: Some("Ada".to_string()),
        last_name: Some("Lovelace".to_string()),
        phone: Some("+44 20 7946 0000".to_string()),
        document: Some(Document {
            doc_type: "passport".to_string(),
            number: "X123".to_string(),
        }),
        billing_address: Some(Address {
            line1: Some("1 Main St".to_string()),
            city: Some("London".to_string()),
            country: Some("GB".to_string()),
            ..Address::default()
        }),
        metadata,
        ..customer("mer_a", "cus_1", "Ada@Example.com")
    };
    s.insert_customer(&c, &audit("customer.create", Some("mer_a"), Some("cus_1")))
        .await
        .unwrap();
    assert_eq!(
        s.get_customer("mer_a", "cus_1").await.unwrap(),
        Some(c.clone())
    );
    assert_eq!(s.get_customer("mer_a", "cus_missing").await.unwrap(), None);

    let dup = s
        .insert_customer(&c, &audit("customer.create", Some("mer_a"), Some("cus_1")))
        .await;
    assert!(matches!(dup, Err(StorageError::Conflict(_))), "{dup:?}");

    // An empty update changes nothing.
    let same = s
        .update_customer("mer_a", "cus_1", &CustomerUpdate::default())
        .await
        .unwrap();
    assert_eq!(same, c);

    let address = Address {
        line1: Some("2 High St".to_string()),
        postal_code: Some("N1 9GU".to_string()),
        ..Address::default()
    };
    let mut new_metadata = Metadata::new();
    new_metadata.insert("tier".to_string(), "1".to_string());
    let update = CustomerUpdate {
        email: Some("ada@lovelace.example".to_string()),
        first_name: Some(None),
        last_name: None,
        phone: Some(Some("+1 555 0100".to_string())),
        document: Some(None),
        billing_address: Some(Some(address.clone())),
        metadata: Some(new_metadata.clone()),
    };
    let updated = s.update_customer("mer_a", "cus_1", &update).await.unwrap();
    let expected = CustomerRecord {
        email: "ada@lovelace.example".to_string(),
        first_name: None,
        phone: Some("+1 555 0100".to_string()),
        document: None,
        billing_address: Some(address),
        metadata: new_metadata,
        ..c.clone()
    };
    assert_eq!(updated, expected);
    assert_eq!(
        s.get_customer("mer_a", "cus_1").await.unwrap(),
        Some(expected)
    );

    let missing = s.update_customer("mer_a", "cus_missing", &update).await;
    assert!(
        matches!(missing, Err(StorageError::NotFound)),
        "{missing:?}"
    );

    // A customer of a merchant that does not exist cannot be created.
    let orphan = s
        .insert_customer(
            &customer("mer_missing", "cus_orphan", "o@example.com"),
            &audit("customer.create", Some("mer_missing"), Some("cus_orphan")),
        )
        .await;
    assert!(matches!(orphan, Err(StorageError::NotFound)), "{orphan:?}");

    let no_cards = |_: &CardRecord| -> AuditEntry { unreachable!("customer has no cards") };
    s.delete_customer(
        "mer_a",
        "cus_1",
        &audit("customer.delete", Some("mer_a"), Some("cus_1")),
        &no_cards,
    )
    .await
    .unwrap();
    assert_eq!(s.get_customer("mer_a", "cus_1").await.unwrap(), None);
    let again = s
        .delete_customer(
            "mer_a",
            "cus_1",
            &audit("customer.delete", Some("mer_a"), Some("cus_1")),
            &no_cards,
        )
        .await;
    assert!(matches!(again, Err(StorageError::NotFound)), "{again:?}");
    let page = s.list_customers("mer_a", None, 10, None).await.unwrap();
    assert!(page.data.is_empty() && !page.has_more);

    let log = all_audit(s).await;
    assert_eq!(
        events(&log, "customer.create"),
        vec![Some("cus_1".to_string())]
    );
    assert_eq!(
        events(&log, "customer.delete"),
        vec![Some("cus_1".to_string())]
    );
}

fn list_id(i: usize) -> String {
    format!("cus_{i:03}")
}

async fn customer_listing_and_paging(s: &dyn Storage) {
    merchant(s, "mer_a", 1).await;
    merchant(s, "mer_b", 2).await;
    for i in 0..250 {
        let email = if i % 10 == 0 {
            "Shared@Example.com".to_string()
        } else {
            format!("user{i}@example.com")
        };
        // Same created_at for all: order must come from insertion order.
        let c = customer("mer_a", &list_id(i), &email);
        s.insert_customer(&c, &audit("customer.create", Some("mer_a"), Some(&c.id)))
            .await
            .unwrap();
    }
    add_customer(s, "mer_b", "cus_b").await;

    // All of them, 100 at a time, newest first.
    let mut seen = Vec::new();
    let mut shape = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = s
            .list_customers("mer_a", None, 100, after.as_deref())
            .await
            .unwrap();
        shape.push((page.data.len(), page.has_more));
        seen.extend(ids(&page.data, |c| &c.id));
        after = page.data.last().map(|c| c.id.clone());
        if !page.has_more {
            break;
        }
        assert!(shape.len() < 10, "paging does not end");
    }
    assert_eq!(shape, vec![(100, true), (100, true), (50, false)]);
    assert_eq!(seen, (0..250).rev().map(list_id).collect::<Vec<_>>());

    // Exact email, case-insensitive, paged by 10.
    let shared: Vec<String> = (0..250)
        .rev()
        .filter(|i| i % 10 == 0)
        .map(list_id)
        .collect();
    let p1 = s
        .list_customers("mer_a", Some("shared@example.com"), 10, None)
        .await
        .unwrap();
    assert_eq!(ids(&p1.data, |c| &c.id), shared[..10]);
    assert!(p1.has_more);
    let upper = s
        .list_customers("mer_a", Some("SHARED@EXAMPLE.COM"), 10, None)
        .await
        .unwrap();
    assert_eq!(upper, p1);
    let p2 = s
        .list_customers("mer_a", Some("shared@example.com"), 10, Some(&shared[9]))
        .await
        .unwrap();
    assert_eq!(ids(&p2.data, |c| &c.id), shared[10..20]);
    assert!(p2.has_more);
    let p3 = s
        .list_customers("mer_a", Some("shared@example.com"), 10, Some(&shared[19]))
        .await
        .unwrap();
    assert_eq!(ids(&p3.data, |c| &c.id), shared[20..]);
    assert!(!p3.has_more);
    // Exactly `limit` rows left: no more.
    let exact = s
        .list_customers("mer_a", Some("shared@example.com"), 25, None)
        .await
        .unwrap();
    assert_eq!(exact.data.len(), 25);
    assert!(!exact.has_more);
    let one = s
        .list_customers("mer_a", Some("user7@example.com"), 10, None)
        .await
        .unwrap();
    assert_eq!(ids(&one.data, |c| &c.id), vec![list_id(7)]);
    let none = s
        .list_customers("mer_a", Some("nobody@example.com"), 10, None)
        .await
        .unwrap();
    assert!(none.data.is_empty() && !none.has_more);
    // A prefix is not a match.
    let prefix = s
        .list_customers("mer_a", Some("shared@"), 10, None)
        .await
        .unwrap();
    assert!(prefix.data.is_empty());

    // Cursors must be this merchant's customers.
    let unknown = s
        .list_customers("mer_a", None, 10, Some("cus_missing"))
        .await;
    assert!(
        matches!(unknown, Err(StorageError::NotFound)),
        "{unknown:?}"
    );
    let foreign = s.list_customers("mer_a", None, 10, Some("cus_b")).await;
    assert!(
        matches!(foreign, Err(StorageError::NotFound)),
        "{foreign:?}"
    );

    let b = s.list_customers("mer_b", None, 100, None).await.unwrap();
    assert_eq!(ids(&b.data, |c| &c.id), vec!["cus_b".to_string()]);
    assert!(!b.has_more);
}

async fn other_merchants_see_nothing(s: &dyn Storage) {
    merchant(s, "mer_a", 1).await;
    merchant(s, "mer_b", 2).await;
    add_customer(s, "mer_a", "cus_a").await;
    add_customer(s, "mer_b", "cus_b").await;
    add_card(s, &card("mer_a", "cus_a", "card_a", 1)).await;
    let customer_before = s.get_customer("mer_a", "cus_a").await.unwrap().unwrap();
    let card_before = s.get_card("mer_a", "card_a").await.unwrap().unwrap();
    let audit_before = all_audit(s).await.len();

    assert_eq!(s.get_customer("mer_b", "cus_a").await.unwrap(), None);
    assert_eq!(s.get_card("mer_b", "card_a").await.unwrap(), None);
    assert!(s.list_cards("mer_b", "cus_a").await.unwrap().is_empty());

    let update = CustomerUpdate {
        email: Some("stolen@example.com".to_string()),
        ..CustomerUpdate::default()
    };
    let r = s.update_customer("mer_b", "cus_a", &update).await;
    assert!(matches!(r, Err(StorageError::NotFound)), "{r:?}");
    let r = s
        .delete_customer(
            "mer_b",
            "cus_a",
            &audit("customer.delete", Some("mer_b"), Some("cus_a")),
            &|c: &CardRecord| audit("card.delete", Some("mer_b"), Some(&c.id)),
        )
        .await;
    assert!(matches!(r, Err(StorageError::NotFound)), "{r:?}");
    let r = s.list_customers("mer_b", None, 10, Some("cus_a")).await;
    assert!(matches!(r, Err(StorageError::NotFound)), "{r:?}");
    let card_update = CardUpdate {
        alias: Some(Some("mine".to_string())),
        make_default: true,
        ..CardUpdate::default()
    };
    let r = s.update_card("mer_b", "card_a", &card_update).await;
    assert!(matches!(r, Err(StorageError::NotFound)), "{r:?}");
    let r = s
        .delete_card(
            "mer_b",
            "card_a",
            &audit("card.delete", Some("mer_b"), None),
        )
        .await;
    assert!(matches!(r, Err(StorageError::NotFound)), "{r:?}");
    // Attaching a card to another merchant's customer.
    let r = s
        .insert_card(
            &card("mer_b", "cus_a", "card_b", 2),
            &audit("card.create", Some("mer_b"), None),
        )
        .await;
    assert!(matches!(r, Err(StorageError::NotFound)), "{r:?}");
    // So is a card that customer already has: the duplicate is skipped
    // before any customer check, and still answers NotFound, never the
    // other merchant's card.
    let r = s
        .insert_card(
            &card("mer_b", "cus_a", "card_c", 1),
            &audit("card.create", Some("mer_b"), None),
        )
        .await;
    assert!(matches!(r, Err(StorageError::NotFound)), "{r:?}");
    // Same fingerprint under the other merchant's own customer is unrelated.
    assert_eq!(
        add_card(s, &card("mer_b", "cus_b", "card_b1", 1)).await,
        CardInsert::Created { default: true }
    );

    assert_eq!(
        s.get_customer("mer_a", "cus_a").await.unwrap(),
        Some(customer_before)
    );
    assert_eq!(
        s.get_card("mer_a", "card_a").await.unwrap(),
        Some(card_before.clone())
    );
    assert_eq!(
        s.list_cards("mer_a", "cus_a").await.unwrap(),
        vec![card_before]
    );
    assert_eq!(s.get_card("mer_a", "card_b1").await.unwrap(), None);
    assert_eq!(
        all_audit(s).await.len(),
        audit_before + 1,
        "only the legitimate card.create was audited"
    );
}

/// Many card reads at once (on PostgreSQL they share batched queries):
/// each gets exactly what it would get alone, for cards and wallets that
/// exist, are missing, belong to another merchant or are asked for twice.
async fn concurrent_card_reads_answer_each_key(s: &dyn Storage) {
    use futures_util::future::join_all;
    merchant(s, "mer_a", 1).await;
    merchant(s, "mer_b", 2).await;
    for c in 0..4u8 {
        add_customer(s, "mer_a", &format!("cus_a{c}")).await;
        for k in 0..3u8 {
            add_card(
                s,
                &card(
                    "mer_a",
                    &format!("cus_a{c}"),
                    &format!("card_a{c}{k}"),
                    c * 10 + k,
                ),
            )
            .await;
        }
    }
    add_customer(s, "mer_a", "cus_empty").await;
    add_customer(s, "mer_b", "cus_b").await;
    add_card(s, &card("mer_b", "cus_b", "card_b", 99)).await;
    // What each read gives when asked alone.
    let card_keys: Vec<(&str, String)> = (0..4)
        .flat_map(|c| (0..3).map(move |k| ("mer_a", format!("card_a{c}{k}"))))
        .chain([
            ("mer_a", "card_b".to_string()),
            ("mer_b", "card_a00".to_string()),
            ("mer_b", "card_b".to_string()),
            ("mer_a", "card_missing".to_string()),
        ])
        .collect();
    let wallet_keys: Vec<(&str, String)> = (0..4)
        .map(|c| ("mer_a", format!("cus_a{c}")))
        .chain([
            ("mer_a", "cus_empty".to_string()),
            ("mer_a", "cus_b".to_string()),
            ("mer_b", "cus_a0".to_string()),
            ("mer_b", "cus_b".to_string()),
        ])
        .collect();
    let mut alone_views = Vec::new();
    for (m, id) in &card_keys {
        alone_views.push(s.get_card_view(m, id).await.unwrap());
    }
    let mut alone_wallets = Vec::new();
    for (m, id) in &wallet_keys {
        alone_wallets.push(s.list_card_views(m, id).await.unwrap());
    }
    assert_eq!(alone_views.iter().filter(|v| v.is_some()).count(), 13);
    assert_eq!(alone_views[0].as_ref().map(|v| v.1), Some(true));
    assert_eq!(alone_views[1].as_ref().map(|v| v.1), Some(false));
    assert_eq!(
        alone_wallets.iter().map(Vec::len).collect::<Vec<_>>(),
        [3, 3, 3, 3, 0, 0, 0, 1]
    );
    assert_eq!(
        ids(&alone_wallets[2], |v| v.0.id.as_str()),
        ["card_a20", "card_a21", "card_a22"]
    );
    // The same reads, each five times, all at once and interleaved.
    let views = join_all(
        (0..5)
            .flat_map(|_| card_keys.iter())
            .map(|(m, id)| s.get_card_view(m, id)),
    );
    let wallets = join_all(
        (0..5)
            .flat_map(|_| wallet_keys.iter())
            .map(|(m, id)| s.list_card_views(m, id)),
    );
    let cards = join_all(
        (0..5)
            .flat_map(|_| card_keys.iter())
            .map(|(m, id)| s.get_card(m, id)),
    );
    let (views, wallets, cards) = tokio::join!(views, wallets, cards);
    for (i, v) in views.into_iter().enumerate() {
        assert_eq!(v.unwrap(), alone_views[i % card_keys.len()], "view {i}");
    }
    for (i, w) in wallets.into_iter().enumerate() {
        assert_eq!(
            w.unwrap(),
            alone_wallets[i % wallet_keys.len()],
            "wallet {i}"
        );
    }
    for (i, c) in cards.into_iter().enumerate() {
        let alone = alone_views[i % card_keys.len()].clone().map(|v| v.0);
        assert_eq!(c.unwrap(), alone, "card {i}");
    }
}

async fn card_lifecycle_and_default_card(s: &dyn Storage) {
    merchant(s, "mer_a", 1).await;
    add_customer(s, "mer_a", "cus_1").await;
    add_customer(s, "mer_a", "cus_2").await;
    let c1 = card("mer_a", "cus_1", "card_1", 1);
    let c2 = card("mer_a", "cus_1", "card_2", 2);
    let c3 = card("mer_a", "cus_1", "card_3", 3);

    assert_eq!(
        add_card(s, &c1).await,
        CardInsert::Created { default: true }
    );
    assert_eq!(
        default_card(s, "mer_a", "cus_1").await.as_deref(),
        Some("card_1")
    );
    assert_eq!(
        add_card(s, &c2).await,
        CardInsert::Created { default: false }
    );
    assert_eq!(
        s.get_card("mer_a", "card_1").await.unwrap(),
        Some(c1.clone())
    );

    // Same PAN again (same fingerprint, new id): the existing card, no write.
    let dup = card("mer_a", "cus_1", "card_dup", 1);
    assert_eq!(add_card(s, &dup).await, CardInsert::Existing(c1.clone()));
    assert_eq!(s.get_card("mer_a", "card_dup").await.unwrap(), None);
    // ... and a reused card id with a new fingerprint is a conflict.
    let reused = s
        .insert_card(
            &card("mer_a", "cus_1", "card_1", 9),
            &audit("card.create", Some("mer_a"), None),
        )
        .await;
    assert!(
        matches!(reused, Err(StorageError::Conflict(_))),
        "{reused:?}"
    );

    assert_eq!(
        add_card(s, &c3).await,
        CardInsert::Created { default: false }
    );
    assert_eq!(
        s.list_cards("mer_a", "cus_1").await.unwrap(),
        vec![c1.clone(), c2.clone(), c3.clone()],
        "oldest first"
    );
    // The same card on another customer is another card.
    let other = card("mer_a", "cus_2", "card_other", 1);
    assert_eq!(
        add_card(s, &other).await,
        CardInsert::Created { default: true }
    );

    let update = CardUpdate {
        alias: Some(Some("work".to_string())),
        holder_name: Some(None),
        exp_month: Some(1),
        exp_year: Some(2031),
        make_default: false,
    };
    let updated = s.update_card("mer_a", "card_2", &update).await.unwrap();
    let expected = CardRecord {
        alias: Some("work".to_string()),
        holder_name: None,
        exp_month: 1,
        exp_year: 2031,
        ..c2.clone()
    };
    assert_eq!(updated, expected);
    assert_eq!(
        s.get_card("mer_a", "card_2").await.unwrap(),
        Some(expected.clone())
    );
    assert_eq!(
        default_card(s, "mer_a", "cus_1").await.as_deref(),
        Some("card_1")
    );
    let bad = CardUpdate {
        exp_month: Some(13),
        ..CardUpdate::default()
    };
    assert!(s.update_card("mer_a", "card_2", &bad).await.is_err());
    assert_eq!(s.get_card("mer_a", "card_2").await.unwrap(), Some(expected));

    let make_default = CardUpdate {
        make_default: true,
        ..CardUpdate::default()
    };
    s.update_card("mer_a", "card_2", &make_default)
        .await
        .unwrap();
    assert_eq!(
        default_card(s, "mer_a", "cus_1").await.as_deref(),
        Some("card_2")
    );

    // Deleting the default promotes the newest remaining card.
    s.delete_card(
        "mer_a",
        "card_2",
        &audit("card.delete", Some("mer_a"), Some("card_2")),
    )
    .await
    .unwrap();
    assert_eq!(s.get_card("mer_a", "card_2").await.unwrap(), None);
    assert_eq!(
        default_card(s, "mer_a", "cus_1").await.as_deref(),
        Some("card_3")
    );
    // Deleting another card leaves the default alone.
    s.delete_card(
        "mer_a",
        "card_1",
        &audit("card.delete", Some("mer_a"), Some("card_1")),
    )
    .await
    .unwrap();
    assert_eq!(
        default_card(s, "mer_a", "cus_1").await.as_deref(),
        Some("card_3")
    );
    s.delete_card(
        "mer_a",
        "card_3",
        &audit("card.delete", Some("mer_a"), Some("card_3")),
    )
    .await
    .unwrap();
    assert_eq!(default_card(s, "mer_a", "cus_1").await, None);
    let again = s
        .delete_card(
            "mer_a",
            "card_3",
            &audit("card.delete", Some("mer_a"), Some("card_3")),
        )
        .await;
    assert!(matches!(again, Err(StorageError::NotFound)), "{again:?}");
    let r = s.update_card("mer_a", "card_3", &make_default).await;
    assert!(matches!(r, Err(StorageError::NotFound)), "{r:?}");
    // After all cards are gone the next one is the default again.
    assert_eq!(
        add_card(s, &c1).await,
        CardInsert::Created { default: true }
    );
    assert_eq!(
        default_card(s, "mer_a", "cus_2").await.as_deref(),
        Some("card_other")
    );

    let missing = s
        .insert_card(
            &card("mer_a", "cus_missing", "card_x", 5),
            &audit("card.create", Some("mer_a"), None),
        )
        .await;
    assert!(
        matches!(missing, Err(StorageError::NotFound)),
        "{missing:?}"
    );

    // The schema refuses what no card may hold.
    let invalid = [
        CardRecord {
            exp_month: 13,
            ..card("mer_a", "cus_2", "card_bad1", 6)
        },
        CardRecord {
            bin: "4242424242424242".to_string(),
            ..card("mer_a", "cus_2", "card_bad2", 7)
        },
        CardRecord {
            last4: "42424".to_string(),
            ..card("mer_a", "cus_2", "card_bad3", 8)
        },
        CardRecord {
            last4: "42a4".to_string(),
            ..card("mer_a", "cus_2", "card_bad4", 10)
        },
    ];
    for bad in &invalid {
        let r = s
            .insert_card(bad, &audit("card.create", Some("mer_a"), Some(&bad.id)))
            .await;
        assert!(r.is_err(), "{} accepted", bad.id);
        assert_eq!(s.get_card("mer_a", &bad.id).await.unwrap(), None);
    }

    let log = all_audit(s).await;
    assert_eq!(
        events(&log, "card.create"),
        ["card_1", "card_2", "card_3", "card_other", "card_1"]
            .map(|id| Some(id.to_string()))
            .to_vec(),
        "duplicates and failures are not audited"
    );
    assert_eq!(
        events(&log, "card.delete"),
        ["card_2", "card_1", "card_3"]
            .map(|id| Some(id.to_string()))
            .to_vec()
    );
}

async fn concurrent_duplicate_cards_dedupe(s: &dyn Storage) {
    merchant(s, "mer_a", 1).await;
    for round in 0..5u8 {
        let customer_id = format!("cus_{round}");
        add_customer(s, "mer_a", &customer_id).await;
        let a = card(
            "mer_a",
            &customer_id,
            &format!("card_{round}_a"),
            40 + round,
        );
        let b = card(
            "mer_a",
            &customer_id,
            &format!("card_{round}_b"),
            40 + round,
        );
        let (ra, rb) = tokio::join!(add_card(s, &a), add_card(s, &b));
        let cards = s.list_cards("mer_a", &customer_id).await.unwrap();
        assert_eq!(cards.len(), 1, "round {round}: {cards:?}");
        let winner = cards[0].clone();
        let created = CardInsert::Created { default: true };
        let existing = CardInsert::Existing(winner.clone());
        assert!(
            (ra == created && rb == existing) || (ra == existing && rb == created),
            "round {round}: {ra:?} / {rb:?}"
        );
        assert_eq!(
            default_card(s, "mer_a", &customer_id).await,
            Some(winner.id.clone())
        );
    }
}

/// Many concurrent writes share group commits: the ones that fail (unknown
/// customer, reused card id) leave no row and no audit entry behind, every
/// other one is stored with its audit entry, and the chain stays linear.
async fn batched_writes_fail_alone_and_keep_the_chain(s: &dyn Storage) {
    merchant(s, "mer_a", 1).await;
    add_customer(s, "mer_a", "cus_1").await;
    add_card(s, &card("mer_a", "cus_1", "card_taken", 250)).await;
    let before = all_audit(s).await.len();
    let writes = (0..240u8).map(|i| async move {
        let c = match i % 3 {
            0 => card("mer_a", "cus_1", &format!("card_ok_{i}"), i),
            1 => card("mer_a", "cus_missing", &format!("card_nf_{i}"), i),
            _ => card("mer_a", "cus_1", "card_taken", i),
        };
        let r = s
            .insert_card(&c, &audit("card.create", Some("mer_a"), Some(&c.id)))
            .await;
        let appended = s
            .append_audit(&audit("card.reveal", Some("mer_a"), Some(&c.id)))
            .await;
        (i, r, appended)
    });
    for (i, r, appended) in futures_util::future::join_all(writes).await {
        appended.unwrap();
        match i % 3 {
            0 => assert_eq!(r.unwrap(), CardInsert::Created { default: false }),
            1 => assert!(matches!(r, Err(StorageError::NotFound)), "{i}: {r:?}"),
            _ => assert!(matches!(r, Err(StorageError::Conflict(_))), "{i}: {r:?}"),
        }
    }
    let cards = s.list_cards("mer_a", "cus_1").await.unwrap();
    assert_eq!(cards.len(), 81);
    let rows = all_audit(s).await;
    let created: Vec<_> = rows[before..]
        .iter()
        .filter(|r| r.entry.event == "card.create")
        .collect();
    assert_eq!(created.len(), 80, "only stored cards are audited");
    assert!(created
        .iter()
        .all(|r| r.entry.resource.as_deref().unwrap().starts_with("card_ok_")));
    assert_eq!(rows.len() - before, 80 + 240);
    // Every row links to the one before it.
    let chain = s.chain_rows(0, 10_000).await.unwrap();
    assert_eq!(chain.len(), rows.len());
    for pair in chain.windows(2) {
        assert_eq!(
            pair[1].prev_hash, pair[0].hash,
            "chain broken at {}",
            pair[1].seq
        );
        let expected = super::chain::entry_hash(
            pair[1].prev_hash.as_deref().unwrap(),
            &pair[1].entry,
            pair[1].mac_key_id.as_deref().unwrap(),
        );
        assert_eq!(pair[1].hash.as_deref(), Some(&expected[..]));
    }
}

/// Writes with statements of their own (idempotency claims) arriving among
/// deferred ones (cards, audit appends): on SQLite a batch of deferred
/// writes ends where a claim arrives, and the claim starts the next one.
/// Every write is stored once, in its own batch's commit, and the chain
/// stays linear.
async fn mixed_batches_keep_every_write(s: &dyn Storage) {
    merchant(s, "mer_a", 1).await;
    add_customer(s, "mer_a", "cus_1").await;
    let before = all_audit(s).await.len();
    let writes = (0..180u8).map(|i| async move {
        match i % 3 {
            1 => {
                let claim = s
                    .claim_idempotency_key("mer_a", &format!("key_{i}"), &[i; 32], 100)
                    .await
                    .unwrap();
                assert_eq!(claim, IdempotencyClaim::Claimed, "{i}");
            }
            0 => {
                let c = card("mer_a", "cus_1", &format!("card_{i}"), i);
                let audit = audit("card.create", Some("mer_a"), Some(&c.id));
                assert!(matches!(
                    s.insert_card(&c, &audit).await.unwrap(),
                    CardInsert::Created { .. }
                ));
            }
            _ => s
                .append_audit(&audit("card.reveal", Some("mer_a"), None))
                .await
                .unwrap(),
        }
    });
    futures_util::future::join_all(writes).await;
    for i in (1..180u8).step_by(3) {
        let again = s
            .claim_idempotency_key("mer_a", &format!("key_{i}"), &[i; 32], 101)
            .await
            .unwrap();
        assert_eq!(
            again,
            IdempotencyClaim::InFlight {
                request_hash: [i; 32],
                created_at: 100,
            }
        );
    }
    assert_eq!(s.list_cards("mer_a", "cus_1").await.unwrap().len(), 60);
    assert_eq!(all_audit(s).await.len() - before, 120);
    let chain = s.chain_rows(0, 10_000).await.unwrap();
    for pair in chain.windows(2) {
        assert_eq!(
            pair[1].prev_hash, pair[0].hash,
            "chain broken at {}",
            pair[1].seq
        );
    }
}

fn charge(merchant: &str, id: &str) -> ChargeRecord {
    ChargeRecord {
        id: id.to_string(),
        merchant_id: merchant.to_string(),
        customer_id: "cus_1".to_string(),
        card_id: "card_1".to_string(),
        amount: 1999,
        currency: "USD".to_string(),
        status: "processing".to_string(),
        captured: false,
        amount_captured: 0,
        amount_refunded: 0,
        capture_requested: true,
        failure_code: None,
        failure_message: None,
        next_action: None,
        description: Some("a charge".to_string()),
        metadata: Metadata::new(),
        line_items: Vec::new(),
        processor: "sandbox".to_string(),
        processor_ref: None,
        version: 0,
        created_at: 1_700_000_000,
        updated_at: 1_700_000_000,
        pending_action: None,
        pending_amount: None,
    }
}

fn charge_event(c: &ChargeRecord, event_type: &str) -> EventRecord {
    EventRecord {
        id: format!("evt_{}_{}", c.id, c.version),
        merchant_id: c.merchant_id.clone(),
        event_type: event_type.to_string(),
        data: format!("{{\"id\":\"{}\"}}", c.id),
        created_at: c.updated_at,
    }
}

/// Concurrent charge inserts and updates share batches (one multi-row
/// statement each): of many updates racing from one version exactly one
/// wins, an update of a charge whose version moved fails alone, a reused
/// charge id fails alone, and only stored writes leave events and audit
/// entries.
/// Reconciliation's query: `processing`, or `pending` after a lost answer,
/// of every merchant, unchanged since the cut; oldest change first.
async fn unsettled_charges_are_found(s: &dyn Storage) {
    merchant(s, "mer_a", 1).await;
    merchant(s, "mer_b", 2).await;
    let at = |merchant: &str, id: &str, status: &str, updated_at: i64| {
        let mut c = charge(merchant, id);
        c.status = status.to_string();
        c.updated_at = updated_at;
        c
    };
    let mut lost = at("mer_a", "ch_lost", "pending", 200);
    lost.failure_code = Some("processor_unavailable".to_string());
    let mut awaiting_cvc = at("mer_a", "ch_cvc", "pending", 150);
    awaiting_cvc.next_action = Some("provide_cvc".to_string());
    let mut elsewhere = at("mer_a", "ch_http", "processing", 120);
    elsewhere.processor = "http".to_string();
    for c in [
        at("mer_a", "ch_stuck", "processing", 100),
        lost.clone(),
        awaiting_cvc,
        elsewhere,
        at("mer_a", "ch_done", "succeeded", 50),
        at("mer_a", "ch_recent", "processing", 1_000),
        at("mer_b", "ch_other", "processing", 300),
        // Same time as ch_other: the id breaks the tie.
        at("mer_a", "ch_other2", "processing", 300),
    ] {
        s.insert_charge(
            &c,
            &[],
            &audit("charge.create", Some(&c.merchant_id), Some(&c.id)),
        )
        .await
        .unwrap();
    }
    let page = |after: (i64, &'static str), limit: u32| async move {
        s.unsettled_charges(Unsettled::Authorization, "sandbox", 500, after, limit)
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.id)
            .collect::<Vec<_>>()
    };
    let start = (i64::MIN, "");
    assert_eq!(
        page(start, 10).await,
        ["ch_stuck", "ch_lost", "ch_other", "ch_other2"]
    );
    // Paging by (updated_at, id).
    assert_eq!(page(start, 2).await, ["ch_stuck", "ch_lost"]);
    assert_eq!(page((200, "ch_lost"), 1).await, ["ch_other"]);
    assert_eq!(page((300, "ch_other"), 10).await, ["ch_other2"]);
    assert_eq!(page((300, "ch_other2"), 10).await, Vec::<String>::new());
    assert_eq!(
        s.unsettled_charges(Unsettled::Authorization, "http", 500, start, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.id)
            .collect::<Vec<_>>(),
        ["ch_http"]
    );
    assert!(s
        .unsettled_charges(Unsettled::Authorization, "sandbox", 100, start, 10)
        .await
        .unwrap()
        .is_empty());
    // Settled, it is no longer found.
    let mut settled = lost.clone();
    settled.status = "succeeded".to_string();
    settled.failure_code = None;
    settled.version += 1;
    s.update_charge(
        &settled,
        lost.version,
        None,
        &[],
        &audit("charge.reconcile", Some("mer_a"), Some("ch_lost")),
    )
    .await
    .unwrap();
    assert_eq!(page(start, 10).await, ["ch_stuck", "ch_other", "ch_other2"]);
}

/// Reconciliation's query for pending captures and voids: charges of
/// every merchant with a pending action, unchanged since the cut, oldest
/// change first; the action and its amount are stored and read back, and
/// a charge whose action is settled is no longer found.
async fn pending_charge_actions_are_found(s: &dyn Storage) {
    merchant(s, "mer_a", 1).await;
    merchant(s, "mer_b", 2).await;
    let with = |merchant: &str, id: &str, action: Option<&str>, updated_at: i64| {
        let mut c = charge(merchant, id);
        c.status = "succeeded".to_string();
        c.updated_at = updated_at;
        c.pending_action = action.map(str::to_string);
        c.pending_amount = (action == Some("capture")).then_some(1500);
        c
    };
    let mut elsewhere = with("mer_a", "ch_http", Some("cancel"), 120);
    elsewhere.processor = "http".to_string();
    let capture = with("mer_a", "ch_capture", Some("capture"), 100);
    for c in [
        capture.clone(),
        with("mer_b", "ch_cancel", Some("cancel"), 200),
        with("mer_a", "ch_plain", None, 150),
        with("mer_a", "ch_recent", Some("capture"), 1_000),
        // An unknown authorization is the other query's.
        ChargeRecord {
            updated_at: 130,
            ..charge("mer_a", "ch_processing")
        },
        elsewhere,
    ] {
        s.insert_charge(
            &c,
            &[],
            &audit("charge.create", Some(&c.merchant_id), Some(&c.id)),
        )
        .await
        .unwrap();
    }
    let page = |processor: &'static str, after: (i64, &'static str), limit: u32| async move {
        s.unsettled_charges(Unsettled::Action, processor, 500, after, limit)
            .await
            .unwrap()
    };
    let start = (i64::MIN, "");
    let found = page("sandbox", start, 10).await;
    let ids: Vec<_> = found.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["ch_capture", "ch_cancel"]);
    assert_eq!(
        found[0], capture,
        "the pending capture reads back as stored"
    );
    assert_eq!(found[1].pending_action.as_deref(), Some("cancel"));
    assert_eq!(found[1].pending_amount, None);
    let ids = |v: Vec<ChargeRecord>| v.into_iter().map(|c| c.id).collect::<Vec<_>>();
    assert_eq!(ids(page("sandbox", start, 1).await), ["ch_capture"]);
    assert_eq!(
        ids(page("sandbox", (100, "ch_capture"), 10).await),
        ["ch_cancel"]
    );
    assert_eq!(ids(page("http", start, 10).await), ["ch_http"]);
    // The update that stores the outcome clears the action.
    let mut done = capture.clone();
    done.captured = true;
    done.amount_captured = 1500;
    done.pending_action = None;
    done.pending_amount = None;
    done.version += 1;
    s.update_charge(
        &done,
        capture.version,
        None,
        &[],
        &audit("charge.capture", Some("mer_a"), Some("ch_capture")),
    )
    .await
    .unwrap();
    assert_eq!(ids(page("sandbox", start, 10).await), ["ch_cancel"]);
    assert_eq!(
        s.get_charge("mer_a", "ch_capture").await.unwrap().unwrap(),
        done
    );
}

/// Refund reconciliation's query: `pending` refunds of every merchant
/// created before the cut, of charges sent through the given processor,
/// oldest first; a refund's outcome is stored over its `pending` row and
/// never over a settled one.
async fn pending_refunds_are_found(s: &dyn Storage) {
    merchant(s, "mer_a", 1).await;
    merchant(s, "mer_b", 2).await;
    let mut charges = Vec::new();
    for (m, id, processor) in [
        ("mer_a", "ch_a", "sandbox"),
        ("mer_b", "ch_b", "sandbox"),
        ("mer_a", "ch_http", "http"),
    ] {
        let mut c = charge(m, id);
        c.status = "succeeded".to_string();
        c.captured = true;
        c.amount_captured = c.amount;
        c.processor = processor.to_string();
        s.insert_charge(&c, &[], &audit("charge.create", Some(m), Some(id)))
            .await
            .unwrap();
        charges.push(c);
    }
    // Stores `refund` with a new version of charge `i`.
    let mut store = async |i: usize, refund: &RefundRecord| {
        let c: &mut ChargeRecord = &mut charges[i];
        let expected = c.version;
        c.version += 1;
        if refund.status == "succeeded" {
            c.amount_refunded += refund.amount;
        }
        s.update_charge(
            c,
            expected,
            Some(refund),
            &[],
            &audit("charge.refund", Some(&c.merchant_id), Some(&c.id)),
        )
        .await
    };
    let refund = |i: usize, id: &str, status: &str, created_at: i64| RefundRecord {
        id: id.to_string(),
        merchant_id: ["mer_a", "mer_b", "mer_a"][i].to_string(),
        charge_id: ["ch_a", "ch_b", "ch_http"][i].to_string(),
        amount: 10,
        status: status.to_string(),
        created_at,
    };
    for r in [
        (0, "re_old", "pending", 100),
        (0, "re_done", "succeeded", 50),
        (1, "re_other", "pending", 300),
        (0, "re_tie", "pending", 300),
        (0, "re_recent", "pending", 1_000),
        (2, "re_http", "pending", 120),
        (1, "re_refused", "failed", 90),
    ] {
        store(r.0, &refund(r.0, r.1, r.2, r.3)).await.unwrap();
    }
    let page = |processor: &'static str, after: (i64, &'static str), limit: u32| async move {
        s.pending_refunds(processor, 500, after, limit)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect::<Vec<_>>()
    };
    let start = (i64::MIN, "");
    assert_eq!(
        page("sandbox", start, 10).await,
        ["re_old", "re_other", "re_tie"]
    );
    assert_eq!(page("sandbox", start, 1).await, ["re_old"]);
    assert_eq!(page("sandbox", (100, "re_old"), 1).await, ["re_other"]);
    assert_eq!(page("sandbox", (300, "re_other"), 5).await, ["re_tie"]);
    assert_eq!(page("http", start, 10).await, ["re_http"]);

    // Its outcome replaces the pending row; a settled refund keeps its own.
    store(0, &refund(0, "re_old", "succeeded", 100))
        .await
        .unwrap();
    store(0, &refund(0, "re_done", "failed", 50)).await.unwrap();
    assert_eq!(page("sandbox", start, 10).await, ["re_other", "re_tie"]);
    let listed = s.list_refunds("mer_a", "ch_a").await.unwrap();
    let status = |id: &str| {
        listed
            .iter()
            .find(|r| r.id == id)
            .map(|r| r.status.clone())
            .unwrap()
    };
    assert_eq!(listed.len(), 4);
    assert_eq!(status("re_old"), "succeeded");
    assert_eq!(status("re_done"), "succeeded");
}

/// Delivery leasing: of two workers asking at once, each due delivery goes
/// to exactly one; a leased delivery is due again only once its lease ends.
/// `n` charges of `mer_a` (which must exist), each with a
/// `charge.succeeded` event for the endpoint `we_1`, created here: `n`
/// deliveries, due from 1_700_000_000 s.
async fn charges_with_deliveries(s: &dyn Storage, n: usize) {
    let endpoint = WebhookEndpointRecord {
        id: "we_1".to_string(),
        merchant_id: "mer_a".to_string(),
        url: "https://example.com/hook".to_string(),
        events: vec!["*".to_string()],
        secret_sealed: vec![1, 2, 3],
        created_at: 1,
    };
    s.insert_webhook_endpoint(
        &endpoint,
        &audit("webhook_endpoint.create", Some("mer_a"), Some("we_1")),
    )
    .await
    .unwrap();
    for i in 0..n {
        let c = charge("mer_a", &format!("ch_{i}"));
        s.insert_charge(
            &c,
            &[charge_event(&c, "charge.succeeded")],
            &audit("charge.create", Some("mer_a"), Some(&c.id)),
        )
        .await
        .unwrap();
    }
}

async fn deliveries_are_leased_once(s: &dyn Storage) {
    merchant(s, "mer_a", 1).await;
    charges_with_deliveries(s, 12).await;
    // The events were created at 1_700_000_000 s: due from then, in ms.
    let now = 1_700_000_000_000 + 1;
    let lease = now + 60_000;
    let (a, b) = tokio::join!(
        s.due_deliveries(now, lease, 50),
        s.due_deliveries(now, lease, 50)
    );
    let mut seqs: Vec<i64> = a
        .unwrap()
        .iter()
        .chain(b.unwrap().iter())
        .map(|d| d.seq)
        .collect();
    let leased = seqs.len();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!((leased, seqs.len()), (12, 12));
    assert!(s
        .due_deliveries(now + 1, lease, 50)
        .await
        .unwrap()
        .is_empty());
    let again = s.due_deliveries(lease, lease + 60_000, 50).await.unwrap();
    assert_eq!(again.len(), 12);
    assert_eq!(again[0].endpoint.id, "we_1");
}

async fn batched_charge_writes_check_versions_per_row(s: &dyn Storage) {
    merchant(s, "mer_a", 1).await;
    let before = all_audit(s).await.len();
    let inserts = (0..60u32).map(|i| async move {
        // Every tenth insert reuses the id of the one before it, and
        // another names a merchant that does not exist: the multi-row
        // statement fails as a whole on it, and only that write fails.
        let id = if i % 10 == 9 { i - 1 } else { i };
        let m = if i % 10 == 5 { "mer_none" } else { "mer_a" };
        let c = charge(m, &format!("ch_{id}"));
        let r = s
            .insert_charge(
                &c,
                &[charge_event(&c, "charge.created")],
                &audit("charge.create", Some("mer_a"), Some(&c.id)),
            )
            .await;
        (i, r)
    });
    for (i, r) in futures_util::future::join_all(inserts).await {
        if i % 10 == 9 {
            assert!(matches!(r, Err(StorageError::Conflict(_))), "{i}: {r:?}");
        } else if i % 10 == 5 {
            assert!(matches!(r, Err(StorageError::NotFound)), "{i}: {r:?}");
        } else {
            r.unwrap();
        }
    }
    // Eight racing updates of each charge from version 0: one wins.
    let updates = (0..54u32)
        .filter(|i| i % 10 != 9)
        .flat_map(|i| (0..8u32).map(move |n| (i, n)))
        .map(|(i, n)| async move {
            let mut c = charge("mer_a", &format!("ch_{i}"));
            c.status = "succeeded".to_string();
            c.captured = true;
            c.amount_captured = c.amount;
            c.processor_ref = Some(format!("ref_{n}"));
            c.version = 1;
            c.updated_at += 1;
            let r = s
                .update_charge(
                    &c,
                    0,
                    None,
                    &[charge_event(&c, "charge.succeeded")],
                    &audit("charge.authorize", Some("mer_a"), Some(&c.id)),
                )
                .await;
            (i, r)
        });
    let mut wins = std::collections::BTreeMap::<u32, u32>::new();
    for (i, r) in futures_util::future::join_all(updates).await {
        match r {
            Ok(()) => *wins.entry(i).or_default() += 1,
            // Lost the race, or (the merchant-less ones) never stored.
            Err(StorageError::Conflict(_)) => {}
            Err(e) => panic!("ch_{i}: {e:?}"),
        }
    }
    assert_eq!(wins.len(), 44);
    assert!(wins.keys().all(|i| i % 10 != 5));
    assert!(wins.values().all(|&n| n == 1), "{wins:?}");
    // An update from a stale version fails; from the current one it works,
    // also when both are in flight together.
    let mut stale = charge("mer_a", "ch_0");
    stale.version = 1;
    stale.status = "canceled".to_string();
    let mut next = stale.clone();
    next.version = 2;
    next.amount_refunded = 0;
    next.status = "succeeded".to_string();
    next.captured = true;
    next.amount_captured = next.amount;
    let a = audit("charge.update", Some("mer_a"), Some("ch_0"));
    let (stale_r, next_r) = tokio::join!(
        s.update_charge(&stale, 0, None, &[], &a),
        s.update_charge(&next, 1, None, &[], &a)
    );
    assert!(
        matches!(stale_r, Err(StorageError::Conflict(_))),
        "{stale_r:?}"
    );
    next_r.unwrap();
    let stored = s.get_charge("mer_a", "ch_0").await.unwrap().unwrap();
    assert_eq!((stored.version, stored.status.as_str()), (2, "succeeded"));
    assert_eq!(stored.description.as_deref(), Some("a charge"));

    let rows = all_audit(s).await;
    let count = |event: &str| {
        rows[before..]
            .iter()
            .filter(|r| r.entry.event == event)
            .count()
    };
    assert_eq!(
        count("charge.create"),
        48,
        "only stored charges are audited"
    );
    assert_eq!(count("charge.authorize"), 44);
    assert_eq!(count("charge.update"), 1);
    let events = s
        .list_events("mer_a", Some("charge.succeeded"), 100, None)
        .await
        .unwrap();
    assert_eq!(events.data.len(), 44);
    let created = s
        .list_events("mer_a", Some("charge.created"), 100, None)
        .await
        .unwrap();
    assert_eq!(created.data.len(), 48);
}

async fn delete_customer_removes_cards_and_audits(s: &dyn Storage) {
    merchant(s, "mer_a", 1).await;
    add_customer(s, "mer_a", "cus_gone").await;
    add_customer(s, "mer_a", "cus_kept").await;
    add_card(s, &card("mer_a", "cus_gone", "card_g1", 1)).await;
    add_card(s, &card("mer_a", "cus_gone", "card_g2", 2)).await;
    let kept = card("mer_a", "cus_kept", "card_k1", 1);
    add_card(s, &kept).await;
    let before = all_audit(s).await;
    let last_seq = before.last().unwrap().seq;

    let card_audit = |c: &CardRecord| AuditEntry {
        detail: Some(format!("last4={}", c.last4)),
        ..audit("card.delete", Some(&c.merchant_id), Some(&c.id))
    };
    s.delete_customer(
        "mer_a",
        "cus_gone",
        &audit("customer.delete", Some("mer_a"), Some("cus_gone")),
        &card_audit,
    )
    .await
    .unwrap();

    assert_eq!(s.get_customer("mer_a", "cus_gone").await.unwrap(), None);
    assert_eq!(s.get_card("mer_a", "card_g1").await.unwrap(), None);
    assert_eq!(s.get_card("mer_a", "card_g2").await.unwrap(), None);
    assert!(s.list_cards("mer_a", "cus_gone").await.unwrap().is_empty());
    assert_eq!(s.list_cards("mer_a", "cus_kept").await.unwrap(), vec![kept]);
    assert_eq!(
        default_card(s, "mer_a", "cus_kept").await.as_deref(),
        Some("card_k1")
    );

    let new: Vec<(String, Option<String>, Option<String>)> = s
        .list_audit(last_seq, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.entry.event, r.entry.resource, r.entry.detail))
        .collect();
    let entry = |event: &str, resource: &str, detail: Option<&str>| {
        (
            event.to_string(),
            Some(resource.to_string()),
            detail.map(str::to_string),
        )
    };
    assert_eq!(
        new,
        vec![
            entry("customer.delete", "cus_gone", None),
            entry("card.delete", "card_g1", Some("last4=4242")),
            entry("card.delete", "card_g2", Some("last4=4242")),
        ]
    );
}

async fn idempotency_keys(s: &dyn Storage) {
    let (h1, h2) = ([1u8; 32], [2u8; 32]);
    assert_eq!(
        s.claim_idempotency_key("mer_a", "k1", &h1, 100)
            .await
            .unwrap(),
        IdempotencyClaim::Claimed
    );
    assert_eq!(
        s.claim_idempotency_key("mer_a", "k1", &h2, 101)
            .await
            .unwrap(),
        IdempotencyClaim::InFlight {
            request_hash: h1,
            created_at: 100,
        }
    );
    s.complete_idempotency_key("mer_a", "k1", 201, b"{\"id\":\"cus_1\"}")
        .await
        .unwrap();
    let completed = IdempotencyClaim::Completed {
        request_hash: h1,
        status: 201,
        body: b"{\"id\":\"cus_1\"}".to_vec(),
    };
    assert_eq!(
        s.claim_idempotency_key("mer_a", "k1", &h1, 102)
            .await
            .unwrap(),
        completed
    );
    // A completed response cannot be released.
    s.release_idempotency_key("mer_a", "k1").await.unwrap();
    assert_eq!(
        s.claim_idempotency_key("mer_a", "k1", &h2, 103)
            .await
            .unwrap(),
        completed
    );
    // Keys are per merchant.
    assert_eq!(
        s.claim_idempotency_key("mer_b", "k1", &h2, 104)
            .await
            .unwrap(),
        IdempotencyClaim::Claimed
    );
    // A released claim can be claimed again.
    assert_eq!(
        s.claim_idempotency_key("mer_a", "k2", &h1, 105)
            .await
            .unwrap(),
        IdempotencyClaim::Claimed
    );
    s.release_idempotency_key("mer_a", "k2").await.unwrap();
    assert_eq!(
        s.claim_idempotency_key("mer_a", "k2", &h2, 106)
            .await
            .unwrap(),
        IdempotencyClaim::Claimed
    );
    assert_eq!(
        s.claim_idempotency_key("mer_a", "k2", &h1, 107)
            .await
            .unwrap(),
        IdempotencyClaim::InFlight {
            request_hash: h2,
            created_at: 106,
        }
    );
    s.complete_idempotency_key("mer_a", "k2", 402, b"")
        .await
        .unwrap();
    assert_eq!(
        s.claim_idempotency_key("mer_a", "k2", &h2, 108)
            .await
            .unwrap(),
        IdempotencyClaim::Completed {
            request_hash: h2,
            status: 402,
            body: vec![],
        }
    );
    let r = s
        .complete_idempotency_key("mer_a", "k_missing", 200, b"{}")
        .await;
    assert!(matches!(r, Err(StorageError::NotFound)), "{r:?}");

    // Racing claims: exactly one wins.
    let (ra, rb) = tokio::join!(
        s.claim_idempotency_key("mer_a", "k3", &h1, 109),
        s.claim_idempotency_key("mer_a", "k3", &h1, 109)
    );
    let claimed = [ra.unwrap(), rb.unwrap()]
        .iter()
        .filter(|c| **c == IdempotencyClaim::Claimed)
        .count();
    assert_eq!(claimed, 1);

    // The retention sweep: records older than the cut go, completed or
    // not, in chunks of at most `limit`; younger ones stay.
    // Now: mer_a/k1 completed at 100, mer_b/k1 pending at 104, mer_a/k2
    // completed at 106, mer_a/k3 pending at 109.
    assert_eq!(s.sweep_idempotency_keys(105, 1).await.unwrap(), 1);
    assert_eq!(s.sweep_idempotency_keys(105, 10).await.unwrap(), 1);
    assert_eq!(s.sweep_idempotency_keys(105, 10).await.unwrap(), 0);
    for merchant in ["mer_a", "mer_b"] {
        assert_eq!(
            s.claim_idempotency_key(merchant, "k1", &h2, 110)
                .await
                .unwrap(),
            IdempotencyClaim::Claimed,
            "{merchant}/k1 was swept"
        );
    }
    assert!(matches!(
        s.claim_idempotency_key("mer_a", "k2", &h2, 110)
            .await
            .unwrap(),
        IdempotencyClaim::Completed { status: 402, .. }
    ));
    assert_eq!(s.sweep_idempotency_keys(1_000, 100).await.unwrap(), 4);
    assert_eq!(
        s.claim_idempotency_key("mer_a", "k3", &h2, 1_001)
            .await
            .unwrap(),
        IdempotencyClaim::Claimed
    );
}

fn data_key(id: &str, merchant: Option<&str>, purpose: &str, version: i64) -> DataKeyRecord {
    DataKeyRecord {
        id: id.to_string(),
        merchant_id: merchant.map(str::to_string),
        purpose: purpose.to_string(),
        version,
        mode: "envelope".to_string(),
        wrapped: Some(vec![7; 60]),
        wrapping_label: "cardvault-mk-mer_a-v1".to_string(),
        seals_reserved: 0,
        created_at: 1_000,
        retired_at: None,
    }
}

async fn data_keys_and_seal_reservations(s: &dyn Storage) {
    merchant(s, "mer_a", 1).await;
    let k1 = data_key("dek_1", Some("mer_a"), "pan", 1);
    s.insert_data_key(&k1, None).await.unwrap();
    assert_eq!(s.get_data_key("dek_1").await.unwrap(), Some(k1.clone()));
    assert_eq!(s.get_data_key("dek_missing").await.unwrap(), None);
    assert_eq!(
        s.current_data_key(Some("mer_a"), "pan").await.unwrap(),
        Some(k1.clone())
    );

    assert_eq!(s.reserve_seals("dek_1", 1_000).await.unwrap(), 1_000);
    assert_eq!(s.reserve_seals("dek_1", 500).await.unwrap(), 1_500);
    assert_eq!(
        s.get_data_key("dek_1")
            .await
            .unwrap()
            .unwrap()
            .seals_reserved,
        1_500
    );
    let r = s.reserve_seals("dek_missing", 10).await;
    assert!(matches!(r, Err(StorageError::NotFound)), "{r:?}");
    assert!(s.reserve_seals("dek_1", -10).await.is_err());

    // Concurrent reservations never hand out the same block.
    let results =
        futures_util::future::join_all((0..10).map(|_| s.reserve_seals("dek_1", 100))).await;
    let totals: BTreeSet<i64> = results.into_iter().map(Result::unwrap).collect();
    assert_eq!(totals, (1..=10).map(|i| 1_500 + 100 * i).collect());
    assert_eq!(
        s.get_data_key("dek_1")
            .await
            .unwrap()
            .unwrap()
            .seals_reserved,
        2_500
    );

    // Newest non-retired version wins.
    let k2 = data_key("dek_2", Some("mer_a"), "pan", 2);
    let k3 = DataKeyRecord {
        retired_at: Some(2_000),
        ..data_key("dek_3", Some("mer_a"), "pan", 3)
    };
    s.insert_data_key(&k2, None).await.unwrap();
    s.insert_data_key(&k3, None).await.unwrap();
    assert_eq!(
        s.current_data_key(Some("mer_a"), "pan").await.unwrap(),
        Some(k2.clone())
    );
    assert_eq!(
        s.current_data_key(Some("mer_a"), "volatile").await.unwrap(),
        None
    );
    assert_eq!(
        s.current_data_key(Some("mer_other"), "pan").await.unwrap(),
        None
    );

    // System keys (no merchant) live apart from merchant keys.
    let system = DataKeyRecord {
        mode: "hsm".to_string(),
        wrapped: None,
        wrapping_label: "cardvault-audit-v1".to_string(),
        ..data_key("dek_sys", None, "audit", 1)
    };
    s.insert_data_key(&system, None).await.unwrap();
    assert_eq!(
        s.current_data_key(None, "audit").await.unwrap(),
        Some(system)
    );
    assert_eq!(s.current_data_key(None, "pan").await.unwrap(), None);
    assert_eq!(
        s.current_data_key(Some("mer_a"), "audit").await.unwrap(),
        None
    );

    // One key per (owner, purpose, version), also for system keys.
    let r = s
        .insert_data_key(&data_key("dek_2b", Some("mer_a"), "pan", 2), None)
        .await;
    assert!(matches!(r, Err(StorageError::Conflict(_))), "{r:?}");
    let r = s
        .insert_data_key(&data_key("dek_sys2", None, "audit", 1), None)
        .await;
    assert!(matches!(r, Err(StorageError::Conflict(_))), "{r:?}");
    let r = s
        .insert_data_key(&data_key("dek_1", Some("mer_a"), "pan", 9), None)
        .await;
    assert!(matches!(r, Err(StorageError::Conflict(_))), "{r:?}");
}

async fn audit_append_and_list(s: &dyn Storage) {
    let entries: Vec<AuditEntry> = (0..5)
        .map(|i| AuditEntry {
            at: 1_700_000_000 + i,
            actor: if i % 2 == 0 { "operator" } else { "key_1" }.to_string(),
            merchant_id: (i % 2 == 1).then(|| "mer_a".to_string()),
            event: format!("event.{i}"),
            resource: (i != 3).then(|| format!("res_{i}")),
            outcome: ["success", "denied", "failure"][i as usize % 3].to_string(),
            origin: (i == 1).then(|| "10.0.0.1".to_string()),
            request_id: Some(format!("req_{i}")),
            detail: (i == 4).then(|| "last4=4242".to_string()),
        })
        .collect();
    for e in &entries {
        s.append_audit(e).await.unwrap();
    }
    let first = s.list_audit(0, 3).await.unwrap();
    assert_eq!(
        first.iter().map(|r| r.entry.clone()).collect::<Vec<_>>(),
        entries[..3]
    );
    assert!(first.windows(2).all(|w| w[0].seq < w[1].seq));
    let rest = s.list_audit(first[2].seq, 10).await.unwrap();
    assert_eq!(
        rest.iter().map(|r| r.entry.clone()).collect::<Vec<_>>(),
        entries[3..]
    );
    assert!(rest[0].seq > first[2].seq);
    assert!(s.list_audit(rest[1].seq, 10).await.unwrap().is_empty());
    assert!(s.list_audit(0, 0).await.unwrap().is_empty());
}

// ------------------------------------------------- backend-specific checks

/// Column names that could suggest a plaintext PAN or CVV.
fn suspicious_column(table: &str, column: &str) -> bool {
    let c = column.to_ascii_lowercase();
    let allowed = ["pan_ciphertext", "pan_length"];
    (c.contains("pan")
        || c.contains("cvv")
        || c.contains("cvc")
        || c.contains("security_code")
        || c.contains("card_number"))
        && !(table == "cards" && allowed.contains(&c.as_str()))
}

const TABLES: [&str; 7] = [
    "merchants",
    "api_keys",
    "customers",
    "cards",
    "data_keys",
    "idempotency_keys",
    "audit_log",
];

/// Card lookups by customer use the unique (customer, fingerprint) index,
/// never a scan of the merchant's cards (migration 0007 keeps one
/// customer-keyed index and tells the planner which one is selective), and
/// no card statement scans a table.
#[tokio::test]
async fn sqlite_card_lookups_by_customer_use_the_customer_index() {
    let db = sqlite_db().await;
    let pool = db.storage.pool();
    let lookups = [
        concat!(
            "SELECT id FROM cards WHERE merchant_id = 'm' AND customer_id = 'c' ",
            "ORDER BY seq"
        ),
        "DELETE FROM cards WHERE merchant_id = 'm' AND customer_id = 'c'",
        "DELETE FROM cards WHERE merchant_id = 'm' AND id = 'card_1'",
        "SELECT id FROM cards WHERE merchant_id = 'm' AND customer_id = 'c' AND fingerprint = x'00'",
        "SELECT id FROM cards WHERE merchant_id = 'm' AND id = 'card_1'",
    ];
    for sql in lookups {
        let rows = sqlx::query(&format!("EXPLAIN QUERY PLAN {sql}"))
            .fetch_all(pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let plan = rows
            .iter()
            .map(|r| sqlx::Row::get::<String, _>(r, "detail"))
            .collect::<Vec<_>>()
            .join(" / ");
        assert!(
            plan.contains("USING INDEX sqlite_autoindex_cards_"),
            "{sql}: {plan}"
        );
        assert!(!plan.contains("cards_merchant"), "{sql}: {plan}");
        // A card delete clears its customer's default through an index.
        assert!(!plan.contains("SCAN"), "{sql}: {plan}");
    }
}

/// On PostgreSQL too, every card lookup goes through the id or the
/// customer (the wallet index, or the unique index that dedupes cards), in
/// generic and custom plans alike: no index on the merchant alone is left
/// for the planner to pick (migration postgres/0008), and
/// sequential scans are disabled here so that a lookup without a usable
/// index would show as one.
#[tokio::test]
async fn postgres_card_lookups_use_the_id_or_customer_index() {
    let Some(db) = PgDb::create().await else {
        return;
    };
    let mut conn = db.storage().pool().acquire().await.unwrap();
    sqlx::query("SET enable_seqscan = off")
        .execute(&mut *conn)
        .await
        .unwrap();
    let lookups = [
        (
            "SELECT id FROM cards WHERE merchant_id = $1 AND customer_id = $2 ORDER BY seq",
            "using cards_customer_",
        ),
        (
            "DELETE FROM cards WHERE merchant_id = $1 AND customer_id = $2",
            "using cards_customer_",
        ),
        (
            "SELECT id FROM cards WHERE merchant_id = $1 AND id = $2",
            "cards_id_key",
        ),
        (
            "DELETE FROM cards WHERE merchant_id = $1 AND id = $2",
            "cards_id_key",
        ),
    ];
    // The batched reads look each key up through an index too.
    let batched = [
        (super::postgres::CARDS_SQL, "cards_id_key"),
        (super::postgres::CARD_VIEWS_SQL, "cards_id_key"),
        (super::postgres::WALLETS_SQL, "using cards_customer_"),
    ];
    let single = ("(text, text)", "('mer_1', 'cus_1')");
    let arrays = ("(text[], text[])", "('{mer_1,mer_1}', '{card_1,card_2}')");
    for (kind, queries, (types, args)) in [
        ("lookup", &lookups[..], single),
        ("batched", &batched[..], arrays),
    ] {
        for mode in ["force_generic_plan", "force_custom_plan"] {
            sqlx::query(&format!("SET plan_cache_mode = {mode}"))
                .execute(&mut *conn)
                .await
                .unwrap();
            for (i, (sql, index)) in queries.iter().enumerate() {
                let name = format!("{kind}_{mode}_{i}");
                sqlx::query(&format!("PREPARE {name} {types} AS {sql}"))
                    .execute(&mut *conn)
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
                let plan: Vec<String> =
                    sqlx::query_scalar(&format!("EXPLAIN EXECUTE {name} {args}"))
                        .fetch_all(&mut *conn)
                        .await
                        .unwrap_or_else(|e| panic!("{sql}: {e}"));
                let plan = plan.join(" / ");
                assert!(plan.contains(index), "{mode} {sql}: {plan}");
                assert!(!plan.contains("Seq Scan"), "{mode} {sql}: {plan}");
            }
        }
    }
}

/// Reads that arrive together on PostgreSQL share queries: 300 at once
/// take a handful, two at a time at most.
#[tokio::test]
async fn postgres_concurrent_reads_share_queries() {
    use futures_util::future::join_all;
    let Some(db) = PgDb::create().await else {
        return;
    };
    let s = db.storage();
    merchant(s, "mer_a", 1).await;
    add_customer(s, "mer_a", "cus_a").await;
    add_card(s, &card("mer_a", "cus_a", "card_a", 1)).await;
    let before = s.read_batch_stats();
    let (q0, _) = s.card_views.stats();
    let (c0, _) = s.cards.stats();
    let (w0, _) = s.wallets.stats();
    let views = join_all((0..300).map(|_| s.get_card_view("mer_a", "card_a")));
    let cards = join_all((0..300).map(|_| s.get_card("mer_a", "card_a")));
    let wallets = join_all((0..300).map(|_| s.list_card_views("mer_a", "cus_a")));
    let (views, cards, wallets) = tokio::join!(views, cards, wallets);
    assert!(views
        .iter()
        .all(|v| v.as_ref().unwrap().as_ref().unwrap().0.id == "card_a"));
    assert!(cards
        .iter()
        .all(|c| c.as_ref().unwrap().as_ref().unwrap().id == "card_a"));
    assert!(wallets.iter().all(|w| w.as_ref().unwrap().len() == 1));
    let (q1, _) = s.card_views.stats();
    let (c1, _) = s.cards.stats();
    let (w1, _) = s.wallets.stats();
    let most = 2 + 300 / 128 + 1;
    assert!(q1 - q0 <= most, "{} card view queries", q1 - q0);
    assert!(c1 - c0 <= most, "{} card queries", c1 - c0);
    assert!(w1 - w0 <= most, "{} wallet queries", w1 - w0);
    let after = s.read_batch_stats();
    assert_eq!(after.reads - before.reads, 900);
    assert_eq!(
        after.queries - before.queries,
        (q1 - q0) + (c1 - c0) + (w1 - w0)
    );
}

/// An append reads the chain head only once it holds the chain lock: an
/// entry another node appends while this one waits for the lock becomes
/// the new entry's predecessor, so the chain does not fork.
#[tokio::test]
async fn postgres_appends_read_the_head_under_the_chain_lock() {
    let Some(db) = PgDb::create().await else {
        return;
    };
    let s = db.storage();
    s.append_audit(&audit("first", None, None)).await.unwrap();
    // Another node: holds the chain lock, and appends while holding it.
    let mut other = s.pool().acquire().await.unwrap();
    sqlx::query("BEGIN").execute(&mut *other).await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(super::postgres_audit::AUDIT_CHAIN_LOCK)
        .execute(&mut *other)
        .await
        .unwrap();
    let second = audit("second", None, None);
    let appending = s.append_audit(&second);
    tokio::pin!(appending);
    let waited = tokio::time::timeout(std::time::Duration::from_millis(300), &mut appending).await;
    assert!(
        waited.is_err(),
        "the append did not wait for the chain lock"
    );
    let other_hash = vec![0xAB; 32];
    sqlx::query(
        "INSERT INTO audit_log (at, actor, event, outcome, prev_hash, hash, mac, mac_key_id) \
         SELECT 1, 'node_b', 'other', 'success', hash, $1, $1, 'dek_test_audit' \
         FROM audit_log ORDER BY seq DESC LIMIT 1",
    )
    .bind(&other_hash)
    .execute(&mut *other)
    .await
    .unwrap();
    sqlx::query("COMMIT").execute(&mut *other).await.unwrap();
    appending.await.unwrap();
    let rows = s.chain_rows(0, 100).await.unwrap();
    let last = rows.last().unwrap();
    assert_eq!(last.entry.event, "second");
    assert_eq!(last.prev_hash.as_deref(), Some(other_hash.as_slice()));
}

/// A batch of appends that fails halfway (here a trigger refuses one
/// entry after the batch's transaction began) fails its callers, and
/// leaves no half-open transaction on the writer's connection: the next
/// appends commit.
#[tokio::test]
async fn postgres_failed_append_batches_leave_nothing_open() {
    let Some(db) = PgDb::create().await else {
        return;
    };
    let s = db.storage();
    s.append_audit(&audit("before", None, None)).await.unwrap();
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN IF NEW.event = 'poison' THEN RAISE EXCEPTION 'refused'; END IF; \
         RETURN NEW; END $$; \
         CREATE TRIGGER refuse_poison BEFORE INSERT ON audit_log \
         FOR EACH ROW EXECUTE FUNCTION refuse_poison();",
    )
    .execute(s.pool())
    .await
    .unwrap();
    let poison = audit("poison", None, None);
    let r = s.append_audit(&poison).await;
    assert!(r.is_err(), "{r:?}");
    for i in 0..3 {
        s.append_audit(&audit(&format!("after_{i}"), None, None))
            .await
            .unwrap();
    }
    let events: Vec<String> = s
        .chain_rows(0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.entry.event)
        .collect();
    assert_eq!(events, ["before", "after_0", "after_1", "after_2"]);
}

#[tokio::test]
async fn sqlite_is_durable_and_schema_holds_no_pan() {
    let db = sqlite_db().await;
    let pool = db.storage.pool();
    let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(journal, "wal");
    let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(synchronous, 2, "synchronous=FULL");
    let foreign_keys: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(foreign_keys, 1);
    let busy: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
        .fetch_one(pool)
        .await
        .unwrap();
    assert!(busy >= 1_000, "busy_timeout {busy}");
    let secure_delete: i64 = sqlx::query_scalar("PRAGMA secure_delete")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(secure_delete, 1);
    // A small page cache on the pool's connections; the writer's direct
    // connection keeps SQLite's default (see `READ_CACHE_KIB`).
    let cache: i64 = sqlx::query_scalar("PRAGMA cache_size")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(cache, -256);

    for table in TABLES {
        let columns: Vec<String> = sqlx::query_scalar("SELECT name FROM pragma_table_info(?)")
            .bind(table)
            .fetch_all(pool)
            .await
            .unwrap();
        assert!(!columns.is_empty(), "table {table} missing");
        for column in columns {
            assert!(!suspicious_column(table, &column), "{table}.{column}");
        }
    }

    // The audit trail is append-only.
    db.storage
        .append_audit(&audit("x", None, None))
        .await
        .unwrap();
    assert!(sqlx::query("UPDATE audit_log SET event = 'y'")
        .execute(pool)
        .await
        .is_err());
    assert!(sqlx::query("DELETE FROM audit_log")
        .execute(pool)
        .await
        .is_err());
    assert_eq!(db.storage.list_audit(0, 10).await.unwrap().len(), 1);
}

#[tokio::test]
async fn postgres_is_durable_and_schema_holds_no_pan() {
    let Some(db) = PgDb::create().await else {
        return;
    };
    let pool = db.storage().pool();
    // Every pooled connection, not just one.
    let mut conns = Vec::new();
    for _ in 0..3 {
        conns.push(pool.acquire().await.unwrap());
    }
    for conn in &mut conns {
        let sync: String = sqlx::query_scalar("SHOW synchronous_commit")
            .fetch_one(&mut **conn)
            .await
            .unwrap();
        assert_eq!(sync, "on");
        let jit: String = sqlx::query_scalar("SHOW jit")
            .fetch_one(&mut **conn)
            .await
            .unwrap();
        assert_eq!(jit, "off");
    }
    drop(conns);

    for table in TABLES {
        let columns: Vec<String> = sqlx::query_scalar(
            "SELECT column_name::text FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = $1",
        )
        .bind(table)
        .fetch_all(pool)
        .await
        .unwrap();
        assert!(!columns.is_empty(), "table {table} missing");
        for column in columns {
            assert!(!suspicious_column(table, &column), "{table}.{column}");
        }
    }

    let storage = db.storage();
    storage.append_audit(&audit("x", None, None)).await.unwrap();
    assert!(sqlx::query("UPDATE audit_log SET event = 'y'")
        .execute(pool)
        .await
        .is_err());
    assert!(sqlx::query("DELETE FROM audit_log")
        .execute(pool)
        .await
        .is_err());
    assert!(sqlx::query("TRUNCATE audit_log")
        .execute(pool)
        .await
        .is_err());
    assert_eq!(storage.list_audit(0, 10).await.unwrap().len(), 1);
}

#[tokio::test]
async fn unreachable_databases_are_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}",
        dir.path().join("no-such-dir").join("vault.db").display()
    );
    let r = SqliteStorage::connect(&url, 1).await;
    assert!(matches!(r, Err(StorageError::Unavailable(_))), "{r:?}");

    // Nothing listens on port 1.
    let r = PgStorage::connect("postgres://postgres@127.0.0.1:1/cardvault", 1).await;
    assert!(matches!(r, Err(StorageError::Unavailable(_))), "{r:?}");

    let r = connect("mysql://localhost/x", 1).await;
    assert!(matches!(r, Err(StorageError::Other(_))));
}

#[test]
fn database_names_are_replaced_in_urls() {
    assert_eq!(
        with_database("postgres://u@h:5432/test", "cv_1"),
        "postgres://u@h:5432/cv_1"
    );
    assert_eq!(
        with_database("postgres://u@h:5432/test?sslmode=disable", "cv_1"),
        "postgres://u@h:5432/cv_1?sslmode=disable"
    );
    assert_eq!(
        with_database("postgres://u@h", "cv_1"),
        "postgres://u@h/cv_1"
    );
}

/// A connection that goes back to the pool still inside a transaction (its
/// request was cancelled while the transaction was starting) is closed, not
/// handed to the next caller, whose transaction would then fail.
#[tokio::test]
async fn connections_left_in_a_transaction_are_not_reused() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("vault.db").display());
    // One connection, so the next acquire would get the same one back.
    let storage = SqliteStorage::connect(&url, 1).await.unwrap();
    storage.migrate().await.unwrap();
    {
        let mut conn = storage.pool().acquire().await.unwrap();
        let tx = conn.begin_with("BEGIN IMMEDIATE").await.unwrap();
        // What a cancelled future leaves behind: no commit, no rollback.
        std::mem::forget(tx);
        assert!(conn.is_in_transaction());
    }
    let mut tx = storage.pool().begin_with("BEGIN IMMEDIATE").await.unwrap();
    sqlx::query("SELECT 1").execute(&mut *tx).await.unwrap();
    tx.commit().await.unwrap();
}

// ---------------------------------------------------------------- lean pool

/// The lean pool hands the same connection back without new connections,
/// keeps it after errors that say nothing about the connection, drops it
/// after any other, and never holds more than its size.
#[tokio::test]
async fn lean_pool_reuses_connections_and_drops_doubtful_ones() {
    use super::lean::LeanPool;
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(dir.path().join("lean.db"))
        .create_if_missing(true);
    let pool = LeanPool::<sqlx::Sqlite>::new(options, 2, Duration::from_secs(5));
    // A temporary table lives only in the connection that made it.
    sqlx::query("CREATE TEMP TABLE mine (x INTEGER UNIQUE)")
        .execute(&pool)
        .await
        .unwrap();
    for x in 0..20 {
        sqlx::query("INSERT INTO mine VALUES (?)")
            .bind(x)
            .execute(&pool)
            .await
            .unwrap();
    }
    let dup = sqlx::query("INSERT INTO mine VALUES (1)")
        .execute(&pool)
        .await;
    assert!(matches!(dup, Err(sqlx::Error::Database(_))), "{dup:?}");
    let count = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM mine");
    assert_eq!(count.fetch_one(&pool).await.unwrap(), 20);
    assert_eq!(pool.idle_count(), 1);

    // Anything but a constraint error: the connection (and its temporary
    // table) is gone, a new one serves the next statement.
    assert!(sqlx::query("SELEKT 1").execute(&pool).await.is_err());
    assert_eq!(pool.idle_count(), 0);
    let gone = sqlx::query("SELECT count(*) FROM mine")
        .execute(&pool)
        .await;
    assert!(gone.is_err(), "{gone:?}");

    let all = futures_util::future::join_all(
        (0..16).map(|_| sqlx::query_scalar::<_, i64>("SELECT 1").fetch_one(&pool)),
    )
    .await;
    assert!(all.iter().all(|r| matches!(r, Ok(1))), "{all:?}");
    assert!((1..=2).contains(&pool.idle_count()));
}

/// A connection the server ended: used within the idle window it fails one
/// statement, as unavailable, and is replaced; pinged before use it is
/// replaced without an error. A statement abandoned halfway (a cancelled
/// request) discards its connection.
#[tokio::test]
async fn lean_pool_replaces_connections_the_server_ended() {
    use super::lean::LeanPool;
    use std::str::FromStr;
    use std::time::Duration;
    let Some(db) = PgDb::create().await else {
        return;
    };
    let options =
        sqlx::postgres::PgConnectOptions::from_str(&with_database(&db.admin_url, &db.name))
            .unwrap();
    let pid = |pool: &LeanPool<sqlx::Postgres>| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()")
                .fetch_one(&pool)
                .await
        }
    };
    let admin = db.storage().pool().clone();
    let terminate = |pid: i32| {
        let admin = admin.clone();
        async move {
            let ended: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1, 5000)")
                .bind(pid)
                .fetch_one(&admin)
                .await
                .unwrap();
            assert!(ended);
        }
    };

    let pool = LeanPool::<sqlx::Postgres>::new(options.clone(), 1, Duration::from_secs(5));
    let first = pid(&pool).await.unwrap();
    assert_eq!(pid(&pool).await.unwrap(), first, "reused");
    terminate(first).await;
    let failed = pid(&pool).await.unwrap_err();
    assert!(
        matches!(postgres::db_err(failed), StorageError::Unavailable(_)),
        "a dead connection is unavailable"
    );
    let second = pid(&pool).await.unwrap();
    assert_ne!(second, first);

    let pool = LeanPool::<sqlx::Postgres>::new(options, 1, Duration::from_secs(5))
        .ping_after_idle(Duration::ZERO);
    let third = pid(&pool).await.unwrap();
    terminate(third).await;
    let fourth = pid(&pool).await.unwrap();
    assert_ne!(fourth, third);

    let abandoned = tokio::time::timeout(
        Duration::from_millis(200),
        sqlx::query("SELECT pg_sleep(2)").execute(&pool),
    )
    .await;
    assert!(abandoned.is_err(), "timed out");
    assert_eq!(pool.idle_count(), 0);
    assert_ne!(pid(&pool).await.unwrap(), fourth);
}

/// On SQLite, write transactions outside the group commit (customer
/// updates, webhook delivery results, the capture-session sweep here) take
/// turns with the writer's batches through the write
/// gate: mixed with a stream of batched card inserts, every one of them
/// gets through, and so does every card (the gate and the writer never wait
/// for each other). This run is too short to show the starvation the gate
/// prevents; that needs minutes of sustained load.
#[tokio::test]
async fn sqlite_writes_outside_the_writer_get_their_turn() {
    let db = sqlite_db().await;
    let s: &dyn Storage = &db.storage;
    merchant(s, "mer_a", 1).await;
    for c in ["cus_1", "cus_2", "cus_3"] {
        add_customer(s, "mer_a", c).await;
    }
    let inserts = (0..600u32).map(|i| async move {
        let customer = format!("cus_{}", 1 + i % 3);
        let c = card("mer_a", &customer, &format!("card_{i}"), (i / 3) as u8);
        s.insert_card(&c, &audit("card.create", Some("mer_a"), Some(&c.id)))
            .await
    });
    let updates = (0..40u32).map(|i| async move {
        let update = CustomerUpdate {
            email: Some(format!("turn{i}@example.com")),
            ..CustomerUpdate::default()
        };
        s.update_customer("mer_a", &format!("cus_{}", 1 + i % 3), &update)
            .await
    });
    // Background writes: webhook delivery results and the capture-session
    // sweep.
    charges_with_deliveries(s, 20).await;
    let now = 1_700_000_000_000 + 1;
    let due = s.due_deliveries(now, now + 60_000, 50).await.unwrap();
    assert_eq!(due.len(), 20);
    let results = due.iter().map(|d| async move {
        let attempt = DeliveryAttempt {
            seq: d.seq,
            attempts: 1,
            status: "delivered".to_string(),
            next_attempt_at: now,
            last_status: Some(200),
            last_error: None,
            at: now,
        };
        s.record_delivery(&attempt).await
    });
    let sweeps = (0..5).map(|_| s.sweep_capture_sessions(now));
    let (inserted, updated, recorded, swept) = tokio::join!(
        futures_util::future::join_all(inserts),
        futures_util::future::join_all(updates),
        futures_util::future::join_all(results),
        futures_util::future::join_all(sweeps)
    );
    assert!(inserted.iter().all(Result::is_ok), "{inserted:?}");
    assert!(updated.iter().all(Result::is_ok), "{updated:?}");
    assert!(recorded.iter().all(Result::is_ok), "{recorded:?}");
    assert!(swept.iter().all(Result::is_ok), "{swept:?}");
    assert_eq!(s.list_cards("mer_a", "cus_1").await.unwrap().len(), 200);
    // The cards' events have deliveries of their own, still pending.
    let recorded: BTreeSet<String> = due.iter().map(|d| d.event.id.clone()).collect();
    let delivered: BTreeSet<String> = s
        .list_deliveries("mer_a", "we_1", 1000)
        .await
        .unwrap()
        .into_iter()
        .filter(|d| d.status == "delivered")
        .map(|d| d.event_id)
        .collect();
    assert_eq!(delivered, recorded);
}

/// `chain_head` with a known `(seq, count)` counts only the chained rows
/// after that seq and adds them to the count; one past the head is
/// ignored. `latest_checkpoint` is the one stored last.
async fn chain_head_counts_on_from_a_known_count(s: &dyn Storage) {
    assert!(s.chain_head(None).await.unwrap().is_none());
    assert!(s.latest_checkpoint().await.unwrap().is_none());
    for i in 0..5 {
        let r = format!("r{i}");
        s.append_audit(&audit("x.one", None, Some(&r)))
            .await
            .unwrap();
    }
    let (seq1, _, n1) = s.chain_head(None).await.unwrap().unwrap();
    assert_eq!(n1, 5);
    for i in 0..7 {
        let r = format!("s{i}");
        s.append_audit(&audit("x.two", None, Some(&r)))
            .await
            .unwrap();
    }
    let (seq2, hash2, n2) = s.chain_head(None).await.unwrap().unwrap();
    assert_eq!(n2, 12);
    let on = s.chain_head(Some((seq1, n1))).await.unwrap().unwrap();
    assert_eq!(on, (seq2, hash2, 12));
    // It adds to the count it is given instead of recounting the log...
    let given = s.chain_head(Some((seq1, 100))).await.unwrap().unwrap();
    assert_eq!(given.2, 107);
    // ...from exactly after that seq.
    let at_head = s.chain_head(Some((seq2, 12))).await.unwrap().unwrap();
    assert_eq!(at_head.2, 12);
    let past = s.chain_head(Some((seq2 + 1, 100))).await.unwrap().unwrap();
    assert_eq!(past.2, 12);
    for (head_seq, entries) in [(seq1, n1), (seq2, n2)] {
        s.insert_checkpoint(&Checkpoint {
            seq: 0,
            at: 1_700_000_000,
            head_seq,
            head_hash: vec![7; 32],
            entries,
            hsm_label: "cv-audit-v1".to_string(),
            signature: vec![1; 32],
        })
        .await
        .unwrap();
    }
    let latest = s.latest_checkpoint().await.unwrap().unwrap();
    assert_eq!((latest.head_seq, latest.entries), (seq2, 12));
}

/// The SQLite writes that run outside the group commit and outside any
/// request (the HSM key registry, the signed audit checkpoints) wait for
/// the write gate like the rest: as autocommit statements they polled in
/// SQLite's busy handler for the lock the writer frees only between
/// batches. Held here, the gate keeps both from writing; let go, both land.
#[tokio::test]
async fn sqlite_key_registry_and_checkpoints_wait_for_the_write_gate() {
    let db = sqlite_db().await;
    let s = &db.storage;
    let key = HsmKeyRecord {
        label: "cv-kek-v9".to_string(),
        kind: "kek".to_string(),
        merchant_id: None,
        version: 9,
        state: "active".to_string(),
        created_at: 1_700_000_000,
        retired_at: None,
        destroyed_at: None,
    };
    let checkpoint = Checkpoint {
        seq: 0,
        at: 1_700_000_000,
        head_seq: 0,
        head_hash: vec![7; 32],
        entries: 0,
        hsm_label: "cv-audit-v1".to_string(),
        signature: vec![1; 32],
    };
    let held = s.write_gate().lock().await;
    let both = async {
        s.register_hsm_key(&key).await.unwrap();
        s.insert_checkpoint(&checkpoint).await.unwrap();
    };
    tokio::pin!(both);
    let waited = tokio::time::timeout(std::time::Duration::from_millis(300), &mut both).await;
    assert!(waited.is_err(), "a write went past the held gate");
    assert!(s.list_hsm_keys().await.unwrap().is_empty());
    drop(held);
    both.await;
    assert_eq!(s.list_hsm_keys().await.unwrap(), vec![key.clone()]);
    let stored = s.list_checkpoints().await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].head_hash, checkpoint.head_hash);
}

/// On SQLite's writer each card is its own single-row statement without a
/// statement journal: a card the schema refuses (a CHECK here) fails
/// before SQLite writes anything, alone, and the cards batched with it
/// are stored. (PostgreSQL's multi-row insert does not promise this; the
/// API validates cards before they reach storage.)
#[tokio::test]
async fn sqlite_a_card_the_schema_refuses_fails_alone_in_its_batch() {
    let db = sqlite_db().await;
    let s: &dyn Storage = &db.storage;
    merchant(s, "mer_a", 1).await;
    add_customer(s, "mer_a", "cus_1").await;
    let writes = (0..120u8).map(|i| async move {
        let mut c = card("mer_a", "cus_1", &format!("card_{i}"), i);
        if i % 4 == 3 {
            c.exp_month = 13;
        }
        let r = s
            .insert_card(&c, &audit("card.create", Some("mer_a"), Some(&c.id)))
            .await;
        (i, r)
    });
    for (i, r) in futures_util::future::join_all(writes).await {
        if i % 4 == 3 {
            assert!(matches!(r, Err(StorageError::Other(_))), "{i}: {r:?}");
        } else {
            assert!(matches!(r, Ok(CardInsert::Created { .. })), "{i}: {r:?}");
        }
    }
    assert_eq!(s.list_cards("mer_a", "cus_1").await.unwrap().len(), 90);
    let stats = db.storage.group_commit_stats();
    assert!(
        stats.units > stats.batches,
        "the cards were never batched together: {stats:?}"
    );
}

/// A charge lookup planned while `charges` was empty keeps its generic
/// plan as the table grows (here: 3,000 charges, no statistics yet) until
/// the table is analysed. `prime_statistics` analyses exactly the tables
/// that outgrew the planner's guess without statistics, once: afterwards
/// the same prepared lookup goes through the id index.
#[tokio::test]
async fn postgres_tables_that_grow_without_statistics_get_them() {
    let Some(db) = PgDb::create().await else {
        return;
    };
    let s = db.storage();
    merchant(s, "mer_1", 1).await;
    let mut conn = s.pool().acquire().await.unwrap();
    let lookup = "SELECT id FROM charges WHERE merchant_id = $1 AND id = $2";
    let args = "('mer_1', 'ch_7')";
    generic_plan(&mut conn, "lookup", "(text, text)", lookup, args).await;
    // Nothing has grown yet: nothing to analyse.
    assert!(s.prime_statistics().await.unwrap().is_empty());
    sqlx::query(
        "INSERT INTO charges (id, merchant_id, customer_id, card_id, amount, currency, status, \
         captured, capture_requested, processor, created_at, updated_at) \
         SELECT 'ch_' || g, 'mer_1', 'cus_' || (g % 64), 'card_1', 100, 'USD', 'succeeded', \
         1, 1, 'sandbox', g, g FROM generate_series(1, 3000) g",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    let analysed = s.prime_statistics().await.unwrap();
    assert!(analysed.contains(&"charges".to_string()), "{analysed:?}");
    let after = explain_execute(&mut conn, "lookup", args).await;
    assert!(after.contains("charges_id_key"), "{after}");
    // Once only: the table has statistics now.
    let again = s.prime_statistics().await.unwrap();
    assert!(!again.contains(&"charges".to_string()), "{again:?}");
}

/// With statistics of a cards table whose customers average hundreds of
/// cards (as after the load tool's add_card), the batched wallet query
/// still looks each key up through an index: flattened into a join, its
/// generic plan hashed the keys against a scan of every card.
#[tokio::test]
async fn postgres_wallet_reads_stay_per_key_with_statistics() {
    let Some(db) = PgDb::create().await else {
        return;
    };
    let s = db.storage();
    merchant(s, "mer_1", 1).await;
    for c in ["cus_1", "cus_2", "cus_3", "cus_4"] {
        add_customer(s, "mer_1", c).await;
    }
    let mut conn = s.pool().acquire().await.unwrap();
    sqlx::query(
        "INSERT INTO cards (id, merchant_id, customer_id, pan_ciphertext, dek_id, fingerprint, \
         bin, last4, pan_length, brand, funding, exp_month, exp_year, status, created_at) \
         SELECT 'card_' || g, 'mer_1', 'cus_' || (1 + g % 4), '\\x01'::bytea, 'dek_1', \
         int8send(g), '424242', '4242', 16, 'visa', 'credit', 1, 2030, 'active', g \
         FROM generate_series(1, 20000) g",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::query("ANALYZE cards")
        .execute(&mut *conn)
        .await
        .unwrap();
    let plan = generic_plan(
        &mut conn,
        "wallets",
        "(text[], text[])",
        super::postgres::WALLETS_SQL,
        "('{mer_1}', '{cus_1}')",
    )
    .await;
    assert!(plan.contains("Nested Loop"), "{plan}");
    assert!(!plan.contains("Seq Scan on cards"), "{plan}");
    // The estimate (5,000 cards a customer) passes `jit_above_cost`; the
    // vault's connections must not compile the query to read a wallet.
    assert!(!plan.contains("JIT"), "{plan}");
}

/// Prepares `sql` as `name` on `conn` with generic plans forced, and
/// returns the plan of executing it with `args`.
async fn generic_plan(
    conn: &mut sqlx::PgConnection,
    name: &str,
    types: &str,
    sql: &str,
    args: &str,
) -> String {
    sqlx::query("SET plan_cache_mode = force_generic_plan")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query(&format!("PREPARE {name} {types} AS {sql}"))
        .execute(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    explain_execute(conn, name, args).await
}

/// The plan of executing the prepared statement `name` with `args`.
async fn explain_execute(conn: &mut sqlx::PgConnection, name: &str, args: &str) -> String {
    let rows: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN EXECUTE {name} {args}"))
        .fetch_all(conn)
        .await
        .unwrap();
    rows.join(" / ")
}
