//! Benchmarks: the cost of interception, measured against baselines in the same run on the same
//! machine. Figures, not pass/fail: benchmarks never gate tests.
//!
//! `relay`: the same client runs directly and as an agent (`chaperone run`) against the same
//! servers, with a release-built daemon:
//! - new short connection: connect, 1-byte round trip, close; 2,000 sequential; p50 and p99
//! - bulk: one connection streams 2 GiB to a sink; GB/s
//!
//! `pg`: `pgbench -S` (10 clients, simple and prepared) against one PostgreSQL 15, directly,
//! through PgBouncer (transaction mode; session mode for prepared statements), through
//! Chaperone as a plain TCP relay (no decoding: the floor for any proxy on this hop) and through
//! Chaperone's PostgreSQL proxy (read-only policy, every landed feature on: classification,
//! policy, masking, session records), once on session threads and once on the work-stealing
//! runtime; TPS, mean latency, ratios, and the proxy's own CPU time per transaction.

use anyhow::{Context as _, Result, bail};
use chaperone_tests::{DaemonOptions, Postgres, TestDaemon};
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::Command,
    thread,
    time::Instant,
};

const SHORT_CONNS: usize = 2_000;
const BULK_BYTES: u64 = 2 << 30;
const BUF: usize = 64 * 1024;

/// Servers: a 1-byte echo for short connections and a sink that answers with one byte at EOF.
pub fn start_servers() -> Result<(SocketAddr, SocketAddr)> {
    let echo = TcpListener::bind("127.0.0.1:0")?;
    let sink = TcpListener::bind("127.0.0.1:0")?;
    let (ea, sa) = (echo.local_addr()?, sink.local_addr()?);
    thread::spawn(move || {
        for c in echo.incoming().flatten() {
            let mut c = c;
            let _ = c.set_nodelay(true);
            let mut b = [0u8; 1];
            if c.read_exact(&mut b).is_ok() {
                let _ = c.write_all(&b);
            }
        }
    });
    thread::spawn(move || {
        for c in sink.incoming().flatten() {
            thread::spawn(move || {
                let mut c = c;
                let mut buf = vec![0u8; BUF];
                while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
                let _ = c.write_all(b"k");
            });
        }
    });
    Ok((ea, sa))
}

/// The client half; prints one line `p50_us p99_us gbps`.
pub fn client(echo: SocketAddr, sink: SocketAddr) -> Result<()> {
    let mut lat = Vec::with_capacity(SHORT_CONNS);
    for _ in 0..SHORT_CONNS {
        let t = Instant::now();
        let mut c = TcpStream::connect(echo)?;
        c.set_nodelay(true)?;
        c.write_all(b"x")?;
        let mut b = [0u8; 1];
        c.read_exact(&mut b)?;
        drop(c);
        lat.push(t.elapsed());
    }
    lat.sort();
    let pct =
        |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64() * 1e6;
    let mut c = TcpStream::connect(sink)?;
    let buf = vec![7u8; BUF];
    let t = Instant::now();
    let mut sent = 0u64;
    while sent < BULK_BYTES {
        c.write_all(&buf)?;
        sent += BUF as u64;
    }
    c.shutdown(std::net::Shutdown::Write)?;
    let mut k = [0u8; 1];
    c.read_exact(&mut k)?;
    let gbps = sent as f64 / t.elapsed().as_secs_f64() / 1e9;
    println!("{:.1} {:.1} {:.2}", pct(0.50), pct(0.99), gbps);
    Ok(())
}

fn parse(out: &[u8]) -> Result<[f64; 3]> {
    let text = String::from_utf8_lossy(out);
    let v: Vec<f64> = text
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("client printed `{text}`"))?;
    v.try_into()
        .map_err(|_| anyhow::anyhow!("client printed `{text}`"))
}

