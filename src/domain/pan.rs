//! The primary account number (PAN) as a secret type, and the non-secret
//! pieces of it (BIN, last four) that may be stored, logged and shown.
//!
//! [`Pan::parse`] is the only way to get a [`Pan`]: it strips spaces and
//! dashes and checks digits, length and the Luhn check digit once, so code
//! holding a `Pan` never re-validates. A `Pan` cannot be displayed or
//! serialized, its `Debug` shows only the last four digits, its digits are
//! zeroized on drop, and equality is constant-time.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::brand::Brand;

/// Fewest digits accepted (ISO/IEC 7812 allows shorter, but no network we
/// support issues them).
pub const MIN_LEN: usize = 12;
/// Most digits accepted (ISO/IEC 7812 maximum).
pub const MAX_LEN: usize = 19;

/// Why a card number was rejected. Messages are safe to return to clients:
/// they never contain any of the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PanError {
    /// Nothing but (possibly) spaces and dashes.
    #[error("card number is empty")]
    Empty,
    /// Something other than digits, spaces and dashes.
    #[error("card number may contain only digits, spaces and dashes")]
    InvalidCharacter,
    /// Fewer than [`MIN_LEN`] digits.
    #[error("card number must have between 12 and 19 digits, it has {len}")]
    TooShort {
        /// Number of digits found.
        len: usize,
    },
    /// More than [`MAX_LEN`] digits.
    #[error("card number must have between 12 and 19 digits, it has {len}")]
    TooLong {
        /// Number of digits found.
        len: usize,
    },
    /// The last digit is not the Luhn check digit of the others.
    #[error("card number is incorrect (check digit does not match)")]
    LuhnCheckFailed,
}

impl PanError {
    /// A stable machine-readable code, following the usual payment API
    /// names: `invalid_number` for malformed input, `incorrect_number` for a
    /// well-formed number that fails the check digit.
    pub fn code(self) -> &'static str {
        match self {
            PanError::LuhnCheckFailed => "incorrect_number",
            PanError::Empty
            | PanError::InvalidCharacter
            | PanError::TooShort { .. }
            | PanError::TooLong { .. } => "invalid_number",
        }
    }
}

/// A validated card number. See the module docs for what it refuses to do.
///
/// Deliberately not `Clone`: a copy of a PAN should be a visible decision
/// (re-parse, or hold a reference).
pub struct Pan {
    digits: Zeroizing<String>,
}

impl Pan {
    /// Parses a card number as typed by a person: ASCII spaces and dashes are
    /// removed, then the rest must be 12-19 ASCII digits with a valid Luhn
    /// check digit.
    ///
    /// Checks run in this order: characters, emptiness, length, Luhn.
    pub fn parse(input: &str) -> Result<Pan, PanError> {
        // Capacity fixed up front so pushing never reallocates: a
        // reallocation would leave an unzeroized copy in the old buffer.
        let mut digits = Zeroizing::new(String::with_capacity(MAX_LEN));
        let mut count = 0usize;
        for c in input.chars() {
            match c {
                ' ' | '-' => {}
                '0'..='9' => {
                    if count < MAX_LEN {
                        digits.push(c);
                    }
                    count = count.saturating_add(1);
                }
                _ => return Err(PanError::InvalidCharacter),
            }
        }
        match count {
            0 => Err(PanError::Empty),
            len if len < MIN_LEN => Err(PanError::TooShort { len }),
            len if len > MAX_LEN => Err(PanError::TooLong { len }),
            _ if !luhn_valid(&digits) => Err(PanError::LuhnCheckFailed),
            _ => Ok(Pan { digits }),
        }
    }

    /// The bare digits. For sealing and for handing to a processor only:
    /// never log, store or return them.
    pub fn digits(&self) -> &str {
        &self.digits
    }

    /// Number of digits (12-19).
    #[allow(clippy::len_without_is_empty)] // a Pan is never empty
    pub fn len(&self) -> usize {
        self.digits.len()
    }

