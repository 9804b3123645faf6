//! The running registry, over HTTP: its client (HEAD of blobs, token and basic auth,
//! TLS, a unix socket) and what its garbage collection logs. It reads; it never
//! pushes, deletes or changes anything in the registry.

pub(crate) mod client;
pub(crate) mod endpoint;
pub(crate) mod gc_log;
