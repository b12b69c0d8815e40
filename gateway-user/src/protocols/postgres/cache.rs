//! Classification cache: a repeated statement costs a hash lookup, not a parse.
//!
//! Three keys, tried in order:
//! 1. The exact text.
//! 2. The text's tokens, by PostgreSQL's own lexer (`pg_query::scan_tokens`), with the values of
//!    constants left out: `… WHERE id = 1` and `… WHERE id = 2` share one key, `id = 1.5` and
//!    `id = '1'` have others (the constant's kind stays in the key). Lexing costs a fraction of
//!    the parse that normalizing takes, and is all a statement that varies only in its literals
//!    pays.
//! 3. The normalized statement (pg_query's normalization, the full parser: constants replaced by
//!    `$n`).
//!
//! A statement whose classification read a literal's value (a `DO` body, an EXPLAIN option, a
//! COPY file name, a transaction option) is never shared by tokens or shape. Nor is one by
//! tokens unless normalizing replaced exactly the constants the lexer found (see
//! `Lexed::normalizes_to`): a constant normalization keeps (`FETCH 5`, `float(24)`, the
//! character after `UESCAPE`) can decide what a statement does. Keys are compared in full (a
//! text, or every token of one), never a 64-bit fingerprint whose collisions an agent could
//! search for. The maps are bounded; when full they start over.
//!
//! No hand-written lexer builds keys: one that ends a comment or a string where PostgreSQL does
//! not would let a harmless statement's verdict serve a harmful one.

use super::classify::{Classified, ClassifyError, classify};
use pg_query::protobuf::{ScanToken, Token};
use std::{
    collections::HashMap,
    io::Write as _,
    ops::Range,
    sync::{Arc, Mutex},
};

pub type Outcome = Arc<Result<Classified, ClassifyError>>;

const MAX_ENTRIES: usize = 20_000;
/// Texts longer than this are classified every time instead of filling the cache.
const MAX_CACHED_LEN: usize = 16 * 1024;

#[derive(Default)]
pub struct StatementCache {
    exact: Mutex<HashMap<Box<str>, Outcome>>,
    tokens: Mutex<HashMap<Vec<u8>, Outcome>>,
    shapes: Mutex<HashMap<String, Outcome>>,
}

/// Which key served a statement (`Classified`: none, it was classified afresh).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Served {
    Exact,
    Tokens,
    Shape,
    Classified,
}

impl StatementCache {
    pub fn classify(&self, sql: &str) -> Outcome {
        self.lookup(sql).0
    }

    fn lookup(&self, sql: &str) -> (Outcome, Served) {
        if let Some(hit) = self.exact.lock().unwrap().get(sql) {
            return (hit.clone(), Served::Exact);
        }
        if sql.len() > MAX_CACHED_LEN {
            return (Arc::new(classify(sql)), Served::Classified);
        }
        // A text the lexer rejects (or one with a NUL) goes the normalizing way, which then
        // fails too: it is classified, and refused as unparsable.
        let lexed = Lexed::new(sql);
        let by_tokens = lexed
            .as_ref()
            .and_then(|l| self.tokens.lock().unwrap().get(&l.key).cloned());
        if let Some(hit) = by_tokens {
            insert_bounded(&self.exact, sql.into(), hit.clone());
            return (hit, Served::Tokens);
        }
        let shape = pg_query::normalize(sql).ok();
        let by_shape = shape
            .as_ref()
            .and_then(|s| self.shapes.lock().unwrap().get(s).cloned());
        let (outcome, served) = match by_shape {
            Some(hit) => (hit, Served::Shape),
            None => (Arc::new(classify(sql)), Served::Classified),
        };
        if shareable(&outcome)
            && let Some(shape) = shape
        {
            if let Some(lexed) = lexed
                && lexed.normalizes_to(sql, &shape)
            {
                insert_bounded(&self.tokens, lexed.key, outcome.clone());
            }
            if served == Served::Classified {
                insert_bounded(&self.shapes, shape, outcome.clone());
            }
        }
        insert_bounded(&self.exact, sql.into(), outcome.clone());
        (outcome, served)
    }
}

