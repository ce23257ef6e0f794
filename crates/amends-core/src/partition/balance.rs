//! Balances and holds: opening accounts, credits and debits against the
//! floor and the ceiling, holds (open, post, void, expiry), and the credit
//! reservations of sagas in flight.

use crate::command::{AccountId, Amount};
use crate::decision::{Outcome, Reason};
use crate::id::OpId;
use crate::state::{Account, ExpiryKey, Hold, HoldStatus, Read, Write};

use super::{Ctx, EXPIRY_LABEL, Effect, HoldExpired, Machine, NoOutcome, Verdict};

impl<S: Read + Write + ?Sized> Ctx<'_, S> {
    /// Opens account `id` with its limits.
    pub(super) fn open_account(
        &mut self,
        id: &AccountId,
        floor: i64,
        ceiling: Option<i64>,
    ) -> Verdict<S::Error> {
        if self.read_account(id)?.is_some() {
            return Err(Reason::AccountExists.into());
        }
        if floor > 0 || ceiling.is_some_and(|c| c < 0) {
            return Err(Reason::InvalidLimits { floor, ceiling }.into());
        }
        let opened = Account::open(floor, ceiling);
        self.state.put_account(id, opened);
        Ok(balances(&opened))
    }

    /// Credits `amount` to account `id`, up to its ceiling.
    pub(super) fn credit(&mut self, id: &AccountId, amount: Amount) -> Verdict<S::Error> {
        let mut account = self.account(id)?;
        let amt = to_i64(amount)?;
        account.balance = room_for(&account, amt, amount.get())?;
        self.state.put_account(id, account);
        Ok(balances(&account))
    }

    /// Debits `amount` from account `id`, down to its floor.
    pub(super) fn debit(&mut self, id: &AccountId, amount: Amount) -> Verdict<S::Error> {
        let mut account = self.account(id)?;
        let amt = to_i64(amount)?;
        spendable(&account, amt, amount.get())?;
        account.balance = account.balance.checked_sub(amt).ok_or(Reason::Overflow)?;
        self.state.put_account(id, account);
        Ok(balances(&account))
    }

    /// Opens hold `hold_id` of `amount` on account `id`.
    pub(super) fn new_hold(
        &mut self,
        hold_id: OpId,
        id: &AccountId,
        amount: Amount,
        timeout_ms: Option<u64>,
    ) -> Verdict<S::Error> {
        let mut account = self.account(id)?;
        let amt = to_i64(amount)?;
        let held = account.held.checked_add(amt).ok_or(Reason::Overflow)?;
        let expires_at_ms = match timeout_ms {
            None => None,
            Some(t) => Some(self.now.checked_add(t).ok_or(Reason::Overflow)?),
        };
        spendable(&account, amt, amount.get())?;
        if self
            .read_hold(hold_id)?
            .is_some_and(|h| !h.is_compactable(self.horizon_ms))
        {
            // Only possible if a hold outlived its op id's dedup
            // record, which the window check rules out.
            return Err(Reason::OpIdConflict.into());
        }
        account.held = held;
        self.state.put_account(id, account);
        self.state.put_hold(
            hold_id,
            Hold {
                account: id.clone(),
                amount: amt,
                expires_at_ms,
                status: HoldStatus::Pending,
            },
        );
        if let Some(at_ms) = expires_at_ms {
            self.state
                .put_expiry(ExpiryKey { at_ms, id: hold_id }, true);
        }
        Ok(balances(&account))
    }

    /// Posts hold `hold_id` on account `id`: takes `amount` (default: all of
    /// it). `by_saga` when a saga posts its own hold.
    pub(super) fn post(
        &mut self,
        id: &AccountId,
        hold_id: OpId,
        amount: Option<Amount>,
        by_saga: bool,
    ) -> Verdict<S::Error> {
        let (mut hold, mut account) = self.pending_hold(id, hold_id, by_saga)?;
        let take = match amount {
            None => hold.amount,
            Some(a) => {
                let requested = to_i64(a).ok();
                match requested.filter(|r| *r <= hold.amount) {
                    Some(r) => r,
                    None => {
                        return Err(Reason::PostExceedsHold {
                            held: hold.amount,
                            requested: a.get(),
                        }
                        .into());
                    }
                }
            }
        };
        account.balance = account.balance.checked_sub(take).ok_or(Reason::Overflow)?;
        account.held = held_without(account.held, hold.amount);
        hold.status = HoldStatus::Posted {
            amount: take,
            at_ms: self.now,
        };
        self.finish_hold(id, hold_id, hold, &account);
        Ok(balances(&account))
    }

    /// Voids hold `hold_id` on account `id`. `by_saga` when a saga voids
    /// its own hold.
    pub(super) fn void(
        &mut self,
        id: &AccountId,
        hold_id: OpId,
        by_saga: bool,
    ) -> Verdict<S::Error> {
        let (mut hold, mut account) = self.pending_hold(id, hold_id, by_saga)?;
        account.held = held_without(account.held, hold.amount);
        hold.status = HoldStatus::Voided { at_ms: self.now };
        self.finish_hold(id, hold_id, hold, &account);
        Ok(balances(&account))
    }

    /// Reserves a credit of `amount` to account `id` for a saga (a credit
    /// step's try): checked against the ceiling now, applied at confirm.
    pub(super) fn reserve_credit(&mut self, id: &AccountId, amount: Amount) -> Verdict<S::Error> {
        let mut account = self.account(id)?;
        let amt = to_i64(amount)?;
        room_for(&account, amt, amount.get())?;
        account.incoming = account.incoming.checked_add(amt).ok_or(Reason::Overflow)?;
        self.state.put_account(id, account);
        Ok(balances(&account))
    }

    /// Applies a credit reserved by [`Ctx::reserve_credit`] (its confirm).
    pub(super) fn confirm_credit(&mut self, id: &AccountId, amount: Amount) -> Verdict<S::Error> {
        let mut account = self.account(id)?;
        let amt = to_i64(amount)?;
        account.incoming = unreserve(account.incoming, amt)?;
        // The reservation checked this sum against the ceiling and against
        // overflow.
        account.balance = account.balance.checked_add(amt).ok_or(Reason::Overflow)?;
        self.state.put_account(id, account);
        Ok(balances(&account))
    }

    /// Drops a credit reserved by [`Ctx::reserve_credit`] (its cancel).
    pub(super) fn cancel_credit(
        &mut self,
        id: &AccountId,
        amount: Amount,
    ) -> Result<(), NoOutcome<S::Error>> {
        let mut account = self.account(id)?;
        account.incoming = unreserve(account.incoming, to_i64(amount)?)?;
        self.state.put_account(id, account);
        Ok(())
    }

    /// Account `id`, which must be open.
    fn account(&self, id: &AccountId) -> Result<Account, NoOutcome<S::Error>> {
        Ok(self.read_account(id)?.ok_or(Reason::UnknownAccount)?)
    }

    /// Account `id`, if it is open.
    fn read_account(&self, id: &AccountId) -> Result<Option<Account>, NoOutcome<S::Error>> {
        self.state.account(id.as_str()).map_err(NoOutcome::Read)
    }

    /// Hold `hold_id`, if there is one.
    fn read_hold(&self, hold_id: OpId) -> Result<Option<Hold>, NoOutcome<S::Error>> {
        self.state.hold(hold_id).map_err(NoOutcome::Read)
    }

    /// The pending hold `hold_id` on account `id`. A hold resolved before
    /// the horizon counts as gone (see the dedup lookup).
    fn pending_hold(
        &self,
        id: &AccountId,
        hold_id: OpId,
        by_saga: bool,
    ) -> Result<(Hold, Account), NoOutcome<S::Error>> {
        // unknown_account precedes hold_not_found (found by the model tests,
        // `tests/model`): look the account up first.
        let account = self.account(id)?;
        // A client may post or void only holds it opened (their ids are UUID
        // v7); a saga's holds have derived ids and are the saga's to end.
        let owned = by_saga || hold_id.v7_unix_ms().is_some();
        let hold = self
            .read_hold(hold_id)?
            .filter(|h| owned && h.account == *id && !h.is_compactable(self.horizon_ms))
            .ok_or(Reason::HoldNotFound)?;
        let resolved = match hold.status {
            HoldStatus::Pending => return Ok((hold, account)),
            HoldStatus::Posted { .. } => Reason::HoldAlreadyPosted,
            HoldStatus::Voided { .. } => Reason::HoldAlreadyVoided,
            HoldStatus::Expired { .. } => Reason::HoldExpired,
        };
        Err(resolved.into())
    }

    fn finish_hold(&mut self, id: &AccountId, hold_id: OpId, hold: Hold, account: &Account) {
        if let Some(at_ms) = hold.expires_at_ms {
            self.state
                .put_expiry(ExpiryKey { at_ms, id: hold_id }, false);
        }
        self.state.put_account(id, *account);
        self.state.put_hold(hold_id, hold);
    }
}

