//! Which peers a relay may talk to, pure. Deny by default: loopback, unspecified, RFC 1918,
//! CGNAT, link-local (with the 169.254.169.254 metadata address), multicast, benchmarking,
//! reserved, documentation and broadcast IPv4; ::1, ::, ULA fc00::/7, link-local fe80::/10,
//! site-local fec0::/10, multicast ff00::/8, NAT64 64:ff9b::/96, 6to4 2002::/16 and Teredo
//! 2001::/32 (both reach IPv4 space through a tunnel), documentation 2001:db8::/32, discard
//! 100::/64 — checked after canonicalising IPv4-mapped and IPv4-compatible IPv6 to IPv4, so
//! `[::ffff:127.0.0.1]` is loopback.
//!
//! The order of the rules: `turn.deny_peers` first (it beats everything, this server's own relay
//! addresses included); then this host's own addresses (every interface address, read at start
//! and on SIGHUP, and the relay IPs), which are peers only on a port of the relay range (another
//! allocation here, handed over in-process: never a service of this host) — unless
//! `turn.allow_peers` names the address itself (a /32 or /128 entry: a deliberate local peer,
//! e.g. a benchmark's echo server); then `turn.allow_peers`; then the default ranges. Opening a
//! LAN range does not open this host's own address in it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;

use ipnet::IpNet;

/// Ranges denied unless `allow_peers` opens them.
pub const DEFAULT_DENY: &[&str] = &[
    "0.0.0.0/8",       // "this network", unspecified
    "10.0.0.0/8",      // RFC 1918
    "100.64.0.0/10",   // CGNAT, RFC 6598
    "127.0.0.0/8",     // loopback
    "169.254.0.0/16",  // link-local, cloud metadata 169.254.169.254
    "172.16.0.0/12",   // RFC 1918
    "192.0.0.0/24",    // IETF protocol assignments
    "192.0.2.0/24",    // documentation
    "192.168.0.0/16",  // RFC 1918
    "198.18.0.0/15",   // benchmarking
    "198.51.100.0/24", // documentation
    "203.0.113.0/24",  // documentation
    "224.0.0.0/4",     // multicast
    "240.0.0.0/4",     // reserved, and 255.255.255.255
    "::/128",          // unspecified
    "::1/128",         // loopback
    "64:ff9b::/96",    // NAT64: would reach IPv4 behind a translator
    "64:ff9b:1::/48",  // local-use NAT64
    "100::/64",        // discard-only
    "2001::/32",       // Teredo: IPv4 behind a tunnel
    "2001:db8::/32",   // documentation
    "2002::/16",       // 6to4: IPv4 behind a tunnel
    "fc00::/7",        // unique local
    "fe80::/10",       // link-local
    "fec0::/10",       // site-local (deprecated, still routed on some LANs)
    "ff00::/8",        // multicast
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("`{value}` is not a CIDR range or IP address")]
pub struct BadRange {
    pub value: String,
}

#[derive(Debug, Clone)]
pub struct PeerFilter {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
    defaults: Vec<IpNet>,
    own_ips: crate::turn::engine::FastSet<IpAddr>,
    relay_ports: RangeInclusive<u16>,
}

/// `a.b.c.d`, `a.b.c.d/n`, `::1`, `fc00::/7`.
pub fn parse_range(s: &str) -> Result<IpNet, BadRange> {
    let s = s.trim();
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| BadRange {
            value: s.to_owned(),
        })
}

/// IPv4-mapped (`::ffff:a.b.c.d`) and IPv4-compatible (`::a.b.c.d`) addresses as IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            // ::a.b.c.d, but not :: and ::1, which are IPv6's own unspecified and loopback.
            if s[..6] == [0; 6] && v6 != Ipv6Addr::UNSPECIFIED && v6 != Ipv6Addr::LOCALHOST {
                let [a, b] = s[6].to_be_bytes();
                let [c, d] = s[7].to_be_bytes();
                return IpAddr::V4(Ipv4Addr::new(a, b, c, d));
            }
            IpAddr::V6(v6)
        }
        v4 => v4,
    }
}

/// Every address of this host's interfaces (loopback included), or none if they cannot be read
/// (then only the relay IPs count as own; the default ranges still cover loopback).
pub fn host_addresses() -> Vec<IpAddr> {
    match if_addrs::get_if_addrs() {
        Ok(list) => list.iter().map(|i| canonical(i.ip())).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list this host's addresses for the TURN peer filter");
            Vec::new()
        }
    }
}

