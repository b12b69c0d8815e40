//! The daemon's configuration file: where the proxy listens, which cgroup tree holds agents,
//! where pins and state live, which destinations are targets and what happens to the rest.
//!
//! Owns parsing and validation only; it does no I/O beyond reading the file (or the directory
//! of `*.yaml` files) it is given, and `/etc/resolv.conf` when no resolvers are configured.
//! Errors name the file, line and column. In a directory, files are read in name order;
//! `targets` and `grants` add up across files, every other setting may be set by one file only.
//!
//! ```yaml
//! listen_port: 987
//! unlisted: deny            # or allow: relay as raw TCP, recorded
//! targets:
//!   - name: app
//!     protocol: tcp
//!     address: 127.0.0.1    # an address or a CIDR
//!     port: 5432
//! ```

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
};

/// The configuration `chaperone daemon` uses when given no `--config` and none is installed.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../examples/default.yaml");
/// Where an installed configuration lives.
pub const SYSTEM_PATH: &str = "/etc/chaperone/chaperone.yaml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Parse(#[from] YamlError),
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error("{path}: no *.yaml files in this directory")]
    EmptyDir { path: String },
    #[error(
        "{path}: {problem}; the daemon reads policy only from files and directories that root owns and only root can write"
    )]
    Untrusted { path: String, problem: String },
}

/// A YAML file that does not parse, with where.
#[derive(Debug, thiserror::Error)]
#[error("{path}:{line}:{column}: {message}")]
pub struct YamlError {
    pub path: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Parse YAML, locating errors. With `redact`, the message keeps only its first clause:
/// serde_yaml can quote the offending value, which in a secrets file is a password.
pub fn parse_yaml<T: serde::de::DeserializeOwned>(
    text: &str,
    path: &str,
    redact: bool,
) -> Result<T, YamlError> {
    serde_yaml::from_str(text).map_err(|e| {
        let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
        let message = e.to_string();
        let message = if redact {
            message.split(':').next().unwrap_or("invalid").to_string()
        } else {
            message
        };
        YamlError {
            path: path.to_string(),
            line,
            column,
            message,
        }
    })
}

/// What to do with an agent connection to a destination no target names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Unlisted {
    /// Relay as raw TCP and record the session's metadata.
    Allow,
    /// Refuse the connection and record the denial.
    Deny,
}

/// How the proxy understands a target's traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProtocolKind {
    /// Opaque bytes; the verdict is taken once, at connect time.
    Tcp,
    /// PostgreSQL wire protocol v3: every statement is classified and judged.
    Postgres,
}

/// A destination the daemon knows by name.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub name: String,
    pub protocol: ProtocolKind,
    #[serde(deserialize_with = "addr_or_net")]
    pub address: IpNet,
    pub port: u16,
    /// PostgreSQL: the name of the credential (in the secrets file) the daemon logs in with.
    /// The agent never sees it.
    #[serde(default)]
    pub credential: Option<String>,
    /// PostgreSQL: the database this target serves (absent: the one the agent asks for).
    #[serde(default)]
    pub database: Option<String>,
    /// TLS from the daemon to this target: disable, require, verify-full.
    #[serde(default)]
    pub tls: crate::tls::UpstreamTls,
    /// CA certificates (PEM) for `tls: verify-full`.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// Name to verify and send as SNI (default: the target's address).
    #[serde(default)]
    pub tls_server_name: Option<String>,
}

impl Target {
    /// The name to verify the upstream's certificate against.
    pub fn tls_name(&self) -> String {
        self.tls_server_name
            .clone()
            .unwrap_or_else(|| self.address.addr().to_string())
    }

