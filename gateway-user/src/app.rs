//! Assembles the daemon: binds the proxy listeners, installs (or adopts) the redirect, opens the
//! session log, and runs one task per accepted connection until shutdown.
//!
//! Per connection ([`handle`]): original destination from the redirect maps, agent from its
//! cgroup, target from the config, verdict from policy, then the protocol carries the bytes and
//! the recorder writes the session. Deciding is kept apart from copying.

use crate::{
    config::{Config, ProtocolKind, canonical_ip},
    identity::{AgentResolver, AgentTree},
    policy::{self, Action, Policy, PolicyStore, Subject, Verdict},
    protocols,
    record::{
        AuditEvent, JsonlSink, RecordSink, RecordedVerdict, SessionEvent, SessionIds, SessionInfo,
        SessionRecorder, now_ms,
    },
    redirect::{ProxyAddrs, Redirect},
};
use serde::Serialize;
use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument as _, error, info, info_span, warn};

/// How long live sessions may run on after a shutdown signal before they are cut.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Accept backlog: bursts of agent connections must not overflow into SYN drops.
const BACKLOG: u32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    #[error(transparent)]
    Redirect(#[from] crate::redirect::RedirectError),
    #[error(transparent)]
    Record(#[from] crate::record::RecordError),
    #[error(transparent)]
    Secrets(#[from] crate::secrets::SecretsError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    #[error(transparent)]
    Oidc(#[from] crate::identity::oidc::OidcError),
    #[error("{config}: masking: {error}")]
    Mask {
        config: String,
        error: crate::mask::MaskError,
    },
    #[error("binding the proxy listener on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "another chaperone daemon (lock {path}) already serves pin_dir {pin_dir}; stop it first"
    )]
    AlreadyRunning { path: PathBuf, pin_dir: PathBuf },
    #[error("taking the daemon lock {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    StatusFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("starting a session thread: {0}")]
    Runtime(std::io::Error),
}

/// Everything a connection task needs, built once.
pub struct Inputs {
    pub config: Config,
    pub policy: PolicyStore,
    pub pg: crate::protocols::postgres::Shared,
    pub redirect: Redirect,
    pub agents: AgentResolver,
    /// Verifies agents' ID tokens (when the configuration has an `oidc` section).
    pub oidc: Option<Arc<crate::identity::oidc::Verifier>>,
    pub sink: Arc<dyn RecordSink>,
    pub ids: SessionIds,
    /// Masks every PostgreSQL session's results with `config.masking` (per-grant rules would
    /// pick another `Masker` per session).
    /// Maskers for sessions, by the rules that apply to each (see [`Maskers`]).
    pub maskers: Maskers,
}

/// What the daemon bound, as written to the status file.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct DaemonStatus {
    pub pid: u32,
    pub listen: Vec<SocketAddr>,
    pub pin_dir: PathBuf,
    pub agent_cgroup: PathBuf,
    pub sessions_log: PathBuf,
    /// Where `chaperone run` (and later the live CLI) asks the daemon for things.
    #[serde(default)]
    pub control_socket: PathBuf,
    pub started_at_ms: u64,
}

