//! The validated fields of commands: account ids, claim names, owners,
//! apology topics, amounts and saga deadlines, with their limits and the
//! [`FieldError`] that parsing refuses them with.
//!
//! Only parsing (serde, or the `new` constructors) builds them. They live
//! below both [`crate::command`] (which re-exports them: their public path
//! is `amends_core::command`) and [`crate::decision`] (a refusal may name a
//! claim's owner), so neither of those imports the other for them.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Longest account id, in UTF-8 bytes. Account ids are routing keys and
/// store keys; a bound keeps both cheap.
pub const ACCOUNT_ID_BYTES_MAX: usize = 128;
/// Longest claim namespace, in UTF-8 bytes.
pub const NAMESPACE_BYTES_MAX: usize = 64;
/// Longest claim key, in UTF-8 bytes (long enough for an e-mail address or
/// a URL path).
pub const CLAIM_KEY_BYTES_MAX: usize = 256;
/// Longest claim owner, in UTF-8 bytes.
pub const OWNER_BYTES_MAX: usize = 128;
/// Longest apology topic, in bytes. The topic becomes the tail of a NATS
/// subject, so it is limited to subject-safe ASCII as well.
pub const TOPIC_BYTES_MAX: usize = 128;
/// Most steps in one saga. Each step costs log appends on its partition and
/// a slot in the saga's record, so a saga stays a short, bounded workflow.
pub const SAGA_STEPS_MAX: usize = 16;
/// A saga's deadline when it names none: a minute of log time.
pub const SAGA_DEADLINE_MS_DEFAULT: u64 = 60 * 1000;
/// The longest deadline a saga may ask for: an hour of log time, far inside
/// the dedup retention, so every step message of a saga is deduplicated for
/// as long as it can arrive.
pub const SAGA_DEADLINE_MS_MAX: u64 = 60 * 60 * 1000;

/// Why a string or number in a command was refused by parsing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    /// The field was empty.
    #[error("{field} must not be empty")]
    Empty {
        /// The field's name.
        field: &'static str,
    },
    /// The field was longer than its limit.
    #[error("{field} is {len} bytes, more than the limit of {max}")]
    TooLong {
        /// The field's name.
        field: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// The field held a control character (U+0000..U+001F, U+007F..U+009F).
    #[error("{field} must not contain control characters")]
    ControlCharacter {
        /// The field's name.
        field: &'static str,
    },
    /// An apology topic was not dot-separated tokens of `[A-Za-z0-9_-]`.
    #[error("apology_topic must be dot-separated tokens of A-Z, a-z, 0-9, '_' and '-'")]
    BadTopic,
    /// An amount was zero.
    #[error("amount must be at least 1")]
    ZeroAmount,
    /// A saga had no steps or more than [`SAGA_STEPS_MAX`].
    #[error("a saga has 1 to {SAGA_STEPS_MAX} steps, got {len}")]
    SagaSteps {
        /// How many steps it had.
        len: usize,
    },
    /// A saga step's command cannot be a step.
    #[error("a saga step cannot be a {kind}")]
    StepKind {
        /// The command's `type`.
        kind: &'static str,
    },
    /// A compensation was given for a step that is cancelled by itself
    /// (debit, credit, claim), or is not a plain operation.
    #[error("{reason}")]
    Compensation {
        /// What was wrong.
        reason: &'static str,
    },
    /// A saga deadline was zero or above [`SAGA_DEADLINE_MS_MAX`].
    #[error("deadline_ms must be in 1..={SAGA_DEADLINE_MS_MAX}, got {ms}")]
    Deadline {
        /// The refused value.
        ms: u64,
    },
}

/// The JSON Schema pattern of a text field: no control characters (what
/// [`char::is_control`] refuses: U+0000..U+001F and U+007F..U+009F).
const NO_CONTROL_PATTERN: &str = r"^[^\u0000-\u001F\u007F-\u009F]*$";

/// Whether `b` may stand in a token of a NATS subject that amends builds
/// from user text (an apology topic, a deployment's subject prefix):
/// `A-Z a-z 0-9 _ -`. One rule for the protocol, so the service, the client
/// and the core agree.
pub fn is_subject_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

fn check_text(field: &'static str, s: &str, max: usize) -> Result<(), FieldError> {
    if s.is_empty() {
        return Err(FieldError::Empty { field });
    }
    if s.len() > max {
        return Err(FieldError::TooLong {
            field,
            len: s.len(),
            max,
        });
    }
    if s.chars().any(char::is_control) {
        return Err(FieldError::ControlCharacter { field });
    }
    Ok(())
}

