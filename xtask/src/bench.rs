//! `cargo xtask bench relay`: the cost of interception, measured against a direct connection in
//! the same run on the same machine. Figures, not pass/fail: benchmarks never gate tests.
//!
//! - new short connection: connect, 1-byte round trip, close; 2,000 sequential; p50 and p99
//! - bulk: one connection streams 2 GiB to a sink; GB/s
//!
//! The same client code runs twice: once directly, once as an agent (`chaperone run`), against
//! the same servers, with a release-built daemon.

use anyhow::{Context as _, Result, bail};
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
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64() * 1e6;
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
    v.try_into().map_err(|_| anyhow::anyhow!("client printed `{text}`"))
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
    let client_args = ["bench-client".to_string(), echo.to_string(), sink.to_string()];

    let direct = Command::new(me).args(&client_args).output()?;
    if !direct.status.success() {
        bail!("direct client failed: {}", String::from_utf8_lossy(&direct.stderr));
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
        .args(["--config", config.to_str().unwrap(), "run", "--as", "bench", "--user", "nobody", "--"])
        .arg(me)
        .args(&client_args)
        .output()?;
    drop(daemon);
    let _ = Command::new(chaperone)
        .args(["--config", config.to_str().unwrap(), "daemon", "--uninstall"])
        .output();
    if !via.status.success() {
        bail!("client as agent failed: {}", String::from_utf8_lossy(&via.stderr));
    }
    let via = parse(&via.stdout)?;

    println!("\nrelay benchmark ({SHORT_CONNS} short connections, {} GiB bulk; same run, same machine)", BULK_BYTES >> 30);
    println!("{:<34} {:>10} {:>12} {:>12}", "", "direct", "chaperone", "difference");
    println!("{:<34} {:>10.1} {:>12.1} {:>+11.1}", "connect+1B round trip p50 (µs)", direct[0], via[0], via[0] - direct[0]);
    println!("{:<34} {:>10.1} {:>12.1} {:>+11.1}", "connect+1B round trip p99 (µs)", direct[1], via[1], via[1] - direct[1]);
    println!("{:<34} {:>10.2} {:>12.2} {:>10.0} %", "bulk throughput (GB/s)", direct[2], via[2], via[2] / direct[2] * 100.0);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
