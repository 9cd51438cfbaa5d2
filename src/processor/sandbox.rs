//! The deterministic sandbox processor. The card number decides the outcome;
//! any other valid number is approved. Keep this table and README.md's in
//! step.
//!
//! | number              | outcome                                               |
//! |---------------------|-------------------------------------------------------|
//! | 4242424242424242    | approved                                              |
//! | 4000000000009995    | declined, `insufficient_funds`                        |
//! | 4000000000000002    | declined, `do_not_honor`                              |
//! | 4000000000000069    | declined, `card_expired`                              |
//! | 4000000000000101    | stored-card charge without CVV: `provide_cvc` pending |
//! | 4000000000000259    | processor timeout: outcome unknown; approved when the |
//! |                     | charge is reconciled (lookup) by the same process     |
//! | 4000000000000119    | processor error: fails, nothing charged               |
//! | 4000000000000275    | approved; each refund's first call times out (the     |
//! |                     | refund is made), a repeat of its key succeeds         |

use std::collections::VecDeque;
use std::sync::Mutex;

use async_trait::async_trait;

use super::{AuthOutcome, AuthorizeRequest, Processor, ProcessorError, ProcessorResult};
use crate::domain::{new_id, Money};

pub const INSUFFICIENT_FUNDS: &str = "4000000000009995";
pub const DO_NOT_HONOR: &str = "4000000000000002";
pub const CARD_EXPIRED: &str = "4000000000000069";
pub const REQUIRES_CVC: &str = "4000000000000101";
pub const TIMEOUT: &str = "4000000000000259";
pub const PROCESSOR_ERROR: &str = "4000000000000119";
pub const REFUND_TIMEOUT: &str = "4000000000000275";

/// How many withheld answers the sandbox remembers for lookups.
const REMEMBERED: usize = 10_000;

/// See the module documentation for the table of test cards.
#[derive(Debug, Default)]
pub struct SandboxProcessor {
    /// Authorizations whose answer was withheld (the timeout card), with the
    /// outcome a lookup reveals, oldest first. In memory only: after a
    /// restart the sandbox has "never received" them.
    withheld: Mutex<VecDeque<(String, AuthOutcome)>>,
    /// Authorizations (their references) whose refunds time out, and the
    /// refunds (their keys) made under them, oldest first; in memory only.
    lost_refunds: Mutex<(VecDeque<String>, VecDeque<String>)>,
}

/// Appends to a list that keeps the last [`REMEMBERED`].
fn remember<T>(list: &mut VecDeque<T>, item: T) {
    if list.len() == REMEMBERED {
        list.pop_front();
    }
    list.push_back(item);
}

fn declined(code: &str, message: &str) -> AuthOutcome {
    AuthOutcome::Declined {
        code: code.to_string(),
        message: message.to_string(),
    }
}

