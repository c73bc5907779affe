//! Retention: which backups a policy keeps ([`policy`], pure) and applying it to the store
//! ([`prune`]): backups, the WAL only dropped base backups needed, and what interrupted writers
//! left behind.

mod leftovers;
pub(crate) mod policy;
pub(crate) mod prune;

pub(crate) use policy::{Policy, parse_policy};
pub(crate) use prune::{PruneReport, prune};
