//! The running registry, over HTTP: its client (HEAD of blobs, token and basic auth,
//! TLS, a unix socket) and what its garbage collection logs. It reads; it never
//! pushes, deletes or changes anything in the registry.

pub mod client;
pub mod endpoint;
pub mod gc_log;
