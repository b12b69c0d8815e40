//! `chaperone run`: start an unmodified command as an agent.
//!
//! The child is forked first and waits, before exec, on a pipe. Over the control socket the
//! daemon is asked to bind it: the daemon checks the caller (SO_PEERCRED), verifies the ID token
//! if one is given, creates the agent's cgroup, labels it with the identity, asks the kernel
//! whether the programs are in effect there, and moves the child in. Only then is the child told
//! to go on: it marks every inherited descriptor close-on-exec (a socket opened outside the tree
//! would not be intercepted), drops to an unprivileged user, sets no-new-privileges (always:
//! even an agent of an unprivileged caller must not regain privileges through sudo or pkexec),
//! starts a session of its own (no controlling terminal to borrow a sudo ticket or inject
//! input through), and execs; so its very first instruction already runs intercepted, and it
//! cannot climb back out. This process stays outside the tree, not dumpable, and only waits,
//! forwarding signals to the agent's process group.

use super::{
    RunArgs,
    login::{Login, Tokens},
};
use crate::{
    config::Config,
    control::{self, Request, Response},
    identity::AgentTree,
};
use anyhow::{Context as _, bail};
use std::{
    ffi::CString,
    os::unix::process::CommandExt,
    process::Command,
    sync::atomic::{AtomicI32, Ordering},
};

/// Where `chaperone run` looks for an ID token when `--token-file` is not given. It is removed
/// from the agent's environment: the agent has no use for its own proof of identity.
pub const TOKEN_ENV: &str = "CHAPERONE_ID_TOKEN";

/// Who the agent runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Account {
    uid: libc::uid_t,
    gid: libc::gid_t,
    /// Name and home directory, for USER/LOGNAME/HOME: tools read their dotfiles there, and
    /// the invoking root's home is not theirs to read.
    name: Option<String>,
    home: Option<String>,
}

