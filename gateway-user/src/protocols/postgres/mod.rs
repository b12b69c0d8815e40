//! PostgreSQL: a protocol-aware proxy that judges every statement on the server's own grammar.
//!
//! Per session: answer SSLRequest/GSSENCRequest with `N` (the hop is loopback), route
//! CancelRequests to the right backend, refuse startup parameters that change privilege or mode,
//! log in upstream with the target's credential (the agent's user and password are ignored),
//! then relay frames. Client to server: each Query and Parse is classified ([`classify`], cached)
//! and judged by `policy`; FunctionCall is always refused. Server to client: whole runs of frames
//! are forwarded in one write, after [`mask`] has masked the values in them (rows, COPY data,
//! error and notice fields) when the session has a `Masker`.
//!
//! A refused statement is not answered locally: it is replaced by a statement the server rejects
//! with a syntax error naming a per-session nonce, and that error is rewritten into our 42501 on
//! the way back. So the refusal arrives in order with everything pipelined before it, the server
//! discards the rest of an extended-protocol batch up to Sync exactly as it would for its own
//! error, and a transaction block is left failed on both sides, as PostgreSQL itself would.

pub mod cache;
pub mod classify;
pub mod codec;
pub mod error;
pub mod mask;
pub mod upstream;

use crate::{
    identity::AgentId,
    policy::{self, Action, PolicyStore, Refusal, Subject, Verdict},
    record::SessionRecorder,
    secrets::Secrets,
};
use bytes::BytesMut;
use classify::{Classified, ClassifyError, CopyOut, Facts};
use codec::{CodecError, Frame, FrameCodec, Startup, StartupCodec};
use error::PgError;
use futures_util::StreamExt as _;
use std::os::fd::AsRawFd;
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf},
    net::TcpStream,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::codec::{Decoder, FramedRead};
use tracing::{debug, info, warn};

/// How long a client may take to finish its startup.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Flush the client-to-server buffer at least this often (bytes), even mid-pipeline.
const FLUSH_AT: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PgSessionError {
    #[error("client protocol error: {0}")]
    Protocol(#[from] CodecError),
    #[error("client startup refused: {0}")]
    StartupRefused(String),
    #[error("target `{target}`: {source}")]
    Upstream {
        target: String,
        source: upstream::UpstreamError,
    },
    #[error("target `{0}` names credential `{1}`, which the secrets file does not have")]
    NoCredential(String, String),
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("client did not finish its startup in {STARTUP_TIMEOUT:?}")]
    StartupTimeout,
    #[error("TLS with the agent: {0}")]
    ClientTls(std::io::Error),
    #[error(transparent)]
    Masking(#[from] mask::TooManyPending),
    #[error("target `{0}`: bad tls_server_name: {1}")]
    TlsName(String, crate::tls::TlsError),
}

/// A byte stream either side: plain TCP, or TLS over it.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}
pub type BoxStream = Box<dyn Stream>;

/// State shared by every PostgreSQL session of the daemon.
#[derive(Default)]
pub struct Shared {
    pub cache: cache::StatementCache,
    pub secrets: Secrets,
    /// Serves agents that ask for TLS; `None`: they are told `N`.
    pub tls_acceptor: Option<TlsAcceptor>,
    /// Per target name, for targets with upstream TLS.
    pub tls_connectors: HashMap<String, TlsConnector>,
    /// Proxy-issued cancel key → the upstream backend that key stands for.
    cancels: Mutex<HashMap<CancelKeyPair, UpstreamBackend>>,
    /// Per target and database (OIDs are per database, and a target without `database` serves
    /// any): what its catalog says about user objects, read at login and kept for
    /// [`CATALOG_TTL`].
    catalogs: Mutex<HashMap<CatalogKey, (std::time::Instant, Arc<Catalog>)>>,
}

/// What a session needs from the target's catalog, outside pg_catalog and information_schema.
#[derive(Debug, Default)]
struct Catalog {
    /// Function names: an agent could call them by attribute notation, which the built-in list
    /// cannot know.
    functions: FunctionNames,
    /// Columns of user relations, to name the columns of results for masking rules; user types
    /// that travel as text.
    relations: Arc<mask::Relations>,
}

/// A BackendKeyData (process id, secret key).
type CancelKeyPair = (i32, i32);
/// Where a cancel must go: the upstream address and the backend's own key pair.
type UpstreamBackend = (SocketAddr, i32, i32);
type FunctionNames = Arc<std::collections::HashSet<String>>;
/// (target name, database).
type CatalogKey = (String, String);

/// How long a target's catalog is trusted before a login reads it again.
const CATALOG_TTL: Duration = Duration::from_secs(30);

/// Functions an agent could call by attribute notation that the built-in list cannot know.
const USER_FUNCTIONS_SQL: &str = "SELECT DISTINCT p.proname FROM pg_catalog.pg_proc p \
     JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
     WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')";

impl Shared {
    /// The catalog of the target's `database`, read over this freshly logged-in upstream
    /// session when the cached copy is older than [`CATALOG_TTL`].
    async fn catalog(
        &self,
        target: &str,
        database: &str,
        up: &mut upstream::Upstream,
    ) -> Result<Arc<Catalog>, upstream::UpstreamError> {
        let key = (target.to_owned(), database.to_owned());
        if let Some((at, c)) = self.catalogs.lock().unwrap().get(&key)
            && at.elapsed() < CATALOG_TTL
        {
            return Ok(c.clone());
        }
        let functions = upstream::query_column(up, USER_FUNCTIONS_SQL).await?;
        let relations = upstream::query_rows(up, mask::RELATIONS_SQL).await?;
        let text_types = upstream::query_rows(up, mask::TEXT_TYPES_SQL).await?;
        let c = Arc::new(Catalog {
            functions: Arc::new(functions.into_iter().collect()),
            relations: Arc::new(mask::Relations::from_rows(relations, text_types)),
        });
        self.catalogs
            .lock()
            .unwrap()
            .insert(key, (std::time::Instant::now(), c.clone()));
        Ok(c)
    }

    pub fn new(
        secrets: Secrets,
        tls_acceptor: Option<TlsAcceptor>,
        tls_connectors: HashMap<String, TlsConnector>,
    ) -> Self {
        Self {
            secrets,
            tls_acceptor,
            tls_connectors,
            ..Default::default()
        }
    }
}

/// Removes a session's cancel key when the session ends.
struct CancelKey<'a> {
    shared: &'a Shared,
    key: (i32, i32),
}