/// Run the daemon until SIGINT or SIGTERM.
pub async fn run(config: Config) -> Result<(), AppError> {
    raise_fd_limit();
    let _lock = lock_pin_dir(&config)?;
    let tree = AgentTree::locate(&config.agent_cgroup)?;
    tree.ensure()?;
    let (v4, v6) = bind(&config)?;
    let port = v4.local_addr().map_err(|source| AppError::Bind {
        addr: SocketAddr::new(config.listen_ipv4.into(), config.listen_port),
        source,
    })?;
    let proxy = ProxyAddrs {
        ipv4: config.listen_ipv4,
        ipv6: config.listen_ipv6,
        port: port.port(),
    };
    let redirect = Redirect::install(&config.pin_dir, tree.root(), proxy, &config.dns_resolvers())?;
    let control = crate::control::bind(&config.pin_dir)?;
    let oidc = config
        .oidc
        .clone()
        .map(crate::identity::oidc::Verifier::new)
        .transpose()?
        .map(Arc::new);
    let services = Arc::new(crate::identity::services::Services::new(
        config.services.clone(),
    ));
    let sink: Arc<dyn RecordSink> = Arc::new(JsonlSink::open(&config.sessions_log())?);
    let secrets = match &config.secrets_file {
        Some(path) => crate::secrets::Secrets::load(path)?,
        None => Default::default(),
    };
    let maskers = Maskers::new(crate::secrets::mask_key(&config.masking_key_file())?);
    // Built once now, so rules the engine refuses stop the daemon here, not its first session.
    crate::mask::Masker::new(&config.masking, maskers.key.clone()).map_err(|error| {
        AppError::Mask {
            config: config.source.clone(),
            error,
        }
    })?;
    let tls_acceptor = crate::tls::acceptor(
        config
            .client_tls
            .as_ref()
            .map(|t| (t.cert_file.as_path(), t.key_file.as_path())),
    )?;
    let mut tls_connectors = std::collections::HashMap::new();
    for t in &config.targets {
        if let Some(c) = crate::tls::connector(t.tls, t.tls_ca_file.as_deref())? {
            tls_connectors.insert(t.name.clone(), c);
        }
    }
    let status = DaemonStatus {
        pid: std::process::id(),
        listen: [Some(&v4), v6.as_ref()]
            .into_iter()
            .flatten()
            .filter_map(|l| l.local_addr().ok())
            .collect(),
        pin_dir: config.pin_dir.clone(),
        agent_cgroup: tree.root().to_path_buf(),
        sessions_log: config.sessions_log(),
        control_socket: crate::control::socket_path(&config.pin_dir),
        started_at_ms: now_ms(),
    };
    // Before the status file says ready: a daemon that cannot run sessions is not.
    let sessions = SessionThreads::start(session_threads())?;
    write_status(&config, &status)?;
    info!(
        listen = ?status.listen,
        agent_cgroup = %tree.root().display(),
        pin_dir = %config.pin_dir.display(),
        targets = config.targets.len(),
        unlisted = ?config.unlisted,
        "chaperone daemon ready"
    );
    let inputs = Arc::new(Inputs {
        policy: PolicyStore::new(Policy::from_config(&config)),
        pg: crate::protocols::postgres::Shared::new(secrets, Some(tls_acceptor), tls_connectors),
        redirect,
        agents: AgentResolver::new(tree, services.clone()),
        oidc,
        sink,
        ids: SessionIds::default(),
        maskers,
        config,
    });

    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    for listener in [Some(v4), v6].into_iter().flatten() {
        tracker.spawn(accept_loop(
            listener,
            inputs.clone(),
            stop.clone(),
            tracker.clone(),
            sessions.clone(),
        ));
    }
    let control = tokio::spawn(crate::control::serve(control, inputs.clone()));
    let background = [
        control,
        tokio::spawn(reap_agent_cgroups(inputs.clone())),
        tokio::spawn(watch_config(inputs.clone())),
        tokio::spawn(watch_expiries(inputs.clone())),
        tokio::spawn(match inputs.oidc.clone() {
            Some(v) => futures_util::future::Either::Left(services.keep_fresh(v)),
            None => futures_util::future::Either::Right(std::future::ready(())),
        }),
    ];
    wait_for_shutdown_signal().await;
    for task in background {
        task.abort();
    }
    info!("shutting down: no new connections; draining live sessions");
    stop.cancel();
    tracker.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, tracker.wait())
        .await
        .is_err()
    {
        warn!("sessions still open after {DRAIN_TIMEOUT:?}; cutting them");
    }
    // The pins stay: with no listener, agents' connections are refused until a daemon returns.
    let _ = std::fs::remove_file(inputs.config.status_file());
    let _ = std::fs::remove_file(crate::control::socket_path(&inputs.config.pin_dir));
    Ok(())
}

fn bind(config: &Config) -> Result<(TcpListener, Option<TcpListener>), AppError> {
    // Port 0: take the kernel's pick for IPv4 and ask for the same on IPv6; retry if taken.
    for _ in 0..20 {
        let v4 = listen(SocketAddr::new(
            config.listen_ipv4.into(),
            config.listen_port,
        ))?;
        let port = v4
            .local_addr()
            .map(|a| a.port())
            .unwrap_or(config.listen_port);
        match listen(SocketAddr::new(config.listen_ipv6.into(), port)) {
            Ok(v6) => return Ok((v4, Some(v6))),
            Err(AppError::Bind { source, .. })
                if config.listen_port == 0 && source.kind() == std::io::ErrorKind::AddrInUse =>
            {
                continue;
            }
            Err(AppError::Bind { source, addr })
                if source.kind() == std::io::ErrorKind::AddrNotAvailable =>
            {
                warn!(%addr, "no IPv6 loopback; IPv6 agent connections will be refused");
                return Ok((v4, None));
            }
            Err(e) => return Err(e),
        }
    }
    Err(AppError::Bind {
        addr: SocketAddr::new(config.listen_ipv6.into(), 0),
        source: std::io::ErrorKind::AddrInUse.into(),
    })
}