impl PeerFilter {
    pub fn new(
        allow: &[IpNet],
        deny: &[IpNet],
        own_ips: impl IntoIterator<Item = IpAddr>,
        relay_ports: RangeInclusive<u16>,
    ) -> Self {
        Self {
            allow: allow.to_vec(),
            deny: deny.to_vec(),
            defaults: DEFAULT_DENY
                .iter()
                .map(|s| parse_range(s).expect("built-in ranges parse"))
                .collect(),
            own_ips: own_ips.into_iter().map(canonical).collect(),
            relay_ports,
        }
    }

    fn within(nets: &[IpNet], ip: &IpAddr) -> bool {
        nets.iter().any(|n| n.contains(ip))
    }

    /// Whether `ip` is this host: one of its addresses, or any loopback or unspecified address
    /// (a wide `allow_peers` such as `0.0.0.0/0` must not open 127.0.0.2 or 0.0.0.0).
    fn own(&self, ip: &IpAddr) -> bool {
        self.own_ips.contains(ip) || ip.is_loopback() || ip.is_unspecified()
    }

    /// Whether `allow_peers` names `ip` itself (not just a range around it).
    fn named(&self, ip: &IpAddr) -> bool {
        self.allow
            .iter()
            .any(|n| n.prefix_len() == n.max_prefix_len() && n.contains(ip))
    }

    /// Whether `peer` may be given a permission (CreatePermission, ChannelBind).
    pub fn allowed(&self, peer: SocketAddr) -> bool {
        let ip = canonical(peer.ip());
        if Self::within(&self.deny, &ip) {
            return false;
        }
        if self.own(&ip) && !self.named(&ip) {
            return self.relay_ports.contains(&peer.port());
        }
        if Self::within(&self.allow, &ip) {
            return true;
        }
        !Self::within(&self.defaults, &ip)
    }

    /// Whether a permission for `ip` (any port) may stay when the filter changes.
    pub fn allowed_ip(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        if Self::within(&self.deny, &ip) {
            return false;
        }
        self.own(&ip) || Self::within(&self.allow, &ip) || !Self::within(&self.defaults, &ip)
    }

    /// Whether `peer` is one of this host's addresses that `allow_peers` does not name: such a
    /// peer is reached only in-process (another allocation's relay port), never through the
    /// kernel, and only on a relay port.
    pub fn is_internal(&self, peer: SocketAddr) -> bool {
        let ip = canonical(peer.ip());
        self.own(&ip) && !self.named(&ip)
    }

    /// Whether a packet to `peer` may leave: an internal address only on a relay port.
    pub fn port_ok(&self, peer: SocketAddr) -> bool {
        !self.is_internal(peer) || self.relay_ports.contains(&peer.port())
    }

