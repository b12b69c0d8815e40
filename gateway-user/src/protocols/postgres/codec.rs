//! PostgreSQL v3 framing: frames first, meaning second.
//!
//! [`StartupCodec`] decodes the untagged packets a client opens with (SSLRequest,
//! GSSENCRequest, CancelRequest, StartupMessage); [`FrameCodec`] decodes tagged frames in either
//! direction, keeping each frame's raw bytes so passing it on costs nothing. Both return
//! `Ok(None)` until a frame is complete and reject a length below the minimum or above the cap
//! before allocating anything for it. The builders at the bottom encode the few messages the
//! proxy writes itself.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::Decoder;

/// PostgreSQL's own cap for startup packets.
pub const MAX_STARTUP_LEN: usize = 10_000;
/// Largest frame accepted either way. Bigger than any sane statement or row the agent needs; a
/// claim above it is an attack or a bug, and ends the session.
pub const MAX_FRAME_LEN: usize = 64 << 20;

const SSL_REQUEST: i32 = 80_877_103;
const GSSENC_REQUEST: i32 = 80_877_104;
const CANCEL_REQUEST: i32 = 80_877_102;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("invalid message length {len} (tag {tag:?})")]
    BadLength { tag: Option<char>, len: i64 },
    #[error("unsupported protocol version {major}.{minor}")]
    UnsupportedProtocol { major: u16, minor: u16 },
    #[error("malformed {what}")]
    Malformed { what: &'static str },
    #[error("connection: {0}")]
    Io(String),
}

impl From<std::io::Error> for CodecError {
    fn from(e: std::io::Error) -> Self {
        CodecError::Io(e.to_string())
    }
}

/// What a client can open with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Startup {
    Ssl,
    GssEnc,
    Cancel {
        pid: i32,
        key: i32,
    },
    Startup {
        minor: u16,
        params: Vec<(String, String)>,
    },
}

#[derive(Debug, Default)]
pub struct StartupCodec;

impl Decoder for StartupCodec {
    type Item = Startup;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Startup>, CodecError> {
        if src.len() < 4 {
            return Ok(None);
        }
        let len = i32::from_be_bytes([src[0], src[1], src[2], src[3]]);
        if !(8..=MAX_STARTUP_LEN as i32).contains(&len) {
            return Err(CodecError::BadLength {
                tag: None,
                len: len.into(),
            });
        }
        let len = len as usize;
        if src.len() < len {
            src.reserve(len - src.len());
            return Ok(None);
        }
        let mut packet = src.split_to(len).freeze();
        packet.advance(4);
        let code = packet.get_i32();
        match code {
            SSL_REQUEST | GSSENC_REQUEST if packet.is_empty() => Ok(Some(if code == SSL_REQUEST {
                Startup::Ssl
            } else {
                Startup::GssEnc
            })),
            CANCEL_REQUEST if packet.len() == 8 => Ok(Some(Startup::Cancel {
                pid: packet.get_i32(),
                key: packet.get_i32(),
            })),
            SSL_REQUEST | GSSENC_REQUEST | CANCEL_REQUEST => Err(CodecError::Malformed {
                what: "startup request",
            }),
            version => {
                let (major, minor) = ((version >> 16) as u16, (version & 0xffff) as u16);
                if major != 3 {
                    return Err(CodecError::UnsupportedProtocol { major, minor });
                }
                Ok(Some(Startup::Startup {
                    minor,
                    params: startup_params(&packet)?,
                }))
            }
        }
    }
}

fn startup_params(mut body: &[u8]) -> Result<Vec<(String, String)>, CodecError> {
    let mut params = Vec::new();
    loop {
        let key = cstr(&mut body, "startup parameter")?;
        if key.is_empty() {
            return if body.is_empty() {
                Ok(params)
            } else {
                Err(CodecError::Malformed {
                    what: "startup packet",
                })
            };
        }
        let value = cstr(&mut body, "startup parameter")?;
        params.push((key.to_owned(), value.to_owned()));
    }
}

/// One NUL-terminated UTF-8 string from the front of `body`.
pub fn cstr<'a>(body: &mut &'a [u8], what: &'static str) -> Result<&'a str, CodecError> {
    let end = body
        .iter()
        .position(|&b| b == 0)
        .ok_or(CodecError::Malformed { what })?;
    let s = std::str::from_utf8(&body[..end]).map_err(|_| CodecError::Malformed { what })?;
    *body = &body[end + 1..];
    Ok(s)
}

/// A tagged frame, raw bytes included (tag, length, body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    pub raw: Bytes,
}

impl Frame {
    pub fn body(&self) -> &[u8] {
        &self.raw[5..]
    }
}

