//! Interception end to end (issue 2): real servers on loopback, the real daemon, unmodified
//! clients started with `chaperone run`.

use chaperone_tests::{
    DaemonOptions, EchoServer, LineAgent, OutputBounded, TestDaemon, UdpSink, assert_ok, last_json,
    skip_unless_root,
};
use serde_json::Value;
use std::{io::Read, net::TcpStream, time::Duration};

/// A python3 agent: connects to each `host port` pair given, sends a payload, reads the echo,
/// and prints one JSON line with what it saw (pid, peer per connection, or the error).
const PY_CONNECT: &str = r#"
import json, os, socket, sys
def probe(args):
    out = {"pid": os.getpid(), "conns": []}
    for host, port in zip(args[::2], args[1::2]):
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(10)
        r = {"host": host, "port": int(port)}
        try:
            s.connect((host, int(port)))
            p = s.getpeername()
            r["peer"] = [p[0], p[1]]
            msg = ("ping %s %s" % (host, port)).encode()
            s.sendall(msg)
            got = b""
            while len(got) < len(msg):
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
            r["echo_ok"] = got == msg
            r["sent"] = len(msg)
        except OSError as e:
            r["error"] = type(e).__name__
            r["errno"] = e.errno
        finally:
            s.close()
        out["conns"].append(r)
    return out
if sys.argv[1:2] == ["--loop"]:
    # One probe per line of stdin ("host port host port ..."), one JSON line back each.
    for line in sys.stdin:
        print(json.dumps(probe(line.split())), flush=True)
else:
    print(json.dumps(probe(sys.argv[1:])))
"#;

fn targets(list: &[(&str, &EchoServer)]) -> Vec<(String, String, u16)> {
    list.iter()
        .map(|(name, s)| (name.to_string(), s.addr.ip().to_string(), s.addr.port()))
        .collect()
}

fn py_connect(d: &TestDaemon, agent: &str, dests: &[(&str, u16)]) -> Value {
    let mut args = vec!["python3".to_string(), "-c".into(), PY_CONNECT.into()];
    for (h, p) in dests {
        args.push(h.to_string());
        args.push(p.to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    last_json(&assert_ok(&d.run_agent(agent, &args), "python agent"))
}

/// A python agent that stays up (placed in the tree directly, as root can): probes on request,
/// so the same process can be watched across a daemon crash and restart.
struct LongAgent(LineAgent);

impl LongAgent {
    fn start(d: &TestDaemon) -> Self {
        Self(LineAgent::new(d.spawn_in_tree(&[
            "/usr/bin/python3",
            "-u",
            "-c",
            PY_CONNECT,
            "--loop",
        ])))
    }

    fn probe(&mut self, dests: &[(&str, u16)]) -> Value {
        let line: Vec<String> = dests.iter().map(|(h, p)| format!("{h} {p}")).collect();
        self.0.ask(&line.join(" "))
    }
}

fn session_to<'a>(sessions: &'a [Value], dst: &str) -> &'a Value {
    sessions
        .iter()
        .find(|s| s["original_dst"]["addr"] == dst)
        .unwrap_or_else(|| panic!("no session to {dst} in {sessions:#?}"))
}

#[test]
fn tcp_is_intercepted_relayed_and_recorded() {
    if skip_unless_root("tcp_is_intercepted_relayed_and_recorded") {
        return;
    }
    let echo = EchoServer::start("127.0.0.1:0");
    let d = TestDaemon::start(DaemonOptions {
        targets: targets(&[("echo", &echo)]),
        ..Default::default()
    });
    let port = echo.addr.port();
    let out = py_connect(&d, "tester", &[("127.0.0.1", port)]);
    let c = &out["conns"][0];
    assert_eq!(c["echo_ok"], true, "{out}");
    // getpeername shows the original destination, not the proxy.
    assert_eq!(c["peer"], serde_json::json!(["127.0.0.1", port]), "{out}");
    assert_eq!(echo.accepted(), 1, "the server saw the relayed connection");

    let sessions = d.wait_for_sessions(1);
    let s = session_to(&sessions, &echo.addr.to_string());
    assert_eq!(s["verdict"], "allow");
    assert_eq!(s["target"], "echo");
    assert_eq!(s["protocol"], "tcp");
    assert_eq!(s["agent"]["name"], "tester");
    assert_eq!(
        s["original_dst"]["pid"], out["pid"],
        "pid of the connecting process"
    );
    assert!(
        s["original_dst"]["comm"]
            .as_str()
            .unwrap()
            .starts_with("python"),
        "{s}"
    );
    assert_eq!(s["bytes_up"], c["sent"]);
    assert_eq!(s["bytes_down"], c["sent"]);
    assert!(s["ended_at_ms"].as_u64() >= s["started_at_ms"].as_u64());
    assert_eq!(s["error"], Value::Null);
}

