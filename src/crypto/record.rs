//! The sealed-record wire format and the AAD that binds a record to its row.
//!
//! ```text
//! record = version(1) ‖ len(dek_id)(1) ‖ dek_id ‖ nonce(12) ‖ ciphertext ‖ tag(16)
//! aad    = "cardvault/v1" ‖ lp(merchant_id) ‖ lp(record_id) ‖ lp(dek_id)
//! ```
//! `lp(x)` is a 2-byte big-endian length followed by `x`, so no two different
//! (merchant, record, key) triples can produce the same AAD. The version byte
//! and the key id are authenticated too: the key id through the AAD, the
//! version because only version 1 is ever accepted.

use super::CryptoError;

/// The only record version this build writes and reads.
pub const VERSION: u8 = 1;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
const AAD_DOMAIN: &[u8] = b"cardvault/v1";

/// A parsed, still-sealed record borrowing from its bytes.
pub struct SealedParts<'a> {
    pub dek_id: &'a str,
    pub nonce: &'a [u8; NONCE_LEN],
    /// Ciphertext followed by the 16-byte tag.
    pub ciphertext_and_tag: &'a [u8],
}

/// Length of the header that precedes the nonce.
pub fn header_len(dek_id: &str) -> usize {
    2 + dek_id.len()
}

/// Writes `version ‖ len ‖ dek_id ‖ nonce` into `out`.
pub fn write_header(out: &mut Vec<u8>, dek_id: &str, nonce: &[u8; NONCE_LEN]) {
    debug_assert!(dek_id.len() <= u8::MAX as usize);
    out.push(VERSION);
    out.push(dek_id.len() as u8);
    out.extend_from_slice(dek_id.as_bytes());
    out.extend_from_slice(nonce);
}

/// Splits a record into its parts, rejecting anything malformed.
pub fn parse(record: &[u8]) -> Result<SealedParts<'_>, CryptoError> {
    let (&version, rest) = record.split_first().ok_or(CryptoError::InvalidRecord)?;
    if version != VERSION {
        return Err(CryptoError::InvalidRecord);
    }
    let (&id_len, rest) = rest.split_first().ok_or(CryptoError::InvalidRecord)?;
    let id_len = usize::from(id_len);
    if rest.len() < id_len + NONCE_LEN + TAG_LEN {
        return Err(CryptoError::InvalidRecord);
    }
    let (id, rest) = rest.split_at(id_len);
    let dek_id = std::str::from_utf8(id).map_err(|_| CryptoError::InvalidRecord)?;
    let (nonce, ciphertext_and_tag) = rest.split_at(NONCE_LEN);
    let nonce: &[u8; NONCE_LEN] = nonce.try_into().map_err(|_| CryptoError::InvalidRecord)?;
    Ok(SealedParts {
        dek_id,
        nonce,
        ciphertext_and_tag,
    })
}

fn push_lp(out: &mut Vec<u8>, field: &[u8]) {
    let len = u16::try_from(field.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&field[..usize::from(len)]);
}

/// The associated data binding a record to merchant, record id and key id.
pub fn aad(merchant_id: &str, record_id: &str, dek_id: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        AAD_DOMAIN.len() + 6 + merchant_id.len() + record_id.len() + dek_id.len(),
    );
    out.extend_from_slice(AAD_DOMAIN);
    push_lp(&mut out, merchant_id.as_bytes());
    push_lp(&mut out, record_id.as_bytes());
    push_lp(&mut out, dek_id.as_bytes());
    out
}

/// Longest AAD that [`aad_buf`] builds on the stack. The vault's own ids are
/// far shorter; anything longer goes to the heap instead.
const AAD_INLINE: usize = 160;

/// An AAD from [`aad_buf`]: the same bytes as [`aad`], without a heap
/// allocation for the usual short ids.
pub struct Aad(AadRepr);

