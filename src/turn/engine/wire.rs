//! Byte-level TURN framing, pure: the one classification of every datagram, ChannelData
//! headers written in place, stream framing (RFC 8656 §11.5), and the two data-path STUN
//! indications (Send in, Data out) read and written without building a [`stun::message::Message`]
//! (the relay's hot path; every other message goes through the `stun` crate, and the tests check
//! both codecs against it).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;

use stun::message::MAGIC_COOKIE;

/// STUN header (RFC 8489 §5).
pub const STUN_HEADER: usize = 20;
/// ChannelData header (RFC 8656 §12.4).
pub const CHANNEL_HEADER: usize = 4;
/// Valid channel numbers. RFC 8656 §12 narrowed them to 0x4000-0x4FFF, but clients of RFC 5766
/// use the whole 0x4000-0x7FFF (coturn's own `turnutils_uclient` picks numbers up to 0x7FFF, and
/// coturn accepts them). A TURN server demultiplexes nothing else, so nothing is ambiguous about
/// 0x5000-0x7FFF here: they are accepted. Below 0x4000 is STUN's space, and refused.
pub const CHANNEL_MIN: u16 = 0x4000;
pub const CHANNEL_MAX: u16 = 0x7FFF;

/// Head-room a receive buffer keeps in front of peer data, so the frame to the client is written
/// around it without a copy: the larger of a ChannelData header and a Data indication header with
/// an IPv6 XOR-PEER-ADDRESS (20 + 4 + 20 + 4).
pub const HEADROOM: usize = 48;
/// Tail-room for the padding a frame may need (to a multiple of 4).
pub const TAILROOM: usize = 3;

const ATTR_XOR_PEER_ADDRESS: u16 = 0x0012;
const ATTR_DATA: u16 = 0x0013;
const METHOD_SEND_INDICATION: u16 = 0x0016;
const METHOD_DATA_INDICATION: u16 = 0x0017;
const FAMILY_V4: u8 = 0x01;
const FAMILY_V6: u8 = 0x02;

/// What a datagram (or stream frame) from a client is, decided by its first two bits
/// (RFC 8656 §12, RFC 7983): the only classification anywhere in the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `0b00`, with the magic cookie and a length that fits: hand to the STUN parser.
    Stun,
    /// `0b01` with a valid channel number: the payload is `data[4..4 + len]`.
    ChannelData { number: u16, len: usize },
    /// Anything else: dropped without an answer.
    Invalid,
}

pub fn classify(buf: &[u8]) -> Kind {
    if buf.len() < CHANNEL_HEADER {
        return Kind::Invalid;
    }
    match buf[0] >> 6 {
        0b00 => {
            if buf.len() < STUN_HEADER
                || u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) != MAGIC_COOKIE
            {
                return Kind::Invalid;
            }
            let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
            if !len.is_multiple_of(4) || STUN_HEADER + len > buf.len() {
                return Kind::Invalid;
            }
            Kind::Stun
        }
        0b01 => {
            let number = u16::from_be_bytes([buf[0], buf[1]]);
            let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
            if !(CHANNEL_MIN..=CHANNEL_MAX).contains(&number) || CHANNEL_HEADER + len > buf.len() {
                return Kind::Invalid;
            }
            Kind::ChannelData { number, len }
        }
        _ => Kind::Invalid,
    }
}

/// The length of the next frame at the start of a TURN stream (RFC 8656 §11.5): `Ok(None)` when
/// more bytes are needed to know, `Err(())` when the stream cannot be TURN (the connection is then
/// closed). STUN messages are their own length; ChannelData is padded to a multiple of 4.
#[allow(clippy::result_unit_err)]
pub fn stream_frame_len(buf: &[u8]) -> Result<Option<usize>, ()> {
    if buf.len() < CHANNEL_HEADER {
        return Ok(None);
    }
    let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
    match buf[0] >> 6 {
        0b00 => {
            if !len.is_multiple_of(4) {
                return Err(());
            }
            if buf.len() >= 8
                && u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) != MAGIC_COOKIE
            {
                return Err(());
            }
            Ok(Some(STUN_HEADER + len))
        }
        0b01 => {
            let number = u16::from_be_bytes([buf[0], buf[1]]);
            if !(CHANNEL_MIN..=CHANNEL_MAX).contains(&number) {
                return Err(());
            }
            Ok(Some(padded(CHANNEL_HEADER + len)))
        }
        _ => Err(()),
    }
}