    /// Whether a connection to `dst` is for this target. IPv4-mapped IPv6 destinations match
    /// IPv4 targets: they reach the same server.
    pub fn matches(&self, dst: SocketAddr) -> bool {
        dst.port() == self.port && self.address.contains(&canonical_ip(dst.ip()))
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it reaches; anything else unchanged.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dns {
    /// Resolvers agents may send DNS to (UDP). Absent: the nameservers of /etc/resolv.conf.
    pub resolvers: Option<Vec<SocketAddr>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Port of the proxy listener, the same on IPv4 and IPv6. 0 picks a free one.
    /// Default 987: privileged, so no other user can squat it while the daemon is down.
    #[serde(default = "default_listen_port")]
    pub listen_port: u16,
    #[serde(default = "default_listen_ipv4")]
    pub listen_ipv4: Ipv4Addr,
    #[serde(default = "default_listen_ipv6")]
    pub listen_ipv6: Ipv6Addr,
    /// The agent cgroup tree, relative to the cgroup2 mount. Every process below it is an agent.
    #[serde(default = "default_agent_cgroup")]
    pub agent_cgroup: PathBuf,
    /// bpffs directory holding the pinned programs' links and maps.
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    /// Session records and the daemon's status file.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default = "default_unlisted")]
    pub unlisted: Unlisted,
    #[serde(default)]
    pub dns: Dns,
    #[serde(default)]
    pub targets: Vec<Arc<Target>>,
    /// Who may do what on which target (see `policy`). No grant: denied.
    #[serde(default)]
    pub grants: Vec<crate::policy::Grant>,
    /// Root-only file with the upstream credentials targets name.
    #[serde(default)]
    pub secrets_file: Option<PathBuf>,
    /// Certificate and key (PEM) shown to agents that ask for TLS; absent: the daemon issues
    /// itself one for localhost at start.
    #[serde(default)]
    pub client_tls: Option<ClientTls>,
    /// The OIDC issuer agents prove their identity with (see `identity::oidc`). Absent: only
    /// root may start agents, by name.
    #[serde(default)]
    pub oidc: Option<crate::identity::oidc::OidcConfig>,
    /// Agents not started by `chaperone run`, bound by cgroup (see `identity::services`).
    #[serde(default)]
    pub services: Vec<crate::identity::services::ServiceConfig>,
    /// Masking of result values (see `mask`). Absent: the built-in detectors, redacting.
    #[serde(default)]
    pub masking: crate::mask::MaskRules,
    /// The 32-byte key of the `token` masking method (default `<state_dir>/mask.key`, made on
    /// first start): keep it to keep tokens stable across restarts.
    #[serde(default)]
    pub masking_key_file: Option<PathBuf>,
    /// Where this configuration came from, for messages.
    #[serde(skip)]
    pub source: String,
    /// The file or directory it was read from (none for the embedded default): what the daemon
    /// watches and reloads.
    #[serde(skip)]
    pub path: Option<PathBuf>,
}

/// Below 1024 so that, while the daemon is down, no unprivileged process can take the port
/// agents are redirected to.
fn default_listen_port() -> u16 {
    987
}
fn default_listen_ipv4() -> Ipv4Addr {
    Ipv4Addr::LOCALHOST
}
fn default_listen_ipv6() -> Ipv6Addr {
    Ipv6Addr::LOCALHOST
}
fn default_agent_cgroup() -> PathBuf {
    "chaperone.agents".into()
}
fn default_pin_dir() -> PathBuf {
    "/sys/fs/bpf/chaperone".into()
}
fn default_state_dir() -> PathBuf {
    "/var/lib/chaperone".into()
}
fn default_unlisted() -> Unlisted {
    // Deny what policy does not name.
    Unlisted::Deny
}

fn addr_or_net<'de, D: Deserializer<'de>>(d: D) -> Result<IpNet, D::Error> {
    let s = String::deserialize(d)?;
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net);
    }
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| serde::de::Error::custom(format!("`{s}` is neither an IP address nor a CIDR")))
}

impl Config {
    /// Parse a configuration from text; `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> Result<Self, ConfigError> {
        let cfg = Self::parse_file(text, source)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// One file, syntax and types checked, grants located; not yet validated as a whole.
    fn parse_file(text: &str, source: &str) -> Result<Self, ConfigError> {
        let mut cfg: Config = parse_yaml(text, source, false)?;
        cfg.source = source.to_string();
        let lines = item_lines(text, "grants");
        for (i, g) in cfg.grants.iter_mut().enumerate() {
            g.source = Some(crate::policy::GrantSource {
                file: source.to_string(),
                line: lines.get(i).copied(),
            });
        }
        Ok(cfg)
    }

