//! Masking: find sensitive values (emails, card numbers, SSNs, IBANs, phones, addresses, tokens,
//! keys, password hashes) in result values and rewrite them before they reach the agent.
//!
//! Protocol-agnostic and pure: the caller says what a value is — a [`Column`] with its name,
//! qualified name and [`ValueType`] — and hands over its bytes; [`Masker::mask`] returns the
//! output (borrowed when nothing changed) and the [`Finding`]s: kind, byte offsets into the input,
//! and the rule that decided (`builtin:<kind>` when none did). Callers count them with
//! [`MaskCounts`]: which rule, how many values, never the value.
//!
//! Owns the recognizers (`detect`), the rules as data (`rules`), JSON and PostgreSQL array
//! literals (`structured`) and the methods (`method`). Must not do I/O, log or keep a value, or
//! know a wire protocol.
//!
//! Value types: text is scanned; JSON is parsed and its string values masked, with the nearest
//! key as context (keys are masked only where a detector finds something in them, as in a map
//! keyed by email; redaction can then repeat a key); array literals `{a,b,"c d"}` are masked element by
//! element. Numbers, booleans, timestamps, UUIDs and bytea are left alone unless a rule names the
//! column. Masked output stays valid for its type, except that a masked scalar becomes text: a
//! masked JSON number becomes a JSON string (`"****"`), and a masked `integer` column value is
//! `****` (the caller must describe such a column as text).
//!
//! ```
//! use chaperone::mask::{Column, Kind, Masker, MaskRules, TokenKey, ValueType};
//! let masker = Masker::new(&MaskRules::default(), TokenKey::from_bytes([7; 32])).unwrap();
//! let col = Column::named("notes", ValueType::Text);
//! let out = masker.mask(&col, b"mail jane.doe@example.com now");
//! assert_eq!(&*out.bytes, b"mail **** now");
//! assert_eq!(out.findings[0].kind, Kind::Email);
//! assert_eq!((out.findings[0].start, out.findings[0].end), (5, 25));
//! ```
//!
//! For many rows of one column, resolve the rules once with [`Masker::column`] and call
//! [`ColumnMasker::mask`] per value.

mod detect;
mod kind;
mod method;
mod rules;
mod structured;

/// Copy-on-first-change rewriting of ranges in a byte string (for callers that splice masked
/// values into their own framing).
pub use structured::Splicer;

use detect::Detectors;
pub use kind::Kind;
use kind::{KindSet, hints_of};
pub use method::{REDACTED, TokenKey};
use rules::Rule;
pub use rules::{MaskRule, MaskRules, Method};
use serde::Serialize;
use std::{borrow::Cow, collections::BTreeMap, sync::Arc};

#[derive(Debug, thiserror::Error)]
pub enum MaskError {
    #[error("masking.rules[{index}]: names neither columns nor kinds, so it matches nothing")]
    Empty { index: usize },
    #[error("masking.rules[{index}]: an empty column pattern")]
    EmptyPattern { index: usize },
    #[error("masking.allow[{index}]: an empty pattern allows nothing; remove it")]
    EmptyAllow { index: usize },
}

/// What the caller knows a value to be (later: from PostgreSQL type OIDs).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ValueType {
    #[default]
    Text,
    Json,
    Number,
    Boolean,
    Timestamp,
    Uuid,
    /// Binary (bytea): not scanned.
    Bytes,
    /// A PostgreSQL array literal (`{a,b,"c d"}`, nested for more dimensions) of this element
    /// type. Only `,`-delimited arrays; anything else that does not parse is scanned as text.
    Array(Box<ValueType>),
}

/// A value's column: its name, `schema.table.column` when known, and its type.
#[derive(Debug, Clone, Default)]
pub struct Column<'a> {
    pub name: Option<&'a str>,
    pub qualified: Option<&'a str>,
    pub ty: ValueType,
}

impl<'a> Column<'a> {
    pub fn named(name: &'a str, ty: ValueType) -> Column<'a> {
        Column {
            name: Some(name),
            qualified: None,
            ty,
        }
    }
}

/// One masked value: `input[start..end]` was `kind` and `rule` rewrote it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub kind: Kind,
    pub start: usize,
    pub end: usize,
    /// The rule's name, `masking.rules[i]`, or `builtin:<kind>`.
    pub rule: Arc<str>,
}

