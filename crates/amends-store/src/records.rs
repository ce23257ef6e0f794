//! The storage records and their encoding: what a partition's values
//! hold, whatever the engine.
//!
//! Everything here is engine-neutral: a record is encoded to bytes and
//! decoded from bytes, and the key it is stored under only appears in an
//! error ([`Error::Corrupt`] names it). sled's keys are
//! [`crate::layout`]'s; a second engine reuses these encodings with its
//! own keys.
//!
//! Storage records have their own types, separate from the wire types of
//! amends-core: the wire format (JSON with tags and flattened fields) may
//! evolve for readability, the store format only with a new
//! [`FORMAT_VERSION`]. Records are encoded with postcard (compact,
//! deterministic: the same record always gives the same bytes) behind one
//! version byte. Enum variants are encoded by position: within one format
//! version new variants are only ever appended.
//!
//! Format 2 added sagas: an account's `incoming`, a claim's `tentative`
//! step, saga records, the in-flight outcome, the saga reasons, the saga
//! commands (`transfer`, `saga`, `step`, `step_outcome`, with their own
//! record types like every other command) and the `send`/`reply` outbox
//! entries. Format 3 added the `dead_letter` outbox entry: dead letters are
//! published after the commit with the rest of the outbox, so a format-2
//! build must not read an outbox it cannot decode.
//!
//! Format 4 changed no record layout, only what the dedup records'
//! fingerprints of the saga commands are: amends-core's canonical encoding
//! of a `transfer`, `saga`, `step` or `step_outcome` request is its own
//! tagged form now, no longer the JSON serde writes of it. A format 2 or 3
//! store holds the old fingerprints, against which every resubmitted saga
//! (and every repeated step message) would be a conflict, so it is refused
//! on open like any other version.
//!
//! Format 5 added what a transfer moves (`from`, `to`, `amount`) to the
//! decisions of a transfer, in dedup records and outbox decisions.

use amends_core::command::{
    AccountId, Amount, ClaimKey, Command, DeadlineMs, Fingerprint, Namespace, Owner, Phase,
    Request, SagaStep, Steps, Topic,
};
use amends_core::decision::{Decision, Outcome, Reason, Transfer};
use amends_core::id::OpId;
use amends_core::partition::{Apology, DeadLetter, Effect, HoldExpired};
use amends_core::route::{PARTITIONS_MAX, PartitionId, Partitions};
use amends_core::state::{Account, Claim, Clock, Dedup, Hold, HoldStatus, Saga, SagaState};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::error::{Error, Result};

/// The version of the record encoding and of sled's key layout: a change
/// to either is a new version. Every value starts with it as one byte and
/// the meta tree records it; a store written with another version is
/// refused on open, never reinterpreted.
pub const FORMAT_VERSION: u8 = 5;

/// An op id as its 16 bytes, in UUID (big-endian) order: how records
/// hold op ids, and how a key layout may sort by them.
pub(crate) fn op_id_to_bytes(id: OpId) -> [u8; 16] {
    *id.0.as_bytes()
}

/// An op id read back from its 16 bytes.
pub(crate) fn op_id_from_bytes(b: [u8; 16]) -> OpId {
    OpId::from_uuid(uuid::Uuid::from_bytes(b))
}

// ---------------------------------------------------------------------
// Records.

/// The head of a partition: how far its log was applied and how many
/// outbox entries were ever written. Written by every commit.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Head {
    /// The applied position and log time.
    pub clock: Clock,
    /// The sequence number the next outbox entry gets (so, the number of
    /// entries ever written).
    pub outbox_end: u64,
}

#[derive(Serialize, Deserialize)]
struct HeadRec {
    position: u64,
    log_time_ms: u64,
    outbox_end: u64,
}

#[derive(Serialize, Deserialize)]
struct AccountRec {
    balance: i64,
    held: i64,
    floor: i64,
    ceiling: Option<i64>,
    incoming: i64,
}

#[derive(Serialize, Deserialize)]
enum HoldStatusRec {
    Pending,
    Posted { amount: i64, at_ms: u64 },
    Voided { at_ms: u64 },
    Expired { at_ms: u64 },
}

#[derive(Serialize, Deserialize)]
struct HoldRec {
    account: String,
    amount: i64,
    expires_at_ms: Option<u64>,
    status: HoldStatusRec,
}

#[derive(Serialize, Deserialize)]
struct ClaimRec {
    owner: String,
    /// The op id of the saga step's try that holds the claim tentatively.
    tentative: Option<[u8; 16]>,
}

#[derive(Serialize, Deserialize)]
enum SagaStateRec {
    Trying { step: u32 },
    Confirmed { at_ms: u64 },
    Cancelled { at_ms: u64 },
}

/// A saga; its op id is the bucket entry's id.
#[derive(Serialize, Deserialize)]
struct SagaRec {
    command: CommandRec,
    apology_topic: Option<String>,
    reply_to: Option<String>,
    deadline_ms: u64,
    state: SagaStateRec,
}

/// A dedup record; its op id is the key. `transfer` comes last, so the
/// prefix [`dedup_log_time_ms`] reads is unchanged.
#[derive(Serialize, Deserialize)]
struct DedupRec {
    fingerprint: [u8; 16],
    partition: u32,
    position: u64,
    log_time_ms: u64,
    outcome: OutcomeRec,
    transfer: Option<TransferRec>,
}

/// What a transfer's decision says it moves ([`Transfer`]).
#[derive(Serialize, Deserialize)]
struct TransferRec {
    from: String,
    to: String,
    amount: u64,
}

#[derive(Serialize, Deserialize)]
struct DecisionRec {
    op_id: [u8; 16],
    partition: u32,
    position: u64,
    log_time_ms: u64,
    outcome: OutcomeRec,
    transfer: Option<TransferRec>,
}

#[derive(Serialize, Deserialize)]
enum OutcomeRec {
    Confirmed {
        balance: Option<i64>,
        available: Option<i64>,
    },
    Rejected(ReasonRec),
    InFlight {
        step: u32,
    },
}

/// [`Reason`] in store form. `Json` carries a reason this build has no
/// compact form for (amends-core's `Reason` is `#[non_exhaustive]`) as its
/// wire JSON, so no reason is ever lost. Variants are encoded by index:
/// new ones go at the end, after `Json`, so records written before they
/// existed decode unchanged (no new [`FORMAT_VERSION`]); the order is
/// therefore not `Reason`'s precedence order.
#[derive(Serialize, Deserialize)]
enum ReasonRec {
    Malformed {
        detail: String,
    },
    OpIdConflict,
    OpIdOutsideWindow {
        op_time_ms: u64,
        earliest_ms: u64,
        latest_ms: u64,
    },
    UnknownAccount,
    AccountExists,
    InvalidLimits {
        floor: i64,
        ceiling: Option<i64>,
    },
    HoldNotFound,
    HoldAlreadyPosted,
    HoldAlreadyVoided,
    HoldExpired,
    PostExceedsHold {
        held: i64,
        requested: u64,
    },
    Overflow,
    InsufficientFunds {
        available: i64,
        floor: i64,
        requested: u64,
    },
    CeilingExceeded {
        balance: i64,
        ceiling: i64,
        requested: u64,
    },
    AlreadyClaimed {
        owner: String,
    },
    NotClaimed,
    NotOwner {
        owner: String,
    },
    ClaimPending,
    StepRefused {
        step: u32,
        reason: Box<ReasonRec>,
    },
    DeadlineExceeded {
        deadline_ms: u64,
    },
    SagaCancelled,
    Json(String),
    ReplySubjectInvalid {
        bytes_max: u32,
    },
    WrongPartition {
        partition: u32,
    },
}