    /// Read `path` (a file, or a directory of `*.yaml` files), or the installed configuration,
    /// or the embedded default, in that order.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let path = match path {
            Some(p) => p.to_path_buf(),
            None if Path::new(SYSTEM_PATH).exists() => SYSTEM_PATH.into(),
            None => return Self::parse(EMBEDDED_DEFAULT, "<embedded default>"),
        };
        let display = path.display().to_string();
        let mut cfg = if path.is_dir() {
            Self::load_dir(&path)?
        } else {
            Self::parse_file(&read(&path)?, &display)?
        };
        cfg.source = display;
        cfg.path = Some(path);
        cfg.validate()?;
        Ok(cfg)
    }

    /// [`Config::load`] for the daemon: the file, or the directory and each of its files, must
    /// belong to root and be writable by no one else (whoever can write them can change the
    /// policy, the issuer and where the daemon pins and writes).
    pub fn load_trusted(path: &Path) -> Result<Self, ConfigError> {
        Self::ensure_trusted(path)?;
        Self::load(Some(path))
    }

    /// The trust check of [`Config::load_trusted`] alone, for a configuration already loaded.
    pub fn ensure_trusted(path: &Path) -> Result<(), ConfigError> {
        check_trusted(path)?;
        if path.is_dir() {
            for f in config_files(path)? {
                check_trusted(&f)?;
            }
        }
        Ok(())
    }

    /// Every `*.yaml`/`*.yml` file of `dir`, in name order, merged.
    fn load_dir(dir: &Path) -> Result<Self, ConfigError> {
        let display = dir.display().to_string();
        let files = config_files(dir)?;
        if files.is_empty() {
            return Err(ConfigError::EmptyDir { path: display });
        }
        let mut merged = serde_yaml::Mapping::new();
        let mut set_by: std::collections::HashMap<String, String> = Default::default();
        let mut grants = Vec::new();
        for file in &files {
            let name = file.display().to_string();
            let text = read(file)?;
            // Checked alone first, so errors point into the file that has them.
            let part = Self::parse_file(&text, &name)?;
            grants.extend(part.grants);
            let map: serde_yaml::Mapping = parse_yaml(&text, &name, false)?;
            for (k, v) in map {
                let key = k.as_str().unwrap_or_default().to_string();
                match (key.as_str(), merged.get_mut(&k)) {
                    ("targets" | "grants", Some(serde_yaml::Value::Sequence(have))) => {
                        if let serde_yaml::Value::Sequence(more) = v {
                            have.extend(more);
                        }
                    }
                    (_, Some(_)) => {
                        return Err(ConfigError::Invalid {
                            path: name,
                            message: format!(
                                "`{key}` is already set by {}: set it in one file only",
                                set_by[&key]
                            ),
                        });
                    }
                    (_, None) => {
                        set_by.insert(key, name.clone());
                        merged.insert(k, v);
                    }
                }
            }
        }
        let mut cfg: Config =
            serde_yaml::from_value(serde_yaml::Value::Mapping(merged)).map_err(|e| {
                ConfigError::Invalid {
                    path: display.clone(),
                    message: e.to_string(),
                }
            })?;
        // The located copies (same order: files in name order, items in file order).
        cfg.grants = grants;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: self.source.clone(),
            message,
        };
        let mut names = std::collections::HashSet::new();
        for t in &self.targets {
            if t.name.is_empty() {
                return Err(invalid("a target has an empty name".into()));
            }
            if !names.insert(t.name.as_str()) {
                return Err(invalid(format!("target `{}` is defined twice", t.name)));
            }
            if t.port == 0 {
                return Err(invalid(format!(
                    "target `{}`: port 0 is not a port",
                    t.name
                )));
            }
            if t.tls == crate::tls::UpstreamTls::VerifyFull && t.tls_ca_file.is_none() {
                return Err(invalid(format!(
                    "target `{}`: tls: verify-full needs tls_ca_file",
                    t.name
                )));
            }
            if t.protocol == ProtocolKind::Postgres && t.credential.is_none() {
                return Err(invalid(format!(
                    "target `{}`: a postgres target needs `credential` (a name in secrets_file)",
                    t.name
                )));
            }
        }
        if self.targets.iter().any(|t| t.credential.is_some()) && self.secrets_file.is_none() {
            return Err(invalid(
                "targets name credentials but no secrets_file is set".into(),
            ));
        }
        for (i, g) in self.grants.iter().enumerate() {
            if let Some(m) = &g.masking {
                let at = g
                    .source
                    .as_ref()
                    .map_or(format!("grants[{i}]"), |s| s.to_string());
                m.check().map_err(|e| invalid(format!("{at}: {e}")))?;
            }
            if !names.contains(g.target.as_str()) {
                let at = g
                    .source
                    .as_ref()
                    .map_or(format!("grants[{i}]"), |s| s.to_string());
                return Err(invalid(format!("{at}: no target named `{}`", g.target)));
            }
        }
        if let Some(o) = &self.oidc {
            o.validate().map_err(invalid)?;
        }
        let mut cgroups = std::collections::HashSet::new();
        for svc in &self.services {
            svc.validate().map_err(invalid)?;
            if !cgroups.insert(&svc.cgroup) {
                return Err(invalid(format!(
                    "services: cgroup `{}` is listed twice",
                    svc.cgroup.display()
                )));
            }
            if svc.oidc_client.is_some() && self.oidc.is_none() {
                return Err(invalid(format!(
                    "services: `{}` has an oidc_client but the configuration has no `oidc` section",
                    svc.identity
                )));
            }
        }
        if self.agent_cgroup.as_os_str().is_empty()
            || self.agent_cgroup.is_absolute()
            || self
                .agent_cgroup
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(invalid(format!(
                "agent_cgroup `{}` must be a non-empty relative path below the cgroup2 mount, without `..`",
                self.agent_cgroup.display()
            )));
        }
        if !self.listen_ipv4.is_loopback() || !self.listen_ipv6.is_loopback() {
            return Err(invalid(format!(
                "listen_ipv4/listen_ipv6 ({}, {}) must be loopback addresses: the proxy serves this host only",
                self.listen_ipv4, self.listen_ipv6
            )));
        }
        if !self.pin_dir.is_absolute() {
            return Err(invalid(format!(
                "pin_dir `{}` must be an absolute path on bpffs",
                self.pin_dir.display()
            )));
        }
        self.masking.check().map_err(|e| invalid(e.to_string()))?;
        if let Some(r) = &self.dns.resolvers
            && r.len() > gateway_common::MAX_DNS_RESOLVERS as usize
        {
            return Err(invalid(format!(
                "dns.resolvers: at most {} resolvers",
                gateway_common::MAX_DNS_RESOLVERS
            )));
        }
        Ok(())
    }

    /// The first target a connection to `dst` is for.
    pub fn target_for(&self, dst: SocketAddr) -> Option<&Arc<Target>> {
        self.targets.iter().find(|t| t.matches(dst))
    }

    /// The DNS resolvers agents may use: configured, or read from /etc/resolv.conf.
    pub fn dns_resolvers(&self) -> Vec<SocketAddr> {
        if let Some(r) = &self.dns.resolvers {
            return r.clone();
        }
        let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        resolv_conf_nameservers(&text)
            .into_iter()
            .take(gateway_common::MAX_DNS_RESOLVERS as usize)
            .collect()
    }

    pub fn sessions_log(&self) -> PathBuf {
        self.state_dir.join("sessions.jsonl")
    }

    pub fn status_file(&self) -> PathBuf {
        self.state_dir.join("daemon.json")
    }

    pub fn masking_key_file(&self) -> PathBuf {
        self.masking_key_file
            .clone()
            .unwrap_or_else(|| self.state_dir.join("mask.key"))
    }
}