#[async_trait]
impl Processor for SandboxProcessor {
    fn name(&self) -> &'static str {
        "sandbox"
    }

    async fn authorize(&self, req: &AuthorizeRequest<'_>) -> ProcessorResult<AuthOutcome> {
        let number = req.card.pan.digits();
        let outcome = match number {
            INSUFFICIENT_FUNDS => declined("insufficient_funds", "the card has insufficient funds"),
            DO_NOT_HONOR => declined("do_not_honor", "the issuer declined the card"),
            CARD_EXPIRED => declined("card_expired", "the card has expired"),
            REQUIRES_CVC if req.card.cvc.is_none() => AuthOutcome::CvcRequired,
            TIMEOUT => {
                // The authorization went through; only its answer is lost.
                let mut withheld = self.withheld.lock().unwrap_or_else(|e| e.into_inner());
                remember(
                    &mut withheld,
                    (
                        req.reference.to_string(),
                        AuthOutcome::Approved {
                            reference: new_id("sbx"),
                        },
                    ),
                );
                return Err(ProcessorError::Unknown(
                    "sandbox: simulated processor timeout".to_string(),
                ));
            }
            PROCESSOR_ERROR => {
                return Err(ProcessorError::Failed(
                    "sandbox: simulated processor error".to_string(),
                ))
            }
            REFUND_TIMEOUT => {
                let reference = new_id("sbx");
                let mut lost = self.lost_refunds.lock().unwrap_or_else(|e| e.into_inner());
                remember(&mut lost.0, reference.clone());
                AuthOutcome::Approved { reference }
            }
            _ => AuthOutcome::Approved {
                reference: new_id("sbx"),
            },
        };
        Ok(outcome)
    }

    async fn capture(&self, _reference: &str, _key: &str, _amount: Money) -> ProcessorResult<()> {
        Ok(())
    }

    async fn refund(&self, reference: &str, key: &str, _amount: Money) -> ProcessorResult<()> {
        let mut lost = self.lost_refunds.lock().unwrap_or_else(|e| e.into_inner());
        let (timeouts, made) = &mut *lost;
        if timeouts.iter().any(|r| r == reference) && !made.iter().any(|k| k == key) {
            // Made, but its answer is lost; a repeat of the key is answered.
            remember(made, key.to_string());
            return Err(ProcessorError::Unknown(
                "sandbox: simulated refund timeout".to_string(),
            ));
        }
        Ok(())
    }

    async fn void(&self, _reference: &str, _key: &str) -> ProcessorResult<()> {
        Ok(())
    }

    async fn lookup(&self, reference: &str) -> ProcessorResult<Option<AuthOutcome>> {
        let withheld = self.withheld.lock().unwrap_or_else(|e| e.into_inner());
        Ok(withheld
            .iter()
            .find(|(r, _)| r == reference)
            .map(|(_, outcome)| outcome.clone()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::domain::{Currency, Pan};
    use crate::processor::PaymentCard;

    async fn run_on(
        sandbox: &SandboxProcessor,
        number: &str,
        cvc: Option<&str>,
        reference: &str,
    ) -> ProcessorResult<AuthOutcome> {
        let pan = Pan::parse(number).unwrap();
        sandbox
            .authorize(&AuthorizeRequest {
                card: PaymentCard {
                    pan: &pan,
                    exp_month: 12,
                    exp_year: 2031,
                    holder_name: None,
                    cvc,
                },
                amount: Some(Money::new(1000, Currency::Usd).unwrap()),
                capture: true,
                stored_credential: true,
                reference,
            })
            .await
    }

    async fn run(number: &str, cvc: Option<&str>) -> ProcessorResult<AuthOutcome> {
        run_on(&SandboxProcessor::default(), number, cvc, "ch_test").await
    }

    #[tokio::test]
    async fn table_of_test_cards() {
        assert!(matches!(
            run("4242424242424242", None).await,
            Ok(AuthOutcome::Approved { .. })
        ));
        assert!(matches!(
            run("5555555555554444", None).await,
            Ok(AuthOutcome::Approved { .. })
        ));
        for (number, code) in [
            (INSUFFICIENT_FUNDS, "insufficient_funds"),
            (DO_NOT_HONOR, "do_not_honor"),
            (CARD_EXPIRED, "card_expired"),
        ] {
            match run(number, None).await {
                Ok(AuthOutcome::Declined { code: c, .. }) => assert_eq!(c, code),
                other => panic!("{number}: {other:?}"),
            }
        }
        assert_eq!(run(REQUIRES_CVC, None).await, Ok(AuthOutcome::CvcRequired));
        assert!(matches!(
            run(REQUIRES_CVC, Some("123")).await,
            Ok(AuthOutcome::Approved { .. })
        ));
        assert!(matches!(
            run(TIMEOUT, None).await,
            Err(ProcessorError::Unknown(_))
        ));
        assert!(matches!(
            run(PROCESSOR_ERROR, None).await,
            Err(ProcessorError::Failed(_))
        ));
    }

    #[tokio::test]
    async fn a_withheld_answer_is_found_by_lookup() {
        let sandbox = SandboxProcessor::default();
        let lost = run_on(&sandbox, TIMEOUT, None, "ch_lost").await;
        assert!(matches!(lost, Err(ProcessorError::Unknown(_))));
        assert!(matches!(
            sandbox.lookup("ch_lost").await,
            Ok(Some(AuthOutcome::Approved { .. }))
        ));
        assert_eq!(sandbox.lookup("ch_never_sent").await, Ok(None));
    }

    /// Refunds under an authorization of the refund-timeout card lose the
    /// first answer of each refund; a repeat of its key is answered. Other
    /// authorizations' refunds are answered at once.
    #[tokio::test]
    async fn refund_timeout_card_loses_each_refunds_first_answer() {
        let sandbox = SandboxProcessor::default();
        let money = Money::new(100, Currency::Usd).unwrap();
        let Ok(AuthOutcome::Approved { reference }) =
            run_on(&sandbox, REFUND_TIMEOUT, None, "ch_slow").await
        else {
            panic!("the refund-timeout card is approved");
        };
        for key in ["re_1", "re_2"] {
            assert!(matches!(
                sandbox.refund(&reference, key, money).await,
                Err(ProcessorError::Unknown(_))
            ));
            assert_eq!(sandbox.refund(&reference, key, money).await, Ok(()));
        }
        let Ok(AuthOutcome::Approved { reference: plain }) =
            run_on(&sandbox, "4242424242424242", None, "ch_plain").await
        else {
            panic!("approved");
        };
        assert_eq!(sandbox.refund(&plain, "re_3", money).await, Ok(()));
    }
}
