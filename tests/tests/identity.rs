//! Identity end to end (issue 4): a real OpenID Provider (npm `oidc-provider`) issues ID tokens
//! through its own login and consent pages; `chaperone run --token-file` binds agents with them;
//! grants by group decide what each agent may do on a real PostgreSQL.

use chaperone_tests::{
    DaemonOptions, OidcProvider, OutputBounded, Postgres, TestDaemon, assert_ok, chaperone_bin,
    skip_unless_root, timed,
};
use serde_json::Value;
use std::{path::Path, process::Output};

/// Readers may read every table of public; writers only `public.orders` (which does not
/// exist): the same SELECT on `users` is allowed for one group and denied for the other.
const GROUP_GRANTS: &str = "  - group: readers
    target: app
    effect: allow
    sql:
      classes: [read, session, transaction]
      objects: [\"public.*\", \"pg_catalog.*\", \"information_schema.*\"]
  - group: writers
    target: app
    effect: allow
    sql:
      classes: [read, session, transaction]
      objects: [\"public.orders\", \"pg_catalog.*\"]
";

struct Env {
    pg: Postgres,
    op: OidcProvider,
    d: TestDaemon,
}

fn env(ttl_secs: u64) -> Env {
    env_with(GROUP_GRANTS, ttl_secs)
}

fn env_with(grants: &str, ttl_secs: u64) -> Env {
    env_with_oidc(grants, ttl_secs, "")
}

/// With more settings in the daemon's `oidc:` section (YAML lines indented by two).
fn env_with_oidc(grants: &str, ttl_secs: u64, oidc: &str) -> Env {
    let pg = Postgres::start();
    let op = OidcProvider::start(ttl_secs);
    let mut opts = pg.daemon_options_with_grants(grants);
    opts.extra_yaml.push_str(&op.config_yaml());
    opts.extra_yaml.push_str(oidc);
    let d = TestDaemon::start(opts);
    Env { pg, op, d }
}

/// One control-socket exchange: `request` as sent (a JSON line, or anything), the answer line
/// parsed.
fn control(socket: &Path, request: &[u8]) -> Value {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    // The daemon stops reading at its cap: what is past it may never be taken.
    let _ = s.write_all(request);
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

/// A `refresh` of `cgroup`'s token over the control socket.
fn refresh(socket: &Path, cgroup: &str, token: &str) -> Value {
    let request = serde_json::json!({"op": "refresh", "cgroup": cgroup, "token": token});
    control(socket, format!("{request}\n").as_bytes())
}

impl Env {
    /// An agent that sleeps for 20 s, bound with `token`, and its cgroup.
    fn bound_sleeper(&self, token: &str) -> (std::process::Child, String) {
        let file = self.op.token_file("bound", token);
        let agent = self
            .d
            .cmd()
            .arg("run")
            .arg("--token-file")
            .arg(&file)
            .args(["--user", "nobody", "--", "sleep", "20"])
            .spawn()
            .unwrap();
        let bound = self.d.wait_for_audits("agent_bound", 1);
        let cgroup = bound[0]["agent"]["cgroup"].as_str().unwrap().to_string();
        (agent, cgroup)
    }

    fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} dbname=app user=whoever connect_timeout=10 sslmode=disable",
            self.pg.port
        )
    }

    /// `chaperone run --token-file FILE -- ARGS…`, invoked by root (the agent drops to nobody).
    fn run_with_token(&self, token: &str, extra: &[&str], args: &[&str]) -> Output {
        let file = self.op.token_file(&format!("t-{}", rand_name()), token);
        self.d
            .cmd()
            .arg("run")
            .arg("--token-file")
            .arg(&file)
            .args(extra)
            .args(["--user", "nobody", "--"])
            .args(timed(args))
            .output_bounded()
            .unwrap()
    }

    /// The same, invoked by an unprivileged user: no root anywhere on the agent's side.
    fn run_unprivileged(&self, token_file: &Path, args: &[&str]) -> Output {
        std::process::Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
            .arg(chaperone_bin())
            .arg("--config")
            .arg(&self.d.config)
            .arg("run")
            .arg("--token-file")
            .arg(token_file)
            .arg("--")
            .args(args)
            .output_bounded()
            .unwrap()
    }

    fn psql_args<'a>(&'a self, conn: &'a str, sql: &'a str) -> Vec<&'a str> {
        vec!["psql", "-X", "-A", "-t", conn, "-c", sql]
    }

    /// Audit events of the session log.
    fn audits(&self) -> Vec<Value> {
        let out = self
            .d
            .cmd()
            .args(["--json", "sessions", "--all"])
            .output_bounded()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["event"] == "audit")
            .collect()
    }
}