#[test]
fn curl_in_a_child_shell_is_intercepted_and_sees_the_original_peer() {
    if skip_unless_root("curl_in_a_child_shell_is_intercepted_and_sees_the_original_peer") {
        return;
    }
    // A minimal HTTP server: the echo server answers curl's request with its own bytes, which
    // is not HTTP, so serve one real response from a thread instead.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut conn = conn;
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let _ = std::io::Write::write_all(
                &mut conn,
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
            );
        }
    });
    let d = TestDaemon::start(DaemonOptions {
        targets: vec![("web".into(), "127.0.0.1".into(), addr.port())],
        ..Default::default()
    });
    // curl runs as a grandchild of `chaperone run` (through sh): descendants are agents too.
    let script = format!("curl -sS -w ' %{{remote_ip}}:%{{remote_port}}' http://{addr}/");
    let out = assert_ok(
        &d.run_agent("web-agent", &["sh", "-c", &script]),
        "curl agent",
    );
    assert_eq!(out, format!("hello {addr}"));
    let sessions = d.wait_for_sessions(1);
    let s = session_to(&sessions, &addr.to_string());
    assert_eq!(s["original_dst"]["comm"], "curl");
    assert_eq!(s["agent"]["name"], "web-agent");
}

#[test]
fn process_outside_the_agent_tree_is_not_intercepted() {
    if skip_unless_root("process_outside_the_agent_tree_is_not_intercepted") {
        return;
    }
    let echo = EchoServer::start("127.0.0.1:0");
    let d = TestDaemon::start(DaemonOptions::default()); // unlisted: deny, no targets
    // This test process is not in the agent tree: it reaches the server directly even though
    // the daemon would deny the destination to an agent.
    let mut s = TcpStream::connect(echo.addr).unwrap();
    std::io::Write::write_all(&mut s, b"direct").unwrap();
    let mut buf = [0u8; 6];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"direct");
    assert_eq!(s.peer_addr().unwrap(), echo.addr);
    drop(s);
    // An agent's attempt is recorded, so the absence of a record for ours is meaningful.
    let out = py_connect(&d, "tester", &[("127.0.0.1", echo.addr.port())]);
    assert_ne!(out["conns"][0]["echo_ok"], true, "{out}");
    let sessions = d.wait_for_sessions(1);
    assert_eq!(
        sessions.len(),
        1,
        "only the agent's connection is a session: {sessions:#?}"
    );
    assert_eq!(sessions[0]["original_dst"]["pid"], out["pid"]);
    assert_eq!(
        echo.accepted(),
        1,
        "only the direct connection reached the server"
    );
}

#[test]
fn ipv6_and_v4_mapped_are_intercepted() {
    if skip_unless_root("ipv6_and_v4_mapped_are_intercepted") {
        return;
    }
    let v6 = EchoServer::start("[::1]:0");
    let v4 = EchoServer::start("127.0.0.1:0");
    let d = TestDaemon::start(DaemonOptions {
        targets: targets(&[("v6", &v6), ("v4", &v4)]),
        ..Default::default()
    });
    let mapped = "::ffff:127.0.0.1";
    let out = py_connect(
        &d,
        "tester",
        &[("::1", v6.addr.port()), (mapped, v4.addr.port())],
    );
    let (c6, cm) = (&out["conns"][0], &out["conns"][1]);
    assert_eq!(c6["echo_ok"], true, "{out}");
    assert_eq!(c6["peer"], serde_json::json!(["::1", v6.addr.port()]));
    assert_eq!(cm["echo_ok"], true, "{out}");
    assert_eq!(cm["peer"], serde_json::json!([mapped, v4.addr.port()]));
    let sessions = d.wait_for_sessions(2);
    assert_eq!(session_to(&sessions, &v6.addr.to_string())["target"], "v6");
    // The v4-mapped destination matches the IPv4 target.
    assert_eq!(
        session_to(&sessions, &format!("[{mapped}]:{}", v4.addr.port()))["target"],
        "v4"
    );
    assert_eq!((v6.accepted(), v4.accepted()), (1, 1));
}

