//! Protocol dispatch: once a session is allowed and its upstream dialed, the target's protocol
//! decides how bytes are carried. Today that is [`tcp`] (opaque relay); protocols that decode
//! (PostgreSQL next) plug in here behind the phase seam sketched in docs/ARCHITECTURE.md.

pub mod tcp;

use crate::{config::ProtocolKind, record::SessionRecorder};
use tokio::net::TcpStream;

/// Carry an allowed session between the agent and its upstream until it ends, counting bytes
/// into the recorder.
pub async fn serve(
    kind: ProtocolKind,
    client: TcpStream,
    upstream: TcpStream,
    rec: &mut SessionRecorder,
) -> std::io::Result<()> {
    match kind {
        ProtocolKind::Tcp => tcp::relay(client, upstream, &mut rec.bytes_up, &mut rec.bytes_down).await,
    }
}

/// Protocol name as recorded.
pub fn name(kind: ProtocolKind) -> &'static str {
    match kind {
        ProtocolKind::Tcp => "tcp",
    }
}
