//! Session records: what happened on each intercepted connection, behind a [`RecordSink`].
//!
//! A [`SessionRecorder`] writes a `start` event when the connection's verdict is known and an
//! `end` event when it is dropped, so sessions that end early (denied, upstream unreachable, the
//! task cancelled at shutdown) are recorded too. The JSON-lines file sink is the machine-readable
//! form `chaperone sessions` and later tooling read; every event also goes to the daemon's log.
//!
//! Records carry metadata only: never a credential, never payload bytes. Masking is counted
//! (which rule, how many values, which kinds), never the value.

use crate::{identity::AgentId, mask::MaskCounts, redirect::OriginalDst};
use serde::{Deserialize, Serialize};
use std::{
    collections::BTreeMap,
    fs::{File, OpenOptions},
    io::Write,
    net::SocketAddr,
    os::unix::fs::OpenOptionsExt,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("opening the session log {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
}

/// A session's id: unique within a daemon's life, ordered by start, shown as 16 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SessionId(pub u64);

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Hands out session ids. Seeded from the clock so ids from successive daemon runs that share
/// one log file do not repeat.
#[derive(Debug)]
pub struct SessionIds(AtomicU64);

impl Default for SessionIds {
    fn default() -> Self {
        Self(AtomicU64::new(now_ms() << 16))
    }
}

impl SessionIds {
    pub fn next(&self) -> SessionId {
        SessionId(self.0.fetch_add(1, Ordering::Relaxed))
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The connect-time verdict, as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordedVerdict {
    Allow,
    Deny,
}

/// Everything known about a session when its verdict is taken.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionInfo {
    pub id: SessionId,
    pub agent: Option<AgentId>,
    /// The agent socket's own address (the proxy's peer).
    pub client: SocketAddr,
    pub original_dst: OriginalDst,
    pub target: Option<String>,
    pub protocol: String,
    pub verdict: RecordedVerdict,
    /// Why: the rule or default that decided.
    pub reason: String,
    pub started_at_ms: u64,
}

/// One line of the session log.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum SessionEvent {
    Start {
        #[serde(flatten)]
        session: SessionInfo,
    },
    End {
        #[serde(flatten)]
        session: SessionInfo,
        ended_at_ms: u64,
        /// Bytes from agent to upstream.
        bytes_up: u64,
        /// Bytes from upstream to agent.
        bytes_down: u64,
        /// Statements judged (protocols that decode statements; 0 for raw TCP).
        #[serde(default)]
        statements_allowed: u64,
        #[serde(default)]
        statements_denied: u64,
        /// Values masked on their way to the agent: per rule, per kind (absent: none).
        #[serde(default, skip_serializing_if = "Masked::is_empty")]
        masked: Masked,
        error: Option<String>,
    },
    /// Something the daemon did or refused outside a session: agents bound, binds refused,
    /// grants expired.
    Audit {
        at_ms: u64,
        #[serde(flatten)]
        audit: AuditEvent,
    },
}

/// What an audit event is about.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "audit", rename_all = "snake_case")]
pub enum AuditEvent {
    /// `chaperone run` (caller `uid`) had process `pid` bound as `agent`.
    AgentBound { uid: u32, pid: u32, agent: AgentId },
    /// A bind was refused (bad or expired token, wrong caller, ...).
    BindRefused { uid: u32, pid: u32, reason: String },
    /// A grant reached its `expires` time and stopped applying.
    GrantExpired { grant: String, expires: String },
    /// The configuration was read again (SIGHUP or a file change) and its policy put in force.
    PolicyReloaded { trigger: String, grants: usize },
    /// A reload was refused (the file did not load); the previous policy stays in force.
    PolicyReloadFailed { trigger: String, error: String },
}

/// Where session events go. Implementations must not block for long: they run on the data path.
pub trait RecordSink: Send + Sync {
    fn record(&self, event: &SessionEvent);
}

/// Appends one JSON object per line to a file only root can read.
pub struct JsonlSink {
    file: Mutex<File>,
}

impl JsonlSink {
    pub fn open(path: &Path) -> Result<Self, RecordError> {
        let open_err = |source| RecordError::Open {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(open_err)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(open_err)?;
        Ok(Self {
            file: Mutex::new(file),
        })
    }
}

impl RecordSink for JsonlSink {
    fn record(&self, event: &SessionEvent) {
        let mut line = match serde_json::to_vec(event) {
            Ok(l) => l,
            Err(e) => return tracing::error!(error = %e, "cannot serialize a session event"),
        };
        line.push(b'\n');
        // One write_all per line under the lock: lines never interleave.
        if let Err(e) = self.file.lock().unwrap().write_all(&line) {
            tracing::error!(error = %e, "cannot append to the session log");
        }
    }
}

/// Records one session: `start` now, `end` when dropped.
pub struct SessionRecorder {
    sink: Arc<dyn RecordSink>,
    info: SessionInfo,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub statements_allowed: u64,
    pub statements_denied: u64,
    pub masked: MaskCounts,
    pub error: Option<String>,
}

/// What masking did in a session, as recorded: how many values, per rule and per kind. Counts
/// only, never a value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Masked {
    /// Values with at least one finding (or withheld whole).
    pub values: u64,
    /// Values per rule: a rule's name, `masking.rules[i]`, or `builtin:<kind>`.
    pub by_rule: BTreeMap<String, u64>,
    /// Findings per kind (`column`: a whole value under a column rule, or withheld).
    pub by_kind: BTreeMap<String, u64>,
}

impl Masked {
    fn is_empty(&self) -> bool {
        self.values == 0
    }
}

impl From<&MaskCounts> for Masked {
    fn from(c: &MaskCounts) -> Self {
        Self {
            values: c.values,
            by_rule: c.by_rule.iter().map(|(r, n)| (r.to_string(), *n)).collect(),
            by_kind: c.by_kind.iter().map(|(k, n)| (k.to_string(), *n)).collect(),
        }
    }
}

impl SessionRecorder {
    pub fn start(sink: Arc<dyn RecordSink>, info: SessionInfo) -> Self {
        tracing::info!(
            target = info.target.as_deref().unwrap_or("-"),
            dst = %info.original_dst.addr,
            pid = info.original_dst.pid,
            comm = %info.original_dst.comm,
            verdict = ?info.verdict,
            reason = %info.reason,
            "session start"
        );
        sink.record(&SessionEvent::Start {
            session: info.clone(),
        });
        Self {
            sink,
            info,
            bytes_up: 0,
            bytes_down: 0,
            statements_allowed: 0,
            statements_denied: 0,
            masked: MaskCounts::default(),
            error: None,
        }
    }
}

impl Drop for SessionRecorder {
    fn drop(&mut self) {
        tracing::info!(
            bytes_up = self.bytes_up,
            bytes_down = self.bytes_down,
            statements_allowed = self.statements_allowed,
            statements_denied = self.statements_denied,
            values_masked = self.masked.values,
            error = self.error.as_deref().unwrap_or(""),
            "session end"
        );
        self.sink.record(&SessionEvent::End {
            session: self.info.clone(),
            ended_at_ms: now_ms(),
            bytes_up: self.bytes_up,
            bytes_down: self.bytes_down,
            statements_allowed: self.statements_allowed,
            statements_denied: self.statements_denied,
            masked: Masked::from(&self.masked),
            error: self.error.take(),
        });
    }
}

/// Read a session log back (for `chaperone sessions`); lines that do not parse are skipped and
/// counted.
pub fn read_log(path: &Path) -> std::io::Result<(Vec<SessionEvent>, usize)> {
    let text = std::fs::read_to_string(path)?;
    let mut bad = 0;
    let events = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| serde_json::from_str(l).map_err(|_| bad += 1).ok())
        .collect();
    Ok((events, bad))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> SessionInfo {
        SessionInfo {
            id: SessionId(7),
            agent: Some(AgentId {
                name: Some("a".into()),
                cgroup: "run-1".into(),
                oidc: None,
                binding_error: None,
            }),
            client: "127.0.0.1:40000".parse().unwrap(),
            original_dst: OriginalDst {
                addr: "127.0.0.2:80".parse().unwrap(),
                pid: 1,
                uid: 0,
                comm: "curl".into(),
                cgroup_id: 9,
            },
            target: None,
            protocol: "tcp".into(),
            verdict: RecordedVerdict::Deny,
            reason: "unlisted: deny".into(),
            started_at_ms: 1,
        }
    }

    #[test]
    fn recorder_writes_start_then_end_and_log_reads_back() {
        let dir = std::env::temp_dir().join(format!("chaperone-rec-{}", std::process::id()));
        let path = dir.join("s.jsonl");
        let sink: Arc<dyn RecordSink> = Arc::new(JsonlSink::open(&path).unwrap());
        {
            let mut r = SessionRecorder::start(sink, info());
            r.bytes_up = 3;
            r.error = Some("boom".into());
            let m = crate::mask::Masker::new(
                &Default::default(),
                crate::mask::TokenKey::from_bytes([1; 32]),
            )
            .unwrap();
            let col = m.column(&crate::mask::Column::default());
            r.masked.add(&col.mask(b"a@b.io"));
            r.masked.add(&col.withheld(4));
        }
        std::fs::write(dir.join("junk"), "").unwrap();
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("not json\n");
        std::fs::write(&path, text).unwrap();
        let (events, bad) = read_log(&path).unwrap();
        assert_eq!(bad, 1);
        assert!(
            matches!(&events[0], SessionEvent::Start { session } if session.id == SessionId(7))
        );
        match &events[1] {
            SessionEvent::End {
                bytes_up,
                error,
                session,
                masked,
                ..
            } => {
                assert_eq!(*bytes_up, 3);
                assert_eq!(error.as_deref(), Some("boom"));
                assert_eq!(masked.values, 2);
                assert_eq!(masked.by_rule["builtin:email"], 1);
                assert_eq!(masked.by_kind["column"], 1);
                assert_eq!(session.original_dst.comm, "curl");
            }
            e => panic!("expected end, got {e:?}"),
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn session_ids_are_unique_and_hex() {
        let ids = SessionIds::default();
        let (a, b) = (ids.next(), ids.next());
        assert_ne!(a, b);
        assert_eq!(a.to_string().len(), 16);
    }

    #[test]
    fn audit_events_read_back() {
        for audit in [
            AuditEvent::PolicyReloaded {
                trigger: "SIGHUP".into(),
                grants: 2,
            },
            AuditEvent::GrantExpired {
                grant: "g".into(),
                expires: "x".into(),
            },
        ] {
            let line = serde_json::to_string(&SessionEvent::Audit { at_ms: 1, audit }).unwrap();
            assert!(line.contains(r#""event":"audit""#), "{line}");
            let back: Result<SessionEvent, _> = serde_json::from_str(&line);
            assert!(back.is_ok(), "{line}: {back:?}");
        }
    }
}
