//! The recognizers: find sensitive values in a byte string and say where. Each one validates what
//! it finds (Luhn, mod-97, SSN ranges, std address parsing, JWT headers…) instead of trusting a
//! shape. A one-pass prefilter (`Features`) decides which of them can match at all, so the common
//! clean value costs one table lookup per byte.
//!
//! Owns: detection and overlap resolution. Must not: decide how to mask, look at rules, allocate
//! for a clean value.

use super::kind::{Kind, KindSet};
use aho_corasick::{AhoCorasick, MatchKind};
use memchr::memmem;
use std::net::{Ipv4Addr, Ipv6Addr};

/// A detected value: `value[start..end]` is of `kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Hit {
    pub kind: Kind,
    pub start: usize,
    pub end: usize,
}

// Byte classes for the prefilter.
const DIGIT: u16 = 1;
const WORD: u16 = 2; // alphanumeric or one of _-+/= : may be part of a token
const AT: u16 = 4;
const DOLLAR: u16 = 8;
const COLON: u16 = 16;
const DOT: u16 = 32;
const DASH: u16 = 64;
const UPPER: u16 = 128;
const HEX: u16 = 256;
const BACKSLASH: u16 = 512;
/// Not a byte class: a colon after a hex digit or a colon, as in IPv6 addresses. A colon
/// after a quote or a word's last letter (`"key": 1`, `Note:`) is not one.
const V6_COLON: u16 = 1024;

const CLASS: [u16; 256] = {
    let mut t = [0u16; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        let mut v = 0;
        if c.is_ascii_digit() {
            v |= DIGIT | WORD;
        }
        if c.is_ascii_alphabetic() || c == b'_' || c == b'+' || c == b'/' || c == b'=' {
            v |= WORD;
        }
        if c.is_ascii_uppercase() {
            v |= UPPER;
        }
        if c.is_ascii_hexdigit() {
            v |= HEX;
        }
        match c {
            b'\\' => v |= BACKSLASH,
            b'@' => v |= AT,
            b'$' => v |= DOLLAR,
            b':' => v |= COLON,
            b'.' => v |= DOT,
            b'-' => v |= DASH | WORD,
            _ => {}
        }
        t[b] = v;
        b += 1;
    }
    t
};

/// What one pass over a value learns: enough to skip every detector that cannot match.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Features {
    len: usize,
    digits: usize,
    max_run: usize,
    flags: u16,
}

impl Features {
    pub(super) fn of(v: &[u8]) -> Features {
        let (mut digits, mut run, mut max_run, mut flags) = (0usize, 0usize, 0usize, 0u16);
        let mut prev = 0u16;
        for &b in v {
            let c = CLASS[b as usize];
            flags |= c;
            if c & COLON != 0 && prev & (HEX | COLON) != 0 {
                flags |= V6_COLON;
            }
            prev = c;
            digits += (c & DIGIT) as usize;
            run = if c & WORD != 0 { run + 1 } else { 0 };
            max_run = max_run.max(run);
        }
        Features {
            len: v.len(),
            digits,
            max_run,
            flags,
        }
    }

    fn has(&self, class: u16) -> bool {
        self.flags & class != 0
    }

    /// Whether any part of `v` (a JSON document, an array literal) could hold a finding. Escapes
    /// can hide any byte (`\\u0040`), so a value with a backslash always could.
    pub(super) fn any_part_may_match(v: &[u8]) -> bool {
        let f = Features::of(v);
        f.maybe() || f.has(BACKSLASH)
    }

    /// Whether any detector could match. False for the usual short name, word or small number.
    pub(super) fn maybe(&self) -> bool {
        self.has(AT | DOLLAR)
            || self.digits >= 4
            // IBANs: 15 characters at least, and two check digits.
            || (self.has(UPPER) && self.digits >= 2 && self.len >= 15)
            || self.max_run >= 16
            // IPv6 (`::1`) and PEM headers (`-----BEGIN`).
            || (self.has(V6_COLON) && self.digits >= 1)
            || (self.has(DASH) && self.max_run >= 10)
    }
}

/// Fixed prefixes that anchor the token-like detectors.
const ANCHORS: &[(&str, Anchor)] = &[
    ("ghp_", Anchor::Github),
    ("gho_", Anchor::Github),
    ("ghu_", Anchor::Github),
    ("ghs_", Anchor::Github),
    ("ghr_", Anchor::Github),
    ("github_pat_", Anchor::GithubPat),
    ("glpat-", Anchor::Gitlab),
    ("xoxa-", Anchor::Slack),
    ("xoxb-", Anchor::Slack),
    ("xoxp-", Anchor::Slack),
    ("xoxo-", Anchor::Slack),
    ("xoxs-", Anchor::Slack),
    ("xoxr-", Anchor::Slack),
    ("sk_live_", Anchor::Stripe),
    ("sk_test_", Anchor::Stripe),
    ("rk_live_", Anchor::Stripe),
    ("rk_test_", Anchor::Stripe),
    ("AKIA", Anchor::AwsId),
    ("ASIA", Anchor::AwsId),
    ("eyJ", Anchor::Jwt),
    ("-----BEGIN ", Anchor::Pem),
    ("$2a$", Anchor::Bcrypt),
    ("$2b$", Anchor::Bcrypt),
    ("$2y$", Anchor::Bcrypt),
    ("$argon2", Anchor::Argon2),
    ("$scrypt$", Anchor::Scrypt),
    ("$7$", Anchor::Scrypt),
];

