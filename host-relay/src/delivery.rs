//! The delivery policy: what the relay tells a sender about each recipient — the project's
//! central promise, so it lives here on its own, apart from sockets and authentication.
//!
//! The rule, in the order it is applied to each recipient:
//!
//! 1. **`delivered`** when a session took the envelope: one of this node's sessions of the
//!    recipient (its queue accepted it), or a session on another node (the broker's receipt
//!    counts a taker beyond this node's own subscription). Never on a guess.
//! 2. **`rejected: queue_overflow`** when the recipient is connected here but every one of its
//!    sessions' queues was full (the recipient is online, so holding it for later would reorder
//!    it after what the recipient is reading now).
//! 3. **`rejected: broker_unavailable`** when the broker could not answer and no local session
//!    took it: the recipient may be online on another node, so the relay neither claims
//!    `offline` nor stores a copy that could arrive out of order.
//! 4. Otherwise nobody is connected: **`stored`** when the mailbox took it durably,
//!    **`rejected: mailbox_full`** when the recipient's quota is reached,
//!    **`rejected: mailbox_unavailable`** when the mailbox failed (the sender's outbox retries),
//!    and **`offline`** when the relay keeps no mailbox (`[mailbox] kind = "none"`).
//!
//! [`decide`] is that rule as a pure function; the rest feeds it.

use bytes::Bytes;
use futures_util::future::{BoxFuture, join_all};
use syncra_core::Confirm;
use syncra_core::UserId;
use syncra_core::carriage::{CARRIAGE_VERSION, Routed};
use syncra_core::error::OpenError;
use syncra_core::mailbox::PutOutcome;
use syncra_core::wire::{ErrorCode, Frame, Outcome, RecipientOutcome, RequestId};

use crate::NodeState;
use crate::limits::SendRefusal;
use crate::router::{Delivery, LocalDelivery, user_topic};
use crate::session::{count_error, error_frame};

/// What routing found out about one recipient before the mailbox is asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// A session (here or on another node) took it.
    Taken,
    /// Connected here, but every session's queue was full.
    QueuesFull,
    /// The broker could not answer, and no local session took it.
    BrokerDown,
    /// Nobody is connected anywhere.
    Nobody,
}

/// The routing part of the rule: local sessions, then the broker's answer (if it was asked).
/// `remote` is `None` when the broker was not asked (a node alone on its broker), else how
/// many other nodes took it or `Err` if the broker failed.
pub fn reach(local: LocalDelivery, remote: Option<Result<u64, ()>>) -> Reach {
    match remote {
        _ if local.taken > 0 => Reach::Taken,
        Some(Ok(n)) if n > 0 => Reach::Taken,
        _ if local.full > 0 => Reach::QueuesFull,
        Some(Err(())) => Reach::BrokerDown,
        _ => Reach::Nobody,
    }
}

/// The whole rule: the outcome from the reach and, for nobody, from the mailbox's answer
/// (`None`: the relay keeps no mailbox).
pub fn decide(reach: Reach, held: Option<Result<PutOutcome, ()>>) -> Outcome {
    match (reach, held) {
        (Reach::Taken, _) => Outcome::Delivered,
        (Reach::QueuesFull, _) => Outcome::Rejected(ErrorCode::QueueOverflow),
        (Reach::BrokerDown, _) => Outcome::Rejected(ErrorCode::BrokerUnavailable),
        (Reach::Nobody, None) => Outcome::Offline,
        (Reach::Nobody, Some(Ok(PutOutcome::Stored(_)))) => Outcome::Stored,
        (Reach::Nobody, Some(Ok(PutOutcome::Full))) => Outcome::Rejected(ErrorCode::MailboxFull),
        (Reach::Nobody, Some(Err(()))) => Outcome::Rejected(ErrorCode::MailboxUnavailable),
    }
}

/// Routes one envelope to every recipient and builds the send result.
pub async fn send(
    state: &NodeState,
    user: UserId,
    request_id: RequestId,
    envelope: Bytes,
) -> Bytes {
    let header = match admit_send(state, &user, request_id, &envelope) {
        Ok(h) => h,
        Err(refusal) => return refusal,
    };
    if let Routed::Mls(carriage) = &header {
        // One commit per epoch, members only, the current epoch only (groups.rs).
        if let Err((code, why)) = crate::groups::admit(state, user, carriage).await {
            count_error(state, code);
            return error_frame(request_id, code, why);
        }
    }
    let recipients = header.recipients();
    if !state.hooks.is_empty() {
        let recipients = recipients.clone();
        let size = envelope.len();
        let admitted = crate::plugins::admit(&state.hooks, move |h| {
            h.on_envelope(&user, &recipients, size)
        })
        .await;
        if let Err(why) = admitted {
            count_error(state, ErrorCode::HookDenied);
            return error_frame(request_id, ErrorCode::HookDenied, why);
        }
    }
    // Encoded once: the frame every local session gets and the broker payload share bytes.
    let delivery = state.router.delivery(&envelope, !state.broker.alone());
    let outcomes = if let [only] = recipients.as_slice() {
        vec![deliver_to(state, *only, &delivery, &envelope).await]
    } else {
        join_all(
            recipients
                .iter()
                .map(|r| deliver_to(state, *r, &delivery, &envelope)),
        )
        .await
    };
    Frame::SendResult {
        request_id,
        message_id: header.message_id(),
        outcomes,
    }
    .encode()
}

