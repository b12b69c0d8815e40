//! The daemon's own login to the upstream server, with the target's credential (SCRAM-SHA-256,
//! md5 or cleartext, whatever the server asks for). The agent's startup never reaches the
//! server: the agent cannot choose the role, and never sees the password.

use super::BoxStream;
use crate::secrets::Credential;
use bytes::BytesMut;
use postgres_protocol::{
    authentication::{md5_hash, sasl},
    message::{backend::Message, frontend},
};
use rustls::pki_types::ServerName;
use std::os::fd::{AsRawFd, RawFd};
use std::{net::SocketAddr, time::Duration};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;

const LOGIN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("login to {addr} took longer than {LOGIN_TIMEOUT:?}")]
    Timeout { addr: SocketAddr },
    #[error("upstream connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("the server refused the login: {code} {message}")]
    Refused { code: String, message: String },
    #[error("the server asked for an authentication method Chaperone does not support ({0})")]
    Unsupported(&'static str),
    #[error("unexpected message during login")]
    Unexpected,
    #[error("the server does not offer TLS, which the target requires")]
    NoTls,
    #[error("TLS handshake with {addr}: {source}")]
    Tls {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// TLS to use for the login: the connector and the name to verify.
pub type UpstreamTls<'a> = Option<(&'a TlsConnector, ServerName<'static>)>;

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// A logged-in upstream session, ready for queries.
pub struct Upstream {
    pub stream: BoxStream,
    /// The TCP socket under `stream` (for a reset on abort).
    pub fd: RawFd,
    /// Bytes read past the login (nothing, normally: the server waits for us after ReadyForQuery).
    pub leftover: BytesMut,
    pub parameters: Vec<(String, String)>,
    pub backend_key: Option<(i32, i32)>,
}

/// Log in to `addr` as `cred` (optionally over TLS), asking for `database` and the session
/// parameters in `extra`, within a time limit.
pub async fn login(
    addr: SocketAddr,
    tls: UpstreamTls<'_>,
    cred: &Credential,
    database: &str,
    extra: &[(String, String)],
) -> Result<Upstream, UpstreamError> {
    let attempt = async move {
        let mut tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| UpstreamError::Connect { addr, source })?;
        tcp.set_nodelay(true)?;
        let fd = tcp.as_raw_fd();
        let mut stream: BoxStream = match tls {
            None => Box::new(tcp),
            Some((connector, name)) => {
                tcp.write_all(&SSL_REQUEST).await?;
                let mut answer = [0u8; 1];
                tcp.read_exact(&mut answer).await?;
                if answer[0] != b'S' {
                    // Fail closed: never fall back to cleartext for a target that requires TLS.
                    return Err(UpstreamError::NoTls);
                }
                let tls = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|source| UpstreamError::Tls { addr, source })?;
                Box::new(tls)
            }
        };
        let mut out = BytesMut::new();
        let mut params: Vec<(&str, &str)> = vec![("user", &cred.user), ("database", database)];
        params.extend(extra.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        frontend::startup_message(params.iter().copied(), &mut out)?;
        stream.write_all(&out).await?;

        let mut buf = BytesMut::with_capacity(8192);
        let mut scram: Option<sasl::ScramSha256> = None;
        let mut parameters = Vec::new();
        let mut backend_key = None;
        loop {
            let msg = loop {
                if let Some(m) = Message::parse(&mut buf)? {
                    break m;
                }
                if stream.read_buf(&mut buf).await? == 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
                }
            };
            out.clear();
            match msg {
                Message::AuthenticationOk => {}
                Message::AuthenticationCleartextPassword => {
                    frontend::password_message(cred.password.as_bytes(), &mut out)?
                }
                Message::AuthenticationMd5Password(body) => {
                    let hash =
                        md5_hash(cred.user.as_bytes(), cred.password.as_bytes(), body.salt());
                    frontend::password_message(hash.as_bytes(), &mut out)?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut mechanisms = body.mechanisms();
                    let mut found = false;
                    while let Some(m) = fallible_iterator::FallibleIterator::next(&mut mechanisms)?
                    {
                        found |= m == sasl::SCRAM_SHA_256;
                    }
                    if !found {
                        return Err(UpstreamError::Unsupported("SASL without SCRAM-SHA-256"));
                    }
                    let s = sasl::ScramSha256::new(
                        cred.password.as_bytes(),
                        sasl::ChannelBinding::unsupported(),
                    );
                    frontend::sasl_initial_response(sasl::SCRAM_SHA_256, s.message(), &mut out)?;
                    scram = Some(s);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let s = scram.as_mut().ok_or(UpstreamError::Unexpected)?;
                    s.update(body.data())?;
                    frontend::sasl_response(s.message(), &mut out)?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    // Verifies the server's signature: a server that does not know the password
                    // cannot pass itself off as the target.
                    scram
                        .as_mut()
                        .ok_or(UpstreamError::Unexpected)?
                        .finish(body.data())?;
                }
                Message::AuthenticationGss
                | Message::AuthenticationSspi
                | Message::AuthenticationKerberosV5 => {
                    return Err(UpstreamError::Unsupported("GSS/SSPI/Kerberos"));
                }
                Message::ParameterStatus(body) => {
                    parameters.push((body.name()?.to_owned(), body.value()?.to_owned()))
                }
                Message::BackendKeyData(body) => {
                    backend_key = Some((body.process_id(), body.secret_key()))
                }
                Message::NoticeResponse(_) => {}
                Message::ErrorResponse(body) => {
                    let (mut code, mut message) = (String::new(), String::new());
                    let mut fields = body.fields();
                    while let Some(f) = fallible_iterator::FallibleIterator::next(&mut fields)? {
                        match f.type_() {
                            b'C' => code = String::from_utf8_lossy(f.value_bytes()).into_owned(),
                            b'M' => message = String::from_utf8_lossy(f.value_bytes()).into_owned(),
                            _ => {}
                        }
                    }
                    return Err(UpstreamError::Refused { code, message });
                }
                Message::ReadyForQuery(_) => {
                    return Ok(Upstream {
                        stream,
                        fd,
                        leftover: buf,
                        parameters,
                        backend_key,
                    });
                }
                _ => return Err(UpstreamError::Unexpected),
            }
            if !out.is_empty() {
                stream.write_all(&out).await?;
            }
        }
    };
    tokio::time::timeout(LOGIN_TIMEOUT, attempt)
        .await
        .map_err(|_| UpstreamError::Timeout { addr })?
}

