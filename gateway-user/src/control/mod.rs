//! The control socket: how local callers ask the daemon for things. Today binding a new agent
//! and refreshing its token (`chaperone run`); the live CLI (watch, kill, approve) will come
//! through here too.
//!
//! One JSON request per line, one JSON response per line, on a Unix socket next to the daemon's
//! lock (`/run/chaperone/<installation>.sock`, mode 0666: any user may ask, the daemon decides).
//! The caller is known by SO_PEERCRED, never by what it says:
//!
//! - a caller inside the agent tree is refused outright (an agent cannot start, re-label or
//!   escape into another agent);
//! - `bind` names a child of the caller, stopped before exec, with the caller's uid: the daemon
//!   verifies the ID token (if any), creates the cgroup, labels it, checks the programs are in
//!   force on it, and moves the child in. The child cannot move itself: cgroup files are root's;
//! - without a token only root may bind, and only when the configuration does not require
//!   tokens;
//! - `refresh` replaces an agent's token with a newer one for the same issuer and subject (the
//!   token proves it; the caller must be outside the tree too).
//!
//! It owns the wire format ([`Request`], [`Response`]), the server loop and a small blocking
//! client for the CLI. It decides no access (policy does, per connection and statement).

use crate::{
    app::Inputs,
    identity::{AgentId, Binding, Vouched},
    record::{AuditEvent, SessionEvent, now_ms},
};
use serde::{Deserialize, Serialize};
use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _},
    net::{UnixListener, UnixStream},
};
use tracing::{info, warn};

/// Directory of the per-installation daemon locks and control sockets.
pub const RUN_DIR: &str = "/run/chaperone";
/// A request line longer than this is refused (a token is a few KiB at most).
const MAX_REQUEST: usize = 64 * 1024;
/// Control requests served at once; more are refused.
const MAX_CONCURRENT: usize = 64;
/// How long a caller may take to send its request, and the client to wait for an answer.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "cannot reach the daemon's control socket {path}: {source}. Is `chaperone daemon` running for this configuration?"
    )]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to the daemon over {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the daemon closed the control connection {path} without answering: it is serving as many control requests as it takes at once ({MAX_CONCURRENT}), or stopping; try again"
    )]
    NoAnswer { path: PathBuf },
    #[error("the daemon sent an answer this version does not understand: {0}")]
    BadAnswer(String),
    #[error("binding the control socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What a caller asks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Make `pid` (the caller's child, waiting to exec) an agent. `name` is the identity asked
    /// for (`--as`); `token` an OIDC ID token proving who it is.
    Bind {
        pid: u32,
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        token: Option<String>,
    },
    /// Replace the token bound to the agent cgroup `cgroup` (as `Bound` named it).
    Refresh { cgroup: String, token: String },
}

/// What the daemon answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Bound {
        /// The agent's cgroup, relative to the agent tree.
        cgroup: String,
        agent: AgentId,
    },
    Refreshed {
        agent: AgentId,
    },
    Error {
        message: String,
    },
}

/// The file in [`RUN_DIR`] for the installation whose pins live in `pin_dir`, with `ext`.
pub fn run_file(pin_dir: &Path, ext: &str) -> PathBuf {
    let name: String = pin_dir
        .to_string_lossy()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    PathBuf::from(RUN_DIR).join(format!("{name}.{ext}"))
}

pub fn socket_path(pin_dir: &Path) -> PathBuf {
    run_file(pin_dir, "sock")
}

/// Ask the daemon serving `pin_dir` (blocking; for the CLI).
pub fn call(pin_dir: &Path, request: &Request) -> Result<Response, ControlError> {
    let path = socket_path(pin_dir);
    let io = |source| ControlError::Io {
        path: path.clone(),
        source,
    };
    let mut stream =
        std::os::unix::net::UnixStream::connect(&path).map_err(|source| ControlError::Connect {
            path: path.clone(),
            source,
        })?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    // A daemon at its cap of open requests accepts and closes at once: no answer at all.
    let closed = |e: &std::io::Error| {
        matches!(
            e.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        )
    };
    let no_answer = || ControlError::NoAnswer { path: path.clone() };
    let mut line = serde_json::to_vec(request).expect("a request serializes");
    line.push(b'\n');
    match stream.write_all(&line) {
        Err(e) if closed(&e) => return Err(no_answer()),
        r => r.map_err(io)?,
    }
    let mut answer = String::new();
    match BufReader::new(stream).read_line(&mut answer) {
        Ok(0) => return Err(no_answer()),
        Err(e) if closed(&e) => return Err(no_answer()),
        r => r.map_err(io)?,
    };
    serde_json::from_str(&answer).map_err(|e| ControlError::BadAnswer(format!("{e}: {answer:?}")))
}

