//! Masking results in flight, end to end: a real PostgreSQL 15, the real daemon (masking on by
//! default), unmodified clients (psql, pgbench, psycopg, and a hand-written extended-protocol
//! client) run as agents. Each test checks what the client decoded and that no sensitive value
//! reached it, and the session record counts what was masked without holding a value.

use chaperone_tests::{
    DaemonOptions, Postgres, TestDaemon, assert_ok, last_json, skip_unless_root,
};
use serde_json::Value;
use std::{os::unix::fs::PermissionsExt, path::PathBuf, process::Output};

/// What `customers` holds that must never reach the agent (compared case-insensitively).
const SECRETS: &[&str] = &[
    "ada@example.com",
    "brian@example.com",
    "5555555555554444",
    "378282246310005",
    "jane.doe@example.org",
    "5555 5555 5555 4444",
    "bob@example.net",
    "carol@example.com",
    "10.1.2.3",
];

const SETUP: &str = "CREATE TYPE tier AS ENUM ('gold', 'silver');
     CREATE TABLE customers(id int PRIMARY KEY, email text, card text, notes text,
       ip inet, doc jsonb, tags text[], tier tier);
     INSERT INTO customers VALUES
       (1, 'ada@example.com', '5555555555554444', 'call jane.doe@example.org re 5555 5555 5555 4444',
        '10.1.2.3', '{\"contact\": \"bob@example.net\", \"n\": 1}', '{x,carol@example.com}', 'gold'),
       (2, 'brian@example.com', '378282246310005', 'nothing to see', NULL, '{\"n\": 2}', '{y}', NULL);
     CREATE TABLE signups(email text UNIQUE);
     INSERT INTO signups VALUES ('ada@example.com');
     GRANT SELECT ON customers, signups TO agent_ro;
     GRANT INSERT ON signups TO agent_ro;";

/// A grant that also allows writes (for the unique-violation test).
const WRITE_GRANT: &str = "  - identity: agent\n    target: app\n    effect: allow\n    sql:\n      \
     classes: [read, write, session, transaction]\n      objects: [\"public.*\", \"pg_catalog.*\", \"information_schema.*\"]\n";

struct Env {
    pg: Postgres,
    d: TestDaemon,
}

/// A server with `customers` and `signups`, and a daemon with `masking` (YAML, may be empty)
/// and a grant that reads and writes.
fn env(masking: &str) -> Env {
    let pg = Postgres::start();
    pg.psql_super("app", SETUP);
    let mut opts: DaemonOptions = pg.daemon_options_with_grants(WRITE_GRANT);
    opts.extra_yaml.push_str(masking);
    let d = TestDaemon::start(opts);
    Env { pg, d }
}

impl Env {
    fn conninfo(&self) -> String {
        self.pg.agent_conninfo("")
    }

    fn agent(&self, args: &[&str]) -> Output {
        self.d.run_agent_timed("agent", args)
    }

    fn psql(&self, args: &[&str]) -> Output {
        let conn = self.conninfo();
        let mut full = vec!["psql", "-X", "-A", "-t", &conn];
        full.extend_from_slice(args);
        self.agent(&full)
    }

    fn psql_ok(&self, args: &[&str]) -> String {
        let out = assert_ok(&self.psql(args), &format!("psql {args:?}"));
        no_secrets(&out);
        out
    }

    /// `python3 -c SCRIPT <conninfo>` as the agent; the JSON it prints last.
    fn python(&self, script: &str) -> Value {
        let conn = self.conninfo();
        let out = assert_ok(
            &self.agent(&["python3", "-c", script, &conn]),
            "python agent",
        );
        no_secrets(&out);
        last_json(&out)
    }

