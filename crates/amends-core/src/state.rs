//! The records a partition keeps and the narrow traits through which the
//! state machine reads and writes them.
//!
//! A store implements [`Read`] over its durable records; the state machine
//! writes into a [`ChangeSet`] through an [`Overlay`] (which reads its own
//! writes first), and the store commits the change set atomically with the
//! batch's applied position. [`MemState`] keeps everything in memory and
//! implements both traits directly: the reference for tests and benchmarks.
//!
//! A read returns the store's error when it fails ([`Read::Error`]); the
//! state machine stops on it (`Fault::Read`), so a decision is never made
//! over state that could not be read, and no driver has to check for that.

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::fmt;
use std::hash::{Hash, Hasher};

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::command::{AccountId, Command, Fingerprint, Owner, Topic};
use crate::decision::Decision;
use crate::id::OpId;

/// An account's balance and limits.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Account {
    /// Credits minus debits minus posted holds.
    pub balance: i64,
    /// The sum of pending holds; never negative.
    pub held: i64,
    /// The lowest balance minus holds may reach (at most 0).
    pub floor: i64,
    /// The highest the balance may reach, if any (at least 0).
    pub ceiling: Option<i64>,
    /// The sum of credits reserved by sagas in flight; never negative.
    /// They count against the ceiling, not in the balance.
    pub incoming: i64,
}

impl Account {
    /// A fresh account with a zero balance.
    pub const fn open(floor: i64, ceiling: Option<i64>) -> Account {
        Account {
            balance: 0,
            held: 0,
            floor,
            ceiling,
            incoming: 0,
        }
    }

    /// Balance minus pending holds, or `None` on overflow (which the state
    /// machine never lets happen).
    pub fn available(&self) -> Option<i64> {
        self.balance.checked_sub(self.held)
    }
}

/// Where a hold is in its life.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum HoldStatus {
    /// Reserved; counts in the account's `held`.
    Pending,
    /// Posted: `amount` was taken from the balance.
    Posted {
        /// How much was taken.
        amount: i64,
        /// The log time of the post.
        at_ms: u64,
    },
    /// Voided: nothing taken.
    Voided {
        /// The log time of the void.
        at_ms: u64,
    },
    /// Lapsed at its expiry: nothing taken.
    Expired {
        /// The log time at which the expiry was applied.
        at_ms: u64,
    },
}

/// A two-phase reservation on an account, named by the op id of its `hold`
/// request.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Hold {
    /// The account the hold is on.
    pub account: AccountId,
    /// The amount reserved.
    pub amount: i64,
    /// The log time at which the hold lapses, if it has a timeout.
    pub expires_at_ms: Option<u64>,
    /// Pending or resolved.
    pub status: HoldStatus,
}

impl Hold {
    /// When the hold was resolved, if it was.
    pub const fn resolved_at_ms(&self) -> Option<u64> {
        match self.status {
            HoldStatus::Pending => None,
            HoldStatus::Posted { at_ms, .. }
            | HoldStatus::Voided { at_ms }
            | HoldStatus::Expired { at_ms } => Some(at_ms),
        }
    }

    /// Whether compaction at `horizon_ms` may forget this hold: resolved
    /// before the horizon (a pending hold is never forgotten).
    pub fn is_compactable(&self, horizon_ms: u64) -> bool {
        self.resolved_at_ms().is_some_and(|t| t < horizon_ms)
    }
}

/// Who owns a claimed key.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Claim {
    /// The owner.
    pub owner: Owner,
    /// For a claim a saga holds tentatively: the op id of the step's try.
    /// The saga's confirm makes it final (`None`); its cancel removes it.
    pub tentative: Option<OpId>,
}

impl Claim {
    /// A final claim by `owner`.
    pub const fn owned_by(owner: Owner) -> Claim {
        Claim {
            owner,
            tentative: None,
        }
    }
}

/// Where a saga is.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum SagaState {
    /// Waiting for the outcome of step `step`'s try; the steps before it
    /// were tried with success.
    Trying {
        /// The index of the step in flight.
        step: u32,
    },
    /// Every step was tried with success and confirmed.
    Confirmed {
        /// The log time of the confirmation.
        at_ms: u64,
    },
    /// A step was refused or the deadline passed; the steps were cancelled.
    Cancelled {
        /// The log time of the cancellation.
        at_ms: u64,
    },
}

