//! Verify: re-read every artifact of a backup (for a set, of every member) and check sizes and
//! digests; for a base backup, also the WAL a restore would replay.

use std::sync::Arc;

use super::{Context, Outcome, artifact::verify_artifact, set::members_of};
use crate::{catalog::Manifest, error::OpError, jobs::Reporter};

/// Reads every artifact of `manifest` (or of its members) back from the store.
pub(crate) async fn verify(
    ctx: Arc<Context>,
    manifest: Manifest,
    reporter: Reporter,
) -> Result<Outcome, OpError> {
    reporter.set_operation_id(manifest.id.as_str());
    let backups = if manifest.members.is_empty() {
        vec![manifest.clone()]
    } else {
        members_of(&ctx.source, &manifest).await?
    };
    reporter.set_expected_raw(backups.iter().map(|b| b.raw_bytes).sum());
    let store = ctx.source.store().as_ref();
    let mut artifacts = 0;
    let mut shard_report = String::new();
    for backup in &backups {
        // What a restore reads first: details that do not parse make the backup unrestorable.
        super::details::Details::of(backup)?;
        let method = super::method::of(backup.engine, backup.kind);
        if let Some(method) = method {
            shard_report.push_str(&method.verify_manifest(backup)?);
        }
        for art in &backup.artifacts {
            reporter.phase(
                "verifying",
                format!("reading {} of {}", art.name, backup.id),
            );
            verify_artifact(store, backup, art, reporter.counters()).await?;
            artifacts += 1;
        }
    }
    // A base backup is only as good as the WAL that rolls it forward: re-read that too.
    let mut wal_report = String::new();
    for backup in &backups {
        if let Some(method) = super::method::of(backup.engine, backup.kind) {
            wal_report.push_str(&method.verify_beyond(&ctx, backup, &reporter).await?);
        }
    }
    Ok(Outcome::new(
        format!(
            "backup {} verified: {artifacts} artifact(s), sizes and sha256 digests match the manifest{shard_report}{wal_report}",
            manifest.id,
        ),
        manifest,
    ))
}
