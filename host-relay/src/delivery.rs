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
use smallvec::{SmallVec, smallvec};
use syncra_core::UserId;
use syncra_core::carriage::Routed;
use syncra_core::error::OpenError;
use syncra_core::mailbox::PutOutcome;
use syncra_core::wire::{ErrorCode, Outcome, RecipientOutcome, RequestId, encode_send_result};
use tokio::sync::oneshot;

use crate::NodeState;
use crate::limits::SendRefusal;
use crate::links::Taken;
use crate::router::LocalDelivery;
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

/// Routes one envelope to every recipient and builds the send result: the path with relay
/// hooks (asked before routing).
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
    send_admitted(state, user, request_id, header, envelope).await
}

/// [`send`] once the header passed [`admit_send`].
async fn send_admitted(
    state: &NodeState,
    user: UserId,
    request_id: RequestId,
    header: Routed,
    envelope: Bytes,
) -> Bytes {
    if let Routed::Mls(carriage) = &header {
        // One commit per epoch, members only, the current epoch only (groups.rs).
        if let Err((code, why)) = crate::groups::admit(state, user, carriage).await {
            count_error(state, code);
            return error_frame(request_id, code, why);
        }
    }
    if !state.hooks.is_empty() {
        let recipients = header.recipients();
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
    match route(state, request_id, header, &envelope) {
        Ok(answer) => answer,
        Err(later) => later.await.unwrap_or_default(),
    }
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

/// A send without relay hooks: admitted, delivered to local sessions and handed to the broker
/// for other nodes now, in this call (so a sender's messages keep their order). Answered on
/// the spot, without the boxed future a request otherwise costs, when every recipient's
/// outcome is already known (taken here, or nobody and no mailbox); otherwise the future that
/// waits for the other nodes' answers and the mailbox is returned, with whether the send is
/// routed already (`false`) or is still to be checked and routed in that future (`true`: an
/// MLS carriage whose group must be read from the store, or a commit) — then the session reads
/// its next frame only once the future is done, so order is kept.
#[allow(clippy::type_complexity)] // A future and one flag; a named type would hide that.
pub fn send_locally<'a>(
    state: &'a NodeState,
    user: UserId,
    request_id: RequestId,
    envelope: &Bytes,
) -> Result<Bytes, (BoxFuture<'a, Option<Bytes>>, bool)> {
    let header = match admit_send(state, &user, request_id, envelope) {
        Ok(header) => header,
        Err(refusal) => return Ok(refusal),
    };
    if let Routed::Mls(carriage) = &header {
        // An MLS carriage is checked against its group (groups.rs): at once when this node
        // knows it, else after asking the store.
        match crate::groups::admit_known(state, user, carriage) {
            Some(Ok(())) => {}
            Some(Err((code, why))) => {
                count_error(state, code);
                return Ok(error_frame(request_id, code, why));
            }
            None => {
                let envelope = envelope.clone();
                return Err((
                    Box::pin(async move {
                        Some(send_admitted(state, user, request_id, header, envelope).await)
                    }),
                    true,
                ));
            }
        }
    }
    route(state, request_id, header, envelope).map_err(|routed| (routed, false))
}

/// What other nodes did with one recipient's delivery, once local sessions were offered it.
#[derive(Debug)]
enum Remote {
    /// Known without waiting (`None`: the node is alone on its broker; `Some(Err)`: unknown
    /// because the node cannot trust its presence table).
    Known(Option<Result<u64, ()>>),
    /// Queued for these nodes; their answers come here.
    Asked(SmallVec<[oneshot::Receiver<Taken>; 1]>),
}

/// Delivers to every recipient's local sessions, hands the payloads for other nodes to the
/// broker, and answers: at once when no answer is awaited, or with the future that awaits them.
fn route<'a>(
    state: &'a NodeState,
    request_id: RequestId,
    header: Routed,
    envelope: &Bytes,
) -> Result<Bytes, BoxFuture<'a, Option<Bytes>>> {
    let message_id = header.message_id();
    // Encoded once: the frame every local session gets and every broker payload carries.
    let frame = state.router.deliver_frame(envelope);
    // Inline for the usual one recipient: routing allocates nothing per recipient it does not
    // have to (docs/BENCHMARKS.md, allocations per message).
    let mut plans: SmallVec<[(UserId, LocalDelivery, Remote); 1]> = header
        .recipient_ids()
        .map(|r| {
            let local = state.router.deliver_local(&r, &frame);
            (r, local, remote(state, &r, local, &frame))
        })
        .collect();
    let waits = |(_, local, remote): &(UserId, LocalDelivery, Remote)| match remote {
        Remote::Asked(_) => true,
        Remote::Known(known) => state.mailbox.stores() && reach(*local, *known) == Reach::Nobody,
    };
    if !plans.iter().any(waits) {
        let outcomes: SmallVec<[RecipientOutcome; 1]> = plans
            .into_iter()
            .map(|(id, local, remote)| {
                let known = match remote {
                    Remote::Known(known) => known,
                    Remote::Asked(_) => None,
                };
                counted(state, id, decide(reach(local, known), None))
            })
            .collect();
        return Ok(encode_send_result(request_id, &message_id, &outcomes));
    }
    let envelope = envelope.clone();
    Err(Box::pin(async move {
        let outcomes: SmallVec<[RecipientOutcome; 1]> = if plans.len() == 1 {
            let (id, local, remote) = plans.swap_remove(0);
            smallvec![outcome(state, id, local, remote, &envelope).await]
        } else {
            join_all(
                plans
                    .into_iter()
                    .map(|(id, local, remote)| outcome(state, id, local, remote, &envelope)),
            )
            .await
            .into()
        };
        Some(encode_send_result(request_id, &message_id, &outcomes))
    }))
}

