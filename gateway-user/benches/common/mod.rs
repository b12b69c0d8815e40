//! What every bench of this crate shares: short criterion runs (a 2-core machine runs the
//! whole set in well under a minute), each figure printed beside its baselines.

use criterion::Criterion;
use std::time::Duration;

pub fn criterion() -> Criterion {
    Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}
