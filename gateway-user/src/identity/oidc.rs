//! OIDC ID token verification: who vouched for an agent.
//!
//! Owns the issuer's discovery document and key set (fetched lazily with `openidconnect`, so a
//! daemon starts while the issuer is down) and checks a token's signature, issuer, audience,
//! expiry, not-before and algorithm. A token signed with a key the cached set lacks makes it
//! fetch the set again (key rotation), at most once per `jwks_refetch_secs` (default 10), so
//! forged tokens with made-up key ids cannot make the daemon hammer the issuer.
//!
//! It decides nothing about access: it returns [`Vouched`] claims, which the control socket
//! binds to the agent's cgroup and policy matches grants against.
//!
//! ```yaml
//! oidc:
//!   issuer: https://login.example.com
//!   audience: chaperone            # the client id tokens must be issued to
//!   algorithms: [RS256, ES256]     # default: the asymmetric ones; never HS* or none
//!   groups_claim: groups
//!   ca_file: /etc/chaperone/issuer-ca.pem   # optional, for a private CA
//!   login_client_id: chaperone     # optional: the client `chaperone run --login` uses
//!   jwks_refetch_secs: 10          # at most one unknown-key refetch per this
//!   jwks_max_age_secs: 3600        # keys are fetched again after this (withdrawn keys stop)
//! ```

use super::Vouched;
use openidconnect::{
    AdditionalClaims, ClientId, IdToken, IdTokenVerifier, IssuerUrl, SignatureVerificationError,
    core::{
        CoreGenderClaim, CoreJsonWebKey, CoreJweContentEncryptionAlgorithm,
        CoreJwsSigningAlgorithm, CoreProviderMetadata,
    },
    reqwest,
};
use serde::{Deserialize, Serialize};
use std::{
    collections::HashMap,
    path::PathBuf,
    time::{Duration, Instant},
};
use tokio::sync::Mutex;

/// How long one request to the issuer may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Clock skew tolerated on `nbf`.
const NBF_LEEWAY_SECS: i64 = 60;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// The issuer URL, exactly as tokens' `iss` claim says it.
    pub issuer: String,
    /// The client id ID tokens must be issued to (their `aud`).
    pub audience: String,
    /// Signature algorithms accepted. Symmetric ones (HS*) are refused: the daemon holds no
    /// client secret, and a shared secret would let its holder mint tokens.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<CoreJwsSigningAlgorithm>,
    /// The claim holding the agent's groups (a list of strings).
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// Extra CA certificates (PEM) to trust for the issuer's HTTPS.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Refuse `chaperone run` without a token, even from root (default true).
    #[serde(default = "default_true")]
    pub require_token: bool,
    /// The public client `chaperone run --login` uses for the device login (default: the
    /// audience, so the tokens it gets are for the daemon).
    #[serde(default)]
    pub login_client_id: Option<String>,
    /// Minimum seconds between two key-set fetches triggered by tokens with unknown keys.
    #[serde(default = "default_jwks_refetch_secs")]
    pub jwks_refetch_secs: u64,
    /// Seconds fetched keys are trusted before the set is fetched again (default 3600): a key
    /// the issuer withdrew stops verifying tokens within this.
    #[serde(default = "default_jwks_max_age_secs")]
    pub jwks_max_age_secs: u64,
}

fn default_jwks_refetch_secs() -> u64 {
    10
}

fn default_jwks_max_age_secs() -> u64 {
    3600
}

fn default_algorithms() -> Vec<CoreJwsSigningAlgorithm> {
    use CoreJwsSigningAlgorithm::*;
    vec![
        RsaSsaPkcs1V15Sha256,
        RsaSsaPkcs1V15Sha384,
        RsaSsaPkcs1V15Sha512,
        RsaSsaPssSha256,
        RsaSsaPssSha384,
        RsaSsaPssSha512,
        EcdsaP256Sha256,
        EcdsaP384Sha384,
        EdDsa,
    ]
}
fn default_groups_claim() -> String {
    "groups".into()
}
fn default_true() -> bool {
    true
}