#[derive(Serialize, Deserialize)]
enum CommandRec {
    OpenAccount {
        account: String,
        floor: i64,
        ceiling: Option<i64>,
    },
    Credit {
        account: String,
        amount: u64,
    },
    Debit {
        account: String,
        amount: u64,
    },
    Hold {
        account: String,
        amount: u64,
        timeout_ms: Option<u64>,
    },
    Post {
        account: String,
        hold: [u8; 16],
        amount: Option<u64>,
    },
    Void {
        account: String,
        hold: [u8; 16],
    },
    Claim {
        namespace: String,
        key: String,
        owner: String,
    },
    Release {
        namespace: String,
        key: String,
        owner: String,
    },
    Tick,
    Transfer {
        from: String,
        to: String,
        amount: u64,
        deadline_ms: Option<u64>,
    },
    Saga {
        steps: Vec<StepRec>,
        deadline_ms: Option<u64>,
    },
    Step {
        saga: [u8; 16],
        index: u32,
        phase: PhaseRec,
        step: StepRec,
    },
    StepOutcome {
        saga: [u8; 16],
        index: u32,
        outcome: OutcomeRec,
    },
}

#[derive(Serialize, Deserialize)]
struct StepRec {
    command: Box<CommandRec>,
    compensation: Option<Box<CommandRec>>,
}

#[derive(Serialize, Deserialize)]
enum PhaseRec {
    Try,
    Confirm,
    Cancel,
}

/// A request a saga sends to a partition's log.
#[derive(Serialize, Deserialize)]
struct RequestRec {
    op_id: [u8; 16],
    command: CommandRec,
    apology_topic: Option<String>,
}

#[derive(Serialize, Deserialize)]
enum EffectRec {
    Decided(DecisionRec),
    Apology {
        topic: String,
        command: CommandRec,
        decision: DecisionRec,
    },
    HoldExpired {
        event_id: [u8; 16],
        hold: [u8; 16],
        account: String,
        amount: i64,
        partition: u32,
        position: u64,
        log_time_ms: u64,
    },
    Send {
        partition: u32,
        request: RequestRec,
    },
    Reply {
        to: String,
        decision: DecisionRec,
    },
    DeadLetter {
        position: u64,
        detail: String,
        bytes: Vec<u8>,
    },
}

// ---------------------------------------------------------------------
// Encoding.

fn encode_into<T: Serialize>(rec: &T, out: &mut Vec<u8>) {
    // postcard only fails on a full fixed-size buffer or on types it cannot
    // represent (maps of unknown length, `deserialize_any`); the record
    // types above have neither, so a failure is a bug in this module.
    let taken = std::mem::take(out);
    *out = postcard::to_extend(rec, taken)
        .unwrap_or_else(|e| panic!("store record failed to encode: {e}"));
}

fn encode<T: Serialize>(rec: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.push(FORMAT_VERSION);
    encode_into(rec, &mut out);
    out
}

/// A record body without the version byte: the records of a packed
/// bucket, which carries one version byte for all.
fn encode_body<T: Serialize>(rec: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(48);
    encode_into(rec, &mut out);
    out
}

/// Decodes one whole record behind its version byte.
fn decode<T: DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<T> {
    decode_body(key, check_version(key, value)?)
}

/// Decodes one whole record body (no version byte).
fn decode_body<T: DeserializeOwned>(key: &[u8], body: &[u8]) -> Result<T> {
    let (rec, rest) = postcard::take_from_bytes::<T>(body)
        .map_err(|e| Error::corrupt(key, format!("undecodable record: {e}")))?;
    if !rest.is_empty() {
        return Err(Error::corrupt(
            key,
            format!("{} trailing bytes after the record", rest.len()),
        ));
    }
    Ok(rec)
}

fn check_version<'v>(key: &[u8], value: &'v [u8]) -> Result<&'v [u8]> {
    match value.split_first() {
        Some((&FORMAT_VERSION, body)) => Ok(body),
        Some((v, _)) => Err(Error::corrupt(
            key,
            format!("record format version {v}, this build reads {FORMAT_VERSION}"),
        )),
        None => Err(Error::corrupt(key, "empty value")),
    }
}

fn text<T, E: std::fmt::Display>(
    key: &[u8],
    what: &str,
    r: std::result::Result<T, E>,
) -> Result<T> {
    r.map_err(|e| Error::corrupt(key, format!("invalid {what}: {e}")))
}

pub(crate) fn encode_head(h: &Head) -> Vec<u8> {
    encode(&HeadRec {
        position: h.clock.position,
        log_time_ms: h.clock.log_time_ms,
        outbox_end: h.outbox_end,
    })
}

pub(crate) fn decode_head(key: &[u8], v: &[u8]) -> Result<Head> {
    let r: HeadRec = decode(key, v)?;
    Ok(Head {
        clock: Clock {
            position: r.position,
            log_time_ms: r.log_time_ms,
        },
        outbox_end: r.outbox_end,
    })
}

pub(crate) fn encode_u64(v: u64) -> Vec<u8> {
    encode(&v)
}

pub(crate) fn decode_u64(key: &[u8], v: &[u8]) -> Result<u64> {
    decode(key, v)
}

/// The value of an expiry index entry: the version byte alone.
pub(crate) fn encode_marker() -> Vec<u8> {
    vec![FORMAT_VERSION]
}

pub(crate) fn decode_marker(key: &[u8], v: &[u8]) -> Result<()> {
    let body = check_version(key, v)?;
    if body.is_empty() {
        Ok(())
    } else {
        Err(Error::corrupt(key, "marker with a body"))
    }
}

pub(crate) fn encode_account(a: &Account) -> Vec<u8> {
    encode(&AccountRec {
        balance: a.balance,
        held: a.held,
        floor: a.floor,
        ceiling: a.ceiling,
        incoming: a.incoming,
    })
}

pub(crate) fn decode_account(key: &[u8], v: &[u8]) -> Result<Account> {
    let r: AccountRec = decode(key, v)?;
    Ok(Account {
        balance: r.balance,
        held: r.held,
        floor: r.floor,
        ceiling: r.ceiling,
        incoming: r.incoming,
    })
}