enum AadRepr {
    Inline { buf: [u8; AAD_INLINE], len: usize },
    Heap(Vec<u8>),
}

impl Aad {
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            AadRepr::Inline { buf, len } => &buf[..*len],
            AadRepr::Heap(v) => v,
        }
    }
}

impl std::ops::Deref for Aad {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl PartialEq for Aad {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl std::fmt::Debug for Aad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Aad").field(&self.as_bytes()).finish()
    }
}

/// [`aad`] on the stack (heap only when the fields are unusually long).
pub fn aad_buf(merchant_id: &str, record_id: &str, dek_id: &str) -> Aad {
    let fields = [
        merchant_id.as_bytes(),
        record_id.as_bytes(),
        dek_id.as_bytes(),
    ];
    let total = AAD_DOMAIN.len() + fields.iter().map(|f| 2 + f.len()).sum::<usize>();
    if total > AAD_INLINE {
        return Aad(AadRepr::Heap(aad(merchant_id, record_id, dek_id)));
    }
    let mut buf = [0u8; AAD_INLINE];
    buf[..AAD_DOMAIN.len()].copy_from_slice(AAD_DOMAIN);
    let mut pos = AAD_DOMAIN.len();
    for field in fields {
        // Every field is shorter than AAD_INLINE, so `lp` never truncates.
        let len = u16::try_from(field.len()).unwrap_or(u16::MAX);
        buf[pos..pos + 2].copy_from_slice(&len.to_be_bytes());
        pos += 2;
        buf[pos..pos + field.len()].copy_from_slice(field);
        pos += field.len();
    }
    Aad(AadRepr::Inline { buf, len: pos })
}

/// The associated data used when a data key is wrapped under an HSM key:
/// binds the wrapped bytes to the key's id, owner and purpose so a wrapped key
/// cannot be swapped for another row's.
pub fn wrap_aad(dek_id: &str, owner: &str, purpose: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + dek_id.len() + owner.len() + purpose.len());
    out.extend_from_slice(b"cardvault/dek/v1");
    push_lp(&mut out, dek_id.as_bytes());
    push_lp(&mut out, owner.as_bytes());
    push_lp(&mut out, purpose.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn aad_is_unambiguous() {
        assert_ne!(aad("ab", "c", "d"), aad("a", "bc", "d"));
        assert_ne!(aad("m", "r", "k1"), aad("m", "r", "k2"));
    }

    #[test]
    fn aad_buf_matches_aad() {
        let long = "x".repeat(200);
        let cases: [(&str, &str, &str); 5] = [
            ("", "", ""),
            ("mer_bench", "card_1", "dek_0123456789abcdefghijklmn"),
            ("ab", "c", "d"),
            (&long, "card_1", "dek_1"),
            ("m", &long[..AAD_INLINE - AAD_DOMAIN.len() - 6 - 2], "k"),
        ];
        for (m, r, k) in cases {
            assert_eq!(aad_buf(m, r, k).as_bytes(), aad(m, r, k).as_slice());
        }
        assert_ne!(aad_buf("ab", "c", "d"), aad_buf("a", "bc", "d"));
        assert!(matches!(aad_buf(&long, "r", "k").0, AadRepr::Heap(_)));
        assert!(matches!(aad_buf("m", "r", "k").0, AadRepr::Inline { .. }));
    }

    #[test]
    fn parse_rejects_short_and_bad_version() {
        assert!(parse(&[]).is_err());
        assert!(parse(&[2, 0]).is_err());
        let mut rec = Vec::new();
        write_header(&mut rec, "dek_x", &[0; NONCE_LEN]);
        assert!(parse(&rec).is_err(), "no room for a tag");
        rec.extend_from_slice(&[0; TAG_LEN]);
        let parts = parse(&rec).unwrap();
        assert_eq!(parts.dek_id, "dek_x");
        assert_eq!(parts.ciphertext_and_tag.len(), TAG_LEN);
    }
}