impl Drop for CancelKey<'_> {
    fn drop(&mut self) {
        self.shared.cancels.lock().unwrap().remove(&self.key);
    }
}

/// What one PostgreSQL session needs to know.
pub struct Session<'a> {
    pub target: &'a crate::config::Target,
    pub upstream: SocketAddr,
    pub agent: Option<&'a AgentId>,
    pub policy: &'a PolicyStore,
    pub shared: &'a Shared,
    /// Policy refused the connection itself: answer the startup with this, then end.
    pub refusal: Option<&'a Refusal>,
    /// The agent as it is now (a refreshed token, an expiry): asked for every statement.
    pub current_agent: &'a (dyn Fn() -> Option<AgentId> + Sync),
    /// Masks result values on their way to the agent (`None`: results pass as they are).
    pub masker: Option<&'a crate::mask::Masker>,
}

/// What a session's record counts, filled in as the session runs (so it is right after an
/// error or a cancellation too).
struct Counters<'a> {
    bytes_up: &'a mut u64,
    allowed: &'a mut u64,
    denied: &'a mut u64,
}

pub async fn serve(
    s: &Session<'_>,
    client: TcpStream,
    rec: &mut SessionRecorder,
) -> Result<(), PgSessionError> {
    let client_fd = client.as_raw_fd();
    let mut slot: Option<BoxStream> = Some(Box::new(client));
    let mut buf = BytesMut::with_capacity(1024);
    let started = tokio::time::timeout(STARTUP_TIMEOUT, read_startup(&mut slot, &mut buf, s)).await;
    let Some(mut cw) = slot else {
        // The TLS handshake with the agent failed: nothing to answer on.
        return match started {
            Ok(Err(e)) => Err(e),
            _ => Err(PgSessionError::StartupTimeout),
        };
    };
    let (minor, params) = match started {
        Err(_) => return Err(PgSessionError::StartupTimeout),
        Ok(Err(e)) => {
            if let PgSessionError::Protocol(c) = &e {
                let _ = send_error(&mut cw, &PgError::protocol_violation(&c.to_string())).await;
            }
            return Err(e);
        }
        Ok(Ok(None)) => return Ok(()), // a cancel request, served
        Ok(Ok(Some(p))) => p,
    };

    let checked = match check_startup(s, &params) {
        Ok(c) => c,
        Err(refusal) => {
            send_error(&mut cw, &refusal).await?;
            return Err(PgSessionError::StartupRefused(refusal.message));
        }
    };
    let cred_name = s.target.credential.as_deref().unwrap_or_default();
    let Some(cred) = s.shared.secrets.get(cred_name) else {
        send_error(&mut cw, &PgError::upstream_unavailable(&s.target.name)).await?;
        return Err(PgSessionError::NoCredential(
            s.target.name.clone(),
            cred_name.into(),
        ));
    };
    let mut extra = checked.forward;
    // The classifier resolves unqualified names as pg_catalog, then public: make the server do
    // the same (a schema named after the login role would otherwise come first).
    extra.push(("search_path".into(), "public".into()));
    if s.policy
        .current()
        .read_only(&Subject::now(s.agent), &s.target.name)
    {
        // Defence in depth: even a statement the classifier got wrong cannot write.
        extra.push(("default_transaction_read_only".into(), "on".into()));
    }
    let tls = match s.shared.tls_connectors.get(&s.target.name) {
        None => None,
        Some(c) => Some((
            c,
            crate::tls::server_name(&s.target.tls_name())
                .map_err(|e| PgSessionError::TlsName(s.target.name.clone(), e))?,
        )),
    };
    let login = async {
        let mut up = upstream::login(s.upstream, tls, cred, &checked.database, &extra).await?;
        let catalog = s
            .shared
            .catalog(&s.target.name, &checked.database, &mut up)
            .await?;
        Ok::<_, upstream::UpstreamError>((up, catalog))
    };
    let (up, catalog) = match login.await {
        Ok(u) => u,
        Err(source) => {
            send_error(&mut cw, &PgError::upstream_unavailable(&s.target.name)).await?;
            return Err(PgSessionError::Upstream {
                target: s.target.name.clone(),
                source,
            });
        }
    };

    let mut greeting = BytesMut::new();
    if minor > 0 {
        let unrecognized: Vec<&str> = params
            .iter()
            .map(|(k, _)| k.as_str())
            .filter(|k| k.starts_with("_pq_."))
            .collect();
        codec::negotiate_protocol_version(&mut greeting, &unrecognized);
    }
    codec::auth_ok(&mut greeting);
    for (k, v) in &up.parameters {
        codec::parameter_status(&mut greeting, k, v);
    }
    let _cancel_key = up.backend_key.map(|(pid, key)| {
        let ours = (random_i32(), random_i32());
        s.shared
            .cancels
            .lock()
            .unwrap()
            .insert(ours, (s.upstream, pid, key));
        codec::backend_key_data(&mut greeting, ours.0, ours.1);
        CancelKey {
            shared: s.shared,
            key: ours,
        }
    });
    codec::ready_for_query(&mut greeting, b'I');
    cw.write_all(&greeting).await?;
    debug!(database = %checked.database, "postgres session ready");

    let upstream_fd = up.fd;
    let (cr, mut cw) = tokio::io::split(cw);
    let (mut ur, mut uw) = tokio::io::split(up.stream);
    let mut frames = FramedRead::new(cr, FrameCodec::default());
    frames.read_buffer_mut().extend_from_slice(&buf);
    let denials = Denials::default();
    rec.bytes_down += greeting.len() as u64;
    let counters = Counters {
        bytes_up: &mut rec.bytes_up,
        allowed: &mut rec.statements_allowed,
        denied: &mut rec.statements_denied,
    };
    let judge = Judge {
        s,
        user_functions: catalog.functions.clone(),
        nonce: format!("chaperone_denied_{:08x}{:08x}", random_i32(), random_i32()),
        seq: AtomicU64::new(0),
    };
    let requests = mask::Requests::default();
    let mut masking = s
        .masker
        .map(|m| mask::ResultMasker::new(m, catalog.relations.clone(), &requests));
    let down = Down {
        denials: &denials,
        masking: masking.as_mut(),
        bytes: &mut rec.bytes_down,
    };
    let result = tokio::try_join!(
        client_to_server(
            &mut frames,
            &mut uw,
            &judge,
            &denials,
            s.masker.is_some().then_some(&requests),
            counters
        ),
        server_to_client(&mut ur, &mut cw, up.leftover, down),
    );
    if let Some(m) = masking {
        rec.masked = m.counts;
    }
    match &result {
        // The agent broke the protocol: tell it why, then close in order (as PostgreSQL does).
        Err(PgSessionError::Protocol(e)) => {
            let _ = send_error(&mut cw, &PgError::protocol_violation(&e.to_string())).await;
            let _ = cw.shutdown().await;
            super::reset_on_close(upstream_fd);
        }
        // One side aborted: the other must see an abort, not a clean end.
        Err(_) => {
            super::reset_on_close(client_fd);
            super::reset_on_close(upstream_fd);
        }
        Ok(_) => {}
    }
    result.map(drop)
}