/// A saga, kept by the partition of its op id.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Saga {
    /// The request's command: a `transfer` or a `saga`. Its steps are
    /// [`crate::saga::steps`] of it.
    pub command: Command,
    /// The apology topic of an optimistic saga.
    pub apology_topic: Option<Topic>,
    /// Where the final decision is sent, besides the decisions stream: the
    /// reply subject of the request (or of its latest resubmission).
    pub reply_to: Option<String>,
    /// The log time at which an unfinished saga is cancelled.
    pub deadline_ms: u64,
    /// Where the saga is.
    pub state: SagaState,
}

impl Saga {
    /// When the saga ended, if it has.
    pub const fn ended_at_ms(&self) -> Option<u64> {
        match self.state {
            SagaState::Trying { .. } => None,
            SagaState::Confirmed { at_ms } | SagaState::Cancelled { at_ms } => Some(at_ms),
        }
    }

    /// Whether compaction at `horizon_ms` may forget this saga: it ended
    /// before the horizon (a saga in flight is never forgotten).
    pub fn is_compactable(&self, horizon_ms: u64) -> bool {
        self.ended_at_ms().is_some_and(|t| t < horizon_ms)
    }
}

/// What a partition remembers of an operation it decided: enough to answer
/// a duplicate with the same decision and to spot a conflicting reuse.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Dedup {
    /// The fingerprint of the body that was decided.
    pub fingerprint: Fingerprint,
    /// The decision, returned again to every duplicate.
    pub decision: Decision,
}

impl Dedup {
    /// Whether compaction at `horizon_ms` may forget this record.
    ///
    /// Both the decision's log time and the op id's own v7 timestamp must be
    /// before the horizon. The state machine records only op ids inside the
    /// window (timestamp at most `skew` after the decision), so the first
    /// condition alone already means the op id is outside the window for
    /// good (see [`crate::partition::Config::compaction_horizon_ms`]); the
    /// second is kept so that a record can never be forgotten while its op
    /// id could still be accepted, whatever wrote it (the model tests,
    /// `tests/model`, found the case when refusals outside the window were
    /// still recorded). Op ids that are not v7 are never recorded; should
    /// such a record exist, it goes by the first condition alone.
    pub fn is_compactable(&self, horizon_ms: u64) -> bool {
        self.decision.log_time_ms < horizon_ms
            && self
                .decision
                .op_id
                .v7_unix_ms()
                .is_none_or(|t| t < horizon_ms)
    }
}

/// An entry of the expiry index: a pending hold and the log time at which it
/// lapses, or a saga in flight and its deadline; ordered by time then id.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct ExpiryKey {
    /// When the hold lapses (or the saga's deadline).
    pub at_ms: u64,
    /// The hold's op id, or the saga's.
    pub id: OpId,
}

/// How far a partition has read its log.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct Clock {
    /// The position of the last applied log message (0: none yet).
    pub position: u64,
    /// The log time of the last applied message; log time never goes back.
    pub log_time_ms: u64,
}

/// Reads a partition's state. Implemented by stores, by [`Overlay`] and
/// [`Stacked`] (with their base's error), and by [`MemState`].
///
/// Every read can fail with [`Read::Error`] (a store's I/O error or corrupt
/// record): the state machine stops at the first failed read with
/// `Fault::Read` (see [`crate::partition::Fault`]), so nothing is decided
/// over state that could not be read.
pub trait Read {
    /// Why a read failed. [`std::convert::Infallible`] for state in memory.
    type Error: std::error::Error;
    /// The account with this id.
    fn account(&self, id: &str) -> Result<Option<Account>, Self::Error>;
    /// The hold with this id.
    fn hold(&self, id: OpId) -> Result<Option<Hold>, Self::Error>;
    /// The claim on this claim routing key (`namespace` U+001F `key`).
    fn claim(&self, key: &str) -> Result<Option<Claim>, Self::Error>;
    /// The dedup record of this op id.
    fn dedup(&self, op: OpId) -> Result<Option<Dedup>, Self::Error>;
    /// The saga with this op id (kept by the saga's own partition).
    fn saga(&self, id: OpId) -> Result<Option<Saga>, Self::Error>;
    /// The first entry of the expiry index strictly after `after` (from the
    /// start when `None`).
    fn expiry_after(&self, after: Option<ExpiryKey>) -> Result<Option<ExpiryKey>, Self::Error>;
    /// The applied position and log time.
    fn clock(&self) -> Result<Clock, Self::Error>;
}