    /// The issuer identification number: the first 8 digits when the PAN has
    /// 16 or more digits (ISO/IEC 7812-1:2017 eight-digit IINs; PCI DSS allows
    /// showing them with the last four), otherwise the first 6.
    pub fn bin(&self) -> Bin {
        let n = if self.len() >= 16 { 8 } else { 6 };
        Bin(self.digits.get(..n).unwrap_or_default().to_owned())
    }

    /// The last four digits.
    pub fn last4(&self) -> Last4 {
        let start = self.len().saturating_sub(4);
        Last4(self.digits.get(start..).unwrap_or_default().to_owned())
    }

    /// The card network, from the IIN ranges.
    pub fn brand(&self) -> Brand {
        Brand::detect(&self.digits)
    }
}

impl fmt::Debug for Pan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pan(****{})", self.last4())
    }
}

impl PartialEq for Pan {
    /// Constant-time in the digits (the length is not secret).
    fn eq(&self, other: &Pan) -> bool {
        self.digits.as_bytes().ct_eq(other.digits.as_bytes()).into()
    }
}

impl Eq for Pan {}

/// Luhn (mod 10) check over ASCII digits, check digit last.
fn luhn_valid(digits: &str) -> bool {
    let sum: u32 = digits
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b.wrapping_sub(b'0'));
            if i % 2 == 1 {
                let doubled = d * 2;
                if doubled > 9 {
                    doubled - 9
                } else {
                    doubled
                }
            } else {
                d
            }
        })
        .sum();
    sum % 10 == 0
}

/// A stored BIN or last-four value with the wrong shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CardMetadataError {
    /// Not 6 or 8 ASCII digits.
    #[error("BIN must be 6 or 8 digits")]
    Bin,
    /// Not 4 ASCII digits.
    #[error("last4 must be 4 digits")]
    Last4,
}

/// The leading 6 or 8 digits of a PAN. Not secret.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Bin(String);

impl Bin {
    /// The digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Bin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Bin {
    type Err = CardMetadataError;

    /// Rebuilds a stored BIN: 6 or 8 ASCII digits.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if matches!(s.len(), 6 | 8) && s.bytes().all(|b| b.is_ascii_digit()) {
            Ok(Bin(s.to_owned()))
        } else {
            Err(CardMetadataError::Bin)
        }
    }
}

impl TryFrom<String> for Bin {
    type Error = CardMetadataError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Bin> for String {
    fn from(bin: Bin) -> String {
        bin.0
    }
}

/// The last four digits of a PAN. Not secret.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Last4(String);

impl Last4 {
    /// The digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Last4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Last4 {
    type Err = CardMetadataError;

    /// Rebuilds a stored last four: exactly 4 ASCII digits.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() == 4 && s.bytes().all(|b| b.is_ascii_digit()) {
            Ok(Last4(s.to_owned()))
        } else {
            Err(CardMetadataError::Last4)
        }
    }
}

