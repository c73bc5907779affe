//! The seam between the operations and the ways a backup is taken: one [`Method`] per engine and
//! kind — PostgreSQL logical dumps (one database or the whole cluster, [`super::postgres`]),
//! PostgreSQL base backups ([`super::physical`]) and Qdrant snapshots ([`super::qdrant`]) —
//! each implemented in its own module and chosen in one place, [`of`]. Sets are not a method:
//! they compose their members through it. A backup request names an engine, not a kind: each
//! engine plans its backups (choosing among its kinds) through [`EnginePlans`], registered in
//! [`ENGINES`] next to [`of`], so a new engine or mode touches its own module and these two.
//!
//! Operations that are the same for every backup (reading artifacts back, the drill's report and
//! scratch clean-up) stay with the operation; a method supplies only what differs.

use std::{future::Future, pin::Pin, sync::Arc};

use chrono::{DateTime, Utc};
use soma_proto::v1;

use super::{
    Context,
    details::Details,
    drill::{Check, Scratch},
    plan::{EngineBackup, EngineRestore, RestoreAsk},
};
use crate::{
    catalog::{BackupId, Engine, Kind, Manifest},
    error::OpError,
    jobs::Reporter,
};

/// A boxed future borrowing what the call was given (object safety rules out `async fn`).
pub(crate) type MethodFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, OpError>> + Send + 'a>>;

/// What one backup's restore drill found.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct DrillResult {
    /// Seconds from the start of the scratch restore until the restored data was usable.
    pub rto_seconds: f64,
    /// Every check, in the order made.
    pub checks: Vec<Check>,
}

/// How backups of one engine and kind are checked and drilled. Implementations must treat the
/// manifest as untrusted (it is read back from the store): anything that does not hold is an
/// error naming the backup, never a panic.
pub(crate) trait Method: Send + Sync {
    /// Refuses, before a drill's job starts, a backup this agent cannot drill (the engine is not
    /// configured, or drills do not cover the kind).
    fn check_drillable(&self, ctx: &Context, m: &Manifest) -> Result<(), OpError>;

    /// Restores `m` into scratch targets registered with `scratch` (the caller removes them
    /// whatever happens) and checks the copy against what the backup recorded. A drill that ran
    /// and found a mismatch returns failed checks; one that could not run is an error.
    fn drill<'a>(
        &'a self,
        ctx: &'a Arc<Context>,
        m: &'a Manifest,
        scratch: &'a Scratch,
        reporter: &'a Reporter,
    ) -> MethodFuture<'a, DrillResult>;

    /// Plans restoring `m` as `ask` says. `set` names the set when `m` is one of its members
    /// (restored whole, under its own names). A backup this method does not restore that way is
    /// an error saying what to do instead; an engine this agent does not run is refused here,
    /// before the job starts.
    fn plan_restore(
        &self,
        ctx: &Context,
        m: Manifest,
        ask: &RestoreAsk,
        set: Option<&BackupId>,
    ) -> Result<Box<dyn EngineRestore>, OpError>;

    /// The manifest's details, read as this method writes them; details that are not are an
    /// error naming the backup.
    fn details(&self, m: &Manifest) -> Result<Details, OpError>;

    /// Checks a verify makes on the manifest before reading its artifacts back; returns what
    /// the verify's summary adds (empty: nothing).
    fn verify_manifest(&self, _m: &Manifest) -> Result<String, OpError> {
        Ok(String::new())
    }

    /// What a verify reads beyond the backup's artifacts once they are checked (a base backup's
    /// WAL); returns what its summary adds.
    fn verify_beyond<'a>(
        &'a self,
        _ctx: &'a Context,
        _m: &'a Manifest,
        _reporter: &'a Reporter,
    ) -> MethodFuture<'a, String> {
        Box::pin(async { Ok(String::new()) })
    }
}

/// The method of backups of `engine` and `kind`: the one registration a new engine or mode adds
/// itself to. `None` for a set. A kind an engine does not write falls to that engine's general
/// method (its own checks of the details then refuse the backup), as before this seam.
pub(crate) fn of(engine: Engine, kind: Kind) -> Option<&'static dyn Method> {
    match engine {
        Engine::Postgres if kind == Kind::Physical => Some(&super::physical::PhysicalMethod),
        Engine::Postgres => Some(&super::postgres::LogicalMethod),
        Engine::Qdrant => Some(&super::qdrant::QdrantMethod),
        Engine::Set => None,
    }
}

/// How one engine plans its backups from a request (which of its kinds, of what).
pub(crate) trait EnginePlans: Send + Sync {
    /// The engine a request names to ask for this one.
    fn proto(&self) -> v1::Engine;

    /// The engine as manifests name it.
    fn engine(&self) -> Engine;

    /// The backup a request naming this engine asks for; an engine this agent does not run is
    /// an error.
    fn plan_backup(
        &self,
        ctx: &Context,
        req: v1::BackupRequest,
        now: DateTime<Utc>,
    ) -> Result<Box<dyn EngineBackup>, OpError>;

    /// This engine's member of a "backup all" set (everything it holds, so that restoring the
    /// set brings it all back), or `None` when this agent does not run it. `physical` asks for
    /// a base backup where the engine has one.
    fn set_member(
        &self,
        ctx: &Context,
        physical: bool,
        now: DateTime<Utc>,
    ) -> Option<Box<dyn EngineBackup>>;
}

/// Every engine a request can name, in the order a set's members are backed up: the one
/// registration a new engine adds itself to (with [`of`] for its manifests).
pub(crate) static ENGINES: &[&dyn EnginePlans] =
    &[&super::postgres::PostgresPlans, &super::qdrant::QdrantPlans];

/// The engine a request names; `None` for none (or a set, which is not an engine).
pub(crate) fn for_request(engine: v1::Engine) -> Option<&'static dyn EnginePlans> {
    ENGINES.iter().copied().find(|e| e.proto() == engine)
}
