//! The SQL-facing functions. Each translates between SQL values and `psap_core`, nothing more.

pub mod audit;
pub mod census;
pub mod crypto;
pub mod rotate;
pub mod target;