impl OidcConfig {
    /// Checks a configuration can be used; the message says what to change.
    pub fn validate(&self) -> Result<(), String> {
        IssuerUrl::new(self.issuer.clone())
            .map_err(|e| format!("oidc.issuer `{}` is not a URL: {e}", self.issuer))?;
        if self.audience.is_empty() {
            return Err("oidc.audience must name the client id tokens are issued to".into());
        }
        if self.algorithms.is_empty() {
            return Err("oidc.algorithms must list at least one algorithm".into());
        }
        for a in &self.algorithms {
            use CoreJwsSigningAlgorithm::*;
            if matches!(a, HmacSha256 | HmacSha384 | HmacSha512 | None) {
                return Err(format!(
                    "oidc.algorithms: {a:?} is not accepted (symmetric or unsigned tokens can be minted by anyone holding the secret)"
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("the token is not a JWT ID token: {0}")]
    Malformed(String),
    #[error("the token was rejected: {0}")]
    Rejected(String),
    #[error("the token is not valid before {0}")]
    NotYetValid(String),
    #[error("cannot reach the OIDC issuer {issuer}: {message}")]
    Issuer { issuer: String, message: String },
    #[error("oidc.ca_file {path}: {message}")]
    CaFile { path: PathBuf, message: String },
}

/// Claims beyond the standard ones: every other field, so the groups claim can be configured.
#[derive(Debug, Clone, Deserialize, Serialize)]
struct Extra {
    #[serde(default)]
    nbf: Option<i64>,
    #[serde(flatten)]
    other: HashMap<String, serde_json::Value>,
}
impl AdditionalClaims for Extra {}

type Token =
    IdToken<Extra, CoreGenderClaim, CoreJweContentEncryptionAlgorithm, CoreJwsSigningAlgorithm>;

/// Which kind of JWT is expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenKind {
    /// An OpenID Connect ID token (`typ` JWT or absent).
    Id,
    /// An OAuth 2.0 JWT access token (RFC 9068, `typ` at+jwt).
    Access,
}

/// The keys in use and the last failure to fetch them.
#[derive(Default)]
struct KeyState {
    keys: Option<Keys>,
    failed: Option<(Instant, String)>,
}

impl KeyState {
    fn may_fetch(&self, interval: Duration) -> bool {
        self.failed
            .as_ref()
            .is_none_or(|(at, _)| at.elapsed() >= interval)
    }
}

/// The issuer's key set and when it was fetched.
struct Keys {
    metadata: CoreProviderMetadata,
    fetched: Instant,
}

/// Verifies ID tokens of one issuer for one audience.
pub struct Verifier {
    config: OidcConfig,
    issuer: IssuerUrl,
    http: reqwest::Client,
    keys: Mutex<KeyState>,
}

impl Verifier {
    pub fn new(config: OidcConfig) -> Result<Self, OidcError> {
        let issuer = IssuerUrl::new(config.issuer.clone()).map_err(|e| OidcError::Issuer {
            issuer: config.issuer.clone(),
            message: e.to_string(),
        })?;
        let http = http_client(&config)?;
        Ok(Self {
            config,
            issuer,
            http,
            keys: Mutex::new(KeyState::default()),
        })
    }

    pub fn config(&self) -> &OidcConfig {
        &self.config
    }

    /// Verify an ID token and return what it vouches for.
    pub async fn verify(&self, token: &str) -> Result<Vouched, OidcError> {
        self.verify_as(token, TokenKind::Id).await
    }

    /// Get a client-credentials access token for a service agent (`client_id`, `secret`) and
    /// verify it: a JWT access token (RFC 9068, `typ: at+jwt`) for this audience, whose groups
    /// claim gives the service's groups.
    pub async fn service_token(
        &self,
        client_id: &str,
        secret: &str,
        scopes: &[String],
    ) -> Result<Vouched, OidcError> {
        use openidconnect::{ClientSecret, OAuth2TokenResponse as _, Scope, core::CoreClient};
        let metadata = {
            let mut state = self.keys.lock().await;
            self.current_keys(&mut state).await?.metadata.clone()
        };
        let issuer_err = |message: String| OidcError::Issuer {
            issuer: self.config.issuer.clone(),
            message,
        };
        let client = CoreClient::from_provider_metadata(
            metadata,
            ClientId::new(client_id.to_string()),
            Some(ClientSecret::new(secret.to_string())),
        );
        let response = client
            .exchange_client_credentials()
            .map_err(|e| issuer_err(e.to_string()))?
            .add_scopes(scopes.iter().map(|s| Scope::new(s.clone())))
            .request_async(&self.http)
            .await
            .map_err(|e| {
                issuer_err(format!(
                    "client credentials for {client_id}: {}",
                    error_chain(&e)
                ))
            })?;
        self.verify_as(response.access_token().secret(), TokenKind::Access)
            .await
    }

    async fn verify_as(&self, token: &str, kind: TokenKind) -> Result<Vouched, OidcError> {
        let token: Token = token
            .trim()
            .parse()
            .map_err(|e: serde_json::Error| OidcError::Malformed(e.to_string()))?;
        let mut state = self.keys.lock().await;
        let first = self.check(&token, self.current_keys(&mut state).await?, kind);
        let outcome = match first {
            Err(openidconnect::ClaimsVerificationError::SignatureVerification(
                SignatureVerificationError::NoMatchingKey,
            )) if state
                .keys
                .as_ref()
                .is_some_and(|k| k.fetched.elapsed() >= self.refetch())
                && state.may_fetch(self.refetch()) =>
            {
                // Maybe the issuer rotated its keys: fetch them again, once.
                tracing::info!(issuer = %self.config.issuer, "token signed with an unknown key; fetching the issuer's keys again");
                self.fetch_into(&mut state).await;
                let keys = state.keys.as_ref().expect("kept on failure");
                self.check(&token, keys, kind)
            }
            other => other,
        };
        drop(state);
        let claims = outcome.map_err(|e| OidcError::Rejected(error_chain(&e)))?;
        let now = chrono::Utc::now().timestamp();
        if let Some(nbf) = claims.additional_claims().nbf
            && nbf > now + NBF_LEEWAY_SECS
        {
            return Err(OidcError::NotYetValid(
                chrono::DateTime::from_timestamp(nbf, 0)
                    .map_or(nbf.to_string(), |t| t.to_rfc3339()),
            ));
        }
        let groups = match claims
            .additional_claims()
            .other
            .get(&self.config.groups_claim)
        {
            None => Vec::new(),
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str().map(str::to_string).ok_or_else(|| {
                        OidcError::Rejected(format!(
                            "claim `{}` must be a list of strings",
                            self.config.groups_claim
                        ))
                    })
                })
                .collect::<Result<_, _>>()?,
            Some(serde_json::Value::String(one)) => vec![one.clone()],
            Some(_) => {
                return Err(OidcError::Rejected(format!(
                    "claim `{}` must be a list of strings",
                    self.config.groups_claim
                )));
            }
        };
        // An email counts only once the issuer has verified it: anyone can type any address
        // into a profile, and grants may name agents by email.
        let email = claims
            .email()
            .filter(|_| claims.email_verified() == Some(true))
            .map(|e| e.as_str().to_string());
        Ok(Vouched {
            issuer: claims.issuer().as_str().to_string(),
            subject: claims.subject().as_str().to_string(),
            email,
            groups,
            expires_at_ms: u64::try_from(claims.expiration().timestamp_millis()).unwrap_or(0),
        })
    }

    fn check<'t>(
        &self,
        token: &'t Token,
        keys: &Keys,
        kind: TokenKind,
    ) -> Result<
        &'t openidconnect::IdTokenClaims<Extra, CoreGenderClaim>,
        openidconnect::ClaimsVerificationError,
    > {
        let verifier: IdTokenVerifier<CoreJsonWebKey> = IdTokenVerifier::new_public_client(
            ClientId::new(self.config.audience.clone()),
            self.issuer.clone(),
            keys.metadata.jwks().clone(),
        )
        .set_allowed_algs(self.config.algorithms.iter().cloned())
        // A token for us and someone else is a token someone else may replay here.
        .set_other_audience_verifier_fn(|_| false);
        // Each kind only as itself: an access token must never pass as an ID token (its
        // holder is whoever it was handed to, not the subject it names), nor the reverse.
        let verifier = match kind {
            TokenKind::Id => verifier,
            TokenKind::Access => {
                verifier.set_allowed_jose_types([openidconnect::JsonWebTokenType::new(
                    "at+jwt".into(),
                )
                .normalize()
                .expect("a valid media type")])
            }
        };
        // No nonce: the daemon did not start the login; the token is bound by audience.
        token.claims(&verifier, |_: Option<&openidconnect::Nonce>| Ok(()))
    }