/// The checks every send passes before routing: a well-formed header (a sealed envelope's or
/// an MLS carriage's), the recipient cap, and the sender's send and fan-out budgets. Returns
/// the header, or the error frame to answer with.
fn admit_send(
    state: &NodeState,
    user: &UserId,
    request_id: RequestId,
    envelope: &[u8],
) -> Result<Routed, Bytes> {
    let max_recipients = state.config.limits.max_recipients_per_send;
    let (code, message) = match Routed::parse(envelope) {
        Err(e) => (
            match e {
                OpenError::TooManyRecipients(_) => ErrorCode::TooManyRecipients,
                _ => ErrorCode::BadEnvelope,
            },
            e.to_string(),
        ),
        Ok(h) if h.recipient_count() > max_recipients => (
            ErrorCode::TooManyRecipients,
            format!(
                "{} recipients in one send; this relay allows at most {max_recipients}",
                h.recipient_count()
            ),
        ),
        Ok(h) => match state
            .limits
            .user_send(user, envelope.len(), h.recipient_count())
        {
            Ok(()) => return Ok(h),
            Err(SendRefusal::Rate) => (
                ErrorCode::RateLimited,
                "you are sending too fast; slow down".to_owned(),
            ),
            Err(SendRefusal::Fanout) => (
                ErrorCode::RateLimited,
                format!(
                    "you are sending too much data (message size × recipients); this relay \
                     allows {} bytes per second with bursts of {}; slow down",
                    state.config.limits.fanout_bytes_per_second_per_user,
                    state.config.limits.fanout_burst_bytes_per_user
                ),
            ),
            Err(SendRefusal::FanoutTooLarge) => (
                ErrorCode::TooManyRecipients,
                format!(
                    "this message of {} bytes to {} recipients would cost {} bytes of fan-out, \
                     more than the {} this relay allows at once; send it to fewer recipients",
                    envelope.len(),
                    h.recipient_count(),
                    envelope.len() * h.recipient_count(),
                    state.config.limits.fanout_burst_bytes_per_user
                ),
            ),
        },
    };
    count_error(state, code);
    Err(error_frame(request_id, code, message))
}

/// A send routed on the spot, without the boxed future a request otherwise costs: for when
/// this node is alone on its broker (routing is local deliveries only) and no relay hook is
/// configured. Every recipient a local session took is answered at once; if any recipient
/// has nobody connected and the relay keeps a mailbox, the answer needs the mailbox, and the
/// future that asks it (after the local deliveries, which are done here, in order) is returned
/// instead.
pub fn send_locally<'a>(
    state: &'a NodeState,
    user: UserId,
    request_id: RequestId,
    envelope: &Bytes,
) -> Result<Bytes, BoxFuture<'a, Option<Bytes>>> {
    if envelope.first() == Some(&CARRIAGE_VERSION) {
        // An MLS carriage asks the store about its group first.
        let envelope = envelope.clone();
        return Err(Box::pin(async move {
            Some(send(state, user, request_id, envelope).await)
        }));
    }
    let header = match admit_send(state, &user, request_id, envelope) {
        Ok(h) => h,
        Err(refusal) => return Ok(refusal),
    };
    let message_id = header.message_id();
    let delivery = state.router.delivery(envelope, false);
    let reaches: Vec<(UserId, Reach)> = header
        .recipients()
        .into_iter()
        .map(|r| {
            let local = state.router.deliver_local(&r, &delivery.frame);
            (r, reach(local, None))
        })
        .collect();
    let holds = state.mailbox.stores() && reaches.iter().any(|(_, r)| *r == Reach::Nobody);
    if !holds {
        let outcomes = reaches
            .into_iter()
            .map(|(id, r)| counted(state, id, decide(r, None)))
            .collect();
        return Ok(Frame::SendResult {
            request_id,
            message_id,
            outcomes,
        }
        .encode());
    }
    let envelope = envelope.clone();
    Err(Box::pin(async move {
        let mut outcomes = Vec::with_capacity(reaches.len());
        for (id, r) in reaches {
            outcomes.push(counted(state, id, settle(state, id, r, &envelope).await));
        }
        Some(
            Frame::SendResult {
                request_id,
                message_id,
                outcomes,
            }
            .encode(),
        )
    }))
}