impl TryFrom<String> for Last4 {
    type Error = CardMetadataError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Last4> for String {
    fn from(last4: Last4) -> String {
        last4.0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use proptest::prelude::*;

    /// The Luhn check digit for `payload` (the number without its last digit).
    fn check_digit(payload: &str) -> char {
        for d in '0'..='9' {
            let mut candidate = payload.to_owned();
            candidate.push(d);
            if luhn_valid(&candidate) {
                return d;
            }
        }
        unreachable!("some digit always completes a Luhn number")
    }

    /// A Luhn-valid number of `len` digits starting with `prefix`.
    fn card(prefix: &str, len: usize) -> String {
        let mut s = prefix.to_owned();
        let filler = "1234567890123456789";
        s.push_str(&filler[..len - 1 - prefix.len()]);
        let c = check_digit(&s);
        s.push(c);
        s
    }

    /// No run of 5 or more digits anywhere in `s`.
    fn no_long_digit_run(s: &str) -> bool {
        let mut run = 0;
        for c in s.chars() {
            run = if c.is_ascii_digit() { run + 1 } else { 0 };
            if run >= 5 {
                return false;
            }
        }
        true
    }

    #[test]
    fn well_known_test_numbers() {
        let cases = [
            ("4242424242424242", Brand::Visa),
            ("4000056655665556", Brand::Visa),
            ("5555555555554444", Brand::Mastercard),
            ("2223003122003222", Brand::Mastercard),
            ("378282246310005", Brand::Amex),
            ("371449635398431", Brand::Amex),
            ("6011111111111117", Brand::Discover),
            ("6011000990139424", Brand::Discover),
            ("3056930009020004", Brand::Diners),
            ("36227206271667", Brand::Diners),
            ("3566002020360505", Brand::Jcb),
            ("6200000000000005", Brand::UnionPay),
            ("6062825624254001", Brand::Hipercard),
            ("5896570000000008", Brand::Cabal),
            ("5895620000000002", Brand::Naranja),
        ];
        for (number, brand) in cases {
            let pan = Pan::parse(number).unwrap();
            assert_eq!(pan.brand(), brand, "{}", &number[..6]);
            assert_eq!(pan.digits(), number);
        }
    }

    #[test]
    fn one_generated_card_per_brand() {
        let cases = [
            ("4", 16, Brand::Visa),
            ("4", 13, Brand::Visa),
            ("51", 16, Brand::Mastercard),
            ("55", 16, Brand::Mastercard),
            ("2221", 16, Brand::Mastercard),
            ("2720", 16, Brand::Mastercard),
            ("34", 15, Brand::Amex),
            ("37", 15, Brand::Amex),
            ("6011", 16, Brand::Discover),
            ("644", 16, Brand::Discover),
            ("65", 16, Brand::Discover),
            ("300", 14, Brand::Diners),
            ("36", 14, Brand::Diners),
            ("3528", 16, Brand::Jcb),
            ("3589", 19, Brand::Jcb),
            ("62", 19, Brand::UnionPay),
            ("622126", 16, Brand::UnionPay),
            ("6304", 12, Brand::Maestro),
            ("6759", 19, Brand::Maestro),
            ("50", 16, Brand::Maestro),
            ("401178", 16, Brand::Elo),
            ("504175", 16, Brand::Elo),
            ("650031", 16, Brand::Elo),
            ("606282", 16, Brand::Hipercard),
            ("384100", 19, Brand::Hipercard),
            ("637095", 16, Brand::Hipercard),
            ("604201", 16, Brand::Cabal),
            ("627170", 16, Brand::Cabal),
            ("589562", 16, Brand::Naranja),
            ("506199", 16, Brand::Carnet),
            ("639484", 16, Brand::Carnet),
            ("2200", 16, Brand::Unknown),
            ("1", 15, Brand::Unknown),
        ];
        for (prefix, len, brand) in cases {
            let number = card(prefix, len);
            let pan = Pan::parse(&number).unwrap();
            assert_eq!(pan.len(), len);
            assert_eq!(pan.brand(), brand, "prefix {prefix}");
        }
    }

    #[test]
    fn bin_and_last4() {
        let pan = Pan::parse("4242 4242 4242 4242").unwrap();
        assert_eq!(pan.bin().as_str(), "42424242");
        assert_eq!(pan.last4().as_str(), "4242");

        let amex = Pan::parse("3782-822463-10005").unwrap();
        assert_eq!(amex.len(), 15);
        assert_eq!(amex.bin().as_str(), "378282");
        assert_eq!(amex.last4().as_str(), "0005");

        let nineteen = Pan::parse(&card("6759", 19)).unwrap();
        assert_eq!(nineteen.bin().as_str().len(), 8);

        let twelve = Pan::parse(&card("6304", 12)).unwrap();
        assert_eq!(twelve.bin().as_str().len(), 6);

        assert_eq!(serde_json::to_string(&pan.bin()).unwrap(), "\"42424242\"");
        assert_eq!(pan.last4().to_string(), "4242");
    }

    #[test]
    fn stored_metadata_round_trips() {
        assert_eq!("424242".parse::<Bin>().unwrap().as_str(), "424242");
        assert_eq!("42424242".parse::<Bin>().unwrap().as_str(), "42424242");
        assert!("4242424".parse::<Bin>().is_err());
        assert!("42424a".parse::<Bin>().is_err());
        assert_eq!("0005".parse::<Last4>().unwrap().as_str(), "0005");
        assert!("005".parse::<Last4>().is_err());
        let bin: Bin = serde_json::from_str("\"424242\"").unwrap();
        assert_eq!(bin.as_str(), "424242");
        assert!(serde_json::from_str::<Last4>("\"12345\"").is_err());
    }

    #[test]
    fn separators_are_stripped() {
        for input in [
            "4242424242424242",
            "4242 4242 4242 4242",
            "4242-4242-4242-4242",
            " 4242 - 4242--4242  4242 ",
        ] {
            assert_eq!(Pan::parse(input).unwrap().digits(), "4242424242424242");
        }
    }

    #[test]
    fn rejections() {
        assert_eq!(Pan::parse("").unwrap_err(), PanError::Empty);
        assert_eq!(Pan::parse(" - -").unwrap_err(), PanError::Empty);
        assert_eq!(
            Pan::parse(&card("4", 11)).unwrap_err(),
            PanError::TooShort { len: 11 }
        );
        assert_eq!(
            Pan::parse(&card("4", 20)[..]).unwrap_err(),
            PanError::TooLong { len: 20 }
        );
        assert_eq!(
            Pan::parse(&"4".repeat(200)).unwrap_err(),
            PanError::TooLong { len: 200 }
        );
        assert_eq!(
            Pan::parse("4242 4242 4242 424a").unwrap_err(),
            PanError::InvalidCharacter
        );
        assert_eq!(
            Pan::parse("4242.4242.4242.4242").unwrap_err(),
            PanError::InvalidCharacter
        );
        // Non-ASCII digits are not digits here.
        assert_eq!(
            Pan::parse("４２４２４２４２４２４２４２４２").unwrap_err(),
            PanError::InvalidCharacter
        );
        assert_eq!(
            Pan::parse("4242\t4242424242424242").unwrap_err(),
            PanError::InvalidCharacter
        );
        assert_eq!(
            Pan::parse("4242424242424241").unwrap_err(),
            PanError::LuhnCheckFailed
        );
        assert_eq!(PanError::LuhnCheckFailed.code(), "incorrect_number");
        assert_eq!(PanError::Empty.code(), "invalid_number");
        assert_eq!(
            PanError::TooShort { len: 11 }.to_string(),
            "card number must have between 12 and 19 digits, it has 11"
        );
    }

    #[test]
    fn debug_is_redacted_and_eq_works() {
        let pan = Pan::parse("4000056655665556").unwrap();
        assert_eq!(format!("{pan:?}"), "Pan(****5556)");
        assert_eq!(format!("{pan:#?}"), "Pan(****5556)");
        assert_eq!(pan, Pan::parse("4000 0566 5566 5556").unwrap());
        assert_ne!(pan, Pan::parse("4242424242424242").unwrap());
        assert_ne!(pan, Pan::parse("378282246310005").unwrap());
    }

    /// A valid PAN (as digits) plus a copy with separators sprinkled in.
    fn valid_pan_with_separators() -> impl Strategy<Value = (String, String)> {
        (proptest::collection::vec(0u8..10, 11..=18))
            .prop_flat_map(|payload| {
                let mut digits: String = payload.iter().map(|d| char::from(b'0' + d)).collect();
                let c = check_digit(&digits);
                digits.push(c);
                let n = digits.len();
                let seps = proptest::collection::vec(
                    proptest::option::of(prop_oneof![Just(" "), Just("-"), Just(" - ")]),
                    n + 1,
                );
                (Just(digits), seps)
            })
            .prop_map(|(digits, seps)| {
                let mut typed = String::new();
                for (i, c) in digits.chars().enumerate() {
                    if let Some(sep) = seps[i] {
                        typed.push_str(sep);
                    }
                    typed.push(c);
                }
                if let Some(sep) = seps[digits.len()] {
                    typed.push_str(sep);
                }
                (digits, typed)
            })
    }

    proptest! {
        #[test]
        fn valid_pans_parse_and_round_trip((digits, typed) in valid_pan_with_separators()) {
            let pan = Pan::parse(&typed).unwrap();
            prop_assert_eq!(pan.digits(), digits.as_str());
            prop_assert_eq!(pan.len(), digits.len());
            prop_assert!(digits.ends_with(pan.last4().as_str()));
            prop_assert!(digits.starts_with(pan.bin().as_str()));
            prop_assert_eq!(pan.brand(), Brand::detect(&digits));
        }

        #[test]
        fn any_single_digit_change_is_rejected(
            (digits, _typed) in valid_pan_with_separators(),
            pos in any::<prop::sample::Index>(),
            delta in 1u8..10,
        ) {
            let i = pos.index(digits.len());
            let mut bytes = digits.into_bytes();
            bytes[i] = b'0' + (bytes[i] - b'0' + delta) % 10;
            let changed = String::from_utf8(bytes).unwrap();
            prop_assert_eq!(Pan::parse(&changed).unwrap_err(), PanError::LuhnCheckFailed);
        }

        #[test]
        fn debug_never_shows_more_than_last4((_digits, typed) in valid_pan_with_separators()) {
            let pan = Pan::parse(&typed).unwrap();
            let shown = format!("{pan:?} {pan:#?}");
            prop_assert!(no_long_digit_run(&shown), "{}", shown);
        }

        #[test]
        fn errors_never_echo_input(input in "[0-9 a-z-]{0,40}") {
            if let Err(e) = Pan::parse(&input) {
                let shown = format!("{e} {e:?}");
                prop_assert!(no_long_digit_run(&shown), "{}", shown);
            }
        }

        #[test]
        fn long_digit_strings_never_echo(input in "[0-9]{1,11}|[0-9]{20,40}|[0-9]{12,19}") {
            if let Err(e) = Pan::parse(&input) {
                let shown = format!("{e} {e:?}");
                prop_assert!(no_long_digit_run(&shown), "{}", shown);
            }
        }
    }
}

/// True when `text` holds something that parses as a card number: a run of
/// 12–19 digits (spaces and dashes between digits allowed) passing Luhn.
/// Free-text fields use it to refuse card numbers typed in the wrong place.
pub fn contains_pan_like(text: &str) -> bool {
    let mut run = String::new();
    let check = |run: &mut String| {
        let found = run.len() >= MIN_LEN && Pan::parse(run).is_ok();
        run.clear();
        found
    };
    let mut prev_digit = false;
    for c in text.chars() {
        if c.is_ascii_digit() {
            run.push(c);
            prev_digit = true;
        } else if (c == ' ' || c == '-') && prev_digit {
            prev_digit = false;
        } else {
            if check(&mut run) {
                return true;
            }
            prev_digit = false;
        }
        if run.len() > MAX_LEN {
            // Slide: any 12–19 digit window could be a PAN.
            for len in MIN_LEN..=MAX_LEN {
                for start in 0..=run.len() - len {
                    if Pan::parse(&run[start..start + len]).is_ok() {
                        return true;
                    }
                }
            }
            run.clear();
        }
    }
    check(&mut run)
}

#[cfg(test)]
mod pan_like_tests {
    use super::contains_pan_like;

    #[test]
    fn finds_card_numbers_in_text() {
        assert!(contains_pan_like("Ana 4111 1111 1111 1111"));
        assert!(contains_pan_like("x4111-1111-1111-1111y"));
        assert!(!contains_pan_like("Ana Silva"));
        assert!(!contains_pan_like("4111 1111 1111 1112"));
        assert!(!contains_pan_like("123.456.789-09"));
    }
}
