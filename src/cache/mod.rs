//! The registry's blob-descriptor cache, read: Redis (a server or a Redis Cluster,
//! streamed with SCAN and pipelines) or a dump written by `export-cache`, into one
//! compact `CacheIndex`. Readers only: nothing here sends a command that writes.

pub(crate) mod cluster;
pub(crate) mod dump;
pub(crate) mod index;
pub(crate) mod redis;