#[test]
fn unlisted_destination_is_refused_and_recorded() {
    if skip_unless_root("unlisted_destination_is_refused_and_recorded") {
        return;
    }
    let listed = EchoServer::start("127.0.0.1:0");
    let unlisted = EchoServer::start("127.0.0.1:0");
    let d = TestDaemon::start(DaemonOptions {
        unlisted: "deny",
        targets: targets(&[("listed", &listed)]),
        ..Default::default()
    });
    let out = py_connect(
        &d,
        "tester",
        &[
            ("127.0.0.1", unlisted.addr.port()),
            ("127.0.0.1", listed.addr.port()),
        ],
    );
    let (denied, allowed) = (&out["conns"][0], &out["conns"][1]);
    assert_ne!(denied["echo_ok"], true, "{out}");
    assert_eq!(denied["error"], "ConnectionResetError", "{out}");
    assert_eq!(
        allowed["echo_ok"], true,
        "the agent keeps working after a denial: {out}"
    );
    assert_eq!(
        unlisted.accepted(),
        0,
        "a denied connection never reaches its destination"
    );
    let sessions = d.wait_for_sessions(2);
    let s = session_to(&sessions, &unlisted.addr.to_string());
    assert_eq!(s["verdict"], "deny");
    assert_eq!(s["reason"], "unlisted: deny");
    assert_eq!(s["target"], Value::Null);
    assert_eq!(s["original_dst"]["pid"], out["pid"]);
    assert_eq!(
        (s["bytes_up"].as_u64(), s["bytes_down"].as_u64()),
        (Some(0), Some(0))
    );
}

#[test]
fn unlisted_allow_relays_as_raw_tcp_and_records() {
    if skip_unless_root("unlisted_allow_relays_as_raw_tcp_and_records") {
        return;
    }
    let echo = EchoServer::start("127.0.0.1:0");
    let d = TestDaemon::start(DaemonOptions {
        unlisted: "allow",
        ..Default::default()
    });
    let out = py_connect(&d, "tester", &[("127.0.0.1", echo.addr.port())]);
    assert_eq!(out["conns"][0]["echo_ok"], true, "{out}");
    let sessions = d.wait_for_sessions(1);
    let s = session_to(&sessions, &echo.addr.to_string());
    assert_eq!(
        (s["verdict"].as_str(), s["reason"].as_str()),
        (Some("allow"), Some("unlisted: allow"))
    );
    assert_eq!(s["target"], Value::Null);
    assert_eq!(s["protocol"], "tcp");
}