/// Writes a partition's state. Implemented by [`Overlay`] (into a change
/// set) and [`MemState`].
pub trait Write {
    /// Stores an account.
    fn put_account(&mut self, id: &AccountId, account: Account);
    /// Stores a hold.
    fn put_hold(&mut self, id: OpId, hold: Hold);
    /// Stores (`Some`) or removes (`None`) a claim.
    fn put_claim(&mut self, key: &str, claim: Option<Claim>);
    /// Stores a dedup record.
    fn put_dedup(&mut self, op: OpId, dedup: Dedup);
    /// Stores a saga.
    fn put_saga(&mut self, id: OpId, saga: Saga);
    /// Adds (`true`) or removes (`false`) an expiry index entry.
    fn put_expiry(&mut self, key: ExpiryKey, present: bool);
    /// Records the applied position and log time.
    fn set_clock(&mut self, clock: Clock);
}

/// The writes of one batch, in a form a store can commit atomically.
///
/// Iteration order of the maps is irrelevant to a store (it writes them all
/// in one atomic batch); `dedup_order` keeps the order in which operations
/// were decided, which is the order of the outbox.
#[derive(Clone, Debug, Default)]
pub struct ChangeSet {
    /// Accounts written.
    pub accounts: FxHashMap<AccountId, Account>,
    /// Holds written.
    pub holds: FxHashMap<OpId, Hold>,
    /// Claims written (`None`: removed).
    pub claims: FxHashMap<String, Option<Claim>>,
    /// Dedup records written.
    pub dedup: FxHashMap<OpId, Dedup>,
    /// The op ids of `dedup`, in the order they were decided.
    pub dedup_order: Vec<OpId>,
    /// Sagas written.
    pub sagas: FxHashMap<OpId, Saga>,
    /// Expiry index changes (`false`: removed).
    pub expiries: BTreeMap<ExpiryKey, bool>,
    /// The new clock, if anything was applied.
    pub clock: Option<Clock>,
}

impl ChangeSet {
    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.clock.is_none()
            && self.accounts.is_empty()
            && self.holds.is_empty()
            && self.claims.is_empty()
            && self.dedup.is_empty()
            && self.sagas.is_empty()
            && self.expiries.is_empty()
    }

    /// Forgets every write, keeping the allocations.
    pub fn clear(&mut self) {
        self.accounts.clear();
        self.holds.clear();
        self.claims.clear();
        self.dedup.clear();
        self.dedup_order.clear();
        self.sagas.clear();
        self.expiries.clear();
        self.clock = None;
    }
}

/// A base state seen through a change set: reads hit the change set first,
/// writes go only to the change set.
#[derive(Debug)]
pub struct Overlay<'a, B: Read + ?Sized> {
    base: &'a B,
    changes: &'a mut ChangeSet,
}

impl<'a, B: Read + ?Sized> Overlay<'a, B> {
    /// Views `base` through `changes`.
    pub fn new(base: &'a B, changes: &'a mut ChangeSet) -> Overlay<'a, B> {
        Overlay { base, changes }
    }

    fn view(&self) -> Stacked<'_, B> {
        Stacked {
            base: self.base,
            top: self.changes,
        }
    }
}

impl<B: Read + ?Sized> Read for Overlay<'_, B> {
    type Error = B::Error;

    fn account(&self, id: &str) -> Result<Option<Account>, B::Error> {
        self.view().account(id)
    }

    fn hold(&self, id: OpId) -> Result<Option<Hold>, B::Error> {
        self.view().hold(id)
    }

    fn claim(&self, key: &str) -> Result<Option<Claim>, B::Error> {
        self.view().claim(key)
    }

    fn dedup(&self, op: OpId) -> Result<Option<Dedup>, B::Error> {
        self.view().dedup(op)
    }

    fn saga(&self, id: OpId) -> Result<Option<Saga>, B::Error> {
        self.view().saga(id)
    }

    fn expiry_after(&self, after: Option<ExpiryKey>) -> Result<Option<ExpiryKey>, B::Error> {
        self.view().expiry_after(after)
    }

    fn clock(&self) -> Result<Clock, B::Error> {
        self.view().clock()
    }
}