/// Bind the control socket (replacing a stale one: the daemon lock proves none is live).
pub fn bind(pin_dir: &Path) -> Result<UnixListener, ControlError> {
    let path = socket_path(pin_dir);
    let err = |source| ControlError::Bind {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(RUN_DIR).map_err(err)?;
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(err(e)),
        _ => {}
    }
    let listener = UnixListener::bind(&path).map_err(err)?;
    // Anyone may ask; SO_PEERCRED and the token decide what they get.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).map_err(err)?;
    Ok(listener)
}

/// Serve control requests until the task is dropped.
pub async fn serve(listener: UnixListener, inputs: Arc<Inputs>) {
    // Each open request holds an fd for up to IO_TIMEOUT: bound them, so a local user cannot
    // exhaust the daemon's descriptors (and with them the proxy's accepts).
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    warn!("too many control requests at once; refusing one");
                    continue;
                };
                let inputs = inputs.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, &inputs).await {
                        warn!(error = %e, "control connection failed");
                    }
                    drop(slot);
                });
            }
            Err(e) => {
                warn!(error = %e, "control accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn answer(stream: UnixStream, inputs: &Inputs) -> std::io::Result<()> {
    let cred = stream.peer_cred()?;
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    let mut reader = tokio::io::BufReader::new(read.take(MAX_REQUEST as u64));
    tokio::time::timeout(IO_TIMEOUT, reader.read_until(b'\n', &mut line))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let caller = Caller {
        uid: cred.uid(),
        pid: cred.pid().and_then(|p| u32::try_from(p).ok()),
    };
    let response = match serde_json::from_slice::<Request>(&line) {
        Err(e) => Response::Error {
            message: format!("not a request this daemon understands: {e}"),
        },
        Ok(Request::Bind { pid, name, token }) => {
            let outcome = bind_agent(inputs, caller, pid, name, token).await;
            refused_on_error(inputs, caller, pid, outcome, |(cgroup, agent)| {
                Response::Bound { cgroup, agent }
            })
        }
        Ok(Request::Refresh { cgroup, token }) => {
            let outcome = refresh_agent(inputs, caller, &cgroup, &token).await;
            refused_on_error(inputs, caller, 0, outcome, |agent| Response::Refreshed {
                agent,
            })
        }
    };
    let mut out = serde_json::to_vec(&response).expect("a response serializes");
    out.push(b'\n');
    write.write_all(&out).await
}

/// The response for `outcome`; a refusal is logged and recorded as an audit event.
fn refused_on_error<T>(
    inputs: &Inputs,
    caller: Caller,
    pid: u32,
    outcome: Result<T, String>,
    ok: impl FnOnce(T) -> Response,
) -> Response {
    match outcome {
        Ok(v) => ok(v),
        Err(message) => {
            // Callers choose some of what is echoed (a cgroup name): keep log lines bounded.
            let message = truncate(message, 300);
            warn!(uid = caller.uid, caller_pid = ?caller.pid, pid, %message, "control request refused");
            inputs.sink.record(&SessionEvent::Audit {
                at_ms: now_ms(),
                audit: AuditEvent::BindRefused {
                    uid: caller.uid,
                    pid,
                    reason: message.clone(),
                },
            });
            Response::Error { message }
        }
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// Put a fresh token on an agent: same issuer and subject as the one it was bound with.
async fn refresh_agent(
    inputs: &Inputs,
    caller: Caller,
    cgroup: &str,
    token: &str,
) -> Result<AgentId, String> {
    let tree = inputs.agents.tree();
    caller_outside_tree(inputs, caller, "refresh identities")?;
    let cg = tree
        .agent_cgroup(cgroup)
        .ok_or_else(|| format!("no agent cgroup `{cgroup}`"))?;
    let id = cg
        .id()
        .ok_or_else(|| format!("agent cgroup `{cgroup}` is gone"))?;
    let current = tree
        .find(id)
        .and_then(|a| a.name.zip(a.oidc))
        .ok_or_else(|| format!("agent cgroup `{cgroup}` was not bound with a token"))?;
    let verifier = inputs
        .oidc
        .as_ref()
        .ok_or("this daemon has no `oidc` section in its configuration")?;
    let fresh = verifier.verify(token).await.map_err(|e| e.to_string())?;
    if fresh.expires_at_ms < current.1.expires_at_ms {
        // An older token (maybe with groups since removed) must not come back.
        return Err(
            "the new token expires before the one bound now: refusing an older token".into(),
        );
    }
    if fresh.issuer != current.1.issuer || fresh.subject != current.1.subject {
        return Err(format!(
            "the new token is for {} at {}, not {} at {}",
            fresh.subject, fresh.issuer, current.1.subject, current.1.issuer
        ));
    }
    let binding = Binding {
        name: current.0,
        oidc: Some(fresh),
    };
    cg.bind(&binding).map_err(|e| e.to_string())?;
    inputs.agents.forget(id);
    info!(cgroup, subject = %binding.oidc.as_ref().map_or("-", |o| o.subject.as_str()), "agent token refreshed");
    Ok(AgentId {
        name: Some(binding.name),
        cgroup: cgroup.to_string(),
        oidc: binding.oidc,
        binding_error: None,
    })
}

#[derive(Debug, Clone, Copy)]
struct Caller {
    uid: u32,
    pid: Option<u32>,
}

/// The checks and steps of a bind; the error is the message the caller sees.
async fn bind_agent(
    inputs: &Inputs,
    caller: Caller,
    pid: u32,
    name: Option<String>,
    token: Option<String>,
) -> Result<(String, AgentId), String> {
    let tree = inputs.agents.tree();
    let caller_pid = caller_outside_tree(inputs, caller, "start agents")?;
    // Pin the process now: a pidfd names this process and no other, whatever later happens to
    // its pid. The checks on it run again right before it is moved.
    let pinned = PidFd::open(pid).map_err(|_| format!("process {pid} does not exist"))?;
    check_child(caller, caller_pid, pid)?;
    let oidc = match (&token, &inputs.oidc) {
        (Some(_), None) => {
            return Err(
                "this daemon has no `oidc` section in its configuration, so it cannot check tokens"
                    .into(),
            );
        }
        (Some(t), Some(v)) => Some(v.verify(t).await.map_err(|e| e.to_string())?),
        (None, Some(v)) if v.config().require_token => {
            return Err(
                "this daemon requires an OIDC ID token for every agent (--token-file, or CHAPERONE_ID_TOKEN)"
                    .into(),
            );
        }
        (None, _) if caller.uid != 0 => {
            return Err(
                "only root may start an agent without an OIDC ID token (--token-file, or CHAPERONE_ID_TOKEN)"
                    .into(),
            );
        }
        (None, _) => None,
    };
    let binding = binding_for(name, oidc)?;
    let cgroup = tree
        .new_agent_cgroup(&binding, pid)
        .map_err(|e| e.to_string())?;
    let placed = crate::redirect::verify_attached(&inputs.config.pin_dir, cgroup.path())
        .map_err(|e| format!("{e}; refusing to run an agent unintercepted"))
        .and_then(|()| move_pinned(tree, &cgroup, &pinned, caller, caller_pid, pid));
    if let Err(e) = placed {
        cgroup.remove_if_empty();
        return Err(e);
    }
    let relative = cgroup
        .path()
        .strip_prefix(tree.root())
        .unwrap_or(cgroup.path())
        .display()
        .to_string();
    let agent = AgentId {
        name: Some(binding.name),
        cgroup: relative.clone(),
        oidc: binding.oidc,
        binding_error: None,
    };
    info!(
        pid,
        uid = caller.uid,
        agent = agent.name.as_deref().unwrap_or("-"),
        subject = agent.oidc.as_ref().map_or("-", |o| o.subject.as_str()),
        groups = ?agent.oidc.as_ref().map(|o| &o.groups),
        cgroup = %relative,
        "agent bound"
    );
    inputs.sink.record(&SessionEvent::Audit {
        at_ms: now_ms(),
        audit: AuditEvent::AgentBound {
            uid: caller.uid,
            pid,
            agent: agent.clone(),
        },
    });
    Ok((relative, agent))
}

/// The identity a bind gets: with a token, the token's verified email (else subject), and
/// `--as` may only repeat one of those; without one, `--as`.
fn binding_for(name: Option<String>, oidc: Option<Vouched>) -> Result<Binding, String> {
    match oidc {
        Some(o) => {
            // Without a verified email the name is `sub:<subject>`: `:` is refused in names
            // given by `--as` and in service identities, so a subject can never collide with
            // one of those (grants for such agents are best written with `subject:`).
            let own = o
                .email
                .clone()
                .unwrap_or_else(|| format!("sub:{}", o.subject));
            if let Some(n) = name
                && n != o.subject
                && Some(&n) != o.email.as_ref()
            {
                return Err(format!(
                    "--as {n} does not match the token, which is for {own} (subject {})",
                    o.subject
                ));
            }
            Ok(Binding {
                name: own,
                oidc: Some(o),
            })
        }
        None => {
            let name = name.ok_or("--as NAME is required without a token")?;
            if name.contains(':') {
                return Err(format!(
                    "--as {name}: names with `:` are reserved for OIDC subjects"
                ));
            }
            Ok(Binding { name, oidc: None })
        }
    }
}

/// The caller's pid, if it runs wholly outside the agent tree (every thread; a zombie leader
/// hides where its threads are, so it is refused too).
fn caller_outside_tree(inputs: &Inputs, caller: Caller, what: &str) -> Result<u32, String> {
    let caller_pid = caller
        .pid
        .ok_or("the caller's process id is unknown (SO_PEERCRED)")?;
    let zombie = ProcStatus::read(caller_pid).is_none_or(|s| s.state == "Z");
    if zombie || inputs.agents.tree().contains_pid(caller_pid) {
        return Err(format!(
            "agents cannot {what}: the caller runs inside the agent tree"
        ));
    }
    Ok(caller_pid)
}

/// The fields of `/proc/<pid>/status` the checks need.
struct ProcStatus {
    state: String,
    tgid: String,
    ppid: String,
    uids: Vec<String>,
    threads: String,
}

impl ProcStatus {
    fn read(pid: u32) -> Option<Self> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|rest| {
                    rest.split_whitespace()
                        .map(str::to_string)
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        };
        let first = |name: &str| field(name).into_iter().next().unwrap_or_default();
        Some(Self {
            state: first("State:"),
            tgid: first("Tgid:"),
            ppid: first("PPid:"),
            uids: field("Uid:"),
            threads: first("Threads:"),
        })
    }
}

/// `pid` must be the caller's own child, a single-threaded process (not a thread id, not a
/// zombie), with the caller's user ids: nobody binds (and so moves) another user's process,
/// an unrelated one, or a thread of one.
fn check_child(caller: Caller, caller_pid: u32, pid: u32) -> Result<(), String> {
    let st = ProcStatus::read(pid).ok_or_else(|| format!("process {pid} does not exist"))?;
    if st.tgid != pid.to_string() || st.state == "Z" || st.threads != "1" {
        return Err(format!(
            "process {pid} must be a live, single-threaded process (not a thread or a zombie)"
        ));
    }
    if st.ppid != caller_pid.to_string() {
        return Err(format!("process {pid} is not a child of the caller"));
    }
    // Real, effective, saved and filesystem uid must all be the caller's.
    if st.uids.len() != 4 || st.uids.iter().any(|u| u != &caller.uid.to_string()) {
        return Err(format!("process {pid} does not run as the caller's user"));
    }
    Ok(())
}

/// A pidfd: a handle on one process that its pid's reuse cannot redirect.
struct PidFd(std::os::fd::OwnedFd);

impl PidFd {
    fn open(pid: u32) -> std::io::Result<Self> {
        // SAFETY: pidfd_open(2) returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd we own.
        Ok(Self(unsafe {
            std::os::fd::FromRawFd::from_raw_fd(fd as std::os::fd::RawFd)
        }))
    }

    /// Whether the process is still alive (signal 0 through the pidfd).
    fn alive(&self) -> bool {
        use std::os::fd::AsRawFd;
        // SAFETY: pidfd_send_signal(2) with signal 0 only checks.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                0,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            ) == 0
        }
    }
}

/// Move the pinned process into `cgroup`, checking right before that it is still the caller's
/// live child outside the tree, and right after that it was really it that moved: if it died
/// and its pid went to another process in between, that process is put back where the pid
/// was, and the bind refused.
fn move_pinned(
    tree: &crate::identity::AgentTree,
    cgroup: &crate::identity::AgentCgroup,
    pinned: &PidFd,
    caller: Caller,
    caller_pid: u32,
    pid: u32,
) -> Result<(), String> {
    check_child(caller, caller_pid, pid)?;
    if tree.contains_pid(pid) {
        return Err(format!("process {pid} already runs inside the agent tree"));
    }
    if !pinned.alive() {
        return Err(format!("process {pid} exited before it could be bound"));
    }
    let before = crate::identity::cgroup_of(pid);
    cgroup.adopt(pid).map_err(|e| e.to_string())?;
    if !pinned.alive() {
        tracing::error!(
            pid,
            "the process to bind exited while it was moved; putting back what moved"
        );
        if let Some(dir) = before {
            let _ = std::fs::write(dir.join("cgroup.procs"), pid.to_string());
        }
        return Err(format!("process {pid} exited while it was being bound"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vouched(email: Option<&str>) -> Vouched {
        Vouched {
            issuer: "https://id".into(),
            subject: "u-1".into(),
            email: email.map(str::to_string),
            groups: vec!["g".into()],
            expires_at_ms: 1,
        }
    }

    #[test]
    fn names_come_from_the_token() {
        let b = binding_for(None, Some(vouched(Some("a@x")))).unwrap();
        assert_eq!(b.name, "a@x");
        assert_eq!(
            binding_for(None, Some(vouched(None))).unwrap().name,
            "sub:u-1"
        );
        assert!(
            binding_for(Some("sub:u-1".into()), None).is_err(),
            "reserved"
        );
        assert!(binding_for(Some("u-1".into()), Some(vouched(Some("a@x")))).is_ok());
        assert!(binding_for(Some("a@x".into()), Some(vouched(Some("a@x")))).is_ok());
        let e = binding_for(Some("admin".into()), Some(vouched(Some("a@x")))).unwrap_err();
        assert!(e.contains("does not match the token"), "{e}");
        assert_eq!(
            binding_for(Some("local".into()), None).unwrap().name,
            "local"
        );
        assert!(binding_for(None, None).is_err());
    }

    #[test]
    fn wire_format() {
        let r: Request = serde_json::from_str(r#"{"op":"bind","pid":7,"name":"a"}"#).unwrap();
        assert!(matches!(
            r,
            Request::Bind {
                pid: 7,
                token: None,
                ..
            }
        ));
        let a = serde_json::to_string(&Response::Error {
            message: "no".into(),
        })
        .unwrap();
        assert_eq!(a, r#"{"result":"error","message":"no"}"#);
    }

    #[test]
    fn only_own_single_threaded_children() {
        let me = std::process::id();
        // SAFETY: getuid has no preconditions.
        let caller = Caller {
            uid: unsafe { libc::getuid() },
            pid: Some(me),
        };
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        assert_eq!(check_child(caller, me, child.id()), Ok(()));
        // Not our child (pid 1), a multi-threaded process (this test runner), a pid in use by
        // no one, a child of another user.
        assert!(check_child(caller, me, 1).is_err());
        let e = check_child(caller, me, me).unwrap_err();
        assert!(
            e.contains("single-threaded") || e.contains("not a child"),
            "{e}"
        );
        assert!(
            check_child(caller, me, u32::MAX)
                .unwrap_err()
                .contains("does not exist")
        );
        let stranger = Caller {
            uid: caller.uid + 1,
            pid: Some(me),
        };
        assert!(
            check_child(stranger, me, child.id())
                .unwrap_err()
                .contains("caller's user")
        );
        let _ = child.kill();
        let _ = child.wait();
    }
}