/// Read startup packets until a StartupMessage (`Some`) or a served CancelRequest (`None`),
/// upgrading the agent's stream to TLS in `slot` if it asks and we serve TLS. Bytes read past
/// the startup stay in `buf`.
async fn read_startup(
    slot: &mut Option<BoxStream>,
    buf: &mut BytesMut,
    s: &Session<'_>,
) -> Result<Option<(u16, Vec<(String, String)>)>, PgSessionError> {
    let mut codec = StartupCodec;
    let mut encrypted = false;
    loop {
        let stream = slot
            .as_mut()
            .expect("the stream is only taken for the TLS upgrade");
        let packet = loop {
            if let Some(p) = codec.decode(buf)? {
                break p;
            }
            if stream.read_buf(buf).await? == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
            }
        };
        match packet {
            // TLS only as the very next thing on the wire: bytes already sent after the
            // request would otherwise bypass the handshake.
            Startup::Ssl if !encrypted && buf.is_empty() && s.shared.tls_acceptor.is_some() => {
                stream.write_all(b"S").await?;
                let plain = slot.take().expect("present");
                let acceptor = s.shared.tls_acceptor.as_ref().expect("checked");
                let tls = acceptor
                    .accept(plain)
                    .await
                    .map_err(PgSessionError::ClientTls)?;
                *slot = Some(Box::new(tls));
                encrypted = true;
            }
            // Otherwise the client continues in the clear (no GSS encryption at all).
            Startup::Ssl | Startup::GssEnc => stream.write_all(b"N").await?,
            Startup::Cancel { pid, key } => {
                let backend = s.shared.cancels.lock().unwrap().get(&(pid, key)).copied();
                match backend {
                    Some((addr, pid, key)) => {
                        info!("forwarding a cancel request");
                        upstream::cancel(addr, pid, key).await?;
                    }
                    None => warn!("cancel request with an unknown key; ignored"),
                }
                return Ok(None);
            }
            Startup::Startup { minor, params } => return Ok(Some((minor, params))),
        }
    }
}

