//! Refusals in the client's language: ErrorResponses with real SQLSTATEs, built by named
//! constructors. Internal error text never reaches the agent; the daemon log has it.

use super::codec;
use bytes::BytesMut;

/// An error the proxy itself reports to the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgError {
    pub fatal: bool,
    pub code: &'static str,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl PgError {
    /// A statement policy refused: 42501 insufficient_privilege; the session goes on.
    pub fn denied(rule: &str, detail: String) -> Self {
        Self {
            fatal: false,
            code: "42501",
            message: format!("chaperone: statement denied by policy ({rule})"),
            detail: Some(detail),
            hint: Some("ask an operator for a grant that covers it".into()),
        }
    }

    /// A startup the proxy will not accept (a parameter that changes privilege or mode, a
    /// database the target does not serve): the session ends.
    pub fn startup_refused(code: &'static str, message: String) -> Self {
        Self {
            fatal: true,
            code,
            message: format!("chaperone: {message}"),
            detail: None,
            hint: None,
        }
    }

    /// Bytes that are not the protocol: 08P01, session ends.
    pub fn protocol_violation(what: &str) -> Self {
        Self::startup_refused("08P01", format!("protocol violation: {what}"))
    }

    /// The upstream could not be reached or refused our login: 08006, session ends.
    pub fn upstream_unavailable(target: &str) -> Self {
        Self {
            fatal: true,
            code: "08006",
            message: format!("chaperone: target `{target}` is unavailable"),
            detail: None,
            hint: Some("the daemon log has the cause".into()),
        }
    }

    /// A result the proxy cannot mask, withheld: 0A000 feature_not_supported; the session goes on.
    pub fn unmaskable(what: &str) -> Self {
        Self {
            fatal: false,
            code: "0A000",
            message: format!("chaperone: {what}"),
            detail: None,
            hint: None,
        }
    }

    pub fn encode(&self, buf: &mut BytesMut) {
        let severity = if self.fatal { "FATAL" } else { "ERROR" };
        let mut fields: Vec<(u8, &str)> = vec![
            (b'S', severity),
            (b'V', severity),
            (b'C', self.code),
            (b'M', &self.message),
        ];
        if let Some(d) = &self.detail {
            fields.push((b'D', d));
        }
        if let Some(h) = &self.hint {
            fields.push((b'H', h));
        }
        codec::error_fields(buf, b'E', &fields);
    }
}
