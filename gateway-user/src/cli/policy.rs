//! `chaperone policy check`: what the daemon would decide for a statement, offline, with the
//! facts and the rule that decided. Exit 0 allow, 1 deny, 2 review.

use super::{PolicyCheckArgs, print_json};
use crate::{
    config::{Config, ProtocolKind},
    identity::AgentId,
    policy::{self, Action, Policy, Subject, Verdict},
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
    let agent = AgentId::named(&args.identity);
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
