//! Classification cache: a repeated statement costs a hash lookup, not a parse.
//!
//! Two keys. The exact text first. Then the normalized statement (pg_query's normalization,
//! PostgreSQL's own lexer: constants replaced by `$n`), so `… WHERE id = 1` and `… WHERE id = 2`
//! share one classification. Keys are full texts compared in full, never a 64-bit fingerprint
//! whose collisions an agent could search for. A statement whose classification read a
//! literal's value (a `DO` body, an EXPLAIN option, a COPY file name, a transaction option) is
//! never shared by shape. Both maps are bounded; when full they start over.
//!
//! No hand-written lexer builds keys: one that ends a comment or a string where PostgreSQL does
//! not would let a harmless statement's verdict serve a harmful one.

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
    exact: Mutex<HashMap<Box<str>, Outcome>>,
    shapes: Mutex<HashMap<String, Outcome>>,
}

impl StatementCache {
    pub fn classify(&self, sql: &str) -> Outcome {
        if let Some(hit) = self.exact.lock().unwrap().get(sql) {
            return hit.clone();
        }
        if sql.len() > MAX_CACHED_LEN {
            return Arc::new(classify(sql));
        }
        let shape = pg_query::normalize(sql).ok();
        let by_shape = shape
            .as_ref()
            .and_then(|s| self.shapes.lock().unwrap().get(s).cloned());
        let outcome = match by_shape {
            Some(hit) => hit,
            None => {
                let fresh = Arc::new(classify(sql));
                if shareable(&fresh)
                    && let Some(shape) = shape
                {
                    insert_bounded(&self.shapes, shape, fresh.clone());
                }
                fresh
            }
        };
        insert_bounded(&self.exact, sql.into(), outcome.clone());
        outcome
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
}