pub fn run(config: &Config, args: &RunArgs) -> anyhow::Result<i32> {
    let account = resolve_account(args)?;
    let (program, rest) = args.command.split_first().expect("clap requires a command");
    let mut cmd = Command::new(program);
    cmd.args(rest).env_remove(TOKEN_ENV);
    if let Some(a) = &account {
        if let Some(name) = &a.name {
            cmd.env("USER", name).env("LOGNAME", name);
        }
        match &a.home {
            Some(home) => cmd.env("HOME", home),
            None => cmd.env_remove("HOME"),
        };
    }
    let account = account.map(|a| (a.uid, a.gid));
    let (go_read, go_write) = pipe()?;
    // Fork first, while this process is still single-threaded (the login below starts an HTTP
    // client), so the child may run ordinary code until it execs.
    // SAFETY: see above.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        bail!("fork: {}", std::io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: closing our copy of the write end, so a dead parent means EOF here.
        unsafe { libc::close(go_write) };
        child(go_read, account, &mut cmd, program);
    }
    // SAFETY: the parent keeps only the write end. Not dumpable: the agent may run as the same
    // user, and must not ptrace this process (outside the tree, holding the refresh token).
    unsafe {
        libc::close(go_read);
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
    let abandon = || {
        // SAFETY: our own child, still waiting on the pipe; closing it makes it exit.
        unsafe {
            libc::close(go_write);
            libc::kill(pid, libc::SIGKILL);
        }
        wait(pid);
    };
    let (token, mut refresher) = match obtain_token(config, args) {
        Ok(t) => t,
        Err(e) => {
            abandon();
            return Err(e);
        }
    };
    let answer = control::call(
        &config.pin_dir,
        &Request::Bind {
            pid: pid as u32,
            name: match (&args.as_name, &token) {
                (None, None) => Some("agent".into()),
                (name, _) => name.clone(),
            },
            token,
        },
    );
    let cgroup = match answer {
        Ok(Response::Bound { cgroup, .. }) => cgroup,
        other => {
            abandon();
            match other {
                Ok(Response::Error { message }) => bail!("the daemon refused the agent: {message}"),
                Err(e) => return Err(e.into()),
                Ok(other) => bail!("unexpected answer from the daemon: {other:?}"),
            }
        }
    };
    // SAFETY: one byte to our child's pipe, then close it.
    unsafe {
        libc::write(go_write, [1u8].as_ptr().cast(), 1);
        libc::close(go_write);
    }
    forward_signals_to(pid);
    let status = loop {
        if let Some(code) = try_wait(pid) {
            break code;
        }
        if let Some(r) = refresher.as_mut() {
            r.tick(config, &cgroup);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    // Root can tidy up at once; otherwise the daemon reaps the empty cgroup.
    if let Some(c) = AgentTree::locate(&config.agent_cgroup)
        .ok()
        .and_then(|tree| tree.agent_cgroup(&cgroup))
    {
        c.remove_if_empty();
    }
    Ok(status)
}

/// Keeps a device-login agent's token fresh with its refresh token.
struct Refresher {
    login: Login,
    tokens: Tokens,
    next: std::time::SystemTime,
}

impl Refresher {
    fn tick(&mut self, config: &Config, cgroup: &str) {
        if std::time::SystemTime::now() < self.next {
            return;
        }
        let Some(refresh) = self.tokens.refresh_token.clone() else {
            return;
        };
        let sent = self.login.refresh(&refresh).and_then(|fresh| {
            match control::call(
                &config.pin_dir,
                &Request::Refresh {
                    cgroup: cgroup.to_string(),
                    token: fresh.id_token.clone(),
                },
            )? {
                Response::Refreshed { .. } => Ok(fresh),
                Response::Error { message } => bail!("the daemon refused the new token: {message}"),
                other => bail!("unexpected answer from the daemon: {other:?}"),
            }
        });
        match sent {
            Ok(fresh) => {
                // A provider may rotate refresh tokens or not; keep the newest we have.
                let keep = fresh.refresh_token.clone().or(Some(refresh));
                self.tokens = Tokens {
                    refresh_token: keep,
                    ..fresh
                };
                self.next = self.tokens.refresh_at();
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot refresh the agent's token; retrying in 10 s (new connections are refused once it expires)");
                self.next = std::time::SystemTime::now() + std::time::Duration::from_secs(10);
            }
        }
    }
}

/// The ID token: from a device login (then also a refresher), `--token-file`, or the
/// environment; none at all for a root run by name.
fn obtain_token(
    config: &Config,
    args: &RunArgs,
) -> anyhow::Result<(Option<String>, Option<Refresher>)> {
    if !args.login {
        return Ok((read_token(args)?, None));
    }
    let oidc = config
        .oidc
        .as_ref()
        .context("--login needs an `oidc` section in the configuration")?;
    let login = Login::discover(oidc)?;
    let tokens = login.device_login()?;
    let token = tokens.id_token.clone();
    let next = tokens.refresh_at();
    Ok((
        Some(token),
        Some(Refresher {
            login,
            tokens,
            next,
        }),
    ))
}

/// The forked child: wait for the daemon's bind, then become the agent. Never returns.
fn child(
    go: libc::c_int,
    account: Option<(libc::uid_t, libc::gid_t)>,
    cmd: &mut Command,
    program: &str,
) -> ! {
    let mut byte = 0u8;
    // SAFETY: reading one byte into a local.
    let n = unsafe { libc::read(go, (&mut byte as *mut u8).cast(), 1) };
    if n != 1 || byte != 1 {
        // The bind was refused (the parent says why) or the parent died: never run unbound.
        // SAFETY: leaving the forked child without running the parent's destructors.
        unsafe { libc::_exit(125) };
    }
    let setup = (|| {
        cloexec_inherited_fds()?;
        if let Some((uid, gid)) = account {
            drop_privileges(uid, gid)?;
        }
        let check = |rc: libc::c_int| {
            if rc >= 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        };
        // SAFETY: plain process-attribute syscalls in the child before exec.
        unsafe {
            // Always, whoever runs us: no setuid binary (sudo, pkexec) can hand the agent
            // privileges back, root's or anyone's.
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
            // A session of its own, without the invoking terminal as controlling terminal: no
            // tty-bound sudo ticket to reuse, no TIOCSTI into the user's shell. stdio stay.
            check(libc::setsid())?;
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGQUIT, libc::SIG_DFL);
        }
        Ok::<_, std::io::Error>(())
    })();
    let err = match setup {
        Err(e) => format!("chaperone: cannot become the agent: {e}"),
        Ok(()) => format!("chaperone: cannot start `{program}`: {}", cmd.exec()),
    };
    eprintln!("{err}");
    // SAFETY: as above.
    unsafe { libc::_exit(127) }
}

/// The ID token from `--token-file`, else from the environment.
fn read_token(args: &RunArgs) -> anyhow::Result<Option<String>> {
    let token = match &args.token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading the token file {}", path.display()))?,
        ),
        None => std::env::var(TOKEN_ENV).ok(),
    };
    Ok(token
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty()))
}

fn pipe() -> anyhow::Result<(libc::c_int, libc::c_int)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("pipe: {}", std::io::Error::last_os_error());
    }
    Ok((fds[0], fds[1]))
}