/// Run one query on a logged-in upstream before the agent's traffic starts, and return the
/// first column of every row as text.
pub async fn query_column(up: &mut Upstream, sql: &str) -> Result<Vec<String>, UpstreamError> {
    Ok(query_rows(up, sql)
        .await?
        .into_iter()
        .filter_map(|r| r.into_iter().next().flatten())
        .collect())
}

/// Run one query on a logged-in upstream before the agent's traffic starts, and return every
/// row as text (`None`: NULL).
pub async fn query_rows(
    up: &mut Upstream,
    sql: &str,
) -> Result<Vec<Vec<Option<String>>>, UpstreamError> {
    let mut out = BytesMut::new();
    frontend::query(sql, &mut out)?;
    up.stream.write_all(&out).await?;
    let mut rows = Vec::new();
    let mut failed = None;
    loop {
        let msg = loop {
            if let Some(m) = Message::parse(&mut up.leftover)? {
                break m;
            }
            if up.stream.read_buf(&mut up.leftover).await? == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
            }
        };
        match msg {
            Message::DataRow(row) => {
                let mut ranges = row.ranges();
                let mut values = Vec::new();
                while let Some(r) = fallible_iterator::FallibleIterator::next(&mut ranges)? {
                    values.push(r.map(|r| String::from_utf8_lossy(&row.buffer()[r]).into_owned()));
                }
                rows.push(values);
            }
            Message::ErrorResponse(_) => {
                failed = Some(UpstreamError::Refused {
                    code: String::new(),
                    message: format!("catalog query failed: {sql}"),
                })
            }
            Message::ReadyForQuery(_) => return failed.map_or(Ok(rows), Err),
            _ => {}
        }
    }
}

/// Forward a cancel request to the server that runs the query.
pub async fn cancel(addr: SocketAddr, pid: i32, key: i32) -> std::io::Result<()> {
    let mut stream = tokio::time::timeout(LOGIN_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let mut out = BytesMut::new();
    frontend::cancel_request(pid, key, &mut out);
    stream.write_all(&out).await?;
    // The server closes without answering; waiting for that keeps the cancel ordered.
    let mut sink = [0u8; 1];
    let _ = tokio::time::timeout(LOGIN_TIMEOUT, stream.read(&mut sink)).await;
    Ok(())
}