#[derive(Debug, Clone, Copy)]
enum Anchor {
    Github,
    GithubPat,
    Gitlab,
    Slack,
    Stripe,
    AwsId,
    Jwt,
    Pem,
    Bcrypt,
    Argon2,
    Scrypt,
}

/// The compiled detectors; built once per `Masker`.
#[derive(Debug, Clone)]
pub(super) struct Detectors {
    anchors: AhoCorasick,
}

impl Detectors {
    pub(super) fn new() -> Detectors {
        let anchors = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostFirst)
            .build(ANCHORS.iter().map(|(p, _)| p))
            .expect("fixed anchor patterns compile");
        Detectors { anchors }
    }

    /// Every sensitive value in `v`, in order, without overlaps. `hints` are the kinds the column
    /// or key name suggests; the weak detectors (bare phone numbers and SSNs, AWS secret keys)
    /// need one, or a keyword just before the value.
    pub(super) fn scan(&self, v: &[u8], hints: KindSet) -> Vec<Hit> {
        let f = Features::of(v);
        if !f.maybe() && !hints.has(Kind::Secret) {
            return Vec::new();
        }
        let mut hits = Vec::new();
        if f.has(AT) {
            emails(v, &mut hits);
            if f.has(COLON) {
                url_passwords(v, &mut hits);
            }
        }
        if f.digits >= 7 {
            numbers(v, hints, &mut hits);
        }
        if f.has(UPPER) && f.digits >= 2 && f.len >= 15 {
            ibans(v, &mut hits);
        }
        if f.digits >= 4 && f.has(DOT) {
            ipv4s(v, &mut hits);
        }
        if f.has(V6_COLON) && memchr::memchr_iter(b':', v).nth(1).is_some() {
            ipv6s(v, &mut hits);
        }
        if f.max_run >= 16 || f.has(DOLLAR) || (f.has(DASH) && memmem::find(v, b"-----").is_some())
        {
            self.anchored(v, &mut hits);
        }
        if f.max_run >= 40 {
            aws_secrets(v, hints, &mut hits);
        }
        if hits.is_empty() && hints.has(Kind::Secret) {
            hits.extend(secret(v));
        }
        resolve(hits)
    }

    fn anchored(&self, v: &[u8], hits: &mut Vec<Hit>) {
        for m in self.anchors.find_iter(v) {
            let (s, after) = (m.start(), m.end());
            let hit = |kind, end: Option<usize>| {
                end.map(|end| Hit {
                    kind,
                    start: s,
                    end,
                })
            };
            let found = match ANCHORS[m.pattern().as_usize()].1 {
                // The token has to start at a word boundary: `xghp_…` is something else.
                _ if s > 0 && is_token_byte(v[s - 1]) && v[s] != b'-' && v[s] != b'$' => None,
                Anchor::Github => hit(Kind::GithubToken, token_end(v, after, 30, alnum)),
                Anchor::GithubPat => hit(Kind::GithubToken, token_end(v, after, 40, alnum_under)),
                Anchor::Gitlab => hit(Kind::GitlabToken, token_end(v, after, 20, token_char)),
                Anchor::Slack => hit(Kind::SlackToken, token_end(v, after, 10, token_char)),
                Anchor::Stripe => hit(Kind::StripeKey, token_end(v, after, 16, alnum)),
                Anchor::AwsId => hit(Kind::AwsAccessKey, aws_key_id_end(v, after)),
                Anchor::Jwt => hit(Kind::Jwt, jwt_end(v, s)),
                Anchor::Pem => hit(Kind::PrivateKey, pem_end(v, after)),
                Anchor::Bcrypt => hit(Kind::PasswordHash, bcrypt_end(v, after)),
                Anchor::Argon2 | Anchor::Scrypt => hit(Kind::PasswordHash, phc_end(v, after)),
            };
            hits.extend(found);
        }
    }
}

fn alnum(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}
fn alnum_under(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}
fn token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}
fn is_token_byte(b: u8) -> bool {
    token_char(b)
}

/// The end of a run of `ok` bytes from `from`, if at least `min` long and not followed by more
/// token bytes (a longer word is not this token).
fn token_end(v: &[u8], from: usize, min: usize, ok: fn(u8) -> bool) -> Option<usize> {
    let len = v[from..].iter().take_while(|&&b| ok(b)).count();
    let end = from + len;
    (len >= min && (end == v.len() || !alnum(v[end]))).then_some(end)
}

/// Whether one of `words` (lowercase) occurs in the 48 bytes before `s`, ignoring case.
fn keyword_before(v: &[u8], s: usize, words: &[&[u8]]) -> bool {
    let from = s.saturating_sub(48);
    let mut buf = [0u8; 48];
    let w = &mut buf[..s - from];
    w.copy_from_slice(&v[from..s]);
    w.make_ascii_lowercase();
    words.iter().any(|k| memmem::find(w, k).is_some())
}

// --- email -------------------------------------------------------------------------------------

/// Local-part bytes; UTF-8 (RFC 6531) included, so `jöhn@…` is found whole, not as `hn@…`.
fn email_local(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"._%+-'".contains(&b) || b >= 0x80
}

