//! Policy decides; protocols describe. [`evaluate`] takes plain data (who, what) and returns a
//! [`Verdict`], with no I/O, so every rule is a table-driven unit test.
//!
//! Today's rules are connection-level: a destination a target names is allowed; any other
//! follows the configuration's `unlisted` setting. Statement-level rules (SQL classes, HTTP
//! verbs) arrive with their protocols as new [`Action`] variants.

use crate::{
    config::{Target, Unlisted},
    identity::AgentId,
};
use std::net::SocketAddr;

/// Who is asking.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub agent: Option<&'a AgentId>,
}

/// What is asked for.
#[derive(Debug, Clone, Copy)]
pub enum Action<'a> {
    /// Open a connection to `dst`, which `target` names (or no target does).
    Connect {
        dst: SocketAddr,
        target: Option<&'a Target>,
    },
}

/// A pending human approval (the approvals issue resolves these).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApprovalId(pub u64);

/// Why something was refused: the rule, for the record and the client's error message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub rule: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny(Refusal),
    /// Wait for a human. Not produced yet: no rule can say `review` until approvals land.
    Hold(ApprovalId),
}

/// A verdict with the rule that produced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub rule: String,
}

/// The rules in force.
#[derive(Debug, Clone)]
pub struct Policy {
    pub unlisted: Unlisted,
}

pub fn evaluate(policy: &Policy, _subject: &Subject<'_>, action: &Action<'_>) -> Decision {
    match action {
        Action::Connect {
            target: Some(t), ..
        } => Decision {
            verdict: Verdict::Allow,
            rule: format!("target `{}`", t.name),
        },
        Action::Connect { target: None, .. } => {
            let rule = match policy.unlisted {
                Unlisted::Allow => "unlisted: allow",
                Unlisted::Deny => "unlisted: deny",
            }
            .to_string();
            let verdict = match policy.unlisted {
                Unlisted::Allow => Verdict::Allow,
                Unlisted::Deny => Verdict::Deny(Refusal { rule: rule.clone() }),
            };
            Decision { verdict, rule }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ProtocolKind;

    #[test]
    fn connect_table() {
        let target = Target {
            name: "db".into(),
            protocol: ProtocolKind::Tcp,
            address: "127.0.0.1/32".parse().unwrap(),
            port: 5432,
        };
        let dst: SocketAddr = "127.0.0.1:5432".parse().unwrap();
        let subject = Subject { agent: None };
        let cases = [
            (Unlisted::Deny, Some(&target), Verdict::Allow, "target `db`"),
            (Unlisted::Allow, Some(&target), Verdict::Allow, "target `db`"),
            (Unlisted::Allow, None, Verdict::Allow, "unlisted: allow"),
            (
                Unlisted::Deny,
                None,
                Verdict::Deny(Refusal {
                    rule: "unlisted: deny".into(),
                }),
                "unlisted: deny",
            ),
        ];
        for (unlisted, target, verdict, rule) in cases {
            let d = evaluate(&Policy { unlisted }, &subject, &Action::Connect { dst, target });
            assert_eq!(d.verdict, verdict, "{unlisted:?} {target:?}");
            assert_eq!(d.rule, rule);
        }
    }
}
