//! Chaperone: a host daemon that puts every network connection of an AI coding agent under
//! review, without changing the agent.
//!
//! An eBPF program ([`redirect`]) rewrites each TCP connect from the agent cgroup tree to the
//! proxy ([`app`]); the proxy finds the original destination, the agent ([`identity`]) and the
//! target, asks [`policy`] for a verdict, carries the bytes ([`protocols`]) and writes the session
//! ([`record`]). [`control`] binds agents to identities for `chaperone run`. See
//! docs/ARCHITECTURE.md for the data path.
//!
//! ```no_run
//! let cfg = chaperone::config::Config::load(None)?;
//! tokio::runtime::Runtime::new()?.block_on(chaperone::app::run(cfg))?;
//! # Ok::<(), anyhow::Error>(())
//! ```

pub mod app;
pub mod cli;
pub mod config;
pub mod control;
pub mod identity;
pub mod mask;
pub mod mounts;
pub mod policy;
pub mod protocols;
pub mod record;
pub mod redirect;
pub mod secrets;
pub mod tls;
