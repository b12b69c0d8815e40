//! `cargo xtask`: set-up, demo and test orchestration. The README's two commands live here.
//!
//! - `cargo xtask demo`: set up, build, and show the main job on the embedded default config: the
//!   daemon, a local web service as its target, an unmodified `curl` run as an agent (allowed),
//!   one to an unlisted destination (refused), the recorded sessions, and fail-closed.
//! - `cargo xtask test`: set up, build, and run every test (unit and end-to-end).
//! - `cargo xtask bench relay`: interception cost against a direct baseline, same run.

mod bench;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain pieces and test clients (scripts/setup.sh; idempotent).
    Setup,
    /// Set up, build, and run the daemon on the embedded default with a demo agent.
    Demo {
        /// Keep the daemon running (Ctrl-C to stop) instead of uninstalling at the end.
        #[arg(long)]
        keep: bool,
    },
    /// Benchmarks, each printed beside a baseline measured in the same run.
    Bench {
        #[arg(value_enum, default_value = "relay")]
        what: BenchKind,
    },
    /// (internal) The benchmark client, run directly and as an agent.
    #[command(hide = true)]
    BenchClient {
        echo: std::net::SocketAddr,
        sink: std::net::SocketAddr,
    },
    /// Set up, build, and run every test.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BenchKind {
    /// New-connection latency and bulk throughput, direct vs through the proxy.
    Relay,
    /// pgbench -S direct, through PgBouncer and through Chaperone.
    Pg,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Setup => setup(),
        Task::Bench { what } => {
            require_root()?;
            setup()?;
            // Release builds of both the daemon and the benchmark client.
            run(cargo().args(["build", "--release", "-p", "gateway-user", "-p", "xtask"]))?;
            let release = target_dir().join("release");
            match what {
                BenchKind::Relay => {
                    bench::relay(&release.join("chaperone"), &release.join("xtask"))
                }
                BenchKind::Pg => bench::pg(&release.join("chaperone")),
            }
        }
        Task::BenchClient { echo, sink } => bench::client(echo, sink),
        Task::Demo { keep } => demo(keep),
        Task::Test { args } => test(&args),
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Every live process below `root` (from each process's parent in /proc).
fn descendants(root: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
            let ppid = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some((pid, ppid))
        })
        .collect();
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let p = found[i];
        found.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    found.remove(0);
    found
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn setup() -> Result<()> {
    run(Command::new("bash").arg(root().join("scripts/setup.sh")))
}

fn build() -> Result<PathBuf> {
    run(cargo().args(["build", "-p", "gateway-user"]))?;
    Ok(target_dir().join("debug/chaperone"))
}

/// Where cargo puts what it builds: `$CARGO_TARGET_DIR` (relative to the workspace, as cargo
/// reads it) or the workspace's `target`.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), |d| root().join(d))
}

fn require_root() -> Result<()> {
    if !is_root() {
        bail!("this needs root: it loads eBPF programs and creates cgroups");
    }
    Ok(())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

fn test(args: &[String]) -> Result<()> {
    setup()?;
    let bin = build()?;
    run_within(
        cargo()
            // gateway-ebpf only builds for the bpf target (gateway-user's build script does that).
            .args(["test", "--workspace", "--exclude", "gateway-ebpf"])
            .args(args)
            .env("CHAPERONE_BIN", &bin),
        TEST_LIMIT,
    )
}

/// The whole test step normally takes a few minutes; past this something hangs, and CI (90
/// minutes) should see a failure that says where rather than its own time-out.
const TEST_LIMIT: Duration = Duration::from_secs(40 * 60);

/// [`run`], but past `limit` print the process tree (what each process waits in) and the tail
/// of every test daemon's log, then kill the command with everything it started, and fail.
fn run_within(cmd: &mut Command, limit: Duration) -> Result<()> {
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("{cmd:?} failed with {status}");
            }
            return Ok(());
        }
        thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "\n{cmd:?} still running after {} s: processes now",
        limit.as_secs()
    );
    let _ = Command::new("ps")
        .args(["-eo", "pid,ppid,user,stat,etime,wchan:32,args", "--forest"])
        .status();
    for entry in std::fs::read_dir(std::env::temp_dir())?.flatten() {
        let log = entry.path().join("daemon.log");
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with("chaperone-e2e-")
            && let Ok(text) = std::fs::read_to_string(&log)
        {
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("-- last lines of {}", log.display());
            for l in &lines[lines.len().saturating_sub(20)..] {
                eprintln!("{l}");
            }
        }
    }
    // Taken in one pass, then killed: whatever they would start next has no parent to do it.
    for pid in descendants(child.id()) {
        // SAFETY: signalling processes this command started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    let _ = child.kill();
    let _ = child.wait();
    bail!(
        "{cmd:?} did not finish within {} s (killed)",
        limit.as_secs()
    )
}