/// A hold's body, for its packed bucket.
pub(crate) fn encode_hold(h: &Hold) -> Vec<u8> {
    let status = match h.status {
        HoldStatus::Pending => HoldStatusRec::Pending,
        HoldStatus::Posted { amount, at_ms } => HoldStatusRec::Posted { amount, at_ms },
        HoldStatus::Voided { at_ms } => HoldStatusRec::Voided { at_ms },
        HoldStatus::Expired { at_ms } => HoldStatusRec::Expired { at_ms },
    };
    encode_body(&HoldRec {
        account: h.account.as_str().to_owned(),
        amount: h.amount,
        expires_at_ms: h.expires_at_ms,
        status,
    })
}

pub(crate) fn decode_hold(key: &[u8], body: &[u8]) -> Result<Hold> {
    let r: HoldRec = decode_body(key, body)?;
    let status = match r.status {
        HoldStatusRec::Pending => HoldStatus::Pending,
        HoldStatusRec::Posted { amount, at_ms } => HoldStatus::Posted { amount, at_ms },
        HoldStatusRec::Voided { at_ms } => HoldStatus::Voided { at_ms },
        HoldStatusRec::Expired { at_ms } => HoldStatus::Expired { at_ms },
    };
    Ok(Hold {
        account: text(key, "account id", AccountId::new(r.account))?,
        amount: r.amount,
        expires_at_ms: r.expires_at_ms,
        status,
    })
}

pub(crate) fn encode_claim(c: &Claim) -> Vec<u8> {
    encode(&ClaimRec {
        owner: c.owner.as_str().to_owned(),
        tentative: c.tentative.map(op_id_to_bytes),
    })
}

pub(crate) fn decode_claim(key: &[u8], v: &[u8]) -> Result<Claim> {
    let r: ClaimRec = decode(key, v)?;
    Ok(Claim {
        owner: text(key, "owner", Owner::new(r.owner))?,
        tentative: r.tentative.map(op_id_from_bytes),
    })
}

/// A saga's body, for its packed bucket (its op id is the bucket entry's
/// id).
pub(crate) fn encode_saga(s: &Saga) -> Vec<u8> {
    encode_body(&SagaRec {
        command: command_rec(&s.command),
        apology_topic: s.apology_topic.as_ref().map(|t| t.as_str().to_owned()),
        reply_to: s.reply_to.clone(),
        deadline_ms: s.deadline_ms,
        state: match s.state {
            SagaState::Trying { step } => SagaStateRec::Trying { step },
            SagaState::Confirmed { at_ms } => SagaStateRec::Confirmed { at_ms },
            SagaState::Cancelled { at_ms } => SagaStateRec::Cancelled { at_ms },
        },
    })
}

/// Decodes a saga's body.
pub(crate) fn decode_saga(key: &[u8], body: &[u8]) -> Result<Saga> {
    let r: SagaRec = decode_body(key, body)?;
    Ok(Saga {
        command: command(key, r.command)?,
        apology_topic: r
            .apology_topic
            .map(|t| text(key, "apology topic", Topic::new(t)))
            .transpose()?,
        reply_to: r.reply_to,
        deadline_ms: r.deadline_ms,
        state: match r.state {
            SagaStateRec::Trying { step } => SagaState::Trying { step },
            SagaStateRec::Confirmed { at_ms } => SagaState::Confirmed { at_ms },
            SagaStateRec::Cancelled { at_ms } => SagaState::Cancelled { at_ms },
        },
    })
}

/// A dedup record's body, for its packed bucket (its op id is the
/// bucket entry's id).
pub(crate) fn encode_dedup(d: &Dedup) -> Vec<u8> {
    let dec = &d.decision;
    encode_body(&DedupRec {
        fingerprint: d.fingerprint.0.to_be_bytes(),
        partition: dec.partition,
        position: dec.position,
        log_time_ms: dec.log_time_ms,
        outcome: outcome_rec(&dec.outcome),
        transfer: dec.transfer.as_ref().map(transfer_rec),
    })
}

/// The leading fields of a dedup record body, enough to tell its age
/// without decoding (and allocating) its outcome.
#[derive(Deserialize)]
struct DedupTimeRec {
    _fingerprint: [u8; 16],
    _partition: u32,
    _position: u64,
    log_time_ms: u64,
}

/// The log time of a dedup record's decision, read from the front of its
/// body: what compaction needs, at a fraction of a full decode.
pub(crate) fn dedup_log_time_ms(key: &[u8], body: &[u8]) -> Result<u64> {
    let (rec, _) = postcard::take_from_bytes::<DedupTimeRec>(body)
        .map_err(|e| Error::corrupt(key, format!("undecodable record: {e}")))?;
    Ok(rec.log_time_ms)
}

/// Decodes a dedup record's body; `op` is its bucket entry's id.
pub(crate) fn decode_dedup(key: &[u8], op: OpId, body: &[u8]) -> Result<Dedup> {
    let r: DedupRec = decode_body(key, body)?;
    Ok(Dedup {
        fingerprint: Fingerprint(u128::from_be_bytes(r.fingerprint)),
        decision: Decision {
            op_id: op,
            partition: r.partition,
            position: r.position,
            log_time_ms: r.log_time_ms,
            outcome: outcome(key, r.outcome)?,
            transfer: r.transfer.map(|t| transfer(key, t)).transpose()?,
        },
    })
}

/// Appends one outbox entry (no version byte: the chunk has one).
pub(crate) fn encode_effect_into(e: &Effect, out: &mut Vec<u8>) {
    let rec = match e {
        Effect::Decided(d) => EffectRec::Decided(decision_rec(d)),
        Effect::Apology(a) => EffectRec::Apology {
            topic: a.topic.as_str().to_owned(),
            command: command_rec(&a.command),
            decision: decision_rec(&a.decision),
        },
        Effect::HoldExpired(h) => EffectRec::HoldExpired {
            event_id: op_id_to_bytes(h.event_id),
            hold: op_id_to_bytes(h.hold),
            account: h.account.as_str().to_owned(),
            amount: h.amount,
            partition: h.partition,
            position: h.position,
            log_time_ms: h.log_time_ms,
        },
        Effect::Send { partition, request } => EffectRec::Send {
            partition: partition.get(),
            request: request_rec(request),
        },
        Effect::Reply { to, decision } => EffectRec::Reply {
            to: to.clone(),
            decision: decision_rec(decision),
        },
        Effect::DeadLetter(d) => EffectRec::DeadLetter {
            position: d.position,
            detail: d.detail.clone(),
            bytes: d.bytes.clone(),
        },
    };
    encode_into(&rec, out);
}

/// A new, empty outbox chunk value (its version byte).
pub(crate) fn outbox_chunk_start() -> Vec<u8> {
    vec![FORMAT_VERSION]
}

