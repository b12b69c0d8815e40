//! What a finding is: the detector kinds, a small set of them, and the hints a column or JSON key
//! name gives. Owns naming only; detection lives in `detect`.

use serde::{Deserialize, Serialize};

/// The kind of a sensitive value. Serialized in snake_case (`aws_access_key`), as in rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Email,
    /// Payment card number (PAN): issuer prefix and length per brand, Luhn.
    Card,
    /// US social security number.
    Ssn,
    Iban,
    Phone,
    Ipv4,
    Ipv6,
    Jwt,
    AwsAccessKey,
    AwsSecretKey,
    GithubToken,
    GitlabToken,
    SlackToken,
    StripeKey,
    /// A PEM `-----BEGIN … PRIVATE KEY-----` block.
    PrivateKey,
    /// The password of `scheme://user:password@host`.
    UrlPassword,
    /// bcrypt, argon2 or scrypt password hashes.
    PasswordHash,
    /// A value no other detector knows, alone in a column or JSON key named like a secret
    /// (`password`, `client_secret`, `api_key`, `token`): one word of 8 to 512 bytes.
    Secret,
    /// Not a detector: a column rule masked the whole value and no detector recognised it.
    #[serde(skip_deserializing)]
    Column,
}

impl Kind {
    /// Every detector kind (all but `Column`).
    pub const DETECTORS: [Kind; 18] = [
        Kind::Email,
        Kind::Card,
        Kind::Ssn,
        Kind::Iban,
        Kind::Phone,
        Kind::Ipv4,
        Kind::Ipv6,
        Kind::Jwt,
        Kind::AwsAccessKey,
        Kind::AwsSecretKey,
        Kind::GithubToken,
        Kind::GitlabToken,
        Kind::SlackToken,
        Kind::StripeKey,
        Kind::PrivateKey,
        Kind::UrlPassword,
        Kind::PasswordHash,
        Kind::Secret,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Email => "email",
            Kind::Card => "card",
            Kind::Ssn => "ssn",
            Kind::Iban => "iban",
            Kind::Phone => "phone",
            Kind::Ipv4 => "ipv4",
            Kind::Ipv6 => "ipv6",
            Kind::Jwt => "jwt",
            Kind::AwsAccessKey => "aws_access_key",
            Kind::AwsSecretKey => "aws_secret_key",
            Kind::GithubToken => "github_token",
            Kind::GitlabToken => "gitlab_token",
            Kind::SlackToken => "slack_token",
            Kind::StripeKey => "stripe_key",
            Kind::PrivateKey => "private_key",
            Kind::UrlPassword => "url_password",
            Kind::PasswordHash => "password_hash",
            Kind::Secret => "secret",
            Kind::Column => "column",
        }
    }

    /// The detector kind named `name` (as written in rules).
    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::DETECTORS.into_iter().find(|k| k.as_str() == name)
    }

    /// When two findings overlap, the lower rank wins: the more specific, stronger evidence.
    /// A PEM block holds base64 that looks like tokens; a URL's `pass@host` looks like an email;
    /// an IBAN's digits can pass for a card.
    pub(super) fn rank(self) -> u8 {
        match self {
            Kind::PrivateKey => 0,
            Kind::Jwt => 1,
            Kind::UrlPassword => 2,
            Kind::PasswordHash => 3,
            Kind::GithubToken
            | Kind::GitlabToken
            | Kind::SlackToken
            | Kind::StripeKey
            | Kind::AwsAccessKey => 4,
            Kind::AwsSecretKey => 5,
            Kind::Email => 6,
            Kind::Iban => 7,
            Kind::Card => 8,
            Kind::Ssn => 9,
            Kind::Phone => 10,
            Kind::Ipv6 => 11,
            Kind::Ipv4 => 12,
            Kind::Secret => 13,
            Kind::Column => 14,
        }
    }

    fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// A set of kinds, as a bit set: hints are computed per column and checked per value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct KindSet(u32);

impl KindSet {
    pub(super) const EMPTY: KindSet = KindSet(0);

    pub(super) fn of(kinds: &[Kind]) -> KindSet {
        KindSet(kinds.iter().fold(0, |acc, k| acc | k.bit()))
    }
    pub(super) fn has(self, k: Kind) -> bool {
        self.0 & k.bit() != 0
    }
    pub(super) fn is_empty(self) -> bool {
        self.0 == 0
    }
    pub(super) fn union(self, other: KindSet) -> KindSet {
        KindSet(self.0 | other.0)
    }
}

