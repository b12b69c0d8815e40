//! `chaperone policy check`: what the daemon would decide for a statement, offline, with the
//! facts and the rule that decided. Exit 0 allow, 1 deny, 2 review.
//! `chaperone policy explain`: every grant that applies to an identity, with its source line.

use super::{PolicyCheckArgs, PolicyExplainArgs, WhoArgs, print_json};
use crate::{
    config::{Config, ProtocolKind},
    identity::{AgentId, Vouched},
    policy::{self, Action, Grant, GrantSource, Policy, Subject, Verdict},
    protocols::postgres::classify::{Facts, classify},
};
use anyhow::{anyhow, bail};
use serde::Serialize;
use std::collections::HashMap;

#[derive(Serialize)]
struct CheckReport {
    verdict: &'static str,
    rule: String,
    facts: Option<Facts>,
    /// Why the statement could not be classified (it is then denied).
    error: Option<String>,
}

pub fn check(config: &Config, args: &PolicyCheckArgs, json: bool) -> anyhow::Result<i32> {
    let target = config
        .targets
        .iter()
        .find(|t| t.name == args.target)
        .ok_or_else(|| anyhow!("{}: no target named `{}`", config.source, args.target))?;
    if target.protocol != ProtocolKind::Postgres {
        bail!(
            "target `{}` is not a postgres target: only connections are judged there",
            target.name
        );
    }
    let policy = Policy::from_config(config);
    let agent = agent_for(&args.who);
    let report = match classify(&args.sql) {
        Err(e) => CheckReport {
            verdict: "deny",
            rule: "statements that do not parse are denied".into(),
            facts: None,
            error: Some(e.to_string()),
        },
        Ok(c) => {
            let facts = c.facts_with(&HashMap::new()).into_owned();
            let d = policy::evaluate(
                &policy,
                &Subject::now(Some(&agent)),
                &Action::Sql {
                    target: &target.name,
                    facts: &facts,
                },
            );
            CheckReport {
                verdict: match d.verdict {
                    Verdict::Allow => "allow",
                    Verdict::Deny(_) => "deny",
                    Verdict::Hold => "review",
                },
                rule: d.rule,
                facts: Some(facts),
                error: None,
            }
        }
    };
    if json {
        print_json(&report);
    } else {
        println!("verdict:   {}", report.verdict);
        println!("rule:      {}", report.rule);
        if let Some(e) = &report.error {
            println!("error:     {e}");
        }
        if let Some(f) = &report.facts {
            let classes: Vec<&str> = f.effective_classes().iter().map(|c| c.as_str()).collect();
            println!("classes:   {}", classes.join(", "));
            for o in &f.objects {
                println!("object:    {} ({})", o.name, o.access.as_str());
            }
            for fun in &f.functions {
                println!("function:  {fun}");
            }
            for n in &f.notes {
                println!("note:      {n}");
            }
        }
    }
    Ok(match report.verdict {
        "allow" => 0,
        "review" => 2,
        _ => 1,
    })
}

fn agent_for(who: &WhoArgs) -> AgentId {
    offline_agent(&who.identity, who.subject.as_deref(), &who.groups)
}

/// The agent an offline command describes; with a subject or groups, as an OIDC-proven one
/// would be.
pub(super) fn offline_agent(identity: &str, subject: Option<&str>, groups: &[String]) -> AgentId {
    let mut agent = AgentId::named(identity);
    if subject.is_some() || !groups.is_empty() {
        agent.oidc = Some(Vouched {
            issuer: "(offline check)".into(),
            subject: subject.unwrap_or(identity).to_string(),
            email: None,
            groups: groups.to_vec(),
            expires_at_ms: u64::MAX,
        });
    }
    agent
}

#[derive(Serialize)]
struct ExplainedGrant<'a> {
    rule: String,
    /// `in force` or `expired`.
    status: &'static str,
    #[serde(flatten)]
    grant: &'a Grant,
}

pub fn explain(config: &Config, args: &PolicyExplainArgs, json: bool) -> anyhow::Result<i32> {
    let agent = agent_for(&args.who);
    let now = chrono::Utc::now();
    let grants: Vec<ExplainedGrant> = config
        .grants
        .iter()
        .enumerate()
        .filter(|(_, g)| g.who.matches(&agent))
        .map(|(i, g)| ExplainedGrant {
            rule: g.label(i),
            status: if g.in_force(now) {
                "in force"
            } else {
                "expired"
            },
            grant: g,
        })
        .collect();
    if json {
        print_json(&serde_json::json!({ "identity": agent, "grants": grants }));
        return Ok(0);
    }
    if grants.is_empty() {
        println!(
            "no grant applies to {}: everything it asks for is denied",
            args.who.identity
        );
    }
    for e in &grants {
        let g = e.grant;
        println!(
            "{}  [{}]  {} {} on {}",
            g.source
                .as_ref()
                .map_or("-".to_string(), GrantSource::to_string),
            e.rule,
            format!("{:?}", g.effect).to_lowercase(),
            g.who,
            g.target
        );
        let list = |v: Vec<String>| {
            if v.is_empty() {
                "-".to_string()
            } else {
                v.join(", ")
            }
        };
        println!(
            "    classes: {}",
            list(
                g.sql
                    .classes
                    .iter()
                    .map(|c| c.as_str().to_string())
                    .collect()
            )
        );
        println!("    objects: {}", list(g.sql.objects.clone()));
        if !g.sql.functions.is_empty() {
            println!(
                "    functions: {}",
                list(g.sql.functions.iter().cloned().collect())
            );
        }
        let date =
            |d: Option<chrono::DateTime<chrono::Utc>>| d.map_or("never".into(), |d| d.to_rfc3339());
        println!(
            "    expires: {} ({})   review by: {}",
            date(g.expires),
            e.status,
            g.review_by.map_or("-".into(), |d| d.to_rfc3339())
        );
    }
    Ok(0)
}
