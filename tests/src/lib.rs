//! End-to-end test harness: the real `chaperone` binary as daemon, real servers on loopback,
//! unmodified clients (`python3`, `curl`, `sh`) started with `chaperone run`.
//!
//! Every [`TestDaemon`] gets its own agent cgroup, bpffs pin directory, state directory and proxy
//! port, so tests run in parallel without seeing each other's agents. Dropping it stops the
//! daemon and uninstalls its pins and cgroups.
//!
//! Privileged: eBPF and cgroups need root. Without it each test prints `skipping: …` and passes;
//! CI runs as root, so there they always run.

use serde_json::Value;
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

/// The daemon binary: `$CHAPERONE_BIN`, else the debug build beside this test binary
/// (`<target>/debug/deps/<test>` → `<target>/debug/chaperone`, wherever the target directory
/// is; `cargo xtask test` builds it first).
pub fn chaperone_bin() -> PathBuf {
    let bin = std::env::var_os("CHAPERONE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().expect("the test binary's path");
            exe.parent()
                .and_then(Path::parent)
                .expect("test binaries live in <target>/<profile>/deps")
                .join("chaperone")
        });
    assert!(
        bin.exists(),
        "{} not found: build it first (`cargo build -p gateway-user`, or run `cargo xtask test`)",
        bin.display()
    );
    bin
}

/// How long any one program a test runs may take before it is killed and the test fails: a
/// hang must fail its test with what the program printed, never stall the whole run.
pub const PROGRAM_LIMIT: Duration = Duration::from_secs(120);

/// [`Command::output`] under [`PROGRAM_LIMIT`].
pub trait OutputBounded {
    /// Run to completion and capture stdout and stderr (stdin is `/dev/null`), as
    /// [`Command::output`] does, but within [`PROGRAM_LIMIT`]: past it the program is killed and
    /// the error (kind `TimedOut`) carries what it printed until then.
    fn output_bounded(&mut self) -> std::io::Result<Output>;
}

impl OutputBounded for Command {
    fn output_bounded(&mut self) -> std::io::Result<Output> {
        let mut child = self
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        // Readers keep what they have read where the waiter can still see it if a grandchild holds
        // a pipe open past the program's own end (a daemonized child, an orphaned agent).
        let collect = |mut pipe: Box<dyn Read + Send>| {
            let buf = Arc::new(std::sync::Mutex::new(Vec::new()));
            let b = buf.clone();
            let done = thread::spawn(move || {
                let mut chunk = [0u8; 8192];
                while let Ok(n) = pipe.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    b.lock().unwrap().extend_from_slice(&chunk[..n]);
                }
            });
            (buf, done)
        };
        let (out, out_done) = collect(Box::new(child.stdout.take().expect("piped")));
        let (err, err_done) = collect(Box::new(child.stderr.take().expect("piped")));
        let deadline = Instant::now() + PROGRAM_LIMIT;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break Some(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            thread::sleep(Duration::from_millis(20));
        };
        // The pipes close when the last holder exits; allow a grandchild a moment, no more.
        let grace = Instant::now() + Duration::from_secs(5);
        while !(out_done.is_finished() && err_done.is_finished()) && Instant::now() < grace {
            thread::sleep(Duration::from_millis(20));
        }
        let take = |b: &Arc<std::sync::Mutex<Vec<u8>>>| std::mem::take(&mut *b.lock().unwrap());
        let (stdout, stderr) = (take(&out), take(&err));
        match status {
            Some(status) => Ok(Output {
                status,
                stdout,
                stderr,
            }),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "{self:?} still running after {} s, killed\nstdout:\n{}\nstderr:\n{}",
                    PROGRAM_LIMIT.as_secs(),
                    String::from_utf8_lossy(&stdout),
                    String::from_utf8_lossy(&stderr)
                ),
            )),
        }
    }
}

/// `args` under coreutils `timeout` (60 s, then SIGKILL 5 s later). An agent has a session of
/// its own, so a bound on `chaperone run` (see [`OutputBounded`]) does not reach it; this does.
pub fn timed<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut full = vec!["timeout", "-k", "5", "60"];
    full.extend_from_slice(args);
    full
}

/// True (and a `skipping:` line printed) when the test cannot run here.
pub fn skip_unless_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping {test}: needs root (loads eBPF programs, creates cgroups)");
        return true;
    }
    false
}

