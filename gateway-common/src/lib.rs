//! The kernel contract: every type, map name and size the eBPF programs and the daemon share.
//!
//! Nothing else crosses the kernel boundary. Types are `#[repr(C)]`, fixed-width, without hidden
//! padding (explicit `_pad` fields, sizes asserted at compile time), and each field notes its byte
//! order. The userspace side gets `aya::Pod` impls behind the `user` feature so the kernel build
//! never sees aya.
//!
//! Addresses are always 16 bytes: IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`), so one key type
//! serves both families and an IPv6 socket talking to a v4-mapped peer finds the same entry as an
//! IPv4 socket would.
#![no_std]

/// Pinned map: original destination by socket cookie, written at connect time, removed at
/// `sock_release`. Read by `getpeername4/6` so the agent sees the peer it asked for.
pub const MAP_ORIG_BY_COOKIE: &str = "ORIG_BY_COOKIE";
/// Pinned map: original destination by the agent socket's local address, written by `sock_ops`
/// when the redirected connection is established; the proxy takes (reads and removes) it on
/// accept, keyed by the peer address it sees.
pub const MAP_ORIG_BY_ADDR: &str = "ORIG_BY_ADDR";
/// Pinned single-element array holding [`ProxyConfig`].
pub const MAP_CONFIG: &str = "CONFIG";
/// Pinned array of [`DnsResolver`]: the only UDP destinations agents may reach.
pub const MAP_DNS: &str = "DNS_RESOLVERS";

/// Every map the daemon pins, so install, status and uninstall agree on the set.
pub const PINNED_MAPS: [&str; 4] = [MAP_ORIG_BY_COOKIE, MAP_ORIG_BY_ADDR, MAP_CONFIG, MAP_DNS];

/// Capacity of the two original-destination maps: 100k concurrent connections with headroom.
/// Both are LRU maps, so a leak (a crashed proxy) degrades into eviction, never a full map.
pub const MAX_TRACKED_CONNECTIONS: u32 = 131_072;
/// Slots in [`MAP_DNS`].
pub const MAX_DNS_RESOLVERS: u32 = 8;

/// `AF_INET`/`AF_INET6` as stored in [`OrigDst::family`].
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// A socket address, IPv4 stored v4-mapped. Key of [`MAP_ORIG_BY_ADDR`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockAddrKey {
    /// Address words as the kernel's `bpf_sock*` structs hold them (network byte order bytes).
    pub addr: [u32; 4],
    /// Port, host byte order.
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<SockAddrKey>() == 20);

/// Where the agent meant to connect, and who it was. Value of both original-destination maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OrigDst {
    /// Destination address words, network byte order bytes, IPv4 v4-mapped.
    pub addr: [u32; 4],
    /// cgroup v2 id (the cgroup directory's inode number) of the connecting task.
    pub cgroup_id: u64,
    /// Thread-group id (the process id) of the connecting task.
    pub pid: u32,
    /// Real uid of the connecting task.
    pub uid: u32,
    /// Destination port, host byte order.
    pub port: u16,
    /// Family of the agent's socket ([`AF_INET`] or [`AF_INET6`]), so `getpeername` answers in it.
    pub family: u16,
    pub _pad: u32,
    /// `comm` of the connecting task, NUL-padded.
    pub comm: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<OrigDst>() == 56);

/// Where redirected connections go. Element 0 of [`MAP_CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ProxyConfig {
    /// Cookie of the network namespace the proxy listens in. Agent sockets in any other
    /// namespace (`unshare -n`) are refused: the proxy is not reachable from there, and their
    /// local addresses would collide with the host's in [`MAP_ORIG_BY_ADDR`].
    pub netns_cookie: u64,
    /// 0 until the daemon has written the proxy address. While 0, agents' TCP connects are
    /// refused: an unconfigured redirect fails closed.
    pub enabled: u32,
    /// IPv4 listener address word (network byte order bytes).
    pub proxy_ip4: u32,
    /// IPv6 listener address words (network byte order bytes).
    pub proxy_ip6: [u32; 4],
    /// Listener port, host byte order (the same port on both families).
    pub proxy_port: u16,
    pub _pad: u16,
    pub _pad2: u32,
}
const _: () = assert!(core::mem::size_of::<ProxyConfig>() == 40);

/// One allowed DNS resolver. Element of [`MAP_DNS`]; unused slots have `in_use == 0`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DnsResolver {
    /// Resolver address words (network byte order bytes), IPv4 v4-mapped.
    pub addr: [u32; 4],
    /// Resolver port, host byte order.
    pub port: u16,
    pub in_use: u16,
}
const _: () = assert!(core::mem::size_of::<DnsResolver>() == 20);

/// The third word of a v4-mapped address (`::ffff:0:0/96`), as the kernel stores it.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// Store an IPv4 address word (network byte order bytes) as a v4-mapped address.
#[inline(always)]
pub const fn v4_mapped(ip4: u32) -> [u32; 4] {
    [0, 0, V4_MAPPED_WORD, ip4]
}

/// Whether 16 address bytes are a v4-mapped IPv4 address.
#[inline(always)]
pub const fn is_v4_mapped(addr: &[u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == V4_MAPPED_WORD
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all four are repr(C), fixed-width, with explicit padding and asserted sizes.
    unsafe impl aya::Pod for super::SockAddrKey {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::ProxyConfig {}
    unsafe impl aya::Pod for super::DnsResolver {}
}