/// A base state seen through a change set that is not written any more: a
/// read-only [`Overlay`]. A driver applies batch N+1 over
/// `Stacked { base: store, top: batch N's changes }` while batch N is being
/// committed, so that the two overlap and N+1 sees N's writes.
#[derive(Debug, Clone, Copy)]
pub struct Stacked<'a, B: Read + ?Sized> {
    /// The state below.
    pub base: &'a B,
    /// The writes on top of it, read first.
    pub top: &'a ChangeSet,
}

impl<B: Read + ?Sized> Read for Stacked<'_, B> {
    type Error = B::Error;

    fn account(&self, id: &str) -> Result<Option<Account>, B::Error> {
        match self.top.accounts.get(id) {
            Some(a) => Ok(Some(*a)),
            None => self.base.account(id),
        }
    }

    fn hold(&self, id: OpId) -> Result<Option<Hold>, B::Error> {
        match self.top.holds.get(&id) {
            Some(h) => Ok(Some(h.clone())),
            None => self.base.hold(id),
        }
    }

    fn claim(&self, key: &str) -> Result<Option<Claim>, B::Error> {
        match self.top.claims.get(key) {
            Some(c) => Ok(c.clone()),
            None => self.base.claim(key),
        }
    }

    fn dedup(&self, op: OpId) -> Result<Option<Dedup>, B::Error> {
        match self.top.dedup.get(&op) {
            Some(d) => Ok(Some(d.clone())),
            None => self.base.dedup(op),
        }
    }

    fn saga(&self, id: OpId) -> Result<Option<Saga>, B::Error> {
        match self.top.sagas.get(&id) {
            Some(s) => Ok(Some(s.clone())),
            None => self.base.saga(id),
        }
    }

    fn expiry_after(&self, after: Option<ExpiryKey>) -> Result<Option<ExpiryKey>, B::Error> {
        // The first base entry not removed by the change set.
        let mut cursor = after;
        let from_base = loop {
            match self.base.expiry_after(cursor)? {
                Some(k) if self.top.expiries.get(&k) == Some(&false) => cursor = Some(k),
                other => break other,
            }
        };
        let mut added = match after {
            None => self.top.expiries.range(..),
            Some(a) => self
                .top
                .expiries
                .range((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
        };
        let from_changes = added.find(|(_, present)| **present).map(|(k, _)| *k);
        Ok(match (from_base, from_changes) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }

    fn clock(&self) -> Result<Clock, B::Error> {
        match self.top.clock {
            Some(c) => Ok(c),
            None => self.base.clock(),
        }
    }
}

impl<B: Read + ?Sized> Write for Overlay<'_, B> {
    fn put_account(&mut self, id: &AccountId, account: Account) {
        if let Some(slot) = self.changes.accounts.get_mut(id.as_str()) {
            *slot = account;
        } else {
            self.changes.accounts.insert(id.clone(), account);
        }
    }

    fn put_hold(&mut self, id: OpId, hold: Hold) {
        self.changes.holds.insert(id, hold);
    }

    fn put_claim(&mut self, key: &str, claim: Option<Claim>) {
        self.changes.claims.insert(key.to_owned(), claim);
    }

    fn put_dedup(&mut self, op: OpId, dedup: Dedup) {
        if self.changes.dedup.insert(op, dedup).is_none() {
            self.changes.dedup_order.push(op);
        }
    }

    fn put_saga(&mut self, id: OpId, saga: Saga) {
        self.changes.sagas.insert(id, saga);
    }

    fn put_expiry(&mut self, key: ExpiryKey, present: bool) {
        self.changes.expiries.insert(key, present);
    }

    fn set_clock(&mut self, clock: Clock) {
        self.changes.clock = Some(clock);
    }
}

/// How many leading bytes of a text key a [`MemState`] map entry keeps
/// inline, next to the key.
///
/// A lookup compares the inline head first, and a key no longer than this
/// (most account ids and claim routing keys) is decided by the head alone,
/// without following the key's heap pointer: in a large state that pointer
/// is a second cache miss per lookup, after the miss on the entry itself.
const KEY_HEAD_BYTES: usize = 22;

/// A text key's length (saturated) and first [`KEY_HEAD_BYTES`] bytes.
/// Equal keys have equal heads; the head of a key no longer than
/// [`KEY_HEAD_BYTES`] is the whole key.
#[derive(Clone, Copy, PartialEq, Eq)]
struct KeyHead {
    len: u16,
    bytes: [u8; KEY_HEAD_BYTES],
}

impl KeyHead {
    #[inline]
    fn of(text: &str) -> KeyHead {
        let mut bytes = [0; KEY_HEAD_BYTES];
        let n = text.len().min(KEY_HEAD_BYTES);
        bytes[..n].copy_from_slice(&text.as_bytes()[..n]);
        KeyHead {
            len: u16::try_from(text.len()).unwrap_or(u16::MAX),
            bytes,
        }
    }

    /// Whether the head is the whole key.
    #[inline]
    fn is_whole(&self) -> bool {
        usize::from(self.len) <= KEY_HEAD_BYTES
    }
}

/// What [`MemState`]'s text-keyed maps look keys up by: both a stored
/// [`Keyed`] and a borrowed [`Probe`] provide it, so a lookup by `&str`
/// allocates nothing and compares heads before texts.
trait KeyView {
    fn head(&self) -> &KeyHead;
    fn text(&self) -> &str;
}

impl Hash for dyn KeyView + '_ {
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        // The hash of the text alone, as when the maps were keyed by it.
        self.text().hash(state);
    }
}

