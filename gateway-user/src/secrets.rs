//! Upstream credentials: read from a root-only file, handed to protocol modules by name, never
//! shown. `Debug` redacts passwords, nothing here implements `Display` or `Serialize`, and a
//! file readable by group or others is refused. Also the masking key ([`mask_key`]): 32 random
//! bytes in a root-only file, made on first start, so `token` output is stable across restarts.
//!
//! ```yaml
//! credentials:
//!   app-ro: {user: agent_ro, password: "…"}
//! ```

use serde::Deserialize;
use std::{
    collections::HashMap,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
};

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
    #[error(
        "{path}: a masking key is exactly 32 bytes, this file has {len}; remove it to make a new one (tokens change)"
    )]
    KeyLength { path: String, len: usize },
    #[error("{path}: cannot create the masking key: {source}")]
    KeyCreate {
        path: String,
        source: std::io::Error,
    },
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

/// The contents of a root-only file; one readable by group or others is refused.
fn read_private(path: &Path) -> Result<Vec<u8>, SecretsError> {
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
    std::fs::read(path).map_err(read_err)
}

/// The daemon's masking key from `path`, made (32 bytes from getrandom, mode 0600) if the file
/// does not exist. Never logged.
pub fn mask_key(path: &Path) -> Result<crate::mask::TokenKey, SecretsError> {
    let display = || path.display().to_string();
    if !path.exists() {
        let create_err = |source| SecretsError::KeyCreate {
            path: display(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(create_err)?;
        }
        let mut key = [0u8; 32];
        // SAFETY: getrandom into a 32-byte buffer.
        let n = unsafe { libc::getrandom(key.as_mut_ptr().cast(), key.len(), 0) };
        if n != 32 {
            return Err(create_err(std::io::Error::last_os_error()));
        }
        // create_new: a key another process just made is read, not overwritten.
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(mut f) => f
                .write_all(&key)
                .and_then(|()| f.sync_all())
                .map_err(create_err)?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(create_err(e)),
        }
    }
    let bytes = read_private(path)?;
    let key: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| SecretsError::KeyLength {
            path: display(),
            len: bytes.len(),
        })?;
    Ok(crate::mask::TokenKey::from_bytes(key))
}

impl Secrets {
    pub fn load(path: &Path) -> Result<Self, SecretsError> {
        let display = path.display().to_string();
        let bytes = read_private(path)?;
        let text = String::from_utf8(bytes).map_err(|e| SecretsError::Read {
            path: display.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.utf8_error()),
        })?;
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
