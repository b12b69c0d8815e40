//! Kernel side of the interception: cgroup programs attached to the agent cgroup tree.
//!
//! - `connect4`/`connect6`: every TCP connect from an agent is rewritten to the proxy listener,
//!   its original destination saved by socket cookie. UDP connects go through only to the
//!   configured DNS resolvers. Anything else is refused.
//! - `sendmsg4`/`sendmsg6`: unconnected UDP sends, same DNS-only rule.
//! - `sock_ops` (active established): re-keys the original destination by the agent socket's
//!   local address, which is the peer address the proxy sees on accept.
//! - `getpeername4`/`getpeername6`: the agent sees the peer it asked for, not the proxy.
//! - `sock_release`: drops the by-cookie entry when the agent's socket goes away.
//! - `sock_create`: agents may create only TCP and UDP sockets (no ICMP ping sockets, SCTP,
//!   MPTCP or raw sockets, whose traffic no other hook sees).
//! - `cgroup_skb` egress/ingress: the backstop. An agent socket's packets may only go to or come
//!   from loopback (the proxy) and the DNS resolvers, whatever path put them on the wire (a
//!   `listen()` without `bind()`, a protocol a hook missed).
//!
//! Programs stay thin: each calls a `try_` function and maps failure to a named verdict.
//! Kernel minimum: 6.1 (`bpf_get_current_*` helpers in cgroup sock_addr programs,
//! `sock_release` hook, bpf_link cgroup attachment).
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{bpf_sock_addr, bpf_sock_ops},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid,
        generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    },
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr, map, sock_ops},
    maps::{Array, LruHashMap},
    programs::{SkBuffContext, SockAddrContext, SockContext, SockOpsContext},
};
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use gateway_common::{
    AF_INET, AF_INET6, DnsResolver, MAX_DNS_RESOLVERS, MAX_TRACKED_CONNECTIONS, OrigDst,
    ProxyConfig, SockAddrKey, is_v4_mapped, v4_mapped,
};

/// cgroup sock_addr verdicts.
const ALLOW: i32 = 1;
/// The syscall fails with EPERM.
const REFUSE: i32 = 0;
/// When a program cannot do its job (no config, a map full or unreadable), the connection is
/// refused: an agent connection that cannot be tracked must not reach the network directly.
const ON_ERROR: i32 = REFUSE;

/// cgroup_skb and cgroup_sock verdicts.
const PASS: i32 = 1;
const DROP: i32 = 0;

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;

#[map(name = "ORIG_BY_COOKIE")]
static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> =
    LruHashMap::with_max_entries(MAX_TRACKED_CONNECTIONS, 0);

#[map(name = "ORIG_BY_ADDR")]
static ORIG_BY_ADDR: LruHashMap<SockAddrKey, OrigDst> =
    LruHashMap::with_max_entries(MAX_TRACKED_CONNECTIONS, 0);

#[map(name = "CONFIG")]
static CONFIG: Array<ProxyConfig> = Array::with_max_entries(1, 0);

#[map(name = "DNS_RESOLVERS")]
static DNS_RESOLVERS: Array<DnsResolver> = Array::with_max_entries(MAX_DNS_RESOLVERS, 0);

// ---- connect ---------------------------------------------------------------------------------

#[cgroup_sock_addr(connect4)]
pub fn redirect_connect4(ctx: SockAddrContext) -> i32 {
    verdict(try_connect(&ctx, AF_INET))
}

#[cgroup_sock_addr(connect6)]
pub fn redirect_connect6(ctx: SockAddrContext) -> i32 {
    verdict(try_connect(&ctx, AF_INET6))
}

/// Collapse a result into exactly ALLOW or REFUSE: the verifier checks the return range, and a
/// value that went through the stack has lost its bounds.
#[inline(always)]
fn verdict(r: Result<i32, ()>) -> i32 {
    match r {
        Ok(ALLOW) => ALLOW,
        Ok(_) => REFUSE,
        Err(()) => ON_ERROR,
    }
}

