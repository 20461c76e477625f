//! Which peers a relay may talk to, pure. Deny by default: loopback, unspecified, RFC 1918,
//! CGNAT, link-local (with the 169.254.169.254 metadata address), multicast, benchmarking,
//! reserved, documentation and broadcast IPv4; ::1, ::, ULA fc00::/7, link-local fe80::/10,
//! multicast ff00::/8, NAT64 64:ff9b::/96, documentation 2001:db8::/32 — checked after
//! canonicalising IPv4-mapped and IPv4-compatible IPv6 to IPv4, so `[::ffff:127.0.0.1]` is
//! loopback. `turn.allow_peers` opens ranges, `turn.deny_peers` closes them (deny wins).
//! This server's own relay addresses (relay IP, port in the relay range) are always allowed,
//! so two clients relaying through us reach each other; other ports on those IPs are not.

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
    "2001:db8::/32",   // documentation
    "fc00::/7",        // unique local
    "fe80::/10",       // link-local
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
    own_ips: Vec<IpAddr>,
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

impl PeerFilter {
    pub fn new(
        allow: &[String],
        deny: &[String],
        own_ips: Vec<IpAddr>,
        relay_ports: RangeInclusive<u16>,
    ) -> Result<Self, BadRange> {
        Ok(Self {
            allow: allow
                .iter()
                .map(|s| parse_range(s))
                .collect::<Result<_, _>>()?,
            deny: deny
                .iter()
                .map(|s| parse_range(s))
                .collect::<Result<_, _>>()?,
            defaults: DEFAULT_DENY
                .iter()
                .map(|s| parse_range(s).expect("built-in ranges parse"))
                .collect(),
            own_ips: own_ips.into_iter().map(canonical).collect(),
            relay_ports,
        })
    }

    pub fn allowed(&self, peer: SocketAddr) -> bool {
        let ip = canonical(peer.ip());
        let own_ip = self.own_ips.contains(&ip);
        if own_ip && self.relay_ports.contains(&peer.port()) {
            return true;
        }
        let within = |nets: &[IpNet]| nets.iter().any(|n| n.contains(&ip));
        if within(&self.deny) {
            return false;
        }
        if within(&self.allow) {
            return true;
        }
        // Our own addresses outside the relay range are the server's other services.
        !own_ip && !within(&self.defaults)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(allow: &[&str], deny: &[&str]) -> PeerFilter {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        PeerFilter::new(
            &s(allow),
            &s(deny),
            vec!["203.0.113.7".parse().unwrap()],
            49152..=65535,
        )
        .unwrap()
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
        let lo =
            PeerFilter::new(&[], &[], vec!["127.0.0.1".parse().unwrap()], 40000..=40100).unwrap();
        assert!(lo.allowed("127.0.0.1:40050".parse().unwrap()));
        assert!(!lo.allowed("127.0.0.1:40101".parse().unwrap()));
        assert!(!lo.allowed("127.0.0.2:40050".parse().unwrap()));
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
        let err = PeerFilter::new(&["10.0.0.0/99".into()], &[], vec![], 1..=2).unwrap_err();
        assert_eq!(err.value, "10.0.0.0/99");
    }
}
