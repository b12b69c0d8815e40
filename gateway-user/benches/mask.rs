//! Masking throughput and latency, each beside a baseline over the same bytes.
//!
//! `cargo bench -p gateway-user --bench mask`. The rows imitate a result set: ids, names,
//! statuses, timestamps and amounts, free-text notes that sometimes carry an email, card or
//! phone number, a small JSON profile and a text array. Each column is resolved once with
//! `Masker::column`, as the PostgreSQL proxy does per RowDescription.

mod common;

use chaperone::mask::{Column, MaskRules, Masker, TokenKey, ValueType};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

const ROWS: usize = 2_000;

/// A small deterministic generator (no rand dependency for a bench fixture).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.next() as usize % xs.len()]
    }
}

fn columns() -> Vec<(&'static str, ValueType)> {
    vec![
        ("id", ValueType::Number),
        ("name", ValueType::Text),
        ("status", ValueType::Text),
        ("created_at", ValueType::Timestamp),
        ("amount", ValueType::Number),
        ("notes", ValueType::Text),
        ("email", ValueType::Text),
        ("profile", ValueType::Json),
        ("tags", ValueType::Array(Box::new(ValueType::Text))),
    ]
}

fn rows() -> Vec<Vec<String>> {
    let mut r = Lcg(42);
    let names = [
        "Jane Doe",
        "John Smith",
        "Maria Garcia",
        "Wei Chen",
        "Olu Okafor",
        "Anna Kowalski",
    ];
    let statuses = ["active", "pending", "disabled", "shipped", "refunded"];
    let clean_notes = [
        "Customer asked about the delivery window, follow up next week.",
        "Order shipped from the north warehouse",
        "no notes",
        "Prefers paper invoices. Account reviewed by the finance team in March.",
        "Returned two items, refund issued",
        "",
    ];
    let dirty_notes = [
        "Reach her at jane.doe@example.com after 5pm",
        "paid with 4111 1111 1111 1111, exp 12/27",
        "call (415) 555-0132 before shipping",
        "IBAN DE89 3704 0044 0532 0130 00 for the refund",
    ];
    (0..ROWS)
        .map(|i| {
            let note = if r.next().is_multiple_of(10) {
                r.pick(&dirty_notes)
            } else {
                r.pick(&clean_notes)
            };
            let name = r.pick(&names);
            let email = if r.next().is_multiple_of(3) {
                format!("{}@example.com", name.to_lowercase().replace(' ', "."))
            } else {
                String::new()
            };
            vec![
                (100_000 + i).to_string(),
                name.to_string(),
                r.pick(&statuses).to_string(),
                format!(
                    "2025-0{}-1{} 10:2{}:00+00",
                    1 + r.next() % 9,
                    r.next() % 9,
                    r.next() % 9
                ),
                format!("{}.{:02}", r.next() % 5000, r.next() % 100),
                note.to_string(),
                email,
                format!(
                    r#"{{"plan": "{}", "seats": {}, "newsletter": {}}}"#,
                    r.pick(&["free", "team", "enterprise"]),
                    r.next() % 50,
                    r.next().is_multiple_of(2)
                ),
                format!(
                    "{{{},{}}}",
                    r.pick(&statuses),
                    r.pick(&["vip", "eu", "\"needs review\""])
                ),
            ]
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let masker = Masker::new(&MaskRules::default(), TokenKey::from_bytes([7; 32])).unwrap();
    let cols = columns();
    let plans: Vec<_> = cols
        .iter()
        .map(|(name, ty)| masker.column(&Column::named(name, ty.clone())))
        .collect();
    let rows = rows();
    let bytes: usize = rows.iter().flatten().map(String::len).sum();

    let mut g = c.benchmark_group("rows");
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function("mask", |b| {
        b.iter(|| {
            let mut changed = 0;
            for row in &rows {
                for (plan, v) in plans.iter().zip(row) {
                    changed += plan.mask(black_box(v.as_bytes())).changed() as usize;
                }
            }
            changed
        })
    });
    g.bench_function("baseline_copy", |b| {
        b.iter(|| {
            let mut n = 0;
            for row in &rows {
                for v in row {
                    n += black_box(v.as_bytes().to_vec()).len();
                }
            }
            n
        })
    });
    g.bench_function("baseline_memchr_at", |b| {
        b.iter(|| {
            let mut n = 0;
            for row in &rows {
                for v in row {
                    n += memchr::memchr(b'@', black_box(v.as_bytes())).is_some() as usize;
                }
            }
            n
        })
    });
    g.finish();

    let mut g = c.benchmark_group("clean_short_value");
    let value = b"Jane Doe";
    let col = Column::named("name", ValueType::Text);
    let plan = masker.column(&col);
    g.bench_function("column_masker", |b| {
        b.iter(|| plan.mask(black_box(value)).changed())
    });
    g.bench_function("masker_mask_resolving_column", |b| {
        b.iter(|| masker.mask(black_box(&col), black_box(value)).changed())
    });
    g.bench_function("baseline_copy", |b| {
        b.iter_batched(|| value, |v| black_box(v.to_vec()), BatchSize::SmallInput)
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = bench
}
criterion_main!(benches);
