//! TLS on both hops of a PostgreSQL session (issue 3): agents that insist on TLS get it with the
//! daemon's own certificate; the daemon talks TLS to targets that ask for it, verifies them
//! when told to, and never falls back to cleartext.

use chaperone_tests::{DaemonOptions, Postgres, TestDaemon, skip_unless_root};
use std::{path::Path, process::Output};

/// A daemon for `pg` whose target `app` has the given TLS settings (YAML flow fields).
fn daemon(pg: &Postgres, tls_fields: &str) -> TestDaemon {
    let mut opts: DaemonOptions = pg.daemon_options_with_functions(&[]);
    opts.target_yaml = vec![format!(
        "{{name: app, protocol: postgres, address: 127.0.0.1, port: {}, credential: app-ro, database: app{tls_fields}}}",
        pg.port
    )];
    TestDaemon::start(opts)
}

fn psql(d: &TestDaemon, pg: &Postgres, sslmode: &str, sql: &str) -> Output {
    let conn = format!(
        "host=127.0.0.1 port={} dbname=app user=x sslmode={sslmode} connect_timeout=10",
        pg.port
    );
    d.run_agent(
        "agent",
        &["timeout", "30", "psql", "-X", "-A", "-t", &conn, "-c", sql],
    )
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Whether the upstream backend serving this session runs over TLS, as the server sees it.
const UPSTREAM_SSL: &str = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

#[test]
fn an_agent_that_insists_on_tls_gets_it_from_the_daemon() {
    if skip_unless_root("an_agent_that_insists_on_tls_gets_it_from_the_daemon") {
        return;
    }
    let pg = Postgres::start();
    let d = daemon(&pg, "");
    let o = psql(&d, &pg, "require", "\\conninfo");
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("SSL connection"),
        "{}",
        text(&o)
    );
    // The upstream hop stays as configured (cleartext here): TLS was terminated by the daemon.
    let o = psql(&d, &pg, "require", UPSTREAM_SSL);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "f",
        "{}",
        text(&o)
    );
}

#[test]
fn upstream_tls_verify_full_and_require_reach_the_server_encrypted() {
    if skip_unless_root("upstream_tls_verify_full_and_require_reach_the_server_encrypted") {
        return;
    }
    let pg = Postgres::start();
    let ca = pg.enable_tls();
    for fields in [
        format!(
            ", tls: verify-full, tls_ca_file: \"{}\", tls_server_name: 127.0.0.1",
            ca.display()
        ),
        ", tls: require".to_string(),
    ] {
        let d = daemon(&pg, &fields);
        let o = psql(&d, &pg, "disable", UPSTREAM_SSL);
        assert!(o.status.success(), "{fields}: {}", text(&o));
        assert_eq!(
            String::from_utf8_lossy(&o.stdout).trim(),
            "t",
            "{fields}: the server sees TLS: {}",
            text(&o)
        );
    }
}

#[test]
fn upstream_tls_fails_closed() {
    if skip_unless_root("upstream_tls_fails_closed") {
        return;
    }
    let pg = Postgres::start();
    // A server without TLS, a target that requires it: no cleartext fallback.
    let d = daemon(&pg, ", tls: require");
    let o = psql(&d, &pg, "disable", "SELECT 1");
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("target `app` is unavailable"),
        "{}",
        text(&o)
    );
    let sessions = d.wait_for_sessions(1);
    assert!(
        sessions[0]["error"]
            .as_str()
            .unwrap_or("")
            .contains("does not offer TLS"),
        "{sessions:#?}"
    );
    drop(d);

    // A server whose certificate the configured CA did not sign: refused under verify-full.
    pg.enable_tls();
    let other = Postgres::start();
    let wrong_ca = other.enable_tls();
    let d = daemon(
        &pg,
        &format!(
            ", tls: verify-full, tls_ca_file: \"{}\", tls_server_name: 127.0.0.1",
            wrong_ca.display()
        ),
    );
    let o = psql(&d, &pg, "disable", "SELECT 1");
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let sessions = d.wait_for_sessions(1);
    let error = sessions[0]["error"].as_str().unwrap_or("");
    assert!(
        error.contains("TLS handshake") && error.contains("certificate"),
        "{error}"
    );
    assert!(Path::new(&wrong_ca).exists());
}
