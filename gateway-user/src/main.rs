//! `chaperone`: CLI entry. Parses flags, sets up logging, runs the command, and turns an error
//! into one `chaperone: …` line (or `{"error": …}` with `--json`) and exit code 2.

use chaperone::cli::{Cli, dispatch};
use clap::Parser;

fn main() {
    let cli = Cli::parse();
    let json = cli.json;
    init_tracing(json);
    let code = match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            let msg = describe(&e);
            if json {
                eprintln!("{}", serde_json::json!({ "error": msg }));
            } else {
                eprintln!("chaperone: {msg}");
            }
            2
        }
    };
    std::process::exit(code);
}

/// The error and its causes, each said once. Many of our errors name their cause in their own
/// message (log lines print only the outer error), so the plain `{:#}` chain would repeat it.
fn describe(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if msg.contains(&text) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&text);
    }
    msg
}

fn init_tracing(json: bool) {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter =
        EnvFilter::try_from_env("CHAPERONE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