fn emails(v: &[u8], hits: &mut Vec<Hit>) {
    for at in memchr::memchr_iter(b'@', v) {
        let mut s = at;
        while s > 0 && email_local(v[s - 1]) {
            s -= 1;
        }
        // A local part neither starts nor ends with a dot.
        while s < at && (v[s] == b'.' || v[s] == b'\'') {
            s += 1;
        }
        let local = &v[s..at];
        // `scheme://user@host` is a URL's user, not an address.
        if v[..s].ends_with(b"://") || local.is_empty() || local.len() > 64 || local.ends_with(b".")
        {
            continue;
        }
        if let Some(end) = domain_end(v, at + 1) {
            hits.push(Hit {
                kind: Kind::Email,
                start: s,
                end,
            });
        }
    }
}

/// The end of a DNS name starting at `from` with at least two labels and an alphabetic TLD.
fn domain_end(v: &[u8], from: usize) -> Option<usize> {
    let mut end = from;
    while end < v.len() && (v[end].is_ascii_alphanumeric() || v[end] == b'-' || v[end] == b'.') {
        end += 1;
    }
    // A sentence may end right after the address.
    while end > from && (v[end - 1] == b'.' || v[end - 1] == b'-') {
        end -= 1;
    }
    let domain = &v[from..end];
    if domain.len() > 253 {
        return None;
    }
    let mut labels = 0;
    let mut last: &[u8] = &[];
    for label in domain.split(|&b| b == b'.') {
        if label.is_empty() || label.len() > 63 || label.starts_with(b"-") || label.ends_with(b"-")
        {
            return None;
        }
        labels += 1;
        last = label;
    }
    (labels >= 2 && last.len() >= 2 && last.iter().all(u8::is_ascii_alphabetic)).then_some(end)
}

// --- URL credentials ---------------------------------------------------------------------------

/// `scheme://user:password@host`: the password part.
fn url_passwords(v: &[u8], hits: &mut Vec<Hit>) {
    for sep in memmem::find_iter(v, b"://") {
        // A scheme: a letter, then letters, digits, + - .
        let mut s = sep;
        while s > 0 && (v[s - 1].is_ascii_alphanumeric() || b"+-.".contains(&v[s - 1])) {
            s -= 1;
        }
        if s == sep || !v[s].is_ascii_alphabetic() {
            continue;
        }
        let from = sep + 3;
        let authority_len = v[from..]
            .iter()
            .take_while(|&&b| !b"/?#".contains(&b) && !b.is_ascii_whitespace() && b != b'"')
            .count();
        let authority = &v[from..from + authority_len];
        let Some(at) = memchr::memrchr(b'@', authority) else {
            continue;
        };
        let Some(colon) = memchr::memchr(b':', &authority[..at]) else {
            continue;
        };
        // The user may be empty (`redis://:password@host`).
        if colon + 1 < at {
            hits.push(Hit {
                kind: Kind::UrlPassword,
                start: from + colon + 1,
                end: from + at,
            });
        }
    }
}

// --- numbers: cards, SSNs, phones --------------------------------------------------------------

/// A run of digits inside a number-like span.
#[derive(Debug, Clone, Copy)]
struct Group {
    s: usize,
    e: usize,
}

impl Group {
    fn len(&self) -> usize {
        self.e - self.s
    }
}

/// Walk number-like spans: digit groups joined by single separators (space, dash, dot, slash)
/// or phone punctuation (`+`, parentheses), bounded by non-alphanumerics.
fn numbers(v: &[u8], hints: KindSet, hits: &mut Vec<Hit>) {
    let mut groups: Vec<Group> = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let b = v[i];
        let starts = b.is_ascii_digit() || ((b == b'+' || b == b'(') && next_is_digit(v, i));
        if !starts || (i > 0 && (v[i - 1].is_ascii_alphanumeric() || v[i - 1] == b'_')) {
            i += 1;
            continue;
        }
        groups.clear();
        let span_start = i;
        let mut j = i;
        loop {
            // Leading punctuation or a separator of at most two bytes: `) ` in `(415) 555`.
            let sep_start = j;
            while j < v.len() && b" -./()+".contains(&v[j]) && j - sep_start < 2 {
                j += 1;
            }
            if j >= v.len()
                || !v[j].is_ascii_digit()
                || (j - sep_start == 2 && !paren_sep(v, sep_start))
            {
                j = sep_start;
                break;
            }
            let gs = j;
            while j < v.len() && v[j].is_ascii_digit() {
                j += 1;
            }
            groups.push(Group { s: gs, e: j });
        }
        i = j.max(span_start + 1);
        // A number glued to letters (`A1234`, `1234abc`) is an identifier, not PII.
        if groups.is_empty() || (j < v.len() && (v[j].is_ascii_alphabetic() || v[j] == b'_')) {
            continue;
        }
        number_span(v, span_start, &groups, hints, hits);
    }
}

fn next_is_digit(v: &[u8], i: usize) -> bool {
    v.get(i + 1)
        .is_some_and(|b| b.is_ascii_digit() || *b == b'(')
}

/// Two separator bytes are allowed only as `) ` (a parenthesised area code) or `.-` style
/// combinations never: keep `1.-2` from joining.
fn paren_sep(v: &[u8], at: usize) -> bool {
    &v[at..at + 2] == b") " || &v[at..at + 2] == b" ("
}

