//! Retention: which backups a policy keeps ([`policy`], pure) and applying it to the store
//! ([`prune`]): backups, the WAL only dropped base backups needed, and what interrupted writers
//! left behind.

mod leftovers;
pub mod policy;
pub mod prune;

pub use policy::{Decision, Policy, PolicyError, parse_policy};
pub use prune::{PruneItem, PruneReport, What, prune};