    fn refetch(&self) -> Duration {
        Duration::from_secs(self.config.jwks_refetch_secs)
    }

    /// The keys to check with: fetched when there are none yet or they are older than
    /// `jwks_max_age_secs` (a key the issuer withdrew must stop being trusted), but never more
    /// often than `jwks_refetch_secs` after a failure, so an unreachable issuer does not make
    /// every request wait on it. Old keys are kept when a refresh fails.
    async fn current_keys<'s>(&self, state: &'s mut KeyState) -> Result<&'s Keys, OidcError> {
        let stale = state
            .keys
            .as_ref()
            .is_none_or(|k| k.fetched.elapsed().as_secs() >= self.config.jwks_max_age_secs);
        if stale && state.may_fetch(self.refetch()) {
            self.fetch_into(state).await;
        }
        match (&state.keys, &state.failed) {
            (Some(k), _) => Ok(k),
            (None, Some((_, message))) => Err(OidcError::Issuer {
                issuer: self.config.issuer.clone(),
                message: format!("{message} (next attempt within {:?})", self.refetch()),
            }),
            (None, None) => unreachable!("a fetch either succeeds or records its failure"),
        }
    }

    async fn fetch_into(&self, state: &mut KeyState) {
        match self.discover().await {
            Ok(k) => {
                state.keys = Some(k);
                state.failed = None;
            }
            Err(e) => {
                let message = match &e {
                    OidcError::Issuer { message, .. } => message.clone(),
                    other => other.to_string(),
                };
                tracing::warn!(issuer = %self.config.issuer, error = %message, "cannot fetch the issuer's keys");
                state.failed = Some((Instant::now(), message));
            }
        }
    }

    async fn discover(&self) -> Result<Keys, OidcError> {
        let metadata = CoreProviderMetadata::discover_async(self.issuer.clone(), &self.http)
            .await
            .map_err(|e| OidcError::Issuer {
                issuer: self.config.issuer.clone(),
                message: error_chain(&e),
            })?;
        Ok(Keys {
            metadata,
            fetched: Instant::now(),
        })
    }
}

