//! The only module that touches aya: loads the embedded eBPF object, attaches its programs to
//! the agent cgroup, pins links and maps in bpffs, and answers "where did this accepted
//! connection mean to go" ([`Redirect::take_original`]).
//!
//! Fail closed by construction: links are pinned, so they outlive the daemon. With the daemon
//! gone, agents' connects are still rewritten to the proxy port, where nothing listens, and fail
//! with ECONNREFUSED. A restarted daemon adopts the pins: it loads fresh programs, reuses the
//! pinned maps, and swaps each pinned link's program in place (`BPF_LINK_UPDATE`), so there is no
//! instant without interception. `uninstall` removes the pins, which detaches everything.
//!
//! Kernel minimum: 5.14 (LRU lookup-and-delete); 6.1 for the helpers the programs use.

mod sys;

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, Map, MapData},
    programs::{CgroupAttachMode, CgroupSkbAttachType, Program, links::FdLink},
};
use gateway_common::{
    AF_INET, DnsResolver, MAP_CONFIG, MAP_DNS, MAP_ORIG_BY_ADDR, MAP_ORIG_BY_COOKIE, OrigDst,
    PINNED_MAPS, ProxyConfig, SockAddrKey, v4_mapped,
};
use serde::Serialize;
use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd,
    path::{Path, PathBuf},
};

/// The eBPF object gateway-user's build script compiled from gateway-ebpf.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gateway"));

/// Every program in the object, in attach order. The connect hooks go last so that when they
/// start redirecting, the hooks that complete the picture (re-keying, getpeername, release) are
/// already in place.
const PROGRAMS: [&str; 11] = [
    "backstop_egress",
    "backstop_ingress",
    "inet_sock_create",
    "forget_released",
    "rekey_established",
    "orig_getpeername4",
    "orig_getpeername6",
    "dns_only_sendmsg4",
    "dns_only_sendmsg6",
    "redirect_connect4",
    "redirect_connect6",
];

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("{path}: {source}; is this running as root?")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("mounting bpffs at /sys/fs/bpf: {0}")]
    MountBpffs(std::io::Error),
    #[error("{0} is not on a bpf filesystem; put pin_dir below a bpffs mount such as /sys/fs/bpf")]
    NotBpffs(PathBuf),
    #[error("loading the eBPF object: {0}; does the kernel have BTF, CGROUP_BPF and sockops?")]
    Load(#[from] aya::EbpfError),
    #[error(
        "this binary was built without its eBPF object (AYA_BUILD_SKIP); it cannot install interception"
    )]
    NoObject,
    #[error("eBPF object has no program `{0}` (build mismatch)")]
    MissingProgram(&'static str),
    #[error("eBPF object has no map `{0}` (build mismatch)")]
    MissingMap(&'static str),
    #[error("loading program `{name}`: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error(
        "attaching `{name}` to {cgroup}: {source}; is cgroup v2 mounted and the path a cgroup?"
    )]
    Attach {
        name: &'static str,
        cgroup: PathBuf,
        source: aya::programs::ProgramError,
    },
    #[error("pinning the link of `{name}`: {message}")]
    Pin { name: &'static str, message: String },
    #[error("adopting the pinned link {path}: {source}")]
    Adopt {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the pinned link {pin} is attached to another cgroup (or its cgroup was removed), not {cgroup}; \
         run `chaperone daemon --uninstall`, then start the daemon again"
    )]
    AttachedElsewhere { pin: PathBuf, cgroup: PathBuf },
    #[error(
        "{cgroup} is not covered by `{program}`: interception is not in force there ({reason})"
    )]
    NotIntercepted {
        program: &'static str,
        cgroup: PathBuf,
        reason: String,
    },
    #[error("map `{name}`: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("reading this process's network namespace cookie (SO_NETNS_COOKIE, Linux 5.14+): {0}")]
    Netns(std::io::Error),
    #[error("reading the original destination: {0}")]
    Lookup(std::io::Error),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RedirectError + '_ {
    move |source| RedirectError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where the proxy listens; the programs rewrite agents' connects to it.