/// A masked value: the output bytes (borrowed from the input when nothing changed) and what was
/// masked. Inside an escaped JSON string or array element, a finding covers the whole string.
#[derive(Debug, Clone)]
pub struct Masked<'v> {
    pub bytes: Cow<'v, [u8]>,
    pub findings: Vec<Finding>,
}

impl Masked<'_> {
    pub fn changed(&self) -> bool {
        matches!(self.bytes, Cow::Owned(_))
    }
}

/// Tallies for a session's record: how many values were masked, per rule and per kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MaskCounts {
    /// Values with at least one finding.
    pub values: u64,
    /// Values each rule masked (a value counts once per rule).
    pub by_rule: BTreeMap<Arc<str>, u64>,
    /// Findings per kind.
    pub by_kind: BTreeMap<Kind, u64>,
}

impl MaskCounts {
    pub fn add(&mut self, masked: &Masked<'_>) {
        let f = &masked.findings;
        if f.is_empty() {
            return;
        }
        self.values += 1;
        for (i, finding) in f.iter().enumerate() {
            *self.by_kind.entry(finding.kind).or_default() += 1;
            if !f[..i].iter().any(|g| g.rule == finding.rule) {
                *self.by_rule.entry(finding.rule.clone()).or_default() += 1;
            }
        }
    }
}

/// The engine: checked rules, compiled detectors and the token key. Share it (`Arc`) across
/// sessions; it holds no per-value state.
#[derive(Debug, Clone)]
pub struct Masker {
    rules: Vec<Rule>,
    allow: Vec<String>,
    key: TokenKey,
    detectors: Detectors,
    /// `builtin:<kind>` per kind, made once so findings share them.
    builtin: Vec<Arc<str>>,
}

impl Masker {
    /// Whether any rule names columns: then values whose column is unknown cannot be judged.
    pub fn has_column_rules(&self) -> bool {
        self.rules.iter().any(|r| !r.columns.is_empty())
    }

    pub fn new(rules: &MaskRules, key: TokenKey) -> Result<Masker, MaskError> {
        let builtin = Kind::DETECTORS
            .iter()
            .chain([Kind::Column].iter())
            .map(|k| Arc::from(format!("builtin:{k}")))
            .collect();
        Ok(Masker {
            rules: rules.compile()?,
            allow: rules.allow.clone(),
            key,
            detectors: Detectors::new(),
            builtin,
        })
    }

    /// The rules and context that apply to `col`, resolved once for all its values.
    pub fn column<'m>(&'m self, col: &Column<'_>) -> ColumnMasker<'m> {
        let covering = || {
            self.rules
                .iter()
                .filter(|r| r.covers(col.name, col.qualified))
        };
        let whole = covering().find(|r| r.is_whole());
        let kind_rules: Vec<&Rule> = covering().filter(|r| !r.is_whole()).collect();
        // A rule that names this column and kinds says what it holds: a hint, like its name.
        let mut hints = col.name.map_or(KindSet::EMPTY, hints_of);
        let mut named = false;
        for r in kind_rules.iter().filter(|r| !r.columns.is_empty()) {
            hints = hints.union(r.kinds);
            named = true;
        }
        ColumnMasker {
            m: self,
            ty: col.ty.clone(),
            whole,
            kind_rules,
            hints,
            named,
        }
    }

    /// Mask one value of `col`. For many values of a column, prefer [`Masker::column`].
    pub fn mask<'v>(&self, col: &Column<'_>, value: &'v [u8]) -> Masked<'v> {
        self.column(col).mask(value)
    }

    /// [`Masker::mask`] for text; the output is valid UTF-8 as the input is.
    pub fn mask_str<'v>(&self, col: &Column<'_>, value: &'v str) -> (Cow<'v, str>, Vec<Finding>) {
        let m = self.mask(col, value.as_bytes());
        let text = match m.bytes {
            Cow::Borrowed(_) => Cow::Borrowed(value),
            Cow::Owned(b) => Cow::Owned(
                String::from_utf8(b)
                    .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into()),
            ),
        };
        (text, m.findings)
    }

    fn allowed(&self, kind: Kind, text: &[u8]) -> bool {
        if self.allow.is_empty() {
            return false;
        }
        let exact = std::str::from_utf8(text).unwrap_or_default();
        let norm = method::normalized(kind, text);
        let norm = std::str::from_utf8(&norm).unwrap_or_default();
        self.allow
            .iter()
            .any(|p| crate::policy::glob_match(p, exact) || crate::policy::glob_match(p, norm))
    }

    fn builtin_label(&self, kind: Kind) -> Arc<str> {
        let i = Kind::DETECTORS
            .iter()
            .position(|k| *k == kind)
            .unwrap_or(Kind::DETECTORS.len());
        self.builtin[i].clone()
    }
}

