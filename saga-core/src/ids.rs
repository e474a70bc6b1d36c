//! Typed identifiers.
//!
//! Every name that ends up in a NATS subject (saga names, step names, service names, command
//! names, saga ids) is a *token*: 1 to 64 characters from `A-Z a-z 0-9 _ -`. That keeps subjects
//! unambiguous (no `.`, `*`, `>` or white space) and keeps them short.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The longest token accepted.
pub const MAX_TOKEN_LEN: usize = 64;

/// Why a string is not a valid token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The string is empty.
    #[error("is empty")]
    Empty,
    /// The string is longer than [`MAX_TOKEN_LEN`].
    #[error("is {len} characters long; the limit is {MAX_TOKEN_LEN}")]
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The string holds a character outside `A-Z a-z 0-9 _ -`.
    #[error("contains {found:?}; only letters, digits, '_' and '-' are allowed")]
    BadChar {
        /// The first offending character.
        found: char,
    },
}

/// Checks that `s` is a valid subject token.
pub fn check_token(s: &str) -> Result<(), TokenError> {
    if s.is_empty() {
        return Err(TokenError::Empty);
    }
    if s.len() > MAX_TOKEN_LEN {
        return Err(TokenError::TooLong { len: s.len() });
    }
    match s.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-')) {
        Some(found) => Err(TokenError::BadChar { found }),
        None => Ok(()),
    }
}

macro_rules! token_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        ///
        /// Deserializing does not validate (so that a definition file can be loaded and then
        /// refused with an error that names where the bad value is); [`Self::new`] does.
        #[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl fmt::Debug for $name {
            /// Prints the name quoted, as it would be written in a definition.
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", self.0)
            }
        }

        impl $name {
            /// Builds the identifier, refusing a string that is not a valid token.
            pub fn new(s: impl Into<String>) -> Result<Self, TokenError> {
                let s = s.into();
                check_token(&s)?;
                Ok(Self(s))
            }

            /// Builds the identifier without validation; [`check`](Self::check) tells later.
            pub fn new_unchecked(s: impl Into<String>) -> Self {
                Self(s.into())
            }

            /// Checks that the identifier is a valid token.
            pub fn check(&self) -> Result<(), TokenError> {
                check_token(&self.0)
            }

            /// The identifier as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// Whether the identifier is empty (left out of a definition).
            pub fn is_empty(&self) -> bool {
                self.0.is_empty()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl From<&str> for $name {
            /// Converts without validation (handy in builders and tests); validation happens
            /// when the definition is validated.
            fn from(s: &str) -> Self {
                Self(s.to_owned())
            }
        }
    };
}

token_type!(
    /// The name of a saga definition, such as `place-order`.
    SagaName
);
token_type!(
    /// The name of a step inside a saga definition, such as `reserve-items`.
    StepName
);
token_type!(
    /// The name of a participant service, such as `seller`.
    ServiceName
);
token_type!(
    /// The name of a command a participant handles, such as `reserve` or `release`.
    CommandName
);
token_type!(
    /// The id of one saga instance: derived from the saga's name and its start's key (see
    /// [`SagaId::for_key`]), so an id belongs to one saga name and no other can claim it.
    SagaId
);

impl SagaId {
    /// The id of the saga of definition `saga` started with `key` (an idempotency key, or a
    /// random one): the first 16 bytes of SHA-256 over `saga`, a zero byte and `key`, in
    /// lowercase hex. The coordinator refuses a start whose id is not this.
    ///
    /// ```
    /// use saga_core::{SagaId, SagaName};
    ///
    /// let id = SagaId::for_key(&SagaName::from("place-order"), "order-42");
    /// assert_eq!(id.as_str().len(), 32);
    /// assert_ne!(id, SagaId::for_key(&SagaName::from("place-order"), "order-43"));
    /// assert_ne!(id, SagaId::for_key(&SagaName::from("refund"), "order-42"));
    /// ```
    pub fn for_key(saga: &SagaName, key: &str) -> SagaId {
        use sha2::{Digest as _, Sha256};
        use std::fmt::Write as _;
        let hash = Sha256::digest(format!("{saga}\u{0}{key}").as_bytes());
        let mut hex = String::with_capacity(32);
        for b in &hash[..16] {
            let _ = write!(hex, "{b:02x}");
        }
        SagaId(hex)
    }
}

/// Whether a command is a step's action or its compensation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The step's forward action.
    Action,
    /// The step's compensation (undo).
    Compensation,
}

impl Phase {
    /// A one-letter code used in command ids and subjects: `a` or `c`.
    pub fn code(self) -> &'static str {
        match self {
            Phase::Action => "a",
            Phase::Compensation => "c",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Action => "action",
            Phase::Compensation => "compensation",
        })
    }
}

/// The deterministic id of one dispatched command: `<saga-id>.<step>.<a|c>.<attempt>`.
///
/// The same saga, step, phase and attempt always yield the same id, so a command sent twice
/// (after a crash, by two coordinator replicas) is recognised as one. Participants deduplicate
/// effects by [`CommandId::effect_key`], which leaves out the attempt: a retried attempt of an
/// action that already ran returns the recorded reply instead of running again.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CommandId(String);

impl CommandId {
    /// The id of `attempt` of `phase` of `step` in saga `saga`.
    pub fn new(saga: &SagaId, step: &StepName, phase: Phase, attempt: u32) -> Self {
        Self(format!("{saga}.{step}.{}.{attempt}", phase.code()))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key under which a participant records the effect of a step's phase, whatever the
    /// attempt: `<saga-id>.<step>.<a|c>`.
    pub fn effect_key(saga: &SagaId, step: &StepName, phase: Phase) -> String {
        format!("{saga}.{step}.{}", phase.code())
    }
}

impl fmt::Display for CommandId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Milliseconds since the Unix epoch. The state machine never reads a clock: the driver passes
/// time in.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// This instant plus `d`, saturating.
    pub fn after(self, d: std::time::Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(d.as_millis().min(u64::MAX as u128) as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        assert!(check_token("reserve-items_2").is_ok());
        assert_eq!(check_token(""), Err(TokenError::Empty));
        assert_eq!(check_token("a.b"), Err(TokenError::BadChar { found: '.' }));
        assert_eq!(check_token("a b"), Err(TokenError::BadChar { found: ' ' }));
        assert_eq!(check_token(&"x".repeat(65)), Err(TokenError::TooLong { len: 65 }));
        assert!(StepName::new("ship>").is_err());
    }

    #[test]
    fn command_ids_are_deterministic() {
        let saga = SagaId::from("s1");
        let step = StepName::from("ship");
        assert_eq!(CommandId::new(&saga, &step, Phase::Action, 2).as_str(), "s1.ship.a.2");
        assert_eq!(CommandId::effect_key(&saga, &step, Phase::Compensation), "s1.ship.c");
    }
}
