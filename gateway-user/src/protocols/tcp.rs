//! Opaque pass-through: bytes both ways, untouched, verdict taken once at connect time.
//!
//! Half-close is preserved (an EOF from one side becomes a `shutdown(SHUT_WR)` on the other,
//! and the other direction keeps flowing), back-pressure is the socket's own (a direction reads
//! again only after its last write completed), and byte counts survive errors.

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

/// Per-direction buffer: 64 KiB measured ~2x the throughput of 8 KiB on this hardware.
const BUF: usize = 64 * 1024;

/// Relay until both directions have closed, or either fails. `up` (agent to upstream) and
/// `down` are counted as bytes move, so they are right after an error or a cancellation too.
pub async fn relay(
    client: TcpStream,
    upstream: TcpStream,
    up: &mut u64,
    down: &mut u64,
) -> std::io::Result<()> {
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    // On the first error try_join drops the other direction, closing both sockets.
    tokio::try_join!(pump(cr, uw, up), pump(ur, cw, down)).map(drop)
}

async fn pump<R, W>(mut r: R, mut w: W, count: &mut u64) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return w.shutdown().await;
        }
        w.write_all(&buf[..n]).await?;
        *count += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        (c, l.accept().await.unwrap().0)
    }

    #[tokio::test]
    async fn relays_both_ways_with_half_close() {
        let (mut agent, proxy_client_side) = pair().await;
        let (proxy_upstream_side, mut server) = pair().await;
        let relay = tokio::spawn(async move {
            let (mut up, mut down) = (0, 0);
            let r = relay(proxy_client_side, proxy_upstream_side, &mut up, &mut down).await;
            (r, (up, down))
        });
        agent.write_all(b"hello").await.unwrap();
        agent.shutdown().await.unwrap(); // half-close: the server must see EOF...
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");
        // ...and can still answer after it.
        server.write_all(&vec![7u8; 200_000]).await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        agent.read_to_end(&mut back).await.unwrap();
        assert_eq!(back.len(), 200_000);
        let (r, counts) = relay.await.unwrap();
        r.unwrap();
        assert_eq!(counts, (5, 200_000));
    }
}