/// The outcome for a recipient whose reach is known: for nobody, the mailbox decides.
async fn settle(state: &NodeState, recipient: UserId, reach: Reach, envelope: &Bytes) -> Outcome {
    if reach != Reach::Nobody || !state.mailbox.stores() {
        return decide(reach, None);
    }
    let held = match state
        .mailbox
        .put(&recipient, envelope.clone(), syncra_core::now_ms())
        .await
    {
        Ok(put) => Ok(put),
        Err(e) => {
            state.metrics.mailbox_failure(&e);
            Err(())
        }
    };
    decide(reach, Some(held))
}

/// Counts an outcome in the metrics and pairs it with its recipient.
fn counted(state: &NodeState, recipient: UserId, outcome: Outcome) -> RecipientOutcome {
    let hot = &state.metrics.hot;
    match outcome {
        Outcome::Delivered => hot.delivered.inc(),
        Outcome::Offline => hot.offline.inc(),
        Outcome::Stored => hot.stored.inc(),
        Outcome::Rejected(_) => hot.rejected.inc(),
    };
    RecipientOutcome {
        user_id: recipient,
        outcome,
    }
}

/// Delivers to one recipient: to this node's sessions of theirs first, then through the broker
/// to other nodes, learning from the broker only as much as the outcome needs, then (nobody
/// connected) to the mailbox.
async fn deliver_to(
    state: &NodeState,
    recipient: UserId,
    delivery: &Delivery,
    envelope: &Bytes,
) -> RecipientOutcome {
    let local = state.router.deliver_local(&recipient, &delivery.frame);
    let remote = if state.broker.alone() {
        // No other node exists: this node's sessions are all there is.
        None
    } else if local.taken > 0 {
        // Delivered already; other nodes only need a copy for the recipient's other devices,
        // and whether one took it changes nothing in the answer. A broker failure here is
        // logged by the broker and does not turn a delivery into an error.
        let _ = state
            .broker
            .publish_confirm(
                &user_topic(&recipient),
                delivery.payload.clone(),
                Confirm::Nothing,
            )
            .await;
        Some(Ok(0))
    } else {
        let answer = state
            .broker
            .publish_confirm(
                &user_topic(&recipient),
                delivery.payload.clone(),
                Confirm::Any,
            )
            .await;
        // A broker that counts our own subscription would otherwise make us claim a delivery
        // on the strength of our own echo.
        let own =
            u64::from(state.broker.counts_own_subscription() && state.router.holds(&recipient));
        Some(
            answer
                .map(|receipt| receipt.receivers.unwrap_or(0).saturating_sub(own))
                .map_err(|_| ()),
        )
    };
    let outcome = settle(state, recipient, reach(local, remote), envelope).await;
    counted(state, recipient, outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(taken: usize, full: usize) -> LocalDelivery {
        LocalDelivery { taken, full }
    }

    /// Local takers, the broker's answer, the mailbox's answer, and the outcome they give.
    type Case = (
        LocalDelivery,
        Option<Result<u64, ()>>,
        Option<Result<PutOutcome, ()>>,
        Outcome,
    );

    #[test]
    fn the_delivery_rule() {
        use ErrorCode::*;
        use Outcome::*;
        let stored = Some(Ok(PutOutcome::Stored(1)));
        let cases: &[Case] = &[
            // Taken here or elsewhere: delivered, whatever the broker or mailbox would say.
            (local(1, 0), None, None, Delivered),
            (local(1, 1), Some(Err(())), stored, Delivered),
            (local(0, 0), Some(Ok(2)), None, Delivered),
            // Online but slow: never stored behind what it is reading now.
            (local(0, 2), None, stored, Rejected(QueueOverflow)),
            (local(0, 1), Some(Ok(0)), stored, Rejected(QueueOverflow)),
            // The broker failed: maybe online elsewhere, so neither offline nor stored.
            (
                local(0, 0),
                Some(Err(())),
                stored,
                Rejected(BrokerUnavailable),
            ),
            // Nobody: the mailbox decides.
            (local(0, 0), None, None, Offline),
            (local(0, 0), Some(Ok(0)), None, Offline),
            (local(0, 0), Some(Ok(0)), stored, Stored),
            (
                local(0, 0),
                None,
                Some(Ok(PutOutcome::Full)),
                Rejected(MailboxFull),
            ),
            (
                local(0, 0),
                None,
                Some(Err(())),
                Rejected(MailboxUnavailable),
            ),
        ];
        for (i, (l, remote, held, want)) in cases.iter().enumerate() {
            let got = decide(reach(*l, *remote), *held);
            assert_eq!(got, *want, "case {i}: {l:?} {remote:?} {held:?}");
        }
    }
}