#[derive(Debug, Clone, Copy)]
pub struct ProxyAddrs {
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub port: u16,
}

/// What a redirected connection meant to reach, and who made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct OriginalDst {
    /// The destination as the agent asked for it (IPv4-mapped IPv6 kept as such).
    pub addr: SocketAddr,
    pub pid: u32,
    pub uid: u32,
    pub comm: String,
    pub cgroup_id: u64,
}

impl From<&OrigDst> for OriginalDst {
    fn from(o: &OrigDst) -> Self {
        let ip = if o.family == AF_INET {
            IpAddr::V4(Ipv4Addr::from(o.addr[3].to_ne_bytes()))
        } else {
            IpAddr::V6(Ipv6Addr::from(addr_bytes(&o.addr)))
        };
        let comm_len = o.comm.iter().position(|&b| b == 0).unwrap_or(o.comm.len());
        Self {
            addr: SocketAddr::new(ip, o.port),
            pid: o.pid,
            uid: o.uid,
            comm: String::from_utf8_lossy(&o.comm[..comm_len]).into_owned(),
            cgroup_id: o.cgroup_id,
        }
    }
}

/// 16 address bytes from kernel address words (each word holds network-order bytes).
fn addr_bytes(words: &[u32; 4]) -> [u8; 16] {
    let mut b = [0u8; 16];
    for (chunk, w) in b.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&w.to_ne_bytes());
    }
    b
}

/// Kernel address words for an IP, IPv4 stored v4-mapped.
fn addr_words(ip: IpAddr) -> [u32; 4] {
    match ip {
        IpAddr::V4(v4) => v4_mapped(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            [w(0), w(4), w(8), w(12)]
        }
    }
}

/// The key under which `sock_ops` filed a connection: the agent socket's local address, which
/// is the peer address of the accepted socket.
pub fn key_for_peer(peer: SocketAddr) -> SockAddrKey {
    SockAddrKey {
        addr: addr_words(peer.ip()),
        port: peer.port(),
        _pad: 0,
    }
}

/// Installed and attached interception. Dropping it leaves the pins (and so interception) in
/// place: only [`uninstall`] removes them.
pub struct Redirect {
    // Keeps the loaded programs' and maps' fds open for the daemon's life.
    _ebpf: Ebpf,
    orig_by_addr: MapData,
}

impl Redirect {
    /// Load, configure and attach (or adopt the pinned attachment of) every program.
    pub fn install(
        pin_dir: &Path,
        cgroup: &Path,
        proxy: ProxyAddrs,
        dns: &[SocketAddr],
    ) -> Result<Self, RedirectError> {
        if OBJECT.is_empty() {
            return Err(RedirectError::NoObject);
        }
        ensure_bpffs(pin_dir)?;
        std::fs::create_dir_all(pin_dir).map_err(io_err(pin_dir))?;
        let map_pins: Vec<(&str, PathBuf)> =
            PINNED_MAPS.iter().map(|m| (*m, pin_dir.join(m))).collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &map_pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(OBJECT)?;
        // Configure before attaching: a fresh attachment must redirect from its first connect.
        write_config(&mut ebpf, proxy, dns)?;
        // Load (verify) every program before attaching any, so a program the kernel rejects
        // leaves the host as it was instead of half-installed.
        for name in PROGRAMS {
            load(&mut ebpf, name)?;
        }
        let cg = File::open(cgroup).map_err(io_err(cgroup))?;
        for name in PROGRAMS {
            attach_or_adopt(&mut ebpf, name, &cg, cgroup, pin_dir)?;
        }
        verify_attached(pin_dir, cgroup)?;
        let orig_by_addr = match ebpf.take_map(MAP_ORIG_BY_ADDR) {
            Some(Map::LruHashMap(data)) => data,
            _ => return Err(RedirectError::MissingMap(MAP_ORIG_BY_ADDR)),
        };
        Ok(Self {
            _ebpf: ebpf,
            orig_by_addr,
        })
    }