    pub fn relay_ports(&self) -> &RangeInclusive<u16> {
        &self.relay_ports
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(v: &[&str]) -> Vec<IpNet> {
        v.iter().map(|x| parse_range(x).unwrap()).collect()
    }

    fn filter(allow: &[&str], deny: &[&str]) -> PeerFilter {
        PeerFilter::new(
            &nets(allow),
            &nets(deny),
            vec!["203.0.113.7".parse().unwrap()],
            49152..=65535,
        )
    }

    fn ok(f: &PeerFilter, addr: &str) -> bool {
        f.allowed(addr.parse().unwrap())
    }

    #[test]
    fn default_denies_every_special_range_in_both_families() {
        let f = filter(&[], &[]);
        for denied in [
            "127.0.0.1:22",
            "127.8.9.1:80",
            "0.0.0.0:80",
            "10.0.0.1:80",
            "172.16.5.4:80",
            "172.31.255.255:80",
            "192.168.1.1:80",
            "100.64.0.1:80",
            "100.127.255.254:80",
            "169.254.169.254:80",
            "169.254.0.1:80",
            "224.0.0.251:5353",
            "239.1.2.3:80",
            "198.18.0.1:80",
            "198.19.255.255:80",
            "240.0.0.1:80",
            "255.255.255.255:80",
            "192.0.2.1:80",
            "[::1]:22",
            "[::]:80",
            "[fc00::1]:80",
            "[fd12:3456::1]:80",
            "[fe80::1]:80",
            "[febf::1]:80",
            "[ff02::1]:80",
            "[64:ff9b::a00:1]:80",
            "[2001:db8::1]:80",
            // IPv4-mapped and IPv4-compatible forms of denied IPv4 addresses.
            "[::ffff:127.0.0.1]:22",
            "[::ffff:10.0.0.1]:80",
            "[::ffff:169.254.169.254]:80",
            "[::ffff:192.168.0.1]:80",
            "[::127.0.0.1]:22",
            "[::10.0.0.1]:80",
            "[::ffff:0.0.0.0]:80",
            // Tunnels into IPv4 space and other special IPv6 ranges.
            "[2002:7f00:1::1]:80",
            "[2001:0:4136:e378::1]:80",
            "[fec0::1]:80",
            "[100::1]:80",
        ] {
            assert!(!ok(&f, denied), "{denied} must be denied");
        }
        for allowed in [
            "8.8.8.8:53",
            "1.1.1.1:443",
            "172.32.0.1:80",
            "100.128.0.1:80",
            "[2a00:1450::1]:443",
            "[::ffff:8.8.8.8]:53",
        ] {
            assert!(ok(&f, allowed), "{allowed} must be allowed");
        }
    }

    #[test]
    fn own_relay_addresses_only_in_the_relay_range() {
        let f = filter(&[], &[]);
        assert!(
            ok(&f, "203.0.113.7:50000"),
            "another allocation on this server"
        );
        assert!(ok(&f, "[::ffff:203.0.113.7]:50000"));
        assert!(!ok(&f, "203.0.113.7:22"), "the server's own ssh");
        assert!(!ok(&f, "203.0.113.7:8080"), "the server's own API");
        assert!(
            !ok(&f, "203.0.113.8:50000"),
            "a documentation address that is not ours"
        );
        // Loopback relays (a laptop, the tests) reach each other the same way.
        let lo = PeerFilter::new(&[], &[], vec!["127.0.0.1".parse().unwrap()], 40000..=40100);
        assert!(lo.allowed("127.0.0.1:40050".parse().unwrap()));
        assert!(!lo.allowed("127.0.0.1:40101".parse().unwrap()));
        // Any loopback address is this host: a relay port there is ours (reached in-process),
        // anything else is not a peer.
        assert!(lo.allowed("127.0.0.2:40050".parse().unwrap()));
        assert!(!lo.allowed("127.0.0.2:22".parse().unwrap()));
        // Own addresses are reached in-process only, and only on relay ports.
        assert!(lo.is_internal("127.0.0.1:40050".parse().unwrap()));
        assert!(!lo.port_ok("127.0.0.1:22".parse().unwrap()));
        assert!(lo.port_ok("8.8.8.8:22".parse().unwrap()));
    }

    #[test]
    fn every_host_address_is_own_and_deny_beats_the_own_exemption() {
        let own: Vec<IpAddr> = ["203.0.113.7", "198.51.100.20", "2001:db8:5::1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let f = PeerFilter::new(&[], &[], own.clone(), 49152..=65535);
        // A secondary IPv4 and a global IPv6 of this host: only relay ports.
        assert!(!f.allowed("198.51.100.20:5432".parse().unwrap()));
        assert!(f.allowed("198.51.100.20:50000".parse().unwrap()));
        assert!(!f.allowed("[2001:db8:5::1]:22".parse().unwrap()));
        // deny_peers beats the exemption.
        let f = PeerFilter::new(&[], &nets(&["203.0.113.7"]), own.clone(), 49152..=65535);
        assert!(!f.allowed("203.0.113.7:50000".parse().unwrap()));
        assert!(!f.allowed_ip("203.0.113.7".parse().unwrap()));
        // allow_peers naming an own address opens it on any port, through the kernel (a local
        // echo peer)...
        let f = PeerFilter::new(&nets(&["203.0.113.7"]), &[], own.clone(), 49152..=65535);
        assert!(f.allowed("203.0.113.7:7".parse().unwrap()));
        assert!(!f.is_internal("203.0.113.7:7".parse().unwrap()));
        // ...but opening a range does not open this host's address in it.
        let f = PeerFilter::new(&nets(&["198.51.100.0/24"]), &[], own, 49152..=65535);
        assert!(
            f.allowed("198.51.100.21:22".parse().unwrap()),
            "a LAN neighbour"
        );
        assert!(
            !f.allowed("198.51.100.20:22".parse().unwrap()),
            "this host's own ssh"
        );
        assert!(f.is_internal("198.51.100.20:50000".parse().unwrap()));
    }

    #[test]
    fn allow_opens_and_deny_wins() {
        let f = filter(
            &["10.1.0.0/16", "127.0.0.1"],
            &["10.1.2.0/24", "8.8.8.8/32"],
        );
        assert!(ok(&f, "10.1.1.1:80"));
        assert!(ok(&f, "127.0.0.1:9"));
        assert!(!ok(&f, "127.0.0.2:9"));
        assert!(!ok(&f, "10.1.2.3:80"), "deny wins over allow");
        assert!(!ok(&f, "8.8.8.8:53"));
        assert!(
            ok(&f, "[::ffff:10.1.1.1]:80"),
            "mapped forms follow the IPv4 rules"
        );
    }

    #[test]
    fn bad_ranges_are_named() {
        let err = parse_range("10.0.0.0/99").unwrap_err();
        assert_eq!(err.value, "10.0.0.0/99");
    }
}
