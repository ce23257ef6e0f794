//! Optimistic submit and the apology consumer.
//!
//! An optimistic client names an apology topic, publishes its operation and
//! goes ahead without waiting ([`Client::submit_optimistic`]). If amends
//! refuses the operation, the worker publishes an [`Apology`] on
//! `<prefix>.apology.<topic>` (protocol: "The apology"), and a business
//! workflow that reads it ([`Client::apologies`]) makes amends.
//!
//! The apology stream is read through a durable JetStream pull consumer,
//! **at least once**: an apology is delivered again until it is
//! acknowledged ([`Delivery::ack`]), after the consumer's ack wait, or when
//! a workflow that stopped creates the consumer again with the same durable
//! name. A workflow must therefore make amends idempotently, keyed by the
//! operation's op id (`decision.op_id`, [`Delivery::op_id`]): the protocol
//! names it as the operation's identity, it is unique per operation, and
//! every copy of an apology carries the same one.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use amends_core::command::{Topic, is_subject_token_byte};
use amends_core::partition::Apology;
use amends_core::protocol;
use amends_core::{OpId, Request};
use async_nats::jetstream::{self, AckKind, consumer};
use futures_util::stream::{BoxStream, Stream, StreamExt};

use crate::client::{Client, Submitted, encode_checked};
use crate::{Error, Result};

/// How long the consumer waits for the ack of a delivered apology before it
/// delivers it again, unless [`ApologiesOptions::ack_wait`] says otherwise.
/// Long enough for a workflow's compensation; a crashed workflow's
/// apologies come back after it, or at once to a consumer created again.
pub const APOLOGY_ACK_WAIT_DEFAULT: Duration = Duration::from_secs(30);

/// The longest durable consumer name, in bytes (JetStream's own limit on a
/// name it can put in an API subject is larger; this one is plenty).
pub const DURABLE_NAME_BYTES_MAX: usize = 128;

/// How an apology consumer is set up ([`Client::apologies_with`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ApologiesOptions {
    /// How long an unacknowledged apology waits before it is delivered
    /// again ([`APOLOGY_ACK_WAIT_DEFAULT`] by default).
    pub ack_wait: Duration,
}

impl Default for ApologiesOptions {
    fn default() -> ApologiesOptions {
        ApologiesOptions {
            ack_wait: APOLOGY_ACK_WAIT_DEFAULT,
        }
    }
}

/// One apology handed to a workflow, with its acknowledgement handle.
///
/// Acknowledge it once its amends are made (and recorded under
/// [`Delivery::op_id`]); an apology never acknowledged is delivered again.
pub struct Delivery {
    apology: Apology,
    message: jetstream::Message,
}

impl Delivery {
    /// The apology.
    pub fn apology(&self) -> &Apology {
        &self.apology
    }

    /// The apology, taking it out of the delivery (ack first).
    pub fn into_apology(self) -> Apology {
        self.apology
    }

    /// The refused operation's op id: the key a workflow deduplicates by.
    pub fn op_id(&self) -> OpId {
        self.apology.decision.op_id
    }

    /// How many times this apology was delivered to the consumer, this
    /// delivery included (1 the first time); `None` if JetStream did not say.
    pub fn delivered(&self) -> Option<i64> {
        self.message.info().ok().map(|info| info.delivered)
    }

    /// Acknowledges the apology and waits for JetStream to confirm it, so
    /// that once this returns it is never delivered to this durable
    /// consumer again.
    pub async fn ack(&self) -> Result<()> {
        self.message
            .double_ack()
            .await
            .map_err(|e| Error::Apologies {
                detail: "ack failed".to_owned(),
                source: Some(e),
            })
    }

    /// Asks for the apology to be delivered again now (the workflow could
    /// not make amends yet).
    pub async fn nak(&self) -> Result<()> {
        self.message
            .ack_with(AckKind::Nak(None))
            .await
            .map_err(|e| Error::Apologies {
                detail: "nak failed".to_owned(),
                source: Some(e),
            })
    }
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("apology", &self.apology)
            .field("delivered", &self.delivered())
            .finish()
    }
}

/// The apologies of one topic, as a [`Stream`] of [`Delivery`]s
/// ([`Client::apologies`]). It never ends by itself; drop it to stop.
///
/// An item is an error when the pull failed (the consumer was deleted, the
/// connection was lost for long) or when a message on the topic is not a
/// readable apology: such a message is terminated (never delivered again)
/// and reported once.
pub struct Apologies {
    inner: BoxStream<'static, Result<Delivery>>,
}

impl Stream for Apologies {
    type Item = Result<Delivery>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.poll_next_unpin(cx)
    }
}

impl std::fmt::Debug for Apologies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Apologies").finish_non_exhaustive()
    }
}