    /// The original destination of the connection the proxy accepted from `peer`, removed from
    /// the map as it is read (each connection is looked up once).
    pub fn take_original(&self, peer: SocketAddr) -> Result<Option<OriginalDst>, RedirectError> {
        let key = key_for_peer(peer);
        let found: Option<OrigDst> = sys::lookup_and_delete(self.orig_by_addr.fd().as_fd(), &key)
            .map_err(RedirectError::Lookup)?;
        Ok(found.as_ref().map(OriginalDst::from))
    }
}

fn write_config(
    ebpf: &mut Ebpf,
    proxy: ProxyAddrs,
    dns: &[SocketAddr],
) -> Result<(), RedirectError> {
    let map_err = |name| move |source| RedirectError::Map { name, source };
    let config = ProxyConfig {
        netns_cookie: own_netns_cookie().map_err(RedirectError::Netns)?,
        enabled: 1,
        proxy_ip4: u32::from_ne_bytes(proxy.ipv4.octets()),
        proxy_ip6: addr_words(IpAddr::V6(proxy.ipv6)),
        proxy_port: proxy.port,
        _pad: 0,
        _pad2: 0,
    };
    let mut cfg: aya::maps::Array<_, ProxyConfig> = ebpf
        .map_mut(MAP_CONFIG)
        .ok_or(RedirectError::MissingMap(MAP_CONFIG))?
        .try_into()
        .map_err(map_err(MAP_CONFIG))?;
    cfg.set(0, config, 0).map_err(map_err(MAP_CONFIG))?;
    let mut resolvers: aya::maps::Array<_, DnsResolver> = ebpf
        .map_mut(MAP_DNS)
        .ok_or(RedirectError::MissingMap(MAP_DNS))?
        .try_into()
        .map_err(map_err(MAP_DNS))?;
    for slot in 0..gateway_common::MAX_DNS_RESOLVERS {
        let r = dns
            .get(slot as usize)
            .map_or_else(DnsResolver::default, |a| DnsResolver {
                addr: addr_words(a.ip()),
                port: a.port(),
                in_use: 1,
            });
        resolvers.set(slot, r, 0).map_err(map_err(MAP_DNS))?;
    }
    Ok(())
}

/// The cookie of the network namespace this process (and so the proxy listener) lives in.
fn own_netns_cookie() -> std::io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt into a u64 with its size.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn link_pin(pin_dir: &Path, program: &str) -> PathBuf {
    pin_dir.join(format!("link_{program}"))
}

fn load(ebpf: &mut Ebpf, name: &'static str) -> Result<(), RedirectError> {
    let err = |source| RedirectError::Program { name, source };
    match ebpf.program_mut(name) {
        Some(Program::CgroupSockAddr(p)) => p.load().map_err(err),
        Some(Program::SockOps(p)) => p.load().map_err(err),
        Some(Program::CgroupSock(p)) => p.load().map_err(err),
        Some(Program::CgroupSkb(p)) => p.load().map_err(err),
        _ => Err(RedirectError::MissingProgram(name)),
    }
}

