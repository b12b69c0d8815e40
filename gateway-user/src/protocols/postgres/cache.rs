//! Classification cache: a repeated statement costs a hash lookup, not a parse.
//!
//! Three keys, cheapest first. A fast shape: the text with plain integer and plain string
//! literals masked by a small, deliberately conservative scanner ([`fast_shape`]) that gives up
//! on anything it does not fully understand; no parse at all. Then the exact text. Then the
//! normalized statement (pg_query's normalization: constants replaced by `$n`), so
//! `… WHERE id = 1` and `… WHERE id = 2` share one classification. Keys are full texts compared
//! in full, never a 64-bit fingerprint whose collisions an agent could search for. Statements
//! whose classification read a constant's content (a `DO` body) are never shared by shape. All
//! maps are bounded; when full they start over.

use super::classify::{Classified, ClassifyError, classify};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

pub type Outcome = Arc<Result<Classified, ClassifyError>>;

const MAX_ENTRIES: usize = 20_000;
/// Texts longer than this are classified every time instead of filling the cache.
const MAX_CACHED_LEN: usize = 16 * 1024;

#[derive(Default)]
pub struct StatementCache {
    fast: Mutex<HashMap<String, Outcome>>,
    exact: Mutex<HashMap<Box<str>, Outcome>>,
    shapes: Mutex<HashMap<String, Outcome>>,
}

impl StatementCache {
    pub fn classify(&self, sql: &str) -> Outcome {
        let fast = fast_shape(sql);
        if let Some(key) = &fast {
            if let Some(hit) = self.fast.lock().unwrap().get(key) {
                return hit.clone();
            }
        }
        if let Some(hit) = self.exact.lock().unwrap().get(sql) {
            return hit.clone();
        }
        if sql.len() > MAX_CACHED_LEN {
            return Arc::new(classify(sql));
        }
        let shape = pg_query::normalize(sql).ok();
        let by_shape = shape.as_ref().and_then(|s| self.shapes.lock().unwrap().get(s).cloned());
        let outcome = match by_shape {
            Some(hit) => hit,
            None => {
                let fresh = Arc::new(classify(sql));
                if shareable(&fresh) {
                    if let Some(shape) = shape {
                        insert_bounded(&self.shapes, shape, fresh.clone());
                    }
                }
                fresh
            }
        };
        match fast {
            Some(key) if shareable(&outcome) => insert_bounded(&self.fast, key, outcome.clone()),
            _ => insert_bounded(&self.exact, sql.into(), outcome.clone()),
        }
        outcome
    }
}

/// Whether statements of the same shape may share this classification.
fn shareable(o: &Outcome) -> bool {
    matches!(&**o, Ok(c) if !c.depends_on_constants)
}

/// Placeholders for masked literals: control characters, which no statement the fast path
/// accepts contains, so a placeholder can never be confused with real SQL text.
const NUMBER: char = '\u{1}';
const STRING: char = '\u{2}';

