//! Policy decides; protocols describe. [`evaluate`] takes plain data (who, what) and returns a
//! [`Verdict`], with no I/O, so every rule is a table-driven unit test.
//!
//! Connection level: a destination a target names is allowed; any other follows the
//! configuration's `unlisted` setting. Statement level (SQL): the [`Grant`]s of the agent's
//! identity on the target; deny overrides review overrides allow; no covering grant: deny.

mod grant;

pub use grant::{Effect, Grant, GrantSource, SqlGrant, Who, glob_match, parse_instant};

use crate::{
    config::{Target, Unlisted},
    identity::AgentId,
    protocols::postgres::classify::{Facts, SqlClass},
};
use chrono::{DateTime, Utc};
use std::net::SocketAddr;

/// Who is asking, and when (grants expire; policy reads no clock itself).
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub agent: Option<&'a AgentId>,
    pub now: DateTime<Utc>,
}

impl<'a> Subject<'a> {
    /// `agent`, asking now.
    pub fn now(agent: Option<&'a AgentId>) -> Self {
        Self {
            agent,
            now: Utc::now(),
        }
    }
}

/// What is asked for.
#[derive(Debug, Clone, Copy)]
pub enum Action<'a> {
    /// Open a connection to `dst`, which `target` names (or no target does).
    Connect {
        dst: SocketAddr,
        target: Option<&'a Target>,
    },
    /// Run SQL with these facts on `target`.
    Sql { target: &'a str, facts: &'a Facts },
}

/// Why something was refused: the rule, for the record and the client's error message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub rule: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny(Refusal),
    /// Wait for a human's approval (a `review` grant). Until approvals exist, protocols refuse
    /// these and say that approval is required.
    Hold,
}

/// A verdict with the rule that produced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub rule: String,
}

impl Decision {
    fn allow(rule: String) -> Self {
        Self {
            verdict: Verdict::Allow,
            rule,
        }
    }

    fn deny(rule: String) -> Self {
        Self {
            verdict: Verdict::Deny(Refusal { rule: rule.clone() }),
            rule,
        }
    }

    fn hold(rule: String) -> Self {
        Self {
            verdict: Verdict::Hold,
            rule,
        }
    }
}

/// The grants that apply, folded: deny wins, then review, then allow; `covers` says whether a
/// grant of that effect covers what is asked. `None`: no grant does.
fn strongest<'g>(
    grants: impl Iterator<Item = (usize, &'g Grant)>,
    covers: impl Fn(&Grant) -> bool,
) -> Option<Decision> {
    let (mut review, mut allow) = (None, None);
    for (i, g) in grants.filter(|(_, g)| covers(g)) {
        match g.effect {
            Effect::Deny => return Some(Decision::deny(g.label(i))),
            Effect::Review => review = review.or_else(|| Some(g.label(i))),
            Effect::Allow => allow = allow.or_else(|| Some(g.label(i))),
        }
    }
    review.map(Decision::hold).or(allow.map(Decision::allow))
}

/// The policy in force, replaced whole on reload. Decisions take the current one each time, so
/// a live session's next statement is judged by the newest rules.
#[derive(Debug)]
pub struct PolicyStore {
    current: std::sync::RwLock<std::sync::Arc<Policy>>,
    /// Bumped on every replacement: what was judged under an older generation is judged again.
    generation: std::sync::atomic::AtomicU64,
}

impl PolicyStore {
    pub fn new(policy: Policy) -> Self {
        Self {
            current: std::sync::RwLock::new(std::sync::Arc::new(policy)),
            generation: Default::default(),
        }
    }

