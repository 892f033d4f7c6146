//! The SQL-facing functions that are not batch jobs. Each translates between SQL values and
//! `psap_core`, or checks and writes the registry, nothing more.

pub mod census;
pub mod compat;
pub mod crypto;
pub mod fmgr;
pub mod operators;
pub mod registry;
pub mod target;