fn number_span(v: &[u8], span_start: usize, groups: &[Group], hints: KindSet, hits: &mut Vec<Hit>) {
    let n = hits.len();
    cards(v, groups, hits);
    if hits.len() == n {
        ssns(v, groups, hints, hits);
    }
    if hits.len() == n {
        phone(v, span_start, groups, hints, hits);
    }
}

/// The separator between groups `a` and `a+1`.
fn sep<'v>(v: &'v [u8], g: &[Group], a: usize) -> &'v [u8] {
    &v[g[a].e..g[a + 1].s]
}

fn cards(v: &[u8], g: &[Group], hits: &mut Vec<Hit>) {
    // From each group, the longest run of groups joined by single spaces or dashes that is a
    // valid card; scanning resumes after it.
    let mut a = 0;
    while a < g.len() {
        let mut best = None;
        let mut digits = 0;
        for b in a..g.len() {
            if b > a && !matches!(sep(v, g, b - 1), b" " | b"-") {
                break;
            }
            digits += g[b].len();
            if digits > 19 {
                break;
            }
            if (12..=19).contains(&digits) && is_card(v, &g[a..=b], digits) {
                best = Some(b);
            }
        }
        match best {
            Some(b) => {
                hits.push(Hit {
                    kind: Kind::Card,
                    start: g[a].s,
                    end: g[b].e,
                });
                a = b + 1;
            }
            None => a += 1,
        }
    }
}

fn is_card(v: &[u8], groups: &[Group], len: usize) -> bool {
    let mut d = [0u8; 19];
    let mut k = 0;
    for g in groups {
        for &b in &v[g.s..g.e] {
            d[k] = b - b'0';
            k += 1;
        }
    }
    let d = &d[..len];
    card_brand_ok(d) && luhn(d)
}

/// The number of the first `n` digits.
fn prefix(d: &[u8], n: usize) -> u32 {
    d[..n].iter().fold(0, |acc, &x| acc * 10 + x as u32)
}

/// Issuer prefix (IIN) and length per brand.
fn card_brand_ok(d: &[u8]) -> bool {
    let len = d.len();
    let p2 = prefix(d, 2);
    let p3 = prefix(d, 3);
    let p4 = prefix(d, 4);
    let p6 = prefix(d, 6);
    let visa = d[0] == 4 && matches!(len, 13 | 16 | 19);
    let mastercard = ((51..=55).contains(&p2) || (2221..=2720).contains(&p4)) && len == 16;
    let amex = matches!(p2, 34 | 37) && len == 15;
    let discover =
        (p4 == 6011 || p2 == 65 || (644..=649).contains(&p3) || (622126..=622925).contains(&p6))
            && (16..=19).contains(&len);
    let jcb = (3528..=3589).contains(&p4) && (16..=19).contains(&len);
    let diners = ((300..=305).contains(&p3) || matches!(p2, 36 | 38 | 39) || p3 == 309)
        && (14..=19).contains(&len);
    let unionpay = p2 == 62 && (16..=19).contains(&len);
    visa || mastercard || amex || discover || jcb || diners || unionpay
}

