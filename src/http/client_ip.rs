//! The client's address: the TCP peer, or, when the peer is a trusted reverse proxy
//! (`http.trusted_proxies`), the right-most `X-Forwarded-For` address that is not itself a
//! trusted proxy. Everything left of that was written by the client and proves nothing, so it is
//! never believed; an unparsable entry stops the walk at the last address we could trust.
//! The result feeds login/registration throttling and logs.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::HeaderMap;
use ipnet::IpNet;

use crate::error::ApiError;
use crate::services::Services;

/// IPv4-mapped IPv6 peers (a dual-stack listener) are shown as the IPv4 address they are.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// One `X-Forwarded-For` element: `1.2.3.4`, `1.2.3.4:567`, `2001:db8::1`, `[2001:db8::1]:80`.
/// Bytes that are not UTF-8 make it unparsable like any other garbage.
fn parse_entry(entry: &[u8]) -> Option<IpAddr> {
    let e = std::str::from_utf8(entry).ok()?.trim();
    e.parse::<IpAddr>()
        .ok()
        .or_else(|| e.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            e.strip_prefix('[')
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|r| r.parse().ok())
        })
        .map(canonical)
}

/// The client address of a request from `peer` carrying `forwarded_for` header values (in order,
/// as raw bytes: a line is never dropped whole for one bad byte, which would let a client hide
/// the address the proxy appended after it).
pub fn client_ip<'a>(
    peer: IpAddr,
    forwarded_for: impl Iterator<Item = &'a [u8]>,
    trusted: &[IpNet],
) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    let mut client = canonical(peer);
    if !is_trusted(&client) {
        return client;
    }
    // Header values in order, each a comma-separated list: walk all entries right to left.
    let values: Vec<&[u8]> = forwarded_for.collect();
    for entry in values.iter().rev().flat_map(|v| v.rsplit(|b| *b == b',')) {
        match parse_entry(entry) {
            Some(ip) => {
                client = ip;
                if !is_trusted(&ip) {
                    break;
                }
            }
            None => break,
        }
    }
    client
}

fn from_headers(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let values = headers
        .get_all("x-forwarded-for")
        .iter()
        .map(|v| v.as_bytes());
    client_ip(peer, values, trusted)
}

/// The client address of a request, as an extractor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

impl FromRequestParts<Arc<Services>> for ClientIp {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<Services>,
    ) -> Result<Self, ApiError> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(a)| a.ip())
            .ok_or_else(ApiError::internal)?;
        Ok(ClientIp(from_headers(
            peer,
            &parts.headers,
            &state.config.http.trusted_proxies,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn untrusted_peer_is_the_client_whatever_the_header_says() {
        let trusted = nets(&["127.0.0.0/8"]);
        let got = client_ip(
            ip("198.51.100.1"),
            [b"203.0.113.9".as_slice()].into_iter(),
            &trusted,
        );
        assert_eq!(got, ip("198.51.100.1"));
    }

    #[test]
    fn trusted_peer_yields_the_right_most_untrusted_entry() {
        let trusted = nets(&["127.0.0.0/8", "10.0.0.0/8"]);
        let peer = ip("127.0.0.1");
        let one = |h: &str| client_ip(peer, [h.as_bytes()].into_iter(), &trusted);
        assert_eq!(one("203.0.113.9"), ip("203.0.113.9"));
        // The client forged the left part; the proxies appended the rest.
        assert_eq!(one("1.1.1.1, 203.0.113.9, 10.0.0.5"), ip("203.0.113.9"));
        assert_eq!(one("[2001:db8::7]:443"), ip("2001:db8::7"));
        assert_eq!(one("203.0.113.9:5555"), ip("203.0.113.9"));
        // Garbage stops the walk at the last address we could trust.
        assert_eq!(one("203.0.113.9, nonsense, 10.0.0.5"), ip("10.0.0.5"));
        // Every entry trusted: the left-most one.
        assert_eq!(one("10.1.1.1, 10.0.0.5"), ip("10.1.1.1"));
        // Several header lines count as one list, in order.
        let two = client_ip(
            peer,
            [b"6.6.6.6".as_slice(), b"203.0.113.9"].into_iter(),
            &trusted,
        );
        assert_eq!(two, ip("203.0.113.9"));
        // No header: the peer.
        assert_eq!(client_ip(peer, std::iter::empty(), &trusted), peer);
    }

    #[test]
    fn mapped_addresses_are_canonical() {
        let trusted = nets(&["127.0.0.0/8"]);
        let got = client_ip(
            ip("::ffff:127.0.0.1"),
            [b"::ffff:203.0.113.9".as_slice()].into_iter(),
            &trusted,
        );
        assert_eq!(got, ip("203.0.113.9"));
    }
}
