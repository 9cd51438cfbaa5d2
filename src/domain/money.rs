//! Money: an amount in minor units of an ISO 4217 currency. The currency
//! fixes the exponent (USD 2, JPY 0, …), so an amount is always an integer
//! count of the smallest unit and never a float.

use std::fmt;

/// Currencies the vault accepts, with their ISO 4217 minor-unit exponents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Currency {
    Usd,
    Eur,
    Gbp,
    Mxn,
    Brl,
    Ars,
    Cop,
    Pen,
    Uyu,
    Cad,
    Chf,
    Jpy,
    Clp,
    Krw,
    Pyg,
}

/// Why a currency or an amount was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("currency must be a supported ISO 4217 code (usd, eur, gbp, mxn, brl, ars, cop, pen, uyu, cad, chf, jpy, clp, krw, pyg)")]
    UnknownCurrency,
    #[error("amount must be a positive integer in the currency's minor unit")]
    NotPositive,
    #[error("amount is larger than the maximum allowed")]
    TooLarge,
}

impl MoneyError {
    pub fn code(self) -> &'static str {
        match self {
            MoneyError::UnknownCurrency => "invalid_currency",
            MoneyError::NotPositive => "invalid_amount",
            MoneyError::TooLarge => "amount_too_large",
        }
    }
}

const ALL: [Currency; 15] = [
    Currency::Usd,
    Currency::Eur,
    Currency::Gbp,
    Currency::Mxn,
    Currency::Brl,
    Currency::Ars,
    Currency::Cop,
    Currency::Pen,
    Currency::Uyu,
    Currency::Cad,
    Currency::Chf,
    Currency::Jpy,
    Currency::Clp,
    Currency::Krw,
    Currency::Pyg,
];

impl Currency {
    /// Lower-case ISO code, as the API shows it.
    pub fn code(self) -> &'static str {
        match self {
            Currency::Usd => "usd",
            Currency::Eur => "eur",
            Currency::Gbp => "gbp",
            Currency::Mxn => "mxn",
            Currency::Brl => "brl",
            Currency::Ars => "ars",
            Currency::Cop => "cop",
            Currency::Pen => "pen",
            Currency::Uyu => "uyu",
            Currency::Cad => "cad",
            Currency::Chf => "chf",
            Currency::Jpy => "jpy",
            Currency::Clp => "clp",
            Currency::Krw => "krw",
            Currency::Pyg => "pyg",
        }
    }

    /// ISO 4217 minor-unit exponent.
    pub fn exponent(self) -> u32 {
        match self {
            Currency::Jpy | Currency::Clp | Currency::Krw | Currency::Pyg => 0,
            _ => 2,
        }
    }

    /// Parses an ISO code in either case.
    pub fn parse(s: &str) -> Result<Currency, MoneyError> {
        ALL.iter()
            .copied()
            .find(|c| c.code().eq_ignore_ascii_case(s))
            .ok_or(MoneyError::UnknownCurrency)
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// Largest amount accepted, in major units (whatever the exponent): keeps
/// every sum of amounts far inside `i64`.
const MAX_MAJOR_UNITS: i64 = 100_000_000;

/// A positive amount of a currency, in minor units.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Money {
    minor: i64,
    currency: Currency,
}

impl Money {
    /// A positive amount no larger than 10^8 major units.
    pub fn new(minor: i64, currency: Currency) -> Result<Money, MoneyError> {
        if minor <= 0 {
            return Err(MoneyError::NotPositive);
        }
        if minor > Self::max_minor(currency) {
            return Err(MoneyError::TooLarge);
        }
        Ok(Money { minor, currency })
    }

    /// The largest amount accepted in `currency`, in minor units.
    pub fn max_minor(currency: Currency) -> i64 {
        MAX_MAJOR_UNITS * 10i64.pow(currency.exponent())
    }

    pub fn minor(self) -> i64 {
        self.minor
    }

    pub fn currency(self) -> Currency {
        self.currency
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn exponents_follow_iso_4217() {
        for (code, exp) in [
            ("USD", 2),
            ("mxn", 2),
            ("BRL", 2),
            ("eur", 2),
            ("JPY", 0),
            ("clp", 0),
        ] {
            assert_eq!(Currency::parse(code).unwrap().exponent(), exp, "{code}");
        }
        assert_eq!(Currency::parse("xyz"), Err(MoneyError::UnknownCurrency));
        assert_eq!(Currency::parse(""), Err(MoneyError::UnknownCurrency));
    }

    #[test]
    fn amounts_are_positive_and_bounded() {
        let usd = Currency::Usd;
        assert_eq!(Money::new(0, usd), Err(MoneyError::NotPositive));
        assert_eq!(Money::new(-5, usd), Err(MoneyError::NotPositive));
        assert!(Money::new(10_000_000_000, usd).is_ok());
        assert_eq!(Money::new(10_000_000_001, usd), Err(MoneyError::TooLarge));
        assert_eq!(
            Money::new(100_000_001, Currency::Jpy),
            Err(MoneyError::TooLarge)
        );
        assert_eq!(Money::new(1500, Currency::Clp).unwrap().minor(), 1500);
    }
}
