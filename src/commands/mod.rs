//! The commands, one module each: `check`, `purge` and `restore`, `probe`,
//! `export-cache`, `gc`, `merge`. Each wires the layers below in order - settings,
//! readers, the audit, repair, output - and decides its exit status. A command never
//! calls another command; what several share lives in this module or a helper
//! module here (`live_probe`).

pub mod check;
pub mod export;
pub mod gc;
pub mod live_probe;
pub mod merge;
pub mod probe;
pub mod purge;
pub mod restore;
