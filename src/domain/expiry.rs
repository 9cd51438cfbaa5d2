//! Card expiry (month and four-digit year), validated against a "today"
//! the caller passes in, so this module never reads the clock.
//!
//! A card is valid through the last day of its expiry month: `03/2030` is
//! accepted for any date in March 2030 and rejected from April 2030 on.
//! Two-digit years are rejected rather than guessed: `30` could mean 2030 to
//! one client and a typo to another, and APIs in this space take four digits.

use std::cmp::Ordering;
use std::fmt;

use serde::Serialize;

/// Earliest year accepted.
pub const MIN_YEAR: i64 = 2000;
/// How many years ahead of today an expiry year may be. Networks issue cards
/// valid for at most a few years; 50 leaves room without accepting typos like
/// 3030.
pub const MAX_YEARS_AHEAD: i64 = 50;

/// Why an expiry was rejected. Messages are safe to return to clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExpiryError {
    /// Month outside 1-12.
    #[error("expiry month must be between 1 and 12")]
    InvalidMonth,
    /// A year in 0-99: we need all four digits.
    #[error("expiry year must have four digits (for example 2030, not 30)")]
    TwoDigitYear,
    /// A year before 2000 or more than 50 years ahead.
    #[error("expiry year must be between 2000 and {max}")]
    InvalidYear {
        /// The latest year accepted today.
        max: i64,
    },
    /// The expiry month is before the current month.
    #[error("card has expired")]
    Expired,
}

impl ExpiryError {
    /// A stable machine-readable code, following the usual payment API names.
    pub fn code(self) -> &'static str {
        match self {
            ExpiryError::InvalidMonth => "invalid_expiry_month",
            ExpiryError::TwoDigitYear | ExpiryError::InvalidYear { .. } => "invalid_expiry_year",
            ExpiryError::Expired => "expired_card",
        }
    }
}

/// A card's expiry month. Ordered chronologically.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Expiry {
    month: u8,
    year: u16,
}

impl Expiry {
    /// Validates an expiry typed by a client, as of `today` = (year, month 1-12).
    ///
    /// Checks in order: month 1-12, four-digit year, year in
    /// 2000..=today+50, not before today's month.
    pub fn new(month: i64, year: i64, today: (i32, u8)) -> Result<Expiry, ExpiryError> {
        let (today_year, today_month) = (i64::from(today.0), i64::from(today.1));
        let max = today_year.saturating_add(MAX_YEARS_AHEAD);
        let expiry = Self::checked(month, year, max)?;
        if (year, month) < (today_year, today_month) {
            return Err(ExpiryError::Expired);
        }
        Ok(expiry)
    }

    /// Rebuilds an expiry read back from storage: checks the shape (month
    /// 1-12, year 2000-9999) but not the date, since saved cards do expire.
    pub fn from_stored(month: i64, year: i64) -> Result<Expiry, ExpiryError> {
        Self::checked(month, year, 9999)
    }

    fn checked(month: i64, year: i64, max_year: i64) -> Result<Expiry, ExpiryError> {
        let month = u8::try_from(month)
            .ok()
            .filter(|m| (1..=12).contains(m))
            .ok_or(ExpiryError::InvalidMonth)?;
        if (0..=99).contains(&year) {
            return Err(ExpiryError::TwoDigitYear);
        }
        let year = u16::try_from(year)
            .ok()
            .filter(|y| (MIN_YEAR..=max_year).contains(&i64::from(*y)))
            .ok_or(ExpiryError::InvalidYear { max: max_year })?;
        Ok(Expiry { month, year })
    }

    /// Month, 1-12.
    pub fn month(self) -> u8 {
        self.month
    }

    /// Four-digit year.
    pub fn year(self) -> u16 {
        self.year
    }

    /// Whether the card has expired as of `today` = (year, month): true from
    /// the month after the expiry month.
    pub fn is_expired(self, today: (i32, u8)) -> bool {
        (i32::from(self.year), self.month) < today
    }
}

impl Ord for Expiry {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.year, self.month).cmp(&(other.year, other.month))
    }
}

impl PartialOrd for Expiry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Expiry {
    /// `MM/YYYY`, e.g. `03/2030`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02}/{}", self.month, self.year)
    }
}