pub fn relay(chaperone: &Path, client_bin: &Path) -> Result<()> {
    let (echo, sink) = start_servers()?;
    let dir = std::env::temp_dir().join(format!("chaperone-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("bench.yaml");
    std::fs::write(
        &config,
        format!(
            "listen_port: 0\nagent_cgroup: chaperone-bench\npin_dir: /sys/fs/bpf/chaperone-bench\nstate_dir: {}\nunlisted: deny\ntargets:\n  - {{name: echo, protocol: tcp, address: 127.0.0.1, port: {}}}\n  - {{name: sink, protocol: tcp, address: 127.0.0.1, port: {}}}\n",
            dir.display(),
            echo.port(),
            sink.port()
        ),
    )?;
    let me = client_bin;
    let client_args = [
        "bench-client".to_string(),
        echo.to_string(),
        sink.to_string(),
    ];

    let direct = Command::new(me).args(&client_args).output()?;
    if !direct.status.success() {
        bail!(
            "direct client failed: {}",
            String::from_utf8_lossy(&direct.stderr)
        );
    }
    let direct = parse(&direct.stdout)?;

    let log = std::fs::File::create(dir.join("daemon.log"))?;
    let mut daemon = crate::Guard(
        Command::new(chaperone)
            .args(["--config", config.to_str().unwrap(), "daemon"])
            .env("CHAPERONE_LOG", "warn")
            .stderr(log)
            .spawn()?,
    );
    crate::wait_ready(chaperone, Some(&config), &mut daemon)?;
    let via = Command::new(chaperone)
        .args([
            "--config",
            config.to_str().unwrap(),
            "run",
            "--as",
            "bench",
            "--user",
            "nobody",
            "--",
        ])
        .arg(me)
        .args(&client_args)
        .output()?;
    drop(daemon);
    let _ = Command::new(chaperone)
        .args([
            "--config",
            config.to_str().unwrap(),
            "daemon",
            "--uninstall",
        ])
        .output();
    if !via.status.success() {
        bail!(
            "client as agent failed: {}",
            String::from_utf8_lossy(&via.stderr)
        );
    }
    let via = parse(&via.stdout)?;

    println!(
        "\nrelay benchmark ({SHORT_CONNS} short connections, {} GiB bulk; same run, same machine)",
        BULK_BYTES >> 30
    );
    println!(
        "{:<34} {:>10} {:>12} {:>12}",
        "", "direct", "chaperone", "difference"
    );
    println!(
        "{:<34} {:>10.1} {:>12.1} {:>+11.1}",
        "connect+1B round trip p50 (µs)",
        direct[0],
        via[0],
        via[0] - direct[0]
    );
    println!(
        "{:<34} {:>10.1} {:>12.1} {:>+11.1}",
        "connect+1B round trip p99 (µs)",
        direct[1],
        via[1],
        via[1] - direct[1]
    );
    println!(
        "{:<34} {:>10.2} {:>12.2} {:>10.0} %",
        "bulk throughput (GB/s)",
        direct[2],
        via[2],
        via[2] / direct[2] * 100.0
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// One pgbench run's figures.
#[derive(Clone, Copy)]
struct PgFigures {
    tps: f64,
    latency_ms: f64,
    /// CPU time the proxy process used per transaction, µs (None: no proxy).
    proxy_cpu_us: Option<f64>,
}

/// User + system CPU seconds a process has used so far (all its threads).
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')').context("/proc/PID/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

/// Run pgbench; with `proxy`, also measure that process's CPU time over the run.
fn pgbench(cmd: &mut Command, proxy: Option<u32>) -> Result<PgFigures> {
    let before = proxy.map(cpu_seconds).transpose()?;
    let out = cmd.output().context("running pgbench")?;
    let after = proxy.map(cpu_seconds).transpose()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "pgbench failed: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let find = |prefix: &str| -> Result<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no `{prefix}` in pgbench output:\n{text}"))
    };
    let tps = find("tps = ")?;
    let transactions = find("number of transactions actually processed: ")?;
    Ok(PgFigures {
        tps,
        latency_ms: find("latency average = ")?,
        proxy_cpu_us: before.zip(after).map(|(b, a)| (a - b) / transactions * 1e6),
    })
}

const PG_CLIENTS: &str = "10";
const PG_SECONDS: &str = "15";

fn pgbench_args(mode: &str, port: u16, user: &str) -> Vec<String> {
    [
        "-n",
        "-S",
        "-M",
        mode,
        "-c",
        PG_CLIENTS,
        "-j",
        "2",
        "-T",
        PG_SECONDS,
        "-h",
        "127.0.0.1",
        "-p",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([port.to_string(), "-U".into(), user.into(), "app".into()])
    .collect()
}

/// PgBouncer in `pool_mode` in front of `pg`, as the `postgres` OS user (it refuses root), its
/// files in `dir`.
fn start_pgbouncer(pg: &Postgres, dir: &Path, pool_mode: &str) -> Result<(crate::Guard, u16)> {
    std::fs::create_dir_all(dir)?;
    let port = chaperone_tests::free_port();
    std::fs::write(
        dir.join("userlist.txt"),
        format!("\"agent_ro\" \"{}\"\n", pg.ro_password),
    )?;
    std::fs::write(
        dir.join("pgbouncer.ini"),
        format!(
            "[databases]\napp = host=127.0.0.1 port={} dbname=app\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
             unix_socket_dir =\nauth_type = scram-sha-256\nauth_file = {}\npool_mode = {pool_mode}\n\
             max_client_conn = 100\ndefault_pool_size = 10\nlogfile = {}\npidfile = {}\n",
            pg.port,
            dir.join("userlist.txt").display(),
            dir.join("pgbouncer.log").display(),
            dir.join("pgbouncer.pid").display()
        ),
    )?;
    Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(dir)
        .status()?;
    // setpriv execs in place (runuser would fork and outlive the kill of its pid).
    let child = Command::new("setpriv")
        .args([
            "--reuid=postgres",
            "--regid=postgres",
            "--clear-groups",
            "pgbouncer",
            "-q",
        ])
        .arg(dir.join("pgbouncer.ini"))
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let guard = crate::Guard(child);
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!(
                "pgbouncer did not start; see {}",
                dir.join("pgbouncer.log").display()
            );
        }
        thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok((guard, port))
}

pub fn pg(chaperone: &Path) -> Result<()> {
    // The harness starts daemons from $CHAPERONE_BIN: the release build.
    // SAFETY: set before any thread of ours starts.
    unsafe {
        std::env::set_var("CHAPERONE_BIN", chaperone);
        // Production logging: per-statement debug lines are off.
        std::env::set_var("CHAPERONE_TEST_LOG", "info");
    }
    let pg = Postgres::start();
    let dir = std::env::temp_dir().join(format!("chaperone-bench-pg-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    // Transaction mode, as the issue asks; 1.18 (Debian 12) cannot run prepared statements in
    // it, so session mode stands in for those.
    let (bouncer, bouncer_port) = start_pgbouncer(&pg, &dir.join("transaction"), "transaction")?;
    let (session_bouncer, session_port) = start_pgbouncer(&pg, &dir.join("session"), "session")?;
    let daemon = TestDaemon::start(pg.daemon_options_with_functions(&[]));
    // The same proxy with its sessions on the work-stealing runtime, for comparison.
    let mut stealing = pg.daemon_options_with_functions(&[]);
    stealing
        .env
        .push(("CHAPERONE_SESSION_THREADS".into(), "0".into()));
    let stealing = TestDaemon::start(stealing);
    // The same server as a plain `tcp` target: bytes relayed, nothing decoded, the agent logs
    // in itself. No proxy on this hop can cost less.
    let relay = TestDaemon::start(DaemonOptions {
        targets: vec![("pg".into(), "127.0.0.1".into(), pg.port)],
        ..DaemonOptions::default()
    });
    let direct_client = |mode: &str, port: u16| {
        let mut c = Command::new("pgbench");
        c.args(pgbench_args(mode, port, "agent_ro"))
            .env("PGPASSWORD", &pg.ro_password)
            .env("PGSSLMODE", "disable");
        c
    };
    let agent = |d: &TestDaemon, mode: &str, user: &str| {
        let mut c = d.cmd();
        c.args(["run", "--as", "agent", "--user", "nobody", "--", "pgbench"])
            .args(pgbench_args(mode, pg.port, user))
            .env("PGPASSWORD", &pg.ro_password)
            .env("PGSSLMODE", "disable");
        c
    };

    let mut rows: Vec<(&str, &str, PgFigures)> = Vec::new();
    for mode in ["simple", "prepared"] {
        rows.push((
            mode,
            "direct",
            pgbench(&mut direct_client(mode, pg.port), None)?,
        ));
        let (path, bouncer, port) = match mode {
            "simple" => ("PgBouncer (transaction mode)", &bouncer, bouncer_port),
            _ => ("PgBouncer (session mode)", &session_bouncer, session_port),
        };
        let f = pgbench(&mut direct_client(mode, port), Some(bouncer.0.id()))?;
        rows.push((mode, path, f));
        let f = pgbench(&mut agent(&relay, mode, "agent_ro"), Some(relay.pid()))?;
        rows.push((mode, "Chaperone, TCP relay (no decoding)", f));
        // The agent names no password: the daemon injects the credential.
        let f = pgbench(&mut agent(&daemon, mode, "agent"), Some(daemon.pid()))?;
        rows.push((mode, "Chaperone, PostgreSQL (read-only, masking)", f));
        let f = pgbench(&mut agent(&stealing, mode, "agent"), Some(stealing.pid()))?;
        rows.push((mode, "  the same, sessions on a work-stealing pool", f));
    }
    drop(bouncer);
    drop(session_bouncer);
    drop(daemon);
    drop(stealing);
    drop(relay);
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "\npgbench -S, {PG_CLIENTS} clients, {PG_SECONDS} s each, one PostgreSQL 15, same run"
    );
    println!(
        "{:<9} {:<44} {:>8} {:>7} {:>10} {:>10} {:>10}",
        "mode", "path", "TPS", "/direct", "latency", "+latency", "proxy CPU"
    );
    let mut direct = None;
    for (mode, path, f) in rows {
        if path == "direct" {
            direct = Some(f);
        }
        let d = direct.context("each mode measures direct first")?;
        println!(
            "{:<9} {:<44} {:>8.0} {:>6.0}% {:>7.3} ms {:>7.1} µs {:>10}",
            mode,
            path,
            f.tps,
            f.tps / d.tps * 100.0,
            f.latency_ms,
            (f.latency_ms - d.latency_ms) * 1000.0,
            f.proxy_cpu_us
                .map_or(String::new(), |us| format!("{us:.1} µs/tx")),
        );
    }
    Ok(())
}