/// The text with plain integer literals and plain single-quoted strings masked, or `None` when
/// it holds anything this scanner does not fully understand: dollar quotes, E/U&/B/X/N strings,
/// backslashes in strings, nested or unterminated comments, non-ASCII or control characters.
/// Everything else (keywords, identifiers, operators, comments, parameters) stays verbatim, so
/// equal keys mean equal statements up to those literals' values.
pub fn fast_shape(sql: &str) -> Option<String> {
    let b = sql.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'$';
    let mut out = String::with_capacity(sql.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b'\'' => {
                // A prefix (E, U&, B, X, N) changes how the string reads: not ours to mask.
                if i > 0 && (ident(b[i - 1]) || b[i - 1] == b'&') {
                    return None;
                }
                let mut j = i + 1;
                loop {
                    match b.get(j)? {
                        b'\\' => return None,
                        b'\'' if b.get(j + 1) == Some(&b'\'') => j += 2,
                        b'\'' => break,
                        _ => j += 1,
                    }
                }
                out.push(STRING);
                i = j + 1;
            }
            b'0'..=b'9' => {
                let mut j = i;
                while j < b.len() && b[j].is_ascii_digit() {
                    j += 1;
                }
                let before_ok = i == 0 || !(ident(b[i - 1]) || b[i - 1] == b'.');
                let after_ok = j == b.len() || !(ident(b[j]) || b[j] == b'.');
                if before_ok && after_ok {
                    out.push(NUMBER);
                } else {
                    out.push_str(&sql[i..j]);
                }
                i = j;
            }
            // $1 parameters stay; anything else with $ may be a dollar quote.
            b'$' if b.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                out.push('$');
                i += 1;
                while i < b.len() && b[i].is_ascii_digit() {
                    out.push(b[i] as char);
                    i += 1;
                }
            }
            b'$' => return None,
            b'-' if b.get(i + 1) == Some(&b'-') => {
                let end = sql[i..].find('\n').map_or(b.len(), |n| i + n);
                out.push_str(&sql[i..end]);
                i = end;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let end = i + 2 + sql[i + 2..].find("*/")?;
                if sql[i + 2..end].contains("/*") {
                    return None; // PostgreSQL nests block comments
                }
                out.push_str(&sql[i..end + 2]);
                i = end + 2;
            }
            b'"' => {
                let mut j = i + 1;
                loop {
                    match b.get(j)? {
                        b'"' if b.get(j + 1) == Some(&b'"') => j += 2,
                        b'"' => break,
                        _ => j += 1,
                    }
                }
                out.push_str(&sql[i..=j]);
                i = j + 1;
            }
            c if c >= 0x80 || (c < 0x20 && !matches!(c, b'\t' | b'\n' | b'\r')) => return None,
            c => {
                out.push(c as char);
                i += 1;
            }
        }
    }
    Some(out)
}

fn insert_bounded<K: std::hash::Hash + Eq>(map: &Mutex<HashMap<K, Outcome>>, k: K, v: Outcome) {
    let mut m = map.lock().unwrap();
    if m.len() >= MAX_ENTRIES {
        m.clear();
    }
    m.insert(k, v);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_shapes() {
        let k = |s: &str| fast_shape(s);
        assert_eq!(k("SELECT abalance FROM pgbench_accounts WHERE aid = 17"), k("SELECT abalance FROM pgbench_accounts WHERE aid = 90210"));
        assert_eq!(k("select * from t where e = 'a''b'"), k("select * from t where e = 'x'"));
        assert_ne!(k("SELECT a ? 1"), k("SELECT a ? ?"), "a masked literal is never an operator");
        assert_ne!(k("SELECT * FROM t1"), k("SELECT * FROM t2"), "digits in names stay");
        assert_ne!(k("SELECT 1.5"), k("SELECT 2.5"), "decimals are not masked");
        assert_ne!(k("SELECT $1"), k("SELECT $2"));
        assert_ne!(k("SELECT 1 -- 'x\nFROM a"), k("SELECT 1 -- 'x\nFROM b"), "comments end at the newline");
        for unsure in [
            "SELECT $$x$$",
            "SELECT E'\\x27'",
            "SELECT U&'d'",
            "SELECT B'01'",
            "SELECT 'it\\'s'",
            "SELECT 'open",
            "SELECT /* a /* b */ c */ 1",
            "SELECT /* open",
            "SELECT \"open",
            "SELECT é",
            "SELECT \u{1}",
        ] {
            assert_eq!(k(unsure), None, "{unsure}");
        }
    }

    #[test]
    fn fast_shape_keys_never_mix_different_statements() {
        let c = StatementCache::default();
        let read = c.classify("SELECT * FROM t WHERE id = 1");
        let write = c.classify("DELETE FROM t WHERE id = 1");
        assert!(!Arc::ptr_eq(&read, &write));
        let again = c.classify("SELECT * FROM t WHERE id = 2");
        assert!(Arc::ptr_eq(&read, &again), "served from the fast map");
    }

    #[test]
    fn same_shape_shares_do_bodies_do_not() {
        let c = StatementCache::default();
        let a = c.classify("SELECT * FROM t WHERE id = 1");
        let b = c.classify("SELECT * FROM t WHERE id = 2");
        assert!(Arc::ptr_eq(&a, &b), "one classification for one shape");
        let harmless = c.classify("DO $$BEGIN PERFORM 1; END$$");
        let evil = c.classify("DO $$BEGIN EXECUTE 'DROP TABLE t'; END$$");
        assert!(!Arc::ptr_eq(&harmless, &evil));
        let evil = evil.as_ref().as_ref().unwrap();
        assert!(evil.facts.classes.contains(&crate::protocols::postgres::classify::SqlClass::Unknown));
    }
}