impl Machine {
    /// Expires the hold that expiry index entry `key` names (`hold`, as
    /// read): releases its amount and publishes [`HoldExpired`].
    pub(super) fn expire_hold<S: Read + Write + ?Sized>(
        &self,
        cx: &mut Ctx<'_, S>,
        key: ExpiryKey,
        hold: Option<Hold>,
    ) -> Result<(), S::Error> {
        // The expiry index only names pending holds on open accounts
        // (and sagas in flight).
        let Some(mut hold) = hold.filter(|h| h.status == HoldStatus::Pending) else {
            panic!(
                "expiry index names {:?}, which is not a pending hold",
                key.id
            );
        };
        let Some(mut account) = cx.state.account(hold.account.as_str())? else {
            panic!("hold {:?} is on a missing account", key.id);
        };
        account.held = account
            .held
            .checked_sub(hold.amount)
            .filter(|h| *h >= 0)
            .unwrap_or_else(|| panic!("held of {:?} would go negative", hold.account));
        cx.state.put_account(&hold.account, account);
        cx.state.put_expiry(key, false);
        hold.status = HoldStatus::Expired { at_ms: cx.now };
        cx.out.push(Effect::HoldExpired(HoldExpired {
            event_id: key.id.derive(EXPIRY_LABEL),
            hold: key.id,
            account: hold.account.clone(),
            amount: hold.amount,
            partition: self.partition.get(),
            position: cx.position,
            log_time_ms: cx.now,
        }));
        cx.state.put_hold(key.id, hold);
        Ok(())
    }
}