/// Decodes every entry of an outbox chunk.
pub(crate) fn decode_outbox_chunk(key: &[u8], v: &[u8]) -> Result<Vec<Effect>> {
    let mut body = check_version(key, v)?;
    let mut out = Vec::new();
    while !body.is_empty() {
        let (rec, rest) = postcard::take_from_bytes::<EffectRec>(body)
            .map_err(|e| Error::corrupt(key, format!("undecodable outbox entry: {e}")))?;
        out.push(effect(key, rec)?);
        body = rest;
    }
    Ok(out)
}

fn effect(key: &[u8], rec: EffectRec) -> Result<Effect> {
    Ok(match rec {
        EffectRec::Decided(d) => Effect::Decided(decision(key, d)?),
        EffectRec::Apology {
            topic,
            command: c,
            decision: d,
        } => Effect::Apology(Apology {
            topic: text(key, "apology topic", Topic::new(topic))?,
            command: command(key, c)?,
            decision: decision(key, d)?,
        }),
        EffectRec::HoldExpired {
            event_id,
            hold,
            account,
            amount,
            partition,
            position,
            log_time_ms,
        } => Effect::HoldExpired(HoldExpired {
            event_id: op_id_from_bytes(event_id),
            hold: op_id_from_bytes(hold),
            account: text(key, "account id", AccountId::new(account))?,
            amount,
            partition,
            position,
            log_time_ms,
        }),
        EffectRec::Send { partition, request } => Effect::Send {
            partition: partition_id(key, partition)?,
            request: self::request(key, request)?,
        },
        EffectRec::Reply { to, decision: d } => Effect::Reply {
            to,
            decision: decision(key, d)?,
        },
        EffectRec::DeadLetter {
            position,
            detail,
            bytes,
        } => Effect::DeadLetter(DeadLetter {
            position,
            detail,
            bytes,
        }),
    })
}

/// A partition number read back: any number a deployment may have (the
/// record does not know this store's count).
fn partition_id(key: &[u8], n: u32) -> Result<PartitionId> {
    Partitions::new(PARTITIONS_MAX)
        .ok()
        .and_then(|all| all.id(n))
        .ok_or_else(|| Error::corrupt(key, format!("partition {n} out of range")))
}

fn request_rec(r: &Request) -> RequestRec {
    RequestRec {
        op_id: op_id_to_bytes(r.op_id),
        command: command_rec(&r.command),
        apology_topic: r.apology_topic.as_ref().map(|t| t.as_str().to_owned()),
    }
}

fn request(key: &[u8], r: RequestRec) -> Result<Request> {
    Ok(Request {
        op_id: op_id_from_bytes(r.op_id),
        command: command(key, r.command)?,
        apology_topic: r
            .apology_topic
            .map(|t| text(key, "apology topic", Topic::new(t)))
            .transpose()?,
    })
}

fn decision_rec(d: &Decision) -> DecisionRec {
    DecisionRec {
        op_id: op_id_to_bytes(d.op_id),
        partition: d.partition,
        position: d.position,
        log_time_ms: d.log_time_ms,
        outcome: outcome_rec(&d.outcome),
        transfer: d.transfer.as_ref().map(transfer_rec),
    }
}

fn decision(key: &[u8], r: DecisionRec) -> Result<Decision> {
    Ok(Decision {
        op_id: op_id_from_bytes(r.op_id),
        partition: r.partition,
        position: r.position,
        log_time_ms: r.log_time_ms,
        outcome: outcome(key, r.outcome)?,
        transfer: r.transfer.map(|t| transfer(key, t)).transpose()?,
    })
}

fn transfer_rec(t: &Transfer) -> TransferRec {
    TransferRec {
        from: t.from.as_str().to_owned(),
        to: t.to.as_str().to_owned(),
        amount: t.amount.get(),
    }
}

fn transfer(key: &[u8], r: TransferRec) -> Result<Transfer> {
    Ok(Transfer {
        from: text(key, "account id", AccountId::new(r.from))?,
        to: text(key, "account id", AccountId::new(r.to))?,
        amount: text(key, "amount", Amount::new(r.amount))?,
    })
}

fn outcome_rec(o: &Outcome) -> OutcomeRec {
    match o {
        Outcome::Confirmed { balance, available } => OutcomeRec::Confirmed {
            balance: *balance,
            available: *available,
        },
        Outcome::Rejected { reason } => OutcomeRec::Rejected(reason_rec(reason)),
        Outcome::InFlight { step } => OutcomeRec::InFlight { step: *step },
    }
}

fn outcome(key: &[u8], r: OutcomeRec) -> Result<Outcome> {
    Ok(match r {
        OutcomeRec::Confirmed { balance, available } => Outcome::Confirmed { balance, available },
        OutcomeRec::Rejected(r) => Outcome::Rejected {
            reason: reason(key, r)?,
        },
        OutcomeRec::InFlight { step } => Outcome::InFlight { step },
    })
}

fn reason_rec(r: &Reason) -> ReasonRec {
    match r {
        Reason::Malformed { detail } => ReasonRec::Malformed {
            detail: detail.clone(),
        },
        Reason::OpIdConflict => ReasonRec::OpIdConflict,
        Reason::OpIdOutsideWindow {
            op_time_ms,
            earliest_ms,
            latest_ms,
        } => ReasonRec::OpIdOutsideWindow {
            op_time_ms: *op_time_ms,
            earliest_ms: *earliest_ms,
            latest_ms: *latest_ms,
        },
        Reason::UnknownAccount => ReasonRec::UnknownAccount,
        Reason::AccountExists => ReasonRec::AccountExists,
        Reason::InvalidLimits { floor, ceiling } => ReasonRec::InvalidLimits {
            floor: *floor,
            ceiling: *ceiling,
        },
        Reason::HoldNotFound => ReasonRec::HoldNotFound,
        Reason::HoldAlreadyPosted => ReasonRec::HoldAlreadyPosted,
        Reason::HoldAlreadyVoided => ReasonRec::HoldAlreadyVoided,
        Reason::HoldExpired => ReasonRec::HoldExpired,
        Reason::PostExceedsHold { held, requested } => ReasonRec::PostExceedsHold {
            held: *held,
            requested: *requested,
        },
        Reason::Overflow => ReasonRec::Overflow,
        Reason::InsufficientFunds {
            available,
            floor,
            requested,
        } => ReasonRec::InsufficientFunds {
            available: *available,
            floor: *floor,
            requested: *requested,
        },
        Reason::CeilingExceeded {
            balance,
            ceiling,
            requested,
        } => ReasonRec::CeilingExceeded {
            balance: *balance,
            ceiling: *ceiling,
            requested: *requested,
        },
        Reason::AlreadyClaimed { owner } => ReasonRec::AlreadyClaimed {
            owner: owner.as_str().to_owned(),
        },
        Reason::NotClaimed => ReasonRec::NotClaimed,
        Reason::NotOwner { owner } => ReasonRec::NotOwner {
            owner: owner.as_str().to_owned(),
        },
        Reason::ClaimPending => ReasonRec::ClaimPending,
        Reason::StepRefused { step, reason } => ReasonRec::StepRefused {
            step: *step,
            reason: Box::new(reason_rec(reason)),
        },
        Reason::DeadlineExceeded { deadline_ms } => ReasonRec::DeadlineExceeded {
            deadline_ms: *deadline_ms,
        },
        Reason::SagaCancelled => ReasonRec::SagaCancelled,
        Reason::ReplySubjectInvalid { bytes_max } => ReasonRec::ReplySubjectInvalid {
            bytes_max: *bytes_max,
        },
        Reason::WrongPartition { partition } => ReasonRec::WrongPartition {
            partition: *partition,
        },
        // A reason added to amends-core after this build: kept as its wire
        // JSON, which round-trips every reason.
        other => ReasonRec::Json(
            serde_json::to_string(other)
                .unwrap_or_else(|e| panic!("reason {other:?} failed to serialize as JSON: {e}")),
        ),
    }
}