fn rand_name() -> String {
    chaperone_tests::random_hex(6)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn agents_in_different_groups_get_different_verdicts_on_the_same_statement() {
    if skip_unless_root("agents_in_different_groups_get_different_verdicts_on_the_same_statement") {
        return;
    }
    let e = env(600);
    let conn = e.conninfo();
    let sql = "SELECT email FROM users ORDER BY id";

    let alice = e.run_with_token(
        &e.op.token("alice", "chaperone"),
        &[],
        &e.psql_args(&conn, sql),
    );
    let rows = assert_ok(&alice, "alice (readers) reads users");
    // Masked on the way (masking is on by default): three rows of `****`.
    assert_eq!(rows.matches("****").count(), 3, "{rows}");

    // Bob's `chaperone run` itself runs unprivileged: the token, not root, vouches for him.
    let bob_token = e.op.token_file("bob", &e.op.token("bob", "chaperone"));
    let bob = e.run_unprivileged(&bob_token, &timed(&e.psql_args(&conn, sql)));
    assert_eq!(
        bob.status.code(),
        Some(1),
        "bob (writers) is denied: {bob:?}"
    );
    assert!(
        stderr(&bob).contains("statement denied by policy"),
        "{}",
        stderr(&bob)
    );
    assert!(stderr(&bob).contains("no grant allows"), "{}", stderr(&bob));
    // The daemon's statement log lines carry who vouched.
    let log = e.d.log();
    assert!(
        log.lines().any(|l| l.contains("statement denied")
            && l.contains("subject=\"bob\"")
            && l.contains("groups=writers")),
        "{log}"
    );

    // Every session record carries who vouched, the subject, email and groups.
    let sessions = e.d.wait_for_sessions(2);
    let by = |sub: &str| {
        sessions
            .iter()
            .find(|s| s["agent"]["oidc"]["subject"] == sub)
            .unwrap_or_else(|| panic!("no session of {sub}: {sessions:#?}"))
            .clone()
    };
    let a = by("alice");
    assert_eq!(a["agent"]["name"], "alice@example.com");
    assert_eq!(a["agent"]["oidc"]["issuer"], e.op.issuer.as_str());
    assert_eq!(
        a["agent"]["oidc"]["groups"],
        serde_json::json!(["readers", "staff"])
    );
    assert_eq!(a["statements_allowed"], 1);
    let b = by("bob");
    assert_eq!(b["agent"]["oidc"]["email"], "bob@example.com");
    assert_eq!(b["statements_denied"], 1);

    // An unverified email is not an identity: carol is known by her subject.
    let carol = e.run_with_token(
        &e.op.token("carol", "chaperone"),
        &[],
        &e.psql_args(&conn, sql),
    );
    assert_ok(&carol, "carol (readers) reads users");
    let sessions = e.d.wait_for_sessions(3);
    assert!(
        sessions
            .iter()
            .any(|s| s["agent"]["name"] == "sub:carol" && s["agent"]["oidc"].get("email").is_none()),
        "{sessions:#?}"
    );
    let bound = e
        .audits()
        .into_iter()
        .filter(|a| a["audit"] == "agent_bound")
        .count();
    assert_eq!(bound, 3);
}

#[test]
fn tokens_that_prove_nothing_are_refused_before_the_agent_starts() {
    if skip_unless_root("tokens_that_prove_nothing_are_refused_before_the_agent_starts") {
        return;
    }
    let e = env(600);
    let good = e.op.token("alice", "chaperone");
    let mut parts: Vec<String> = good.split('.').map(str::to_string).collect();
    // Tampered: bob's groups in alice's signed token.
    let claims = String::from_utf8(base64url_decode(&parts[1])).unwrap();
    parts[1] = base64url_encode(claims.replace("\"readers\"", "\"writers\"").as_bytes());
    let tampered = parts.join(".");
    let marker = std::env::temp_dir().join(format!("ran-{}", rand_name()));
    let touch = ["touch", marker.to_str().unwrap()];
    for (what, token, extra, expect) in [
        (
            "another audience",
            e.op.token("alice", "other-app"),
            vec![],
            "Invalid audiences",
        ),
        (
            "an unknown key",
            e.op.forged("alice"),
            vec![],
            "No matching key",
        ),
        (
            "a tampered token",
            tampered,
            vec![],
            "Signature verification failed",
        ),
        (
            "garbage",
            "not-a-token".to_string(),
            vec![],
            "not a JWT ID token",
        ),
        // Signed with the provider's own key, but with one claim wrong.
        (
            "a token not valid yet",
            e.op.signed("alice", r#"{"nbf": 99999999999}"#),
            vec![],
            "not valid before",
        ),
        (
            "a token without expiry",
            e.op.signed("alice", r#"{"exp": null}"#),
            vec![],
            "exp",
        ),
        (
            "a token for us and someone else",
            e.op.signed("alice", r#"{"aud": ["chaperone", "evil"]}"#),
            vec![],
            "Invalid audiences",
        ),
        (
            "a token from another issuer",
            e.op.signed("alice", r#"{"iss": "http://127.0.0.1:1"}"#),
            vec![],
            "Invalid issuer",
        ),
        (
            "an expired token",
            e.op.signed("alice", r#"{"exp": 1000000000, "iat": 999999000}"#),
            vec![],
            "Expired",
        ),
        // An access token (at+jwt) for the right audience is not an identity proof.
        (
            "an access token",
            e.op.service_access_token(),
            vec![],
            "JWT type",
        ),
        (
            "another name",
            good.clone(),
            vec!["--as", "bob@example.com"],
            "does not match the token",
        ),
    ] {
        let out = e.run_with_token(&token, &extra, &touch);
        assert_eq!(out.status.code(), Some(2), "{what}: {out:?}");
        assert!(
            stderr(&out).contains("the daemon refused the agent"),
            "{what}: {}",
            stderr(&out)
        );
        assert!(stderr(&out).contains(expect), "{what}: {}", stderr(&out));
        assert!(!marker.exists(), "{what}: the agent must not have run");
    }
    // No token at all: refused, for root as for anyone, when the configuration wants tokens.
    let out = e.d.run_agent("agent", &touch);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("requires an OIDC ID token"),
        "{}",
        stderr(&out)
    );
    assert!(!marker.exists());
    // Each refusal is an audit event.
    let refused = e
        .audits()
        .into_iter()
        .filter(|a| a["audit"] == "bind_refused")
        .count();
    assert_eq!(refused, 12, "{:#?}", e.d.audits());
    // The same signing path with nothing wrong is accepted: the refusals above are the claims'.
    let fine = e.op.signed("alice", "{}");
    assert_ok(
        &e.run_with_token(&fine, &[], &["true"]),
        "a well-formed signed token",
    );
    // And the good token works.
    assert_ok(&e.run_with_token(&good, &[], &touch), "alice's token");
    assert!(marker.exists());
    let _ = std::fs::remove_file(&marker);
}

#[test]
fn an_expired_token_ends_new_connections_with_a_clear_error() {
    if skip_unless_root("an_expired_token_ends_new_connections_with_a_clear_error") {
        return;
    }
    let e = env(6);
    let conn = e.conninfo();
    let token = e.op.token("alice", "chaperone");
    // One session that outlives the token (its next statement is refused), then a new
    // connection (refused at startup).
    let script = format!(
        "psql -X -A -t '{conn}' -c 'SELECT 1' -c '\\! sleep 7' -c 'SELECT 2'; \
         psql -X -A -t '{conn}' -c 'SELECT 3'"
    );
    let out = e.run_with_token(&token, &[], &["sh", "-c", &script]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    let err = stderr(&out);
    assert!(err.contains("statement denied by policy"), "{err}");
    assert!(err.contains("connection refused by policy"), "{err}");
    assert_eq!(
        err.matches("identity token of alice expired").count(),
        2,
        "{err}"
    );
    // The expired token cannot start a new agent either.
    let again = e.run_with_token(&token, &[], &["true"]);
    assert_eq!(again.status.code(), Some(2));
    assert!(stderr(&again).contains("Expired"), "{}", stderr(&again));
}

#[test]
fn a_rotated_signing_key_is_fetched_when_a_token_needs_it() {
    if skip_unless_root("a_rotated_signing_key_is_fetched_when_a_token_needs_it") {
        return;
    }
    let mut e = env(600);
    let old = e.op.token("alice", "chaperone");
    assert_ok(
        &e.run_with_token(&old, &[], &["true"]),
        "a token signed with the first key",
    );
    e.op.rotate_keys();
    std::thread::sleep(std::time::Duration::from_millis(1100)); // jwks_refetch_secs: 1
    let new = e.op.token("alice", "chaperone");
    assert_ok(
        &e.run_with_token(&new, &[], &["true"]),
        "a token signed with the new key",
    );
    assert_ok(
        &e.run_with_token(&old, &[], &["true"]),
        "the old key is still published",
    );
    assert!(
        e.d.log().contains("fetching the issuer's keys again"),
        "{}",
        e.d.log()
    );
}

/// A key the issuer withdraws stops verifying once the daemon's keys are older than
/// `jwks_max_age_secs` (3 s here), though no token named an unknown key to make it look again.
#[test]
fn a_withdrawn_signing_key_stops_verifying_once_the_keys_are_old() {
    if skip_unless_root("a_withdrawn_signing_key_stops_verifying_once_the_keys_are_old") {
        return;
    }
    let mut e = env_with_oidc(GROUP_GRANTS, 600, "  jwks_max_age_secs: 3\n");
    let old = e.op.token("alice", "chaperone");
    assert_ok(
        &e.run_with_token(&old, &[], &["true"]),
        "a token signed with the first key",
    );
    e.op.withdraw_keys();
    std::thread::sleep(std::time::Duration::from_millis(4100));
    let refused = e.run_with_token(&old, &[], &["true"]);
    assert!(
        !refused.status.success() && stderr(&refused).contains("the daemon refused the agent"),
        "a token signed with a withdrawn key was accepted: {refused:?}"
    );
    let new = e.op.token("alice", "chaperone");
    assert_ok(
        &e.run_with_token(&new, &[], &["true"]),
        "a token signed with the key now published",
    );
}

#[test]
fn an_agent_cannot_start_agents_or_leave_its_cgroup() {
    if skip_unless_root("an_agent_cannot_start_agents_or_leave_its_cgroup") {
        return;
    }
    let e = env(600);
    let token = e.op.token_file("alice", &e.op.token("alice", "chaperone"));
    let root = e.d.tree();
    // Another agent (bob's, a reader too) to try to move into.
    let mut other = e.d.spawn_in_cgroup("other-agent", &["sleep", "30"]);
    let script = format!(
        "{bin} --config {cfg} run --token-file {tok} -- true; echo rc=$?; \
         echo $$ > {root}/cgroup.procs 2>/dev/null && echo left || echo stayed; \
         echo $$ > {root}/other-agent/cgroup.procs 2>/dev/null && echo joined || echo kept-out; \
         grep NoNewPrivs /proc/self/status; \
         [ \"$(ps -o sid= -p $$ | tr -d ' ')\" = \"$$\" ] && echo own-session; \
         cat /proc/self/cgroup",
        bin = chaperone_bin().display(),
        cfg = e.d.config.display(),
        tok = token.display(),
        root = root.display(),
    );
    let out = e.run_unprivileged(&token, &["sh", "-c", &script]);
    let stdout = assert_ok(&out, "agent shell");
    assert!(
        stderr(&out).contains("agents cannot start agents"),
        "{}",
        stderr(&out)
    );
    assert!(stdout.contains("rc=2"), "{stdout}");
    assert!(stdout.contains("stayed"), "{stdout}");
    assert!(stdout.contains("kept-out"), "{stdout}");
    // Even an unprivileged caller's agent cannot regain privileges (sudo, setuid binaries),
    // and it leads a session of its own, away from the caller's terminal.
    assert!(stdout.contains("NoNewPrivs:\t1"), "{stdout}");
    assert!(stdout.contains("own-session"), "{stdout}");
    let _ = other.kill();
    let _ = other.wait();
    let tree = root.file_name().unwrap().to_str().unwrap();
    assert!(stdout.contains(&format!("{tree}/run-")), "{stdout}");
}

#[test]
fn a_device_login_binds_the_agent_and_refreshes_its_token() {
    if skip_unless_root("a_device_login_binds_the_agent_and_refreshes_its_token") {
        return;
    }
    // ID tokens live 6 s; the agent connects again after 9 s, which only works if `chaperone
    // run` refreshed its token (with the refresh token of the device login) in between.
    let e = env(6);
    let conn = e.conninfo();
    // One session across the refresh (its statements see the new token), then a new one.
    let script = format!(
        "psql -X -A -t -v ON_ERROR_STOP=1 '{conn}' -c 'SELECT 1' -c '\\! sleep 9' -c 'SELECT 2' && \
         psql -X -A -t '{conn}' -c 'SELECT 3'"
    );
    let mut run =
        e.d.cmd()
            .args([
                "run", "--login", "--user", "nobody", "--", "sh", "-c", &script,
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
    let mut stderr = std::io::BufReader::new(run.stderr.take().unwrap());
    let mut seen = String::new();
    let code = loop {
        let mut line = String::new();
        assert!(
            std::io::BufRead::read_line(&mut stderr, &mut line).unwrap() > 0,
            "no device code shown: {seen}"
        );
        seen.push_str(&line);
        if let Some(rest) = line.split("enter the code ").nth(1) {
            break rest.trim().to_string();
        }
    };
    assert!(
        seen.contains(&format!("open {}/device", e.op.issuer)),
        "{seen}"
    );
    e.op.approve(&code, "alice");
    let rest = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut s).unwrap();
        s
    });
    let out = run.wait_with_output().unwrap();
    let err = rest.join().unwrap();
    assert_eq!(out.status.code(), Some(0), "stderr: {err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1\n2\n3");
    assert!(e.d.log().contains("agent token refreshed"), "{}", e.d.log());
    let sessions = e.d.wait_for_sessions(2);
    assert!(
        sessions
            .iter()
            .all(|s| s["agent"]["oidc"]["subject"] == "alice"),
        "{sessions:#?}"
    );
}

#[test]
fn a_service_bound_by_config_gets_its_groups_from_a_client_credentials_token() {
    if skip_unless_root("a_service_bound_by_config_gets_its_groups_from_a_client_credentials_token")
    {
        return;
    }
    let pg = Postgres::start();
    let op = OidcProvider::start(600);
    let secret = op.token_file("etl.secret", "etl-bot-secret");
    let wrong = op.token_file("bad.secret", "not-the-secret");
    let mut opts = pg.daemon_options_with_grants(GROUP_GRANTS);
    opts.extra_yaml.push_str(&op.config_yaml());
    opts.extra_yaml.push_str(&format!(
        "services:\n  - {{cgroup: svc-etl, identity: etl-bot, oidc_client: {{client_id: etl-bot, secret_file: {}, scopes: [groups]}}}}\n  \
         - {{cgroup: svc-bad, identity: bad-bot, oidc_client: {{client_id: etl-bot, secret_file: {}}}}}\n",
        secret.display(),
        wrong.display()
    ));
    let d = TestDaemon::start(opts);
    let e = Env { pg, op, d };
    let conn = e.conninfo();
    let psql_in = |cgroup: &str| {
        let child = e.d.spawn_in_cgroup(
            cgroup,
            &[
                "/usr/bin/psql",
                "-X",
                "-A",
                "-t",
                &conn,
                "-c",
                "SELECT count(*) FROM users",
            ],
        );
        child.wait_with_output().unwrap()
    };
    // The daemon fetches the service's token in the background: wait for it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !e.d.log().contains("service token obtained") {
        assert!(std::time::Instant::now() < deadline, "{}", e.d.log());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let ok = psql_in("svc-etl");
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "3", "{ok:?}");
    // A cgroup nobody bound is nobody: no grant applies.
    let nobody = psql_in("svc-unlisted");
    assert!(
        stderr(&nobody).contains("an unidentified agent"),
        "{nobody:?}"
    );
    // A service whose token cannot be had is refused at connect, saying why.
    let bad = psql_in("svc-bad");
    assert!(
        stderr(&bad).contains("bad-bot has no valid identity token")
            || stderr(&bad).contains("etl-bot has no valid identity token"),
        "{bad:?}"
    );
    let sessions = e.d.wait_for_sessions(3);
    let etl = sessions
        .iter()
        .find(|s| s["agent"]["name"] == "etl-bot")
        .unwrap_or_else(|| panic!("{sessions:#?}"));
    assert_eq!(
        etl["agent"]["oidc"]["groups"],
        serde_json::json!(["readers", "services"])
    );
    assert_eq!(etl["agent"]["oidc"]["subject"], "etl-bot");
    assert_eq!(etl["statements_allowed"], 1);
}

/// A grant's masking applies to the agents it applies to, before the configuration's: staff see
/// emails (a `keep` rule on their grant), other readers get them masked (the built-in detectors).
#[test]
fn masking_follows_the_grants_that_apply() {
    if skip_unless_root("masking_follows_the_grants_that_apply") {
        return;
    }
    let grants = "  - group: readers
    target: app
    effect: allow
    sql: {classes: [read, session, transaction], objects: [\"public.*\", \"pg_catalog.*\"]}
  - name: staff-see-emails
    group: staff
    target: app
    effect: allow
    sql: {classes: [read, session, transaction], objects: [\"public.*\", \"pg_catalog.*\"]}
    masking: {rules: [{name: staff-keep-email, kinds: [email], method: keep}]}
";
    let e = env_with(grants, 600);
    let conn = e.conninfo();
    let sql = "SELECT email FROM users ORDER BY id LIMIT 1";
    let alice = e.run_with_token(
        &e.op.token("alice", "chaperone"),
        &[],
        &e.psql_args(&conn, sql),
    );
    assert_eq!(assert_ok(&alice, "alice (staff)").trim(), "ada@example.com");
    let carol = e.run_with_token(
        &e.op.token("carol", "chaperone"),
        &[],
        &e.psql_args(&conn, sql),
    );
    assert_eq!(assert_ok(&carol, "carol (readers)").trim(), "****");
    let sessions = e.d.wait_for_sessions(2);
    let carol = sessions
        .iter()
        .find(|s| s["agent"]["name"] == "sub:carol")
        .unwrap_or_else(|| panic!("{sessions:#?}"));
    assert_eq!(carol["masked"]["values"], 1, "{carol}");
}

/// The control socket's `refresh`: only a newer token for the same subject replaces an agent's.
#[test]
fn a_refresh_takes_only_a_newer_token_for_the_same_subject() {
    if skip_unless_root("a_refresh_takes_only_a_newer_token_for_the_same_subject") {
        return;
    }
    let e = env(600);
    let older = e.op.token("alice", "chaperone");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let (mut agent, cgroup) = e.bound_sleeper(&e.op.token("alice", "chaperone"));
    let socket = e.d.control_socket();
    let refresh = |token: &str| refresh(&socket, &cgroup, token);
    let v = refresh(&older);
    assert_eq!(v["result"], "error", "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("older token"),
        "{v}"
    );
    let v = refresh(&e.op.token("bob", "chaperone"));
    assert!(
        v["message"].as_str().unwrap_or("").contains("not alice"),
        "{v}"
    );
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let v = refresh(&e.op.token("alice", "chaperone"));
    assert_eq!(v["result"], "refreshed", "{v}");
    assert_eq!(v["agent"]["oidc"]["subject"], "alice");
    let _ = agent.kill();
    let _ = agent.wait();
}

fn base64url_decode(s: &str) -> Vec<u8> {
    let out = std::process::Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import base64,sys; s=sys.argv[1]; sys.stdout.buffer.write(base64.urlsafe_b64decode(s + '=' * (-len(s) % 4)))",
            s,
        ])
        .output_bounded()
        .unwrap();
    out.stdout
}

fn base64url_encode(b: &[u8]) -> String {
    let out = std::process::Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import base64,sys; print(base64.urlsafe_b64encode(sys.argv[1].encode()).decode().rstrip('='))",
            std::str::from_utf8(b).unwrap(),
        ])
        .output_bounded()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Any local user may open the control socket, so open requests are capped (64; each may wait
/// 30 s for its line). Holding every slot only delays binds: a connection past the cap is
/// closed at once, `chaperone run` says why, and binds work again as soon as slots free. What a
/// caller sends is bounded too (64 KiB a request), and so is what an answer echoes of it.
#[test]
fn the_control_socket_caps_open_requests_and_bounds_what_it_echoes() {
    use std::{
        io::Read,
        os::unix::net::UnixStream,
        time::{Duration, Instant},
    };
    if skip_unless_root("the_control_socket_caps_open_requests_and_bounds_what_it_echoes") {
        return;
    }
    let d = TestDaemon::start(DaemonOptions::default());
    let socket = d.control_socket();
    let held: Vec<UnixStream> = (0..64)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    // Accepted in order, after the 64 that hold every slot: closed without an answer.
    let mut extra = UnixStream::connect(&socket).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(
        extra.read(&mut [0u8; 16]).unwrap(),
        0,
        "the 65th request was served"
    );
    let busy = d.run_agent("agent", &["true"]);
    assert!(!busy.status.success());
    let stderr = String::from_utf8_lossy(&busy.stderr);
    assert!(
        stderr.contains("without answering") && stderr.contains("try again"),
        "{stderr}"
    );

    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let run = d.run_agent("agent", &["true"]);
        if run.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "binds did not come back: {run:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let ask = |request: &[u8]| control(&socket, request);
    // 100 KiB with no end of line: read up to the cap, answered as a bad request.
    let v = ask(&vec![b'a'; 100 * 1024]);
    assert_eq!(v["result"], "error", "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("not a request"),
        "{v}"
    );
    // A refusal that names what the caller sent keeps to 300 bytes (and says it was cut).
    let long = "x".repeat(5000);
    let v = ask(format!(
        "{}\n",
        serde_json::json!({"op": "refresh", "cgroup": long, "token": "t"})
    )
    .as_bytes());
    let message = v["message"].as_str().unwrap();
    assert!(message.starts_with("no agent cgroup `xxx"), "{v}");
    assert!(
        message.len() <= 300 + '…'.len_utf8() && message.ends_with('…'),
        "{v}"
    );
}

/// A token naming a key the daemon does not know makes it fetch the issuer's keys again (the
/// issuer may have rotated them), but at most once per `jwks_refetch_secs` (1 s here): a burst
/// of such tokens cannot turn the daemon into a flood on the issuer. Each is refused either way.
#[test]
fn unknown_keys_refetch_the_issuers_keys_at_most_once_per_interval() {
    use std::time::Duration;
    if skip_unless_root("unknown_keys_refetch_the_issuers_keys_at_most_once_per_interval") {
        return;
    }
    let e = env(600);
    let (mut agent, cgroup) = e.bound_sleeper(&e.op.token("alice", "chaperone"));
    let socket = e.d.control_socket();
    let forged = e.op.forged("alice");
    let refresh = || refresh(&socket, &cgroup, &forged);
    let refetches = || {
        e.d.log()
            .matches("fetching the issuer's keys again")
            .count()
    };
    // The keys fetched for the bind are older than the interval now.
    std::thread::sleep(Duration::from_millis(1200));
    for _ in 0..10 {
        let v = refresh();
        assert_eq!(v["result"], "error", "{v}");
    }
    assert_eq!(refetches(), 1, "{}", e.d.log());
    // Once the interval has passed, the next unknown key may look again.
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(refresh()["result"], "error");
    assert_eq!(refetches(), 2, "{}", e.d.log());
    let _ = agent.kill();
    let _ = agent.wait();
}
