//! `chaperone run --login`: an OIDC device-code login (RFC 8628, with openidconnect) for the
//! person starting the agent, and the refreshes that keep a long-running agent's identity
//! current. The device flow suits agents started from a terminal without a browser: the CLI
//! shows a URL and a code, the person approves it anywhere, the CLI gets the ID token.
//!
//! The client is the configuration's `oidc.audience` (or `oidc.login_client_id`) as a public
//! client: the ID tokens it gets are for the audience the daemon checks.

use crate::identity::oidc::{OidcConfig, error_chain, http_client};
use anyhow::{Context as _, anyhow};
use openidconnect::{
    AdditionalProviderMetadata, AuthType, ClientId, DeviceAuthorizationUrl, IssuerUrl, Nonce,
    OAuth2TokenResponse as _, ProviderMetadata, RefreshToken, Scope,
    core::{
        CoreAuthDisplay, CoreClaimName, CoreClaimType, CoreClient, CoreClientAuthMethod,
        CoreDeviceAuthorizationResponse, CoreGrantType, CoreIdToken, CoreIdTokenVerifier,
        CoreJsonWebKey, CoreJweContentEncryptionAlgorithm, CoreJweKeyManagementAlgorithm,
        CoreResponseMode, CoreResponseType, CoreSubjectIdentifierType, CoreTokenResponse,
    },
    reqwest,
};
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime};

/// The one discovery field the core metadata type lacks.
#[derive(Clone, Debug, Deserialize, Serialize)]
struct DeviceEndpoint {
    device_authorization_endpoint: Option<DeviceAuthorizationUrl>,
}
impl AdditionalProviderMetadata for DeviceEndpoint {}

type Metadata = ProviderMetadata<
    DeviceEndpoint,
    CoreAuthDisplay,
    CoreClientAuthMethod,
    CoreClaimName,
    CoreClaimType,
    CoreGrantType,
    CoreJweContentEncryptionAlgorithm,
    CoreJweKeyManagementAlgorithm,
    CoreJsonWebKey,
    CoreResponseMode,
    CoreResponseType,
    CoreSubjectIdentifierType,
>;

/// What a login or a refresh gives.
pub struct Tokens {
    pub id_token: String,
    pub refresh_token: Option<RefreshToken>,
    /// The ID token's expiry (read, not verified: the daemon verifies; this only schedules the
    /// next refresh).
    pub expires_at: SystemTime,
}

impl Tokens {
    /// When to refresh: a fifth of the token's remaining life before it ends (at most a minute,
    /// at least a second), so the new token is in place before new connections need it.
    pub fn refresh_at(&self) -> SystemTime {
        let left = self
            .expires_at
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let margin = (left / 5).clamp(Duration::from_secs(1), Duration::from_secs(60));
        self.expires_at - margin.min(left)
    }
}

/// A logged-in OIDC client, with its own small runtime (the CLI is otherwise synchronous).
pub struct Login {
    runtime: tokio::runtime::Runtime,
    http: reqwest::Client,
    metadata: Metadata,
    client_id: ClientId,
}

impl Login {
    pub fn discover(config: &OidcConfig) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let http = http_client(config)?;
        let issuer = IssuerUrl::new(config.issuer.clone())?;
        let metadata = runtime
            .block_on(Metadata::discover_async(issuer, &http))
            .map_err(|e| anyhow!("discovering {}: {}", config.issuer, error_chain(&e)))?;
        Ok(Self {
            runtime,
            http,
            metadata,
            client_id: ClientId::new(
                config
                    .login_client_id
                    .clone()
                    .unwrap_or_else(|| config.audience.clone()),
            ),
        })
    }

    /// The device-code login: print where to go and what to enter (stderr), wait for approval.
    pub fn device_login(&self) -> anyhow::Result<Tokens> {
        let url = self
            .metadata
            .additional_metadata()
            .device_authorization_endpoint
            .clone()
            .ok_or_else(|| {
                anyhow!("the issuer offers no device login (no device_authorization_endpoint)")
            })?;
        let client =
            CoreClient::from_provider_metadata(self.metadata.clone(), self.client_id.clone(), None)
                .set_auth_type(AuthType::RequestBody)
                .set_device_authorization_url(url);
        self.runtime.block_on(async {
            let details: CoreDeviceAuthorizationResponse = client
                .exchange_device_code()
                .add_scopes(["email", "groups", "offline_access"].map(|s| Scope::new(s.into())))
                .request_async(&self.http)
                .await
                .map_err(|e| anyhow!("starting the device login: {}", error_chain(&e)))?;
            // The issuer's strings go to a terminal: no control characters from it.
            eprintln!(
                "chaperone: to start this agent, open {} and enter the code {}",
                printable(details.verification_uri().as_str()),
                printable(details.user_code().secret())
            );
            if let Some(complete) = details.verification_uri_complete() {
                eprintln!("chaperone: (or open {})", printable(complete.secret()));
            }
            let response = client
                .exchange_device_access_token(&details)?
                .request_async(&self.http, tokio::time::sleep, None)
                .await
                .map_err(|e| anyhow!("waiting for the device login: {}", error_chain(&e)))?;
            tokens(response)
        })
    }

    /// Trade `refresh` for a fresh ID token.
    pub fn refresh(&self, refresh: &RefreshToken) -> anyhow::Result<Tokens> {
        // A public client: the client id goes in the request body.
        let client =
            CoreClient::from_provider_metadata(self.metadata.clone(), self.client_id.clone(), None)
                .set_auth_type(AuthType::RequestBody);
        self.runtime.block_on(async {
            let response = client
                .exchange_refresh_token(refresh)?
                .request_async(&self.http)
                .await
                .map_err(|e| anyhow!("refreshing the ID token: {}", error_chain(&e)))?;
            tokens(response)
        })
    }
}

fn printable(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).collect()
}

fn tokens(response: CoreTokenResponse) -> anyhow::Result<Tokens> {
    let id_token: &CoreIdToken = response
        .extra_fields()
        .id_token()
        .context("the issuer sent no ID token (is `openid` allowed for this client?)")?;
    // Only to learn the expiry for scheduling; the daemon does the verifying.
    let claims = id_token
        .claims(
            &CoreIdTokenVerifier::new_insecure_without_verification(),
            |_: Option<&Nonce>| Ok(()),
        )
        .map_err(|e| anyhow!("the new ID token: {e}"))?;
    Ok(Tokens {
        id_token: id_token.to_string(),
        refresh_token: response.refresh_token().cloned(),
        expires_at: SystemTime::from(claims.expiration()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refreshes_well_before_expiry() {
        let now = SystemTime::now();
        let t = |secs| Tokens {
            id_token: String::new(),
            refresh_token: None,
            expires_at: now + Duration::from_secs(secs),
        };
        let at = |secs| {
            t(secs)
                .refresh_at()
                .duration_since(now)
                .unwrap()
                .as_secs_f64()
        };
        assert!((3.5..=5.1).contains(&at(6)), "{}", at(6));
        assert!((3539.0..=3541.0).contains(&at(3600)), "{}", at(3600));
        assert!(t(0).refresh_at() <= now + Duration::from_millis(10));
    }
}