/// Whether statements of the same shape may share this classification.
fn shareable(o: &Outcome) -> bool {
    matches!(&**o, Ok(c) if !c.depends_on_constants)
}

fn insert_bounded<K: std::hash::Hash + Eq>(map: &Mutex<HashMap<K, Outcome>>, k: K, v: Outcome) {
    let mut m = map.lock().unwrap();
    if m.len() >= MAX_ENTRIES {
        m.clear();
    }
    m.insert(k, v);
}

/// A statement as PostgreSQL's lexer reads it.
struct Lexed {
    /// Every token in order: the text before it (whitespace), a NUL, its kind (two bytes), and
    /// for all but constants its text and a NUL. The text itself holds no NUL (the lexer is not
    /// given one), so the key reads back unambiguously: texts with one key lex to the same
    /// tokens and differ only in the values of their constants.
    key: Vec<u8>,
    /// Where the constants are, in order.
    constants: Vec<Range<usize>>,
    /// The highest `$n` parameter in the text (0: none).
    highest_param: u64,
}

impl Lexed {
    /// `None` when the lexer rejects the text or reports tokens out of order.
    fn new(sql: &str) -> Option<Lexed> {
        let tokens = pg_query::scan_tokens(sql).ok()?;
        let text = sql.as_bytes();
        let mut key = Vec::with_capacity(text.len() + 4 * tokens.len());
        let mut constants = Vec::new();
        let mut highest_param = 0;
        let mut at = 0;
        for t in &tokens {
            let span = span(t, at, text.len())?;
            let kind = u16::try_from(t.token).ok()?;
            key.extend_from_slice(&text[at..span.start]);
            key.push(0);
            key.extend_from_slice(&kind.to_le_bytes());
            if is_constant(t) {
                constants.push(span.clone());
            } else {
                key.extend_from_slice(&text[span.clone()]);
                key.push(0);
            }
            if t.token == Token::Param as i32 {
                let n = sql.get(span.start + 1..span.end)?.parse::<u64>().ok()?;
                highest_param = highest_param.max(n);
            }
            at = span.end;
        }
        key.extend_from_slice(&text[at..]);
        Some(Lexed {
            key,
            constants,
            highest_param,
        })
    }

    /// Whether `normalized`, pg_query's normalization of `sql`, replaced exactly the constants
    /// the lexer found: it is `sql` with each of them, in order, replaced by `$n`, numbered on
    /// from the highest parameter already in the text.
    ///
    /// Only then may the classification be keyed by tokens, and this is why that is as safe as
    /// sharing by shape. A later text with the same key lexes to the same tokens but for the
    /// values of its constants, and PostgreSQL's grammar (LALR, driven by token kinds) derives
    /// the same tree from them, each constant in the same place. Here every constant was one
    /// normalization replaces, so there it is too: the two texts differ only where their
    /// normalizations put `$n`, and normalizing the later one would give the same shape key,
    /// under which the classification is shared anyway. A constant normalization keeps (a
    /// cursor's `FETCH 5`, a type modifier, the escape character after `UESCAPE`, which decides
    /// what the identifier before it names) fails the comparison, so no text with one is keyed
    /// by tokens. Where normalization numbers by tree walk rather than text order (`LIMIT …
    /// OFFSET`, `WITH`) or takes a sign with a number (`-1`), the comparison fails too: those
    /// texts only miss the cheaper key.
    fn normalizes_to(&self, sql: &str, normalized: &str) -> bool {
        let text = sql.as_bytes();
        let mut want = Vec::with_capacity(normalized.len());
        let mut at = 0;
        for (i, c) in self.constants.iter().enumerate() {
            want.extend_from_slice(&text[at..c.start]);
            // Writing to a Vec cannot fail.
            let _ = write!(want, "${}", self.highest_param + i as u64 + 1);
            at = c.end;
        }
        want.extend_from_slice(&text[at..]);
        want == normalized.as_bytes()
    }
}

