//! Grants as written in the configuration: who, where, what, with which effect.
//!
//! ```yaml
//! grants:
//!   - name: agent-reads-public        # optional; shown as the rule in decisions
//!     identity: agent                 # who: exactly one of identity (`chaperone run --as`,
//!                                     # or an OIDC agent's email or subject), subject (the
//!                                     # token's `sub`) or group (in its groups claim)
//!     target: app
//!     expires: 2026-12-31             # optional: stops applying at the end of that day (UTC),
//!                                     # or at an RFC 3339 instant
//!     review_by: 2026-12-01           # optional: when an access review is due
//!     masking:                        # optional: masking for what this grant lets the agent
//!       rules: [{columns: ["public.users.email"], method: token}]   # read; before the
//!       allow: ["*@example.com"]      # configuration's own `masking` rules
//!     effect: allow                   # allow | deny | review
//!     sql:
//!       classes: [read, session, transaction]
//!       objects: ["public.*", "pg_catalog.*", "information_schema.*"]
//!       functions: []                 # non-built-in functions this grant lets run
//! ```

use crate::identity::AgentId;
use crate::protocols::postgres::classify::SqlClass;
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeSet;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    Allow,
    Deny,
    /// Allowed only after a human approves (until approvals exist: refused, saying so).
    Review,
}

/// Whom a grant is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Who {
    /// An identity name: `chaperone run --as NAME` without a token, or an OIDC-proven agent
    /// whose email (else subject) is NAME.
    Identity(String),
    /// The `sub` claim of the agent's verified ID token.
    Subject(String),
    /// A value of the verified token's groups claim.
    Group(String),
}

impl Who {
    /// Whether `agent` is who this names. Subjects and groups need a verified token: an agent
    /// started without one has neither.
    pub fn matches(&self, agent: &AgentId) -> bool {
        match self {
            Who::Identity(n) => agent.name.as_deref() == Some(n.as_str()),
            Who::Subject(s) => agent.oidc.as_ref().is_some_and(|o| &o.subject == s),
            Who::Group(g) => agent.oidc.as_ref().is_some_and(|o| o.groups.contains(g)),
        }
    }
}

impl std::fmt::Display for Who {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Who::Identity(n) => write!(f, "identity {n}"),
            Who::Subject(s) => write!(f, "subject {s}"),
            Who::Group(g) => write!(f, "group {g}"),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "RawGrant")]
pub struct Grant {
    pub name: Option<String>,
    pub who: Who,
    pub target: String,
    pub effect: Effect,
    pub sql: SqlGrant,
    /// The grant stops applying at this instant.
    pub expires: Option<DateTime<Utc>>,
    /// When the grant's next access review is due (reported, not enforced).
    pub review_by: Option<DateTime<Utc>>,
    /// Masking rules for results of sessions this grant applies to, tried before the
    /// configuration's `masking` rules (first match wins), so they can be stricter or, with
    /// `keep`, more lenient for this audience.
    pub masking: Option<crate::mask::MaskRules>,
    /// Where it was written.
    pub source: Option<GrantSource>,
}

/// The file (and line) a grant was written at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GrantSource {
    pub file: String,
    pub line: Option<usize>,
}

impl std::fmt::Display for GrantSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{l}", self.file),
            None => f.write_str(&self.file),
        }
    }
}

/// A grant as written; [`Grant`] is what validation makes of it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrant {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    identity: Option<String>,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    group: Option<String>,
    target: String,
    effect: Effect,
    #[serde(default)]
    sql: SqlGrant,
    #[serde(default, deserialize_with = "instant")]
    expires: Option<DateTime<Utc>>,
    #[serde(default, deserialize_with = "instant")]
    review_by: Option<DateTime<Utc>>,
    #[serde(default)]
    masking: Option<crate::mask::MaskRules>,
}

impl TryFrom<RawGrant> for Grant {
    type Error = String;

    fn try_from(r: RawGrant) -> Result<Self, String> {
        let who = match (r.identity, r.subject, r.group) {
            (Some(n), None, None) => Who::Identity(n),
            (None, Some(s), None) => Who::Subject(s),
            (None, None, Some(g)) => Who::Group(g),
            _ => {
                return Err(format!(
                    "grant{}: give exactly one of `identity`, `subject` or `group`",
                    r.name.map(|n| format!(" `{n}`")).unwrap_or_default()
                ));
            }
        };
        Ok(Grant {
            name: r.name,
            who,
            target: r.target,
            effect: r.effect,
            sql: r.sql,
            expires: r.expires,
            review_by: r.review_by,
            masking: r.masking,
            source: None,
        })
    }
}

/// An RFC 3339 instant, or a date meaning the end of that day in UTC (a grant that `expires:
/// 2026-12-31` still applies on the 31st).
fn instant<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
    let s = String::deserialize(d)?;
    parse_instant(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

pub fn parse_instant(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.succ_opt())
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
        .ok_or_else(|| {
            format!("`{s}` is not a date (YYYY-MM-DD) or an RFC 3339 time (2026-12-31T18:00:00Z)")
        })
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
                "grants[{index}] ({} {} on {})",
                format!("{:?}", self.effect).to_lowercase(),
                self.who,
                self.target
            ),
        }
    }

    /// Whether the grant is in force at `now` (not expired).
    pub fn in_force(&self, now: DateTime<Utc>) -> bool {
        self.expires.is_none_or(|e| now < e)
    }

    /// Whether this grant applies to `agent` on `target` at `now`.
    pub fn applies(&self, agent: Option<&AgentId>, target: &str, now: DateTime<Utc>) -> bool {
        self.target == target && agent.is_some_and(|a| self.who.matches(a)) && self.in_force(now)
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
    use super::*;

    #[test]
    fn who_and_when() {
        let g: Grant = serde_yaml::from_str(
            "{group: data, target: t, effect: allow, expires: 2026-12-31, review_by: '2026-12-01T09:00:00+01:00'}",
        )
        .unwrap();
        assert_eq!(g.who, Who::Group("data".into()));
        assert_eq!(g.expires.unwrap().to_rfc3339(), "2027-01-01T00:00:00+00:00");
        assert_eq!(
            g.review_by.unwrap().to_rfc3339(),
            "2026-12-01T08:00:00+00:00"
        );
        assert!(g.in_force(parse_instant("2026-12-31T23:59:59Z").unwrap()));
        assert!(!g.in_force(parse_instant("2027-01-01T00:00:00Z").unwrap()));
        for bad in [
            "{target: t, effect: allow}",
            "{identity: a, group: g, target: t, effect: allow}",
        ] {
            let e = serde_yaml::from_str::<Grant>(bad).unwrap_err().to_string();
            assert!(e.contains("exactly one of"), "{e}");
        }
        let e =
            serde_yaml::from_str::<Grant>("{identity: a, target: t, effect: allow, expires: soon}")
                .unwrap_err()
                .to_string();
        assert!(e.contains("`soon` is not a date"), "{e}");
    }

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
