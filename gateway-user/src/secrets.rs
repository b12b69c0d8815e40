//! Upstream credentials: read from a root-only file, handed to protocol modules by name, never
//! shown. `Debug` redacts passwords, nothing here implements `Display` or `Serialize`, and a
//! file readable by group or others is refused.
//!
//! ```yaml
//! credentials:
//!   app-ro: {user: agent_ro, password: "…"}
//! ```

use serde::Deserialize;
use std::{collections::HashMap, os::unix::fs::PermissionsExt, path::Path};

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: mode {mode:o} lets group or others read it; chmod 600 it")]
    Exposed { path: String, mode: u32 },
    #[error(transparent)]
    Parse(#[from] crate::config::YamlError),
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Secrets {
    #[serde(default)]
    credentials: HashMap<String, Credential>,
}

impl Secrets {
    pub fn load(path: &Path) -> Result<Self, SecretsError> {
        let display = path.display().to_string();
        let read_err = |source| SecretsError::Read {
            path: display.clone(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read_err)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(SecretsError::Exposed {
                path: display,
                mode,
            });
        }
        let text = std::fs::read_to_string(path).map_err(read_err)?;
        // serde_yaml messages can quote the offending value: never echo the file's content.
        Ok(crate::config::parse_yaml(&text, &display, true)?)
    }

    pub fn get(&self, name: &str) -> Option<&Credential> {
        self.credentials.get(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_password() {
        let c = Credential {
            user: "u".into(),
            password: "hunter2".into(),
        };
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("hunter2") && shown.contains("redacted"),
            "{shown}"
        );
    }

    #[test]
    fn group_readable_files_are_refused() {
        let dir = std::env::temp_dir().join(format!("chaperone-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("s.yaml");
        std::fs::write(&p, "credentials:\n  a: {user: u, password: hunter2}\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            Secrets::load(&p),
            Err(SecretsError::Exposed { .. })
        ));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(Secrets::load(&p).unwrap().get("a").unwrap().user, "u");
        std::fs::write(&p, "credentials:\n  a: {user: u, pasword: hunter2}\n").unwrap();
        let err = Secrets::load(&p).unwrap_err().to_string();
        assert!(!err.contains("hunter2"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