struct CheckedStartup {
    database: String,
    /// Client parameters passed on to the server.
    forward: Vec<(String, String)>,
}

/// Startup parameters are GUC settings: any of them could change privilege or mode (`role`,
/// `default_transaction_read_only`, `options=-c …`, `replication`). Only these pass.
const FORWARDED_PARAMS: &[&str] = &[
    "application_name",
    "client_encoding",
    "datestyle",
    "timezone",
    "extra_float_digits",
    "intervalstyle",
];

fn check_startup(s: &Session<'_>, params: &[(String, String)]) -> Result<CheckedStartup, PgError> {
    if let Some(r) = s.refusal {
        return Err(PgError::startup_refused(
            "28000",
            format!("connection refused by policy: {}", r.rule),
        ));
    }
    let mut forward = Vec::new();
    let (mut user, mut database) = (None, None);
    for (k, v) in params {
        let key = k.to_ascii_lowercase();
        match key.as_str() {
            // The agent's user is ignored: the daemon logs in with the target's credential.
            "user" => user = Some(v.clone()),
            "database" => database = Some(v.clone()),
            "options" if v.trim().is_empty() => {}
            "replication"
                if matches!(
                    v.to_ascii_lowercase().as_str(),
                    "false" | "off" | "no" | "0"
                ) => {}
            k if k.starts_with("_pq_.") => {} // protocol extensions: negotiated away
            "client_encoding" if !same_bytes_as_utf8(v) => {
                return Err(PgError::startup_refused(
                    "22023",
                    format!("client_encoding `{v}` is not allowed through this proxy: use UTF8"),
                ));
            }
            k if FORWARDED_PARAMS.contains(&k) => forward.push((k.to_string(), v.clone())),
            _ => {
                return Err(PgError::startup_refused(
                    "42501",
                    format!(
                        "startup parameter `{k}` is not allowed through this proxy (it could change privilege or mode)"
                    ),
                ));
            }
        }
    }
    let asked = database.or(user).filter(|d| !d.is_empty());
    let database = match (&s.target.database, asked) {
        (Some(served), Some(asked)) if *served != asked => {
            return Err(PgError::startup_refused(
                "3D000",
                format!(
                    "database `{asked}` is not reachable through target `{}` (it serves `{served}`)",
                    s.target.name
                ),
            ));
        }
        (Some(served), _) => served.clone(),
        (None, Some(asked)) => asked,
        (None, None) => {
            return Err(PgError::startup_refused(
                "3D000",
                "no database named in the startup".into(),
            ));
        }
    };
    Ok(CheckedStartup { database, forward })
}

