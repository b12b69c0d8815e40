//! Grants as written in the configuration: who, where, what, with which effect.
//!
//! ```yaml
//! grants:
//!   - name: agent-reads-public        # optional; shown as the rule in decisions
//!     identity: agent                 # the agent identity (`chaperone run --as`)
//!     target: app
//!     effect: allow                   # allow | deny | review
//!     sql:
//!       classes: [read, session, transaction]
//!       objects: ["public.*", "pg_catalog.*", "information_schema.*"]
//!       functions: []                 # non-built-in functions this grant lets run
//! ```

use crate::protocols::postgres::classify::SqlClass;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    Allow,
    Deny,
    /// Allowed only after a human approves (until approvals exist: refused, saying so).
    Review,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    #[serde(default)]
    pub name: Option<String>,
    /// The agent identity this grant is for.
    pub identity: String,
    pub target: String,
    pub effect: Effect,
    #[serde(default)]
    pub sql: SqlGrant,
}

/// The SQL a grant covers. For `allow`/`review`: a statement is covered when every class it has
/// is listed, every relation it touches matches a pattern, and every non-built-in function it
/// calls is listed. For `deny`: a statement matches when it has any listed class (or none are
/// listed) and touches any matching relation (or no patterns are listed).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SqlGrant {
    #[serde(default)]
    pub classes: BTreeSet<SqlClass>,
    /// `schema.relation` patterns; `*` matches any run of characters.
    #[serde(default)]
    pub objects: Vec<String>,
    #[serde(default)]
    pub functions: BTreeSet<String>,
}

impl Grant {
    /// The rule name shown in decisions.
    pub fn label(&self, index: usize) -> String {
        match &self.name {
            Some(n) => n.clone(),
            None => format!(
                "grants[{index}] ({:?} {} on {})",
                self.effect, self.identity, self.target
            )
            .to_lowercase(),
        }
    }
}

/// `*`-glob match (no other metacharacters), case-sensitive like quoted identifiers.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        for (p, t, want) in [
            ("public.*", "public.users", true),
            ("public.*", "publicx.users", false),
            ("public.*", "audit.public", false),
            ("*", "anything.at_all", true),
            ("public.users", "public.users", true),
            ("public.users", "public.users2", false),
            ("*.secret*", "hr.secrets", true),
            ("a*b*c", "abc", true),
            ("a*b*c", "acb", false),
            ("ab*ba", "aba", false),
        ] {
            assert_eq!(glob_match(p, t), want, "{p} vs {t}");
        }
    }
}
