//! `chaperone mask`: run the masking engine over stdin, line by line, offline. For trying rules
//! and detectors on sample data; the daemon masks results with the same engine.
//!
//! Owns reading lines and printing results; what is masked is `mask`'s decision.

use super::{MaskArgs, ValueKind};
use crate::{
    config::Config,
    mask::{Column, Finding, Masker, TokenKey, ValueType},
};
use anyhow::Context as _;
use serde::Serialize;
use std::{
    borrow::Cow,
    io::{BufRead, Read, Write},
};

#[derive(Serialize)]
struct Line<'a> {
    masked: Cow<'a, str>,
    /// Offsets are bytes into the input line.
    findings: &'a [Finding],
}

pub fn mask(config: &Config, args: &MaskArgs, json: bool) -> anyhow::Result<i32> {
    let rules = match &args.identity {
        None => config.masking.clone(),
        Some(identity) => {
            if let Some(t) = &args.target {
                anyhow::ensure!(
                    config.targets.iter().any(|x| &x.name == t),
                    "{}: no target named `{t}`",
                    config.source
                );
            }
            let agent =
                super::policy::offline_agent(identity, args.subject.as_deref(), &args.groups);
            crate::policy::Policy::from_config(config)
                .masking_where(
                    &crate::policy::Subject::now(Some(&agent)),
                    args.target.as_deref(),
                )
                .1
        }
    };
    let masker = Masker::new(&rules, random_key()?)
        .with_context(|| format!("{}: masking", config.source))?;
    let qualified = args.column.as_deref().filter(|c| c.contains('.'));
    let col = Column {
        name: args
            .column
            .as_deref()
            .map(|c| c.rsplit('.').next().unwrap_or(c)),
        qualified,
        ty: match args.ty {
            ValueKind::Text => ValueType::Text,
            ValueKind::Json => ValueType::Json,
            ValueKind::Array => ValueType::Array(Box::new(ValueType::Text)),
        },
    };
    let plan = masker.column(&col);
    let mut out = std::io::stdout().lock();
    for line in std::io::stdin().lock().split(b'\n') {
        let mut line = line.context("reading stdin")?;
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        let m = plan.mask(&line);
        let written = if json {
            let report = Line {
                masked: String::from_utf8_lossy(&m.bytes),
                findings: &m.findings,
            };
            serde_json::to_writer(&mut out, &report)
                .map_err(std::io::Error::from)
                .and_then(|()| out.write_all(b"\n"))
        } else {
            out.write_all(&m.bytes).and_then(|()| out.write_all(b"\n"))
        };
        match written {
            // `chaperone mask | head`: the reader is done, so are we.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(0),
            r => r.context("writing stdout")?,
        }
    }
    out.flush().context("writing stdout")?;
    Ok(0)
}

/// A fresh key per run: `token` output is stable within one run only, and the daemon's key never
/// reaches the command line.
fn random_key() -> anyhow::Result<TokenKey> {
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .context("reading /dev/urandom for the token key")?;
    Ok(TokenKey::from_bytes(key))
}
