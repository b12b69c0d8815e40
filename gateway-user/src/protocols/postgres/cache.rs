//! Classification cache: a repeated statement costs a hash lookup, not a parse.
//!
//! Two levels. Exact text first. Then the normalized statement (pg_query's normalization:
//! constants replaced by `$n`), so `… WHERE id = 1` and `… WHERE id = 2` share one entry; the key
//! is the normalized text itself, compared in full, not its 64-bit fingerprint, whose collisions
//! an agent could search for. Statements whose classification read a constant's content (a `DO`
//! body) are never shared by shape. Both levels are bounded; when full they start over.

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
        let by_shape = shape.as_ref().and_then(|s| self.shapes.lock().unwrap().get(s).cloned());
        let outcome = match by_shape {
            Some(hit) => hit,
            None => {
                let fresh = Arc::new(classify(sql));
                let shareable = matches!(&*fresh, Ok(c) if !c.depends_on_constants);
                if let (Some(shape), true) = (shape, shareable) {
                    insert_bounded(&self.shapes, shape, fresh.clone());
                }
                fresh
            }
        };
        insert_bounded(&self.exact, sql.into(), outcome.clone());
        outcome
    }
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