/// `n` rounded up to a multiple of 4.
pub fn padded(n: usize) -> usize {
    (n + 3) & !3
}

/// Writes a ChannelData header for the `len` bytes at `buf[start..start + len]` into the 4 bytes
/// before them, pads to 4 when `pad` (streams), and returns the frame's range.
pub fn frame_channel_data(
    buf: &mut [u8],
    start: usize,
    len: usize,
    number: u16,
    pad: bool,
) -> Range<usize> {
    let head = start - CHANNEL_HEADER;
    buf[head..head + 2].copy_from_slice(&number.to_be_bytes());
    buf[head + 2..start].copy_from_slice(&(len as u16).to_be_bytes());
    let mut end = start + len;
    if pad {
        let to = padded(end - head) + head;
        buf[end..to].fill(0);
        end = to;
    }
    head..end
}

fn xor_key(txid: &[u8; 12]) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    key[4..].copy_from_slice(txid);
    key
}

/// The value of an XOR-*-ADDRESS attribute (RFC 8489 §14.2).
pub fn decode_xor_address(value: &[u8], txid: &[u8; 12]) -> Option<SocketAddr> {
    if value.len() < 4 {
        return None;
    }
    let port = u16::from_be_bytes([value[2], value[3]]) ^ (MAGIC_COOKIE >> 16) as u16;
    let key = xor_key(txid);
    let ip = match value[1] {
        FAMILY_V4 if value.len() == 8 => {
            let mut o = [0u8; 4];
            for (i, b) in o.iter_mut().enumerate() {
                *b = value[4 + i] ^ key[i];
            }
            IpAddr::V4(Ipv4Addr::from(o))
        }
        FAMILY_V6 if value.len() == 20 => {
            let mut o = [0u8; 16];
            for (i, b) in o.iter_mut().enumerate() {
                *b = value[4 + i] ^ key[i];
            }
            IpAddr::V6(Ipv6Addr::from(o))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

fn encode_xor_address(out: &mut [u8], addr: SocketAddr, txid: &[u8; 12]) -> usize {
    let key = xor_key(txid);
    out[0] = 0;
    out[2..4].copy_from_slice(&(addr.port() ^ (MAGIC_COOKIE >> 16) as u16).to_be_bytes());
    match addr.ip() {
        IpAddr::V4(v4) => {
            out[1] = FAMILY_V4;
            for (i, b) in v4.octets().iter().enumerate() {
                out[4 + i] = b ^ key[i];
            }
            8
        }
        IpAddr::V6(v6) => {
            out[1] = FAMILY_V6;
            for (i, b) in v6.octets().iter().enumerate() {
                out[4 + i] = b ^ key[i];
            }
            20
        }
    }
}

/// A Send indication's peer and the range of its DATA, or `None` when it is not one or lacks
/// either attribute (RFC 8656 §10.2: such an indication is dropped).
pub fn parse_send_indication(buf: &[u8]) -> Option<(SocketAddr, Range<usize>)> {
    if buf.len() < STUN_HEADER || u16::from_be_bytes([buf[0], buf[1]]) != METHOD_SEND_INDICATION {
        return None;
    }
    let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
    let end = STUN_HEADER + len;
    if end > buf.len() {
        return None;
    }
    let txid: [u8; 12] = buf[8..20].try_into().ok()?;
    let (mut peer, mut data) = (None, None);
    let mut at = STUN_HEADER;
    while at + 4 <= end {
        let typ = u16::from_be_bytes([buf[at], buf[at + 1]]);
        let alen = u16::from_be_bytes([buf[at + 2], buf[at + 3]]) as usize;
        let value = at + 4..at + 4 + alen;
        if value.end > end {
            return None;
        }
        match typ {
            ATTR_XOR_PEER_ADDRESS if peer.is_none() => {
                peer = Some(decode_xor_address(&buf[value.clone()], &txid)?)
            }
            ATTR_DATA if data.is_none() => data = Some(value.clone()),
            _ => {}
        }
        at = value.start + padded(alen);
    }
    Some((peer?, data?))
}

/// Writes a Data indication (RFC 8656 §10.3) from `peer` around the `len` bytes at
/// `buf[start..start + len]`: header and XOR-PEER-ADDRESS in the head-room before them, the DATA
/// padding after. Returns the message's range. `txid` must be fresh for each indication.
pub fn frame_data_indication(
    buf: &mut [u8],
    start: usize,
    len: usize,
    peer: SocketAddr,
    txid: &[u8; 12],
) -> Range<usize> {
    let addr_len = if peer.is_ipv4() { 8 } else { 20 };
    let head = start - (STUN_HEADER + 4 + addr_len + 4);
    let body = 4 + addr_len + 4 + padded(len);
    buf[head..head + 2].copy_from_slice(&METHOD_DATA_INDICATION.to_be_bytes());
    buf[head + 2..head + 4].copy_from_slice(&(body as u16).to_be_bytes());
    buf[head + 4..head + 8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    buf[head + 8..head + 20].copy_from_slice(txid);
    let a = head + STUN_HEADER;
    buf[a..a + 2].copy_from_slice(&ATTR_XOR_PEER_ADDRESS.to_be_bytes());
    buf[a + 2..a + 4].copy_from_slice(&(addr_len as u16).to_be_bytes());
    encode_xor_address(&mut buf[a + 4..a + 4 + addr_len], peer, txid);
    let d = a + 4 + addr_len;
    buf[d..d + 2].copy_from_slice(&ATTR_DATA.to_be_bytes());
    buf[d + 2..d + 4].copy_from_slice(&(len as u16).to_be_bytes());
    let end = start + padded(len);
    buf[start + len..end].fill(0);
    head..end
}

#[cfg(test)]
mod tests {
    use super::*;
    use stun::message::{Getter, Message, CLASS_INDICATION, METHOD_DATA, METHOD_SEND};
    use turn::proto::data::Data;
    use turn::proto::peeraddr::PeerAddress;

    #[test]
    fn classification_is_by_the_first_two_bits() {
        // A Binding request.
        let mut m = Message::new();
        m.typ = stun::message::BINDING_REQUEST;
        m.write_header();
        assert_eq!(classify(&m.raw), Kind::Stun);
        // 0x4003 with the magic cookie after it is ChannelData on channel 0x4003, never a STUN
        // message: the first two bits decide, as RFC 7983 says.
        let mut polyglot = vec![0x40, 0x03, 0x00, 0x10];
        polyglot.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        polyglot.extend_from_slice(&[0; 12]);
        assert_eq!(
            classify(&polyglot),
            Kind::ChannelData {
                number: 0x4003,
                len: 16
            }
        );
        // RFC 5766's channels above 0x4FFF are ChannelData too; short and overlong frames and
        // other first bits are invalid.
        assert_eq!(
            classify(&[0x50, 0x00, 0x00, 0x00]),
            Kind::ChannelData {
                number: 0x5000,
                len: 0
            }
        );
        assert_eq!(classify(&[0x3F, 0xFF, 0x00, 0x00]), Kind::Invalid);
        assert_eq!(classify(&[0x40, 0x00, 0x00, 0x05, 1, 2]), Kind::Invalid);
        assert_eq!(classify(&[0x80, 0, 0, 0]), Kind::Invalid);
        assert_eq!(classify(&[0x00, 0x01, 0x00]), Kind::Invalid);
        let mut bad_cookie = m.raw.clone();
        bad_cookie[4] ^= 1;
        assert_eq!(classify(&bad_cookie), Kind::Invalid);
        let mut truncated = m.raw.clone();
        truncated[3] = 8;
        assert_eq!(
            classify(&truncated),
            Kind::Invalid,
            "length past the datagram"
        );
    }

    #[test]
    fn stream_frames() {
        assert_eq!(stream_frame_len(&[0x40, 0x00]), Ok(None));
        assert_eq!(stream_frame_len(&[0x40, 0x00, 0x00, 0x05]), Ok(Some(12)));
        assert_eq!(stream_frame_len(&[0x40, 0x00, 0x00, 0x08]), Ok(Some(12)));
        assert_eq!(stream_frame_len(&[0x00, 0x01, 0x00, 0x08]), Ok(Some(28)));
        assert_eq!(stream_frame_len(&[0x00, 0x01, 0x00, 0x07]), Err(()));
        assert_eq!(stream_frame_len(&[0x80, 0x00, 0x00, 0x08]), Err(()));
        assert_eq!(
            stream_frame_len(&[0x16, 0x03, 0x01, 0x02]),
            Err(()),
            "a TLS record"
        );
        // "GET " reads as ChannelData on channel 0x4745: a frame nobody bound, dropped later.
        assert_eq!(stream_frame_len(b"GET / HTTP/1.1"), Ok(Some(21540)));
    }

    #[test]
    fn channel_data_is_framed_in_place() {
        let mut buf = vec![0xAA; 4 + 5 + 3];
        buf[4..9].copy_from_slice(b"hello");
        let r = frame_channel_data(&mut buf, 4, 5, 0x4001, false);
        assert_eq!(&buf[r.clone()], b"\x40\x01\x00\x05hello");
        let r = frame_channel_data(&mut buf, 4, 5, 0x4001, true);
        assert_eq!(&buf[r], b"\x40\x01\x00\x05hello\0\0\0");
    }

    #[test]
    fn send_indications_read_like_the_stun_crate_writes_them() {
        for peer in ["203.0.113.9:4000", "[2001:db8::7]:5000"] {
            let peer: SocketAddr = peer.parse().unwrap();
            let mut m = Message::new();
            m.build(&[
                Box::new(stun::agent::TransactionId::new()),
                Box::new(stun::message::MessageType::new(
                    METHOD_SEND,
                    CLASS_INDICATION,
                )),
                Box::new(PeerAddress {
                    ip: peer.ip(),
                    port: peer.port(),
                }),
                Box::new(Data(b"payload!!".to_vec())),
            ])
            .unwrap();
            let (got, data) = parse_send_indication(&m.raw).unwrap();
            assert_eq!(got, peer);
            assert_eq!(&m.raw[data], b"payload!!");
        }
        assert!(parse_send_indication(&[0; 20]).is_none());
    }

    #[test]
    fn data_indications_read_back_with_the_stun_crate() {
        for peer in ["198.51.100.4:3478", "[2001:db8::9]:1234"] {
            let peer: SocketAddr = peer.parse().unwrap();
            let payload = b"seven b";
            let mut buf = vec![0u8; HEADROOM + payload.len() + TAILROOM];
            buf[HEADROOM..HEADROOM + payload.len()].copy_from_slice(payload);
            let txid = [7u8; 12];
            let r = frame_data_indication(&mut buf, HEADROOM, payload.len(), peer, &txid);
            let mut m = Message::new();
            m.raw = buf[r].to_vec();
            m.decode().unwrap();
            assert_eq!(m.typ.method, METHOD_DATA);
            assert_eq!(m.typ.class, CLASS_INDICATION);
            let mut got = PeerAddress::default();
            got.get_from(&m).unwrap();
            assert_eq!(SocketAddr::new(got.ip, got.port), peer);
            let mut data = Data::default();
            data.get_from(&m).unwrap();
            assert_eq!(data.0, payload);
        }
    }
}
