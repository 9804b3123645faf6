//! What a run shows: the report (JSON, a table, Prometheus metrics), the one-line
//! verdict and the exit status. It renders data it is given; it never reads storage,
//! the cache or the registry, and never repairs anything.

pub(crate) mod metrics;
pub(crate) mod report;
