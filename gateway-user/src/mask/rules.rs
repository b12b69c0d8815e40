//! Masking rules as written in the configuration (`masking:`), and their checked, compiled form.
//!
//! ```yaml
//! masking:
//!   rules:
//!     - name: hr-ssn                      # optional; counted and shown as the rule
//!       columns: ["hr.employees.ssn"]     # schema.table.column glob (`*`), or a column-name glob
//!       method: partial                   # redact (default) | partial | token | keep
//!     - kinds: [email]                    # detector kinds, anywhere
//!       method: token
//!     - columns: ["*notes"]
//!       kinds: [card, phone]              # both: those kinds in those columns
//!       method: partial
//!   allow: ["4111111111111111", "*@example.com"]
//! ```
//!
//! A rule with `columns` and no `kinds` names whole columns: the first such rule that matches a
//! column masks every value of it, found or not (`keep`: leave that column alone). Rules with
//! `kinds` pick the method for findings of those kinds; the first match wins. Findings no rule
//! picks are redacted as `builtin:<kind>`. Allowlisted values (exact, or `*` globs) are never
//! masked. Owns parsing and checking only; it must not look at values.

use super::{
    MaskError,
    kind::{Kind, KindSet},
};
use crate::policy::glob_match;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MaskRules {
    #[serde(default)]
    pub rules: Vec<MaskRule>,
    /// Values never masked: exact, or globs with `*` (`*@example.com`). Compared with what a
    /// detector found, and with its digits or letters alone (`4111 1111 1111 1111` matches
    /// `4111111111111111`).
    #[serde(default)]
    pub allow: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MaskRule {
    #[serde(default)]
    pub name: Option<String>,
    /// Column globs. With a dot: against `schema.table.column` (a pattern with one dot against
    /// `table.column`); without: against the column name. Case-sensitive, like quoted identifiers.
    #[serde(default)]
    pub columns: Vec<String>,
    #[serde(default)]
    pub kinds: Vec<Kind>,
    #[serde(default)]
    pub method: Method,
}

/// How a found value is rewritten.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// `****`, whatever the length.
    #[default]
    Redact,
    /// Keep what identifies little: `j***@example.com`; the last four digits of cards, SSNs,
    /// phones and IBANs; the vendor prefix of tokens; the first two octets of an IPv4 address.
    /// Kinds with nothing safe to keep are redacted.
    Partial,
    /// A deterministic keyed token, `tok_` + 16 hex digits of HMAC-SHA256 under the daemon's
    /// key, so equal values stay joinable; emails keep their domain (`tok_…@example.com`).
    Token,
    /// Leave the value as it is (switch a detector off, or exempt a column).
    Keep,
}

/// A checked rule.
#[derive(Debug, Clone)]
pub(super) struct Rule {
    /// The name counted and reported: the rule's own, else `rules[i]`.
    pub label: Arc<str>,
    pub columns: Vec<String>,
    pub kinds: KindSet,
    pub method: Method,
}

impl Rule {
    /// A whole-column rule: columns and no kinds.
    pub(super) fn is_whole(&self) -> bool {
        self.kinds.is_empty()
    }

    /// Whether the rule's columns cover `name` / `qualified` (no columns: every column).
    pub(super) fn covers(&self, name: Option<&str>, qualified: Option<&str>) -> bool {
        self.columns.is_empty()
            || self
                .columns
                .iter()
                .any(|p| column_match(p, name, qualified))
    }
}

fn column_match(pattern: &str, name: Option<&str>, qualified: Option<&str>) -> bool {
    match pattern.matches('.').count() {
        0 => name.is_some_and(|n| glob_match(pattern, n)),
        dots => qualified.is_some_and(|q| {
            // `table.column` patterns look at the last two parts of `schema.table.column`.
            let tail = q
                .char_indices()
                .rev()
                .filter(|(_, c)| *c == '.')
                .nth(dots)
                .map_or(q, |(i, _)| &q[i + 1..]);
            glob_match(pattern, tail)
        }),
    }
}

