//! Protocol dispatch: once a session is allowed, the target's protocol decides how it is
//! carried. [`tcp`] relays opaque bytes (verdict at connect time only); [`postgres`] decodes the
//! wire protocol and has every statement judged. Protocols describe; `policy` decides.

pub mod postgres;
pub mod tcp;

use crate::{
    config::{ProtocolKind, Target},
    identity::AgentId,
    policy::{PolicyStore, Refusal},
    record::SessionRecorder,
};
use std::{net::SocketAddr, time::Duration};
use tokio::net::TcpStream;

/// How long an upstream may take to accept before the session fails.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("upstream {addr}: {reason}")]
    Dial { addr: SocketAddr, reason: String },
    #[error("relay: {0}")]
    Relay(#[from] std::io::Error),
    #[error(transparent)]
    Postgres(#[from] postgres::PgSessionError),
}

/// Everything a protocol needs about the session it carries.
pub struct Session<'a> {
    pub kind: ProtocolKind,
    pub target: Option<&'a Target>,
    pub upstream: SocketAddr,
    pub agent: Option<&'a AgentId>,
    pub policy: &'a PolicyStore,
    pub pg: &'a postgres::Shared,
    /// Policy refused the connection: protocols that can say why do (PostgreSQL answers the
    /// startup with a FATAL error); the rest reset it.
    pub refusal: Option<&'a Refusal>,
    /// The agent as it is now (its binding may be refreshed while the session runs).
    pub current_agent: &'a (dyn Fn() -> Option<AgentId> + Sync),
    /// Masks PostgreSQL results (`None`: they pass unmasked). Chosen per session, so rules can
    /// differ per grant.
    pub masker: Option<&'a crate::mask::Masker>,
}

/// Carry an allowed session until it ends, counting into the recorder.
pub async fn serve(
    s: &Session<'_>,
    client: TcpStream,
    rec: &mut SessionRecorder,
) -> Result<(), ProtocolError> {
    match (s.kind, s.target) {
        (ProtocolKind::Postgres, Some(target)) => {
            let pg = postgres::Session {
                target,
                upstream: s.upstream,
                agent: s.agent,
                policy: s.policy,
                shared: s.pg,
                refusal: s.refusal,
                current_agent: s.current_agent,
                masker: s.masker,
            };
            Ok(postgres::serve(&pg, client, rec).await?)
        }
        _ if s.refusal.is_some() => {
            refuse(&client);
            Ok(())
        }
        _ => {
            let upstream = dial(s.upstream).await.inspect_err(|_| refuse(&client))?;
            Ok(tcp::relay(client, upstream, &mut rec.bytes_up, &mut rec.bytes_down).await?)
        }
    }
}

async fn dial(addr: SocketAddr) -> Result<TcpStream, ProtocolError> {
    let reason =
        match tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer in {UPSTREAM_CONNECT_TIMEOUT:?}"),
        };
    Err(ProtocolError::Dial { addr, reason })
}

/// Make the agent's already-established connection fail at once (a reset) when it is dropped.
pub fn refuse(stream: &TcpStream) {
    reset_on_close(std::os::fd::AsRawFd::as_raw_fd(stream));
}

/// Have the socket behind `fd` send a reset, not a FIN, when it is closed (SO_LINGER 0): an abort
/// must reach the peer as an abort. Works under TLS too, where the TcpStream is wrapped.
pub fn reset_on_close(fd: std::os::fd::RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket fd the caller keeps open, with a correctly sized struct.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Protocol name as recorded.
pub fn name(kind: ProtocolKind) -> &'static str {
    match kind {
        ProtocolKind::Tcp => "tcp",
        ProtocolKind::Postgres => "postgres",
    }
}
