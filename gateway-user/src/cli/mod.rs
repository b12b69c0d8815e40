//! The command line, defined once: clap derive types whose doc comments are the help text, and
//! one function per subcommand. `main` turns the returned error into one `chaperone: …` line
//! (or a JSON object with `--json`) and an exit code.

mod login;
mod mask;
mod policy;
mod run;

use crate::{
    app::DaemonStatus,
    config::Config,
    identity::AgentTree,
    record::{SessionEvent, read_log},
    redirect,
};
use anyhow::Context as _;
use clap::{Parser, Subcommand};
use serde::Serialize;
use std::path::PathBuf;

/// Chaperone: puts every network connection of an AI coding agent under review.
#[derive(Debug, Parser)]
#[command(name = "chaperone", version)]
pub struct Cli {
    /// Configuration file (default: /etc/chaperone/chaperone.yaml, else the embedded default).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Machine-readable output: JSON objects on stdout, JSON log lines from the daemon, and
    /// errors as `{"error": …}` on stderr.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (root): load and attach the eBPF programs to the agent cgroup tree, listen
    /// for redirected connections and relay them. Stopping it leaves agents refused, not free.
    Daemon(DaemonArgs),
    /// Start CMD, unmodified, as an agent: in a fresh cgroup of the agent tree, so every TCP
    /// connection it or its children make is intercepted. Exit code and stdio pass through.
    Run(RunArgs),
    /// Show whether interception is installed, whether a daemon serves it, and map usage.
    Status,
    /// List recorded sessions.
    Sessions(SessionsArgs),
    /// Work with the policy offline.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Mask stdin line by line, as the daemon masks result values, and write each line to
    /// stdout. Uses the configuration's `masking` rules, else the built-in detectors with
    /// redaction. With --json: one `{"masked", "findings": [{kind, start, end, rule}]}` per line,
    /// offsets in bytes into the input line.
    Mask(MaskArgs),
}

#[derive(Debug, clap::Args)]
pub struct MaskArgs {
    /// Mask as the daemon would for this agent: the masking rules of the grants that apply to it
    /// (on --target, or on any target), then the configuration's. Without it: the
    /// configuration's rules only.
    #[arg(long = "as", value_name = "IDENTITY")]
    pub identity: Option<String>,
    /// With --as: the token's subject, for grants by subject.
    #[arg(long, value_name = "SUB", requires = "identity")]
    pub subject: Option<String>,
    /// With --as: a group from the token's groups claim (repeatable).
    #[arg(long = "group", value_name = "GROUP", requires = "identity")]
    pub groups: Vec<String>,
    /// With --as: only grants on this target.
    #[arg(long, value_name = "NAME", requires = "identity")]
    pub target: Option<String>,
    /// The column the lines come from: a name (`email`) or `schema.table.column`. Names give the
    /// detectors context; column rules match it.
    #[arg(long, value_name = "NAME")]
    pub column: Option<String>,
    /// What each line is: text, a JSON document, or a PostgreSQL text array literal.
    #[arg(long = "type", value_name = "TYPE", default_value = "text")]
    pub ty: ValueKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ValueKind {
    Text,
    Json,
    Array,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Print the verdict, the facts and the deciding rule for a statement, without any server.
    /// Exit status: 0 allow, 1 deny, 2 review (errors also exit 2, with a `chaperone:` line).
    Check(PolicyCheckArgs),
    /// List every grant that applies to an identity, with where it is written, its effect, what
    /// it covers, and its expiry and review dates, offline. Expired grants are listed as such.
    Explain(PolicyExplainArgs),
}

/// Who to check for: an identity name, and for OIDC agents what their token would say.
#[derive(Debug, Clone, clap::Args)]
pub struct WhoArgs {
    /// The agent identity (`--as` of `chaperone run`, or an OIDC agent's email or subject).
    #[arg(long = "as", value_name = "IDENTITY")]
    pub identity: String,
    /// The token's subject (`sub`), for grants by subject. Default: IDENTITY, when --group
    /// is given.
    #[arg(long, value_name = "SUB")]
    pub subject: Option<String>,
    /// A group from the token's groups claim, for grants by group (repeatable).
    #[arg(long = "group", value_name = "GROUP")]
    pub groups: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct PolicyExplainArgs {
    #[command(flatten)]
    pub who: WhoArgs,
}

#[derive(Debug, clap::Args)]
pub struct PolicyCheckArgs {
    #[command(flatten)]
    pub who: WhoArgs,
    /// The target (a postgres target of the configuration).
    #[arg(long, value_name = "NAME")]
    pub target: String,
    /// The statement (or several, separated by semicolons, as one query string).
    #[arg(long, value_name = "STATEMENT", allow_hyphen_values = true)]
    pub sql: String,
}

#[derive(Debug, clap::Args)]
pub struct DaemonArgs {
    /// Remove the pinned programs and maps and the agent cgroups, then exit. Refused while a
    /// daemon runs, or while agents run (see --force).
    #[arg(long)]
    pub uninstall: bool,
    /// With --uninstall: kill the agents still running instead of refusing (they would run on
    /// unintercepted).
    #[arg(long, requires = "uninstall")]
    pub force: bool,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The identity the agent runs as. With a token: the token's verified email or subject
    /// (this may only repeat one of them). Without one (root only): NAME, default `agent`.
    #[arg(long = "as", value_name = "NAME")]
    pub as_name: Option<String>,
    /// A file holding the OIDC ID token that proves the agent's identity (else the
    /// CHAPERONE_ID_TOKEN environment variable, which the agent does not inherit).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Log in with the issuer's device flow (a URL and a code to approve) instead of a token
    /// file; the token is then refreshed for as long as the agent runs.
    #[arg(long, conflicts_with = "token_file")]
    pub login: bool,
    /// The Unix user the agent runs as (name or uid). Default: the user who invoked sudo.
    /// Agents must be unprivileged: root could leave its cgroup or detach the programs.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// Run the agent as root anyway. Interception is then advisory: a root agent can leave it.
    #[arg(long, conflicts_with = "user")]
    pub allow_root: bool,
    /// The command and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    pub command: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct SessionsArgs {
    /// Include `start` events and audit events (agents bound, binds refused, grants expired),
    /// not only ended sessions.
    #[arg(long)]
    pub all: bool,
}

/// Run the parsed command; returns the process exit code.
pub fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    let config = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Daemon(args) if args.uninstall => uninstall(&config, args.force, cli.json),
        Command::Daemon(_) => {
            // The daemon trusts its configuration with everything: root's files only.
            if let Some(path) = &config.path {
                Config::ensure_trusted(path)?;
            }
            let mut rt = tokio::runtime::Builder::new_multi_thread();
            if let Some(n) = std::env::var("CHAPERONE_WORKERS")
                .ok()
                .and_then(|v| v.parse().ok())
            {
                rt.worker_threads(n);
            }
            let rt = rt.enable_all().build()?;
            rt.block_on(crate::app::run(config))?;
            Ok(0)
        }
        Command::Run(args) => run::run(&config, &args),
        Command::Status => status(&config, cli.json),
        Command::Sessions(args) => sessions(&config, &args, cli.json),
        Command::Policy(PolicyCommand::Check(args)) => policy::check(&config, &args, cli.json),
        Command::Policy(PolicyCommand::Explain(args)) => policy::explain(&config, &args, cli.json),
        Command::Mask(args) => mask::mask(&config, &args, cli.json),
    }
}

