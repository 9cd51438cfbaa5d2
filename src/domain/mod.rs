//! Domain types: pure values parsed once at the edge ("parse, don't
//! validate") and trusted everywhere after. No IO and no clock reads: code
//! that needs "today" takes it as an argument.
//!
//! - [`Pan`]: the card number as a secret (no `Display`/`Serialize`, redacted
//!   `Debug`, zeroized, constant-time `==`); [`Bin`] and [`Last4`] are the
//!   non-secret parts that may be stored and shown.
//! - [`Brand`]: network detection from IIN ranges, security-code layout,
//!   funding.
//! - [`Expiry`]: month/year validated against a caller-supplied date.
//! - [`ids`]: prefixed random ids and API key secrets.
//! - [`Money`]/[`Currency`]: amounts in ISO 4217 minor units.
//! - [`WebOrigin`]: a browser origin (hosted pages: who may embed them).

pub mod brand;
pub mod expiry;
pub mod ids;
pub mod money;
pub mod origin;
pub mod pan;

pub use brand::{Brand, CodeLocation, Funding, SecurityCode, UnknownName};
pub use expiry::{year_month, Expiry, ExpiryError};
pub use ids::{is_valid_id, is_valid_secret, new_id, random_secret};
pub use money::{Currency, Money, MoneyError};
pub use origin::{OriginError, WebOrigin};
pub use pan::{contains_pan_like, Bin, CardMetadataError, Last4, Pan, PanError};