fn try_connect(ctx: &SockAddrContext, family: u16) -> Result<i32, ()> {
    let sa = ctx.sock_addr;
    let cfg = CONFIG.get(0).ok_or(())?;
    if !in_proxy_netns(ctx, cfg) {
        return Ok(REFUSE);
    }
    let (ty, proto) = unsafe { ((*sa).type_, (*sa).protocol) };
    let dst = read_user_addr(sa, family);
    let port = user_port(sa);
    if ty == SOCK_DGRAM && proto == IPPROTO_UDP {
        return Ok(dns_verdict(&dst, port));
    }
    // MPTCP, SCTP and anything else the proxy cannot relay would bypass it: refuse.
    if ty != SOCK_STREAM || proto != IPPROTO_TCP {
        return Ok(REFUSE);
    }
    if cfg.enabled == 0 {
        return Ok(REFUSE);
    }
    let proxy = proxy_addr_for(cfg, &dst);
    if dst == proxy && port == cfg.proxy_port {
        // A direct connection to the proxy would arrive with no original destination to relay
        // to; refuse it here rather than letting the proxy see a loop.
        return Ok(REFUSE);
    }
    let orig = OrigDst {
        addr: dst,
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        uid: bpf_get_current_uid_gid() as u32,
        port,
        family,
        _pad: 0,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    ORIG_BY_COOKIE.insert(&cookie, &orig, 0).map_err(|_| ())?;
    write_user_addr(sa, family, &proxy);
    unsafe { (*sa).user_port = u32::from(cfg.proxy_port.to_be()) };
    Ok(ALLOW)
}

/// Whether the socket lives in the network namespace the proxy listens in.
#[inline(always)]
fn in_proxy_netns(ctx: &SockAddrContext, cfg: &ProxyConfig) -> bool {
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    cookie == cfg.netns_cookie
}

/// The proxy listener in the form the agent's socket needs: v4-mapped for IPv4 sockets and for
/// IPv6 sockets dialing a v4-mapped address (they must reach the IPv4 listener), IPv6 otherwise.
#[inline(always)]
fn proxy_addr_for(cfg: &ProxyConfig, dst: &[u32; 4]) -> [u32; 4] {
    if is_v4_mapped(dst) {
        v4_mapped(cfg.proxy_ip4)
    } else {
        cfg.proxy_ip6
    }
}

// ---- UDP: DNS only ---------------------------------------------------------------------------

#[cgroup_sock_addr(sendmsg4)]
pub fn dns_only_sendmsg4(ctx: SockAddrContext) -> i32 {
    sendmsg_verdict(&ctx, AF_INET)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn dns_only_sendmsg6(ctx: SockAddrContext) -> i32 {
    sendmsg_verdict(&ctx, AF_INET6)
}

#[inline(always)]
fn sendmsg_verdict(ctx: &SockAddrContext, family: u16) -> i32 {
    match CONFIG.get(0) {
        Some(cfg) if in_proxy_netns(ctx, cfg) => {
            let dst = read_user_addr(ctx.sock_addr, family);
            dns_verdict(&dst, user_port(ctx.sock_addr))
        }
        _ => REFUSE,
    }
}

#[inline(always)]
fn dns_verdict(dst: &[u32; 4], port: u16) -> i32 {
    if is_resolver(dst, Some(port)) {
        ALLOW
    } else {
        REFUSE
    }
}

/// Whether `addr` (and `port`, when given) is a configured DNS resolver.
#[inline(always)]
fn is_resolver(addr: &[u32; 4], port: Option<u16>) -> bool {
    for i in 0..MAX_DNS_RESOLVERS {
        if let Some(r) = DNS_RESOLVERS.get(i) {
            if r.in_use != 0 && port.is_none_or(|p| p == r.port) && r.addr == *addr {
                return true;
            }
        }
    }
    false
}

// ---- sock_create: TCP and UDP only -----------------------------------------------------------

#[cgroup_sock(sock_create)]
pub fn inet_sock_create(ctx: SockContext) -> i32 {
    let (ty, proto) = unsafe { ((*ctx.sock).type_, (*ctx.sock).protocol) };
    let tcp = ty == SOCK_STREAM && proto == IPPROTO_TCP;
    let udp = ty == SOCK_DGRAM && proto == IPPROTO_UDP;
    if tcp || udp { PASS } else { DROP }
}

// ---- cgroup_skb: the backstop ----------------------------------------------------------------

const ETH_P_IP: u32 = 0x0800;
const ETH_P_IPV6: u32 = 0x86DD;

#[cgroup_skb(egress)]
pub fn backstop_egress(ctx: SkBuffContext) -> i32 {
    // IPv4 destination at offset 16, IPv6 destination at 24.
    backstop(&ctx, 16, 24)
}

#[cgroup_skb(ingress)]
pub fn backstop_ingress(ctx: SkBuffContext) -> i32 {
    // IPv4 source at offset 12, IPv6 source at 8.
    backstop(&ctx, 12, 8)
}

/// Pass a packet only if its far end is loopback or a DNS resolver. Packets that cannot be
/// read are dropped.
#[inline(always)]
fn backstop(ctx: &SkBuffContext, off4: usize, off6: usize) -> i32 {
    let proto = u32::from(u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16));
    let addr = if proto == ETH_P_IP {
        match ctx.load::<u32>(off4) {
            Ok(ip4) => v4_mapped(ip4),
            Err(_) => return DROP,
        }
    } else if proto == ETH_P_IPV6 {
        match ctx.load::<[u32; 4]>(off6) {
            Ok(a) => a,
            Err(_) => return DROP,
        }
    } else {
        return DROP;
    };
    if is_loopback(&addr) || is_resolver(&addr, None) {
        PASS
    } else {
        DROP
    }
}

/// 127.0.0.0/8 (v4-mapped) or ::1.
#[inline(always)]
fn is_loopback(addr: &[u32; 4]) -> bool {
    if is_v4_mapped(addr) {
        return addr[3].to_ne_bytes()[0] == 127;
    }
    addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && addr[3] == u32::from_ne_bytes([0, 0, 0, 1])
}

// ---- sock_ops: re-key by local address -------------------------------------------------------

#[sock_ops]
pub fn rekey_established(ctx: SockOpsContext) -> u32 {
    try_rekey(&ctx);
    // sock_ops return values only matter for ops that ask for a reply; never fail the socket.
    1
}

fn try_rekey(ctx: &SockOpsContext) -> Option<()> {
    if ctx.op() != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return None;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = unsafe { ORIG_BY_COOKIE.get(&cookie) }?;
    let ops = ctx.ops;
    let addr = if ctx.family() == u32::from(AF_INET) {
        v4_mapped(ctx.local_ip4())
    } else {
        read_local_ip6(ops)
    };
    let key = SockAddrKey {
        addr,
        // sock_ops local_port is host byte order.
        port: ctx.local_port() as u16,
        _pad: 0,
    };
    ORIG_BY_ADDR.insert(&key, orig, 0).ok()
}

// ---- getpeername: show the original peer -----------------------------------------------------

#[cgroup_sock_addr(getpeername4)]
pub fn orig_getpeername4(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, AF_INET);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn orig_getpeername6(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, AF_INET6);
    ALLOW
}