#[test]
fn fail_closed_when_the_daemon_is_down_and_recovers_after_restart() {
    if skip_unless_root("fail_closed_when_the_daemon_is_down_and_recovers_after_restart") {
        return;
    }
    let echo = EchoServer::start("127.0.0.1:0");
    let mut d = TestDaemon::start(DaemonOptions {
        targets: targets(&[("echo", &echo)]),
        ..Default::default()
    });
    let port = echo.addr.port();
    let mut agent = LongAgent::start(&d);
    assert_eq!(
        agent.probe(&[("127.0.0.1", port)])["conns"][0]["echo_ok"],
        true
    );

    d.kill(); // a crash: no clean-up runs
    let status = d.status();
    assert_eq!(
        status["redirect"]["installed"], true,
        "pins outlive the daemon: {status}"
    );
    assert_eq!(status["daemon"], Value::Null, "{status}");
    let out = agent.probe(&[("127.0.0.1", port), ("::1", port)]);
    for c in out["conns"].as_array().unwrap() {
        assert_eq!(
            c["error"], "ConnectionRefusedError",
            "daemon down must refuse: {out}"
        );
    }
    // No new agent starts while the daemon is down: `run` needs it to bind the agent.
    let out = d.run_agent("t", &["true"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Is `chaperone daemon` running"),
        "{out:?}"
    );
    assert_eq!(
        echo.accepted(),
        1,
        "nothing reached the server while the daemon was down"
    );

    d.spawn(); // re-adopts the pinned links
    // A second daemon for the same installation would steal the links: it refuses to start.
    let second = std::process::Command::new(chaperone_tests::chaperone_bin())
        .args(["--config", d.config.to_str().unwrap(), "daemon"])
        .output_bounded()
        .unwrap();
    assert_eq!(second.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("another chaperone daemon"),
        "{second:?}"
    );
    assert_eq!(
        agent.probe(&[("127.0.0.1", port)])["conns"][0]["echo_ok"],
        true,
        "the same agent is served again"
    );
    assert_eq!(
        py_connect(&d, "t", &[("127.0.0.1", port)])["conns"][0]["echo_ok"],
        true
    );
    assert_eq!(echo.accepted(), 3);

    d.stop(); // a clean stop leaves agents refused too
    let out = agent.probe(&[("127.0.0.1", port)]);
    assert_eq!(out["conns"][0]["error"], "ConnectionRefusedError", "{out}");
}

/// 1,000 concurrent connections through the proxy, each with its own payload; afterwards the
/// connection-tracking maps are empty.
#[test]
fn thousand_concurrent_connections_relay_without_map_leak() {
    if skip_unless_root("thousand_concurrent_connections_relay_without_map_leak") {
        return;
    }
    const N: usize = 1000;
    let echo = EchoServer::start("127.0.0.1:0");
    let d = TestDaemon::start(DaemonOptions {
        targets: targets(&[("echo", &echo)]),
        ..Default::default()
    });
    let script = format!(
        r#"
import asyncio, json, resource
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
async def one(i, opened):
    r, w = await asyncio.open_connection("127.0.0.1", {port})
    opened.append(i)
    while len(opened) < {N}:   # hold every connection open until all are
        await asyncio.sleep(0.01)
    payload = (b"%06d" % i) * 200
    w.write(payload)
    await w.drain()
    got = await r.readexactly(len(payload))
    w.close()
    await w.wait_closed()
    return got == payload
async def main():
    opened = []
    res = await asyncio.wait_for(asyncio.gather(*[one(i, opened) for i in range({N})]), 120)
    print(json.dumps({{"ok": sum(res), "total": len(res)}}))
asyncio.run(main())
"#,
        port = echo.addr.port(),
    );
    let out = last_json(&assert_ok(
        &d.run_agent("load", &["python3", "-c", &script]),
        "load agent",
    ));
    assert_eq!(
        out["ok"], N,
        "every connection echoed its own payload: {out}"
    );
    let sessions = d.wait_for_sessions(N);
    assert_eq!(sessions.len(), N);
    assert!(
        sessions
            .iter()
            .all(|s| s["bytes_up"] == 1200 && s["bytes_down"] == 1200)
    );
    assert_eq!(echo.accepted(), N);
    // Agent sockets are closed: sock_release dropped the by-cookie entries; the proxy took every
    // by-address entry on accept.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = d.status()["redirect"].clone();
        if r["orig_by_cookie_entries"] == 0 && r["orig_by_addr_entries"] == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "map entries left behind: {r}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn udp_reaches_only_the_configured_dns_resolvers() {
    if skip_unless_root("udp_reaches_only_the_configured_dns_resolvers") {
        return;
    }
    let resolver = UdpSink::start("127.0.0.1:0");
    let other = UdpSink::start("127.0.0.1:0");
    let d = TestDaemon::start(DaemonOptions {
        dns_resolvers: vec![resolver.addr],
        ..Default::default()
    });
    let script = r#"
import json, socket, sys
res = {}
for name, port in (("resolver", int(sys.argv[1])), ("other", int(sys.argv[2]))):
    for mode in ("sendto", "connect"):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            if mode == "sendto":
                s.sendto(b"q", ("127.0.0.1", port))
            else:
                s.connect(("127.0.0.1", port)); s.send(b"q")
            res[name + "_" + mode] = "sent"
        except OSError as e:
            res[name + "_" + mode] = e.errno
        s.close()
print(json.dumps(res))
"#;
    let (rp, op) = (
        resolver.addr.port().to_string(),
        other.addr.port().to_string(),
    );
    let out = last_json(&assert_ok(
        &d.run_agent("t", &["python3", "-c", script, &rp, &op]),
        "udp agent",
    ));
    assert_eq!(out["resolver_sendto"], "sent", "{out}");
    assert_eq!(out["resolver_connect"], "sent", "{out}");
    assert_eq!(out["other_sendto"], libc::EPERM, "{out}");
    assert_eq!(out["other_connect"], libc::EPERM, "{out}");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while resolver.received() < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!((resolver.received(), other.received()), (2, 0));
}

#[test]
fn connecting_to_the_proxy_itself_is_refused() {
    if skip_unless_root("connecting_to_the_proxy_itself_is_refused") {
        return;
    }
    let d = TestDaemon::start(DaemonOptions {
        unlisted: "allow",
        ..Default::default()
    });
    let out = py_connect(&d, "t", &[("127.0.0.1", d.port), ("::1", d.port)]);
    for c in out["conns"].as_array().unwrap() {
        assert_eq!(
            c["errno"],
            libc::EPERM,
            "a loop through the proxy must be refused: {out}"
        );
    }
    assert!(d.sessions().is_empty());
}

#[test]
fn run_passes_stdio_and_exit_code_through() {
    if skip_unless_root("run_passes_stdio_and_exit_code_through") {
        return;
    }
    let d = TestDaemon::start(DaemonOptions::default());
    let out = d.run_agent("t", &["sh", "-c", "echo out; echo err >&2; exit 7"]);
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    // The agent's cgroup is below the daemon's agent tree.
    let out = assert_ok(&d.run_agent("t", &["cat", "/proc/self/cgroup"]), "cat");
    let tree = d.status()["agent_cgroup"].as_str().unwrap().to_string();
    let leaf = tree.rsplit('/').next().unwrap();
    assert!(out.contains(&format!("0::/{leaf}/run-")), "{out}");
}

#[test]
fn uninstall_removes_interception_and_run_then_refuses() {
    if skip_unless_root("uninstall_removes_interception_and_run_then_refuses") {
        return;
    }
    let mut d = TestDaemon::start(DaemonOptions::default());
    d.stop();
    let out = std::process::Command::new(chaperone_tests::chaperone_bin())
        .args([
            "--config",
            d.config.to_str().unwrap(),
            "--json",
            "daemon",
            "--uninstall",
        ])
        .output_bounded()
        .unwrap();
    let report = last_json(&assert_ok(&out, "uninstall"));
    assert!(
        report["removed"].as_array().unwrap().len() >= 15,
        "{report}"
    );
    assert!(!d.pin_dir.exists(), "pin dir removed");
    assert_eq!(d.status()["redirect"]["installed"], false);
    let out = d.run_agent("t", &["true"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Is `chaperone daemon` running"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn agents_run_unprivileged_and_cannot_leave_their_cgroup() {
    if skip_unless_root("agents_run_unprivileged_and_cannot_leave_their_cgroup") {
        return;
    }
    let echo = EchoServer::start("127.0.0.1:0");
    let d = TestDaemon::start(DaemonOptions::default()); // the echo server is unlisted: denied
    // Root is refused unless asked for explicitly.
    let out = d
        .cmd()
        .args(["run", "--", "true"])
        .env_remove("SUDO_UID")
        .output_bounded()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("refusing to run the agent as root"),
        "{}",
        stderr(&out)
    );
    // As nobody: no way back to the root cgroup, and still intercepted afterwards.
    let mount = d.status()["agent_cgroup"]
        .as_str()
        .unwrap()
        .rsplit_once('/')
        .unwrap()
        .0
        .to_string();
    let script = format!(
        "id -u; echo $$ > {mount}/cgroup.procs && echo ESCAPED; python3 -c '{}' 127.0.0.1 {}",
        PY_CONNECT.replace('\'', "\"").replace("\"\"\"", ""),
        echo.addr.port()
    );
    let out = d.run_agent("t", &["sh", "-c", &script]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!stdout.contains("ESCAPED"), "{stdout}");
    assert!(
        stderr(&out).contains("Permission denied"),
        "{}",
        stderr(&out)
    );
    assert_ne!(
        stdout.lines().next(),
        Some("0"),
        "the agent must not run as root"
    );
    let r = last_json(&stdout);
    assert_ne!(r["conns"][0]["echo_ok"], true, "{r}");
    assert_eq!(echo.accepted(), 0);
}

#[test]
fn sockets_inherited_from_outside_the_tree_are_not_passed_to_agents() {
    if skip_unless_root("sockets_inherited_from_outside_the_tree_are_not_passed_to_agents") {
        return;
    }
    let echo = EchoServer::start("127.0.0.1:0");
    let d = TestDaemon::start(DaemonOptions::default());
    // A launcher outside the tree opens a connection to an unlisted destination and hands it
    // down as fd 3; the agent must not be able to use it.
    let launcher = format!(
        r#"
import os, socket, subprocess, sys
s = socket.create_connection(("127.0.0.1", {port}))
os.dup2(s.fileno(), 3); os.set_inheritable(3, True)
agent = "import os; print('fd 3 open' if os.path.exists('/proc/self/fd/3') else 'fd 3 closed')"
r = subprocess.run([sys.argv[1], "--config", sys.argv[2], "run", "--user", "nobody", "--", "python3", "-c", agent],
                   pass_fds=(3,), capture_output=True, text=True)
print(r.stdout.strip()); print(r.stderr.strip(), file=sys.stderr)
"#,
        port = echo.addr.port()
    );
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            &launcher,
            chaperone_tests::chaperone_bin().to_str().unwrap(),
            d.config.to_str().unwrap(),
        ])
        .output_bounded()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.trim(), "fd 3 closed", "stderr: {}", stderr(&out));
}