/// The HTTP client for talking to the issuer. No redirects: its documents must come from where
/// it says (openidconnect's advice against SSRF); no proxy variables from the environment; the
/// configured CA file trusted on top of the web roots.
pub fn http_client(config: &OidcConfig) -> Result<reqwest::Client, OidcError> {
    let mut http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(HTTP_TIMEOUT);
    if let Some(path) = &config.ca_file {
        let ca_err = |message: String| OidcError::CaFile {
            path: path.clone(),
            message,
        };
        let pem = std::fs::read(path).map_err(|e| ca_err(e.to_string()))?;
        for cert in
            reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| ca_err(e.to_string()))?
        {
            http = http.add_root_certificate(cert);
        }
    }
    http.build().map_err(|e| OidcError::Issuer {
        issuer: config.issuer.clone(),
        message: e.to_string(),
    })
}

/// An error with its causes, for a log line that says what actually failed.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> Result<OidcConfig, String> {
        let c: OidcConfig = serde_yaml::from_str(&format!(
            "{{issuer: 'https://id.example', audience: chaperone{extra}}}"
        ))
        .map_err(|e| e.to_string())?;
        c.validate().map(|()| c)
    }

    #[test]
    fn config_defaults_and_refusals() {
        let c = cfg("").unwrap();
        assert!(c.require_token);
        assert_eq!(c.groups_claim, "groups");
        assert!(
            c.algorithms
                .contains(&CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256)
        );
        assert!(cfg(", algorithms: [ES256]").is_ok());
        assert!(
            cfg(", algorithms: [HS256]")
                .unwrap_err()
                .contains("not accepted")
        );
        assert!(cfg(", algorithms: []").is_err());
        assert!(cfg(", audience2: x").unwrap_err().contains("unknown field"));
    }

    #[tokio::test]
    async fn malformed_tokens_are_refused_before_any_fetch() {
        // The issuer is unreachable: a malformed token must fail on its own, not on the issuer.
        let v = Verifier::new(cfg("").unwrap()).unwrap();
        for bad in ["", "not a jwt", "a.b.c"] {
            let e = v.verify(bad).await.unwrap_err();
            assert!(matches!(e, OidcError::Malformed(_)), "{bad}: {e}");
        }
    }
}