    pub fn current(&self) -> std::sync::Arc<Policy> {
        self.current.read().expect("policy lock").clone()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn replace(&self, policy: Policy) {
        let mut current = self.current.write().expect("policy lock");
        *current = std::sync::Arc::new(policy);
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The rules in force.
#[derive(Debug, Clone)]
pub struct Policy {
    pub unlisted: Unlisted,
    pub grants: Vec<Grant>,
    /// The configuration's own masking rules: after any grant's.
    pub masking: crate::mask::MaskRules,
}

impl Policy {
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            unlisted: config.unlisted,
            grants: config.grants.clone(),
            masking: config.masking.clone(),
        }
    }

    /// The masking rules for `subject`'s results on `target`: those of every allow or review
    /// grant that applies, in file order, then the configuration's. Returns the indexes of the
    /// grants that contributed (a key for caching what is built from them) and the rules.
    pub fn masking_for(
        &self,
        subject: &Subject<'_>,
        target: &str,
    ) -> (Vec<usize>, crate::mask::MaskRules) {
        self.masking_where(subject, Some(target))
    }

    /// [`Policy::masking_for`] over every target (`None`) or one.
    pub fn masking_where(
        &self,
        subject: &Subject<'_>,
        target: Option<&str>,
    ) -> (Vec<usize>, crate::mask::MaskRules) {
        let mut from = Vec::new();
        let mut rules = crate::mask::MaskRules::default();
        for (i, g) in self.grants.iter().enumerate() {
            let on = target.unwrap_or(&g.target);
            if g.effect == Effect::Deny || !g.applies(subject.agent, on, subject.now) {
                continue;
            }
            if let Some(m) = &g.masking {
                from.push(i);
                rules.rules.extend(m.rules.iter().cloned());
                rules.allow.extend(m.allow.iter().cloned());
            }
        }
        rules.rules.extend(self.masking.rules.iter().cloned());
        rules.allow.extend(self.masking.allow.iter().cloned());
        (from, rules)
    }

    /// Whether every statement `subject` may run on `target` is read-only (no grant allows a
    /// class beyond read, session and transaction): the upstream session then also gets
    /// `default_transaction_read_only=on`, defence in depth under the SQL rules.
    pub fn read_only(&self, subject: &Subject<'_>, target: &str) -> bool {
        self.grants
            .iter()
            .filter(|g| g.effect != Effect::Deny && g.applies(subject.agent, target, subject.now))
            .all(|g| {
                g.sql.classes.iter().all(|c| {
                    matches!(
                        c,
                        SqlClass::Read | SqlClass::Session | SqlClass::Transaction
                    )
                })
            })
    }
}

pub fn evaluate(policy: &Policy, subject: &Subject<'_>, action: &Action<'_>) -> Decision {
    // Every decision, connect or statement: a session outliving its agent's token (or whose
    // binding became unreadable) gets nothing more.
    if let Some(expired) = expired_token(subject) {
        return expired;
    }
    match action {
        Action::Sql { target, facts } => evaluate_sql(policy, subject, target, facts),
        Action::Connect {
            target: Some(t), ..
        } => evaluate_connect(policy, subject, t),
        Action::Connect { target: None, .. } => match policy.unlisted {
            Unlisted::Allow => Decision::allow("unlisted: allow".into()),
            Unlisted::Deny => Decision::deny("unlisted: deny".into()),
        },
    }
}

fn evaluate_sql(policy: &Policy, subject: &Subject<'_>, target: &str, facts: &Facts) -> Decision {
    let identity = subject.agent.and_then(|a| a.name.as_deref());
    let applicable = policy
        .grants
        .iter()
        .enumerate()
        .filter(|(_, g)| g.applies(subject.agent, target, subject.now));
    strongest(applicable, |g| match g.effect {
        Effect::Deny => deny_matches(&g.sql, facts),
        Effect::Review | Effect::Allow => covers(&g.sql, facts),
    })
    .unwrap_or_else(|| {
        Decision::deny(format!(
            "no grant allows this {} statement for {} on {target}",
            facts.worst().map_or("empty", SqlClass::as_str),
            identity.unwrap_or("an unidentified agent")
        ))
    })
}

/// A connection to a target. PostgreSQL targets judge every statement, so the connection
/// itself is allowed. A raw TCP target has only this one decision: when grants name it, they
/// decide (deny wins, then review, then allow; none applying: denied); a TCP target no grant
/// names is open to every agent, as the target entry itself says.
fn evaluate_connect(policy: &Policy, subject: &Subject<'_>, t: &Target) -> Decision {
    if t.protocol != crate::config::ProtocolKind::Tcp
        || !policy.grants.iter().any(|g| g.target == t.name)
    {
        return Decision::allow(format!("target `{}`", t.name));
    }
    let applicable = policy
        .grants
        .iter()
        .enumerate()
        .filter(|(_, g)| g.applies(subject.agent, &t.name, subject.now));
    strongest(applicable, |_| true).unwrap_or_else(|| {
        Decision::deny(format!(
            "no grant allows {} to connect to `{}`",
            subject
                .agent
                .and_then(|a| a.name.as_deref())
                .unwrap_or("an unidentified agent"),
            t.name
        ))
    })
}

/// A connection from an agent whose ID token has expired (or whose binding cannot be read):
/// refused, saying so.
fn expired_token(subject: &Subject<'_>) -> Option<Decision> {
    let agent = subject.agent?;
    if let Some(e) = &agent.binding_error {
        let rule = format!(
            "the identity binding of agent cgroup {} cannot be read ({e})",
            agent.cgroup
        );
        return Some(Decision::deny(rule));
    }
    let vouched = agent.oidc.as_ref()?;
    let now_ms = u64::try_from(subject.now.timestamp_millis()).unwrap_or(0);
    if now_ms < vouched.expires_at_ms {
        return None;
    }
    let rule = if vouched.expires_at_ms == 0 {
        // A service whose token the daemon has not been able to obtain.
        format!(
            "{} has no valid identity token (the daemon could not obtain one; see its log)",
            vouched.subject
        )
    } else {
        let expired = i64::try_from(vouched.expires_at_ms)
            .ok()
            .and_then(DateTime::from_timestamp_millis)
            .map_or_else(|| "?".to_string(), |t| t.to_rfc3339());
        format!(
            "the identity token of {} expired at {expired}; refresh it or start the agent again",
            vouched.subject
        )
    };
    Some(Decision::deny(rule))
}

/// An allow/review grant covers the facts when it lists every class, every relation matches one
/// of its patterns (no patterns: any relation), and it lists every non-built-in function called
/// (or has the `exec` class, which covers any function).
fn covers(g: &SqlGrant, f: &Facts) -> bool {
    f.classes.iter().all(|c| g.classes.contains(c))
        && f.objects
            .iter()
            .all(|o| g.objects.is_empty() || g.objects.iter().any(|p| glob_match(p, &o.name)))
        && (g.classes.contains(&SqlClass::Exec)
            || f.functions.iter().all(|fun| g.functions.contains(fun)))
}

/// A deny grant matches when the facts have any of its classes (none listed: any; calling a
/// non-built-in function counts as `exec`) and touch any relation matching its patterns (none
/// listed: regardless of relations).
fn deny_matches(g: &SqlGrant, f: &Facts) -> bool {
    let class_hit =
        g.classes.is_empty() || f.effective_classes().iter().any(|c| g.classes.contains(c));
    let object_hit = g.objects.is_empty()
        || f.objects
            .iter()
            .any(|o| g.objects.iter().any(|p| glob_match(p, &o.name)));
    class_hit && object_hit
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
            credential: None,
            database: None,
            tls: Default::default(),
            tls_ca_file: None,
            tls_server_name: None,
        };
        let dst: SocketAddr = "127.0.0.1:5432".parse().unwrap();
        let subject = Subject::now(None);
        let cases = [
            (Unlisted::Deny, Some(&target), Verdict::Allow, "target `db`"),
            (
                Unlisted::Allow,
                Some(&target),
                Verdict::Allow,
                "target `db`",
            ),
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
            let d = evaluate(
                &Policy {
                    unlisted,
                    grants: vec![],
                    masking: Default::default(),
                },
                &subject,
                &Action::Connect { dst, target },
            );
            assert_eq!(d.verdict, verdict, "{unlisted:?} {target:?}");
            assert_eq!(d.rule, rule);
        }
    }

    #[test]
    fn grants_that_name_a_tcp_target_decide_who_connects() {
        let cfg = crate::config::Config::parse(
            "targets:\n  - {name: web, protocol: tcp, address: 127.0.0.1, port: 80}\n  - {name: open, protocol: tcp, address: 127.0.0.1, port: 81}\n\
             grants:\n  - {identity: alice, target: web, effect: allow}\n  - {identity: mallory, target: web, effect: deny}\n  - {identity: mallory, target: web, effect: allow}\n",
            "t.yaml",
        )
        .unwrap();
        let policy = Policy::from_config(&cfg);
        let connect = |who: Option<&str>, target: &str| {
            let agent = who.map(AgentId::named);
            let t = cfg.targets.iter().find(|t| t.name == target).unwrap();
            evaluate(
                &policy,
                &Subject::now(agent.as_ref()),
                &Action::Connect {
                    dst: "127.0.0.1:80".parse().unwrap(),
                    target: Some(t),
                },
            )
            .verdict
        };
        assert_eq!(connect(Some("alice"), "web"), Verdict::Allow);
        assert!(
            matches!(connect(Some("mallory"), "web"), Verdict::Deny(_)),
            "deny wins"
        );
        assert!(
            matches!(connect(Some("bob"), "web"), Verdict::Deny(_)),
            "no grant applies"
        );
        assert!(
            matches!(connect(None, "web"), Verdict::Deny(_)),
            "unidentified"
        );
        assert_eq!(
            connect(Some("bob"), "open"),
            Verdict::Allow,
            "no grant names it"
        );
    }

    /// The bypass corpus (tests/corpus/postgres-readonly.sql) under the shipped read-only
    /// example policy: every case must get its expected verdict.
    #[test]
    fn bypass_corpus_under_the_readonly_example() {
        use crate::protocols::postgres::classify::classify;
        let cfg = crate::config::Config::parse(
            include_str!("../../../examples/readonly.yaml"),
            "readonly.yaml",
        )
        .unwrap();
        let policy = Policy::from_config(&cfg);
        let agent = AgentId::named("agent");
        let cases = corpus(include_str!("../../../tests/corpus/postgres-readonly.sql"));
        assert!(cases.len() >= 60, "the corpus must keep at least 60 cases");
        let mut wrong = Vec::new();
        for (expect_allow, sql) in &cases {
            let allowed = match classify(sql) {
                Err(_) => false,
                Ok(c) => {
                    let facts = c.facts_with(&Default::default());
                    let d = evaluate(
                        &policy,
                        &Subject::now(Some(&agent)),
                        &Action::Sql {
                            target: "app",
                            facts: &facts,
                        },
                    );
                    d.verdict == Verdict::Allow
                }
            };
            if allowed != *expect_allow {
                wrong.push(format!(
                    "expected {}: {sql}",
                    if *expect_allow { "allow" } else { "deny" }
                ));
            }
        }
        assert!(
            wrong.is_empty(),
            "{} of {} corpus cases wrong:\n{}",
            wrong.len(),
            cases.len(),
            wrong.join("\n")
        );
    }

    /// `-- allow` / `-- deny` blocks; `#` lines are comments.
    fn corpus(text: &str) -> Vec<(bool, String)> {
        let mut cases: Vec<(bool, String)> = Vec::new();
        for line in text.lines() {
            match line.trim_end() {
                "-- allow" => cases.push((true, String::new())),
                "-- deny" => cases.push((false, String::new())),
                l if l.starts_with('#') || cases.is_empty() => {}
                l => {
                    let sql = &mut cases.last_mut().unwrap().1;
                    if !sql.is_empty() {
                        sql.push('\n');
                    }
                    sql.push_str(l);
                }
            }
        }
        cases
            .into_iter()
            .map(|(a, s)| (a, s.trim().to_string()))
            .collect()
    }

    #[test]
    fn masking_comes_from_the_grants_that_apply_then_the_configuration() {
        let cfg = crate::config::Config::parse(
            "targets: [{name: t, protocol: tcp, address: 127.0.0.1, port: 1}, {name: other, protocol: tcp, address: 127.0.0.1, port: 2}]\n\
             masking: {rules: [{name: global, kinds: [email]}]}\n\
             grants:\n\
             - {group: hr, target: t, effect: allow, masking: {rules: [{name: hr-keep, kinds: [email], method: keep}], allow: ['x']}}\n\
             - {group: all, target: t, effect: allow}\n\
             - {group: all, target: t, effect: deny, masking: {rules: [{name: ignored, kinds: [card]}]}}\n\
             - {group: hr, target: other, effect: allow, masking: {rules: [{name: elsewhere, kinds: [card]}]}}\n",
            "m.yaml",
        )
        .unwrap();
        let policy = Policy::from_config(&cfg);
        let agent = |groups: &[&str]| {
            let mut a = AgentId::named("a");
            a.oidc = Some(crate::identity::Vouched {
                issuer: "i".into(),
                subject: "a".into(),
                email: None,
                groups: groups.iter().map(|g| g.to_string()).collect(),
                expires_at_ms: u64::MAX,
            });
            a
        };
        let names = |groups: &[&str]| {
            let a = agent(groups);
            let (from, rules) = policy.masking_for(&Subject::now(Some(&a)), "t");
            let names: Vec<String> = rules.rules.iter().filter_map(|r| r.name.clone()).collect();
            (from, names, rules.allow)
        };
        assert_eq!(
            names(&["hr", "all"]),
            (
                vec![0],
                vec!["hr-keep".into(), "global".into()],
                vec!["x".to_string()]
            )
        );
        assert_eq!(names(&["all"]), (vec![], vec!["global".into()], vec![]));
    }

    #[test]
    fn deny_overrides_review_overrides_allow() {
        use crate::protocols::postgres::classify::classify;
        let grant = |effect: &str, classes: &str| -> Grant {
            serde_yaml::from_str(&format!(
                "{{identity: a, target: t, effect: {effect}, sql: {{classes: [{classes}]}}}}"
            ))
            .unwrap()
        };
        let agent = AgentId::named("a");
        let verdict = |grants: Vec<Grant>, sql: &str| {
            let c = classify(sql).unwrap();
            let p = Policy {
                unlisted: Unlisted::Deny,
                grants,
                masking: Default::default(),
            };
            evaluate(
                &p,
                &Subject::now(Some(&agent)),
                &Action::Sql {
                    target: "t",
                    facts: &c.facts,
                },
            )
            .verdict
        };
        let sql = "DELETE FROM x";
        assert_eq!(verdict(vec![grant("allow", "write")], sql), Verdict::Allow);
        assert_eq!(
            verdict(vec![grant("allow", "write"), grant("review", "write")], sql),
            Verdict::Hold
        );
        assert!(matches!(
            verdict(
                vec![
                    grant("allow", "write"),
                    grant("review", "write"),
                    grant("deny", "write")
                ],
                sql
            ),
            Verdict::Deny(_)
        ));
        assert!(
            matches!(verdict(vec![grant("allow", "read")], sql), Verdict::Deny(_)),
            "no covering grant"
        );
        assert!(
            matches!(verdict(vec![], "SELECT 1"), Verdict::Deny(_)),
            "no grant at all"
        );
        // A listed function runs under a read grant; an unlisted one does not; exec covers any.
        let with_fn: Grant = serde_yaml::from_str("{identity: a, target: t, effect: allow, sql: {classes: [read], functions: [pg_sleep]}}").unwrap();
        assert_eq!(
            verdict(vec![with_fn.clone()], "SELECT pg_sleep(0)"),
            Verdict::Allow
        );
        assert!(matches!(
            verdict(vec![with_fn], "SELECT lo_unlink(1)"),
            Verdict::Deny(_)
        ));
        assert_eq!(
            verdict(vec![grant("allow", "read, exec")], "SELECT lo_unlink(1)"),
            Verdict::Allow
        );
        assert!(matches!(
            verdict(
                vec![grant("allow", "read, exec"), grant("deny", "exec")],
                "SELECT lo_unlink(1)"
            ),
            Verdict::Deny(_)
        ));
        let other = AgentId::named("b");
        let p = Policy {
            unlisted: Unlisted::Deny,
            grants: vec![grant("allow", "read")],
            masking: Default::default(),
        };
        let c = classify("SELECT 1").unwrap();
        assert!(
            matches!(
                evaluate(
                    &p,
                    &Subject::now(Some(&other)),
                    &Action::Sql {
                        target: "t",
                        facts: &c.facts
                    }
                )
                .verdict,
                Verdict::Deny(_)
            ),
            "grants are per identity"
        );
    }
}