/// The (year, month) of a date, in the shape [`Expiry::new`] takes.
pub fn year_month(date: time::Date) -> (i32, u8) {
    (date.year(), u8::from(date.month()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use proptest::prelude::*;

    const TODAY: (i32, u8) = (2025, 6);

    #[test]
    fn months() {
        assert_eq!(Expiry::new(0, 2030, TODAY), Err(ExpiryError::InvalidMonth));
        assert_eq!(Expiry::new(13, 2030, TODAY), Err(ExpiryError::InvalidMonth));
        assert_eq!(Expiry::new(-1, 2030, TODAY), Err(ExpiryError::InvalidMonth));
        assert_eq!(Expiry::new(1, 2030, TODAY).unwrap().month(), 1);
        assert_eq!(Expiry::new(12, 2030, TODAY).unwrap().month(), 12);
    }

    #[test]
    fn years() {
        assert_eq!(Expiry::new(1, 30, TODAY), Err(ExpiryError::TwoDigitYear));
        assert_eq!(Expiry::new(1, 0, TODAY), Err(ExpiryError::TwoDigitYear));
        assert_eq!(
            Expiry::new(1, 1999, TODAY),
            Err(ExpiryError::InvalidYear { max: 2075 })
        );
        assert_eq!(
            Expiry::new(1, 2076, TODAY),
            Err(ExpiryError::InvalidYear { max: 2075 })
        );
        assert_eq!(
            Expiry::new(1, i64::MAX, TODAY),
            Err(ExpiryError::InvalidYear { max: 2075 })
        );
        assert_eq!(Expiry::new(1, 2075, TODAY).unwrap().year(), 2075);
    }

    #[test]
    fn past_and_present() {
        assert_eq!(Expiry::new(5, 2025, TODAY), Err(ExpiryError::Expired));
        assert_eq!(Expiry::new(12, 2024, TODAY), Err(ExpiryError::Expired));
        let current = Expiry::new(6, 2025, TODAY).unwrap();
        assert!(!current.is_expired(TODAY));
        assert!(current.is_expired((2025, 7)));
        assert!(current.is_expired((2026, 1)));
        assert!(Expiry::new(7, 2025, TODAY).is_ok());
        assert!(Expiry::new(1, 2026, TODAY).is_ok());
    }

    #[test]
    fn stored_expiries_may_be_past() {
        let old = Expiry::from_stored(3, 2001).unwrap();
        assert!(old.is_expired(TODAY));
        assert_eq!(old.to_string(), "03/2001");
        assert_eq!(Expiry::from_stored(3, 25), Err(ExpiryError::TwoDigitYear));
    }

    #[test]
    fn messages_and_codes() {
        assert_eq!(
            ExpiryError::InvalidMonth.to_string(),
            "expiry month must be between 1 and 12"
        );
        assert_eq!(
            ExpiryError::InvalidYear { max: 2075 }.to_string(),
            "expiry year must be between 2000 and 2075"
        );
        assert_eq!(ExpiryError::Expired.code(), "expired_card");
        assert_eq!(
            serde_json::to_value(Expiry::new(6, 2025, TODAY).unwrap()).unwrap(),
            serde_json::json!({"month": 6, "year": 2025})
        );
        assert_eq!(year_month(time::macros::date!(2025 - 06 - 30)), (2025, 6));
    }

    proptest! {
        #[test]
        fn accepted_iff_in_window(
            month in 1i64..=12,
            year in 2000i64..=2100,
            today_year in 2000i32..=2060,
            today_month in 1u8..=12,
        ) {
            let today = (today_year, today_month);
            let result = Expiry::new(month, year, today);
            let max = i64::from(today_year) + MAX_YEARS_AHEAD;
            if year > max {
                prop_assert_eq!(result, Err(ExpiryError::InvalidYear { max }));
            } else if (year, month) >= (i64::from(today_year), i64::from(today_month)) {
                let e = result.unwrap();
                prop_assert!(!e.is_expired(today));
                prop_assert_eq!((i64::from(e.month()), i64::from(e.year())), (month, year));
            } else {
                prop_assert_eq!(result, Err(ExpiryError::Expired));
            }
        }

        #[test]
        fn ordering_is_chronological(
            a in (1i64..=12, 2000i64..=2100),
            b in (1i64..=12, 2000i64..=2100),
        ) {
            let ea = Expiry::from_stored(a.0, a.1).unwrap();
            let eb = Expiry::from_stored(b.0, b.1).unwrap();
            prop_assert_eq!(ea.cmp(&eb), (a.1, a.0).cmp(&(b.1, b.0)));
        }
    }
}