    /// A file the agent (user nobody) can read.
    fn agent_file(&self, name: &str, content: &str) -> PathBuf {
        std::fs::set_permissions(&self.d.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let p = self.d.dir.join(name);
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        p
    }
}

#[track_caller]
fn no_secrets(text: &str) {
    let lower = text.to_lowercase();
    for s in SECRETS {
        assert!(!lower.contains(s), "{s} leaked:\n{text}");
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn psql_results_are_masked_whatever_the_query_shape() {
    if skip_unless_root("psql_results_are_masked_whatever_the_query_shape") {
        return;
    }
    let e = env("");
    let out = e.psql_ok(&["-c", "SELECT * FROM customers ORDER BY id"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!(
        lines[0],
        "1|****|****|call **** re ****|****|{\"n\": 1, \"contact\": \"****\"}|{x,****}|gold",
        "{out}"
    );
    assert!(
        lines[1].starts_with("2|****|****|nothing to see||"),
        "{out}"
    );
    // Derived values: JSON built from a row, aggregates, aliases, functions of a column.
    for sql in [
        "SELECT row_to_json(c) FROM customers c",
        "SELECT string_agg(email || ' ' || card, ', ') FROM customers",
        "SELECT email AS e, upper(email) AS u, card AS x FROM customers",
        "SELECT json_agg(tags) FROM customers",
    ] {
        let out = e.psql_ok(&["-c", sql]);
        assert!(out.contains("****"), "{sql}: {out}");
    }
}

#[test]
fn copy_out_is_masked_field_by_field_and_binary_copy_is_refused() {
    if skip_unless_root("copy_out_is_masked_field_by_field_and_binary_copy_is_refused") {
        return;
    }
    let e = env("");
    let out = e.psql_ok(&["-c", "\\copy customers to stdout"]);
    for line in out.lines() {
        assert_eq!(line.matches('\t').count(), 7, "{out}");
    }
    assert!(
        out.starts_with("1\t****\t****\tcall **** re ****\t****\t"),
        "{out}"
    );
    assert!(out.contains("\t\\N\t"), "NULL stays NULL: {out}");
    let out = e.psql_ok(&[
        "-c",
        "COPY (SELECT email, notes FROM customers ORDER BY id) TO STDOUT",
    ]);
    assert_eq!(out, "****\tcall **** re ****\n****\tnothing to see\n");
    let out = e.psql_ok(&[
        "-c",
        "COPY (SELECT id, notes, doc FROM customers ORDER BY id) TO STDOUT WITH (FORMAT csv, HEADER)",
    ]);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "id,notes,doc",
            "1,\"call **** re ****\",\"{\"\"n\"\": 1, \"\"contact\"\": \"\"****\"\"}\"",
            "2,nothing to see,\"{\"\"n\"\": 2}\""
        ],
        "{out}"
    );
    let o = e.psql(&["-c", "COPY customers TO STDOUT (FORMAT binary)"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(
        stderr(&o).contains("binary COPY output cannot be masked"),
        "{}",
        stderr(&o)
    );
    no_secrets(&String::from_utf8_lossy(&o.stdout));
    // The session goes on after the refusal.
    let o = e.psql(&[
        "-c",
        "COPY customers TO STDOUT (FORMAT binary)",
        "-c",
        "SELECT count(*) FROM customers",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "2",
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_unique_violation_does_not_echo_the_value() {
    if skip_unless_root("a_unique_violation_does_not_echo_the_value") {
        return;
    }
    let e = env("");
    let o = e.psql(&["-c", "INSERT INTO signups VALUES ('ada@example.com')"]);
    let err = stderr(&o);
    assert!(
        err.contains("duplicate key value violates unique constraint"),
        "{err}"
    );
    assert!(err.contains("Key (email)=(****) already exists"), "{err}");
    no_secrets(&err);
    // Denials are still ours, and still masked alike.
    let o = e.psql(&["-c", "DROP TABLE signups"]);
    assert!(
        stderr(&o).contains("chaperone: statement denied by policy"),
        "{}",
        stderr(&o)
    );
}

const PY_TYPED: &str = r#"
import json, sys, psycopg
out = {}
with psycopg.connect(sys.argv[1]) as conn:
    cur = conn.execute("SELECT id, email, ip, doc, tags FROM customers ORDER BY id")
    out["types"] = [d.type_code for d in cur.description]
    out["text"] = [[str(v) if v is not None else None for v in r] for r in cur.fetchall()]
    cur = conn.cursor(binary=True)
    cur.execute("SELECT id, email, doc, tags, card, tier FROM customers ORDER BY id")
    # psycopg gives unregistered types (the enum) in binary as bytes.
    plain = lambda v: json.dumps(v) if isinstance(v, dict) else v.decode() if isinstance(v, bytes) else v
    out["binary"] = [[plain(v) for v in r] for r in cur.fetchall()]
    # Prepared statements: psycopg prepares on the first run with prepare=True.
    for _ in range(3):
        r = conn.execute("SELECT email, id FROM customers WHERE id = %s", [1], prepare=True).fetchone()
    out["prepared"] = [r[0], r[1]]
    cur = conn.cursor(binary=True)
    for _ in range(3):
        cur.execute("SELECT email, id, card FROM customers WHERE id = %s", [2], prepare=True)
    out["prepared_binary"] = list(cur.fetchone())
print(json.dumps(out))
"#;

/// A hand-written extended-protocol client as tokio-postgres or JDBC speak it: Parse and
/// Describe a named statement once, then Bind (binary results) and Execute without Describe.
const PY_RAW_EXTENDED: &str = r#"
import json, socket, struct, sys
kv = dict(p.split("=", 1) for p in sys.argv[1].split())
s = socket.create_connection((kv["host"], int(kv["port"])))
def send(tag, body): s.sendall(tag + struct.pack("!i", len(body) + 4) + body)
body = struct.pack("!i", 196608) + b"user\0x\0database\0app\0\0"
s.sendall(struct.pack("!i", len(body) + 4) + body)
buf = b""
def frames_until_z():
    global buf
    out = []
    while True:
        while len(buf) < 5 or len(buf) < 1 + struct.unpack("!i", buf[1:5])[0]:
            buf += s.recv(65536)
        n = struct.unpack("!i", buf[1:5])[0]
        tag, body, buf = buf[0:1], buf[5:1 + n], buf[1 + n:]
        out.append((tag, body))
        if tag == b"Z":
            return out
def data_rows(frames):
    out = []
    for tag, body in frames:
        if tag == b"D":
            n, pos, vals = struct.unpack("!h", body[:2])[0], 2, []
            for _ in range(n):
                l = struct.unpack("!i", body[pos:pos + 4])[0]; pos += 4
                vals.append(None if l < 0 else body[pos:pos + l].hex()); pos += max(l, 0)
            out.append(vals)
    return out
frames_until_z()
send(b"P", b"s1\0SELECT email, id, notes FROM customers ORDER BY id\0\0\0")
send(b"D", b"Ss1\0")
send(b"S", b"")
described = frames_until_z()
rows = []
for _ in range(2):
    send(b"B", b"\0s1\0" + struct.pack("!hhh", 0, 0, 1) + struct.pack("!h", 1))
    send(b"E", b"\0" + struct.pack("!i", 0))
    send(b"S", b"")
    rows += data_rows(frames_until_z())
# A named portal in a transaction, fetched one row at a time over two Syncs (as JDBC does with
# a fetch size): the second Execute comes with no Bind and no Describe.
send(b"Q", b"BEGIN\0"); frames_until_z()
send(b"B", b"p1\0s1\0" + struct.pack("!hhh", 0, 0, 1) + struct.pack("!h", 1))
send(b"E", b"p1\0" + struct.pack("!i", 1))
send(b"S", b"")
portal_rows = data_rows(frames_until_z())
send(b"E", b"p1\0" + struct.pack("!i", 1))
send(b"S", b"")
portal_rows += data_rows(frames_until_z())
send(b"Q", b"COMMIT\0"); frames_until_z()
print(json.dumps({"tags": [t.decode() for t, _ in described], "rows": rows, "portal_rows": portal_rows}))
"#;

#[test]
fn typed_clients_decode_masked_columns_and_the_record_counts_without_values() {
    if skip_unless_root("typed_clients_decode_masked_columns_and_the_record_counts_without_values")
    {
        return;
    }
    let mut e = env(
        "masking:\n  rules:\n    - {name: ids, columns: [\"public.customers.id\"]}\n    - {name: cards, kinds: [card], method: token}\n",
    );
    // psql: an integer column under a column rule comes back as the text `****`, also aliased.
    let out = e.psql_ok(&[
        "-c",
        "SELECT id AS n, 7 AS seven FROM customers ORDER BY email",
    ]);
    assert_eq!(out, "****|7\n****|7\n");

    // COPY of a table: its columns are known, so column rules apply there too (not to the
    // header row).
    let out = e.psql_ok(&[
        "-c",
        "\\copy customers (email, id) to stdout with csv header",
    ]);
    assert_eq!(out, "email,id\n\"****\",\"****\"\n\"****\",\"****\"\n");

    let out = e.python(PY_TYPED);
    // id retyped as text (25); inet (869) retyped as text; jsonb and text[] keep their types.
    assert_eq!(
        out["types"],
        serde_json::json!([25, 25, 25, 3802, 1009]),
        "{out:#}"
    );
    assert_eq!(out["text"][0][0], "****", "{out:#}");
    assert_eq!(out["text"][0][1], "****", "{out:#}");
    assert_eq!(out["text"][0][2], "****", "{out:#}");
    // Binary: text, jsonb and text[] values are read and masked; the integer under a rule is
    // withheld (NULL); a token is a token.
    let b = &out["binary"][0];
    assert!(b[0].is_null(), "{out:#}");
    assert_eq!(b[1], "****", "{out:#}");
    assert!(b[2].as_str().unwrap().contains("****"), "{out:#}");
    assert_eq!(b[3], serde_json::json!(["x", "****"]), "{out:#}");
    let token = b[4].as_str().unwrap().to_string();
    assert!(token.starts_with("tok_"), "{out:#}");
    // The target's enum travels as text in binary too: read, not withheld.
    assert_eq!(b[5], "gold", "{out:#}");
    assert_eq!(
        out["prepared"],
        serde_json::json!(["****", "****"]),
        "{out:#}"
    );
    assert_eq!(out["prepared_binary"][0], "****", "{out:#}");
    assert!(out["prepared_binary"][1].is_null(), "{out:#}");
    assert!(
        out["prepared_binary"][2]
            .as_str()
            .unwrap()
            .starts_with("tok_"),
        "{out:#}"
    );

    // Bind and Execute without Describe: the statement's own description applies.
    let raw = e.python(PY_RAW_EXTENDED);
    assert_eq!(
        raw["tags"],
        serde_json::json!(["1", "t", "T", "Z"]),
        "{raw:#}"
    );
    let hex = |s: &str| s.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    let rows = raw["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "{raw:#}");
    assert_eq!(rows[0][0], hex("****"), "{raw:#}");
    assert!(
        rows[0][1].is_null(),
        "binary integer under a rule withheld: {raw:#}"
    );
    // Both fetches read as the portal was bound: binary, the integer under a rule withheld.
    let portal = raw["portal_rows"].as_array().unwrap();
    assert_eq!(portal.len(), 2, "{raw:#}");
    for r in portal {
        assert_eq!(r[0], hex("****"), "{raw:#}");
        assert!(r[1].is_null(), "{raw:#}");
    }
    let notes = rows[0][2].as_str().unwrap();
    assert!(notes.starts_with(&hex("call **** re tok_")), "{raw:#}");

    // pgbench's prepared and extended modes through a masked table.
    let script = e.agent_file(
        "bench.sql",
        "SELECT email, notes FROM customers WHERE id = 1;\n",
    );
    for mode in ["prepared", "extended"] {
        let script = script.to_str().unwrap();
        let args =
            e.pg.agent_pgbench(&["-n", "-M", mode, "-t", "20", "-f", script]);
        let o = e.agent(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert_ok(&o, &format!("pgbench -M {mode}"));
    }

    // The record: which rules, how many values, never a value.
    // psql, two pythons, two pgbench runs of two connections each.
    let sessions = e.d.wait_for_sessions(7);
    let masked: Vec<&Value> = sessions.iter().map(|s| &s["masked"]).collect();
    let by_rule = |rule: &str| -> u64 {
        masked
            .iter()
            .filter_map(|m| m["by_rule"][rule].as_u64())
            .sum()
    };
    assert!(by_rule("ids") >= 6, "{sessions:#?}");
    assert!(by_rule("cards") >= 3, "{sessions:#?}");
    assert!(by_rule("builtin:email") >= 4, "{sessions:#?}");
    let log = std::fs::read_to_string(e.d.dir.join("state/sessions.jsonl")).unwrap();
    no_secrets(&log);
    assert!(!log.contains(&token), "a token is a value too");

    // The key is the daemon's own, private, and stable across restarts: so are tokens.
    let key = e.d.dir.join("state/mask.key");
    let meta = std::fs::metadata(&key).unwrap();
    assert_eq!((meta.len(), meta.permissions().mode() & 0o777), (32, 0o600));
    let card = |e: &Env| e.psql_ok(&["-c", "SELECT card FROM customers WHERE id = 2"]);
    let before = card(&e);
    e.d.stop();
    e.d.spawn();
    assert_eq!(card(&e), before);
    assert!(before.starts_with("tok_"), "{before}");
}