/// `incoming` less a reservation of `amt`. Only a forged step message could
/// release more than was reserved: a refusal, never a negative sum.
fn unreserve(incoming: i64, amt: i64) -> Result<i64, Reason> {
    incoming
        .checked_sub(amt)
        .filter(|r| *r >= 0)
        .ok_or(Reason::Overflow)
}

/// The balance after crediting `amt` to `account`: the ceiling counts the
/// credits reserved by sagas in flight, and so does the overflow check, so
/// confirming those reservations later cannot fail.
fn room_for(account: &Account, amt: i64, requested: u64) -> Result<i64, Reason> {
    let balance = account.balance.checked_add(amt).ok_or(Reason::Overflow)?;
    let reach = balance
        .checked_add(account.incoming)
        .ok_or(Reason::Overflow)?;
    if let Some(ceiling) = account.ceiling.filter(|c| reach > *c) {
        return Err(Reason::CeilingExceeded {
            balance: account.balance,
            ceiling,
            requested,
        });
    }
    Ok(balance)
}

fn balances(account: &Account) -> Outcome {
    Outcome::Confirmed {
        balance: Some(account.balance),
        available: account.available(),
    }
}

fn to_i64(amount: Amount) -> Result<i64, Reason> {
    i64::try_from(amount.get()).map_err(|_| Reason::Overflow)
}

/// Checks that taking `amt` keeps balance minus holds at or above the floor.
fn spendable(account: &Account, amt: i64, requested: u64) -> Result<(), Reason> {
    let available = account.available().ok_or(Reason::Overflow)?;
    let after = available.checked_sub(amt).ok_or(Reason::Overflow)?;
    if after < account.floor {
        return Err(Reason::InsufficientFunds {
            available,
            floor: account.floor,
            requested,
        });
    }
    Ok(())
}

/// `held` less a pending hold of `amount` that ends (posted or voided).
fn held_without(held: i64, amount: i64) -> i64 {
    held.checked_sub(amount)
        .filter(|h| *h >= 0)
        .unwrap_or_else(|| panic!("held {held} is less than a pending hold of {amount}"))
}