/// Name words that say what a column or JSON key holds. A word of the name (split at anything
/// not alphanumeric) that starts or ends with one of these hints at the kind: `user_email`,
/// `workphone`, `telephone`; `hotel` and `cancelled` do not.
const HINT_WORDS: &[(&str, &[Kind])] = &[
    ("email", &[Kind::Email]),
    ("mail", &[Kind::Email]),
    ("phone", &[Kind::Phone]),
    ("mobile", &[Kind::Phone]),
    ("tel", &[Kind::Phone]),
    ("fax", &[Kind::Phone]),
    ("cell", &[Kind::Phone]),
    ("msisdn", &[Kind::Phone]),
    ("ssn", &[Kind::Ssn]),
    ("social", &[Kind::Ssn]),
    ("card", &[Kind::Card]),
    ("pan", &[Kind::Card]),
    ("cc", &[Kind::Card]),
    ("iban", &[Kind::Iban]),
    ("secret", &[Kind::AwsSecretKey, Kind::Secret]),
    ("token", &[Kind::AwsSecretKey, Kind::Secret]),
    ("key", &[Kind::AwsSecretKey]),
    ("apikey", &[Kind::AwsSecretKey, Kind::Secret]),
    ("password", &[Kind::AwsSecretKey, Kind::Secret]),
    ("passwd", &[Kind::AwsSecretKey, Kind::Secret]),
    ("pwd", &[Kind::AwsSecretKey, Kind::Secret]),
    ("credential", &[Kind::AwsSecretKey, Kind::Secret]),
    ("credentials", &[Kind::AwsSecretKey, Kind::Secret]),
];

/// The kinds a column or key name hints at (ASCII case-insensitive).
pub(super) fn hints_of(name: &str) -> KindSet {
    // Lower case with `_` for every separator, so `API-Key` reads like `api_key`; on the stack,
    // since `Masker::mask` resolves a column per call. Longer names keep their first 128 bytes.
    let mut buf = [0u8; 128];
    let n = name.len().min(buf.len());
    for (d, s) in buf.iter_mut().zip(name.bytes()) {
        *d = if s.is_ascii_alphanumeric() {
            s.to_ascii_lowercase()
        } else {
            b'_'
        };
    }
    let norm = &buf[..n];
    let mut set = KindSet::EMPTY;
    // Two-word names whose words alone say little (`api`, `key`).
    if [&b"api_key"[..], b"private_key", b"access_key"]
        .iter()
        .any(|k| memchr::memmem::find(norm, k).is_some())
    {
        set = KindSet::of(&[Kind::AwsSecretKey, Kind::Secret]);
    }
    for word in norm.split(|&b| b == b'_').filter(|w| w.len() >= 2) {
        for (w, kinds) in HINT_WORDS {
            let w = w.as_bytes();
            // Short words must be the whole word: `cc` in `access` or `pan` in `company` is
            // not a hint.
            let hit = if w.len() <= 3 {
                word == w
            } else {
                word.starts_with(w) || word.ends_with(w)
            };
            if hit {
                set = set.union(KindSet::of(kinds));
            }
        }
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_hint_at_kinds() {
        for (name, kind, want) in [
            ("user_email", Kind::Email, true),
            ("EmailAddress", Kind::Email, true),
            ("telephone", Kind::Phone, true),
            ("hotel", Kind::Phone, false),
            ("cancelled", Kind::Phone, false),
            ("workPhone", Kind::Phone, true),
            ("customer.ssn", Kind::Ssn, true),
            ("access_count", Kind::Card, false),
            ("cc_number", Kind::Card, true),
            ("aws_secret_access_key", Kind::AwsSecretKey, true),
            ("company", Kind::Card, false),
            ("client_secret", Kind::Secret, true),
            ("stripe_api_key", Kind::Secret, true),
            ("sort_key", Kind::Secret, false),
            ("password", Kind::Secret, true),
            ("API-Key", Kind::Secret, true),
        ] {
            assert_eq!(hints_of(name).has(kind), want, "{name} {kind}");
        }
    }

    #[test]
    fn names_round_trip() {
        for k in Kind::DETECTORS {
            assert_eq!(Kind::from_name(k.as_str()), Some(k));
        }
        assert_eq!(Kind::from_name("column"), None);
    }
}