fn restore_peer(ctx: &SockAddrContext, family: u16) -> Option<()> {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = unsafe { ORIG_BY_COOKIE.get(&cookie) }?;
    write_user_addr(ctx.sock_addr, family, &orig.addr);
    unsafe { (*ctx.sock_addr).user_port = u32::from(orig.port.to_be()) };
    Some(())
}

// ---- sock_release: forget the socket ---------------------------------------------------------

#[cgroup_sock(sock_release)]
pub fn forget_released(ctx: SockContext) -> i32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // Absent for sockets that were never redirected; nothing to do then.
    let _ = ORIG_BY_COOKIE.remove(&cookie);
    1
}

// ---- field access ----------------------------------------------------------------------------
// The verifier rejects whole-array loads and stores of user_ip6/local_ip6: go word by word.

#[inline(always)]
fn user_port(sa: *mut bpf_sock_addr) -> u16 {
    // sock_addr user_port is network byte order in the low 16 bits.
    u16::from_be(unsafe { (*sa).user_port } as u16)
}

#[inline(always)]
fn read_user_addr(sa: *mut bpf_sock_addr, family: u16) -> [u32; 4] {
    if family == AF_INET {
        return v4_mapped(unsafe { (*sa).user_ip4 });
    }
    unsafe {
        [
            read_volatile(addr_of!((*sa).user_ip6[0])),
            read_volatile(addr_of!((*sa).user_ip6[1])),
            read_volatile(addr_of!((*sa).user_ip6[2])),
            read_volatile(addr_of!((*sa).user_ip6[3])),
        ]
    }
}

#[inline(always)]
fn write_user_addr(sa: *mut bpf_sock_addr, family: u16, addr: &[u32; 4]) {
    unsafe {
        if family == AF_INET {
            (*sa).user_ip4 = addr[3];
            return;
        }
        write_volatile(addr_of_mut!((*sa).user_ip6[0]), addr[0]);
        write_volatile(addr_of_mut!((*sa).user_ip6[1]), addr[1]);
        write_volatile(addr_of_mut!((*sa).user_ip6[2]), addr[2]);
        write_volatile(addr_of_mut!((*sa).user_ip6[3]), addr[3]);
    }
}

#[inline(always)]
fn read_local_ip6(ops: *mut bpf_sock_ops) -> [u32; 4] {
    unsafe {
        [
            read_volatile(addr_of!((*ops).local_ip6[0])),
            read_volatile(addr_of!((*ops).local_ip6[1])),
            read_volatile(addr_of!((*ops).local_ip6[2])),
            read_volatile(addr_of!((*ops).local_ip6[3])),
        ]
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
