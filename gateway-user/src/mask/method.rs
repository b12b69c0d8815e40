//! The masking methods: what a found value becomes. Owns the replacement text and the keyed
//! token; must not decide what to mask.

use super::{kind::Kind, rules::Method};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// What a redacted value becomes, whatever its length (the length could identify it).
pub const REDACTED: &[u8] = b"****";

/// The daemon's 32-byte key for `token`. Same key and value, same token; the key never leaves
/// the daemon, so tokens cannot be reversed by a dictionary of likely values.
#[derive(Clone)]
pub struct TokenKey([u8; 32]);

impl TokenKey {
    pub fn from_bytes(key: [u8; 32]) -> TokenKey {
        TokenKey(key)
    }
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(<redacted>)")
    }
}

/// `text`, found as `kind`, rewritten by `method`.
pub(super) fn render(kind: Kind, text: &[u8], method: Method, key: &TokenKey) -> Vec<u8> {
    match method {
        Method::Redact => REDACTED.to_vec(),
        Method::Partial => partial(kind, text),
        Method::Token => token(kind, text, key),
        Method::Keep => text.to_vec(),
    }
}

fn partial(kind: Kind, text: &[u8]) -> Vec<u8> {
    match kind {
        Kind::Email => match memchr::memrchr(b'@', text) {
            // The first character, which may be more than one byte.
            Some(at) if at > 0 => [&text[..first_char_len(text)], b"***", &text[at..]].concat(),
            _ => REDACTED.to_vec(),
        },
        Kind::Card | Kind::Ssn | Kind::Phone | Kind::Iban => keep_last_four(text),
        Kind::Ipv4 => {
            let mut parts = text.split(|&b| b == b'.');
            let (a, b) = (
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
            );
            [a, b".", b, b".*.*"].concat()
        }
        Kind::GithubToken | Kind::GitlabToken | Kind::SlackToken | Kind::StripeKey => {
            // The vendor prefix says what leaked without leaking it: up to the last `_` or `-`
            // of the fixed prefix (ghp_, github_pat_, glpat-, xoxb-, sk_live_).
            let cut = text
                .iter()
                .take(11)
                .rposition(|&b| b == b'_' || b == b'-')
                .map_or(0, |i| i + 1);
            [&text[..cut], REDACTED].concat()
        }
        Kind::AwsAccessKey => [&text[..4], REDACTED].concat(),
        Kind::Column => column_partial(text),
        Kind::Ipv6 | Kind::Jwt | Kind::AwsSecretKey => REDACTED.to_vec(),
        Kind::PrivateKey | Kind::UrlPassword | Kind::PasswordHash | Kind::Secret => {
            REDACTED.to_vec()
        }
    }
}

fn first_char_len(text: &[u8]) -> usize {
    let n = text.len().min(4);
    (1..=n)
        .find(|&i| std::str::from_utf8(&text[..i]).is_ok())
        .unwrap_or(1)
}

/// Every letter and digit but the last four becomes `*`; separators stay.
fn keep_last_four(text: &[u8]) -> Vec<u8> {
    let total = text.iter().filter(|b| b.is_ascii_alphanumeric()).count();
    let mut seen = 0;
    text.iter()
        .map(|&b| {
            if !b.is_ascii_alphanumeric() {
                return b;
            }
            seen += 1;
            if seen + 4 > total { b } else { b'*' }
        })
        .collect()
}

/// A whole value no detector recognised: its first character and `***`.
fn column_partial(text: &[u8]) -> Vec<u8> {
    match std::str::from_utf8(text)
        .ok()
        .and_then(|s| s.chars().next())
    {
        Some(c) if !c.is_whitespace() => format!("{c}***").into_bytes(),
        _ => REDACTED.to_vec(),
    }
}

/// The form tokens are computed over, so that the same value written differently (card digits
/// with or without spaces, an email in another case) gets the same token.
pub(super) fn normalized(kind: Kind, text: &[u8]) -> Vec<u8> {
    match kind {
        Kind::Card | Kind::Ssn | Kind::Phone => {
            text.iter().copied().filter(u8::is_ascii_digit).collect()
        }
        Kind::Iban => text
            .iter()
            .filter(|b| b.is_ascii_alphanumeric())
            .map(u8::to_ascii_uppercase)
            .collect(),
        Kind::Email => text.to_ascii_lowercase(),
        _ => text.to_vec(),
    }
}

fn token(kind: Kind, text: &[u8], key: &TokenKey) -> Vec<u8> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&key.0).expect("any key length");
    mac.update(&normalized(kind, text));
    let digest = mac.finalize().into_bytes();
    let mut out = b"tok_".to_vec();
    out.extend_from_slice(data_encoding::HEXLOWER.encode(&digest[..8]).as_bytes());
    if kind == Kind::Email
        && let Some(at) = memchr::memrchr(b'@', text)
    {
        out.extend_from_slice(&text[at..].to_ascii_lowercase());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(kind: Kind, text: &str) -> String {
        String::from_utf8(partial(kind, text.as_bytes())).unwrap()
    }

    #[test]
    fn partial_keeps_little() {
        assert_eq!(p(Kind::Email, "jane.doe@example.com"), "j***@example.com");
        assert_eq!(p(Kind::Card, "4111 1111 1111 1234"), "**** **** **** 1234");
        assert_eq!(p(Kind::Ssn, "123-45-6789"), "***-**-6789");
        assert_eq!(p(Kind::Phone, "(415) 555-0132"), "(***) ***-0132");
        assert_eq!(p(Kind::Ipv4, "10.1.2.3"), "10.1.*.*");
        assert_eq!(p(Kind::GithubToken, "ghp_abcdefabcdef"), "ghp_****");
        assert_eq!(
            p(Kind::GithubToken, "github_pat_11ABC_def"),
            "github_pat_****"
        );
        assert_eq!(p(Kind::StripeKey, "sk_live_abcdef"), "sk_live_****");
        assert_eq!(p(Kind::AwsAccessKey, "AKIAIOSFODNN7EXAMPLE"), "AKIA****");
        assert_eq!(p(Kind::Column, "Jane Doe"), "J***");
        assert_eq!(p(Kind::Jwt, "eyJ.x.y"), "****");
    }

    #[test]
    fn tokens_are_keyed_and_stable() {
        let k1 = TokenKey::from_bytes([1; 32]);
        let k2 = TokenKey::from_bytes([2; 32]);
        let t =
            |k: &TokenKey, kind, v: &str| String::from_utf8(token(kind, v.as_bytes(), k)).unwrap();
        let a = t(&k1, Kind::Card, "4111 1111 1111 1111");
        assert_eq!(a, t(&k1, Kind::Card, "4111-1111-1111-1111"));
        assert_ne!(a, t(&k2, Kind::Card, "4111 1111 1111 1111"));
        assert!(a.starts_with("tok_") && a.len() == 20, "{a}");
        let e = t(&k1, Kind::Email, "Jane@Example.com");
        assert!(e.ends_with("@example.com"), "{e}");
        assert_eq!(e, t(&k1, Kind::Email, "jane@example.com"));
        assert_eq!(format!("{k1:?}"), "TokenKey(<redacted>)");
    }
}
