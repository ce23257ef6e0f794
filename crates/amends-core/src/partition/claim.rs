//! Claims: unique ownership of a `(namespace, key)`, claimed and released
//! by owners, and held tentatively by a saga's claim step until the saga
//! confirms or cancels.

use crate::command::{CLAIM_KEY_BYTES_MAX, ClaimKey, NAMESPACE_BYTES_MAX, Namespace, Owner};
use crate::decision::{Outcome, Reason};
use crate::id::OpId;
use crate::route;
use crate::state::{Claim, Read, Write};

use super::{Ctx, NoOutcome, Verdict};

impl<S: Read + Write + ?Sized> Ctx<'_, S> {
    /// Claims `(namespace, key)` for `owner`.
    pub(super) fn claim(
        &mut self,
        namespace: &Namespace,
        key: &ClaimKey,
        owner: &Owner,
    ) -> Verdict<S::Error> {
        with_claim_key(namespace, key, |rk| match self.read_claim(rk)? {
            Some(c) if c.owner == *owner && c.tentative.is_some() => {
                Err(Reason::ClaimPending.into())
            }
            Some(c) if c.owner == *owner => Ok(Outcome::confirmed()),
            Some(c) => Err(Reason::AlreadyClaimed { owner: c.owner }.into()),
            None => {
                self.state
                    .put_claim(rk, Some(Claim::owned_by(owner.clone())));
                Ok(Outcome::confirmed())
            }
        })
    }

    /// Releases `(namespace, key)`, which `owner` must hold for good.
    pub(super) fn release(
        &mut self,
        namespace: &Namespace,
        key: &ClaimKey,
        owner: &Owner,
    ) -> Verdict<S::Error> {
        with_claim_key(namespace, key, |rk| match self.read_claim(rk)? {
            None => Err(Reason::NotClaimed.into()),
            Some(c) if c.owner != *owner => Err(Reason::NotOwner { owner: c.owner }.into()),
            Some(c) if c.tentative.is_some() => Err(Reason::ClaimPending.into()),
            Some(_) => {
                self.state.put_claim(rk, None);
                Ok(Outcome::confirmed())
            }
        })
    }

    /// Claims `(namespace, key)` for `owner` tentatively, held by the saga
    /// step whose try is `try_id` (a claim step's try).
    pub(super) fn try_claim(
        &mut self,
        namespace: &Namespace,
        key: &ClaimKey,
        owner: &Owner,
        try_id: OpId,
    ) -> Verdict<S::Error> {
        with_claim_key(namespace, key, |rk| match self.read_claim(rk)? {
            // Already the owner's for good: confirm and cancel leave it.
            Some(c) if c.owner == *owner && c.tentative.is_none() => Ok(Outcome::confirmed()),
            Some(c) if c.owner == *owner => Err(Reason::ClaimPending.into()),
            Some(c) => Err(Reason::AlreadyClaimed { owner: c.owner }.into()),
            None => {
                self.state.put_claim(
                    rk,
                    Some(Claim {
                        owner: owner.clone(),
                        tentative: Some(try_id),
                    }),
                );
                Ok(Outcome::confirmed())
            }
        })
    }

    /// Makes the claim that try `try_id` holds on `(namespace, key)` final,
    /// if it holds one.
    pub(super) fn confirm_claim(
        &mut self,
        namespace: &Namespace,
        key: &ClaimKey,
        try_id: OpId,
    ) -> Verdict<S::Error> {
        with_claim_key(namespace, key, |rk| {
            if let Some(mut c) = self.read_claim(rk)?.filter(|c| c.tentative == Some(try_id)) {
                c.tentative = None;
                self.state.put_claim(rk, Some(c));
            }
            Ok(Outcome::confirmed())
        })
    }

    /// Drops the claim that try `try_id` holds on `(namespace, key)`, if it
    /// holds one.
    pub(super) fn cancel_claim(
        &mut self,
        namespace: &Namespace,
        key: &ClaimKey,
        try_id: OpId,
    ) -> Verdict<S::Error> {
        with_claim_key(namespace, key, |rk| {
            if self
                .read_claim(rk)?
                .is_some_and(|c| c.tentative == Some(try_id))
            {
                self.state.put_claim(rk, None);
            }
            Ok(Outcome::confirmed())
        })
    }
}

impl<S: Read + ?Sized> Ctx<'_, S> {
    /// The claim on claim routing key `rk`.
    fn read_claim(&self, rk: &str) -> Result<Option<Claim>, NoOutcome<S::Error>> {
        self.state.claim(rk).map_err(NoOutcome::Read)
    }
}

/// The longest claim routing key of a valid claim or release: namespace,
/// separator, key.
const CLAIM_ROUTING_KEY_BYTES_MAX: usize =
    NAMESPACE_BYTES_MAX + route::CLAIM_SEPARATOR.len_utf8() + CLAIM_KEY_BYTES_MAX;

/// Runs `f` on the claim routing key of `namespace` and `key` (the same
/// text as [`route::claim_routing_key`]), built on the stack when it fits,
/// so claims and releases do not allocate for it.
fn with_claim_key<R>(namespace: &Namespace, key: &ClaimKey, f: impl FnOnce(&str) -> R) -> R {
    let mut buf = [0; CLAIM_ROUTING_KEY_BYTES_MAX];
    match claim_routing_key_in(&mut buf, namespace.as_str(), key.as_str()) {
        Some(rk) => f(rk),
        None => f(&route::claim_routing_key(namespace.as_str(), key.as_str())),
    }
}

/// Builds the claim routing key of `namespace` and `key` in `buf`; `None`
/// if it does not fit.
fn claim_routing_key_in<'b>(buf: &'b mut [u8], namespace: &str, key: &str) -> Option<&'b str> {
    let mut sep = [0; 4];
    let sep = route::CLAIM_SEPARATOR.encode_utf8(&mut sep).as_bytes();
    let key_start = namespace.len().checked_add(sep.len())?;
    let end = key_start.checked_add(key.len())?;
    let out = buf.get_mut(..end)?;
    let (ns_out, rest) = out.split_at_mut(namespace.len());
    let (sep_out, key_out) = rest.split_at_mut(sep.len());
    ns_out.copy_from_slice(namespace.as_bytes());
    sep_out.copy_from_slice(sep);
    key_out.copy_from_slice(key.as_bytes());
    std::str::from_utf8(out).ok()
}