/// Tagged frames, either direction.
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    pub max_len: usize,
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self {
            max_len: MAX_FRAME_LEN,
        }
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        if src.len() < 5 {
            return Ok(None);
        }
        let len = i32::from_be_bytes([src[1], src[2], src[3], src[4]]);
        if len < 4 || len as usize > self.max_len {
            return Err(CodecError::BadLength {
                tag: Some(src[0] as char),
                len: len.into(),
            });
        }
        let total = 1 + len as usize;
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        let raw = src.split_to(total).freeze();
        Ok(Some(Frame { tag: raw[0], raw }))
    }
}

/// Index of the end of the last complete frame in `buf` (0 if none), scanning without copying:
/// the server-to-client path forwards whole runs of frames in one write.
pub fn complete_frames(buf: &[u8], max_len: usize) -> Result<usize, CodecError> {
    let mut pos = 0;
    while buf.len() - pos >= 5 {
        let len = i32::from_be_bytes([buf[pos + 1], buf[pos + 2], buf[pos + 3], buf[pos + 4]]);
        if len < 4 || len as usize > max_len {
            return Err(CodecError::BadLength {
                tag: Some(buf[pos] as char),
                len: len.into(),
            });
        }
        let total = 1 + len as usize;
        if buf.len() - pos < total {
            break;
        }
        pos += total;
    }
    Ok(pos)
}

// ---- frontend message bodies -------------------------------------------------------------------

/// The SQL of a Query ('Q') frame.
pub fn query_sql(frame: &Frame) -> Result<&str, CodecError> {
    let mut body = frame.body();
    let sql = cstr(&mut body, "Query")?;
    if !body.is_empty() {
        return Err(CodecError::Malformed { what: "Query" });
    }
    Ok(sql)
}

/// Statement name and SQL of a Parse ('P') frame.
pub fn parse_sql(frame: &Frame) -> Result<(&str, &str), CodecError> {
    let mut body = frame.body();
    let name = cstr(&mut body, "Parse")?;
    let sql = cstr(&mut body, "Parse")?;
    Ok((name, sql))
}

/// A Bind's portal and statement names.
pub fn bind_names(frame: &Frame) -> Result<(&str, &str), CodecError> {
    let mut body = frame.body();
    let portal = cstr(&mut body, "Bind")?;
    let statement = cstr(&mut body, "Bind")?;
    Ok((portal, statement))
}

/// A Close of a prepared statement (`S`): its name; of a portal: `None`.
pub fn close_statement(frame: &Frame) -> Result<Option<&str>, CodecError> {
    let Some((&kind, mut rest)) = frame.body().split_first() else {
        return Err(CodecError::Malformed { what: "Close" });
    };
    let name = cstr(&mut rest, "Close")?;
    Ok((kind == b'S').then_some(name))
}

// ---- builders ------------------------------------------------------------------------------------