fn attach_or_adopt(
    ebpf: &mut Ebpf,
    name: &'static str,
    cg: &File,
    cgroup: &Path,
    pin_dir: &Path,
) -> Result<(), RedirectError> {
    let pin = link_pin(pin_dir, name);
    let adopt = pin.exists();
    let prog = ebpf
        .program_mut(name)
        .ok_or(RedirectError::MissingProgram(name))?;
    let program_err = |source| RedirectError::Program { name, source };
    let attach_err = |source| RedirectError::Attach {
        name,
        cgroup: cgroup.to_path_buf(),
        source,
    };
    // The three program types share no trait for attach/take_link; the steps are the same.
    macro_rules! attach {
        ($p:expr $(, $extra:expr)?) => {{
            if adopt {
                let link = sys::obj_get(&pin).map_err(|source| RedirectError::Adopt {
                    path: pin.clone(),
                    source,
                })?;
                // Adopting a link that serves another tree (agent_cgroup changed, or the tree
                // was removed and recreated) would leave this tree unguarded.
                let info = sys::cgroup_link_info(link.as_fd()).map_err(|source| RedirectError::Adopt {
                    path: pin.clone(),
                    source,
                })?;
                if info.cgroup_id != cgroup_id(cg).map_err(io_err(cgroup))? {
                    return Err(RedirectError::AttachedElsewhere {
                        pin: pin.clone(),
                        cgroup: cgroup.to_path_buf(),
                    });
                }
                let prog_fd = $p.fd().map_err(program_err)?;
                sys::link_update(link.as_fd(), prog_fd.as_fd()).map_err(|source| {
                    RedirectError::Adopt {
                        path: pin.clone(),
                        source,
                    }
                })
            } else {
                let id = $p.attach(cg, $($extra,)? CgroupAttachMode::Single).map_err(attach_err)?;
                let link: FdLink = $p
                    .take_link(id)
                    .map_err(program_err)?
                    .try_into()
                    .map_err(|e: aya::programs::links::LinkError| RedirectError::Pin {
                        name,
                        message: e.to_string(),
                    })?;
                link.pin(&pin).map(drop).map_err(|e| RedirectError::Pin {
                    name,
                    message: e.to_string(),
                })
            }
        }};
    }
    match prog {
        Program::CgroupSockAddr(p) => attach!(p),
        Program::SockOps(p) => attach!(p),
        Program::CgroupSock(p) => attach!(p),
        Program::CgroupSkb(p) => {
            let direction = if name.ends_with("egress") {
                CgroupSkbAttachType::Egress
            } else {
                CgroupSkbAttachType::Ingress
            };
            attach!(p, direction)
        }
        _ => Err(RedirectError::MissingProgram(name)),
    }
}