fn listen(addr: SocketAddr) -> Result<TcpListener, AppError> {
    let bind_err = |source| AppError::Bind { addr, source };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(bind_err)?;
    socket.set_reuseaddr(true).map_err(bind_err)?;
    socket.bind(addr).map_err(bind_err)?;
    socket.listen(BACKLOG).map_err(bind_err)
}

/// One daemon per installation: a second one would adopt the same links and point them at its
/// own port. The lock is an flock, so a crashed daemon never leaves it stale.
pub fn lock_pin_dir(config: &Config) -> Result<std::fs::File, AppError> {
    let path = crate::control::run_file(&config.pin_dir, "lock");
    let err = |source| AppError::Lock {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(crate::control::RUN_DIR).map_err(err)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(err)?;
    // SAFETY: flock on an fd we own.
    if unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    } != 0
    {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(AppError::AlreadyRunning {
                path,
                pin_dir: config.pin_dir.clone(),
            });
        }
        return Err(err(e));
    }
    Ok(file)
}

fn write_status(config: &Config, status: &DaemonStatus) -> Result<(), AppError> {
    let path = config.status_file();
    let err = |source| AppError::StatusFile {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(&config.state_dir).map_err(err)?;
    let json = serde_json::to_vec_pretty(status).expect("status serializes");
    std::fs::write(&path, json).map_err(err)
}

/// How many threads run sessions: `CHAPERONE_SESSION_THREADS`, else one per CPU; 0 runs them
/// on the daemon's work-stealing runtime instead (for comparison).
fn session_threads() -> usize {
    std::env::var("CHAPERONE_SESSION_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Threads that each run a single-threaded runtime; a session lives on one of them from accept
/// to close. Both of its sockets are registered with that thread's reactor, so a message in
/// from one side is read, judged and written out to the other without waking another thread:
/// on a work-stealing runtime each hop can cost a cross-thread wake-up (a futex and a context
/// switch), which is most of what a small statement costs the proxy.
#[derive(Clone)]
struct SessionThreads {
    handles: Arc<[tokio::runtime::Handle]>,
    next: Arc<std::sync::atomic::AtomicUsize>,
}

impl SessionThreads {
    fn start(n: usize) -> Result<Self, AppError> {
        let mut handles = Vec::with_capacity(n);
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(AppError::Runtime)?;
            handles.push(rt.handle().clone());
            std::thread::Builder::new()
                .name(format!("chaperone-session-{i}"))
                // Runs for the daemon's life: its tasks are spawned from the accept loops.
                .spawn(move || rt.block_on(std::future::pending::<()>()))
                .map_err(AppError::Runtime)?;
        }
        Ok(Self {
            handles: handles.into(),
            next: Default::default(),
        })
    }

    /// The runtime for the next session: a session thread (round robin), or with none the
    /// caller's.
    fn pick(&self) -> tokio::runtime::Handle {
        if self.handles.is_empty() {
            return tokio::runtime::Handle::current();
        }
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.handles[i % self.handles.len()].clone()
    }
}

async fn accept_loop(
    listener: TcpListener,
    inputs: Arc<Inputs>,
    stop: CancellationToken,
    tracker: TaskTracker,
    sessions: SessionThreads,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                // Registered again on the session's own thread (below).
                let stream = match stream.into_std() {
                    Ok(s) => s,
                    Err(e) => {
                        error!(%peer, error = %e, "cannot hand the connection to a session thread");
                        continue;
                    }
                };
                let inputs = inputs.clone();
                let stop = stop.clone();
                tracker.spawn_on(
                    async move {
                        let stream = match TcpStream::from_std(stream) {
                            Ok(s) => s,
                            Err(e) => {
                                error!(%peer, error = %e, "cannot register the connection");
                                return;
                            }
                        };
                        let drain = async {
                            stop.cancelled().await;
                            tokio::time::sleep(DRAIN_TIMEOUT).await;
                        };
                        tokio::select! {
                            _ = handle(&inputs, stream, peer) => {}
                            _ = drain => {}
                        }
                    },
                    &sessions.pick(),
                );
            }
            // Out of fds or memory: back off instead of spinning; the backlog holds the rest.
            Err(e) => {
                error!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Refuse a connection the agent already sees as established: a reset, so its next read or
/// write fails at once instead of hanging.
fn refuse(stream: TcpStream) {
    crate::protocols::refuse(&stream);
}

async fn handle(inputs: &Inputs, client: TcpStream, peer: SocketAddr) {
    let _ = client.set_nodelay(true);
    let original = match inputs.redirect.take_original(peer) {
        Ok(Some(o)) => o,
        Ok(None) => {
            // Not from an agent (or already taken): there is nowhere legitimate to relay it.
            warn!(%peer, "connection has no original destination; refusing");
            return refuse(client);
        }
        Err(e) => {
            error!(%peer, error = %e, "original destination lookup failed; refusing");
            return refuse(client);
        }
    };
    let cgroup_id = original.cgroup_id;
    let agent = inputs.agents.resolve(cgroup_id);
    let target = inputs.config.target_for(original.addr).cloned();
    let decision = policy::evaluate(
        &inputs.policy.current(),
        &Subject::now(agent.as_ref()),
        &Action::Connect {
            dst: original.addr,
            target: target.as_deref(),
        },
    );
    let kind = target.as_ref().map_or(ProtocolKind::Tcp, |t| t.protocol);
    let id = inputs.ids.next();
    // Every line logged for this session (each statement's verdict too) carries who vouched.
    let vouched = agent.as_ref().and_then(|a| a.oidc.as_ref());
    let span = info_span!(
        "session",
        id = %id,
        agent = agent.as_ref().and_then(|a| a.name.as_deref()).unwrap_or("-"),
        subject = vouched.map_or("-", |o| o.subject.as_str()),
        groups = %vouched.map(|o| o.groups.join(",")).unwrap_or_default(),
    );
    let upstream_addr = SocketAddr::new(canonical_ip(original.addr.ip()), original.addr.port());
    let agent_ref = agent.clone();
    let refusal = match &decision.verdict {
        Verdict::Allow => None,
        Verdict::Deny(r) => Some(r.clone()),
        Verdict::Hold => Some(policy::Refusal {
            rule: decision.rule.clone(),
        }),
    };
    let info = SessionInfo {
        id,
        agent,
        client: peer,
        original_dst: original,
        target: target.as_ref().map(|t| t.name.clone()),
        protocol: protocols::name(kind).to_string(),
        verdict: match decision.verdict {
            Verdict::Allow => RecordedVerdict::Allow,
            Verdict::Deny(_) | Verdict::Hold => RecordedVerdict::Deny,
        },
        reason: decision.rule,
        started_at_ms: now_ms(),
    };
    let current_agent = move || inputs.agents.resolve(cgroup_id);
    // Results are masked by the rules of the grants that apply to this agent on this target,
    // then the configuration's, as they stand when the session starts.
    let masker = match target.as_deref() {
        Some(t) if t.protocol == ProtocolKind::Postgres => {
            match inputs.maskers.for_session(
                &inputs.policy,
                &Subject::now(agent_ref.as_ref()),
                &t.name,
            ) {
                Ok(m) => Some(m),
                Err(e) => {
                    // Checked at load; a rule that fails here must not let results through.
                    error!(error = %e, "cannot build this session's masking; refusing it");
                    return refuse(client);
                }
            }
        }
        _ => None,
    };
    async move {
        let mut rec = SessionRecorder::start(inputs.sink.clone(), info);
        let session = protocols::Session {
            kind,
            target: target.as_deref(),
            upstream: upstream_addr,
            agent: agent_ref.as_ref(),
            policy: &inputs.policy,
            pg: &inputs.pg,
            refusal: refusal.as_ref(),
            current_agent: &current_agent,
            masker: masker.as_deref(),
        };
        if let Err(e) = protocols::serve(&session, client, &mut rec).await {
            warn!(error = %e, "session ended with an error");
            rec.error = Some(e.to_string());
        }
    }
    .instrument(span)
    .await
}

/// How often cgroups of agents that have exited are removed.
const REAP_INTERVAL: Duration = Duration::from_secs(10);

/// Remove the cgroups of agents that have exited: the daemon created them, and an unprivileged
/// `chaperone run` cannot.
async fn reap_agent_cgroups(inputs: Arc<Inputs>) {
    loop {
        tokio::time::sleep(REAP_INTERVAL).await;
        let tree = inputs.agents.tree().clone();
        let _ = tokio::task::spawn_blocking(move || tree.reap()).await;
    }
}

/// Maskers built from the rules that apply to sessions (their grants' masking, then the
/// configuration's), shared by every session with the same rules under the same policy, and
/// dropped when the policy changes.
pub struct Maskers {
    key: crate::mask::TokenKey,
    built: std::sync::Mutex<(u64, BuiltMaskers)>,
}

/// Maskers by the grants whose rules went into them.
type BuiltMaskers = std::collections::HashMap<Vec<usize>, Arc<crate::mask::Masker>>;

impl Maskers {
    fn new(key: crate::mask::TokenKey) -> Self {
        Self {
            key,
            built: Default::default(),
        }
    }

    fn for_session(
        &self,
        store: &PolicyStore,
        subject: &Subject<'_>,
        target: &str,
    ) -> Result<Arc<crate::mask::Masker>, crate::mask::MaskError> {
        let generation = store.generation();
        let (from, rules) = store.current().masking_for(subject, target);
        let mut built = self.built.lock().expect("maskers lock");
        if built.0 != generation {
            *built = (generation, Default::default());
        }
        if let Some(m) = built.1.get(&from) {
            return Ok(m.clone());
        }
        let m = Arc::new(crate::mask::Masker::new(&rules, self.key.clone())?);
        built.1.insert(from, m.clone());
        Ok(m)
    }
}

/// How often the configuration's files are checked for changes.
const CONFIG_POLL: Duration = Duration::from_secs(2);

/// Reload the policy on SIGHUP and when the configuration's files change. A configuration that
/// does not load is refused whole (the error names file, line and column) and the policy in
/// force stays; grants and `unlisted` apply to every live session's next decision. Other
/// settings (targets, listeners, oidc, ...) take effect at the next restart.
async fn watch_config(inputs: Arc<Inputs>) {
    use tokio::signal::unix::{SignalKind, signal};
    // Installed even with nothing to reload: SIGHUP's default action would end the daemon.
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        error!("cannot install the SIGHUP handler; reload on file change only");
        return;
    };
    let path = inputs.config.path.clone();
    let mut files = Settle::new(path.as_deref().map(files_state));
    let mut tick = tokio::time::interval(CONFIG_POLL);
    loop {
        let trigger = tokio::select! {
            _ = hup.recv() => "SIGHUP",
            _ = tick.tick() => {
                if !files.poll(path.as_deref().map(files_state)) {
                    continue;
                }
                "file change"
            }
        };
        let Some(path) = path.clone() else {
            info!("SIGHUP: running on the embedded default configuration; nothing to reload");
            continue;
        };
        let before = files_state(&path);
        let loaded = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || Config::load_trusted(&path)).await
        };
        if files_state(&path) != before {
            // Changed while being read: the next polls will pick up the settled version.
            files.assume_seen(Some(before));
            continue;
        }
        let audit = match loaded {
            Ok(Ok(cfg)) if targets_of(&cfg) != targets_of(&inputs.config) => {
                let error = "targets changed: restart the daemon to apply them; until then the \
                             policy in force stays (new grants must not meet old targets)"
                    .to_string();
                error!(trigger, "policy reload refused: {error}");
                AuditEvent::PolicyReloadFailed {
                    trigger: trigger.into(),
                    error,
                }
            }
            Ok(Ok(cfg)) => {
                let policy = Policy::from_config(&cfg);
                let grants = policy.grants.len();
                inputs.policy.replace(policy);
                info!(trigger, grants, "policy reloaded");
                AuditEvent::PolicyReloaded {
                    trigger: trigger.into(),
                    grants,
                }
            }
            Ok(Err(e)) => {
                error!(trigger, error = %e, "policy reload refused; the policy in force stays");
                AuditEvent::PolicyReloadFailed {
                    trigger: trigger.into(),
                    error: e.to_string(),
                }
            }
            Err(e) => {
                error!(error = %e, "policy reload failed");
                continue;
            }
        };
        inputs.sink.record(&SessionEvent::Audit {
            at_ms: now_ms(),
            audit,
        });
    }
}