/// The `*.yaml`/`*.yml` files of `dir` (not dotfiles: editors' and tools' temporary files), in
/// name order.
fn config_files(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| ConfigError::Read {
            path: dir.display().to_string(),
            source,
        })?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                && p.extension().is_some_and(|e| e == "yaml" || e == "yml")
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Owned by root, not writable by group or others (symlinks followed: what is read counts).
fn check_trusted(path: &Path) -> Result<(), ConfigError> {
    use std::os::unix::fs::MetadataExt as _;
    let untrusted = |problem: String| ConfigError::Untrusted {
        path: path.display().to_string(),
        problem,
    };
    let m = std::fs::metadata(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    if m.uid() != 0 {
        return Err(untrusted(format!("owned by uid {}, not root", m.uid())));
    }
    if m.mode() & 0o022 != 0 {
        return Err(untrusted(format!(
            "writable by group or others (mode {:o})",
            m.mode() & 0o7777
        )));
    }
    Ok(())
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// The line (1-based) where each item of the top-level sequence `key` starts, from YAML's own
/// event stream (serde_yaml keeps no positions). Empty when the text does not parse.
fn item_lines(text: &str, key: &str) -> Vec<usize> {
    use saphyr_parser::{Event, Parser};
    let mut events = Parser::new_from_str(text).map_while(Result::ok);
    let mut lines = Vec::new();
    // Down to the top-level mapping.
    for (e, _) in events.by_ref() {
        match e {
            Event::MappingStart(..) => break,
            Event::StreamStart | Event::DocumentStart(_) => continue,
            _ => return lines,
        }
    }
    while let Some((e, _)) = events.next() {
        let Event::Scalar(k, ..) = e else {
            return lines; // the end of the mapping
        };
        let Some((value, _)) = events.next() else {
            return lines;
        };
        if k == key && matches!(value, Event::SequenceStart(..)) {
            while let Some((item, span)) = events.next() {
                if item == Event::SequenceEnd {
                    break;
                }
                lines.push(span.start.line());
                skip_node(&item, &mut events);
            }
        } else {
            skip_node(&value, &mut events);
        }
    }
    lines
}

/// Consume the rest of the node that `first` opened.
fn skip_node<'a>(
    first: &saphyr_parser::Event<'a>,
    events: &mut impl Iterator<Item = (saphyr_parser::Event<'a>, saphyr_parser::Span)>,
) {
    use saphyr_parser::Event;
    if !matches!(first, Event::MappingStart(..) | Event::SequenceStart(..)) {
        return;
    }
    let mut depth = 1;
    for (e, _) in events {
        match e {
            Event::MappingStart(..) | Event::SequenceStart(..) => depth += 1,
            Event::MappingEnd | Event::SequenceEnd => {
                depth -= 1;
                if depth == 0 {
                    return;
                }
            }
            _ => {}
        }
    }
}

/// The `nameserver` lines of a resolv.conf, on port 53.
fn resolv_conf_nameservers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_parses() {
        let cfg = Config::parse(EMBEDDED_DEFAULT, "default").unwrap();
        assert_eq!(cfg.unlisted, Unlisted::Deny);
        assert!(!cfg.targets.is_empty());
    }

    #[test]
    fn defaults_fill_an_empty_file() {
        let cfg = Config::parse("{}", "x").unwrap();
        assert_eq!(cfg.listen_port, 987);
        assert_eq!(cfg.unlisted, Unlisted::Deny);
        assert_eq!(cfg.agent_cgroup, Path::new("chaperone.agents"));
    }

    #[test]
    fn target_matches_address_cidr_and_v4_mapped() {
        let cfg = Config::parse(
            "targets:\n  - {name: a, protocol: tcp, address: 127.0.0.1, port: 80}\n  - {name: b, protocol: tcp, address: 10.0.0.0/8, port: 443}\n  - {name: c, protocol: tcp, address: '::1', port: 80}\n",
            "x",
        )
        .unwrap();
        let name = |s: &str| cfg.target_for(s.parse().unwrap()).map(|t| t.name.clone());
        assert_eq!(name("127.0.0.1:80").as_deref(), Some("a"));
        assert_eq!(name("[::ffff:127.0.0.1]:80").as_deref(), Some("a"));
        assert_eq!(name("127.0.0.1:81"), None);
        assert_eq!(name("10.2.3.4:443").as_deref(), Some("b"));
        assert_eq!(name("11.2.3.4:443"), None);
        assert_eq!(name("[::1]:80").as_deref(), Some("c"));
    }

    #[test]
    fn errors_name_file_line_and_column() {
        let err = Config::parse("unlisted: maybe\n", "cfg.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("cfg.yaml:1:"), "{err}");
        assert!(err.contains("unknown variant"), "{err}");
        let err = Config::parse(
            "targets:\n  - {name: a, protocol: tcp, address: nope, port: 1}\n",
            "c.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("c.yaml:2:"), "{err}");
        assert!(err.contains("neither an IP address nor a CIDR"), "{err}");
        let err = Config::parse("listen_prot: 1\n", "c.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `listen_prot`"), "{err}");
    }

    #[test]
    fn invalid_values_are_refused() {
        let dup = "targets:\n  - {name: a, protocol: tcp, address: 127.0.0.1, port: 1}\n  - {name: a, protocol: tcp, address: 127.0.0.2, port: 1}\n";
        assert!(
            Config::parse(dup, "x")
                .unwrap_err()
                .to_string()
                .contains("defined twice")
        );
        assert!(Config::parse("agent_cgroup: ../escape\n", "x").is_err());
        assert!(Config::parse("agent_cgroup: /abs\n", "x").is_err());
        assert!(Config::parse("agent_cgroup: ''\n", "x").is_err());
        assert!(Config::parse("listen_ipv4: 0.0.0.0\n", "x").is_err());
        assert!(Config::parse("pin_dir: relative\n", "x").is_err());
    }

    #[test]
    fn grants_know_their_lines() {
        let text = "targets: [{name: t, protocol: tcp, address: 127.0.0.1, port: 1}]\n\
                    grants:\n  - identity: a\n    target: t\n    effect: allow\n\
                    \n  # a comment\n  - {group: g, target: t, effect: deny}\n";
        let cfg = Config::parse(text, "p.yaml").unwrap();
        let at: Vec<String> = cfg
            .grants
            .iter()
            .map(|g| g.source.as_ref().unwrap().to_string())
            .collect();
        assert_eq!(at, ["p.yaml:3", "p.yaml:8"]);
        assert_eq!(item_lines("grants: [{a: 1}, {b: 2}]", "grants"), [1, 1]);
        assert!(item_lines("- not a mapping", "grants").is_empty());
    }

    #[test]
    fn a_directory_adds_up_targets_and_grants_and_refuses_settings_set_twice() {
        let dir = std::env::temp_dir().join(format!("chaperone-cfg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("10-targets.yaml"),
            "unlisted: allow\ntargets:\n  - {name: t, protocol: tcp, address: 127.0.0.1, port: 1}\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("20-grants.yaml"),
            "# grants for t\ngrants:\n  - {identity: a, target: t, effect: allow}\n",
        )
        .unwrap();
        std::fs::write(dir.join("notes.txt"), "ignored").unwrap();
        let cfg = Config::load(Some(&dir)).unwrap();
        assert_eq!(cfg.unlisted, Unlisted::Allow);
        assert_eq!(cfg.targets.len(), 1);
        let src = cfg.grants[0].source.as_ref().unwrap().to_string();
        assert!(src.ends_with("20-grants.yaml:3"), "{src}");

        std::fs::write(dir.join("30-more.yaml"), "unlisted: deny\n").unwrap();
        let e = Config::load(Some(&dir)).unwrap_err().to_string();
        assert!(
            e.contains("30-more.yaml") && e.contains("already set by"),
            "{e}"
        );
        std::fs::write(
            dir.join("30-more.yaml"),
            "grants:\n  - {identity: a, target: nope, effect: allow}\n",
        )
        .unwrap();
        let e = Config::load(Some(&dir)).unwrap_err().to_string();
        assert!(e.contains("30-more.yaml:2: no target named `nope`"), "{e}");
        std::fs::write(
            dir.join("30-more.yaml"),
            "grants:\n  - {identity: a, target: t, effect: maybe}\n",
        )
        .unwrap();
        let e = Config::load(Some(&dir)).unwrap_err().to_string();
        assert!(e.contains("30-more.yaml:2:"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn resolv_conf() {
        let got = resolv_conf_nameservers("# c\nnameserver 10.0.0.53\nnameserver ::1\nsearch x\n");
        assert_eq!(
            got,
            vec!["10.0.0.53:53".parse().unwrap(), "[::1]:53".parse().unwrap()]
        );
    }
}