/// Where other nodes come in for one recipient: the delivery is queued (in send order) for
/// the nodes the presence table names, and for no other, so same-node traffic never touches
/// the broker.
fn remote(state: &NodeState, recipient: &UserId, local: LocalDelivery, frame: &Bytes) -> Remote {
    if state.broker.alone() {
        // No other node exists: this node's sessions are all there is.
        return Remote::Known(None);
    }
    let Some(nodes) = state.presence.others(recipient) else {
        // Nobody else holds the recipient, as far as a table that has kept up knows; a table
        // that may have missed announcements (the broker failed) cannot say "nobody".
        return Remote::Known(Some(if local.taken > 0 || state.presence.trusted() {
            Ok(0)
        } else {
            Err(())
        }));
    };
    // Delivered already, or not: either way the other nodes get their copy; their answer is
    // only needed when no local session took it.
    let answer = local.taken == 0;
    let asked: SmallVec<_> = nodes
        .into_iter()
        .filter_map(|node| state.links.send(node, *recipient, frame.clone(), answer))
        .collect();
    if answer {
        Remote::Asked(asked)
    } else {
        Remote::Known(Some(Ok(0)))
    }
}

/// How many of the asked nodes took it; `Err` if none did and one could not say.
async fn answers(asked: SmallVec<[oneshot::Receiver<Taken>; 1]>) -> Result<u64, ()> {
    // Every answer channel is settled or dropped within `links::ANSWER_TIMEOUT` (the links
    // sweep the batches that were not answered in time), so this needs no timer of its own.
    let wait = |rx: oneshot::Receiver<Taken>| async move { rx.await.unwrap_or(Err(())) };
    let answers: SmallVec<[Taken; 1]> = if asked.len() == 1 {
        let mut asked = asked;
        smallvec![wait(asked.remove(0)).await]
    } else {
        join_all(asked.into_iter().map(wait)).await.into()
    };
    let taken = answers.iter().filter(|a| matches!(a, Ok(true))).count() as u64;
    if taken == 0 && answers.iter().any(Result::is_err) {
        Err(())
    } else {
        Ok(taken)
    }
}

/// The outcome for one recipient once the other nodes answered.
async fn outcome(
    state: &NodeState,
    recipient: UserId,
    local: LocalDelivery,
    remote: Remote,
    envelope: &Bytes,
) -> RecipientOutcome {
    let remote = match remote {
        Remote::Known(known) => known,
        Remote::Asked(asked) => Some(answers(asked).await),
    };
    counted(
        state,
        recipient,
        settle(state, recipient, reach(local, remote), envelope).await,
    )
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
