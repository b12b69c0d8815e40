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
//!    `$n`), when it lexes as the statement does but for those `$n` (see `Lexed::reads_as`).
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
        // A shape that lexes otherwise than the text is no key for it (see `Lexed::reads_as`).
        let shared_shape = shape
            .as_ref()
            .filter(|s| lexed.as_ref().is_some_and(|l| l.reads_as(sql, s)));
        let by_shape = shared_shape.and_then(|s| self.shapes.lock().unwrap().get(s).cloned());
        let (outcome, served) = match by_shape {
            Some(hit) => (hit, Served::Shape),
            None => (Arc::new(classify(sql)), Served::Classified),
        };
        if shareable(&outcome)
            && let Some(shape) = &shape
        {
            if served == Served::Classified
                && let Some(shared) = shared_shape
            {
                insert_bounded(&self.shapes, shared.clone(), outcome.clone());
            }
            if let Some(lexed) = lexed
                && lexed.normalizes_to(sql, shape)
            {
                insert_bounded(&self.tokens, lexed.key, outcome.clone());
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
    /// The highest `$n` parameter in the text (0: none).
    highest_param: u64,
    /// Every token's place and kind.
    tokens: Vec<(Range<usize>, i32)>,
}

impl Lexed {
    /// `None` when the lexer rejects the text or reports tokens out of order.
    fn new(sql: &str) -> Option<Lexed> {
        let tokens = pg_query::scan_tokens(sql).ok()?;
        let text = sql.as_bytes();
        let mut key = Vec::with_capacity(text.len() + 4 * tokens.len());
        let mut highest_param = 0;
        let mut spans = Vec::with_capacity(tokens.len());
        let mut at = 0;
        for t in &tokens {
            let span = span(t, at, text.len())?;
            spans.push((span.clone(), t.token));
            let kind = u16::try_from(t.token).ok()?;
            key.extend_from_slice(&text[at..span.start]);
            key.push(0);
            key.extend_from_slice(&kind.to_le_bytes());
            if !is_constant(t.token) {
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
            highest_param,
            tokens: spans,
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
    /// normalizations put `$n`, and normalizing the later one would give the same shape, under
    /// which the classification is shared anyway (when the shape lexes as the texts do; the
    /// texts here lex alike by construction). A constant normalization keeps (a
    /// cursor's `FETCH 5`, a type modifier, the escape character after `UESCAPE`, which decides
    /// what the identifier before it names) fails the comparison, so no text with one is keyed
    /// by tokens. Where normalization numbers by tree walk rather than text order (`LIMIT …
    /// OFFSET`, `WITH`) or takes a sign with a number (`-1`), the comparison fails too: those
    /// texts only miss the cheaper key.
    fn normalizes_to(&self, sql: &str, normalized: &str) -> bool {
        let text = sql.as_bytes();
        let mut want = Vec::with_capacity(normalized.len());
        let mut at = 0;
        let constants = self.tokens.iter().filter(|(_, kind)| is_constant(*kind));
        for (i, (c, _)) in constants.enumerate() {
            want.extend_from_slice(&text[at..c.start]);
            // Writing to a Vec cannot fail.
            let _ = write!(want, "${}", self.highest_param + i as u64 + 1);
            at = c.end;
        }
        want.extend_from_slice(&text[at..]);
        want == normalized.as_bytes()
    }

    /// Whether `normalized`, pg_query's normalization of `sql`, lexes as `sql` does but for a
    /// `$n` parameter in place of some tokens, each a constant or a sign and a number.
    ///
    /// Only then may the classification be shared by shape. Normalizing writes `$n` over a
    /// constant and keeps the text around it, which need not read the same: after an
    /// identifier, `$1` continues it. `SELECT t.f'x' FROM t` (a literal of type `t.f`)
    /// normalizes to `SELECT t.f$1 FROM t`, which is itself a text, with no constant, where
    /// `t.f$1` is the call `f$1(t)` when `t` has no column `f$1`. Two texts whose shared shape
    /// passes here both lex to the shape's tokens with its parameters filled in: they differ
    /// only where normalizing found a constant (or a parameter) in each.
    fn reads_as(&self, sql: &str, normalized: &str) -> bool {
        let Ok(theirs) = pg_query::scan_tokens(normalized) else {
            return false;
        };
        let (text, norm) = (sql.as_bytes(), normalized.as_bytes());
        let mut mine = self.tokens.iter();
        let (mut at, mut norm_at) = (0, 0);
        for t in &theirs {
            let (Some(n), Some((m, kind))) = (span(t, norm_at, norm.len()), mine.next()) else {
                return false;
            };
            if text[at..m.start] != norm[norm_at..n.start] {
                return false;
            }
            at = if *kind == t.token && text[m.clone()] == norm[n.clone()] {
                m.end
            } else if t.token == Token::Param as i32 {
                // A negative number is replaced with its sign.
                match (&text[m.clone()], mine.clone().next()) {
                    (b"-", Some((number, kind)))
                        if [Token::Iconst, Token::Fconst]
                            .iter()
                            .any(|&k| *kind == k as i32) =>
                    {
                        mine.next();
                        number.end
                    }
                    _ => m.end,
                }
            } else {
                return false;
            };
            norm_at = n.end;
        }
        mine.next().is_none() && text[at..] == norm[norm_at..]
    }
}

/// A token's byte range, if it starts at or after `from` and ends within the text.
fn span(t: &ScanToken, from: usize, len: usize) -> Option<Range<usize>> {
    let start = usize::try_from(t.start).ok()?;
    let end = usize::try_from(t.end).ok()?;
    (from <= start && start <= end && end <= len).then_some(start..end)
}

/// Literal numbers, strings and bit strings: the token kinds whose values a key leaves out.
fn is_constant(kind: i32) -> bool {
    [
        Token::Iconst,
        Token::Fconst,
        Token::Sconst,
        Token::Usconst,
        Token::Bconst,
        Token::Xconst,
    ]
    .iter()
    .any(|&k| kind == k as i32)
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

    /// Found in review: a normalized text is a text too, and may read otherwise. `t.f'x'` is a
    /// literal of type `t.f`; its shape `t.f$1` is the call `f$1(t)` (attribute notation),
    /// whose name the session checks against the target's functions. Sharing by shape served
    /// either text the other's classification.
    #[test]
    fn a_shape_that_lexes_otherwise_is_no_key() {
        let attribute_names = |sql| classify(sql).unwrap().facts.attribute_names;
        for (literal, call) in [
            ("SELECT t.f'x' FROM t", "SELECT t.f$1 FROM t"),
            ("SELECT s.t.f'x' FROM s.t", "SELECT s.t.f$1 FROM s.t"),
        ] {
            assert_eq!(pg_query::normalize(literal).unwrap(), call);
            assert_eq!(pg_query::normalize(call).unwrap(), call);
            for (primer, probe) in [(literal, call), (call, literal)] {
                let c = StatementCache::default();
                c.classify(primer);
                let (o, by) = c.lookup(probe);
                assert_eq!(by, Served::Classified, "{probe} after {primer}");
                assert_eq!(*o, classify(probe));
            }
            assert!(attribute_names(literal).is_empty());
            assert_eq!(attribute_names(call), ["f$1".to_string()].into());
            // The literal still shares by tokens, which compares what the lexer read.
            let c = StatementCache::default();
            c.classify(literal);
            assert_eq!(served(&c, &literal.replace("x", "y")), Served::Tokens);
        }
        // Numbers, a sign and a number, parameters of the text: the shape reads back.
        let c = StatementCache::default();
        assert_eq!(
            served(&c, "SELECT -1, $1, 'a' FROM t LIMIT 5"),
            Served::Classified
        );
        assert_eq!(
            served(&c, "SELECT 2.5, $1, NULL FROM t LIMIT ALL"),
            Served::Shape
        );
    }

    /// Review of the keys against texts an agent may choose: for each text of the table (and
    /// each with a constant glued to the token before it), texts with other constants (of the
    /// same kind or not), its shape itself, and its shape with other constants or parameters
    /// for the `$n`. Whatever key serves one of them after the text, it gets its own
    /// classification.
    #[test]
    fn every_text_a_key_serves_gets_its_own_classification() {
        const TEXTS: &[&str] = &[
            "SELECT * FROM t WHERE id = 1",
            "SELECT t.f'x' FROM t",
            "SELECT N'x' FROM t",
            "SELECT 1 FROM t LIMIT-1",
            "SELECT 'pg_authid'::regclass, 'f'::regproc, 'public'::regnamespace",
            "SELECT to_regclass('pg_authid'), current_setting('search_path')",
            "SELECT set_config('application_name', 'x', false)",
            "SELECT nextval('s'), pg_read_file('/etc/passwd'), lo_import('/tmp/x')",
            "SELECT has_table_privilege('pg_authid', 'select')",
            "SELECT interval '1' day, timestamp '2020-01-01', int4 '1', t.int4 '1'",
            "SELECT numeric(10, 2) '1.5', 1::float(24), 'a' COLLATE \"C\"",
            "SELECT U&'\\0041', U&'\\0041' UESCAPE '!', E'\\x41', B'01', X'1F'",
            "SELECT U&\"\\0041\" FROM t",
            "SELECT 1 LIMIT 5 OFFSET 10",
            "SELECT -1, - 2, -'3', 1+-1",
            "SELECT $1, 'a', 2",
            "SELECT $a$x$a$ || $$y$$, 'a'\n'b'",
            "SELECT /* a /* nested */ comment */ 1 -- line",
            "SELECT 1; DELETE FROM t WHERE id = 2",
            "COPY t TO STDOUT",
            "COPY t TO '/tmp/x'",
            "EXPLAIN (ANALYZE 'off') DELETE FROM t",
            "EXPLAIN DELETE FROM t WHERE id = 1",
            "SET application_name = 'x'",
            "SET search_path = 'public'",
            "SET ROLE 'x'",
            "SET TRANSACTION READ ONLY",
            "BEGIN ISOLATION LEVEL SERIALIZABLE, READ ONLY",
            "PREPARE TRANSACTION 'x'",
            "DO $$BEGIN PERFORM 1; END$$",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
            "CALL p(1, 'x')",
            "PREPARE p(int) AS SELECT $1 + 1",
            "EXECUTE p(1)",
            "DECLARE c CURSOR FOR SELECT 1",
            "FETCH 5 FROM c",
            "NOTIFY ch, 'x'",
            "ALTER ROLE r PASSWORD 'x'",
            "ALTER FUNCTION f() SET application_name = 'x'",
            "SELECT a + 1 FROM t GROUP BY a + 1 ORDER BY 1",
            "SELECT EXTRACT(year FROM now()), 'x' IS NFC NORMALIZED",
            "SELECT * FROM t TABLESAMPLE system(1) REPEATABLE(2)",
            "INSERT INTO t VALUES (1, 'x') ON CONFLICT DO NOTHING",
            "UPDATE t SET a = 'x' WHERE id = 1 RETURNING 1",
            "WITH d AS (DELETE FROM t WHERE id = 1 RETURNING *) SELECT * FROM d",
            "SELECT 1 INTO t2 FROM t FOR UPDATE",
            "SELECT 1 FROM t WHERE a LIKE 'x' ESCAPE '!' AND now() AT TIME ZONE 'UTC' > '1'",
            "SELECT ('x').f, $1.f FROM t",
            "SELECT JSON_OBJECT('a' VALUE 1), xmlparse(document '<a/>')",
        ];
        let values = [
            "1",
            "2147483648",
            "1.5",
            "'x'",
            "''",
            "'on'",
            "'pg_authid'",
            "E'\\''",
            "$a$x$a$",
            "U&'\\0041'",
            "B'01'",
            "X'1F'",
            "NULL",
            "TRUE",
            "-1",
            "$9",
        ];
        // `text` with each token `keep` picks replaced by each value.
        let swaps = |text: &str, keep: &dyn Fn(&ScanToken) -> bool| -> Vec<String> {
            let tokens = pg_query::scan_tokens(text).unwrap_or_default();
            let spans = tokens.iter().filter(|t| keep(t));
            spans
                .flat_map(|t| {
                    let (s, e) = (t.start as usize, t.end as usize);
                    values.map(|v| format!("{}{v}{}", &text[..s], &text[e..]))
                })
                .collect()
        };
        let mut texts: Vec<String> = Vec::new();
        for &text in TEXTS {
            texts.push(text.into());
            let tokens = pg_query::scan_tokens(text).unwrap();
            for w in tokens.windows(2).filter(|w| is_constant(w[1].token)) {
                let glued = format!(
                    "{}{}",
                    &text[..w[0].end as usize],
                    &text[w[1].start as usize..]
                );
                if classify(&glued).is_ok() {
                    texts.push(glued);
                }
            }
        }
        let (mut by_tokens, mut by_shape) = (0, 0);
        for a in &texts {
            let mut probes = swaps(a, &|t| is_constant(t.token));
            if let Ok(shape) = pg_query::normalize(a) {
                probes.extend(swaps(&shape, &|t| t.token == Token::Param as i32));
                probes.push(shape);
            }
            for b in probes {
                let c = StatementCache::default();
                c.classify(a);
                let (o, level) = c.lookup(&b);
                by_tokens += usize::from(level == Served::Tokens);
                by_shape += usize::from(level == Served::Shape);
                assert_eq!(*o, classify(&b), "{b:?} served by {level:?} after {a:?}");
            }
        }
        // Not vacuous: both keys served many of them.
        assert!(by_tokens > 100 && by_shape > 100, "{by_tokens} {by_shape}");
    }
}