impl PartialEq for dyn KeyView + '_ {
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        let head = self.head();
        head == other.head() && (head.is_whole() || self.text() == other.text())
    }
}

impl Eq for dyn KeyView + '_ {}

/// A text map key of [`MemState`] with its inline head. It hashes, compares
/// and prints as its text.
#[derive(Clone)]
struct Keyed<T> {
    head: KeyHead,
    text: T,
}

impl<T: Borrow<str>> Keyed<T> {
    fn new(text: T) -> Keyed<T> {
        Keyed {
            head: KeyHead::of(text.borrow()),
            text,
        }
    }
}

impl<T: Borrow<str>> KeyView for Keyed<T> {
    #[inline]
    fn head(&self) -> &KeyHead {
        &self.head
    }
    #[inline]
    fn text(&self) -> &str {
        self.text.borrow()
    }
}

impl<'a, T: Borrow<str> + 'a> Borrow<dyn KeyView + 'a> for Keyed<T> {
    #[inline]
    fn borrow(&self) -> &(dyn KeyView + 'a) {
        self
    }
}

impl<T: Borrow<str>> Hash for Keyed<T> {
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        let view: &dyn KeyView = self;
        view.hash(state);
    }
}

impl<T: Borrow<str>> PartialEq for Keyed<T> {
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        let (a, b): (&dyn KeyView, &dyn KeyView) = (self, other);
        a == b
    }
}

impl<T: Borrow<str>> Eq for Keyed<T> {}

impl<T: fmt::Debug> fmt::Debug for Keyed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.text.fmt(f)
    }
}

/// A borrowed text key to look up with.
struct Probe<'a> {
    head: KeyHead,
    text: &'a str,
}

impl Probe<'_> {
    #[inline]
    fn new(text: &str) -> Probe<'_> {
        Probe {
            head: KeyHead::of(text),
            text,
        }
    }

    /// The probe as what the maps look up by.
    #[inline]
    fn view(&self) -> &(dyn KeyView + '_) {
        self
    }
}

impl KeyView for Probe<'_> {
    #[inline]
    fn head(&self) -> &KeyHead {
        &self.head
    }
    #[inline]
    fn text(&self) -> &str {
        self.text
    }
}

/// A whole partition state in memory.
///
/// It is the reference implementation of [`Read`] and [`Write`], the state
/// of the property tests and the benchmark, and what `amends audit` derives
/// from a log. Two states are equal when every record is equal.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemState {
    accounts: FxHashMap<Keyed<AccountId>, Account>,
    holds: FxHashMap<OpId, Hold>,
    claims: FxHashMap<Keyed<String>, Claim>,
    dedup: FxHashMap<OpId, Dedup>,
    sagas: FxHashMap<OpId, Saga>,
    expiries: BTreeSet<ExpiryKey>,
    clock: Clock,
}

impl MemState {
    /// An empty partition.
    pub fn new() -> MemState {
        MemState::default()
    }