/// A token's byte range, if it starts at or after `from` and ends within the text.
fn span(t: &ScanToken, from: usize, len: usize) -> Option<Range<usize>> {
    let start = usize::try_from(t.start).ok()?;
    let end = usize::try_from(t.end).ok()?;
    (from <= start && start <= end && end <= len).then_some(start..end)
}

/// Literal numbers, strings and bit strings: the tokens whose values a key leaves out.
fn is_constant(t: &ScanToken) -> bool {
    [
        Token::Iconst,
        Token::Fconst,
        Token::Sconst,
        Token::Usconst,
        Token::Bconst,
        Token::Xconst,
    ]
    .iter()
    .any(|&k| t.token == k as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found in review: a literal the classifier reads must not be masked into a shared key.
    #[test]
    fn a_primed_shape_never_serves_a_statement_whose_literals_decide() {
        let c = StatementCache::default();
        let deny = |o: &Outcome| {
            o.as_ref()
                .as_ref()
                .unwrap()
                .facts
                .classes
                .contains(&crate::protocols::postgres::classify::SqlClass::Admin)
        };
        for (primer, attack) in [
            ("COPY users TO STDOUT", "COPY users TO '/tmp/x'"),
            (
                "EXPLAIN (ANALYZE 'off') DELETE FROM t",
                "EXPLAIN (ANALYZE 'on') DELETE FROM t",
            ),
            ("BEGIN READ ONLY", "BEGIN READ WRITE"),
        ] {
            let p = c.classify(primer);
            let a = c.classify(attack);
            assert!(
                !Arc::ptr_eq(&p, &a),
                "{attack} served from {primer}'s entry"
            );
            let _ = deny;
        }
        let a = c.classify("COPY users TO '/tmp/x'");
        assert!(deny(&a));
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
        assert!(
            evil.facts
                .classes
                .contains(&crate::protocols::postgres::classify::SqlClass::Unknown)
        );
    }

    fn served(c: &StatementCache, sql: &str) -> Served {
        c.lookup(sql).1
    }

    #[test]
    fn literals_share_by_tokens_without_normalizing() {
        let c = StatementCache::default();
        let sql = |aid: u32| format!("SELECT abalance FROM pgbench_accounts WHERE aid = {aid};");
        let (first, by) = c.lookup(&sql(1));
        assert_eq!(by, Served::Classified);
        // Served::Tokens returns before pg_query::normalize is called.
        let (second, by) = c.lookup(&sql(2));
        assert_eq!(by, Served::Tokens);
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(served(&c, &sql(2)), Served::Exact);
        // Whitespace and comments are part of the key (as of the normalized text).
        assert_eq!(
            served(
                &c,
                "SELECT abalance FROM pgbench_accounts WHERE aid = /**/ 3;"
            ),
            Served::Classified
        );
        // Several statements, strings and comments alike.
        let c = StatementCache::default();
        let multi =
            |n: u32| format!("SELECT 'x{n}' /* c */; UPDATE t SET a = {n}.5 WHERE b = E'{n}'");
        assert_eq!(served(&c, &multi(1)), Served::Classified);
        assert_eq!(served(&c, &multi(2)), Served::Tokens);
    }

    #[test]
    fn constants_normalizing_keeps_are_never_keyed_by_tokens() {
        let c = StatementCache::default();
        // `FETCH 5`, a type modifier: not constants of the tree, so normalizing keeps them.
        assert_eq!(served(&c, "FETCH 5 FROM c"), Served::Classified);
        assert_eq!(served(&c, "FETCH 6 FROM c"), Served::Classified);
        assert_eq!(served(&c, "SELECT 1::float(24)"), Served::Classified);
        assert_eq!(served(&c, "SELECT 2::float(53)"), Served::Classified);
        assert_eq!(served(&c, "SELECT 2::float(24)"), Served::Shape);
        // The escape character decides which table the identifier names: a table literally
        // called `!0070g_authid`, then pg_authid itself.
        let primer = c.classify(r#"SELECT * FROM U&"!0070g_authid" UESCAPE '#'"#);
        let (attack, by) = c.lookup(r#"SELECT * FROM U&"!0070g_authid" UESCAPE '!'"#);
        assert_eq!(by, Served::Classified);
        assert!(!Arc::ptr_eq(&primer, &attack));
        let objects = |o: &Outcome| -> Vec<String> {
            let c = o.as_ref().as_ref().unwrap();
            c.facts.objects.iter().map(|o| o.name.clone()).collect()
        };
        assert_eq!(objects(&attack), ["pg_catalog.pg_authid"]);
        assert_ne!(objects(&primer), objects(&attack));
        // A function's body is a constant normalizing replaces, but the classification read it.
        let harmless = c.classify("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$SELECT 1$$");
        let (evil, by) = c.lookup(
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$DELETE FROM t RETURNING 1$$",
        );
        assert_eq!(by, Served::Classified);
        assert!(!Arc::ptr_eq(&harmless, &evil));
    }

    #[test]
    fn constant_kinds_do_not_collide() {
        let key = |sql: &str| Lexed::new(sql).unwrap().key;
        let [int, float, string] = ["1", "1.5", "'1'"].map(|v| key(&format!("SELECT {v}")));
        assert_ne!(int, float);
        assert_ne!(int, string);
        assert_ne!(float, string);
        assert_eq!(int, key("SELECT 2"));
        assert_eq!(string, key("SELECT $$2$$"));
        let c = StatementCache::default();
        assert_eq!(
            served(&c, "SELECT * FROM t WHERE x = 1"),
            Served::Classified
        );
        // One shape: normalizing shares them, but not the key for integers.
        assert_eq!(served(&c, "SELECT * FROM t WHERE x = 1.5"), Served::Shape);
        assert_eq!(served(&c, "SELECT * FROM t WHERE x = '1'"), Served::Shape);
        assert_eq!(served(&c, "SELECT * FROM t WHERE x = 2.5"), Served::Tokens);
        assert_eq!(
            served(&c, "SELECT * FROM t WHERE x = 'two'"),
            Served::Tokens
        );
    }

    #[test]
    fn normalizing_numbers_on_from_the_parameters_in_the_text() {
        // libpg_query's behaviour, which Lexed::normalizes_to predicts.
        let sql = "SELECT $2 + 1, 'a', $1";
        let normalized = pg_query::normalize(sql).unwrap();
        assert_eq!(normalized, "SELECT $2 + $3, $4, $1");
        assert!(Lexed::new(sql).unwrap().normalizes_to(sql, &normalized));
        let c = StatementCache::default();
        assert_eq!(served(&c, sql), Served::Classified);
        assert_eq!(served(&c, "SELECT $2 + 7, 'b', $1"), Served::Tokens);
        // Numbered by the tree walk, not the text: normalizing is the only shared key.
        let sql = "SELECT 1 LIMIT 5 OFFSET 10";
        let normalized = pg_query::normalize(sql).unwrap();
        assert_eq!(normalized, "SELECT $1 LIMIT $3 OFFSET $2");
        assert!(!Lexed::new(sql).unwrap().normalizes_to(sql, &normalized));
        assert_eq!(served(&c, sql), Served::Classified);
        assert_eq!(served(&c, "SELECT 1 LIMIT 6 OFFSET 10"), Served::Shape);
        // The sign goes with the number.
        assert_eq!(pg_query::normalize("SELECT -1").unwrap(), "SELECT $1");
        assert_eq!(served(&c, "SELECT -1"), Served::Classified);
        assert_eq!(served(&c, "SELECT -2"), Served::Shape);
    }

    #[test]
    fn texts_the_lexer_rejects_are_classified_and_refused() {
        let c = StatementCache::default();
        for sql in ["SELECT 'unterminated", "SELECT 1\0"] {
            let (o, by) = c.lookup(sql);
            assert_eq!(by, Served::Classified, "{sql}");
            assert!(o.is_err(), "{sql}");
        }
    }
}