/// Everything about the targets, to compare two configurations' (a target's definition cannot
/// change under live sessions).
fn targets_of(c: &Config) -> serde_json::Value {
    serde_json::to_value(&c.targets).unwrap_or_default()
}

/// Name, length and modification time of the configuration's files: what changing one changes.
type FileState = (PathBuf, u64, u64, Option<std::time::SystemTime>);

/// Polled state that is acted on only once a change has held still for a whole poll: a file
/// being written is never read half-way (a cut file can be a valid, wider policy).
struct Settle<S> {
    seen: S,
    pending: Option<S>,
}

impl<S: PartialEq> Settle<S> {
    fn new(seen: S) -> Self {
        Self {
            seen,
            pending: None,
        }
    }

    /// One poll's observation; true when a change has settled (it is then the state seen).
    fn poll(&mut self, now: S) -> bool {
        if now == self.seen {
            self.pending = None;
            return false;
        }
        if self.pending.as_ref() != Some(&now) {
            self.pending = Some(now);
            return false;
        }
        self.seen = now;
        self.pending = None;
        true
    }

    /// Take `state` as seen without acting on it (what was read turned out to be moving).
    fn assume_seen(&mut self, state: S) {
        self.seen = state;
        self.pending = None;
    }
}

fn files_state(path: &std::path::Path) -> Vec<FileState> {
    let entries: Vec<PathBuf> = if path.is_dir() {
        std::fs::read_dir(path)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    } else {
        vec![path.to_path_buf()]
    };
    let mut state: Vec<_> = entries
        .into_iter()
        .map(|p| {
            use std::os::unix::fs::MetadataExt as _;
            let m = std::fs::metadata(&p).ok();
            let (len, ino) = m.as_ref().map_or((0, 0), |m| (m.len(), m.ino()));
            let mtime = m.and_then(|m| m.modified().ok());
            (p, ino, len, mtime)
        })
        .collect();
    state.sort();
    state
}