fn reason(key: &[u8], r: ReasonRec) -> Result<Reason> {
    Ok(match r {
        ReasonRec::Malformed { detail } => Reason::Malformed { detail },
        ReasonRec::OpIdConflict => Reason::OpIdConflict,
        ReasonRec::OpIdOutsideWindow {
            op_time_ms,
            earliest_ms,
            latest_ms,
        } => Reason::OpIdOutsideWindow {
            op_time_ms,
            earliest_ms,
            latest_ms,
        },
        ReasonRec::UnknownAccount => Reason::UnknownAccount,
        ReasonRec::AccountExists => Reason::AccountExists,
        ReasonRec::InvalidLimits { floor, ceiling } => Reason::InvalidLimits { floor, ceiling },
        ReasonRec::HoldNotFound => Reason::HoldNotFound,
        ReasonRec::HoldAlreadyPosted => Reason::HoldAlreadyPosted,
        ReasonRec::HoldAlreadyVoided => Reason::HoldAlreadyVoided,
        ReasonRec::HoldExpired => Reason::HoldExpired,
        ReasonRec::PostExceedsHold { held, requested } => {
            Reason::PostExceedsHold { held, requested }
        }
        ReasonRec::Overflow => Reason::Overflow,
        ReasonRec::InsufficientFunds {
            available,
            floor,
            requested,
        } => Reason::InsufficientFunds {
            available,
            floor,
            requested,
        },
        ReasonRec::CeilingExceeded {
            balance,
            ceiling,
            requested,
        } => Reason::CeilingExceeded {
            balance,
            ceiling,
            requested,
        },
        ReasonRec::AlreadyClaimed { owner } => Reason::AlreadyClaimed {
            owner: text(key, "owner", Owner::new(owner))?,
        },
        ReasonRec::NotClaimed => Reason::NotClaimed,
        ReasonRec::NotOwner { owner } => Reason::NotOwner {
            owner: text(key, "owner", Owner::new(owner))?,
        },
        ReasonRec::ClaimPending => Reason::ClaimPending,
        ReasonRec::StepRefused { step, reason: r } => Reason::StepRefused {
            step,
            reason: Box::new(reason(key, *r)?),
        },
        ReasonRec::DeadlineExceeded { deadline_ms } => Reason::DeadlineExceeded { deadline_ms },
        ReasonRec::SagaCancelled => Reason::SagaCancelled,
        ReasonRec::ReplySubjectInvalid { bytes_max } => Reason::ReplySubjectInvalid { bytes_max },
        ReasonRec::WrongPartition { partition } => Reason::WrongPartition { partition },
        ReasonRec::Json(json) => text(key, "reason JSON", serde_json::from_str(&json))?,
    })
}

fn command_rec(c: &Command) -> CommandRec {
    let s = |a: &AccountId| a.as_str().to_owned();
    match c {
        Command::OpenAccount {
            account,
            floor,
            ceiling,
        } => CommandRec::OpenAccount {
            account: s(account),
            floor: *floor,
            ceiling: *ceiling,
        },
        Command::Credit { account, amount } => CommandRec::Credit {
            account: s(account),
            amount: amount.get(),
        },
        Command::Debit { account, amount } => CommandRec::Debit {
            account: s(account),
            amount: amount.get(),
        },
        Command::Hold {
            account,
            amount,
            timeout_ms,
        } => CommandRec::Hold {
            account: s(account),
            amount: amount.get(),
            timeout_ms: *timeout_ms,
        },
        Command::Post {
            account,
            hold,
            amount,
        } => CommandRec::Post {
            account: s(account),
            hold: op_id_to_bytes(*hold),
            amount: amount.map(Amount::get),
        },
        Command::Void { account, hold } => CommandRec::Void {
            account: s(account),
            hold: op_id_to_bytes(*hold),
        },
        Command::Claim {
            namespace,
            key,
            owner,
        } => CommandRec::Claim {
            namespace: namespace.as_str().to_owned(),
            key: key.as_str().to_owned(),
            owner: owner.as_str().to_owned(),
        },
        Command::Release {
            namespace,
            key,
            owner,
        } => CommandRec::Release {
            namespace: namespace.as_str().to_owned(),
            key: key.as_str().to_owned(),
            owner: owner.as_str().to_owned(),
        },
        Command::Tick {} => CommandRec::Tick,
        Command::Transfer {
            from,
            to,
            amount,
            deadline_ms,
        } => CommandRec::Transfer {
            from: s(from),
            to: s(to),
            amount: amount.get(),
            deadline_ms: deadline_ms.map(DeadlineMs::get),
        },
        Command::Saga { steps, deadline_ms } => CommandRec::Saga {
            steps: steps.as_slice().iter().map(step_rec).collect(),
            deadline_ms: deadline_ms.map(DeadlineMs::get),
        },
        Command::Step {
            saga,
            index,
            phase,
            step,
        } => CommandRec::Step {
            saga: op_id_to_bytes(*saga),
            index: *index,
            phase: match phase {
                Phase::Try => PhaseRec::Try,
                Phase::Confirm => PhaseRec::Confirm,
                Phase::Cancel => PhaseRec::Cancel,
            },
            step: step_rec(step),
        },
        Command::StepOutcome {
            saga,
            index,
            outcome,
        } => CommandRec::StepOutcome {
            saga: op_id_to_bytes(*saga),
            index: *index,
            outcome: outcome_rec(outcome),
        },
    }
}

fn step_rec(s: &SagaStep) -> StepRec {
    StepRec {
        command: Box::new(command_rec(&s.command)),
        compensation: s.compensation.as_deref().map(|c| Box::new(command_rec(c))),
    }
}

/// A saga step read back, checked again like a parsed one.
fn step(key: &[u8], r: StepRec) -> Result<SagaStep> {
    let compensation = r.compensation.map(|c| command(key, *c)).transpose()?;
    text(
        key,
        "saga step",
        SagaStep::new(command(key, *r.command)?, compensation),
    )
}