    /// Commits a change set into this state.
    pub fn absorb(&mut self, changes: &mut ChangeSet) {
        for (id, a) in changes.accounts.drain() {
            self.accounts.insert(Keyed::new(id), a);
        }
        for (id, h) in changes.holds.drain() {
            self.holds.insert(id, h);
        }
        for (k, c) in changes.claims.drain() {
            match c {
                Some(c) => self.claims.insert(Keyed::new(k), c),
                None => self.claims.remove(Probe::new(&k).view()),
            };
        }
        for (op, d) in changes.dedup.drain() {
            self.dedup.insert(op, d);
        }
        for (id, saga) in changes.sagas.drain() {
            self.sagas.insert(id, saga);
        }
        for (k, present) in std::mem::take(&mut changes.expiries) {
            if present {
                self.expiries.insert(k);
            } else {
                self.expiries.remove(&k);
            }
        }
        if let Some(c) = changes.clock.take() {
            self.clock = c;
        }
        changes.clear();
    }

    /// Forgets dedup records and resolved holds older than `horizon_ms`
    /// (see [`crate::partition::Config::compaction_horizon_ms`]).
    pub fn compact(&mut self, horizon_ms: u64) {
        self.dedup.retain(|_, d| !d.is_compactable(horizon_ms));
        self.holds.retain(|_, h| !h.is_compactable(horizon_ms));
        self.sagas.retain(|_, s| !s.is_compactable(horizon_ms));
    }

    /// Every account, in no particular order.
    pub fn accounts(&self) -> impl Iterator<Item = (&AccountId, &Account)> {
        self.accounts.iter().map(|(k, a)| (&k.text, a))
    }

    /// Every hold (pending or resolved), in no particular order.
    pub fn holds(&self) -> impl Iterator<Item = (&OpId, &Hold)> {
        self.holds.iter()
    }

    /// Every claim as (claim routing key, claim), in no particular order.
    pub fn claims(&self) -> impl Iterator<Item = (&String, &Claim)> {
        self.claims.iter().map(|(k, c)| (&k.text, c))
    }

    /// Every dedup record, in no particular order.
    pub fn dedups(&self) -> impl Iterator<Item = (&OpId, &Dedup)> {
        self.dedup.iter()
    }

    /// Every saga (in flight or ended), in no particular order.
    pub fn sagas(&self) -> impl Iterator<Item = (&OpId, &Saga)> {
        self.sagas.iter()
    }

    /// The expiry index, in order.
    pub fn expiries(&self) -> impl Iterator<Item = &ExpiryKey> {
        self.expiries.iter()
    }
}

/// The reads of a [`MemState`], which cannot fail: the same answers as its
/// [`Read`] implementation, without the `Result`.
impl MemState {
    /// The account with this id ([`Read::account`], which cannot fail here).
    pub fn account(&self, id: &str) -> Option<Account> {
        self.accounts.get(Probe::new(id).view()).copied()
    }

    /// The hold with this id ([`Read::hold`]).
    pub fn hold(&self, id: OpId) -> Option<Hold> {
        self.holds.get(&id).cloned()
    }

    /// The claim on this claim routing key ([`Read::claim`]).
    pub fn claim(&self, key: &str) -> Option<Claim> {
        self.claims.get(Probe::new(key).view()).cloned()
    }

    /// The dedup record of this op id ([`Read::dedup`]).
    pub fn dedup(&self, op: OpId) -> Option<Dedup> {
        self.dedup.get(&op).cloned()
    }

    /// The saga with this op id ([`Read::saga`]).
    pub fn saga(&self, id: OpId) -> Option<Saga> {
        self.sagas.get(&id).cloned()
    }

    /// The first entry of the expiry index strictly after `after`
    /// ([`Read::expiry_after`]).
    pub fn expiry_after(&self, after: Option<ExpiryKey>) -> Option<ExpiryKey> {
        match after {
            None => self.expiries.first().copied(),
            Some(a) => self
                .expiries
                .range((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))
                .next()
                .copied(),
        }
    }

    /// The applied position and log time ([`Read::clock`]).
    pub fn clock(&self) -> Clock {
        self.clock
    }
}

impl Read for MemState {
    type Error = Infallible;

    fn account(&self, id: &str) -> Result<Option<Account>, Infallible> {
        Ok(MemState::account(self, id))
    }