/// Wait for `pid` and return its exit code (128 + signal when killed).
fn wait(pid: libc::pid_t) -> i32 {
    loop {
        if let Some(code) = reap(pid, 0) {
            return code;
        }
    }
}

/// `pid`'s exit code if it has ended, without blocking.
fn try_wait(pid: libc::pid_t) -> Option<i32> {
    reap(pid, libc::WNOHANG)
}

fn reap(pid: libc::pid_t, flags: libc::c_int) -> Option<i32> {
    let mut status = 0;
    // SAFETY: waiting for our own child.
    let rc = unsafe { libc::waitpid(pid, &mut status, flags) };
    if rc == pid {
        return Some(if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            128 + libc::WTERMSIG(status)
        });
    }
    if rc < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
        return Some(2);
    }
    None
}

/// The account to drop to: `--user`, else the sudo caller; `None` only with `--allow-root` or
/// when not running as root in the first place.
fn resolve_account(args: &RunArgs) -> anyhow::Result<Option<Account>> {
    if let Some(user) = &args.user {
        return lookup_user(user).map(Some);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || args.allow_root {
        return Ok(None);
    }
    if let (Ok(uid), Ok(gid)) = (std::env::var("SUDO_UID"), std::env::var("SUDO_GID"))
        && let Ok(uid) = uid.parse::<libc::uid_t>()
        && uid != 0
    {
        let mut a = lookup_user(&uid.to_string()).unwrap_or(Account {
            uid,
            gid: 0,
            name: None,
            home: None,
        });
        a.gid = gid.parse().unwrap_or(a.gid);
        return Ok(Some(a));
    }
    bail!(
        "refusing to run the agent as root: a root agent can leave its cgroup. \
         Pass --user NAME (e.g. --user nobody), or --allow-root to accept that"
    )
}

fn lookup_user(user: &str) -> anyhow::Result<Account> {
    // SAFETY: getpwnam/getpwuid return a pointer into static storage or null; we copy out at once
    // and call them from this single thread before spawning.
    let pw = unsafe {
        match user.parse::<libc::uid_t>() {
            Ok(uid) => libc::getpwuid(uid),
            Err(_) => libc::getpwnam(CString::new(user)?.as_ptr()),
        }
    };
    if pw.is_null() {
        bail!("no such user `{user}`");
    }
    // SAFETY: non-null passwd entry whose strings are NUL-terminated.
    let (uid, gid, name, home) = unsafe {
        let s = |p: *const libc::c_char| {
            (!p.is_null()).then(|| std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned())
        };
        (
            (*pw).pw_uid,
            (*pw).pw_gid,
            s((*pw).pw_name),
            s((*pw).pw_dir),
        )
    };
    if uid == 0 {
        bail!("--user {user} is root; use --allow-root if that is really meant");
    }
    Ok(Account {
        uid,
        gid,
        name,
        home,
    })
}

/// Mark every descriptor above stderr close-on-exec: sockets created outside the agent tree
/// keep their cgroup, so an inherited one would not be intercepted. (Closing them outright
/// would also close the pipe std uses to report exec failures.)
fn cloexec_inherited_fds() -> std::io::Result<()> {
    // SAFETY: close_range(2) with CLOSE_RANGE_CLOEXEC only sets flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn drop_privileges(uid: libc::uid_t, gid: libc::gid_t) -> std::io::Result<()> {
    let check = |rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // SAFETY: credential syscalls in the child between fork and exec.
    unsafe {
        check(libc::setgroups(0, std::ptr::null()))?;
        check(libc::setgid(gid))?;
        check(libc::setuid(uid))?;
    }
    Ok(())
}

static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe. The agent leads its own process group (setsid):
        // the group first, as a terminal would signal it; the process if the group is not
        // there yet.
        unsafe {
            if libc::kill(-pid, sig) != 0 {
                libc::kill(pid, sig);
            }
        }
    }
}

/// Signals sent to `chaperone run` reach the agent's process group: SIGTERM and SIGHUP (a
/// supervisor stopping it), and SIGINT and SIGQUIT from the terminal (the agent runs in a
/// session of its own, so the terminal no longer signals it directly).
fn forward_signals_to(pid: i32) {
    CHILD.store(pid, Ordering::Relaxed);
    for sig in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT, libc::SIGQUIT] {
        // SAFETY: installing a handler that only calls kill.
        unsafe { libc::signal(sig, forward as *const () as libc::sighandler_t) };
    }
}
