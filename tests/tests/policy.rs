//! Policy files end to end (issue 4): reload on file change and SIGHUP, a broken file never
//! replacing a good one, grants expiring, all seen by one live psycopg session whose next
//! statement follows the newest policy.

use chaperone_tests::{LineAgent, OutputBounded, Postgres, TestDaemon, skip_unless_root};
use serde_json::Value;
use std::{process::Stdio, time::Duration};

/// A psycopg agent holding one connection: runs each SQL line of stdin, answers one JSON line.
const PY_SESSION: &str = r#"
import json, sys, psycopg
conn = psycopg.connect(sys.argv[1], autocommit=True)
for line in sys.stdin:
    try:
        # "PREPARED <sql>": a server-side prepared statement (Parse once, then Bind/Execute).
        prepared = line.startswith("PREPARED ")
        sql = line[len("PREPARED "):] if prepared else line
        rows = conn.execute(sql, prepare=prepared).fetchall()
        print(json.dumps({"rows": [[str(v) for v in r] for r in rows]}), flush=True)
    except psycopg.Error as e:
        print(json.dumps({"sqlstate": e.sqlstate, "message": str(e)}), flush=True)
"#;

struct Session(LineAgent);

impl Session {
    fn start(d: &TestDaemon, pg: &Postgres) -> Self {
        let conn = format!(
            "host=127.0.0.1 port={} dbname=app user=whoever sslmode=disable",
            pg.port
        );
        let child = d
            .cmd()
            .args(["run", "--as", "agent", "--user", "nobody", "--"])
            .args(["python3", "-c", PY_SESSION, &conn])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        Self(LineAgent::new(child))
    }

    fn sql(&mut self, sql: &str) -> Value {
        self.0.ask(sql)
    }
}

