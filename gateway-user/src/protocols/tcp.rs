//! Opaque pass-through: bytes both ways, untouched, verdict taken once at connect time.
//!
//! Zero-copy: each direction moves bytes socket → pipe → socket with splice(2), so payload never
//! enters user space. Half-close is preserved (an EOF from one side becomes a
//! `shutdown(SHUT_WR)` on the other, and the other direction keeps flowing), back-pressure is
//! the sockets' own (a direction reads again only once its pipe is drained into the peer), and
//! byte counts survive errors and cancellation.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};
use tokio::{io::Interest, net::TcpStream};

/// Bytes moved per splice; the pipe is sized to match.
const CHUNK: usize = 256 * 1024;

/// Relay until both directions have closed, or either fails. `up` (agent to upstream) and
/// `down` are counted as bytes move, so they are right after an error or a cancellation too.
pub async fn relay(
    client: TcpStream,
    upstream: TcpStream,
    up: &mut u64,
    down: &mut u64,
) -> io::Result<()> {
    // On the first error try_join drops the other direction; the sockets close when we return.
    let result =
        tokio::try_join!(pump(&client, &upstream, up), pump(&upstream, &client, down)).map(drop);
    if result.is_err() {
        // An abort on one side must reach the other as an abort (RST), not as a clean FIN that
        // would make a truncated, close-delimited response look complete.
        let _ = client.set_zero_linger();
        let _ = upstream.set_zero_linger();
    }
    result
}

async fn pump(src: &TcpStream, dst: &TcpStream, count: &mut u64) -> io::Result<()> {
    let pipe = Pipe::new()?;
    loop {
        let n = io_when_ready(src, Interest::READABLE, || {
            splice(src.as_raw_fd(), pipe.write.as_raw_fd(), CHUNK)
        })
        .await?;
        if n == 0 {
            // SAFETY: shutdown on a socket fd we borrow for the call.
            if unsafe { libc::shutdown(dst.as_raw_fd(), libc::SHUT_WR) } != 0 {
                let e = io::Error::last_os_error();
                // The peer may already be gone; that is the other direction's error to report.
                if e.raw_os_error() != Some(libc::ENOTCONN) {
                    return Err(e);
                }
            }
            return Ok(());
        }
        let mut left = n;
        while left > 0 {
            let m = io_when_ready(dst, Interest::WRITABLE, || {
                splice(pipe.read.as_raw_fd(), dst.as_raw_fd(), left)
            })
            .await?;
            left -= m;
            *count += m as u64;
        }
    }
}

/// Run a non-blocking syscall on `s` once it is ready for `interest`, retrying on EAGAIN
/// (tokio clears the readiness it had cached).
async fn io_when_ready(
    s: &TcpStream,
    interest: Interest,
    mut f: impl FnMut() -> io::Result<usize>,
) -> io::Result<usize> {
    loop {
        s.ready(interest).await?;
        match s.try_io(interest, &mut f) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain splice between fds we hold; null offsets (sockets and pipes have none).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A non-blocking pipe, the kernel-side buffer of one direction.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two fds we then own.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh fds from pipe2.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // Best effort: a smaller pipe (pipe-max-size, or an unprivileged user's quota) still works.
        // SAFETY: fcntl on an fd we own.
        unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, CHUNK as libc::c_int) };
        Ok(Self { read, write })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        (c, l.accept().await.unwrap().0)
    }

    #[tokio::test]
    async fn an_upstream_reset_reaches_the_agent_as_a_reset() {
        let (mut agent, proxy_client_side) = pair().await;
        let (proxy_upstream_side, server) = pair().await;
        let relay = tokio::spawn(async move {
            let (mut up, mut down) = (0, 0);
            relay(proxy_client_side, proxy_upstream_side, &mut up, &mut down).await
        });
        let mut server = server;
        server.write_all(b"partial").await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        server.set_zero_linger().unwrap();
        drop(server); // RST
        assert!(relay.await.unwrap().is_err());
        let mut buf = Vec::new();
        let err = loop {
            let mut chunk = [0u8; 64];
            match agent.read(&mut chunk).await {
                Ok(0) => panic!("clean EOF after an upstream reset; got {buf:?}"),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
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
