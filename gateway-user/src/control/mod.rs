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
    identity::{AgentId, Binding, IdentityError, Vouched},
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
    let mut line = serde_json::to_vec(request).expect("a request serializes");
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(io)?;
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
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let inputs = inputs.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, &inputs).await {
                        warn!(error = %e, "control connection failed");
                    }
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

/// Put a fresh token on an agent: same issuer and subject as the one it was bound with.
async fn refresh_agent(
    inputs: &Inputs,
    caller: Caller,
    cgroup: &str,
    token: &str,
) -> Result<AgentId, String> {
    let tree = inputs.agents.tree();
    let caller_pid = caller
        .pid
        .ok_or("the caller's process id is unknown (SO_PEERCRED)")?;
    if tree.contains_pid(caller_pid) {
        return Err(
            "agents cannot refresh identities: the caller runs inside the agent tree".into(),
        );
    }
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
    let caller_pid = caller
        .pid
        .ok_or("the caller's process id is unknown (SO_PEERCRED)")?;
    if tree.contains_pid(caller_pid) {
        return Err("agents cannot start agents: the caller runs inside the agent tree".into());
    }
    check_child(caller, caller_pid, pid)?;
    if tree.contains_pid(pid) {
        return Err(format!("process {pid} already runs inside the agent tree"));
    }
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
        .and_then(|()| cgroup.adopt(pid).map_err(|e: IdentityError| e.to_string()));
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
            let own = o.email.clone().unwrap_or_else(|| o.subject.clone());
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
        None => Ok(Binding {
            name: name.ok_or("--as NAME is required without a token")?,
            oidc: None,
        }),
    }
}

/// `pid` must be the caller's own child, with the caller's user ids: nobody binds (and so moves)
/// another user's process, or an unrelated one.
fn check_child(caller: Caller, caller_pid: u32, pid: u32) -> Result<(), String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|_| format!("process {pid} does not exist"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|rest| {
                rest.split_whitespace()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    let ppid = field("PPid:");
    let uids = field("Uid:");
    if ppid.first().map(String::as_str) != Some(caller_pid.to_string().as_str()) {
        return Err(format!("process {pid} is not a child of the caller"));
    }
    // Real, effective, saved and filesystem uid must all be the caller's.
    if uids.len() != 4 || uids.iter().any(|u| u != &caller.uid.to_string()) {
        return Err(format!("process {pid} does not run as the caller's user"));
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
        assert_eq!(binding_for(None, Some(vouched(None))).unwrap().name, "u-1");
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
    fn only_own_children() {
        // This test process is not its own child.
        let me = std::process::id();
        let caller = Caller {
            uid: 0,
            pid: Some(me),
        };
        assert!(
            check_child(caller, me, me)
                .unwrap_err()
                .contains("not a child")
        );
        assert!(
            check_child(caller, me, u32::MAX)
                .unwrap_err()
                .contains("does not exist")
        );
    }
}