impl MaskRules {
    /// Whether the rules are usable (what `Masker::new` would refuse), for configuration checks.
    pub fn check(&self) -> Result<(), MaskError> {
        self.compile().map(drop)
    }

    /// Check the rules and give them their labels.
    pub(super) fn compile(&self) -> Result<Vec<Rule>, MaskError> {
        if let Some(index) = self.allow.iter().position(String::is_empty) {
            return Err(MaskError::EmptyAllow { index });
        }
        self.rules
            .iter()
            .enumerate()
            .map(|(index, r)| {
                if r.columns.is_empty() && r.kinds.is_empty() {
                    return Err(MaskError::Empty { index });
                }
                if r.columns.iter().any(String::is_empty) {
                    return Err(MaskError::EmptyPattern { index });
                }
                Ok(Rule {
                    label: r
                        .name
                        .clone()
                        .unwrap_or_else(|| format!("masking.rules[{index}]"))
                        .into(),
                    columns: r.columns.clone(),
                    kinds: KindSet::of(&r.kinds),
                    method: r.method,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_yaml_and_refuses_unknown_fields() {
        let r: MaskRules = serde_yaml::from_str(
            "rules:\n  - {columns: [\"hr.*.ssn\"], method: partial}\n  - {kinds: [email, card], method: token}\nallow: [\"*@example.com\"]\n",
        )
        .unwrap();
        assert_eq!(r.rules.len(), 2);
        assert_eq!(r.rules[1].kinds, [Kind::Email, Kind::Card]);
        assert_eq!(r.rules[0].method, Method::Partial);
        assert!(serde_yaml::from_str::<MaskRules>("rules: [{colums: [x]}]").is_err());
        let e = serde_yaml::from_str::<MaskRules>("rules: [{kinds: [emial]}]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown variant `emial`"), "{e}");
        assert!(serde_yaml::from_str::<MaskRules>("rules: [{kinds: [column]}]").is_err());
        assert!(
            serde_yaml::from_str::<MaskRules>("rules: [{kinds: [card], method: hide}]").is_err()
        );
    }

    #[test]
    fn refuses_rules_that_match_nothing() {
        let r: MaskRules = serde_yaml::from_str("rules: [{method: token}]").unwrap();
        assert!(matches!(r.compile(), Err(MaskError::Empty { index: 0 })));
        let r: MaskRules = serde_yaml::from_str("allow: ['']").unwrap();
        assert!(r.compile().is_err());
    }

    #[test]
    fn configuration_section() {
        use crate::config::Config;
        let cfg = Config::parse(
            "masking:\n  rules:\n    - {kinds: [email], method: partial}\n  allow: ['*@example.com']\n",
            "c.yaml",
        )
        .unwrap();
        assert_eq!(cfg.masking.rules[0].method, Method::Partial);
        assert!(
            Config::parse("{}", "c.yaml")
                .unwrap()
                .masking
                .rules
                .is_empty()
        );
        let e = Config::parse("masking:\n  rules: [{method: token}]\n", "c.yaml")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "c.yaml: masking.rules[0]: names neither columns nor kinds, so it matches nothing"
        );
        let e = Config::parse(
            "masking:\n  rules: [{kinds: [email], mthod: token}]\n",
            "c.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("c.yaml:2:") && e.contains("unknown field `mthod`"),
            "{e}"
        );
    }

    #[test]
    fn column_patterns() {
        let q = Some("hr.employees.ssn");
        let n = Some("ssn");
        for (p, want) in [
            ("ssn", true),
            ("*ssn", true),
            ("email", false),
            ("hr.employees.ssn", true),
            ("hr.*.ssn", true),
            ("*.ssn", true),
            ("employees.ssn", true),
            ("people.ssn", false),
            ("public.*", false),
        ] {
            assert_eq!(column_match(p, n, q), want, "{p}");
        }
        assert!(!column_match("hr.employees.ssn", n, None));
    }
}