macro_rules! text_newtype {
    ($(#[$doc:meta])* $name:ident, $field:literal, $max:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
        #[serde(try_from = "String", into = "String")]
        // The schema is String's (serde's `try_from`/`into` win over field
        // attributes), so the limits go on the container. `maxLength` counts
        // code points, a looser bound than the byte limit.
        #[schemars(extend("minLength" = 1, "maxLength" = $max, "pattern" = NO_CONTROL_PATTERN))]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps `s`.
            pub fn new(s: impl Into<String>) -> Result<$name, FieldError> {
                let s = s.into();
                check_text($field, &s, $max)?;
                Ok($name(s))
            }

            /// The text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = FieldError;
            fn try_from(s: String) -> Result<$name, FieldError> {
                $name::new(s)
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }
    };
}

text_newtype!(
    /// An account id: 1 to [`ACCOUNT_ID_BYTES_MAX`] (128) bytes of UTF-8 without
    /// control characters. It is the account's routing key.
    AccountId, "account", ACCOUNT_ID_BYTES_MAX
);
text_newtype!(
    /// A claim namespace (for example `username`): 1 to
    /// [`NAMESPACE_BYTES_MAX`] (64) bytes without control characters.
    Namespace, "namespace", NAMESPACE_BYTES_MAX
);
text_newtype!(
    /// A claimed key within a namespace: 1 to [`CLAIM_KEY_BYTES_MAX`] (256) bytes
    /// without control characters.
    ClaimKey, "key", CLAIM_KEY_BYTES_MAX
);
text_newtype!(
    /// Who owns a claim: 1 to [`OWNER_BYTES_MAX`] (128) bytes without control
    /// characters.
    Owner, "owner", OWNER_BYTES_MAX
);

/// The topic an optimistic operation names for its apology: the refusal is
/// published on `<prefix>.apology.<topic>`.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(try_from = "String", into = "String")]
#[schemars(extend(
    "minLength" = 1,
    "maxLength" = TOPIC_BYTES_MAX,
    "pattern" = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$"
))]
pub struct Topic(String);

impl Topic {
    /// Validates and wraps `s`.
    pub fn new(s: impl Into<String>) -> Result<Topic, FieldError> {
        let s = s.into();
        check_text("apology_topic", &s, TOPIC_BYTES_MAX)?;
        let token_ok = |t: &str| !t.is_empty() && t.bytes().all(is_subject_token_byte);
        if !s.split('.').all(token_ok) {
            return Err(FieldError::BadTopic);
        }
        Ok(Topic(s))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Topic {
    type Error = FieldError;
    fn try_from(s: String) -> Result<Topic, FieldError> {
        Topic::new(s)
    }
}

impl From<Topic> for String {
    fn from(v: Topic) -> String {
        v.0
    }
}

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// A positive amount of money in the account's smallest unit.
///
/// It is a `u64` on the wire; a value above `i64::MAX` parses but can never
/// be applied (balances are `i64`) and is refused with `overflow`.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize, JsonSchema,
)]
#[serde(try_from = "u64", into = "u64")]
#[schemars(extend("minimum" = 1))]
pub struct Amount(u64);

impl Amount {
    /// Validates and wraps `v` (it must be at least 1).
    pub fn new(v: u64) -> Result<Amount, FieldError> {
        if v == 0 {
            Err(FieldError::ZeroAmount)
        } else {
            Ok(Amount(v))
        }
    }

    /// The amount.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl TryFrom<u64> for Amount {
    type Error = FieldError;
    fn try_from(v: u64) -> Result<Amount, FieldError> {
        Amount::new(v)
    }
}

impl From<Amount> for u64 {
    fn from(v: Amount) -> u64 {
        v.0
    }
}

/// A saga's deadline: 1 to [`SAGA_DEADLINE_MS_MAX`] milliseconds of log
/// time after the saga's own log time.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize, JsonSchema,
)]
#[serde(try_from = "u64", into = "u64")]
#[schemars(extend("minimum" = 1, "maximum" = SAGA_DEADLINE_MS_MAX))]
pub struct DeadlineMs(u64);

impl DeadlineMs {
    /// Validates and wraps `ms`.
    pub fn new(ms: u64) -> Result<DeadlineMs, FieldError> {
        if ms == 0 || ms > SAGA_DEADLINE_MS_MAX {
            return Err(FieldError::Deadline { ms });
        }
        Ok(DeadlineMs(ms))
    }

    /// The milliseconds.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl TryFrom<u64> for DeadlineMs {
    type Error = FieldError;
    fn try_from(v: u64) -> Result<DeadlineMs, FieldError> {
        DeadlineMs::new(v)
    }
}

impl From<DeadlineMs> for u64 {
    fn from(v: DeadlineMs) -> u64 {
        v.0
    }
}