/// Mount bpffs at /sys/fs/bpf if `pin_dir` is below it and nothing is mounted there.
fn ensure_bpffs(pin_dir: &Path) -> Result<(), RedirectError> {
    if crate::mounts::is_on(pin_dir, "bpf").map_err(io_err(Path::new("/proc/mounts")))? {
        return Ok(());
    }
    let default = Path::new("/sys/fs/bpf");
    if !pin_dir.starts_with(default) {
        return Err(RedirectError::NotBpffs(pin_dir.to_path_buf()));
    }
    std::fs::create_dir_all(default).map_err(RedirectError::MountBpffs)?;
    let c = |s: &str| std::ffi::CString::new(s).expect("static");
    let (src, dst, ty) = (c("bpf"), c("/sys/fs/bpf"), c("bpf"));
    // SAFETY: NUL-terminated static strings; no data argument.
    let rc = unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), ty.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(RedirectError::MountBpffs(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Whether every program's link is pinned under `pin_dir`.
pub fn is_installed(pin_dir: &Path) -> bool {
    PROGRAMS.iter().all(|p| link_pin(pin_dir, p).exists())
}

/// The cgroup id of an open cgroup directory (its inode number on cgroup2).
fn cgroup_id(dir: &File) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(dir.metadata()?.ino())
}

/// Check with the kernel that every pinned program is in effect on `cgroup` (attached there or
/// inherited from an ancestor): agents in it are intercepted by a live daemon, or refused while
/// it is down. Pins alone prove nothing: their cgroup may be another one, or gone.
pub fn verify_attached(pin_dir: &Path, cgroup: &Path) -> Result<(), RedirectError> {
    let cg = File::open(cgroup).map_err(io_err(cgroup))?;
    for program in PROGRAMS {
        let not = |reason: String| RedirectError::NotIntercepted {
            program,
            cgroup: cgroup.to_path_buf(),
            reason,
        };
        let pin = link_pin(pin_dir, program);
        let link = sys::obj_get(&pin).map_err(|e| not(format!("{}: {e}", pin.display())))?;
        let info =
            sys::cgroup_link_info(link.as_fd()).map_err(|e| not(format!("link info: {e}")))?;
        let effective = sys::effective_prog_ids(cg.as_fd(), info.attach_type)
            .map_err(|e| not(format!("querying the cgroup: {e}")))?;
        if !effective.contains(&info.prog_id) {
            return Err(not(format!(
                "program {} is not among {effective:?}",
                info.prog_id
            )));
        }
    }
    Ok(())
}

/// Remove every pin: links detach, maps go when the last user closes them. Returns what was
/// removed.
pub fn uninstall(pin_dir: &Path) -> Result<Vec<PathBuf>, RedirectError> {
    let mut removed = Vec::new();
    // Connect hooks first, mirroring install: never a moment with redirect but no re-keying.
    let links = PROGRAMS.iter().rev().map(|p| link_pin(pin_dir, p));
    for path in links.chain(PINNED_MAPS.iter().map(|m| pin_dir.join(m))) {
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
    }
    match std::fs::remove_dir(pin_dir) {
        Ok(()) => removed.push(pin_dir.to_path_buf()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(pin_dir)(e)),
    }
    Ok(removed)
}

/// What is pinned and how full the connection maps are.
#[derive(Debug, Serialize)]
pub struct RedirectStatus {
    /// Every program is in effect on the agent tree.
    pub installed: bool,
    /// Why not, when pins exist but do not guard the tree.
    pub problem: Option<String>,
    pub links: Vec<LinkStatus>,
    /// Entries in each connection-tracking map; `None` when the map is not pinned.
    pub orig_by_cookie_entries: Option<usize>,
    pub orig_by_addr_entries: Option<usize>,
}

#[derive(Debug, Serialize)]
pub struct LinkStatus {
    pub program: &'static str,
    pub pinned: bool,
}

pub fn status(pin_dir: &Path, tree: &Path) -> RedirectStatus {
    let verified = verify_attached(pin_dir, tree);
    RedirectStatus {
        installed: verified.is_ok(),
        problem: verified
            .err()
            .filter(|_| is_installed(pin_dir))
            .map(|e| e.to_string()),
        links: PROGRAMS
            .iter()
            .map(|p| LinkStatus {
                program: p,
                pinned: link_pin(pin_dir, p).exists(),
            })
            .collect(),
        orig_by_cookie_entries: count_entries::<u64>(&pin_dir.join(MAP_ORIG_BY_COOKIE)),
        orig_by_addr_entries: count_entries::<SockAddrKey>(&pin_dir.join(MAP_ORIG_BY_ADDR)),
    }
}

fn count_entries<K: aya::Pod>(pin: &Path) -> Option<usize> {
    let map = Map::from_map_data(MapData::from_pin(pin).ok()?).ok()?;
    let hash: BpfHashMap<_, K, OrigDst> = map.try_into().ok()?;
    Some(hash.keys().filter(Result::is_ok).count())
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_common::{AF_INET6, is_v4_mapped};

    fn orig(addr: SocketAddr, family: u16) -> OrigDst {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        OrigDst {
            addr: addr_words(addr.ip()),
            port: addr.port(),
            family,
            pid: 42,
            comm,
            ..Default::default()
        }
    }

    #[test]
    fn original_dst_round_trips_each_family() {
        let cases = [
            ("10.1.2.3:80", AF_INET, "10.1.2.3:80"),
            ("[::1]:5432", AF_INET6, "[::1]:5432"),
            // An IPv6 socket to a v4-mapped address is answered in its own family.
            ("[::ffff:127.0.0.1]:80", AF_INET6, "[::ffff:127.0.0.1]:80"),
        ];
        for (input, family, shown) in cases {
            let o = OriginalDst::from(&orig(input.parse().unwrap(), family));
            assert_eq!(o.addr.to_string(), shown);
            assert_eq!((o.pid, o.comm.as_str()), (42, "curl"));
        }
    }

    #[test]
    fn peer_keys_store_ipv4_v4_mapped() {
        let k4 = key_for_peer("127.0.0.1:40000".parse().unwrap());
        let k6 = key_for_peer("[::ffff:127.0.0.1]:40000".parse().unwrap());
        assert!(is_v4_mapped(&k4.addr));
        assert_eq!(
            k4, k6,
            "both families of one socket address must find one entry"
        );
        assert_eq!(k4.port, 40000);
        assert_eq!(k4.addr[3].to_ne_bytes(), [127, 0, 0, 1]);
    }
}