/// Client encodings in which every ASCII byte is an ASCII character, as in UTF-8: the server
/// then sees the same quotes and backslashes the classifier sees. Not SJIS, BIG5, GBK, GB18030,
/// UHC or JOHAB, whose multibyte characters can end in `\\` or other ASCII bytes.
fn same_bytes_as_utf8(encoding: &str) -> bool {
    let e: String = encoding
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect::<String>()
        .to_ascii_lowercase();
    matches!(
        e.as_str(),
        "utf8" | "unicode" | "sqlascii" | "koi8r" | "koi8u" | "win866" | "win874" | "alt"
    ) || ["latin", "iso8859", "win125", "euc"]
        .iter()
        .any(|p| e.starts_with(p))
}

async fn send_error(cw: &mut (impl AsyncWrite + Unpin), e: &PgError) -> std::io::Result<()> {
    let mut buf = BytesMut::new();
    e.encode(&mut buf);
    cw.write_all(&buf).await
}

/// Refusals waiting for the server's error on their stand-in statement.
#[derive(Default)]
struct Denials {
    any: AtomicBool,
    list: Mutex<Vec<(String, PgError)>>,
}

impl Denials {
    fn push(&self, marker: String, e: PgError) {
        let mut l = self.list.lock().unwrap();
        // A stand-in the server skipped (an earlier error in the same batch) never answers;
        // keep the list from growing without bound.
        if l.len() >= 64 {
            l.remove(0);
        }
        l.push((marker, e));
        self.any.store(true, Ordering::Release);
    }

    /// If this frame is the ErrorResponse to a stand-in, the refusal to send instead.
    fn take_for(&self, frame: &Frame) -> Option<PgError> {
        if frame.tag != b'E' || !self.any.load(Ordering::Acquire) {
            return None;
        }
        let fields = codec::parse_error_fields(frame);
        let message = fields
            .iter()
            .find(|(c, _)| *c == b'M')
            .map(|(_, m)| m.as_str())?;
        let mut l = self.list.lock().unwrap();
        let i = l
            .iter()
            .position(|(marker, _)| message.contains(marker.as_str()))?;
        let (_, e) = l.remove(i);
        self.any.store(!l.is_empty(), Ordering::Release);
        Some(e)
    }
}

/// Classifies and judges statements for one session.
struct Judge<'a> {
    s: &'a Session<'a>,
    /// The target's own function names (see [`Shared::catalog`]).
    user_functions: FunctionNames,
    nonce: String,
    seq: AtomicU64,
}

enum Judgement {
    Allow,
    Deny(PgError),
}