fn message(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    let at = buf.len();
    buf.put_i32(0);
    body(buf);
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_cstr(buf: &mut BytesMut, s: &str) {
    buf.put_slice(s.as_bytes());
    buf.put_u8(0);
}

pub fn auth_ok(buf: &mut BytesMut) {
    message(buf, b'R', |b| b.put_i32(0));
}

pub fn backend_key_data(buf: &mut BytesMut, pid: i32, key: i32) {
    message(buf, b'K', |b| {
        b.put_i32(pid);
        b.put_i32(key);
    });
}

pub fn ready_for_query(buf: &mut BytesMut, status: u8) {
    message(buf, b'Z', |b| b.put_u8(status));
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    message(buf, b'S', |b| {
        put_cstr(b, name);
        put_cstr(b, value);
    });
}

/// Tell a client asking for protocol 3.x (x > 0) that we speak 3.0 and which `_pq_.` options
/// we did not recognize.
pub fn negotiate_protocol_version(buf: &mut BytesMut, unrecognized: &[&str]) {
    message(buf, b'v', |b| {
        b.put_i32(3 << 16);
        b.put_i32(unrecognized.len() as i32);
        for o in unrecognized {
            put_cstr(b, o);
        }
    });
}

/// An ErrorResponse ('E') or NoticeResponse ('N') from (field code, value) pairs.
pub fn error_fields(buf: &mut BytesMut, tag: u8, fields: &[(u8, &str)]) {
    message(buf, tag, |b| {
        for (code, value) in fields {
            b.put_u8(*code);
            put_cstr(b, value);
        }
        b.put_u8(0);
    });
}

/// The fields of an ErrorResponse/NoticeResponse body.
pub fn parse_error_fields(frame: &Frame) -> Vec<(u8, String)> {
    let mut body = frame.body();
    let mut out = Vec::new();
    while let Some((&code, rest)) = body.split_first() {
        if code == 0 {
            break;
        }
        body = rest;
        match cstr(&mut body, "error field") {
            Ok(v) => out.push((code, v.to_owned())),
            Err(_) => break,
        }
    }
    out
}

pub fn query(buf: &mut BytesMut, sql: &str) {
    message(buf, b'Q', |b| put_cstr(b, sql));
}

/// A Bind of `statement` with no parameters and default formats.
pub fn bind(buf: &mut BytesMut, portal: &str, statement: &str) {
    message(buf, b'B', |b| {
        put_cstr(b, portal);
        put_cstr(b, statement);
        b.put_i16(0);
        b.put_i16(0);
        b.put_i16(0);
    });
}

/// A Describe of portal `portal`.
pub fn describe_portal(buf: &mut BytesMut, portal: &str) {
    message(buf, b'D', |b| {
        b.put_u8(b'P');
        put_cstr(b, portal);
    });
}

pub fn parse(buf: &mut BytesMut, name: &str, sql: &str) {
    message(buf, b'P', |b| {
        put_cstr(b, name);
        put_cstr(b, sql);
        b.put_i16(0);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup_bytes(params: &[(&str, &str)]) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_i32(0);
        b.put_i32(3 << 16);
        for (k, v) in params {
            put_cstr(&mut b, k);
            put_cstr(&mut b, v);
        }
        b.put_u8(0);
        let len = b.len() as i32;
        b[..4].copy_from_slice(&len.to_be_bytes());
        b
    }

    #[test]
    fn startup_round_trip_and_partial_input() {
        let full = startup_bytes(&[("user", "u"), ("database", "d")]);
        let mut codec = StartupCodec;
        let mut partial = BytesMut::from(&full[..full.len() - 1]);
        assert_eq!(
            codec.decode(&mut partial).unwrap(),
            None,
            "waits for the whole packet"
        );
        let mut whole = full.clone();
        let got = codec.decode(&mut whole).unwrap().unwrap();
        assert_eq!(
            got,
            Startup::Startup {
                minor: 0,
                params: vec![("user".into(), "u".into()), ("database".into(), "d".into())]
            }
        );
        assert!(whole.is_empty());
    }

    #[test]
    fn startup_requests() {
        let mut b = BytesMut::new();
        b.put_i32(8);
        b.put_i32(SSL_REQUEST);
        b.put_i32(16);
        b.put_i32(CANCEL_REQUEST);
        b.put_i32(7);
        b.put_i32(9);
        let mut c = StartupCodec;
        assert_eq!(c.decode(&mut b).unwrap(), Some(Startup::Ssl));
        assert_eq!(
            c.decode(&mut b).unwrap(),
            Some(Startup::Cancel { pid: 7, key: 9 })
        );
    }

    #[test]
    fn bad_lengths_are_rejected_before_allocating() {
        let mut c = StartupCodec;
        for len in [0i32, 7, -1, 1 << 30] {
            let mut b = BytesMut::new();
            b.put_i32(len);
            b.put_i32(3 << 16);
            assert!(
                matches!(c.decode(&mut b), Err(CodecError::BadLength { .. })),
                "{len}"
            );
        }
        let mut f = FrameCodec::default();
        for len in [0i32, 3, -5, 1 << 30] {
            let mut b = BytesMut::new();
            b.put_u8(b'Q');
            b.put_i32(len);
            assert!(
                matches!(f.decode(&mut b), Err(CodecError::BadLength { .. })),
                "{len}"
            );
            assert!(b.capacity() < 1 << 20, "no allocation for a claimed {len}");
        }
    }

    #[test]
    fn unsupported_versions_and_garbage() {
        let mut b = BytesMut::new();
        b.put_i32(8);
        b.put_i32(2 << 16);
        assert!(matches!(
            StartupCodec.decode(&mut b),
            Err(CodecError::UnsupportedProtocol { major: 2, .. })
        ));
        let mut bad = startup_bytes(&[("user", "u")]);
        let n = bad.len();
        bad[n - 1] = b'x'; // no terminating NUL
        assert!(StartupCodec.decode(&mut bad).is_err());
    }

    #[test]
    fn frames_and_builders_round_trip() {
        let mut b = BytesMut::new();
        query(&mut b, "select 1");
        parse(&mut b, "s1", "select $1");
        error_fields(
            &mut b,
            b'E',
            &[(b'S', "ERROR"), (b'C', "42501"), (b'M', "no")],
        );
        let mut f = FrameCodec::default();
        let q = f.decode(&mut b).unwrap().unwrap();
        assert_eq!((q.tag, query_sql(&q).unwrap()), (b'Q', "select 1"));
        let p = f.decode(&mut b).unwrap().unwrap();
        assert_eq!(parse_sql(&p).unwrap(), ("s1", "select $1"));
        let e = f.decode(&mut b).unwrap().unwrap();
        assert_eq!(parse_error_fields(&e)[1], (b'C', "42501".to_string()));
        assert!(b.is_empty());
    }

    #[test]
    fn complete_frames_stops_at_a_partial_frame() {
        let mut b = BytesMut::new();
        ready_for_query(&mut b, b'I');
        let one = b.len();
        ready_for_query(&mut b, b'T');
        assert_eq!(complete_frames(&b[..one + 3], MAX_FRAME_LEN).unwrap(), one);
        assert_eq!(complete_frames(&b, MAX_FRAME_LEN).unwrap(), b.len());
    }
}
