//! The integration tests, as one binary (compiled and linked once): each module
//! proves a capability against the real servers - `redis-server`, the registry
//! (`docker-registry`), `skopeo`, `moto_server`, Azurite - started by `common` on
//! 127.0.0.1 with ports picked at run time. A failing assertion prints the command, its
//! exit status and its output.

mod common;

mod architecture;
mod azure_gcs;
mod check_cases;
mod check_inmemory;
mod check_registry;
mod cluster;
mod deploy;
mod gc_registry;
mod gc_restart;
mod hostile_inputs;
mod hostile_storage;
mod image;
mod monitoring;
mod probe_registry;
mod purge_registry;
mod purge_repair;
mod pushgateway;
mod s3;
mod shards;
mod storage_and_dumps;
mod synth_smoke;