#[test]
fn pins_attached_to_another_tree_are_refused_by_daemon_and_run() {
    if skip_unless_root("pins_attached_to_another_tree_are_refused_by_daemon_and_run") {
        return;
    }
    let mut d = TestDaemon::start(DaemonOptions::default());
    d.stop();
    // Same pins, another agent tree: adopting would leave the new tree unguarded.
    let original = std::fs::read_to_string(&d.config).unwrap();
    let moved = original.replace(
        "agent_cgroup: chaperone-e2e-",
        "agent_cgroup: chaperone-e2e-moved-",
    );
    let other = d.dir.join("moved.yaml");
    std::fs::write(&other, &moved).unwrap();
    let bin = chaperone_tests::chaperone_bin();
    let daemon = std::process::Command::new(&bin)
        .args(["--config", other.to_str().unwrap(), "daemon"])
        .output_bounded()
        .unwrap();
    assert_eq!(daemon.status.code(), Some(2));
    assert!(
        stderr(&daemon).contains("attached to another cgroup"),
        "{}",
        stderr(&daemon)
    );
    let run = std::process::Command::new(&bin)
        .args([
            "--config",
            other.to_str().unwrap(),
            "run",
            "--user",
            "nobody",
            "--",
            "true",
        ])
        .output_bounded()
        .unwrap();
    assert_eq!(run.status.code(), Some(2));
    assert!(
        stderr(&run).contains("Is `chaperone daemon` running"),
        "{}",
        stderr(&run)
    );
    let status: Value = serde_json::from_slice(
        &std::process::Command::new(&bin)
            .args(["--config", other.to_str().unwrap(), "--json", "status"])
            .output_bounded()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert_eq!(status["redirect"]["installed"], false, "{status}");
    // Clean up the moved tree the failed attempts created.
    let _ = std::process::Command::new(&bin)
        .args(["--config", other.to_str().unwrap(), "daemon", "--uninstall"])
        .output_bounded();
}

#[test]
fn uninstall_refuses_while_agents_run_unless_forced() {
    if skip_unless_root("uninstall_refuses_while_agents_run_unless_forced") {
        return;
    }
    let mut d = TestDaemon::start(DaemonOptions::default());
    let mut agent = chaperone_tests::KillOnDrop(
        d.cmd()
            .args(["run", "--user", "nobody", "--", "sleep", "60"])
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(300));
    // While the daemon runs, uninstall is refused outright.
    let out = d
        .cmd()
        .args(["daemon", "--uninstall"])
        .output_bounded()
        .unwrap();
    assert!(
        stderr(&out).contains("another chaperone daemon"),
        "{}",
        stderr(&out)
    );
    d.stop();
    let out = d
        .cmd()
        .args(["daemon", "--uninstall"])
        .output_bounded()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("agents are still running"),
        "{}",
        stderr(&out)
    );
    assert!(d.pin_dir.exists());
    let out = d
        .cmd()
        .args(["daemon", "--uninstall", "--force"])
        .output_bounded()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let status = agent.0.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(128 + libc::SIGKILL),
        "the agent was killed, not left unintercepted"
    );
    assert!(!d.pin_dir.exists());
}