fn command(k: &[u8], r: CommandRec) -> Result<Command> {
    let account = |s: String| text(k, "account id", AccountId::new(s));
    let amount = |v: u64| text(k, "amount", Amount::new(v));
    let (ns, key, owner) = (
        |s: String| text(k, "namespace", Namespace::new(s)),
        |s: String| text(k, "claim key", ClaimKey::new(s)),
        |s: String| text(k, "owner", Owner::new(s)),
    );
    Ok(match r {
        CommandRec::OpenAccount {
            account: a,
            floor,
            ceiling,
        } => Command::OpenAccount {
            account: account(a)?,
            floor,
            ceiling,
        },
        CommandRec::Credit {
            account: a,
            amount: m,
        } => Command::Credit {
            account: account(a)?,
            amount: amount(m)?,
        },
        CommandRec::Debit {
            account: a,
            amount: m,
        } => Command::Debit {
            account: account(a)?,
            amount: amount(m)?,
        },
        CommandRec::Hold {
            account: a,
            amount: m,
            timeout_ms,
        } => Command::Hold {
            account: account(a)?,
            amount: amount(m)?,
            timeout_ms,
        },
        CommandRec::Post {
            account: a,
            hold,
            amount: m,
        } => Command::Post {
            account: account(a)?,
            hold: op_id_from_bytes(hold),
            amount: m.map(amount).transpose()?,
        },
        CommandRec::Void { account: a, hold } => Command::Void {
            account: account(a)?,
            hold: op_id_from_bytes(hold),
        },
        CommandRec::Claim {
            namespace: n,
            key: c,
            owner: o,
        } => Command::Claim {
            namespace: ns(n)?,
            key: key(c)?,
            owner: owner(o)?,
        },
        CommandRec::Release {
            namespace: n,
            key: c,
            owner: o,
        } => Command::Release {
            namespace: ns(n)?,
            key: key(c)?,
            owner: owner(o)?,
        },
        CommandRec::Tick => Command::Tick {},
        CommandRec::Transfer {
            from,
            to,
            amount: m,
            deadline_ms,
        } => Command::Transfer {
            from: account(from)?,
            to: account(to)?,
            amount: amount(m)?,
            deadline_ms: deadline(k, deadline_ms)?,
        },
        CommandRec::Saga { steps, deadline_ms } => {
            let steps = steps
                .into_iter()
                .map(|s| step(k, s))
                .collect::<Result<Vec<_>>>()?;
            Command::Saga {
                steps: text(k, "saga steps", Steps::new(steps))?,
                deadline_ms: deadline(k, deadline_ms)?,
            }
        }
        CommandRec::Step {
            saga,
            index,
            phase,
            step: s,
        } => Command::Step {
            saga: op_id_from_bytes(saga),
            index,
            phase: match phase {
                PhaseRec::Try => Phase::Try,
                PhaseRec::Confirm => Phase::Confirm,
                PhaseRec::Cancel => Phase::Cancel,
            },
            step: step(k, s)?,
        },
        CommandRec::StepOutcome {
            saga,
            index,
            outcome: o,
        } => Command::StepOutcome {
            saga: op_id_from_bytes(saga),
            index,
            outcome: outcome(k, o)?,
        },
    })
}