fn luhn(d: &[u8]) -> bool {
    let sum: u32 = d
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &x)| {
            let x = x as u32;
            if i % 2 == 1 {
                let y = x * 2;
                if y > 9 { y - 9 } else { y }
            } else {
                x
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

const SSN_WORDS: &[&[u8]] = &[b"ssn", b"social security", b"social sec"];

fn ssns(v: &[u8], g: &[Group], hints: KindSet, hits: &mut Vec<Hit>) {
    // 123-45-6789 (or with spaces), alone in its span; or nine bare digits with a hint.
    let (s, e) = match g {
        [a, b, c]
            if a.len() == 3 && b.len() == 2 && c.len() == 4 && {
                let (x, y) = (sep(v, g, 0), sep(v, g, 1));
                x == y && (x == b"-" || x == b" ")
            } =>
        {
            (a.s, c.e)
        }
        [a] if a.len() == 9 && (hints.has(Kind::Ssn) || keyword_before(v, a.s, SSN_WORDS)) => {
            (a.s, a.e)
        }
        _ => return,
    };
    let d: Vec<u32> = v[s..e]
        .iter()
        .filter(|b| b.is_ascii_digit())
        .map(|&b| (b - b'0') as u32)
        .collect();
    let area = d[0] * 100 + d[1] * 10 + d[2];
    let group = d[3] * 10 + d[4];
    let serial = d[5] * 1000 + d[6] * 100 + d[7] * 10 + d[8];
    if area != 0
        && area != 666
        && area < 900
        && group != 0
        && serial != 0
        && (s == 0 || v[s - 1] != b'-')
    {
        hits.push(Hit {
            kind: Kind::Ssn,
            start: s,
            end: e,
        });
    }
}

const PHONE_WORDS: &[&[u8]] = &[
    b"phone",
    b"tel",
    b"mobile",
    b"cell",
    b"call",
    b"fax",
    b"whatsapp",
    b"sms",
];

/// Phone numbers: strong with a `+` prefix or North American formatting; otherwise (other
/// national formats, bare digits) only with a phone hint or keyword.
fn phone(v: &[u8], span_start: usize, g: &[Group], hints: KindSet, hits: &mut Vec<Hit>) {
    let digits: usize = g.iter().map(Group::len).sum();
    let plus = v[span_start] == b'+';
    let start = if plus || v[span_start] == b'(' {
        span_start
    } else {
        g[0].s
    };
    let end = g[g.len() - 1].e;
    // A date or a decimal is not a phone number.
    if g.len() > 1 && (0..g.len() - 1).any(|a| sep(v, g, a) == b"/") {
        return;
    }
    let strong = (plus && (8..=15).contains(&digits) && (v[span_start + 1] != b'0'))
        || nanp(v, span_start, g);
    let hinted = (7..=15).contains(&digits)
        && (hints.has(Kind::Phone) || keyword_before(v, start, PHONE_WORDS));
    if strong || hinted {
        hits.push(Hit {
            kind: Kind::Phone,
            start,
            end,
        });
    }
}

/// North American numbers as people write them: (415) 555-0132, 415-555-0132, 415.555.0132,
/// 415 555 0132, with an optional leading 1. Area code and exchange do not start with 0 or 1.
fn nanp(v: &[u8], span_start: usize, g: &[Group]) -> bool {
    let g = match g {
        [one, rest @ ..] if rest.len() == 3 && v[one.s..one.e] == *b"1" => rest,
        _ => g,
    };
    let [a, x, n] = g else {
        return false;
    };
    if a.len() != 3 || x.len() != 3 || n.len() != 4 || v[a.s] < b'2' || v[x.s] < b'2' {
        return false;
    }
    let s1 = &v[a.e..x.s];
    let s2 = &v[x.e..n.s];
    let paren = (a.s > span_start && v[a.s - 1] == b'(') && (s1 == b") " || s1 == b")");
    (paren && (s2 == b"-" || s2 == b" ")) || (s1 == s2 && matches!(s1, b"-" | b"." | b" "))
}

// --- IBAN --------------------------------------------------------------------------------------

/// IBAN lengths per country (ISO 13616 registry).
#[rustfmt::skip]
const IBAN_LENGTHS: &[(&[u8; 2], usize)] = &[
    (b"AD", 24), (b"AE", 23), (b"AL", 28), (b"AT", 20), (b"AZ", 28), (b"BA", 20), (b"BE", 16),
    (b"BG", 22), (b"BH", 22), (b"BR", 29), (b"BY", 28), (b"CH", 21), (b"CR", 22), (b"CY", 28),
    (b"CZ", 24), (b"DE", 22), (b"DK", 18), (b"DO", 28), (b"EE", 20), (b"EG", 29), (b"ES", 24),
    (b"FI", 18), (b"FO", 18), (b"FR", 27), (b"GB", 22), (b"GE", 22), (b"GI", 23), (b"GL", 18),
    (b"GR", 27), (b"GT", 28), (b"HR", 21), (b"HU", 28), (b"IE", 22), (b"IL", 23), (b"IQ", 23),
    (b"IS", 26), (b"IT", 27), (b"JO", 30), (b"KW", 30), (b"KZ", 20), (b"LB", 28), (b"LC", 32),
    (b"LI", 21), (b"LT", 20), (b"LU", 20), (b"LV", 21), (b"MC", 27), (b"MD", 24), (b"ME", 22),
    (b"MK", 19), (b"MR", 27), (b"MT", 31), (b"MU", 30), (b"NL", 18), (b"NO", 15), (b"PK", 24),
    (b"PL", 28), (b"PS", 29), (b"PT", 25), (b"QA", 29), (b"RO", 24), (b"RS", 22), (b"SA", 24),
    (b"SC", 31), (b"SE", 24), (b"SI", 19), (b"SK", 24), (b"SM", 27), (b"ST", 25), (b"SV", 28),
    (b"TL", 23), (b"TN", 24), (b"TR", 26), (b"UA", 29), (b"VA", 22), (b"VG", 24), (b"XK", 20),
];

pub(super) fn iban_length(country: &[u8]) -> Option<usize> {
    IBAN_LENGTHS
        .iter()
        .find(|(c, _)| c.as_slice() == country)
        .map(|(_, n)| *n)
}

fn ibans(v: &[u8], hits: &mut Vec<Hit>) {
    let mut i = 0;
    while i + 4 <= v.len() {
        let w = &v[i..i + 4];
        let candidate = w[0].is_ascii_uppercase()
            && w[1].is_ascii_uppercase()
            && w[2].is_ascii_digit()
            && w[3].is_ascii_digit()
            && (i == 0 || !v[i - 1].is_ascii_alphanumeric());
        if let Some(end) = candidate.then(|| iban_at(v, i)).flatten() {
            hits.push(Hit {
                kind: Kind::Iban,
                start: i,
                end,
            });
            i = end;
        } else {
            i += 1;
        }
    }
}

/// The end of a valid IBAN at `s`: compact, or in groups separated by single spaces.
fn iban_at(v: &[u8], s: usize) -> Option<usize> {
    let want = iban_length(&v[s..s + 2])?;
    let mut chars = [0u8; 34];
    let (mut n, mut j) = (0, s);
    while n < want && j < v.len() {
        let b = v[j];
        if b.is_ascii_uppercase() || b.is_ascii_digit() {
            chars[n] = b;
            n += 1;
        } else if !(b == b' ' && j > s && v[j - 1] != b' ') {
            return None;
        }
        j += 1;
    }
    if n < want || (j < v.len() && v[j].is_ascii_alphanumeric()) {
        return None;
    }
    iban_mod97(&chars[..n]).then_some(j)
}

/// ISO 7064 mod 97-10 over the rearranged IBAN.
pub(super) fn iban_mod97(iban: &[u8]) -> bool {
    let mut rem: u32 = 0;
    for &b in iban[4..].iter().chain(&iban[..4]) {
        let x = if b.is_ascii_digit() {
            (b - b'0') as u32
        } else {
            (b.to_ascii_uppercase() - b'A') as u32 + 10
        };
        rem = if x >= 10 {
            (rem * 100 + x) % 97
        } else {
            (rem * 10 + x) % 97
        };
    }
    rem == 1
}

// --- IP addresses ------------------------------------------------------------------------------

fn ipv4s(v: &[u8], hits: &mut Vec<Hit>) {
    let mut i = 0;
    while i < v.len() {
        if !v[i].is_ascii_digit()
            || (i > 0 && (v[i - 1].is_ascii_alphanumeric() || v[i - 1] == b'.'))
        {
            i += 1;
            continue;
        }
        let mut e = i;
        while e < v.len() && (v[e].is_ascii_digit() || v[e] == b'.') {
            e += 1;
        }
        let next = e;
        // A sentence may end right after the address.
        if v[e - 1] == b'.' {
            e -= 1;
        }
        let glued = next < v.len() && (v[next].is_ascii_alphabetic() || v[next] == b'_');
        if !glued && v[i..e].iter().filter(|&&b| b == b'.').count() == 3 {
            let ok = std::str::from_utf8(&v[i..e])
                .ok()
                .and_then(|s| s.parse::<Ipv4Addr>().ok())
                .is_some();
            if ok {
                hits.push(Hit {
                    kind: Kind::Ipv4,
                    start: i,
                    end: e,
                });
            }
        }
        i = next;
    }
}

fn ipv6s(v: &[u8], hits: &mut Vec<Hit>) {
    let ok = |b: u8| b.is_ascii_hexdigit() || b == b':' || b == b'.';
    let mut i = 0;
    while i < v.len() {
        if !ok(v[i]) || (i > 0 && (ok(v[i - 1]) || v[i - 1].is_ascii_alphanumeric())) {
            i += 1;
            continue;
        }
        let mut e = i;
        while e < v.len() && ok(v[e]) {
            e += 1;
        }
        let next = e;
        while e > i && v[e - 1] == b'.' {
            e -= 1;
        }
        let s = &v[i..e];
        let colons = s.iter().filter(|&&b| b == b':').count();
        // `a::b` parses but is a Rust or C++ path: require a digit.
        let plausible = colons >= 2
            && s.iter().any(u8::is_ascii_digit)
            && !(next < v.len() && (v[next].is_ascii_alphanumeric() || v[next] == b'_'));
        if plausible && let Some(end) = ipv6_prefix(s) {
            hits.push(Hit {
                kind: Kind::Ipv6,
                start: i,
                end: i + end,
            });
        }
        i = next.max(i + 1);
    }
}

/// The whole candidate parses as IPv6, or it is `addr:port`-free text ending in a colon.
fn ipv6_prefix(s: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(s).ok()?;
    if text.parse::<Ipv6Addr>().is_ok() {
        return Some(s.len());
    }
    // `fe80::1:` at the end of a clause.
    let trimmed = text.strip_suffix(':')?;
    (trimmed.parse::<Ipv6Addr>().is_ok() && !trimmed.ends_with(':')).then_some(trimmed.len())
}

// --- tokens ------------------------------------------------------------------------------------

/// AKIA/ASIA + 16 upper-case letters or digits.
fn aws_key_id_end(v: &[u8], after: usize) -> Option<usize> {
    let rest = v.get(after..after + 16)?;
    let end = after + 16;
    (rest
        .iter()
        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
        && (end == v.len() || !alnum(v[end])))
    .then_some(end)
}

const SECRET_WORDS: &[&[u8]] = &[b"secret", b"aws_secret", b"secret_access_key"];

/// AWS secret access keys: 40 base64 characters with upper, lower case and a digit, only where
/// the column, key or text before says secret (alone, the shape is any 40-byte blob).
fn aws_secrets(v: &[u8], hints: KindSet, hits: &mut Vec<Hit>) {
    let ok = |b: u8| b.is_ascii_alphanumeric() || b == b'/' || b == b'+';
    let mut i = 0;
    while i < v.len() {
        if !ok(v[i]) {
            i += 1;
            continue;
        }
        let mut e = i;
        while e < v.len() && ok(v[e]) {
            e += 1;
        }
        let s = &v[i..e];
        // Part of a longer word or base64 blob (`=` padding) is not a key; `key=` before is.
        let left_ok = i == 0 || !matches!(v[i - 1], b'_' | b'-' | b'.');
        let right_ok = e == v.len() || !matches!(v[e], b'_' | b'-' | b'=');
        if s.len() == 40
            && left_ok
            && right_ok
            && s.iter().any(u8::is_ascii_uppercase)
            && s.iter().any(u8::is_ascii_lowercase)
            && s.iter().any(u8::is_ascii_digit)
            && (hints.has(Kind::AwsSecretKey) || keyword_before(v, i, SECRET_WORDS))
        {
            hits.push(Hit {
                kind: Kind::AwsSecretKey,
                start: i,
                end: e,
            });
        }
        i = e;
    }
}

fn b64url(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// `header.payload.signature`, base64url; the header decodes to a JSON object with `alg`.
fn jwt_end(v: &[u8], s: usize) -> Option<usize> {
    let part = |from: usize| from + v[from..].iter().take_while(|&&b| b64url(b)).count();
    let h = part(s);
    if v.get(h) != Some(&b'.') {
        return None;
    }
    let p = part(h + 1);
    if p == h + 1 || v.get(p) != Some(&b'.') {
        return None;
    }
    let end = part(p + 1);
    if end < v.len() && (v[end] == b'.' || v[end] == b'=') {
        return None;
    }
    let header = data_encoding::BASE64URL_NOPAD.decode(&v[s..h]).ok()?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).ok()?;
    header.get("alg")?.as_str()?;
    data_encoding::BASE64URL_NOPAD.decode(&v[h + 1..p]).ok()?;
    Some(end)
}

/// To the matching `-----END … PRIVATE KEY-----`, or to the end of the value if it is cut.
fn pem_end(v: &[u8], after: usize) -> Option<usize> {
    let line_end = after + memchr::memchr(b'-', &v[after..])?;
    let label = &v[after..line_end];
    if !label.ends_with(b"PRIVATE KEY") || v.get(line_end..line_end + 5) != Some(b"-----") {
        return None;
    }
    let footer = [b"-----END ", label, b"-----"].concat();
    Some(memmem::find(&v[line_end..], &footer).map_or(v.len(), |i| line_end + i + footer.len()))
}

/// `$2b$10$` + 53 characters of bcrypt's base64.
fn bcrypt_end(v: &[u8], after: usize) -> Option<usize> {
    let cost = v.get(after..after + 3)?;
    if !(cost[0].is_ascii_digit() && cost[1].is_ascii_digit() && cost[2] == b'$') {
        return None;
    }
    let from = after + 3;
    let ok = |b: u8| b.is_ascii_alphanumeric() || b == b'.' || b == b'/';
    let len = v[from..].iter().take_while(|&&b| ok(b)).count();
    (len == 53).then_some(from + len)
}

/// PHC strings (`$argon2id$v=19$m=…,t=…,p=…$salt$hash`, `$scrypt$…`, `$7$…`): at least one more
/// `$`-separated field and 30 characters.
fn phc_end(v: &[u8], after: usize) -> Option<usize> {
    let ok = |b: u8| b.is_ascii_alphanumeric() || b"$.,/+=-".contains(&b);
    let len = v[after..].iter().take_while(|&&b| ok(b)).count();
    let body = &v[after..after + len];
    let fields = body.iter().filter(|&&b| b == b'$').count();
    (fields >= 1 && len >= 30).then_some(after + len)
}

/// A value named like a secret: one word (surrounding blanks aside) of 8 to 512 bytes that is
/// not a number, a timestamp or a boolean. Shorter values are flags, kinds or placeholders (`Bearer`,
/// `none`); whitespace means prose (`min 12 characters`).
fn secret(v: &[u8]) -> Option<Hit> {
    let start = v.iter().position(|b| !b.is_ascii_whitespace())?;
    let end = v.len() - v.iter().rev().position(|b| !b.is_ascii_whitespace())?;
    let w = &v[start..end];
    // Numbers, dates and ISO timestamps (`token_expires_at`) are not secrets.
    // Nor placeholders made of one repeated character (`********`).
    let plain = w.iter().all(|b| b"0123456789.-:+TZ".contains(b))
        || w.iter().all(|b| *b == w[0])
        || w.eq_ignore_ascii_case(b"true")
        || w.eq_ignore_ascii_case(b"false");
    ((8..=512).contains(&w.len()) && !plain && !w.iter().any(u8::is_ascii_whitespace)).then_some(
        Hit {
            kind: Kind::Secret,
            start,
            end,
        },
    )
}

/// Sort by position and drop findings that overlap a stronger one.
fn resolve(mut hits: Vec<Hit>) -> Vec<Hit> {
    if hits.len() <= 1 {
        return hits;
    }
    hits.sort_by_key(|h| (h.kind.rank(), h.start));
    let mut kept: Vec<Hit> = Vec::with_capacity(hits.len());
    for h in hits {
        if !kept.iter().any(|k| h.start < k.end && k.start < h.end) {
            kept.push(h);
        }
    }
    kept.sort_by_key(|h| h.start);
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_HINT: KindSet = KindSet::EMPTY;

    /// A value, the hints it is scanned with, and what must be found (kind, text).
    type Case<'a> = (&'a str, KindSet, &'a [(Kind, &'a str)]);

    #[test]
    fn clean_values_do_not_pass_the_prefilter() {
        for v in ["hello", "Jane", "42", "true", "a short sentence.", "123"] {
            assert!(!Features::of(v.as_bytes()).maybe(), "{v}");
        }
    }

    #[test]
    fn detects_what_validates_and_nothing_else() {
        let ssn = KindSet::of(&[Kind::Ssn]);
        let phone = KindSet::of(&[Kind::Phone]);
        let secret_hint = super::super::kind::hints_of("password");
        let gh = "ghp_0123456789abcdefghijABCDEFGHIJ012345";
        let secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
        let aws_line = format!("aws_secret_access_key = {secret}");
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl";
        let pem = "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----";
        let pem_line = format!("k={pem};");
        let bcrypt = "$2b$12$R9h/cIPz0gi.URNNX3kh2OPST9/PgBkqquzi.Ss7KIUgO2t0jWMUW";
        #[rustfmt::skip]
        let table: &[Case<'_>] = &[
            // Cards: issuer prefix, length and Luhn.
            ("4111111111111111", NO_HINT, &[(Kind::Card, "4111111111111111")]),
            ("pay 4111 1111 1111 1111 now", NO_HINT, &[(Kind::Card, "4111 1111 1111 1111")]),
            ("3782-822463-10005", NO_HINT, &[(Kind::Card, "3782-822463-10005")]),
            ("2221000000000009", NO_HINT, &[(Kind::Card, "2221000000000009")]),
            ("7992739871300000", NO_HINT, &[]), // Luhn-valid, no issuer: an order number
            ("4111111111111112", NO_HINT, &[]), // bad check digit
            ("1700000000000", NO_HINT, &[]),    // a millisecond timestamp
            // SSNs: ranges; bare nine digits only with a hint or keyword.
            ("123-45-6789", NO_HINT, &[(Kind::Ssn, "123-45-6789")]),
            ("000-12-3456", NO_HINT, &[]),
            ("666-12-3456", NO_HINT, &[]),
            ("912-12-3456", NO_HINT, &[]),
            ("123-00-4567", NO_HINT, &[]),
            ("123-45-0000", NO_HINT, &[]),
            ("123456789", NO_HINT, &[]),
            ("123456789", ssn, &[(Kind::Ssn, "123456789")]),
            ("SSN: 123456789", NO_HINT, &[(Kind::Ssn, "123456789")]),
            // IBANs: length per country and mod-97.
            ("DE89370400440532013000", NO_HINT, &[(Kind::Iban, "DE89370400440532013000")]),
            ("IBAN GB29 NWBK 6016 1331 9268 19.", NO_HINT, &[(Kind::Iban, "GB29 NWBK 6016 1331 9268 19")]),
            ("DE88370400440532013000", NO_HINT, &[]),
            // Phones: a + prefix or North American format; otherwise a hint.
            ("+44 20 7946 0958", NO_HINT, &[(Kind::Phone, "+44 20 7946 0958")]),
            ("call (415) 555-0132", NO_HINT, &[(Kind::Phone, "(415) 555-0132")]),
            ("415-555-0132", NO_HINT, &[(Kind::Phone, "415-555-0132")]),
            ("4155550132", NO_HINT, &[]),
            ("020 7946 0958", phone, &[(Kind::Phone, "020 7946 0958")]),
            ("2024-01-15", NO_HINT, &[]),
            // IP addresses.
            ("from 10.1.2.3.", NO_HINT, &[(Kind::Ipv4, "10.1.2.3")]),
            ("10.2.3.4.5", NO_HINT, &[]),
            ("v2.31.0", NO_HINT, &[]),
            ("999.1.1.1", NO_HINT, &[]),
            ("[2001:db8::1]:80", NO_HINT, &[(Kind::Ipv6, "2001:db8::1")]),
            ("12:30:45", NO_HINT, &[]),
            ("std::vec::Vec", NO_HINT, &[]),
            // Tokens, keys, hashes.
            (gh, NO_HINT, &[(Kind::GithubToken, gh)]),
            ("AKIAIOSFODNN7EXAMPLE", NO_HINT, &[(Kind::AwsAccessKey, "AKIAIOSFODNN7EXAMPLE")]),
            (secret, NO_HINT, &[]),
            (&aws_line, NO_HINT, &[(Kind::AwsSecretKey, secret)]),
            (jwt, NO_HINT, &[(Kind::Jwt, jwt)]),
            ("postgres://app:s3cr3t@db.internal:5432/app", NO_HINT, &[(Kind::UrlPassword, "s3cr3t")]),
            ("redis://:pw12345@cache:6379", NO_HINT, &[(Kind::UrlPassword, "pw12345")]),
            (&pem_line, NO_HINT, &[(Kind::PrivateKey, pem)]),
            (bcrypt, NO_HINT, &[(Kind::PasswordHash, bcrypt)]),
            // Emails.
            ("to: Jane.Doe+x@mail.example.co.uk.", NO_HINT, &[(Kind::Email, "Jane.Doe+x@mail.example.co.uk")]),
            ("user@localhost", NO_HINT, &[]),
            ("@handle", NO_HINT, &[]),
            ("ssh://git@example.com/repo", NO_HINT, &[]),
            // Secrets: only by name, one word.
            ("hunter2hunter2", NO_HINT, &[]),
            ("hunter2hunter2", secret_hint, &[(Kind::Secret, "hunter2hunter2")]),
            (" Tr0ub4dor&3 ", secret_hint, &[(Kind::Secret, "Tr0ub4dor&3")]),
            ("min 12 characters", secret_hint, &[]),
            ("Bearer", secret_hint, &[]),
            ("1712345678", secret_hint, &[]),
            (bcrypt, secret_hint, &[(Kind::PasswordHash, bcrypt)]),
        ];
        let d = Detectors::new();
        for (v, hints, want) in table {
            let got: Vec<(Kind, &str)> = d
                .scan(v.as_bytes(), *hints)
                .into_iter()
                .map(|h| (h.kind, &v[h.start..h.end]))
                .collect();
            assert_eq!(got, *want, "{v:?}");
        }
    }
}