fn step(title: &str) {
    println!("\n\x1b[1m== {title}\x1b[0m");
}

/// Kills a child on drop, so an early error leaves nothing running.
struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn demo(keep: bool) -> Result<()> {
    require_root()?;
    step("set-up (scripts/setup.sh)");
    setup()?;
    step("build");
    let bin = build()?;
    let chaperone = || Command::new(&bin);

    step("a local web service on 127.0.0.1:18080 (the embedded default's target `demo-web`)");
    let site = std::env::temp_dir().join("chaperone-demo-site");
    std::fs::create_dir_all(&site)?;
    std::fs::write(site.join("index.html"), "hello from the demo service\n")?;
    let _web = Guard(
        Command::new("python3")
            .args(["-m", "http.server", "18080", "--bind", "127.0.0.1"])
            .current_dir(&site)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting python3 -m http.server")?,
    );

    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect("127.0.0.1:18080").is_err() {
        if Instant::now() > deadline {
            bail!("the demo web service did not come up on 127.0.0.1:18080 (port in use?)");
        }
        thread::sleep(Duration::from_millis(50));
    }

    step("chaperone daemon (embedded default config; its log follows)");
    let mut daemon = Guard(chaperone().arg("daemon").spawn()?);
    wait_ready(&bin, None, &mut daemon)?;

    // An unmodified curl as the agent; its exit status is part of the show, not an error.
    let agent_curl = |args: &[&str]| -> Result<()> {
        let _ = chaperone()
            .args([
                "run",
                "--as",
                "demo-agent",
                "--user",
                "nobody",
                "--",
                "curl",
                "-sS",
            ])
            .args(args)
            .status()?;
        thread::sleep(Duration::from_millis(200));
        Ok(())
    };

    step("agent: chaperone run --as demo-agent -- curl http://127.0.0.1:18080/  (target: allowed)");
    agent_curl(&[
        "-w",
        "curl saw peer %{remote_ip}:%{remote_port}\n",
        "http://127.0.0.1:18080/",
    ])?;

    step("agent: curl http://127.0.0.1:18081/  (no target names it; unlisted: deny)");
    agent_curl(&["http://127.0.0.1:18081/"])?;

    step("chaperone sessions");
    run(chaperone().arg("sessions"))?;

    if keep {
        step(
            "daemon keeps running: try `chaperone run -- curl http://127.0.0.1:18080/`; Ctrl-C stops",
        );
        daemon.0.wait()?;
        return Ok(());
    }

    step("fail closed: daemon stopped, the agent's connection is refused");
    sigterm(daemon.0.id());
    daemon.0.wait()?;
    agent_curl(&["http://127.0.0.1:18080/"])?;
    run(chaperone().arg("status"))?;

    step("chaperone daemon --uninstall");
    run(chaperone().args(["daemon", "--uninstall"]))?;
    Ok(())
}

/// A clean stop (SIGTERM), as an init system would send it.
fn sigterm(pid: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
}

fn wait_ready(bin: &Path, config: Option<&Path>, daemon: &mut Guard) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let mut cmd = Command::new(bin);
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        let out = cmd.args(["status", "--json"]).output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        if text.contains(&format!("\"pid\":{}", daemon.0.id())) {
            return Ok(());
        }
        if let Some(status) = daemon.0.try_wait()? {
            bail!("the daemon exited with {status}");
        }
        thread::sleep(Duration::from_millis(100));
    }
    bail!("the daemon did not become ready in 30 s")
}