fn deadline(key: &[u8], ms: Option<u64>) -> Result<Option<DeadlineMs>> {
    ms.map(|ms| text(key, "saga deadline", DeadlineMs::new(ms)))
        .transpose()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn id(n: u128) -> OpId {
        OpId::v7_from_parts(1_700_000_000_000, n)
    }

    fn acct(s: &str) -> AccountId {
        AccountId::new(s).unwrap()
    }

    fn decision(outcome: Outcome) -> Decision {
        Decision::new(id(1), 3, 17, 1_700_000_000_500, outcome)
    }

    /// A transfer's decision: it carries what the transfer moves.
    fn transfer_decision(outcome: Outcome) -> Decision {
        Decision {
            transfer: Some(Transfer {
                from: acct("acct-1"),
                to: acct("acct-2"),
                amount: Amount::new(30).unwrap(),
            }),
            ..decision(outcome)
        }
    }

    /// One example of every reason this build has a compact form for.
    fn every_reason() -> Vec<Reason> {
        let owner = Owner::new("alice").unwrap();
        vec![
            Reason::Malformed {
                detail: "bad json".into(),
            },
            Reason::OpIdConflict,
            Reason::OpIdOutsideWindow {
                op_time_ms: 1,
                earliest_ms: 2,
                latest_ms: 3,
            },
            Reason::UnknownAccount,
            Reason::AccountExists,
            Reason::InvalidLimits {
                floor: 5,
                ceiling: Some(-1),
            },
            Reason::HoldNotFound,
            Reason::HoldAlreadyPosted,
            Reason::HoldAlreadyVoided,
            Reason::HoldExpired,
            Reason::PostExceedsHold {
                held: 5,
                requested: 6,
            },
            Reason::Overflow,
            Reason::InsufficientFunds {
                available: -3,
                floor: -10,
                requested: 8,
            },
            Reason::CeilingExceeded {
                balance: 5,
                ceiling: 9,
                requested: 7,
            },
            Reason::AlreadyClaimed {
                owner: owner.clone(),
            },
            Reason::NotClaimed,
            Reason::NotOwner { owner },
            Reason::ClaimPending,
            // Recursive: a refused step of a saga whose own step was refused.
            Reason::StepRefused {
                step: 1,
                reason: Box::new(Reason::StepRefused {
                    step: 0,
                    reason: Box::new(Reason::CeilingExceeded {
                        balance: 1,
                        ceiling: 2,
                        requested: 3,
                    }),
                }),
            },
            Reason::DeadlineExceeded {
                deadline_ms: 1_700_000_060_000,
            },
            Reason::SagaCancelled,
            Reason::ReplySubjectInvalid { bytes_max: 256 },
            Reason::WrongPartition { partition: 3 },
        ]
    }

    /// Every outcome kind.
    fn every_outcome() -> Vec<Outcome> {
        let mut out = vec![
            Outcome::Confirmed {
                balance: Some(-4),
                available: Some(3),
            },
            Outcome::Confirmed {
                balance: None,
                available: None,
            },
            Outcome::InFlight { step: 2 },
        ];
        out.extend(
            every_reason()
                .into_iter()
                .map(|reason| Outcome::Rejected { reason }),
        );
        out
    }

    fn step(command: Command, compensation: Option<Command>) -> SagaStep {
        SagaStep::new(command, compensation).unwrap()
    }

    fn every_command() -> Vec<Command> {
        let a = acct("acct-1");
        let amt = Amount::new(7).unwrap();
        let ns = Namespace::new("username").unwrap();
        let key = ClaimKey::new("alice").unwrap();
        let owner = Owner::new("user-1").unwrap();
        vec![
            Command::OpenAccount {
                account: a.clone(),
                floor: -5,
                ceiling: Some(100),
            },
            Command::Credit {
                account: a.clone(),
                amount: amt,
            },
            Command::Debit {
                account: a.clone(),
                amount: amt,
            },
            Command::Hold {
                account: a.clone(),
                amount: amt,
                timeout_ms: Some(30),
            },
            Command::Post {
                account: a.clone(),
                hold: id(9),
                amount: Some(amt),
            },
            Command::Void {
                account: a,
                hold: id(9),
            },
            Command::Claim {
                namespace: ns.clone(),
                key: key.clone(),
                owner: owner.clone(),
            },
            Command::Release {
                namespace: ns.clone(),
                key: key.clone(),
                owner: owner.clone(),
            },
            Command::Tick {},
            Command::Transfer {
                from: acct("acct-1"),
                to: acct("acct-2"),
                amount: amt,
                deadline_ms: Some(DeadlineMs::new(5_000).unwrap()),
            },
            Command::Transfer {
                from: acct("acct-1"),
                to: acct("acct-2"),
                amount: amt,
                deadline_ms: None,
            },
            Command::Saga {
                steps: Steps::new(vec![
                    step(
                        Command::Debit {
                            account: acct("acct-1"),
                            amount: amt,
                        },
                        None,
                    ),
                    step(
                        Command::OpenAccount {
                            account: acct("acct-3"),
                            floor: 0,
                            ceiling: None,
                        },
                        Some(Command::Debit {
                            account: acct("acct-3"),
                            amount: amt,
                        }),
                    ),
                    step(
                        Command::Claim {
                            namespace: ns.clone(),
                            key: key.clone(),
                            owner: owner.clone(),
                        },
                        None,
                    ),
                ])
                .unwrap(),
                deadline_ms: None,
            },
            Command::Step {
                saga: id(20),
                index: 3,
                phase: Phase::Cancel,
                step: step(
                    Command::Claim {
                        namespace: ns,
                        key,
                        owner,
                    },
                    None,
                ),
            },
            Command::StepOutcome {
                saga: id(20),
                index: 1,
                outcome: Outcome::Rejected {
                    reason: Reason::InsufficientFunds {
                        available: 0,
                        floor: 0,
                        requested: 7,
                    },
                },
            },
        ]
    }

    /// One saga in every state, with and without the optional fields.
    fn every_saga() -> Vec<Saga> {
        let commands = every_command();
        let sagas = commands
            .iter()
            .filter(|c| matches!(c, Command::Transfer { .. } | Command::Saga { .. }));
        let states = [
            SagaState::Trying { step: 1 },
            SagaState::Confirmed {
                at_ms: 1_700_000_001_000,
            },
            SagaState::Cancelled {
                at_ms: 1_700_000_002_000,
            },
        ];
        sagas
            .zip(states.iter().cycle())
            .enumerate()
            .flat_map(|(i, (command, state))| {
                [
                    Saga {
                        command: command.clone(),
                        apology_topic: Some(Topic::new("transfers.refused").unwrap()),
                        reply_to: Some(format!("_INBOX.abc.{i}")),
                        deadline_ms: 1_700_000_060_000,
                        state: *state,
                    },
                    Saga {
                        command: command.clone(),
                        apology_topic: None,
                        reply_to: None,
                        deadline_ms: 1,
                        state: SagaState::Cancelled { at_ms: 0 },
                    },
                ]
            })
            .chain(states.iter().map(|state| Saga {
                command: commands[commands.len() - 4].clone(),
                apology_topic: None,
                reply_to: None,
                deadline_ms: 9,
                state: *state,
            }))
            .collect()
    }

    #[test]
    fn every_reason_has_a_compact_form_and_round_trips() {
        // Adding a reason to amends-core must add its compact form here too
        // (it would otherwise be stored as JSON): the count must match.
        let reasons = every_reason();
        assert_eq!(
            reasons.len(),
            Reason::CODES.len(),
            "a Reason lacks a compact record form"
        );
        for r in reasons {
            let rec = reason_rec(&r);
            assert!(
                !matches!(rec, ReasonRec::Json(_)),
                "{r:?} fell back to JSON"
            );
            assert_eq!(reason(b"k", rec).unwrap(), r);
        }
    }

    #[test]
    fn effects_round_trip_through_a_chunk() {
        // Every effect kind, with every command and reason, survives a chunk.
        let mut effects = vec![
            Effect::Decided(decision(Outcome::Confirmed {
                balance: Some(-4),
                available: None,
            })),
            Effect::HoldExpired(HoldExpired {
                event_id: id(2).derive("expiry"),
                hold: id(2),
                account: acct("acct-2"),
                amount: 50,
                partition: 3,
                position: 99,
                log_time_ms: 1_700_000_001_000,
            }),
        ];
        for (command, reason) in every_command()
            .into_iter()
            .zip(every_reason().into_iter().cycle())
        {
            effects.push(Effect::Apology(Apology {
                topic: Topic::new("orders.refused").unwrap(),
                command,
                decision: decision(Outcome::Rejected { reason }),
            }));
        }
        for outcome in every_outcome() {
            effects.push(Effect::Decided(decision(outcome.clone())));
            effects.push(Effect::Decided(transfer_decision(outcome.clone())));
            effects.push(Effect::Reply {
                to: "_INBOX.client.7".into(),
                decision: decision(outcome.clone()),
            });
            effects.push(Effect::Reply {
                to: "_INBOX.client.7".into(),
                decision: transfer_decision(outcome),
            });
        }
        for (i, command) in (0_u32..).zip(every_command()) {
            effects.push(Effect::Send {
                partition: Partitions::new(PARTITIONS_MAX).unwrap().id(i).unwrap(),
                request: Request {
                    op_id: id(u128::from(i)).derive("step"),
                    command,
                    apology_topic: (i % 2 == 0).then(|| Topic::new("t").unwrap()),
                },
            });
        }
        effects.push(Effect::DeadLetter(DeadLetter {
            position: 77,
            detail: "expected value at line 1 column 1".into(),
            bytes: b"\xff not json".to_vec(),
        }));
        let mut chunk = outbox_chunk_start();
        for e in &effects {
            encode_effect_into(e, &mut chunk);
        }
        assert_eq!(decode_outbox_chunk(b"o", &chunk).unwrap(), effects);
    }

    #[test]
    fn records_round_trip() {
        // Accounts, holds, claims, dedup records and the head decode to what
        // was encoded.
        let a = Account {
            balance: -5,
            held: 3,
            floor: -10,
            ceiling: Some(1000),
            incoming: 42,
        };
        assert_eq!(decode_account(b"a", &encode_account(&a)).unwrap(), a);
        for status in [
            HoldStatus::Pending,
            HoldStatus::Posted {
                amount: 2,
                at_ms: 4,
            },
            HoldStatus::Voided { at_ms: 5 },
            HoldStatus::Expired { at_ms: 6 },
        ] {
            let h = Hold {
                account: acct("x"),
                amount: 9,
                expires_at_ms: Some(77),
                status,
            };
            assert_eq!(decode_hold(b"h", &encode_hold(&h)).unwrap(), h);
        }
        for tentative in [None, Some(id(4))] {
            let c = Claim {
                owner: Owner::new("bob").unwrap(),
                tentative,
            };
            assert_eq!(decode_claim(b"c", &encode_claim(&c)).unwrap(), c);
        }
        for outcome in every_outcome() {
            for decision in [decision(outcome.clone()), transfer_decision(outcome)] {
                let d = Dedup {
                    fingerprint: Fingerprint(u128::MAX - 3),
                    decision,
                };
                assert_eq!(decode_dedup(b"d", id(1), &encode_dedup(&d)).unwrap(), d);
            }
        }
        let sagas = every_saga();
        assert!(sagas.len() >= 6, "both saga commands in every state");
        for s in sagas {
            assert_eq!(decode_saga(b"s", &encode_saga(&s)).unwrap(), s);
        }
        let h = Head {
            clock: Clock {
                position: 8,
                log_time_ms: 9,
            },
            outbox_end: 10,
        };
        assert_eq!(decode_head(b"!", &encode_head(&h)).unwrap(), h);
    }

    #[test]
    fn the_quick_age_of_a_dedup_record_agrees_with_the_core() {
        // Compaction reads only the front of a dedup record; its verdict
        // must be the core's `Dedup::is_compactable` for every horizon.
        for decision in every_outcome()
            .into_iter()
            .flat_map(|o| [decision(o.clone()), transfer_decision(o)])
        {
            let d = Dedup {
                fingerprint: Fingerprint(7),
                decision,
            };
            let body = encode_dedup(&d);
            let t = dedup_log_time_ms(b"d", &body).unwrap();
            for h in [0, t - 1, t, t + 1, u64::MAX] {
                assert_eq!(t < h, d.is_compactable(h), "horizon {h}");
            }
        }
    }

    #[test]
    fn encoding_is_pinned() {
        // The bytes of a record are part of the store format: a change here
        // needs a new FORMAT_VERSION. A whole record starts with that
        // version (5).
        let cases: Vec<(Vec<u8>, &[u8])> = vec![
            (
                encode_account(&Account {
                    balance: -5,
                    held: 3,
                    floor: 0,
                    ceiling: None,
                    incoming: 2,
                }),
                &[5, 9, 6, 0, 0, 4],
            ),
            (
                encode_head(&Head {
                    clock: Clock {
                        position: 300,
                        log_time_ms: 2,
                    },
                    outbox_end: 1,
                }),
                &[5, 0xac, 0x02, 2, 1],
            ),
            (
                encode_claim(&Claim {
                    owner: Owner::new("ab").unwrap(),
                    tentative: None,
                }),
                &[5, 2, b'a', b'b', 0],
            ),
            (
                encode_saga(&Saga {
                    command: Command::Transfer {
                        from: acct("a"),
                        to: acct("b"),
                        amount: Amount::new(5).unwrap(),
                        deadline_ms: None,
                    },
                    apology_topic: None,
                    reply_to: None,
                    deadline_ms: 3,
                    state: SagaState::Trying { step: 1 },
                }),
                // A packed body: no version byte. Command variant 9
                // (transfer), "a", "b", 5, no deadline; no topic, no reply,
                // deadline 3, state 0 (trying) step 1.
                &[9, 1, b'a', 1, b'b', 5, 0, 0, 0, 3, 0, 1],
            ),
            (encode_marker(), &[5]),
            (
                encode_dedup(&Dedup {
                    fingerprint: Fingerprint(1),
                    decision: Decision {
                        transfer: Some(Transfer {
                            from: acct("a"),
                            to: acct("b"),
                            amount: Amount::new(5).unwrap(),
                        }),
                        ..Decision::new(id(1), 1, 2, 3, Outcome::confirmed())
                    },
                }),
                // A packed body: the fingerprint's 16 bytes, partition 1,
                // position 2, log time 3, outcome 0 (confirmed) with no
                // balance and no available, then the transfer: some, "a",
                // "b", 5.
                &[
                    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 0, 0, 0, 1, 1, b'a',
                    1, b'b', 5,
                ],
            ),
            (
                {
                    let mut chunk = outbox_chunk_start();
                    encode_effect_into(
                        &Effect::DeadLetter(DeadLetter {
                            position: 300,
                            detail: "x".into(),
                            bytes: vec![0xff, b'{'],
                        }),
                        &mut chunk,
                    );
                    chunk
                },
                // The chunk's version byte, then outbox entry variant 5
                // (dead letter), position 300, "x", the two bytes.
                &[5, 5, 0xac, 0x02, 1, b'x', 2, 0xff, b'{'],
            ),
        ];
        for (got, want) in cases {
            assert_eq!(got, want);
        }
    }

    #[test]
    fn reasons_added_later_keep_the_older_indices() {
        // Proves the reasons added after format 2 was fixed were appended (after `Json`), so every reason stored before them still decodes to what it was.
        let cases: Vec<(Reason, &[u8])> = vec![
            (Reason::Malformed { detail: "x".into() }, &[0, 1, b'x']),
            (Reason::SagaCancelled, &[20]),
            (
                Reason::ReplySubjectInvalid { bytes_max: 256 },
                &[22, 0x80, 0x02],
            ),
            (Reason::WrongPartition { partition: 3 }, &[23, 3]),
        ];
        for (r, want) in cases {
            let got = postcard::to_allocvec(&reason_rec(&r)).unwrap();
            assert_eq!(got, want, "{r:?}");
        }
        let json = postcard::to_allocvec(&ReasonRec::Json("{}".into())).unwrap();
        assert_eq!(json, [21, 2, b'{', b'}']);
    }

    #[test]
    fn damaged_records_are_refused() {
        // Another version byte, an empty value, trailing bytes or garbage
        // are reported as corruption naming the key, never reinterpreted.
        let good = encode_account(&Account::open(0, None));
        let mut other_version = good.clone();
        other_version[0] = 1;
        let mut trailing = good.clone();
        trailing.push(0);
        for (bad, needle) in [
            (other_version, "format version 1"),
            (Vec::new(), "empty value"),
            (trailing, "trailing"),
            (vec![FORMAT_VERSION, 0xff], "undecodable"),
        ] {
            let err = decode_account(b"aacct-\x01", &bad).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(needle), "{msg}");
            assert!(msg.contains("aacct-\\x01"), "{msg}");
        }
        let bad_owner = encode(&ClaimRec {
            owner: String::new(),
            tentative: None,
        });
        assert!(
            decode_claim(b"c", &bad_owner)
                .unwrap_err()
                .to_string()
                .contains("owner")
        );
    }
}