    fn hold(&self, id: OpId) -> Result<Option<Hold>, Infallible> {
        Ok(MemState::hold(self, id))
    }

    fn claim(&self, key: &str) -> Result<Option<Claim>, Infallible> {
        Ok(MemState::claim(self, key))
    }

    fn dedup(&self, op: OpId) -> Result<Option<Dedup>, Infallible> {
        Ok(MemState::dedup(self, op))
    }

    fn saga(&self, id: OpId) -> Result<Option<Saga>, Infallible> {
        Ok(MemState::saga(self, id))
    }

    fn expiry_after(&self, after: Option<ExpiryKey>) -> Result<Option<ExpiryKey>, Infallible> {
        Ok(MemState::expiry_after(self, after))
    }

    fn clock(&self) -> Result<Clock, Infallible> {
        Ok(MemState::clock(self))
    }
}

impl Write for MemState {
    fn put_account(&mut self, id: &AccountId, account: Account) {
        if let Some(slot) = self.accounts.get_mut(Probe::new(id.as_str()).view()) {
            *slot = account;
        } else {
            self.accounts.insert(Keyed::new(id.clone()), account);
        }
    }

    fn put_hold(&mut self, id: OpId, hold: Hold) {
        self.holds.insert(id, hold);
    }

    fn put_claim(&mut self, key: &str, claim: Option<Claim>) {
        let probe = Probe::new(key);
        match claim {
            Some(c) => {
                if let Some(slot) = self.claims.get_mut(probe.view()) {
                    *slot = c;
                } else {
                    self.claims.insert(Keyed::new(key.to_owned()), c);
                }
            }
            None => {
                self.claims.remove(probe.view());
            }
        }
    }

    fn put_dedup(&mut self, op: OpId, dedup: Dedup) {
        self.dedup.insert(op, dedup);
    }

    fn put_saga(&mut self, id: OpId, saga: Saga) {
        self.sagas.insert(id, saga);
    }

    fn put_expiry(&mut self, key: ExpiryKey, present: bool) {
        if present {
            self.expiries.insert(key);
        } else {
            self.expiries.remove(&key);
        }
    }

    fn set_clock(&mut self, clock: Clock) {
        self.clock = clock;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use rustc_hash::FxBuildHasher;
    use std::hash::BuildHasher;

    /// Checks that a stored key and a probe compare as their texts do, and
    /// hash as the text.
    fn check(stored: &str, probe: &str) {
        let keyed = Keyed::new(stored.to_owned());
        let probe_key = Probe::new(probe);
        let (a, b): (&dyn KeyView, &dyn KeyView) = (&keyed, probe_key.view());
        let equal = a == b;
        assert_eq!(equal, stored == probe, "{stored:?} vs {probe:?}");
        let hasher = FxBuildHasher;
        assert_eq!(hasher.hash_one(&keyed), hasher.hash_one(stored));
        assert_eq!(hasher.hash_one(b), hasher.hash_one(probe));
    }

    #[test]
    fn inline_heads_compare_as_the_text() {
        // Keys around the inline head's length, sharing heads, and not ASCII.
        let k22 = "0123456789012345678901";
        let texts = [
            "a",
            "b",
            "ab",
            k22,
            "012345678901234567890X",
            "0123456789012345678901X",
            "0123456789012345678901Y",
            "0123456789012345678901XY",
            "0123456789012345678901-a-long-tail-1",
            "0123456789012345678901-a-long-tail-2",
            "é",
            "e\u{301}",
            "ééééééééééé",
            "éééééééééééx",
        ];
        for a in texts {
            for b in texts {
                check(a, b);
            }
        }
    }

    #[test]
    fn text_keyed_maps_find_their_keys() {
        // Every key put is found, under its own text only.
        let mut state = MemState::new();
        let ids = ["a", "0123456789012345678901X", "0123456789012345678901Y"];
        for (i, id) in ids.iter().enumerate() {
            let id = AccountId::new(*id).expect("valid id");
            state.put_account(&id, Account::open(-i64::try_from(i).expect("small"), None));
        }
        for (i, id) in ids.iter().enumerate() {
            let floor = -i64::try_from(i).expect("small");
            assert_eq!(state.account(id).map(|a| a.floor), Some(floor));
        }
        assert_eq!(state.account("0123456789012345678901Z"), None);
        assert_eq!(state.accounts().count(), ids.len());
    }
}