pub(crate) fn print_json(value: &impl Serialize) {
    println!("{}", serde_json::to_string(value).expect("serializable"));
}

fn uninstall(config: &Config, force: bool, json: bool) -> anyhow::Result<i32> {
    // Holding the daemon's lock proves no daemon serves these pins right now.
    let _lock = crate::app::lock_pin_dir(config)?;
    let tree = AgentTree::locate(&config.agent_cgroup)?;
    if tree.is_marked() && tree.is_populated() {
        if !force {
            anyhow::bail!(
                "agents are still running in {}; they would run on unintercepted. Stop them, or pass --force to kill them",
                tree.root().display()
            );
        }
        tree.kill_all()?;
    }
    let removed = redirect::uninstall(&config.pin_dir)?;
    let busy = tree.remove_empty();
    if json {
        print_json(&serde_json::json!({ "removed": removed, "busy_cgroups": busy }));
    } else {
        println!(
            "removed {} pins from {}",
            removed.len(),
            config.pin_dir.display()
        );
        for b in &busy {
            println!("cgroup still has processes, left in place: {}", b.display());
        }
    }
    Ok(0)
}

#[derive(Serialize)]
struct StatusReport {
    redirect: redirect::RedirectStatus,
    /// The running daemon, if its status file names a live process.
    daemon: Option<DaemonStatus>,
    agent_cgroup: Option<PathBuf>,
}

fn status(config: &Config, json: bool) -> anyhow::Result<i32> {
    let daemon = std::fs::read(config.status_file())
        .ok()
        .and_then(|b| serde_json::from_slice::<DaemonStatus>(&b).ok())
        .filter(|d| PathBuf::from(format!("/proc/{}", d.pid)).exists());
    let tree = AgentTree::locate(&config.agent_cgroup)?;
    let report = StatusReport {
        redirect: redirect::status(&config.pin_dir, tree.root()),
        daemon,
        agent_cgroup: Some(tree.root().to_path_buf()),
    };
    if json {
        print_json(&report);
        return Ok(0);
    }
    let r = &report.redirect;
    println!(
        "interception: {}",
        if r.installed {
            "installed (pinned, in effect on the agent tree)"
        } else {
            "NOT installed"
        }
    );
    if let Some(p) = &r.problem {
        println!("problem:      {p}");
    }
    match &report.daemon {
        Some(d) => println!(
            "daemon:       running, pid {}, listening on {:?}",
            d.pid, d.listen
        ),
        None if r.installed => {
            println!("daemon:       not running: agents' connections are refused")
        }
        None => println!("daemon:       not running"),
    }
    if let Some(cg) = &report.agent_cgroup {
        println!("agent tree:   {}", cg.display());
    }
    let n = |v: Option<usize>| v.map_or("-".to_string(), |v| v.to_string());
    println!(
        "tracked:      {} by cookie, {} awaiting accept",
        n(r.orig_by_cookie_entries),
        n(r.orig_by_addr_entries)
    );
    Ok(0)
}

