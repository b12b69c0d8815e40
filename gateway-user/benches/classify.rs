//! Statement classification under `pgbench -S`, each beside a baseline over the same texts.
//!
//! `cargo bench -p gateway-user --bench classify`. Every iteration takes the next of 100,000
//! texts `SELECT abalance FROM pgbench_accounts WHERE aid = <n>;` (more than the cache's exact
//! map holds, so the literal is always new to it), as pgbench's simple protocol sends them:
//! - `cache_fresh_literal`: a warm `StatementCache` (what the proxy does per Query)
//! - `cache_repeated_text`: the same text every time (an exact hit)
//! - `scan_tokens`, `normalize`, `parse`: pg_query's lexer, normalization (the full parser) and
//!   parse to a tree, alone
//! - `classify_uncached`: a full classification, what a cache miss costs

mod common;

use chaperone::protocols::postgres::{cache::StatementCache, classify::classify};
use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;

const TEXTS: usize = 100_000;

/// Cycles through the texts, so that no iteration repeats the one before.
struct Texts {
    all: Vec<String>,
    next: usize,
}

impl Texts {
    fn new() -> Self {
        let all = (0..TEXTS)
            // Spread like pgbench's random aids over 100,000 × scale accounts.
            .map(|i| {
                let aid = 1 + (i as u64).wrapping_mul(2_654_435_761) % 1_000_000;
                format!("SELECT abalance FROM pgbench_accounts WHERE aid = {aid};")
            })
            .collect();
        Texts { all, next: 0 }
    }

    fn next(&mut self) -> &str {
        self.next = (self.next + 1) % self.all.len();
        &self.all[self.next]
    }
}

fn bench(c: &mut Criterion) {
    let mut texts = Texts::new();
    let mut g = c.benchmark_group("pgbench_select");

    let cache = StatementCache::default();
    cache.classify(texts.next());
    g.bench_function("cache_fresh_literal", |b| {
        b.iter(|| cache.classify(black_box(texts.next())))
    });
    let same = texts.next().to_string();
    cache.classify(&same);
    g.bench_function("cache_repeated_text", |b| {
        b.iter(|| cache.classify(black_box(&same)))
    });
    g.bench_function("scan_tokens", |b| {
        b.iter(|| pg_query::scan_tokens(black_box(texts.next())))
    });
    g.bench_function("normalize", |b| {
        b.iter(|| pg_query::normalize(black_box(texts.next())))
    });
    g.bench_function("parse", |b| {
        b.iter(|| pg_query::parse(black_box(texts.next()), pg_query::ParserOptions::DEFAULT))
    });
    g.bench_function("classify_uncached", |b| {
        b.iter(|| classify(black_box(texts.next())))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = bench
}
criterion_main!(benches);