/// Say so, once, when a grant reaches its `expires` time (it stops applying by itself: every
/// decision compares with the clock).
async fn watch_expiries(inputs: Arc<Inputs>) {
    let mut reported = std::collections::HashSet::new();
    loop {
        let now = chrono::Utc::now();
        for (i, g) in inputs.policy.current().grants.iter().enumerate() {
            let Some(expires) = g.expires else { continue };
            if expires <= now && reported.insert((g.label(i), expires)) {
                info!(grant = %g.label(i), %expires, "grant expired; it no longer applies");
                inputs.sink.record(&SessionEvent::Audit {
                    at_ms: now_ms(),
                    audit: AuditEvent::GrantExpired {
                        grant: g.label(i),
                        expires: expires.to_rfc3339(),
                    },
                });
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Each redirected connection holds two fds; the default soft limit (1024) would cap the daemon
/// near 500 concurrent sessions.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

async fn wait_for_shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        error!("cannot install signal handlers; stopping");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::Settle;

    #[test]
    fn a_change_is_acted_on_once_it_holds_still_for_a_poll() {
        let mut s = Settle::new("old");
        assert!(!s.poll("old"), "nothing changed");
        assert!(!s.poll("new"), "a change seen once may still be moving");
        assert!(s.poll("new"), "the same change a poll later has settled");
        assert!(!s.poll("new"), "and is acted on once");
    }

    #[test]
    fn a_file_caught_half_written_is_never_acted_on() {
        let mut s = Settle::new("old");
        // The writer is half-way at one poll and done by the next: the half is never taken.
        assert!(!s.poll("half"));
        assert!(!s.poll("whole"));
        assert!(s.poll("whole"));
        // A writer slower than a poll: every state differs from the last, so none settles.
        let mut s = Settle::new("old");
        for state in ["a", "ab", "abc", "abcd"] {
            assert!(!s.poll(state), "{state}");
        }
        // Put back as it was before it settled: nothing to do.
        let mut s = Settle::new("old");
        assert!(!s.poll("tmp"));
        assert!(!s.poll("old"));
        assert!(!s.poll("old"));
    }

    #[test]
    fn a_state_that_moved_while_read_is_read_again_once_it_settles() {
        let mut s = Settle::new("old");
        s.assume_seen("read");
        assert!(!s.poll("read"));
        assert!(!s.poll("later"));
        assert!(s.poll("later"));
    }
}