/// A [`Masker`] bound to one column: its whole-column rule, the kind rules that cover it, and
/// the hints its name gives.
#[derive(Debug, Clone)]
pub struct ColumnMasker<'m> {
    m: &'m Masker,
    ty: ValueType,
    whole: Option<&'m Rule>,
    kind_rules: Vec<&'m Rule>,
    hints: KindSet,
    /// A rule names this column: typed values (numbers, timestamps…) are scanned too.
    named: bool,
}

impl ColumnMasker<'_> {
    /// Whether a rule names this column, so that its values may be rewritten whatever their
    /// type (a masked number becomes `****`): a caller that cannot carry text in the column's
    /// type must describe it as text or withhold its values.
    pub fn rewrites_typed(&self) -> bool {
        self.named || self.whole.is_some_and(|r| r.method != Method::Keep)
    }

    /// Whether a `keep` column rule exempts this column.
    pub fn kept(&self) -> bool {
        self.whole.is_some_and(|r| r.method == Method::Keep)
    }

    /// The finding for a value the caller withheld whole (sent as NULL) because it could not
    /// mask it in place, such as a binary value it cannot read: counted under the column's rule,
    /// else `builtin:column`.
    pub fn withheld(&self, len: usize) -> Masked<'static> {
        let rule = match self.whole {
            Some(r) => r.label.clone(),
            None => self.m.builtin_label(Kind::Column),
        };
        Masked {
            bytes: Cow::Borrowed(&[]),
            findings: vec![Finding {
                kind: Kind::Column,
                start: 0,
                end: len,
                rule,
            }],
        }
    }

    pub fn mask<'v>(&self, value: &'v [u8]) -> Masked<'v> {
        let mut findings = Vec::new();
        let bytes = match self.typed(value, &self.ty, self.hints, 0, &mut findings) {
            None => Cow::Borrowed(value),
            Some(out) => Cow::Owned(out),
        };
        Masked { bytes, findings }
    }

    /// `v` as a value of `ty`; `None` when unchanged. Findings are offset by `base`.
    fn typed(
        &self,
        v: &[u8],
        ty: &ValueType,
        hints: KindSet,
        base: usize,
        out: &mut Vec<Finding>,
    ) -> Option<Vec<u8>> {
        if self.whole.is_some_and(|r| r.method == Method::Keep) {
            return None;
        }
        match ty {
            // Nothing to find anywhere in the document (valid or not): no need to parse it.
            ValueType::Json | ValueType::Array(_)
                if self.whole.is_none() && !detect::Features::any_part_may_match(v) =>
            {
                return None;
            }
            ValueType::Json => {
                if let Some(r) = structured::json(self, v, hints, base, out) {
                    return r;
                }
            }
            ValueType::Array(inner) => {
                if let Some(r) = structured::array(self, v, inner, hints, base, out) {
                    return r;
                }
            }
            ValueType::Text => {}
            _ if self.whole.is_none() && !self.named => return None,
            _ => {}
        }
        self.leaf(v, hints, base, out)
    }

    /// A scalar: the whole of it under a column rule, else what the detectors find.
    fn leaf(
        &self,
        v: &[u8],
        hints: KindSet,
        base: usize,
        out: &mut Vec<Finding>,
    ) -> Option<Vec<u8>> {
        self.leaf_under(self.whole, v, hints, base, out)
    }

    /// [`ColumnMasker::leaf`] with `whole` as the column rule: JSON keys are structure, so
    /// only what detectors find in them is masked, whatever the column's rule.
    fn leaf_under(
        &self,
        whole: Option<&Rule>,
        v: &[u8],
        hints: KindSet,
        base: usize,
        out: &mut Vec<Finding>,
    ) -> Option<Vec<u8>> {
        if v.is_empty() {
            return None;
        }
        let hits = self.m.detectors.scan(v, hints);
        if let Some(rule) = whole {
            // The whole value is the unit only under a column rule: elsewhere `*@example.com`
            // must not let `b@evil.com x@example.com` through, so findings are checked one by one.
            if self.m.allowed(Kind::Column, v) {
                return None;
            }
            // Masked as what it is when one detector recognises the whole value, so `partial`
            // keeps an email's domain or a card's last four.
            let kind = match hits.as_slice() {
                [h] if h.start == 0 && h.end == v.len() => h.kind,
                _ => Kind::Column,
            };
            out.push(Finding {
                kind,
                start: base,
                end: base + v.len(),
                rule: rule.label.clone(),
            });
            return Some(method::render(kind, v, rule.method, &self.m.key));
        }
        let mut sp = Splicer::new(v);
        for h in hits {
            let text = &v[h.start..h.end];
            if self.m.allowed(h.kind, text) {
                continue;
            }
            let (rule, method) = match self.kind_rules.iter().find(|r| r.kinds.has(h.kind)) {
                Some(r) => (r.label.clone(), r.method),
                None => (self.m.builtin_label(h.kind), Method::Redact),
            };
            if method == Method::Keep {
                continue;
            }
            sp.replace(
                h.start,
                h.end,
                &method::render(h.kind, text, method, &self.m.key),
            );
            out.push(Finding {
                kind: h.kind,
                start: base + h.start,
                end: base + h.end,
                rule,
            });
        }
        sp.finish()
    }

    /// Whether values with no hint of their own (JSON numbers) are looked at.
    fn scans_bare(&self, hints: KindSet) -> bool {
        self.whole.is_some() || self.named || !hints.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masker(yaml: &str) -> Masker {
        let rules: MaskRules = serde_yaml::from_str(yaml).unwrap();
        Masker::new(&rules, TokenKey::from_bytes([9; 32])).unwrap()
    }

    fn text(m: &Masker, col: &Column<'_>, v: &str) -> String {
        m.mask_str(col, v).0.into_owned()
    }

    #[test]
    fn clean_values_are_borrowed() {
        let m = masker("{}");
        let col = Column::named("name", ValueType::Text);
        let out = m.mask(&col, b"Jane");
        assert!(!out.changed() && out.findings.is_empty());
    }

    #[test]
    fn builtin_detectors_redact_and_name_the_builtin_rule() {
        let m = masker("{}");
        let col = Column::named("notes", ValueType::Text);
        let out = m.mask(&col, b"card 4111 1111 1111 1111, ssn 123-45-6789");
        assert_eq!(&*out.bytes, b"card ****, ssn ****");
        let f: Vec<_> = out
            .findings
            .iter()
            .map(|f| (f.kind, f.start, f.end, &*f.rule))
            .collect();
        assert_eq!(
            f,
            [
                (Kind::Card, 5, 24, "builtin:card"),
                (Kind::Ssn, 30, 41, "builtin:ssn")
            ]
        );
    }

    #[test]
    fn typed_values_are_skipped_unless_a_rule_names_the_column() {
        let m = masker("rules: [{columns: [card_no], kinds: [card]}]");
        let card = b"4111111111111111";
        let num = m.mask(&Column::named("id", ValueType::Number), card);
        assert!(!num.changed());
        let named = m.mask(&Column::named("card_no", ValueType::Number), card);
        assert_eq!(&*named.bytes, b"****");
        assert_eq!(&*named.findings[0].rule, "masking.rules[0]");
    }

    #[test]
    fn column_rules_mask_whole_values_and_keep_exempts() {
        let m = masker(
            "rules:\n  - {columns: [\"hr.people.name\"], method: partial}\n  - {columns: [\"hr.*.email\"], method: partial}\n  - {columns: [\"test.*\"], method: keep}\n",
        );
        let col = |q: &'static str| Column {
            name: q.rsplit('.').next(),
            qualified: Some(q),
            ty: ValueType::Text,
        };
        assert_eq!(text(&m, &col("hr.people.name"), "Jane Doe"), "J***");
        let (out, f) = m.mask_str(&col("hr.people.email"), "jane@example.com");
        assert_eq!(out, "j***@example.com");
        assert_eq!(f[0].kind, Kind::Email);
        assert_eq!(
            text(&m, &col("test.fixtures"), "4111111111111111"),
            "4111111111111111"
        );
        assert_eq!(
            text(&m, &col("app.users.note"), "x 4111111111111111"),
            "x ****"
        );
    }

    #[test]
    fn kind_rules_pick_methods_and_allow_wins() {
        let m = masker(
            "rules:\n  - {kinds: [email], method: token}\n  - {kinds: [card], method: partial}\n  - {kinds: [ipv4], method: keep}\nallow: [\"*@example.org\", \"4111111111111111\"]\n",
        );
        let col = Column::named("notes", ValueType::Text);
        let out = text(
            &m,
            &col,
            "a@corp.com b@example.org 4111 1111 1111 1111 5500005555555559 10.0.0.1",
        );
        let tok = text(&m, &col, "a@corp.com");
        assert!(
            tok.starts_with("tok_") && tok.ends_with("@corp.com"),
            "{tok}"
        );
        assert_eq!(
            out,
            format!("{tok} b@example.org 4111 1111 1111 1111 ************5559 10.0.0.1")
        );
        // The allowlist judges each finding, not the value around it.
        let evil = text(&m, &col, "b@evil.com");
        assert_eq!(
            text(&m, &col, "b@evil.com x@example.org"),
            format!("{evil} x@example.org")
        );
    }

    #[test]
    fn json_keeps_keys_and_structure_and_uses_keys_as_context() {
        let m = masker("{}");
        let col = Column::named("doc", ValueType::Json);
        let v = r#"{"email": "jane@example.com", "phone": "020 7946 0958", "n": 4155550132, "tel": 4155550132, "ok": true, "list": ["x", "bob@example.com"], "esc": "a\"b c@d.io"}"#;
        let (out, f) = m.mask_str(&col, v);
        assert_eq!(
            out,
            r#"{"email": "****", "phone": "****", "n": 4155550132, "tel": "****", "ok": true, "list": ["x", "****"], "esc": "a\"b ****"}"#
        );
        serde_json::from_str::<serde_json::Value>(&out).unwrap();
        assert_eq!(&v[f[0].start..f[0].end], "jane@example.com");
        assert_eq!(f[2].kind, Kind::Phone);
        assert_eq!(&v[f[2].start..f[2].end], "4155550132");
        // An escaped string's finding covers the whole string.
        let last = f.last().unwrap();
        assert_eq!(&v[last.start..last.end], r#""a\"b c@d.io""#);
        // Not JSON: scanned as text.
        assert_eq!(text(&m, &col, "{bad a@b.io"), "{bad ****");
    }

    #[test]
    fn json_under_a_column_rule_masks_every_leaf() {
        let m = masker("rules: [{columns: [doc]}]");
        let col = Column::named("doc", ValueType::Json);
        let (out, _) = m.mask_str(&col, r#"{"a": "x", "b": [1, null, false]}"#);
        assert_eq!(out, r#"{"a": "****", "b": ["****", null, false]}"#);
    }

    #[test]
    fn json_keys_are_masked_only_where_detectors_find_something() {
        let m = masker("rules: [{kinds: [email], method: token}]");
        let col = Column::named("roles", ValueType::Json);
        let v = r#"{"jane@example.com": "admin", "team": {"bob@example.org": "viewer"}}"#;
        let (out, f) = m.mask_str(&col, v);
        assert!(!out.contains("jane@") && !out.contains("bob@"), "{out}");
        assert!(out.contains(r#"@example.com": "admin""#), "{out}");
        assert_eq!(f.len(), 2);
        serde_json::from_str::<serde_json::Value>(&out).unwrap();
        let m = masker("rules: [{columns: [doc]}]");
        let (out, _) = m.mask_str(&Column::named("doc", ValueType::Json), r#"{"a@b.io": "x"}"#);
        assert_eq!(out, r#"{"****": "****"}"#);
    }

    #[test]
    fn arrays_are_masked_per_element_and_stay_literals() {
        let m = masker("rules: [{kinds: [email], method: partial}]");
        let col = Column::named("emails", ValueType::Array(Box::new(ValueType::Text)));
        let v = r#"{a@example.com,NULL,"b c@x.io","q\"d@y.io",{plain,e@z.io}}"#;
        let (out, f) = m.mask_str(&col, v);
        assert_eq!(
            out,
            r#"{a***@example.com,NULL,"b c***@x.io","q\"d***@y.io",{plain,e***@z.io}}"#
        );
        assert_eq!(&v[f[0].start..f[0].end], "a@example.com");
        assert_eq!(f.len(), 4);
        let m = masker("rules: [{columns: [tags]}]");
        let col = Column::named("tags", ValueType::Array(Box::new(ValueType::Text)));
        assert_eq!(text(&m, &col, r#"{x,"",NULL}"#), r#"{****,"",NULL}"#);
        let nums = Column::named("ids", ValueType::Array(Box::new(ValueType::Number)));
        assert_eq!(
            text(&masker("{}"), &nums, "{4111111111111111}"),
            "{4111111111111111}"
        );
    }

    /// `\n`, `\t`, `\\` as the corpus writes them.
    fn unescape_tsv(s: &str) -> String {
        let mut out = String::with_capacity(s.len());
        let mut chars = s.chars();
        while let Some(c) = chars.next() {
            match (c, c == '\\') {
                (_, true) => match chars.next() {
                    Some('n') => out.push('\n'),
                    Some('t') => out.push('\t'),
                    Some(o) => out.push(o),
                    None => out.push('\\'),
                },
                (c, false) => out.push(c),
            }
        }
        out
    }

    /// The labelled corpus (tests/corpus/mask/labelled.tsv, see generate.py there): per kind,
    /// a row of that kind is found when a finding of that kind covers its PII; any other finding
    /// is a false positive for the kind it reports.
    #[test]
    fn corpus_precision_and_recall() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/corpus/mask/labelled.tsv");
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let m = masker("{}");
        // kind -> (true positives, false negatives, false positives)
        let mut stats: BTreeMap<Kind, (u32, u32, u32)> = BTreeMap::new();
        let mut wrong = Vec::new();
        let mut rows = 0;
        for (n, line) in text.lines().enumerate() {
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            rows += 1;
            let cols: Vec<&str> = line.split('\t').collect();
            assert!(cols.len() >= 3, "line {}: {line}", n + 1);
            let value = unescape_tsv(cols[2]);
            let pii = cols.get(3).map(|p| unescape_tsv(p)).unwrap_or_default();
            let expected = (cols[0] != "none").then(|| {
                Kind::from_name(cols[0])
                    .unwrap_or_else(|| panic!("line {}: unknown kind {}", n + 1, cols[0]))
            });
            let col = Column {
                name: (cols[1] != "-").then_some(cols[1]),
                qualified: None,
                ty: ValueType::Text,
            };
            let (ps, pe) = match value.find(&pii) {
                _ if pii.is_empty() => (0, value.len()),
                Some(s) => (s, s + pii.len()),
                None => panic!("line {}: pii not in value", n + 1),
            };
            let out = m.mask(&col, value.as_bytes());
            let mut found = false;
            for f in &out.findings {
                let on_pii = Some(f.kind) == expected && f.start < pe && ps < f.end;
                if on_pii && f.start <= ps && f.end >= pe {
                    found = true;
                } else if !on_pii {
                    stats.entry(f.kind).or_default().2 += 1;
                    wrong.push(format!(
                        "line {}: false {} {:?} in {:?}",
                        n + 1,
                        f.kind,
                        &value[f.start..f.end],
                        cols[1]
                    ));
                }
            }
            if let Some(k) = expected {
                let e = stats.entry(k).or_default();
                if found {
                    e.0 += 1;
                } else {
                    e.1 += 1;
                    wrong.push(format!(
                        "line {}: missed {k} in {value:?} ({:?})",
                        n + 1,
                        cols[1]
                    ));
                }
            }
        }
        assert!(rows >= 500, "the corpus has {rows} rows");
        println!(
            "{:<16} {:>5} {:>5} {:>5} {:>9} {:>7}",
            "kind", "tp", "fn", "fp", "precision", "recall"
        );
        let mut failing = Vec::new();
        for (k, (tp, fnn, fp)) in &stats {
            let precision = if tp + fp == 0 {
                1.0
            } else {
                *tp as f64 / (tp + fp) as f64
            };
            let recall = if tp + fnn == 0 {
                1.0
            } else {
                *tp as f64 / (tp + fnn) as f64
            };
            println!("{k:<16} {tp:>5} {fnn:>5} {fp:>5} {precision:>9.3} {recall:>7.3}");
            if precision < 0.98 || recall < 0.99 {
                failing.push(k.to_string());
            }
        }
        for w in &wrong {
            println!("{w}");
        }
        assert!(
            failing.is_empty(),
            "below 0.98 precision or 0.99 recall: {failing:?}"
        );
    }

    #[test]
    fn utf8_around_and_inside_findings_stays_utf8() {
        let m = masker("rules: [{kinds: [email], method: partial}]");
        let col = Column::named("notes", ValueType::Text);
        assert_eq!(
            text(&m, &col, "Grüße an jöhn@example.com, 4111111111111111 €"),
            "Grüße an j***@example.com, **** €"
        );
        assert_eq!(text(&m, &col, "ö@example.com"), "ö***@example.com");
    }

    /// Random bytes rich in the characters detectors key on, and JSON built from corpus-like
    /// pieces: no panic, findings inside the input, JSON stays JSON, arrays stay literals.
    #[test]
    fn arbitrary_input_never_panics_and_structure_survives() {
        let m = masker("rules: [{kinds: [card, email], method: partial}, {columns: [secret_col]}]");
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let alphabet = b"0123456789 -.:@$+/()_=\\\"{},[]aAeEkKsSxXyYzZ\n\xc3\xa9\xff";
        let pieces = [
            "4111 1111 1111 1111",
            "jane@example.com",
            "+44 20 7946 0958",
            "123-45-6789",
            "DE89370400440532013000",
            "::1",
            "10.0.0.1",
            "AKIAIOSFODNN7EXAMPLE",
            "eyJhbGciOiJIUzI1NiJ9.eyJ9.x",
            "$2b$12$",
            "-----BEGIN PRIVATE KEY-----",
            "a\\\"b",
            "",
            "\u{e9}",
        ];
        let types = [
            ValueType::Text,
            ValueType::Json,
            ValueType::Array(Box::new(ValueType::Text)),
            ValueType::Array(Box::new(ValueType::Json)),
            ValueType::Number,
        ];
        for round in 0..4000 {
            let len = (next() % 80) as usize;
            let v: Vec<u8> = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            for (i, ty) in types.iter().enumerate() {
                let name = if round % 7 == 0 {
                    "secret_col"
                } else {
                    "phone"
                };
                let out = m.mask(&Column::named(name, ty.clone()), &v);
                for f in &out.findings {
                    assert!(f.start <= f.end && f.end <= v.len(), "{v:?} {i}");
                }
            }
            // A JSON document of random pieces under random keys.
            let doc: serde_json::Map<String, serde_json::Value> = (0..(next() % 5))
                .map(|_| {
                    let p = pieces[(next() % pieces.len() as u64) as usize];
                    let key = ["email", "n", "phone", "password", "notes"][(next() % 5) as usize];
                    let val = if next() % 4 == 0 {
                        serde_json::json!([p, 4111111111111111u64])
                    } else {
                        serde_json::json!(p)
                    };
                    (key.to_string(), val)
                })
                .collect();
            let text = serde_json::to_string(&doc).unwrap();
            let (out, _) = m.mask_str(&Column::named("doc", ValueType::Json), &text);
            serde_json::from_str::<serde_json::Value>(&out)
                .unwrap_or_else(|e| panic!("{text} -> {out}: {e}"));
            let arr = format!(
                "{{{}}}",
                doc.values()
                    .map(|v| format!(
                        "\"{}\"",
                        v.to_string().replace('\\', "\\\\").replace('"', "\\\"")
                    ))
                    .collect::<Vec<_>>()
                    .join(",")
            );
            let ty = ValueType::Array(Box::new(ValueType::Json));
            let (out, _) = m.mask_str(&Column::named("docs", ty), &arr);
            assert!(out.starts_with('{') && out.ends_with('}'), "{arr} -> {out}");
        }
    }

    #[test]
    fn counts_values_per_rule_and_findings_per_kind() {
        let m = masker("rules: [{name: cards, kinds: [card], method: partial}]");
        let col = Column::named("notes", ValueType::Text);
        let mut counts = MaskCounts::default();
        for v in ["4111111111111111 and 5500005555555559", "a@b.io", "clean"] {
            counts.add(&m.mask(&col, v.as_bytes()));
        }
        assert_eq!(counts.values, 2);
        assert_eq!(counts.by_rule.get("cards"), Some(&1));
        assert_eq!(counts.by_rule.get("builtin:email"), Some(&1));
        assert_eq!(counts.by_kind.get(&Kind::Card), Some(&2));
    }
}
