//! Credential injection with each authentication method the server may ask for (issue 3): the
//! daemon logs in with the target's credential by SCRAM-SHA-256 (the other tests), md5 or
//! cleartext password; the agent sends none.

use chaperone_tests::{Postgres, TestDaemon, random_hex, set_mode, skip_unless_root};

#[test]
fn the_daemon_logs_in_with_md5_and_cleartext_passwords() {
    if skip_unless_root("the_daemon_logs_in_with_md5_and_cleartext_passwords") {
        return;
    }
    let pg = Postgres::start();
    for (role, method) in [("agent_md5", "md5"), ("agent_clear", "password")] {
        let password = format!("pw-{}", random_hex(12));
        pg.add_role_with_auth(role, &password, method);
        let mut opts = pg.daemon_options_with_functions(&[]);
        let secrets = pg.dir.join(format!("secrets-{role}.yaml"));
        std::fs::write(
            &secrets,
            format!("credentials:\n  app-ro: {{user: {role}, password: \"{password}\"}}\n"),
        )
        .unwrap();
        set_mode(&secrets, 0o600);
        let line = opts.extra_yaml.lines().next().unwrap().to_string();
        assert!(line.starts_with("secrets_file:"), "{line}");
        opts.extra_yaml =
            opts.extra_yaml
                .replacen(&line, &format!("secrets_file: {}", secrets.display()), 1);
        let d = TestDaemon::start(opts);
        let conn = format!(
            "host=127.0.0.1 port={} dbname=app user=x sslmode=disable",
            pg.port
        );
        let out = d.run_agent(
            "agent",
            &["psql", "-X", "-A", "-t", &conn, "-c", "SELECT current_user"],
        );
        assert!(
            out.status.success(),
            "{method}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            role,
            "{method}"
        );
        assert!(
            !d.log().contains(&password),
            "{method}: the password is in the daemon log"
        );
    }
}