impl Judge<'_> {
    fn marker(&self) -> String {
        format!(
            "{}_{}",
            self.nonce,
            self.seq.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Judge a statement's facts with the policy and the agent as they are now.
    fn facts(&self, facts: &Facts) -> Judgement {
        let agent = (self.s.current_agent)();
        let decision = policy::evaluate(
            &self.s.policy.current(),
            &Subject::now(agent.as_ref().or(self.s.agent)),
            &Action::Sql {
                target: &self.s.target.name,
                facts,
            },
        );
        match decision.verdict {
            Verdict::Allow => {
                debug!(rule = %decision.rule, classes = ?facts.classes, "statement allowed");
                Judgement::Allow
            }
            Verdict::Hold => {
                info!(rule = %decision.rule, classes = ?facts.classes, "statement needs approval; refused");
                let rule = format!(
                    "{}: requires a human's approval, which this version cannot take",
                    decision.rule
                );
                Judgement::Deny(PgError::denied(&rule, describe(facts)))
            }
            Verdict::Deny(_) => {
                info!(rule = %decision.rule, classes = ?facts.classes, objects = facts.objects.len(), "statement denied");
                Judgement::Deny(PgError::denied(&decision.rule, describe(facts)))
            }
        }
    }

    /// Classify `sql` (through the daemon's cache).
    fn classify(&self, sql: &str) -> cache::Outcome {
        self.s.shared.cache.classify(sql)
    }

    /// Judge a classified statement; with the facts it was judged on when `keep` (a prepared
    /// statement, judged again at Bind if the policy or the agent changes).
    fn statement(
        &self,
        outcome: &Result<Classified, ClassifyError>,
        prepared: &mut HashMap<String, Facts>,
        keep: bool,
    ) -> (Judgement, Option<Facts>) {
        let c = match outcome {
            Ok(c) => c,
            Err(e) => {
                info!(
                    verdict = "deny",
                    rule = "unparsable",
                    "statement does not parse"
                );
                return (
                    Judgement::Deny(PgError::denied(
                        "statements that do not parse are denied",
                        e.to_string(),
                    )),
                    None,
                );
            }
        };
        // EXECUTE runs what PREPARE stored: judge those facts too.
        let mut facts = c.facts_with(prepared);
        // `x.f` is a call when the target has a function `f` (an extension's, an application's).
        let calls: Vec<String> = facts
            .attribute_names
            .iter()
            .filter(|n| self.user_functions.contains(*n))
            .cloned()
            .collect();
        if !calls.is_empty() {
            facts.to_mut().functions.extend(calls);
        }
        let judgement = self.facts(&facts);
        let kept = keep.then(|| facts.clone().into_owned());
        if matches!(judgement, Judgement::Allow) {
            c.apply_to(prepared);
        }
        (judgement, kept)
    }
}

/// A Query's `COPY … TO STDOUT` statements and whether it may redefine names, from its
/// classification. A string that does not parse is refused before it is sent on; were one sent,
/// it could redefine any name (and its rows are read as text, by the detectors only).
fn query_effects(outcome: &Result<Classified, ClassifyError>) -> (&[CopyOut], bool) {
    match outcome {
        Ok(c) => (&c.copy_outs, c.redefines_names),
        Err(_) => (&[], true),
    }
}

/// What a refused statement does, for the error's DETAIL.
fn describe(f: &Facts) -> String {
    let classes: Vec<&str> = f.effective_classes().iter().map(|c| c.as_str()).collect();
    let mut d = format!("classes: {}", classes.join(", "));
    if !f.objects.is_empty() {
        let objs: Vec<String> = f
            .objects
            .iter()
            .map(|o| format!("{} ({})", o.name, o.access.as_str()))
            .collect();
        d.push_str(&format!("; objects: {}", objs.join(", ")));
    }
    if !f.functions.is_empty() {
        d.push_str(&format!(
            "; functions: {}",
            f.functions.iter().cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    for n in &f.notes {
        d.push_str(&format!("; {n}"));
    }
    d
}

async fn client_to_server(
    frames: &mut FramedRead<ReadHalf<BoxStream>, FrameCodec>,
    uw: &mut (impl AsyncWrite + Unpin),
    judge: &Judge<'_>,
    denials: &Denials,
    requests: Option<&mask::Requests>,
    counters: Counters<'_>,
) -> Result<(), PgSessionError> {
    let mut out = BytesMut::with_capacity(8192);
    let mut prepared: HashMap<String, Facts> = HashMap::new();
    // Protocol-level prepared statements: the facts each was judged on, and under which policy
    // generation, so a Bind after a reload (or after the agent's token lapsed) is judged again.
    let mut statements: HashMap<String, (Facts, u64)> = HashMap::new();
    // Statements the client itself described since it parsed them: their portals need no
    // Describe from the proxy (the masker saw the description). Anything else gets one.
    let mut described: std::collections::HashSet<String> = Default::default();
    while let Some(frame) = frames.next().await {
        let frame = frame?;
        *counters.bytes_up += frame.raw.len() as u64;
        // A Query's classification: judged here, and read again below for the masking.
        let mut query = None;
        let verdict = match frame.tag {
            b'Q' => {
                let q = query.insert(judge.classify(codec::query_sql(&frame)?));
                Some(judge.statement(q, &mut prepared, false).0)
            }
            b'P' => {
                let (name, sql) = codec::parse_sql(&frame)?;
                let generation = judge.s.policy.generation();
                let outcome = judge.classify(sql);
                let (judgement, facts) =
                    if requests.is_some() && !query_effects(&outcome).0.is_empty() {
                        // The extended protocol does not say which COPY its rows belong to, so
                        // neither format nor columns would be known: only the simple protocol.
                        (
                            Judgement::Deny(PgError::denied(
                                "COPY TO STDOUT through the extended protocol cannot be masked",
                                "send it as a simple query (psql's \\copy does)".into(),
                            )),
                            None,
                        )
                    } else {
                        judge.statement(&outcome, &mut prepared, true)
                    };
                match (&judgement, facts) {
                    (Judgement::Allow, Some(f)) => {
                        statements.insert(name.to_string(), (f, generation));
                    }
                    _ => {
                        statements.remove(name);
                    }
                }
                Some(judgement)
            }
            b'B' => {
                let (_, name) = codec::bind_names(&frame)?;
                match statements.get(name) {
                    Some((facts, generation))
                        if *generation != judge.s.policy.generation()
                            || judge.s.agent.is_some_and(|a| a.oidc.is_some()) =>
                    {
                        match judge.facts(facts) {
                            Judgement::Allow => None,
                            deny => Some(deny),
                        }
                    }
                    _ => None,
                }
            }
            b'C' => {
                if let Some(name) = codec::close_statement(&frame)? {
                    statements.remove(name);
                }
                None
            }
            // The fast-path function call bypasses SQL entirely (lo_import, pg_read_file…).
            b'F' => Some(Judgement::Deny(PgError::denied(
                "the FunctionCall protocol message is always denied",
                "use SELECT function(...) instead, which policy can judge".into(),
            ))),
            b'E' | b'D' | b'S' | b'H' | b'd' | b'c' | b'f' | b'X' => None,
            other => {
                return Err(CodecError::Malformed {
                    what: if other.is_ascii_graphic() {
                        "message: unknown frontend message type"
                    } else {
                        "message type"
                    },
                }
                .into());
            }
        };
        if let (Some(r), None | Some(Judgement::Allow)) = (requests, &verdict) {
            match &query {
                Some(q) => {
                    let (copies, redefines) = query_effects(q);
                    r.note_query(copies, redefines)?;
                }
                None => r.note(frame.tag, frame.body())?,
            }
        }
        let passed = !matches!(verdict, Some(Judgement::Deny(_)));
        match verdict {
            None => out.extend_from_slice(&frame.raw),
            Some(Judgement::Allow) => {
                *counters.allowed += 1;
                out.extend_from_slice(&frame.raw);
            }
            Some(Judgement::Deny(e)) => {
                *counters.denied += 1;
                let marker = judge.marker();
                // A stand-in the server rejects with a syntax error that names the marker.
                let from = out.len();
                match frame.tag {
                    b'P' => codec::parse(&mut out, "", &marker),
                    // A Bind of a statement the server does not have: its error names the
                    // marker; the server skips the rest of the batch up to Sync, as after any
                    // Bind error.
                    b'B' => codec::bind(&mut out, codec::bind_names(&frame)?.0, &marker),
                    _ => codec::query(&mut out, &marker),
                }
                if let Some(r) = requests {
                    match out[from] {
                        // The server rejects a stand-in Query before it runs anything.
                        b'Q' => r.note_query(&[], false)?,
                        tag => r.note(tag, &out[from + 5..])?,
                    }
                }
                denials.push(marker, e);
            }
        }
        // Masking must know every portal's columns, also for clients that never Describe
        // (column rules would not apply otherwise): describe it ourselves; the masker uses the
        // answer and drops it.
        if let (Some(r), true) = (requests, passed) {
            match frame.tag {
                b'P' => {
                    described.remove(codec::parse_sql(&frame)?.0);
                }
                b'D' if frame.body().first() == Some(&b'S') => {
                    let mut name = &frame.body()[1..];
                    described.insert(codec::cstr(&mut name, "Describe")?.to_string());
                }
                b'Q' if query.as_ref().is_some_and(|q| query_effects(q).1) => described.clear(),
                b'B' => {
                    let (portal, statement) = codec::bind_names(&frame)?;
                    if !described.contains(statement) {
                        codec::describe_portal(&mut out, portal);
                        r.note_injected_describe(portal)?;
                    }
                }
                _ => {}
            }
        }
        if frame.tag == b'X' {
            break;
        }
        if frames.read_buffer().is_empty() || out.len() >= FLUSH_AT {
            uw.write_all(&out).await?;
            out.clear();
        }
    }
    uw.write_all(&out).await?;
    uw.shutdown().await?;
    Ok(())
}

/// The server-to-client half's state: refusals to put in place, the masking, the count.
struct Down<'a, 'm> {
    denials: &'a Denials,
    masking: Option<&'a mut mask::ResultMasker<'m>>,
    bytes: &'a mut u64,
}

async fn server_to_client(
    ur: &mut (impl AsyncRead + Unpin),
    cw: &mut (impl AsyncWrite + Unpin),
    mut buf: BytesMut,
    mut down: Down<'_, '_>,
) -> Result<(), PgSessionError> {
    let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    loop {
        let end = codec::complete_frames(&buf, codec::MAX_FRAME_LEN)
            .map_err(|e| invalid(format!("server sent {e}")))?;
        if end > 0 {
            let mut chunk = buf.split_to(end);
            // Refusals first: they are ours, then everything is masked alike.
            if down.denials.any.load(Ordering::Acquire) {
                chunk = rewrite_denials(chunk, down.denials);
            }
            if let Some(m) = down.masking.as_deref_mut() {
                chunk = m.rewrite(chunk).map_err(|e| invalid(e.to_string()))?;
            }
            cw.write_all(&chunk).await?;
            *down.bytes += chunk.len() as u64;
        }
        buf.reserve(64 * 1024);
        if ur.read_buf(&mut buf).await? == 0 {
            cw.shutdown().await?;
            return Ok(());
        }
    }
}

/// Replace the server's errors for stand-in statements with the refusals they stand for.
fn rewrite_denials(mut chunk: BytesMut, denials: &Denials) -> BytesMut {
    let mut out = BytesMut::with_capacity(chunk.len());
    let mut codec = FrameCodec::default();
    while let Ok(Some(frame)) = codec.decode(&mut chunk) {
        match denials.take_for(&frame) {
            Some(e) => e.encode(&mut out),
            None => out.extend_from_slice(&frame.raw),
        }
    }
    out
}

fn random_i32() -> i32 {
    let mut b = [0u8; 4];
    // SAFETY: getrandom into a 4-byte buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 4 {
        // Never reached on Linux ≥ 3.17 once the pool is initialized; fail loudly, not weakly.
        panic!("getrandom failed");
    }
    i32::from_ne_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ProtocolKind, Target};

    fn target(database: Option<&str>) -> Target {
        Target {
            name: "app".into(),
            protocol: ProtocolKind::Postgres,
            address: "127.0.0.1/32".parse().unwrap(),
            port: 5432,
            credential: Some("c".into()),
            database: database.map(str::to_owned),
            tls: Default::default(),
            tls_ca_file: None,
            tls_server_name: None,
        }
    }

    fn check(database: Option<&str>, params: &[(&str, &str)]) -> Result<CheckedStartup, PgError> {
        let t = target(database);
        let policy = PolicyStore::new(crate::policy::Policy {
            unlisted: crate::config::Unlisted::Deny,
            grants: vec![],
            masking: Default::default(),
        });
        let shared = Shared::default();
        let s = Session {
            target: &t,
            upstream: "127.0.0.1:5432".parse().unwrap(),
            agent: None,
            policy: &policy,
            shared: &shared,
            refusal: None,
            current_agent: &|| None,
            masker: None,
        };
        let params: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        check_startup(&s, &params)
    }

    #[test]
    fn a_query_that_does_not_parse_may_redefine_anything_and_copies_nothing() {
        let q = classify::classify("SELEC 1; PREPARE s AS SELECT 1");
        assert_eq!(query_effects(&q), (&[][..], true));
        let q = classify::classify("COPY t TO STDOUT; SELECT 1");
        let (copies, redefines) = query_effects(&q);
        assert_eq!((copies.len(), redefines), (1, false));
    }

    #[test]
    fn startup_parameters_that_change_privilege_or_mode_are_refused() {
        for bad in [
            ("options", "-c role=postgres"),
            ("options", "-c default_transaction_read_only=off"),
            ("replication", "database"),
            ("role", "postgres"),
            ("default_transaction_read_only", "off"),
            ("search_path", "evil"),
            ("session_authorization", "postgres"),
        ] {
            let e = check(Some("app"), &[("user", "x"), bad])
                .err()
                .unwrap_or_else(|| panic!("{bad:?} passed"));
            assert!(e.fatal && e.code == "42501", "{bad:?}: {e:?}");
        }
        for enc in [
            "SJIS",
            "big5",
            "GBK",
            "gb18030",
            "UHC",
            "johab",
            "Shift_JIS_2004",
        ] {
            let e = check(
                Some("app"),
                &[("database", "app"), ("client_encoding", enc)],
            )
            .err();
            assert_eq!(e.map(|e| e.code), Some("22023"), "{enc}");
        }
        for enc in ["UTF8", "utf-8", "SQL_ASCII", "LATIN1", "EUC_JP", "WIN1252"] {
            assert!(
                check(
                    Some("app"),
                    &[("database", "app"), ("client_encoding", enc)]
                )
                .is_ok(),
                "{enc}"
            );
        }
        let ok = check(
            Some("app"),
            &[
                ("user", "x"),
                ("database", "app"),
                ("application_name", "psql"),
                ("options", ""),
                ("replication", "false"),
            ],
        )
        .unwrap();
        assert_eq!(ok.database, "app");
        assert_eq!(
            ok.forward,
            [("application_name".to_string(), "psql".to_string())]
        );
    }

    #[test]
    fn database_must_be_the_one_the_target_serves() {
        assert_eq!(
            check(Some("app"), &[("user", "app")]).unwrap().database,
            "app"
        );
        assert_eq!(
            check(Some("app"), &[("user", "x")]).err().map(|e| e.code),
            Some("3D000")
        );
        assert_eq!(
            check(Some("app"), &[("database", "other")])
                .err()
                .map(|e| e.code),
            Some("3D000")
        );
        assert_eq!(
            check(None, &[("user", "u"), ("database", "d")])
                .unwrap()
                .database,
            "d"
        );
    }
}