/// Replace `path` at once (write aside, rename), as an editor or config manager should: the
/// daemon must never see half a file.
fn replace_file(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn grant(objects: &str, expires: Option<&str>) -> String {
    let mut g = format!(
        "  - name: agent-reads\n    identity: agent\n    target: app\n    effect: allow\n    sql:\n      \
         classes: [read, session, transaction]\n      objects: [{objects}, \"pg_catalog.*\"]\n"
    );
    if let Some(e) = expires {
        g.push_str(&format!("    expires: \"{e}\"\n"));
    }
    g
}

fn denied(v: &Value) -> bool {
    v["sqlstate"] == "42501"
}

#[test]
fn reloads_apply_to_the_next_statement_and_a_broken_file_never_replaces_a_good_one() {
    if skip_unless_root(
        "reloads_apply_to_the_next_statement_and_a_broken_file_never_replaces_a_good_one",
    ) {
        return;
    }
    let pg = Postgres::start();
    let d = TestDaemon::start(pg.daemon_options_with_grants(&grant("\"public.*\"", None)));
    let mut s = Session::start(&d, &pg);
    let select = "SELECT count(*) FROM users";
    let prepared = "PREPARED SELECT count(*) FROM users WHERE id > 0";
    assert_eq!(s.sql(select)["rows"][0][0], "3");
    assert_eq!(s.sql(prepared)["rows"][0][0], "3");

    // Narrow the grant by editing the file: the same session's next statement is denied,
    // including a statement it prepared before (its Bind is judged again).
    let good = std::fs::read_to_string(&d.config).unwrap();
    let narrow = good.replace("\"public.*\"", "\"public.orders\"");
    assert_ne!(good, narrow);
    replace_file(&d.config, &narrow);
    assert_eq!(
        d.wait_for_audits("policy_reloaded", 1).len(),
        1,
        "{}",
        d.log()
    );
    let v = s.sql(select);
    assert!(denied(&v), "{v}");

    // A broken file is refused whole, with where and what; the narrow policy stays in force.
    let broken = narrow.replace("effect: allow", "effect: perhaps");
    replace_file(&d.config, &broken);
    let failed = d.wait_for_audits("policy_reload_failed", 1);
    assert_eq!(failed.len(), 1, "{}", d.log());
    let err = failed[0]["error"].as_str().unwrap();
    let line = broken.lines().position(|l| l.contains("perhaps")).unwrap() + 1;
    assert!(
        err.contains(&format!("chaperone.yaml:{line}:"))
            && err.contains("unknown variant `perhaps`"),
        "{err}"
    );
    assert!(denied(&s.sql(select)));

    // Restore the broad grant, then ask for a reload by SIGHUP as well.
    replace_file(&d.config, &good);
    assert_eq!(d.wait_for_audits("policy_reloaded", 2).len(), 2);
    assert_eq!(s.sql(select)["rows"][0][0], "3");
    assert_eq!(s.sql(prepared)["rows"][0][0], "3", "allowed again");
    d.signal(libc::SIGHUP);
    let reloads = d.wait_for_audits("policy_reloaded", 3);
    assert_eq!(reloads.last().unwrap()["trigger"], "SIGHUP", "{reloads:?}");
    assert_eq!(
        s.sql(select)["rows"][0][0],
        "3",
        "the daemon is alive and serving"
    );
}

#[test]
fn an_expired_grant_stops_applying_with_an_audit_event() {
    if skip_unless_root("an_expired_grant_stops_applying_with_an_audit_event") {
        return;
    }
    let pg = Postgres::start();
    let expires = chrono_like_in(4);
    let d =
        TestDaemon::start(pg.daemon_options_with_grants(&grant("\"public.*\"", Some(&expires))));
    let mut s = Session::start(&d, &pg);
    let select = "SELECT count(*) FROM users";
    assert_eq!(s.sql(select)["rows"][0][0], "3");
    let expired = d.wait_for_audits("grant_expired", 1);
    assert_eq!(expired.len(), 1, "{}", d.log());
    assert_eq!(expired[0]["grant"], "agent-reads");
    std::thread::sleep(Duration::from_millis(200));
    let v = s.sql(select);
    assert!(denied(&v), "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("no grant allows"),
        "{v}"
    );
}

/// An RFC 3339 UTC time `secs` from now (via `date`, to keep the tests free of a date crate).
fn chrono_like_in(secs: u64) -> String {
    let out = std::process::Command::new("date")
        .args([
            "-u",
            "-d",
            &format!("+{secs} seconds"),
            "+%Y-%m-%dT%H:%M:%SZ",
        ])
        .output_bounded()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Every kind of mistake in a policy file is reported with its file, line (and column where
/// YAML has one) and what was expected; nothing here needs root or a daemon.
#[test]
fn policy_file_mistakes_get_precise_errors() {
    let dir = std::env::temp_dir().join(format!("chaperone-policy-errors-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let target = "targets:\n  - {name: app, protocol: tcp, address: 127.0.0.1, port: 5432}\n";
    let cases: &[(&str, String, &str)] = &[
        (
            "yaml syntax",
            format!("{target}grants:\n  - identity: a\n   target: app\n"),
            "f.yaml:4:",
        ),
        (
            "unknown field",
            format!(
                "{target}grants:\n  - {{identity: a, target: app, effect: allow, efect: deny}}\n"
            ),
            "unknown field `efect`",
        ),
        (
            "unknown effect",
            format!("{target}grants:\n  - identity: a\n    target: app\n    effect: permit\n"),
            "f.yaml:6:13: grants[0].effect: unknown variant `permit`, expected one of `allow`, `deny`, `review`",
        ),
        (
            "unknown class",
            format!(
                "{target}grants:\n  - identity: a\n    target: app\n    effect: allow\n    sql: {{classes: [reads]}}\n"
            ),
            "unknown variant `reads`",
        ),
        (
            "two whos",
            format!("{target}grants:\n  - {{identity: a, group: g, target: app, effect: allow}}\n"),
            "exactly one of `identity`, `subject` or `group`",
        ),
        (
            "no who",
            format!("{target}grants:\n  - {{target: app, effect: allow}}\n"),
            "exactly one of",
        ),
        (
            "bad date",
            format!(
                "{target}grants:\n  - {{identity: a, target: app, effect: allow, expires: 31/12/2026}}\n"
            ),
            "`31/12/2026` is not a date (YYYY-MM-DD)",
        ),
        (
            "unknown target",
            format!("{target}grants:\n  - identity: a\n    target: ap\n    effect: allow\n"),
            "f.yaml:4: no target named `ap`",
        ),
        (
            "bad port",
            "targets:\n  - {name: app, protocol: tcp, address: 127.0.0.1, port: http}\n".into(),
            "f.yaml:2:",
        ),
        (
            "duplicate target",
            format!("{target}  - {{name: app, protocol: tcp, address: 127.0.0.2, port: 1}}\n"),
            "target `app` is defined twice",
        ),
        (
            "symmetric oidc",
            "oidc: {issuer: 'https://id.example', audience: c, algorithms: [HS256]}\n".into(),
            "HmacSha256 is not accepted",
        ),
    ];
    let mut wrong = Vec::new();
    for (what, text, expect) in cases {
        let f = dir.join("f.yaml");
        std::fs::write(&f, text).unwrap();
        let out = std::process::Command::new(chaperone_tests::chaperone_bin())
            .args([
                "--config",
                f.to_str().unwrap(),
                "policy",
                "explain",
                "--as",
                "a",
            ])
            .output_bounded()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.code() != Some(2) || !err.contains(expect) || !err.contains("f.yaml") {
            wrong.push(format!(
                "{what}: expected `{expect}`, got {:?}: {err}",
                out.status.code()
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `policy explain` and `policy check` work offline, for names and for OIDC groups.
#[test]
fn explain_and_check_work_offline_for_names_and_groups() {
    let dir = std::env::temp_dir().join(format!("chaperone-explain-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("10-targets.yaml"),
        "targets:\n  - {name: app, protocol: postgres, address: 127.0.0.1, port: 5432, credential: c}\nsecrets_file: /nonexistent\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("20-grants.yaml"),
        "grants:\n  - name: readers-read\n    group: readers\n    target: app\n    effect: allow\n    \
         sql: {classes: [read], objects: [\"public.*\"]}\n    expires: 2099-01-31\n    review_by: 2099-01-01\n  \
         - name: old\n    identity: alice\n    target: app\n    effect: allow\n    expires: 2001-01-01\n",
    )
    .unwrap();
    let chaperone = |args: &[&str]| {
        std::process::Command::new(chaperone_tests::chaperone_bin())
            .arg("--config")
            .arg(&dir)
            .args(args)
            .output_bounded()
            .unwrap()
    };
    let out = chaperone(&[
        "--json", "policy", "explain", "--as", "alice", "--group", "readers",
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let grants = v["grants"].as_array().unwrap();
    assert_eq!(grants.len(), 2, "{v}");
    assert_eq!(grants[0]["rule"], "readers-read");
    assert_eq!(grants[0]["status"], "in force");
    assert!(
        grants[0]["source"]["file"]
            .as_str()
            .unwrap()
            .ends_with("20-grants.yaml")
    );
    assert_eq!(grants[0]["source"]["line"], 2);
    assert_eq!(grants[0]["expires"], "2099-02-01T00:00:00Z");
    assert_eq!(grants[1]["status"], "expired");
    let text = String::from_utf8_lossy(&chaperone(&["policy", "explain", "--as", "bob"]).stdout)
        .into_owned();
    assert!(text.contains("no grant applies to bob"), "{text}");

    let check = |who: &[&str]| {
        let mut args = vec![
            "--json",
            "policy",
            "check",
            "--target",
            "app",
            "--sql",
            "SELECT * FROM public.users",
        ];
        args.extend_from_slice(who);
        let out = chaperone(&args);
        (
            out.status.code(),
            serde_json::from_slice::<Value>(&out.stdout).unwrap_or(Value::Null),
        )
    };
    let (code, v) = check(&["--as", "bob", "--group", "readers"]);
    assert_eq!(
        (code, v["verdict"].as_str()),
        (Some(0), Some("allow")),
        "{v}"
    );
    assert_eq!(v["rule"], "readers-read");
    let (code, v) = check(&["--as", "alice"]);
    assert_eq!(
        (code, v["verdict"].as_str()),
        (Some(1), Some("deny")),
        "expired grant: {v}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Grants that name a raw TCP target decide who may connect to it (deny wins, no applying
/// grant: refused); the decision is recorded.
#[test]
fn grants_on_a_tcp_target_decide_who_connects() {
    if skip_unless_root("grants_on_a_tcp_target_decide_who_connects") {
        return;
    }
    let echo = chaperone_tests::EchoServer::start("127.0.0.1:0");
    let port = echo.addr.port();
    let d = TestDaemon::start(chaperone_tests::DaemonOptions {
        targets: vec![("echo".into(), "127.0.0.1".into(), port)],
        extra_yaml: "grants:\n  - {identity: alice, target: echo, effect: allow}\n  \
                     - {identity: mallory, target: echo, effect: allow}\n  \
                     - {name: no-mallory, identity: mallory, target: echo, effect: deny}\n"
            .into(),
        ..Default::default()
    });
    let probe = format!(
        "import socket\ntry:\n    s = socket.create_connection(('127.0.0.1', {port}), timeout=10)\n    \
         s.sendall(b'hi')\n    print(s.recv(2) == b'hi')\nexcept OSError as e:\n    print(type(e).__name__)\n"
    );
    let run = |who: &str| {
        let out = d.run_agent(who, &["python3", "-c", &probe]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(run("alice"), "True");
    assert_ne!(run("bob"), "True", "no grant applies to bob");
    assert_ne!(run("mallory"), "True", "deny wins");
    assert_eq!(echo.accepted(), 1, "only alice reached the server");
    let sessions = d.wait_for_sessions(3);
    let reason = |who: &str| {
        sessions
            .iter()
            .find(|s| s["agent"]["name"] == who)
            .map(|s| (s["verdict"].clone(), s["reason"].clone()))
            .unwrap_or_else(|| panic!("{who}: {sessions:#?}"))
    };
    assert_eq!(reason("bob").0, "deny");
    assert!(
        reason("bob")
            .1
            .as_str()
            .unwrap()
            .contains("no grant allows bob"),
        "{:?}",
        reason("bob")
    );
    assert_eq!(reason("mallory").1, "no-mallory");
}

/// The daemon reads policy only from root's files that only root can write, and refuses a
/// reload that would change targets under live sessions.
#[test]
fn untrusted_configuration_files_and_target_changes_on_reload_are_refused() {
    if skip_unless_root("untrusted_configuration_files_and_target_changes_on_reload_are_refused") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let mut d = TestDaemon::start(chaperone_tests::DaemonOptions {
        targets: vec![("web".into(), "127.0.0.1".into(), 9)],
        ..Default::default()
    });
    let text = std::fs::read_to_string(&d.config).unwrap();
    replace_file(&d.config, &text.replace("port: 9}", "port: 10}"));
    let failed = d.wait_for_audits("policy_reload_failed", 1);
    assert_eq!(failed.len(), 1, "{}", d.log());
    assert!(
        failed[0]["error"]
            .as_str()
            .unwrap()
            .contains("targets changed"),
        "{failed:?}"
    );
    d.stop();

    std::fs::set_permissions(&d.config, std::fs::Permissions::from_mode(0o664)).unwrap();
    let out = d.cmd().arg("daemon").output_bounded().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("writable by group or others"), "{err}");
    std::fs::set_permissions(&d.config, std::fs::Permissions::from_mode(0o644)).unwrap();
}

/// `chaperone mask --as` applies the masking of the grants that apply to the identity, then the
/// configuration's, offline.
#[test]
fn mask_as_an_identity_applies_its_grants_masking() {
    let dir = std::env::temp_dir().join(format!("chaperone-mask-as-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("c.yaml");
    std::fs::write(
        &cfg,
        "targets: [{name: app, protocol: tcp, address: 127.0.0.1, port: 1}]\n\
         masking: {rules: [{name: cards-partial, kinds: [card], method: partial}]}\n\
         grants:\n  - {group: staff, target: app, effect: allow, masking: {rules: [{name: staff-keep, kinds: [email], method: keep}]}}\n",
    )
    .unwrap();
    let mask = |args: &[&str]| {
        use std::io::Write;
        let mut child = std::process::Command::new(chaperone_tests::chaperone_bin())
            .arg("--config")
            .arg(&cfg)
            .arg("--json")
            .arg("mask")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"ada@example.com paid with 5555 5555 5555 4444\n")
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["masked"].as_str().unwrap().to_string()
    };
    let staff = mask(&["--as", "alice", "--group", "staff"]);
    assert!(staff.starts_with("ada@example.com paid with "), "{staff}");
    assert!(
        staff.ends_with("4444") && !staff.contains("5555 5555"),
        "{staff}"
    );
    let other = mask(&["--as", "bob", "--group", "readers", "--target", "app"]);
    assert!(other.starts_with("**** paid with "), "{other}");
    assert_eq!(mask(&[]), other, "no identity: the configuration's rules");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A command's error is one line that says each cause once, plain or as `{"error": …}` with
/// `--json`: many errors name their cause in their own message, and the cause chain after it
/// must not repeat it.
#[test]
fn command_errors_say_each_cause_once() {
    for json in [false, true] {
        let mut cmd = std::process::Command::new(chaperone_tests::chaperone_bin());
        cmd.args(["--config", "/nonexistent/chaperone.yaml"]);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.arg("status").output_bounded().unwrap();
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        let message = if json {
            let v: Value = serde_json::from_str(err.trim()).unwrap();
            v["error"].as_str().unwrap().to_string()
        } else {
            err.trim().strip_prefix("chaperone: ").unwrap().to_string()
        };
        assert!(message.contains("/nonexistent/chaperone.yaml"), "{message}");
        assert_eq!(
            message.matches("No such file or directory").count(),
            1,
            "{message}"
        );
    }
}
