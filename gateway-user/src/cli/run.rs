//! `chaperone run`: start an unmodified command as an agent.
//!
//! Between fork and exec the child joins a fresh cgroup of the agent tree, marks every
//! inherited descriptor close-on-exec (a socket opened outside the tree would not be
//! intercepted), drops to an unprivileged user and sets no-new-privileges; so its very first
//! instruction already runs intercepted, and it cannot climb back out. Before that, the kernel
//! is asked whether the programs are really in effect on the new cgroup: an agent never runs
//! unwatched.

use super::RunArgs;
use crate::{config::Config, identity::AgentTree, redirect};
use anyhow::{Context as _, bail};
use std::{
    ffi::CString,
    os::unix::{ffi::OsStrExt, process::CommandExt, process::ExitStatusExt},
    process::Command,
    sync::atomic::{AtomicI32, Ordering},
};

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
    let tree = AgentTree::locate(&config.agent_cgroup)?;
    let cgroup = tree.new_agent_cgroup(&args.as_name)?;
    if let Err(e) = redirect::verify_attached(&config.pin_dir, cgroup.path()) {
        cgroup.remove_if_empty();
        bail!(
            "{e}. Is `chaperone daemon` installed for this configuration? Refusing to run an agent unintercepted"
        );
    }
    let procs = CString::new(cgroup.procs_file().as_os_str().as_bytes())?;
    let (program, rest) = args.command.split_first().expect("clap requires a command");
    let mut cmd = Command::new(program);
    cmd.args(rest);
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
    // SAFETY: the closure only makes async-signal-safe calls (open, write, close, syscall,
    // setgroups/setgid/setuid, prctl, signal).
    unsafe {
        cmd.pre_exec(move || {
            join_cgroup(&procs)?;
            cloexec_inherited_fds()?;
            if let Some((uid, gid)) = account {
                drop_privileges(uid, gid)?;
            }
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGQUIT, libc::SIG_DFL);
            Ok(())
        });
        // Terminal signals go to the whole foreground group; the agent decides, we wait for it.
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            cgroup.remove_if_empty();
            return Err(e).with_context(|| format!("cannot start `{program}`"));
        }
    };
    forward_signals_to(child.id() as i32);
    let status = child.wait();
    cgroup.remove_if_empty();
    let status = status.context("waiting for the agent")?;
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
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
    if let (Ok(uid), Ok(gid)) = (std::env::var("SUDO_UID"), std::env::var("SUDO_GID")) {
        if let Ok(uid) = uid.parse::<libc::uid_t>() {
            if uid != 0 {
                let mut a = lookup_user(&uid.to_string()).unwrap_or(Account {
                    uid,
                    gid: 0,
                    name: None,
                    home: None,
                });
                a.gid = gid.parse().unwrap_or(a.gid);
                return Ok(Some(a));
            }
        }
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

/// Move the calling process into the cgroup whose `cgroup.procs` is `procs`.
fn join_cgroup(procs: &CString) -> std::io::Result<()> {
    // SAFETY: a NUL-terminated path and a static buffer; only raw syscalls after fork.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = libc::write(fd, b"0".as_ptr().cast(), 1);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if n != 1 {
            return Err(err);
        }
    }
    Ok(())
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
        // No setuid binary can hand the agent its privileges back.
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
    }
    Ok(())
}

static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

/// SIGTERM and SIGHUP sent to `chaperone run` (a supervisor stopping it) reach the agent.
fn forward_signals_to(pid: i32) {
    CHILD.store(pid, Ordering::Relaxed);
    for sig in [libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: installing a handler that only calls kill.
        unsafe { libc::signal(sig, forward as *const () as libc::sighandler_t) };
    }
}
