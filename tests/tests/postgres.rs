//! The PostgreSQL proxy end to end: a real PostgreSQL 15, the real daemon, unmodified clients
//! (psql, pgbench, psycopg, and a hand-written protocol client) run as agents with
//! `chaperone run --as agent --user nobody`. The agent names no password: the daemon logs in
//! upstream as `agent_ro` with the credential from its secrets file, and judges every statement
//! against a read-only grant.

use chaperone_tests::{
    DaemonOptions, Postgres, TestDaemon, assert_ok, last_json, set_mode, skip_unless_root,
};
use serde_json::Value;
use std::{
    path::PathBuf,
    process::Output,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

const DENIED: &str = "chaperone: statement denied by policy";

/// A Postgres with its daemon.
struct Env {
    pg: Postgres,
    d: TestDaemon,
}

fn env() -> Env {
    env_with(|pg| pg.daemon_options())
}

fn env_with(opts: impl FnOnce(&Postgres) -> DaemonOptions) -> Env {
    let pg = Postgres::start();
    let d = TestDaemon::start(opts(&pg));
    Env { pg, d }
}

/// An environment around a server the test prepared first.
fn env_with_pg(pg: Postgres) -> Env {
    let d = TestDaemon::start(pg.daemon_options());
    Env { pg, d }
}

impl Env {
    /// See [`Postgres::agent_conninfo`] (the TLS tests ask for TLS themselves).
    fn conninfo(&self, extra: &str) -> String {
        self.pg.agent_conninfo(extra)
    }

    /// Run an agent program as `agent` under a time limit (a hang fails the test, not the run).
    fn agent(&self, args: &[&str]) -> Output {
        self.d.run_agent_timed("agent", args)
    }

    /// `psql -X <conninfo + extra> ARGS…` as the agent.
    fn psql(&self, extra: &str, args: &[&str]) -> Output {
        let conn = self.conninfo(extra);
        let mut full = vec!["psql", "-X", "-A", "-t", &conn];
        full.extend_from_slice(args);
        self.agent(&full)
    }

    /// psql that must succeed; its stdout.
    fn psql_ok(&self, args: &[&str]) -> String {
        assert_ok(&self.psql("", args), &format!("psql {args:?}"))
    }

    /// A file the agent (user nobody) can read, in the daemon's directory.
    fn agent_file(&self, name: &str, content: &str) -> PathBuf {
        set_mode(&self.d.dir, 0o755);
        let p = self.d.dir.join(name);
        std::fs::write(&p, content).unwrap();
        set_mode(&p, 0o644);
        p
    }

    /// `python3 -c SCRIPT ARGS…` as the agent; the JSON it prints last.
    fn python(&self, script: &str, args: &[&str]) -> Value {
        let mut full = vec!["python3", "-c", script];
        full.extend_from_slice(args);
        last_json(&assert_ok(&self.agent(&full), "python agent"))
    }

    fn users(&self) -> String {
        self.pg.psql_super("app", "SELECT count(*) FROM users")
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn show(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        stdout(o),
        stderr(o)
    )
}

#[test]
fn psql_reads_through_the_proxy_as_the_injected_role_read_only() {
    if skip_unless_root("psql_reads_through_the_proxy_as_the_injected_role_read_only") {
        return;
    }
    let e = env();
    let out = e.psql_ok(&[
        "-c",
        "SELECT email FROM users ORDER BY id",
        "-c",
        "SELECT current_user",
        "-c",
        "SHOW default_transaction_read_only",
    ]);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["****", "****", "****", "agent_ro", "on"],
        "rows (emails masked: masking is on by default), then the credential's role (not the \
         agent's `whoever`), then read-only mode"
    );
    // The session record.
    let sessions = e.d.wait_for_sessions(1);
    let s = sessions
        .iter()
        .find(|s| s["protocol"] == "postgres")
        .unwrap_or_else(|| panic!("{sessions:#?}"));
    assert_eq!(s["target"], "app");
    assert_eq!(s["agent"]["name"], "agent");
    assert_eq!(s["statements_allowed"], 3, "{s}");
    assert_eq!(s["statements_denied"], 0, "{s}");
}

#[test]
fn postgres_session_records_count_bytes_both_ways() {
    if skip_unless_root("postgres_session_records_count_bytes_both_ways") {
        return;
    }
    let e = env();
    let out = e.psql_ok(&["-c", "SELECT repeat('x', 100000)"]);
    assert!(out.len() > 100_000);
    let sessions = e.d.wait_for_sessions(1);
    let s = &sessions[0];
    // As for raw TCP sessions: bytes from the agent, bytes to it.
    assert!(s["bytes_up"].as_u64().unwrap() > 0, "bytes_up: {s}");
    assert!(
        s["bytes_down"].as_u64().unwrap() > 100_000,
        "bytes_down: {s}"
    );
}

#[test]
fn denied_write_is_refused_with_42501_and_the_session_goes_on() {
    if skip_unless_root("denied_write_is_refused_with_42501_and_the_session_goes_on") {
        return;
    }
    let e = env();
    let o = e.psql("", &["-v", "VERBOSITY=verbose", "-c", "DELETE FROM users"]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(stderr(&o).contains(DENIED), "{}", show(&o));
    assert!(stderr(&o).contains("42501"), "{}", show(&o));
    assert_eq!(e.users(), "3", "the rows are still there");

    // The same psql session: the statement after the refusal runs.
    let o = e.psql(
        "",
        &[
            "-c",
            "DELETE FROM users",
            "-c",
            "SELECT 'still here', count(*) FROM users",
        ],
    );
    assert!(stderr(&o).contains(DENIED), "{}", show(&o));
    assert_eq!(stdout(&o).trim(), "still here|3", "{}", show(&o));
    assert_eq!(e.users(), "3");
}

#[test]
fn a_denial_inside_a_transaction_aborts_it_like_a_server_error() {
    if skip_unless_root("a_denial_inside_a_transaction_aborts_it_like_a_server_error") {
        return;
    }
    let e = env();
    let script = e.agent_file(
        "tx.sql",
        "BEGIN;\nSELECT 1;\nDELETE FROM users;\nSELECT 2;\nROLLBACK;\nSELECT 3;\n",
    );
    let o = e.psql("", &["-f", script.to_str().unwrap()]);
    let (out, err) = (stdout(&o), stderr(&o));
    assert!(err.contains(DENIED), "{}", show(&o));
    assert!(
        err.contains("current transaction is aborted"),
        "SELECT 2 in the failed block: {}",
        show(&o)
    );
    let lines: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines, ["BEGIN", "1", "ROLLBACK", "3"], "{}", show(&o));
    // The order on stderr: the denial (line 3) before the aborted-transaction error (line 4).
    let (denied_at, aborted_at) = (
        err.find(DENIED).unwrap(),
        err.find("current transaction is aborted").unwrap(),
    );
    assert!(denied_at < aborted_at, "{err}");
    assert_eq!(e.users(), "3");
}

#[test]
fn a_multi_statement_query_with_one_write_is_denied_as_a_whole() {
    if skip_unless_root("a_multi_statement_query_with_one_write_is_denied_as_a_whole") {
        return;
    }
    let e = env();
    let o = e.psql("", &["-c", "SELECT 'first half ran'; DELETE FROM users"]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(stderr(&o).contains(DENIED), "{}", show(&o));
    assert!(
        !stdout(&o).contains("first half ran"),
        "no part of it ran: {}",
        show(&o)
    );
    assert_eq!(e.users(), "3");
}

#[test]
fn startup_parameters_that_change_privilege_or_mode_and_other_databases_are_refused() {
    if skip_unless_root(
        "startup_parameters_that_change_privilege_or_mode_and_other_databases_are_refused",
    ) {
        return;
    }
    let e = env();
    for (extra, what) in [
        (
            "options='-c role=postgres'",
            "startup parameter `options` is not allowed",
        ),
        (
            "options='-c default_transaction_read_only=off'",
            "startup parameter `options` is not allowed",
        ),
        (
            "dbname=postgres",
            "database `postgres` is not reachable through target `app`",
        ),
    ] {
        let o = e.psql(extra, &["-c", "SELECT current_user"]);
        assert_eq!(
            o.status.code(),
            Some(2),
            "{extra}: psql's connection failure: {}",
            show(&o)
        );
        assert!(
            stderr(&o).contains(&format!("FATAL:  chaperone: {what}")),
            "{extra}: {}",
            show(&o)
        );
        assert!(stdout(&o).is_empty(), "{}", show(&o));
    }
    // The SQLSTATEs (libpq does not print them for connection failures): a raw client.
    for (params, code) in [
        (r#"{"options": "-c role=postgres"}"#, "42501"),
        (
            r#"{"options": "-c default_transaction_read_only=off"}"#,
            "42501",
        ),
        (r#"{"role": "postgres"}"#, "42501"),
        (r#"{"replication": "database"}"#, "42501"),
        (r#"{"database": "postgres"}"#, "3D000"),
    ] {
        let out = raw_with(&e, "startup", params);
        let msgs = out["startup"].as_array().unwrap();
        assert_eq!(msgs.len(), 1, "{params}: one ErrorResponse: {out:#}");
        assert_eq!(error_fields(&msgs[0]).0, "FATAL", "{params}: {out:#}");
        assert_eq!(error_fields(&msgs[0]).1, code, "{params}: {out:#}");
        assert_eq!(out["end"], "eof", "{params}: {out:#}");
    }
    // Harmless parameters still pass.
    assert_eq!(e.psql_ok(&["-c", "SELECT current_user"]).trim(), "agent_ro");
    let o = e.psql("application_name=tester", &["-c", "SHOW application_name"]);
    assert_eq!(assert_ok(&o, "psql application_name").trim(), "tester");
    let sessions = e.d.wait_for_sessions(10);
    let refused = sessions
        .iter()
        .filter(|s| {
            s["error"]
                .as_str()
                .is_some_and(|e| e.contains("startup refused"))
        })
        .count();
    assert_eq!(
        refused, 8,
        "each refused startup is recorded with its error: {sessions:#?}"
    );
}

#[test]
fn copy_out_works_and_copy_in_is_denied() {
    if skip_unless_root("copy_out_works_and_copy_in_is_denied") {
        return;
    }
    let e = env();
    let out = e.psql_ok(&["-c", "\\copy users to stdout"]);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["1\t****", "2\t****", "3\t****"],
        "{out}"
    );
    let out = e.psql_ok(&["-c", "COPY (SELECT id FROM users ORDER BY id) TO STDOUT"]);
    assert_eq!(out.lines().collect::<Vec<_>>(), ["1", "2", "3"]);

    let data = e.agent_file("rows.tsv", "99\tmallory@example.com\n");
    let o = e.psql(
        "",
        &["-c", &format!("\\copy users from '{}'", data.display())],
    );
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert!(stderr(&o).contains(DENIED), "{}", show(&o));
    let o = e.psql("", &["-c", "COPY users FROM STDIN", "-c", "SELECT 'after'"]);
    assert!(stderr(&o).contains(DENIED), "{}", show(&o));
    assert!(
        stdout(&o).contains("after"),
        "the session goes on: {}",
        show(&o)
    );
    assert_eq!(e.users(), "3");
}

#[test]
fn pgbench_select_only_runs_through_the_proxy() {
    if skip_unless_root("pgbench_select_only_runs_through_the_proxy") {
        return;
    }
    let e = env();
    for mode in ["prepared", "simple", "extended"] {
        let args = e.pg.agent_pgbench(&["-n", "-S", "-M", mode, "-t", "50"]);
        let o = e.agent(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(o.status.code(), Some(0), "pgbench -M {mode}: {}", show(&o));
        let out = stdout(&o);
        assert!(
            out.contains("number of transactions actually processed: 50/50"),
            "-M {mode}: {out}"
        );
        assert!(
            out.contains("number of failed transactions: 0"),
            "-M {mode}: {out}"
        );
    }
    // pgbench opens a setup connection and a client connection per run.
    let sessions = e.d.wait_for_sessions(6);
    assert_eq!(sessions.len(), 6, "{sessions:#?}");
    for s in &sessions {
        assert_eq!(s["protocol"], "postgres", "{s}");
        assert_eq!(s["statements_denied"], 0, "{s}");
        assert!(s["error"].is_null(), "{s}");
    }
    // -M simple and -M extended send (and the proxy judges) every statement; -M prepared
    // parses once.
    let judged: u64 = sessions
        .iter()
        .map(|s| s["statements_allowed"].as_u64().unwrap())
        .sum();
    assert!(judged >= 100, "{sessions:#?}");
}

/// psycopg 3 pipeline: five statements, the third denied.
const PY_PIPELINE: &str = r#"
import json, sys, psycopg
out = {}
conn = psycopg.connect(sys.argv[1])
curs = [conn.cursor() for _ in range(5)]
sqls = ["SELECT email FROM users ORDER BY id", "SELECT count(*) FROM users",
        "DELETE FROM users", "SELECT 4", "SELECT 5"]
try:
    with conn.pipeline():
        for c, q in zip(curs, sqls):
            c.execute(q)
    out["raised"] = None
except psycopg.Error as e:
    out["raised"] = {"class": type(e).__name__, "sqlstate": e.sqlstate, "message": str(e)}
results = []
for c in curs:
    try:
        results.append({"rows": c.fetchall()})
    except psycopg.Error as e:
        results.append({"error": type(e).__name__, "sqlstate": e.sqlstate})
out["results"] = results
out["status_after"] = conn.info.transaction_status.name
conn.rollback()
out["after_rollback"] = conn.execute("SELECT count(*) FROM users").fetchone()[0]
# And a second pipeline, all allowed, on the same connection.
with conn.pipeline():
    a = conn.execute("SELECT 1")
    b = conn.execute("SELECT current_user")
out["second"] = [a.fetchone()[0], b.fetchone()[0]]
conn.close()
print(json.dumps(out))
"#;

#[test]
fn psycopg_pipeline_with_a_denied_statement_in_the_middle() {
    if skip_unless_root("psycopg_pipeline_with_a_denied_statement_in_the_middle") {
        return;
    }
    let e = env();
    let out = e.python(PY_PIPELINE, &[&e.conninfo("")]);
    assert_eq!(out["raised"]["sqlstate"], "42501", "{out:#}");
    assert!(
        out["raised"]["message"].as_str().unwrap().contains(DENIED),
        "{out:#}"
    );
    let r = &out["results"];
    assert_eq!(
        r[0]["rows"],
        serde_json::json!([["****"], ["****"], ["****"]]),
        "{out:#}"
    );
    assert_eq!(r[1]["rows"], serde_json::json!([[3]]), "{out:#}");
    assert!(
        r[2]["rows"].is_null(),
        "the denied statement has no result: {out:#}"
    );
    // What came after the refusal in the same batch is skipped, as after a server error.
    assert!(r[3]["rows"].is_null() && r[4]["rows"].is_null(), "{out:#}");
    assert_eq!(out["status_after"], "INERROR", "{out:#}");
    assert_eq!(out["after_rollback"], 3, "{out:#}");
    assert_eq!(out["second"], serde_json::json!([1, "agent_ro"]), "{out:#}");
    assert_eq!(e.users(), "3");
}

/// psycopg 3: a long query cancelled from another thread after 0.5 s.
const PY_CANCEL: &str = r#"
import json, sys, threading, time, psycopg
out = {}
conn = psycopg.connect(sys.argv[1], autocommit=True)
def cancel():
    time.sleep(0.5)
    conn.cancel()
t = threading.Thread(target=cancel)
t0 = time.monotonic()
t.start()
try:
    conn.execute(sys.argv[2])
    out["outcome"] = "completed"
except psycopg.errors.QueryCanceled as e:
    out["outcome"] = "QueryCanceled"
    out["sqlstate"] = e.sqlstate
except psycopg.Error as e:
    out["outcome"] = type(e).__name__
    out["sqlstate"] = e.sqlstate
    out["message"] = str(e)
out["elapsed"] = time.monotonic() - t0
t.join()
out["after"] = conn.execute("SELECT 'usable'").fetchone()[0]
print(json.dumps(out))
"#;

fn assert_cancelled(out: &Value) {
    assert_eq!(out["outcome"], "QueryCanceled", "{out:#}");
    assert_eq!(out["sqlstate"], "57014", "{out:#}");
    let elapsed = out["elapsed"].as_f64().unwrap();
    assert!(
        (0.4..5.0).contains(&elapsed),
        "cancelled after {elapsed} s: {out:#}"
    );
    assert_eq!(out["after"], "usable", "{out:#}");
}

#[test]
fn cancel_request_reaches_the_backend_through_the_proxy() {
    if skip_unless_root("cancel_request_reaches_the_backend_through_the_proxy") {
        return;
    }
    let e = env();
    // A long read that needs no function grant: 10^10 joined rows.
    let long = "SELECT count(*) FROM pgbench_accounts a CROSS JOIN pgbench_accounts b";
    assert_cancelled(&e.python(PY_CANCEL, &[&e.conninfo(""), long]));
    assert!(
        e.d.log().contains("forwarding a cancel request"),
        "{}",
        e.d.log()
    );
}

#[test]
fn a_function_the_grant_lists_runs_and_can_be_cancelled() {
    if skip_unless_root("a_function_the_grant_lists_runs_and_can_be_cancelled") {
        return;
    }
    // The grant lists `functions: [pg_sleep]` (classes read, session, transaction).
    let e = env();
    let o = e.psql("", &["-c", "SELECT pg_sleep(0.01)"]);
    assert!(
        o.status.success() && !stderr(&o).contains(DENIED),
        "pg_sleep is granted: {}",
        show(&o)
    );
    assert_cancelled(&e.python(PY_CANCEL, &[&e.conninfo(""), "SELECT pg_sleep(10)"]));
    // Not granted: another non-built-in function.
    let o = e.psql("", &["-c", "SELECT pg_advisory_lock(1)"]);
    assert!(stderr(&o).contains(DENIED), "{}", show(&o));
}

/// A hand-written protocol client. argv: port, case, extra startup parameters (JSON object).
/// Prints JSON: the startup replies and the messages received after (tag,
/// and for errors their fields), and how the connection ended.
const PY_RAW: &str = r#"
import json, socket, struct, sys
port, case = int(sys.argv[1]), sys.argv[2]
extra = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
out = {"case": case, "msgs": [], "end": None}

def recv_exact(s, n):
    b = b""
    while len(b) < n:
        chunk = s.recv(n - len(b))
        if not chunk:
            return None
        b += chunk
    return b

def read_msg(s):
    h = recv_exact(s, 5)
    if h is None:
        return None
    tag, ln = h[:1], struct.unpack("!i", h[1:])[0]
    body = recv_exact(s, ln - 4)
    if body is None:
        return None
    m = {"tag": tag.decode("latin1")}
    if tag in (b"E", b"N"):
        fields = {}
        for f in body.split(b"\0"):
            if f:
                fields[f[:1].decode()] = f[1:].decode("utf8", "replace")
        m["fields"] = fields
    return m

def read_until(s, stop_tags):
    """Messages until one with a tag in stop_tags, or the end of the connection."""
    got = []
    while True:
        try:
            m = read_msg(s)
        except socket.timeout:
            out["end"] = "timeout"
            return got
        except ConnectionResetError:
            out["end"] = "reset"
            return got
        if m is None:
            out["end"] = "eof"
            return got
        got.append(m)
        if m["tag"] in stop_tags:
            return got

s = socket.create_connection(("127.0.0.1", port), timeout=10)
params = {"user": "whoever", "database": "app", "application_name": "raw"}
params.update(extra)
body = struct.pack("!i", 196608) + b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
s.sendall(struct.pack("!i", len(body) + 4) + body)
startup = read_until(s, "Z")
out["startup"] = startup

if case == "startup":
    if out["end"] is None:
        out["msgs"] = read_until(s, "")
elif case == "function_call":
    # FunctionCall: oid 1598 (pg_catalog.random in PG 15; the oid does not matter), no args.
    fbody = struct.pack("!iHHH", 1598, 0, 0, 0)
    s.sendall(b"F" + struct.pack("!i", len(fbody) + 4) + fbody)
    out["msgs"] = read_until(s, "Z")
    q = b"SELECT 'alive'\0"
    s.sendall(b"Q" + struct.pack("!i", len(q) + 4) + q)
    out["after"] = [m["tag"] for m in read_until(s, "Z")]
else:
    if case == "unknown_type":
        s.sendall(b"\x01" + struct.pack("!i", 4))
    elif case == "huge_length":
        s.sendall(b"Q" + struct.pack("!i", 0x40000000) + b"SELECT 1")
    elif case == "short_length":
        s.sendall(b"Q" + struct.pack("!i", 2))
    elif case == "truncated":
        s.sendall(b"Q" + struct.pack("!i", 100) + b"SELECT")
        s.shutdown(socket.SHUT_WR)
    out["msgs"] = read_until(s, "")
    if out["end"] is None:
        # Anything after the error means the proxy kept the connection open: wait for its end.
        out["msgs"] += read_until(s, "")
s.close()
print(json.dumps(out))
"#;

fn raw(e: &Env, case: &str) -> Value {
    raw_with(e, case, "{}")
}

/// The raw client with extra startup parameters (a JSON object).
fn raw_with(e: &Env, case: &str, params: &str) -> Value {
    e.python(PY_RAW, &[&e.pg.port.to_string(), case, params])
}

fn error_fields(m: &Value) -> (&str, &str, &str) {
    let f = &m["fields"];
    (
        f["S"].as_str().unwrap_or(""),
        f["C"].as_str().unwrap_or(""),
        f["M"].as_str().unwrap_or(""),
    )
}

#[test]
fn function_call_message_is_denied_and_the_session_goes_on() {
    if skip_unless_root("function_call_message_is_denied_and_the_session_goes_on") {
        return;
    }
    let e = env();
    let out = raw(&e, "function_call");
    assert_eq!(
        out["startup"].as_array().unwrap().last().unwrap()["tag"],
        "Z",
        "{out:#}"
    );
    let tags: Vec<&str> = out["msgs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["tag"].as_str().unwrap())
        .collect();
    assert_eq!(tags, ["E", "Z"], "{out:#}");
    let (sev, code, msg) = error_fields(&out["msgs"][0]);
    assert_eq!((sev, code), ("ERROR", "42501"), "{out:#}");
    assert!(
        msg.contains(DENIED) && msg.contains("FunctionCall"),
        "{out:#}"
    );
    assert_eq!(
        out["after"],
        serde_json::json!(["T", "D", "C", "Z"]),
        "{out:#}"
    );
}

#[test]
fn malformed_client_input_ends_the_session_with_08p01_and_the_daemon_keeps_serving() {
    if skip_unless_root(
        "malformed_client_input_ends_the_session_with_08p01_and_the_daemon_keeps_serving",
    ) {
        return;
    }
    let e = env();
    let mut problems = Vec::new();
    for case in ["unknown_type", "huge_length", "short_length"] {
        let out = raw(&e, case);
        let msgs = out["msgs"].as_array().unwrap();
        let ok = msgs.len() == 1
            && msgs[0]["tag"] == "E"
            && error_fields(&msgs[0]).0 == "FATAL"
            && error_fields(&msgs[0]).1 == "08P01"
            && out["end"] == "eof";
        if !ok {
            problems.push(format!(
                "{case}: expected one FATAL 08P01 ErrorResponse then EOF, got {out}"
            ));
        }
    }
    // A truncated message, then the client's end: the session ends (no hang); if the proxy says
    // anything it is a protocol violation.
    let out = raw(&e, "truncated");
    if out["end"] != "eof" && out["end"] != "reset" {
        problems.push(format!("truncated: the connection did not end: {out}"));
    }
    for m in out["msgs"].as_array().unwrap() {
        if m["tag"] != "E" || error_fields(m).1 != "08P01" {
            problems.push(format!("truncated: unexpected message {m}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // The daemon is still serving.
    assert_eq!(e.psql_ok(&["-c", "SELECT count(*) FROM users"]).trim(), "3");
    assert!(e.d.status()["daemon"]["pid"].is_number(), "{}", e.d.log());
}

/// The cases of tests/corpus/postgres-readonly.sql: `(line, allow, sql)`.
fn corpus() -> Vec<(usize, bool, String)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/corpus/postgres-readonly.sql");
    let text = std::fs::read_to_string(path).unwrap();
    let mut cases: Vec<(usize, bool, String)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        match line.trim_end() {
            "-- allow" => cases.push((i + 1, true, String::new())),
            "-- deny" => cases.push((i + 1, false, String::new())),
            l => {
                if let Some((_, _, sql)) = cases.last_mut()
                    && !l.trim().is_empty()
                {
                    if !sql.is_empty() {
                        sql.push('\n');
                    }
                    sql.push_str(l);
                }
            }
        }
    }
    assert!(
        cases.len() > 50 && cases.iter().all(|c| !c.2.is_empty()),
        "corpus parse: {cases:?}"
    );
    cases
}

#[test]
fn bypass_corpus_end_to_end_through_psql() {
    if skip_unless_root("bypass_corpus_end_to_end_through_psql") {
        return;
    }
    // The corpus's grant is the plain read-only one: no extra functions.
    let e = Arc::new(env_with(|pg| pg.daemon_options_with_functions(&[])));
    let cases = Arc::new(corpus());
    let next = Arc::new(AtomicUsize::new(0));
    let mismatches = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (e, cases, next, mismatches) = (e.clone(), cases.clone(), next.clone(), mismatches.clone());
            std::thread::spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((line, allow, sql)) = cases.get(i) else { return };
                    let o = e.psql("", &["-c", sql]);
                    let denied = stderr(&o).contains("chaperone: statement denied");
                    if denied == *allow {
                        mismatches.lock().unwrap().push(format!(
                            "line {line}: expected {}, got {}: {sql:?}\n    psql exit {:?}, stderr: {}",
                            if *allow { "allow" } else { "deny" },
                            if denied { "deny" } else { "allow" },
                            o.status.code(),
                            stderr(&o).trim().replace('\n', "\n      ")
                        ));
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let mut m = mismatches.lock().unwrap().clone();
    m.sort();
    assert!(
        m.is_empty(),
        "{} of {} corpus cases mismatched:\n{}",
        m.len(),
        cases.len(),
        m.join("\n")
    );
    assert_eq!(e.users(), "3", "no corpus case wrote");
    eprintln!("corpus: {} cases in {:?}", cases.len(), started.elapsed());
}

#[test]
fn the_credential_never_leaks_and_sessions_are_recorded_as_postgres() {
    if skip_unless_root("the_credential_never_leaks_and_sessions_are_recorded_as_postgres") {
        return;
    }
    let e = env();
    // Session 1: allowed only. Session 2: one allowed, one denied.
    e.psql_ok(&["-c", "SELECT 1"]);
    let first = e.d.wait_for_sessions(1);
    assert_eq!(first.len(), 1, "{first:#?}");
    let o = e.psql("", &["-c", "SELECT 1", "-c", "DELETE FROM users"]);
    assert!(stderr(&o).contains(DENIED), "{}", show(&o));
    // Session 3: a refused startup, session 4: a denied statement seen by psycopg.
    let o = e.psql("options='-c role=postgres'", &["-c", "SELECT 1"]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    e.python(PY_PIPELINE, &[&e.conninfo("")]);
    let sessions = e.d.wait_for_sessions(4);
    assert_eq!(sessions.len(), 4, "{sessions:#?}");

    for s in &sessions {
        assert_eq!(s["protocol"], "postgres", "{s}");
        assert_eq!(s["target"], "app", "{s}");
        assert_eq!(s["agent"]["name"], "agent", "{s}");
    }
    let id = |s: &Value| s["id"].clone();
    let s1 = &first[0];
    assert_eq!(
        (
            s1["statements_allowed"].as_u64(),
            s1["statements_denied"].as_u64()
        ),
        (Some(1), Some(0)),
        "{s1}"
    );
    let later: Vec<&Value> = sessions.iter().filter(|s| id(s) != id(s1)).collect();
    let with_denials = later
        .iter()
        .filter(|s| s["statements_denied"].as_u64().unwrap_or(0) > 0)
        .count();
    assert_eq!(
        with_denials, 2,
        "the psql and the psycopg sessions each had a denial: {later:#?}"
    );
    assert!(
        later
            .iter()
            .any(|s| s["statements_allowed"] == 1 && s["statements_denied"] == 1),
        "psql -c 'SELECT 1' -c 'DELETE …': {later:#?}"
    );
    assert!(
        later.iter().any(|s| s["statements_allowed"] == 0
            && s["statements_denied"] == 0
            && !s["error"].is_null()),
        "the refused startup is recorded with its error: {later:#?}"
    );

    // Nowhere the daemon writes: its log, the session log, anything in its state directory.
    let pw = &e.pg.ro_password;
    assert!(
        !e.d.log().contains(pw.as_str()),
        "daemon log has the password"
    );
    let mut files = vec![e.d.dir.join("state/sessions.jsonl")];
    assert!(files[0].exists());
    for f in std::fs::read_dir(e.d.dir.join("state")).unwrap().flatten() {
        files.push(f.path());
    }
    for f in files {
        if f.is_file() {
            let bytes = std::fs::read(&f).unwrap();
            assert!(
                !bytes.windows(pw.len()).any(|w| w == pw.as_bytes()),
                "{} contains the password",
                f.display()
            );
        }
    }
    // Nor did any agent see it (psql's output, the server's parameter statuses).
    assert!(!stdout(&o).contains(pw.as_str()) && !stderr(&o).contains(pw.as_str()));
}

/// SJIS (and BIG5, GBK…) can swallow a backslash into a multibyte character: with such a client
/// encoding the server would read `E'…\'…'` differently from the classifier. Refused at startup
/// and as a SET.
#[test]
fn client_encodings_that_change_how_bytes_parse_are_refused() {
    if skip_unless_root("client_encodings_that_change_how_bytes_parse_are_refused") {
        return;
    }
    let e = env();
    let o = e.psql("client_encoding=SJIS", &["-c", "SELECT 1"]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(
        stderr(&o).contains("client_encoding `SJIS` is not allowed"),
        "{}",
        show(&o)
    );
    let o = e.psql(
        "",
        &[
            "-c",
            "SET client_encoding = 'SJIS'",
            "-c",
            "SHOW client_encoding",
        ],
    );
    assert!(stderr(&o).contains(DENIED), "{}", show(&o));
    assert_eq!(
        stdout(&o).trim(),
        "UTF8",
        "the encoding did not change: {}",
        show(&o)
    );
    assert_eq!(
        e.psql_ok(&["-c", "SELECT 1"]).trim(),
        "1",
        "UTF8 clients work"
    );
}

/// `(x).f` is `f(x)` in PostgreSQL. For the target's own functions (an extension's, an
/// application's), which no built-in list knows, the daemon reads the catalog at login.
#[test]
fn attribute_notation_calls_to_the_targets_own_functions_are_judged() {
    if skip_unless_root("attribute_notation_calls_to_the_targets_own_functions_are_judged") {
        return;
    }
    let pg = Postgres::start();
    pg.psql_super(
        "app",
        "CREATE FUNCTION public.touch(int) RETURNS int LANGUAGE sql AS 'SELECT $1 + 1'",
    );
    let e = env_with_pg(pg);
    for sql in [
        "SELECT (1).touch",
        "SELECT touch(1)",
        "SELECT t.touch FROM (SELECT 1) AS t(x)",
    ] {
        let o = e.psql("", &["-v", "VERBOSITY=verbose", "-c", sql]);
        assert!(
            stderr(&o).contains(DENIED) && stderr(&o).contains("functions: touch"),
            "{sql}: {}",
            show(&o)
        );
    }
    assert_eq!(
        e.psql_ok(&["-c", "SELECT u.id FROM users u WHERE u.id = 1"])
            .trim(),
        "1"
    );
}