/// A target on another host (a network namespace reached over a veth pair): the daemon relays
/// to it, while the agent's own packets never leave loopback.
#[test]
fn remote_targets_are_relayed_and_agents_accept_nothing_from_outside() {
    if skip_unless_root("remote_targets_are_relayed_and_agents_accept_nothing_from_outside") {
        return;
    }
    let peer = chaperone_tests::PeerNetns::new();
    // An echo server on the remote host.
    let port = chaperone_tests::free_port();
    let mut remote = chaperone_tests::KillOnDrop(peer
        .command("python3")
        .args([
            "-c",
            "import socket,sys\ns=socket.create_server((sys.argv[1],int(sys.argv[2])))\nprint('up',flush=True)\nwhile True:\n c,_=s.accept(); c.sendall(c.recv(100)); c.close()",
            &peer.peer_ip.to_string(),
            &port.to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(remote.0.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "up");
    let d = TestDaemon::start(DaemonOptions {
        targets: vec![("remote".into(), peer.peer_ip.to_string(), port)],
        ..Default::default()
    });
    let out = py_connect(&d, "t", &[(&peer.peer_ip.to_string(), port)]);
    assert_eq!(out["conns"][0]["echo_ok"], true, "{out}");
    assert_eq!(
        out["conns"][0]["peer"],
        serde_json::json!([peer.peer_ip.to_string(), port])
    );

    // The agent listens on all addresses (no bind needed: listen() alone autobinds). A client
    // on the remote host cannot reach it; one on loopback can.
    let listen_port = chaperone_tests::free_port();
    let agent_script = format!(
        "import socket\ns=socket.socket()\ns.bind(('0.0.0.0',{listen_port}))\ns.listen()\nprint('ready',flush=True)\ns.settimeout(3)\nn=0\ntry:\n  while True:\n    c,a=s.accept(); n+=1; c.close()\nexcept socket.timeout:\n  pass\nprint('accepted',n)"
    );
    let mut agent = chaperone_tests::KillOnDrop(
        d.cmd()
            .args([
                "run",
                "--user",
                "nobody",
                "--",
                "python3",
                "-c",
                &agent_script,
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut reader = std::io::BufReader::new(agent.0.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let from_remote = peer
        .command("python3")
        .args([
            "-c",
            "import socket,sys\ntry:\n socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=2); print('connected')\nexcept OSError as e: print('failed', type(e).__name__)",
            &peer.host_ip.to_string(),
            &listen_port.to_string(),
        ])
        .output_bounded()
        .unwrap();
    let from_remote = String::from_utf8_lossy(&from_remote.stdout)
        .trim()
        .to_string();
    assert!(
        from_remote.starts_with("failed"),
        "a remote host reached an agent's socket: {from_remote}"
    );
    TcpStream::connect(("127.0.0.1", listen_port))
        .expect("loopback clients may reach agent servers");
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    assert_eq!(
        rest.trim(),
        "accepted 1",
        "only the loopback connection was accepted"
    );
    drop((agent, remote));
}