fn unique() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A free TCP port on 127.0.0.1 and ::1 (probed, then released).
pub fn free_port() -> u16 {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        if TcpListener::bind(("::1", port)).is_ok() {
            return port;
        }
    }
}

/// What a test daemon is configured with, beyond the per-test paths.
pub struct DaemonOptions {
    pub unlisted: &'static str,
    /// `(name, address, port)` tcp targets.
    pub targets: Vec<(String, String, u16)>,
    /// More targets, as YAML flow mappings (e.g. postgres targets with a credential).
    pub target_yaml: Vec<String>,
    /// Top-level YAML appended to the configuration (grants, secrets_file, …).
    pub extra_yaml: String,
    pub dns_resolvers: Vec<SocketAddr>,
    /// Environment variables for the daemon process (tuning knobs a benchmark compares).
    pub env: Vec<(String, String)>,
}

impl Default for DaemonOptions {
    fn default() -> Self {
        Self {
            unlisted: "deny",
            targets: Vec::new(),
            target_yaml: Vec::new(),
            extra_yaml: String::new(),
            dns_resolvers: Vec::new(),
            env: Vec::new(),
        }
    }
}

/// A `chaperone daemon` with its own cgroup tree, pins, state and port.
pub struct TestDaemon {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub port: u16,
    pub pin_dir: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl TestDaemon {
    pub fn start(opts: DaemonOptions) -> Self {
        let id = unique();
        let dir = std::env::temp_dir().join(format!("chaperone-e2e-{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/chaperone-e2e-{id}"));
        let mut yaml = format!(
            "listen_port: {port}\nagent_cgroup: chaperone-e2e-{id}\npin_dir: {}\nstate_dir: {}\nunlisted: {}\ndns:\n  resolvers: [{}]\ntargets:\n",
            pin_dir.display(),
            dir.join("state").display(),
            opts.unlisted,
            opts.dns_resolvers
                .iter()
                .map(|r| format!("\"{r}\""))
                .collect::<Vec<_>>()
                .join(", "),
        );
        for (name, addr, port) in &opts.targets {
            yaml.push_str(&format!(
                "  - {{name: {name}, protocol: tcp, address: \"{addr}\", port: {port}}}\n"
            ));
        }
        for t in &opts.target_yaml {
            yaml.push_str(&format!("  - {t}\n"));
        }
        if opts.targets.is_empty() && opts.target_yaml.is_empty() {
            yaml.push_str("  []\n");
        }
        yaml.push_str(&opts.extra_yaml);
        let config = dir.join("chaperone.yaml");
        std::fs::write(&config, yaml).unwrap();
        let mut d = Self {
            dir,
            config,
            port,
            pin_dir,
            env: opts.env,
            child: None,
        };
        d.spawn();
        d
    }

    /// `chaperone --config <this daemon's config>`, for any subcommand.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(chaperone_bin());
        c.arg("--config").arg(&self.config);
        c
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Start the daemon and wait until its status file names it.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .unwrap();
        let child = self
            .cmd()
            .arg("daemon")
            .env(
                "CHAPERONE_LOG",
                std::env::var("CHAPERONE_TEST_LOG")
                    .unwrap_or_else(|_| "info,chaperone=debug".into()),
            )
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawning chaperone daemon");
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(Value::Number(p)) = self
                .status()
                .get("daemon")
                .and_then(|d| d.get("pid"))
                .cloned()
                && p.as_u64() == Some(u64::from(pid))
            {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "daemon exited with {status} during start-up; log:\n{}",
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        panic!("daemon not ready after 30 s; log:\n{}", self.log());
    }

    /// The daemon's control socket, as its status file names it.
    pub fn control_socket(&self) -> PathBuf {
        let status: Value = serde_json::from_str(
            &std::fs::read_to_string(self.dir.join("state/daemon.json")).unwrap(),
        )
        .unwrap();
        PathBuf::from(status["control_socket"].as_str().expect("control_socket"))
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    /// Send `sig` to the daemon.
    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid() as i32, sig) };
    }

    /// Audit events of the session log (agents bound, binds refused, reloads, expiries), read
    /// from the file: the CLI would need the configuration, which a test may have broken.
    pub fn audits(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.join("state/sessions.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["event"] == "audit")
            .collect()
    }

    /// Wait (up to 20 s) until `n` audit events of kind `audit` are recorded; returns them.
    pub fn wait_for_audits(&self, audit: &str, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let found: Vec<Value> = self
                .audits()
                .into_iter()
                .filter(|a| a["audit"] == audit)
                .collect();
            if found.len() >= n || Instant::now() > deadline {
                return found;
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL: what a crash looks like. The pins stay.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let status = c.wait().unwrap();
            assert!(
                status.success(),
                "daemon exited with {status} on SIGTERM; log:\n{}",
                self.log()
            );
        }
    }

    /// [`TestDaemon::run_agent`] under a time limit of 60 s: a hang fails the test, not the run.
    pub fn run_agent_timed(&self, name: &str, args: &[&str]) -> Output {
        self.run_agent(name, &timed(args))
    }

    /// `chaperone run --as NAME --user nobody -- ARGS…`, capturing output: agents run
    /// unprivileged, as they should in production.
    pub fn run_agent(&self, name: &str, args: &[&str]) -> Output {
        self.cmd()
            .args(["run", "--as", name, "--user", "nobody", "--"])
            .args(args)
            .output_bounded()
            .expect("spawning chaperone run")
    }

    /// Start `args` as nobody directly inside a fresh cgroup of the agent tree (no binding),
    /// stdin, stdout and stderr piped: as root can, without `chaperone run` or a daemon.
    pub fn spawn_in_tree(&self, args: &[&str]) -> Child {
        self.spawn_in_cgroup(&format!("manual-{}", unique()), args)
    }

    /// [`TestDaemon::spawn_in_tree`] in the cgroup `name` below the tree root (created if
    /// missing), as a container runtime or a systemd slice would place a service.
    pub fn spawn_in_cgroup(&self, name: &str, args: &[&str]) -> Child {
        let cg = self.tree().join(name);
        std::fs::create_dir_all(&cg).unwrap();
        Command::new("sh")
            .arg("-c")
            .arg(r#"echo $$ > "$0/cgroup.procs" && exec setpriv --reuid=nobody --regid=nogroup --clear-groups "$@""#)
            .arg(&cg)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning an agent in the tree")
    }

    /// The agent tree's root cgroup directory.
    pub fn tree(&self) -> PathBuf {
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
        let mount = mounts
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.len() > 2 && f[2] == "cgroup2")
            .map(|f| PathBuf::from(f[1]))
            .expect("a cgroup2 mount");
        let config = std::fs::read_to_string(&self.config).unwrap();
        let rel = config
            .lines()
            .find_map(|l| l.strip_prefix("agent_cgroup: "))
            .expect("agent_cgroup in the test config");
        mount.join(rel.trim())
    }

    /// `chaperone status --json`.
    pub fn status(&self) -> Value {
        let out = self
            .cmd()
            .args(["status", "--json"])
            .output_bounded()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    /// Every `end` event in the session log.
    pub fn sessions(&self) -> Vec<Value> {
        let out = self
            .cmd()
            .args(["sessions", "--json"])
            .output_bounded()
            .unwrap();
        assert!(
            out.status.success(),
            "chaperone sessions: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("sessions --json prints JSON lines"))
            .collect()
    }

    /// Wait until at least `n` sessions have ended (the proxy records after the agent sees EOF).
    pub fn wait_for_sessions(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = self.sessions();
            if s.len() >= n || Instant::now() > deadline {
                return s;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        self.kill();
        let _ = self
            .cmd()
            .args(["daemon", "--uninstall", "--force"])
            .output_bounded();
        if !thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("daemon log ({}):\n{}", self.dir.display(), self.log());
        }
    }
}

/// Run a program that must succeed; panic with its output otherwise.
pub fn assert_ok(out: &Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed with {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A TCP echo server on `bind` (port 0 for any), one thread per connection, counting accepts.
pub struct EchoServer {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl EchoServer {
    pub fn start(bind: &str) -> Self {
        let listener = TcpListener::bind(bind).unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (accepted.clone(), stop.clone());
        thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(mut conn) = conn else { continue };
                a.fetch_add(1, Ordering::Relaxed);
                thread::Builder::new()
                    .stack_size(64 * 1024)
                    .spawn(move || {
                        let mut buf = [0u8; 16 * 1024];
                        while let Ok(n) = conn.read(&mut buf) {
                            if n == 0 || conn.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    })
                    .unwrap();
            }
        });
        Self {
            addr,
            accepted,
            stop,
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr); // wake the accept loop
    }
}

/// A UDP socket counting datagrams it receives.
pub struct UdpSink {
    pub addr: SocketAddr,
    received: Arc<AtomicUsize>,
}

impl UdpSink {
    pub fn start(bind: &str) -> Self {
        let sock = UdpSocket::bind(bind).unwrap();
        let addr = sock.local_addr().unwrap();
        let received = Arc::new(AtomicUsize::new(0));
        let r = received.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while sock.recv_from(&mut buf).is_ok() {
                r.fetch_add(1, Ordering::Relaxed);
            }
        });
        Self { addr, received }
    }

    pub fn received(&self) -> usize {
        self.received.load(Ordering::Relaxed)
    }
}

/// Parse the last line of an agent's stdout as JSON (agent scripts report there).
pub fn last_json(stdout: &str) -> Value {
    let line = stdout
        .lines()
        .last()
        .unwrap_or_else(|| panic!("agent printed nothing"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("agent output `{line}` is not JSON: {e}"))
}

/// A "remote" host for tests: a network namespace joined to this one by a veth pair, with
/// 10.213.N.1 on our side and 10.213.N.2 inside. Removed on drop.
pub struct PeerNetns {
    pub name: String,
    pub host_ip: std::net::Ipv4Addr,
    pub peer_ip: std::net::Ipv4Addr,
}

impl Default for PeerNetns {
    fn default() -> Self {
        Self::new()
    }
}

impl PeerNetns {
    pub fn new() -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = (std::process::id() as u64 * 7 + N.fetch_add(1, Ordering::Relaxed)) % 250 + 1;
        let name = format!("chp{}-{n}", std::process::id() % 100_000);
        let (vh, vp) = (
            format!("vh{}-{n}", std::process::id() % 10_000),
            format!("vp{}-{n}", std::process::id() % 10_000),
        );
        let host_ip = std::net::Ipv4Addr::new(10, 213, n as u8, 1);
        let peer_ip = std::net::Ipv4Addr::new(10, 213, n as u8, 2);
        let ip = |args: &str| {
            let out = Command::new("ip")
                .args(args.split_whitespace())
                .output_bounded()
                .expect("ip (iproute2)");
            assert!(
                out.status.success(),
                "ip {args}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ip(&format!("netns add {name}"));
        let ns = Self {
            name: name.clone(),
            host_ip,
            peer_ip,
        };
        ip(&format!("link add {vh} type veth peer name {vp}"));
        ip(&format!("link set {vp} netns {name}"));
        ip(&format!("addr add {host_ip}/30 dev {vh}"));
        ip(&format!("link set {vh} up"));
        ip(&format!("-n {name} addr add {peer_ip}/30 dev {vp}"));
        ip(&format!("-n {name} link set {vp} up"));
        ip(&format!("-n {name} link set lo up"));
        ns
    }

    /// A command run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

impl Drop for PeerNetns {
    fn drop(&mut self) {
        // Deleting the namespace destroys the veth pair with it.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output_bounded();
    }
}

/// A child process killed when the test ends, panicking or not (so a failed test leaves no
/// server behind holding the test runner's output open).
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Random bytes as lowercase hex (`getrandom`), for passwords and names nobody could guess.
pub fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    // SAFETY: getrandom into a buffer of exactly b.len() bytes.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    assert_eq!(n, bytes as isize, "getrandom");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// PostgreSQL 15's server binaries (Debian layout).
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A real PostgreSQL 15 on 127.0.0.1 and a free port, in its own temporary directory, run as the
/// `postgres` OS user with SCRAM authentication. It holds role `agent_ro` (LOGIN, password
/// [`Postgres::ro_password`], SELECT on everything in `app`'s public schema) and database `app`
/// with `users(id int primary key, email text)` (3 rows) and the pgbench tables (scale 1).
/// Stopped (`-m immediate`) and removed on drop.
pub struct Postgres {
    pub dir: PathBuf,
    pub port: u16,
    /// `agent_ro`'s password: what the daemon's secrets file holds and no agent may ever see.
    pub ro_password: String,
    super_password: String,
}

impl Postgres {
    pub fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("chaperone-pg-{}", unique()));
        std::fs::create_dir_all(&dir).unwrap();
        set_mode(&dir, 0o755);
        chown_to_postgres(&dir);
        let super_password = format!("su-{}", random_hex(16));
        let ro_password = format!("ro-{}", random_hex(16));
        let pwfile = dir.join("pwfile");
        std::fs::write(&pwfile, format!("{super_password}\n")).unwrap();
        set_mode(&pwfile, 0o600);
        chown_to_postgres(&pwfile);
        let data = dir.join("data");
        let out = as_postgres(&dir, &format!("{PG_BIN}/initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=scram-sha-256",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output_bounded()
            .expect("runuser … initdb");
        assert_ok(&out, "initdb");
        let _ = std::fs::remove_file(&pwfile);

        // The port is probed, then released: another test may take it first; retry then.
        let mut pg = None;
        for _ in 0..5 {
            let port = free_port();
            let out = as_postgres(&dir, &format!("{PG_BIN}/pg_ctl"))
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(dir.join("server.log"))
                .args(["-w", "-t", "60", "-o"])
                .arg(format!(
                    "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
                     -c full_page_writes=off -c shared_buffers=16MB",
                    dir.display()
                ))
                .arg("start")
                .output_bounded()
                .expect("runuser … pg_ctl start");
            if out.status.success() {
                pg = Some(port);
                break;
            }
            eprintln!(
                "pg_ctl start on port {port} failed ({}); log:\n{}",
                out.status,
                std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
            );
        }
        let port = pg.unwrap_or_else(|| panic!("PostgreSQL did not start in {}", dir.display()));
        let pg = Self {
            dir,
            port,
            ro_password,
            super_password,
        };
        pg.psql_super(
            "postgres",
            &format!("CREATE ROLE agent_ro LOGIN PASSWORD '{}'", pg.ro_password),
        );
        pg.psql_super("postgres", "CREATE DATABASE app");
        pg.psql_super(
            "app",
            "CREATE TABLE users(id int primary key, email text);
             INSERT INTO users VALUES (1, 'ada@example.com'), (2, 'brian@example.com'), (3, 'grace@example.com');
             GRANT SELECT ON ALL TABLES IN SCHEMA public TO agent_ro;",
        );
        let out = Command::new("pgbench")
            .args([
                "-i",
                "-s",
                "1",
                "-q",
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                "postgres",
                "app",
            ])
            .env("PGPASSWORD", &pg.super_password)
            .output_bounded()
            .expect("pgbench -i");
        assert_ok(&out, "pgbench -i -s 1 app");
        pg.psql_super(
            "app",
            "GRANT SELECT ON ALL TABLES IN SCHEMA public TO agent_ro",
        );
        pg
    }

    /// A libpq connection string to database `app`, as an agent knows it: no password, any
    /// user. In the clear unless `extra` names an sslmode: with libpq's default `prefer`, a
    /// refused startup over TLS is retried in the clear, which would double the sessions tests
    /// count.
    pub fn agent_conninfo(&self, extra: &str) -> String {
        let ssl = if extra.contains("sslmode") {
            ""
        } else {
            "sslmode=disable"
        };
        format!(
            "host=127.0.0.1 port={} dbname=app user=whoever connect_timeout=10 {ssl} {extra}",
            self.port
        )
    }

    /// `pgbench ARGS… -h 127.0.0.1 -p <port> -U x app`: pgbench as an agent runs it (any user,
    /// no password).
    pub fn agent_pgbench(&self, args: &[&str]) -> Vec<String> {
        let port = self.port.to_string();
        ["pgbench"]
            .iter()
            .chain(args)
            .chain(&["-h", "127.0.0.1", "-p", &port, "-U", "x", "app"])
            .map(|a| a.to_string())
            .collect()
    }

    /// Run SQL as the superuser, directly (this process is outside any agent tree), and return
    /// psql's unaligned, tuples-only output. Panics if psql fails.
    pub fn psql_super(&self, db: &str, sql: &str) -> String {
        let out = Command::new("psql")
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .arg(format!(
                "host=127.0.0.1 port={} dbname={db} user=postgres",
                self.port
            ))
            .arg("-c")
            .arg(sql)
            .env("PGPASSWORD", &self.super_password)
            .output_bounded()
            .expect("psql (superuser)");
        assert_ok(&out, &format!("psql as superuser: {sql}"));
        String::from_utf8_lossy(&out.stdout).trim_end().to_string()
    }

    /// Daemon options for a postgres target `app` on this server: a secrets file (mode 0600)
    /// with credential `app-ro` (`agent_ro`), and a read-only grant for identity `agent` on
    /// classes read/session/transaction, objects public.*, pg_catalog.* and information_schema.*,
    /// and the non-built-in functions `functions`.
    pub fn daemon_options_with_functions(&self, functions: &[&str]) -> DaemonOptions {
        self.daemon_options_with_grants(&format!(
            "  - identity: agent\n    target: app\n    effect: allow\n    sql:\n      \
             classes: [read, session, transaction]\n      objects: [\"public.*\", \"pg_catalog.*\", \"information_schema.*\"]\n      \
             functions: [{}]\n",
            functions.join(", ")
        ))
    }

    /// Daemon options for a postgres target `app` on this server (credential `app-ro`, as
    /// above) with `grants` (YAML list items, indented by two spaces) as the grants.
    pub fn daemon_options_with_grants(&self, grants: &str) -> DaemonOptions {
        let secrets = self.dir.join(format!("secrets-{}.yaml", unique()));
        {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .create_new(true)
                .write(true)
                .mode(0o600)
                .open(&secrets)
                .unwrap();
            write!(
                f,
                "credentials:\n  app-ro: {{user: agent_ro, password: \"{}\"}}\n",
                self.ro_password
            )
            .unwrap();
        }
        set_mode(&secrets, 0o600);
        DaemonOptions {
            target_yaml: vec![format!(
                "{{name: app, protocol: postgres, address: 127.0.0.1, port: {}, credential: app-ro, database: app}}",
                self.port
            )],
            extra_yaml: format!("secrets_file: {}\ngrants:\n{grants}", secrets.display()),
            ..Default::default()
        }
    }

    /// [`Postgres::daemon_options_with_functions`] with `pg_sleep` granted (for cancel tests).
    pub fn daemon_options(&self) -> DaemonOptions {
        self.daemon_options_with_functions(&["pg_sleep"])
    }

    /// Turn TLS on: a fresh CA and a server certificate it signs for 127.0.0.1 (made with
    /// openssl), loaded by a configuration reload. Returns the CA certificate's path.
    pub fn enable_tls(&self) -> PathBuf {
        let data = self.dir.join("data");
        let tag = unique();
        let ca_key = self.dir.join(format!("ca-{tag}.key"));
        let ca = self.dir.join(format!("ca-{tag}.crt"));
        let csr = self.dir.join(format!("server-{tag}.csr"));
        let ext = self.dir.join(format!("server-{tag}.ext"));
        let (cert, key) = (data.join("server.crt"), data.join("server.key"));
        std::fs::write(
            &ext,
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
        )
        .unwrap();
        let openssl = |args: Vec<std::ffi::OsString>, what: &str| {
            let out = Command::new("openssl")
                .args(args)
                .output_bounded()
                .expect("openssl");
            assert_ok(&out, what);
        };
        let os = |v: &[&dyn AsRef<std::ffi::OsStr>]| {
            v.iter().map(|a| a.as_ref().to_owned()).collect::<Vec<_>>()
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut a = os(&[
            &"req",
            &"-x509",
            &"-days",
            &"2",
            &"-subj",
            &"/CN=chaperone-test-ca",
            &"-keyout",
            &ca_key,
            &"-out",
            &ca,
        ]);
        a.extend(ec.iter().map(Into::into));
        openssl(a, "openssl: CA");
        let mut a = os(&[
            &"req",
            &"-subj",
            &"/CN=127.0.0.1",
            &"-keyout",
            &key,
            &"-out",
            &csr,
        ]);
        a.extend(ec.iter().map(Into::into));
        openssl(a, "openssl: server key and CSR");
        openssl(
            os(&[
                &"x509",
                &"-req",
                &"-in",
                &csr,
                &"-CA",
                &ca,
                &"-CAkey",
                &ca_key,
                &"-CAcreateserial",
                &"-days",
                &"2",
                &"-extfile",
                &ext,
                &"-out",
                &cert,
            ]),
            "openssl: sign the server certificate",
        );
        set_mode(&key, 0o600);
        chown_to_postgres(&key);
        chown_to_postgres(&cert);
        set_mode(&ca, 0o644);
        self.psql_super("postgres", "ALTER SYSTEM SET ssl = on");
        self.psql_super("postgres", "SELECT pg_reload_conf()");
        ca
    }

    /// A login role `name` (password `password`, SELECT on app's public tables) that the server
    /// authenticates with `method` (`md5` or `password`, i.e. cleartext) from 127.0.0.1.
    pub fn add_role_with_auth(&self, name: &str, password: &str, method: &str) {
        self.psql_super(
            "app",
            &format!(
                "SET password_encryption = 'md5'; CREATE ROLE {name} LOGIN PASSWORD '{password}';
                 GRANT SELECT ON ALL TABLES IN SCHEMA public TO {name};"
            ),
        );
        let hba = self.dir.join("data/pg_hba.conf");
        let old = std::fs::read_to_string(&hba).unwrap();
        std::fs::write(
            &hba,
            format!("host all {name} 127.0.0.1/32 {method}\n{old}"),
        )
        .unwrap();
        self.psql_super("postgres", "SELECT pg_reload_conf()");
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = as_postgres(&self.dir, &format!("{PG_BIN}/pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "stop"])
            .output_bounded();
        if thread::panicking() {
            eprintln!("postgres log ({}):\n{}", self.dir.display(), self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `runuser -u postgres -- PROGRAM`, in `cwd` (postgres cannot enter the test's directory).
pub fn as_postgres(cwd: &Path, program: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--", program]).current_dir(cwd);
    c
}

fn chown_to_postgres(path: &Path) {
    let out = Command::new("chown")
        .arg("postgres:postgres")
        .arg(path)
        .output_bounded()
        .expect("chown");
    assert_ok(&out, "chown postgres");
}

/// chmod.
pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A real OpenID Provider (npm `oidc-provider`, tests/oidc/provider.mjs) on 127.0.0.1, with
/// clients `chaperone` and `other-app` and users alice (groups readers, staff), bob (writers)
/// and carol (readers, email unverified).
pub struct OidcProvider {
    pub issuer: String,
    port: u16,
    dir: PathBuf,
    ttl_secs: u64,
    child: Option<Child>,
}

impl OidcProvider {
    /// ID tokens live `ttl_secs`.
    pub fn start(ttl_secs: u64) -> Self {
        let dir = std::env::temp_dir().join(format!("chaperone-oidc-{}", unique()));
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let mut p = Self {
            issuer: format!("http://127.0.0.1:{port}"),
            port,
            dir,
            ttl_secs,
            child: None,
        };
        let keys = p.node(&["keys", "first"]);
        std::fs::write(p.jwks(), keys).unwrap();
        p.spawn();
        p
    }

    fn script() -> PathBuf {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("oidc/provider.mjs");
        assert!(
            script
                .with_file_name("node_modules")
                .join("oidc-provider")
                .exists(),
            "tests/oidc/node_modules is missing: run scripts/setup.sh (npm ci in tests/oidc)"
        );
        script
    }

    fn jwks(&self) -> PathBuf {
        self.dir.join("jwks.json")
    }

    fn node(&self, args: &[&str]) -> String {
        let out = Command::new("node")
            .arg(Self::script())
            .args(args)
            .output_bounded()
            .expect("node");
        assert_ok(&out, &format!("node provider.mjs {args:?}"))
            .trim()
            .to_string()
    }

    fn spawn(&mut self) {
        let log = self.dir.join("provider.log");
        let child = Command::new("node")
            .arg(Self::script())
            .args(["serve", &self.port.to_string()])
            .arg(self.jwks())
            .env("ID_TOKEN_TTL", self.ttl_secs.to_string())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::options().append(true).open(&log).unwrap())
            .spawn()
            .expect("starting the OIDC provider");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("ready ")
        {
            assert!(
                Instant::now() < deadline,
                "the OIDC provider did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// An ID token for `user`, issued to `client` through the provider's login and consent.
    pub fn token(&self, user: &str, client: &str) -> String {
        self.node(&["token", &self.issuer, user, client])
    }

    /// A token with plausible claims signed by a key the provider never had.
    pub fn forged(&self, user: &str) -> String {
        self.node(&["forge", &self.issuer, user])
    }

    /// A client-credentials access token (a JWT, `typ: at+jwt`) for the service client
    /// `etl-bot`, straight from the token endpoint.
    pub fn service_access_token(&self) -> String {
        let out = Command::new("curl")
            .args([
                "-sf",
                "-u",
                "etl-bot:etl-bot-secret",
                "-d",
                "grant_type=client_credentials",
                "-d",
                "scope=groups",
            ])
            .arg(format!("{}/token", self.issuer))
            .output_bounded()
            .unwrap();
        let v: Value = serde_json::from_str(&assert_ok(&out, "client credentials")).unwrap();
        v["access_token"].as_str().unwrap().to_string()
    }

    /// An ID token for `user` signed with the provider's own current key, with `claims` (a
    /// JSON object; `null` removes a claim) over the usual ones: a token the provider could
    /// have issued, except for what the test changes.
    pub fn signed(&self, user: &str, claims: &str) -> String {
        let jwks = self.jwks();
        self.node(&["sign", &self.issuer, user, jwks.to_str().unwrap(), claims])
    }

    /// Approve a device login (the code `chaperone run --login` printed) as `user`.
    pub fn approve(&self, user_code: &str, user: &str) {
        self.node(&["approve", &self.issuer, user_code, user]);
    }

    /// Rotate the signing key: restart with a new key first, the old one still published.
    pub fn rotate_keys(&mut self) {
        self.restart_with_new_key(true);
    }

    /// Withdraw the signing key: restart with a new key only, the old one no longer published.
    pub fn withdraw_keys(&mut self) {
        self.restart_with_new_key(false);
    }

    fn restart_with_new_key(&mut self, keep_old: bool) {
        self.stop();
        let new: Value = serde_json::from_str(&self.node(&["keys", &unique()])).unwrap();
        let mut keys = new["keys"].as_array().unwrap().clone();
        if keep_old {
            let old: Value =
                serde_json::from_str(&std::fs::read_to_string(self.jwks()).unwrap()).unwrap();
            keys.extend(old["keys"].as_array().unwrap().iter().cloned());
        }
        std::fs::write(self.jwks(), serde_json::json!({ "keys": keys }).to_string()).unwrap();
        self.spawn();
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The daemon's `oidc:` section for this provider (audience `chaperone`), with the key-set
    /// refetch interval shortened for tests.
    pub fn config_yaml(&self) -> String {
        format!(
            "oidc:\n  issuer: {}\n  audience: chaperone\n  jwks_refetch_secs: 1\n",
            self.issuer
        )
    }

    /// Write `token` to a file the agent user can read; returns its path.
    pub fn token_file(&self, name: &str, token: &str) -> PathBuf {
        set_mode(&self.dir, 0o755);
        let p = self.dir.join(name);
        std::fs::write(&p, token).unwrap();
        set_mode(&p, 0o644);
        p
    }
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A long-running agent that answers one JSON line per line it is sent (a probe loop, a SQL
/// session): the same process can be watched across reloads, crashes and restarts. Killed on
/// drop.
pub struct LineAgent {
    child: Child,
    lines: std::io::BufReader<std::process::ChildStdout>,
}

impl LineAgent {
    /// Take over `child`, spawned with stdin and stdout piped.
    pub fn new(mut child: Child) -> Self {
        let lines = std::io::BufReader::new(child.stdout.take().expect("stdout piped"));
        Self { child, lines }
    }

    /// Send one line, read one JSON line back (within [`PROGRAM_LIMIT`]: an agent that stops
    /// answering fails the test).
    pub fn ask(&mut self, line: &str) -> Value {
        use std::io::BufRead;
        use std::os::fd::AsRawFd;
        writeln!(self.child.stdin.as_mut().expect("stdin piped"), "{line}").unwrap();
        let deadline = Instant::now() + PROGRAM_LIMIT;
        let mut answer = Vec::new();
        loop {
            let buffered = self.lines.buffer();
            if let Some(end) = buffered.iter().position(|&b| b == b'\n') {
                answer.extend_from_slice(&buffered[..=end]);
                self.lines.consume(end + 1);
                break;
            }
            answer.extend_from_slice(buffered);
            let n = buffered.len();
            self.lines.consume(n);
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd {
                fd: self.lines.get_ref().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd, valid for the call.
            let ready = unsafe { libc::poll(&mut pfd, 1, left.as_millis() as libc::c_int) };
            if ready < 0 {
                continue; // interrupted
            }
            assert!(
                ready != 0,
                "the agent did not answer {line:?} within {} s; got {:?}",
                PROGRAM_LIMIT.as_secs(),
                String::from_utf8_lossy(&answer)
            );
            if self.lines.fill_buf().unwrap().is_empty() {
                break; // end of its output
            }
        }
        let answer = String::from_utf8_lossy(&answer);
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
    }
}

impl Drop for LineAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