impl Client {
    /// Submits `request` optimistically: with `topic` as its apology topic
    /// and no reply subject. It returns once JetStream acknowledged the
    /// publish (the operation is durably in its partition's log); the
    /// client goes ahead and learns of a refusal only through an
    /// [`Apology`] on `topic` ([`Client::apologies`]). A confirmation is
    /// published on the decisions stream only.
    ///
    /// The topic is part of the operation's body: resubmit (after an
    /// unacknowledged publish, [`Error::Publish`]) with the same request
    /// and the same topic, or amends refuses the copy as `op_id_conflict`.
    /// A `request.apology_topic` other than `topic` is
    /// [`Error::TopicMismatch`].
    pub async fn submit_optimistic(&self, request: &Request, topic: &Topic) -> Result<Submitted> {
        if let Some(named) = &request.apology_topic
            && named != topic
        {
            return Err(Error::TopicMismatch {
                op_id: request.op_id,
                named: named.as_str().to_owned(),
                topic: topic.as_str().to_owned(),
            });
        }
        let partition = self.partition_of(request)?;
        let optimistic = Request {
            apology_topic: Some(topic.clone()),
            ..request.clone()
        };
        let body = encode_checked(&optimistic)?;
        self.publish(request.op_id, partition, body, None).await
    }

    /// The apologies of `topic`, read through the durable pull consumer
    /// `durable_name` on the apology stream (filter
    /// `<prefix>.apology.<topic>`, explicit acks, the default
    /// [`ApologiesOptions`]).
    ///
    /// A new durable name starts at the first apology of the topic still in
    /// the stream. Calling this again with the same name (in this process
    /// or after a restart) resumes after the last acknowledged apology:
    /// unacknowledged ones come again. Delivery is at least once: make
    /// amends idempotently by [`Delivery::op_id`] (see the module docs).
    /// Two live streams with the same name share the apologies between
    /// them.
    pub async fn apologies(&self, topic: &Topic, durable_name: &str) -> Result<Apologies> {
        self.apologies_with(topic, durable_name, ApologiesOptions::default())
            .await
    }

    /// As [`Client::apologies`], with `options`. An existing consumer of
    /// that name is updated to them (its position is kept).
    pub async fn apologies_with(
        &self,
        topic: &Topic,
        durable_name: &str,
        options: ApologiesOptions,
    ) -> Result<Apologies> {
        check_durable_name(durable_name)?;
        let fail =
            |detail: String, source: Option<crate::Source>| Error::Apologies { detail, source };
        let stream_name = self.prefix().stream_name(protocol::Stream::Apologies);
        let stream = self
            .jetstream()
            .get_stream(&stream_name)
            .await
            .map_err(|e| fail(format!("stream {stream_name}"), Some(Box::new(e))))?;
        let consumer: consumer::PullConsumer = stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(durable_name.to_owned()),
                description: Some(format!("amends apologies of {}", topic.as_str())),
                filter_subject: self.prefix().apology(topic),
                deliver_policy: consumer::DeliverPolicy::All,
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: options.ack_wait,
                ..consumer::pull::Config::default()
            })
            .await
            .map_err(|e| fail(format!("consumer {durable_name}"), Some(Box::new(e))))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| fail(format!("pull from {durable_name}"), Some(Box::new(e))))?;
        let inner = messages
            .then(|message| async move {
                let message = message.map_err(|e| Error::Apologies {
                    detail: "pull failed".to_owned(),
                    source: Some(Box::new(e)),
                })?;
                match serde_json::from_slice::<Apology>(&message.payload) {
                    Ok(apology) => Ok(Delivery { apology, message }),
                    Err(e) => {
                        // Not an apology: delivering it again would not
                        // make it one.
                        if let Err(term) = message.ack_with(AckKind::Term).await {
                            tracing::warn!(subject = %message.subject, error = %term, "unreadable apology not terminated");
                        }
                        Err(Error::Apologies {
                            detail: format!("unreadable apology on {}", message.subject),
                            source: Some(Box::new(e)),
                        })
                    }
                }
            })
            .boxed();
        Ok(Apologies { inner })
    }
}

/// A durable name is one subject token (`A-Z a-z 0-9 _ -`, which also
/// keeps it clear of JetStream's forbidden `.`, `*`, `>` and whitespace) of
/// at most [`DURABLE_NAME_BYTES_MAX`] bytes.
fn check_durable_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > DURABLE_NAME_BYTES_MAX {
        Some("it is longer than 128 bytes")
    } else if !name.bytes().all(is_subject_token_byte) {
        Some("it has a character other than A-Z a-z 0-9 _ -")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::InvalidDurableName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_names_are_one_token() {
        // Proves the durable-name check accepts one subject token and refuses what JetStream would (dots, wildcards, spaces) or what is empty or too long.
        for ok in ["workflow", "a-b_C9", &"x".repeat(128)] {
            assert!(check_durable_name(ok).is_ok(), "{ok:?}");
        }
        for bad in ["", "a.b", "a*", ">", "a b", "é", &"x".repeat(129)] {
            assert!(check_durable_name(bad).is_err(), "{bad:?}");
        }
    }
}