fn sessions(config: &Config, args: &SessionsArgs, json: bool) -> anyhow::Result<i32> {
    let path = config.sessions_log();
    let (events, bad) = match read_log(&path) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Vec::new(), 0),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let shown = events
        .iter()
        .filter(|e| args.all || matches!(e, SessionEvent::End { .. }));
    if json {
        for e in shown {
            print_json(e);
        }
    } else {
        println!(
            "{:<16}  {:<6}  {:<12}  {:<24}  {:<10}  {:>8}  {:>10}  {:>10}",
            "SESSION", "EVENT", "AGENT", "DESTINATION", "TARGET", "PID", "UP", "DOWN"
        );
        for e in shown {
            let (s, kind, up, down) = match e {
                SessionEvent::Start { session } => (session, "start", String::new(), String::new()),
                SessionEvent::End {
                    session,
                    bytes_up,
                    bytes_down,
                    ..
                } => (session, "end", bytes_up.to_string(), bytes_down.to_string()),
                SessionEvent::Audit { at_ms, audit } => {
                    println!(
                        "{:<16}  audit   {}",
                        at_ms,
                        serde_json::to_string(audit).expect("serializable")
                    );
                    continue;
                }
            };
            let verdict = match s.verdict {
                crate::record::RecordedVerdict::Allow => "",
                crate::record::RecordedVerdict::Deny => " DENIED",
            };
            println!(
                "{:<16}  {:<6}  {:<12}  {:<24}  {:<10}  {:>8}  {:>10}  {:>10}{verdict}",
                s.id.to_string(),
                kind,
                s.agent
                    .as_ref()
                    .and_then(|a| a.name.as_deref())
                    .unwrap_or("-"),
                s.original_dst.addr.to_string(),
                s.target.as_deref().unwrap_or("-"),
                s.original_dst.pid,
                up,
                down,
            );
        }
    }
    if bad > 0 {
        eprintln!("chaperone: {bad} unreadable lines in {}", path.display());
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_takes_the_command_verbatim_after_double_dash() {
        let cli = Cli::try_parse_from([
            "chaperone",
            "run",
            "--as",
            "bob",
            "--",
            "curl",
            "-s",
            "--json",
            "x",
        ])
        .unwrap();
        match cli.command {
            Command::Run(a) => {
                assert_eq!(a.as_name.as_deref(), Some("bob"));
                assert_eq!(a.command, ["curl", "-s", "--json", "x"]);
            }
            c => panic!("{c:?}"),
        }
        assert!(!cli.json, "--json after -- belongs to the agent's command");
    }

    #[test]
    fn run_needs_a_command() {
        assert!(Cli::try_parse_from(["chaperone", "run"]).is_err());
    }

    #[test]
    fn policy_check_takes_sql_with_leading_dashes() {
        let cli = Cli::try_parse_from([
            "chaperone",
            "policy",
            "check",
            "--as",
            "agent",
            "--target",
            "app",
            "--sql",
            "-- c\nSELECT 1",
        ])
        .unwrap();
        match cli.command {
            Command::Policy(PolicyCommand::Check(a)) => assert_eq!(a.sql, "-- c\nSELECT 1"),
            c => panic!("{c:?}"),
        }
    }

    #[test]
    fn mask_takes_identity_column_type_and_global_json() {
        let cli = Cli::try_parse_from([
            "chaperone",
            "mask",
            "--as",
            "agent",
            "--column",
            "hr.people.email",
            "--json",
            "--type",
            "json",
        ])
        .unwrap();
        assert!(cli.json);
        match cli.command {
            Command::Mask(a) => {
                assert_eq!(a.identity.as_deref(), Some("agent"));
                assert_eq!(a.column.as_deref(), Some("hr.people.email"));
                assert_eq!(a.ty, ValueKind::Json);
            }
            c => panic!("{c:?}"),
        }
        match Cli::try_parse_from(["chaperone", "mask"]).unwrap().command {
            Command::Mask(a) => {
                assert_eq!((a.identity, a.column, a.ty), (None, None, ValueKind::Text))
            }
            c => panic!("{c:?}"),
        }
        assert!(Cli::try_parse_from(["chaperone", "mask", "--type", "xml"]).is_err());
        assert!(Cli::try_parse_from(["chaperone", "mask", "--column"]).is_err());
    }

    #[test]
    fn global_flags_anywhere() {
        let cli =
            Cli::try_parse_from(["chaperone", "status", "--json", "--config", "x.yaml"]).unwrap();
        assert!(cli.json);
        assert_eq!(cli.config.as_deref(), Some(std::path::Path::new("x.yaml")));
    }
}
