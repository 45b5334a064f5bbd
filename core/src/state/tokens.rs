//! API tokens and join tokens in the replicated state: only their SHA-256 hashes, never the
//! secrets (the leader's service makes a token, shows it once, and proposes its hash).
//!
//! A token is `berth_<id>_<secret>`; the id finds the record, the hash of the whole token
//! proves it. Expiry is checked against the caller's clock for API tokens (the service) and
//! against the entry's time for join tokens (here, so a join token is used once on every
//! replica alike).

use serde::{Deserialize, Serialize};

use super::State;
use super::command::Rejection;

/// Most tokens kept; when full, revoked, used and expired ones are dropped first.
pub const MAX_TOKENS: usize = 65_536;
/// Longest token id.
pub const TOKEN_ID_LEN: usize = 32;
/// Longest description.
pub const DESCRIPTION_LEN: usize = 256;

/// What a token lets its holder do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenKind {
    /// Act for one tenant: its sandboxes only.
    Tenant(String),
    /// Act as an operator (AdminService, every tenant).
    Admin,
    /// Join once as a node, optionally only as this node id.
    Join {
        /// The node id it is for (`None`: any).
        node: Option<String>,
    },
}

/// One token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Public id (the part of the token before the secret).
    pub id: String,
    /// What it allows.
    pub kind: TokenKind,
    /// SHA-256 of the whole token.
    pub hash: [u8; 32],
    /// When it was made (ms since the epoch).
    pub created_ms: u64,
    /// When it stops working (0: never).
    pub expires_ms: u64,
    /// Revoked by an operator.
    pub revoked: bool,
    /// A join token that has been used (by which node).
    pub used_by: Option<String>,
    /// The operator's note.
    pub description: String,
}

impl TokenRecord {
    /// Whether the token still works at `now_ms`.
    pub fn live(&self, now_ms: u64) -> bool {
        !self.revoked
            && self.used_by.is_none()
            && (self.expires_ms == 0 || now_ms < self.expires_ms)
    }
}

fn invalid(why: String) -> Rejection {
    Rejection::Token(why)
}

impl State {
    /// Every token, by id.
    pub fn tokens(&self) -> &std::collections::BTreeMap<String, TokenRecord> {
        &self.tokens
    }

    /// One token.
    pub fn token(&self, id: &str) -> Option<&TokenRecord> {
        self.tokens.get(id)
    }

    pub(super) fn put_token(&mut self, record: &TokenRecord, now_ms: u64) -> Result<(), Rejection> {
        if record.id.is_empty()
            || record.id.len() > TOKEN_ID_LEN
            || !record.id.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Err(invalid(format!(
                "token id {:?} must be 1..={TOKEN_ID_LEN} letters and digits",
                record.id
            )));
        }
        if record.description.len() > DESCRIPTION_LEN {
            return Err(invalid(format!(
                "description: at most {DESCRIPTION_LEN} bytes"
            )));
        }
        if self.tokens.contains_key(&record.id) {
            return Err(invalid(format!("token {} exists already", record.id)));
        }
        if self.tokens.len() >= MAX_TOKENS {
            self.tokens.retain(|_, t| t.live(now_ms));
        }
        if self.tokens.len() >= MAX_TOKENS {
            return Err(invalid(format!(
                "{MAX_TOKENS} live tokens exist; revoke some first"
            )));
        }
        self.tokens.insert(record.id.clone(), record.clone());
        Ok(())
    }

    pub(super) fn revoke_token(&mut self, id: &str) -> Result<(), Rejection> {
        match self.tokens.get_mut(id) {
            Some(t) => {
                t.revoked = true;
                Ok(())
            }
            None => Err(invalid(format!("token {id} does not exist"))),
        }
    }

    /// Uses a join token for `node` at `now_ms`: refused if unknown, wrong, revoked,
    /// expired, for another node, or used before.
    pub(super) fn use_join_token(
        &mut self,
        id: &str,
        hash: &[u8; 32],
        node: &str,
        now_ms: u64,
    ) -> Result<(), Rejection> {
        let refused = || invalid("the join token is not valid (unknown or wrong)".into());
        let Some(t) = self.tokens.get_mut(id) else {
            return Err(refused());
        };
        let TokenKind::Join { node: only } = &t.kind else {
            return Err(refused());
        };
        if &t.hash != hash {
            return Err(refused());
        }
        if let Some(by) = &t.used_by {
            return Err(invalid(format!(
                "the join token {id} was already used (by node {by}); join tokens are single-use"
            )));
        }
        if t.revoked {
            return Err(invalid(format!("the join token {id} has been revoked")));
        }
        if t.expires_ms != 0 && now_ms >= t.expires_ms {
            return Err(invalid(format!(
                "the join token {id} expired {} s ago",
                (now_ms - t.expires_ms) / 1_000
            )));
        }
        if let Some(only) = only {
            if only != node {
                return Err(invalid(format!(
                    "the join token {id} is for node {only}, not {node}"
                )));
            }
        }
        t.used_by = Some(node.to_owned());
        Ok(())
    }
}
