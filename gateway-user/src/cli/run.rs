//! `chaperone run`: start an unmodified command as an agent.
//!
//! The child joins a fresh cgroup of the agent tree between fork and exec, so its very first
//! instruction already runs intercepted; nothing it or its descendants do is outside the tree.
//! Refuses to start when interception is not installed: an agent must never run unwatched.

use super::RunArgs;
use crate::{config::Config, identity::AgentTree, redirect};
use anyhow::{Context as _, bail};
use std::{
    ffi::CString,
    os::unix::{ffi::OsStrExt, process::CommandExt, process::ExitStatusExt},
    process::Command,
};

pub fn run(config: &Config, args: &RunArgs) -> anyhow::Result<i32> {
    if !redirect::is_installed(&config.pin_dir) {
        bail!(
            "interception is not installed (no pinned programs in {}); start `chaperone daemon` first. \
             Refusing to run an agent unintercepted",
            config.pin_dir.display()
        );
    }
    let tree = AgentTree::locate(&config.agent_cgroup)?;
    let cgroup = tree.new_agent_cgroup(&args.as_name)?;
    let procs = CString::new(cgroup.procs_file().as_os_str().as_bytes())?;
    let (program, rest) = args.command.split_first().expect("clap requires a command");
    let mut cmd = Command::new(program);
    cmd.args(rest);
    // SAFETY: the closure only makes async-signal-safe calls (open, write, close, signal).
    unsafe {
        cmd.pre_exec(move || {
            join_cgroup(&procs)?;
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGQUIT, libc::SIG_DFL);
            Ok(())
        });
        // Terminal signals go to the whole foreground group; the agent decides, we wait for it.
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
    }
    let status = cmd.status();
    cgroup.remove_if_empty();
    let status = status.with_context(|| format!("cannot start `{program}`"))?;
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
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
