//! Service agents: processes not started by `chaperone run` (a systemd unit placed in the agent
//! tree with `Slice=`, a container runtime's cgroup below it), bound to an identity by the
//! configuration, by cgroup path. With `oidc_client`, the daemon obtains a client-credentials
//! token for the service and keeps it fresh; its groups become the service's groups, and when
//! no valid token can be had the service's new connections are refused like any agent's whose
//! token expired.
//!
//! ```yaml
//! services:
//!   - cgroup: etl.service          # relative to the agent tree root
//!     identity: etl-bot
//!     oidc_client:                 # optional
//!       client_id: etl-bot
//!       secret_file: /etc/chaperone/etl-bot.secret   # root-only
//!       scopes: [groups]
//! ```
//!
//! A binding written by the daemon for `chaperone run` (the cgroup xattr) always wins over
//! this table; the table only names cgroups that have none.

use super::{Vouched, oidc::Verifier};
use serde::Deserialize;
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};
use tracing::{info, warn};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// The service's cgroup, relative to the agent tree root; its descendants are included.
    pub cgroup: PathBuf,
    /// The identity name grants' `identity:` matches.
    pub identity: String,
    #[serde(default)]
    pub oidc_client: Option<ServiceClient>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceClient {
    pub client_id: String,
    /// A root-only file holding the client secret.
    pub secret_file: PathBuf,
    /// Scopes to ask for (e.g. the one that puts groups in the token).
    #[serde(default)]
    pub scopes: Vec<String>,
}

impl ServiceConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.cgroup.as_os_str().is_empty()
            || self
                .cgroup
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(format!(
                "services: cgroup `{}` must be a relative path below the agent tree, without `..`",
                self.cgroup.display()
            ));
        }
        if self.identity.contains(':') {
            return Err(format!(
                "services: identity `{}`: names with `:` are reserved for OIDC subjects",
                self.identity
            ));
        }
        super::validate_name(&self.identity).map_err(|e| format!("services: {e}"))
    }
}

/// The configured services and, for those with an OIDC client, their current token's claims.
#[derive(Debug, Default)]
pub struct Services {
    entries: Vec<ServiceConfig>,
    vouched: RwLock<HashMap<usize, Vouched>>,
}

impl Services {
    pub fn new(entries: Vec<ServiceConfig>) -> Self {
        Self {
            entries,
            vouched: RwLock::default(),
        }
    }

    /// The service whose cgroup is `cgroup` (relative to the tree) or an ancestor of it: the
    /// most specific one.
    pub fn lookup(&self, cgroup: &str) -> Option<usize> {
        let path = Path::new(cgroup);
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, s)| path.starts_with(&s.cgroup))
            .max_by_key(|(_, s)| s.cgroup.components().count())
            .map(|(i, _)| i)
    }

    pub fn identity(&self, index: usize) -> &str {
        &self.entries[index].identity
    }

    /// What the service's current token says; `None` for services without an OIDC client.
    /// A service with a client but no token yet gets an already-expired stand-in, so its
    /// connections are refused (fail closed) until one arrives.
    pub fn vouched(&self, index: usize) -> Option<Vouched> {
        let client = self.entries[index].oidc_client.as_ref()?;
        Some(
            self.vouched
                .read()
                .expect("services lock")
                .get(&index)
                .cloned()
                .unwrap_or_else(|| Vouched {
                    issuer: "(no token yet)".into(),
                    subject: client.client_id.clone(),
                    email: None,
                    groups: Vec::new(),
                    expires_at_ms: 0,
                }),
        )
    }

    /// Obtain and renew the tokens of every service with an OIDC client, forever.
    pub async fn keep_fresh(self: Arc<Self>, verifier: Arc<Verifier>) {
        let tasks: Vec<_> = (0..self.entries.len())
            .filter(|&i| self.entries[i].oidc_client.is_some())
            .map(|i| tokio::spawn(self.clone().keep_one_fresh(i, verifier.clone())))
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    }

    async fn keep_one_fresh(self: Arc<Self>, index: usize, verifier: Arc<Verifier>) {
        let service = &self.entries[index];
        let client = service.oidc_client.as_ref().expect("filtered");
        loop {
            let obtained = match std::fs::read_to_string(&client.secret_file) {
                Err(e) => Err(format!("{}: {e}", client.secret_file.display())),
                Ok(secret) => verifier
                    .service_token(&client.client_id, secret.trim(), &client.scopes)
                    .await
                    .map_err(|e| e.to_string()),
            };
            let wait = match obtained {
                Ok(v) => {
                    let left = Duration::from_millis(
                        v.expires_at_ms.saturating_sub(crate::record::now_ms()),
                    );
                    info!(service = %service.identity, groups = ?v.groups, "service token obtained");
                    self.vouched
                        .write()
                        .expect("services lock")
                        .insert(index, v);
                    // Renew with a fifth of its life left (at least a second before it ends).
                    (left - (left / 5).max(Duration::from_secs(1)).min(left))
                        .max(Duration::from_secs(1))
                }
                Err(e) => {
                    warn!(service = %service.identity, error = %e, "cannot obtain the service's token; retrying in 10 s (its connections are refused once the last one expires)");
                    Duration::from_secs(10)
                }
            };
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_specific_service_wins() {
        let cfg: Vec<ServiceConfig> = serde_yaml::from_str(
            "[{cgroup: a, identity: outer}, {cgroup: a/b, identity: inner}, {cgroup: c, identity: c, oidc_client: {client_id: c, secret_file: /x}}]",
        )
        .unwrap();
        let s = Services::new(cfg);
        assert_eq!(s.lookup("a").map(|i| s.identity(i)), Some("outer"));
        assert_eq!(s.lookup("a/x").map(|i| s.identity(i)), Some("outer"));
        assert_eq!(s.lookup("a/b/c").map(|i| s.identity(i)), Some("inner"));
        assert_eq!(s.lookup("ab"), None, "path components, not string prefixes");
        assert_eq!(s.lookup("run-1-2"), None);
        assert!(s.vouched(0).is_none());
        let pending = s.vouched(2).unwrap();
        assert_eq!(pending.expires_at_ms, 0, "no token yet: refused");
    }

    #[test]
    fn cgroup_paths_stay_below_the_tree() {
        for bad in ["", "/abs", "../up", "a/../../b"] {
            let c = ServiceConfig {
                cgroup: bad.into(),
                identity: "x".into(),
                oidc_client: None,
            };
            assert!(c.validate().is_err(), "{bad}");
        }
    }
}
