//! Who the client is, for per-address rate limits: the socket peer, unless the peer is one of
//! the configured trusted proxies (`limits.trustedProxies`), in which case the rightmost
//! `X-Forwarded-For` address that is not itself a trusted proxy. Anything a client can write
//! further left is ignored, so a client cannot pick its own bucket. Pure; no I/O.

use std::net::IpAddr;

/// An address block, `ADDRESS/PREFIX` (IPv4 or IPv6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `10.0.0.0/8`, `fd00::/8`, or a bare address (a /32 or /128).
    pub fn parse(s: &str) -> Option<Cidr> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().ok()?, p.parse::<u8>().ok()?),
            None => {
                let a = s.parse::<IpAddr>().ok()?;
                (a, if a.is_ipv4() { 32 } else { 128 })
            }
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Cidr { addr, prefix })
    }

    /// Whether `ip` lies in the block.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (a, b, bits) = match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                (u128::from(u32::from(a)), u128::from(u32::from(b)), 32)
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
            _ => return false,
        };
        let shift = bits - u32::from(self.prefix);
        shift >= bits || (a >> shift) == (b >> shift)
    }
}

/// The client address of a request from `peer` carrying `forwarded_for`.
pub fn client_ip(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[Cidr]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let Some(chain) = forwarded_for else {
        return peer;
    };
    let mut client = peer;
    for hop in chain.rsplit(',') {
        let Ok(ip) = hop.trim().parse::<IpAddr>() else {
            // A malformed hop: nothing left of it can be trusted either.
            break;
        };
        client = ip;
        if !is_trusted(ip) {
            break;
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn blocks_parse_and_contain() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains(ip("10.1.2.3")) && !c.contains(ip("11.0.0.1")));
        assert!(!c.contains(ip("::1")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(Cidr::parse("fd00::/8").unwrap().contains(ip("fd12::1")));
        assert!(Cidr::parse("192.0.2.7").unwrap().contains(ip("192.0.2.7")));
        for bad in ["10.0.0.0/33", "x/8", "10.0.0/8", ""] {
            assert!(Cidr::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn only_a_trusted_peer_is_believed_and_only_from_the_right() {
        let proxies = [Cidr::parse("10.0.0.0/8").unwrap()];
        // Straight from the internet: the header is the client's own words.
        assert_eq!(
            client_ip(ip("203.0.113.9"), Some("1.2.3.4"), &proxies),
            ip("203.0.113.9")
        );
        // Through the ingress: the address it appended, not what the client wrote before it.
        assert_eq!(
            client_ip(ip("10.0.0.5"), Some("1.2.3.4, 198.51.100.7"), &proxies),
            ip("198.51.100.7")
        );
        // Through two proxies.
        assert_eq!(
            client_ip(ip("10.0.0.5"), Some("198.51.100.7, 10.0.0.9"), &proxies),
            ip("198.51.100.7")
        );
        assert_eq!(client_ip(ip("10.0.0.5"), None, &proxies), ip("10.0.0.5"));
        assert_eq!(
            client_ip(ip("10.0.0.5"), Some("junk"), &proxies),
            ip("10.0.0.5")
        );
        assert_eq!(
            client_ip(ip("10.0.0.5"), Some("1.2.3.4"), &[]),
            ip("10.0.0.5")
        );
    }
}
