//! Drills of Qdrant collection backups: each collection restored under a scratch name (the
//! restore's `rename_to`, which never touches aliases), then its points count and vector
//! configuration compared with the backup's record, and an exact search with the recorded sample
//! vector expected to rank the recorded point first.

use std::{sync::Arc, time::Instant};

use serde_json::Value;

use crate::ops::drill::{Check, Scratch, ScratchItem};
use crate::{
    catalog::Manifest,
    engine::qdrant::Qdrant,
    error::OpError,
    jobs::Reporter,
    ops::{
        Context,
        method::DrillResult,
        qdrant::{CollectionRecord, QdrantDetails, layout::ShardLayout, restore_qdrant},
    },
};

/// Restores every collection of `m` under a scratch name and compares; the RTO is the time until
/// the last one was restored.
pub(in crate::ops) async fn drill(
    ctx: &Arc<Context>,
    m: &Manifest,
    scratch: &Scratch,
    reporter: &Reporter,
) -> Result<DrillResult, OpError> {
    let q = ctx.qdrant()?;
    let details = QdrantDetails::of(m)?;
    let existing = q.collections().await?;
    let started = Instant::now();
    let mut restored = Vec::with_capacity(details.collections.len());
    for name in details.collections.keys() {
        let target = scratch.name(name);
        if existing.contains(&target) {
            // Never overwrite (nor later delete) a collection this drill did not create.
            return Err(crate::engine::qdrant::QdrantError::Exists(target).into());
        }
        scratch.register(ScratchItem::Collection(target.clone()));
        restore_qdrant(
            ctx.clone(),
            m.clone(),
            vec![name.clone()],
            Some(target.clone()),
            false,
            reporter.clone(),
        )
        .await?;
        restored.push((name, target));
    }
    let rto_seconds = started.elapsed().as_secs_f64();

    let mut checks = Vec::new();
    for (name, target) in restored {
        let record = &details.collections[name];
        reporter.phase(
            "validating",
            format!("checking scratch collection {target}"),
        );
        checks.extend(validate(q, name, record, &target).await?);
    }
    Ok(DrillResult {
        rto_seconds,
        checks,
    })
}

/// The checks of one scratch collection against the backup's record of collection `name`.
async fn validate(
    q: &Qdrant,
    name: &str,
    record: &CollectionRecord,
    target: &str,
) -> Result<Vec<Check>, OpError> {
    let mut checks = vec![Check::fact(
        format!("{name}: restore"),
        "snapshot recovers",
        format!("restored as scratch collection {target}"),
        true,
    )];
    let info = q.collection_info(target).await?;
    let points = info.get("points_count").and_then(Value::as_u64);
    if let Some(layout) = &record.layout {
        checks.extend(check_layout(q, name, record, layout, target, &info).await?);
    }
    match record.points_count {
        Some(expected) => checks.push(Check::compare(
            format!("{name}: points count"),
            expected.to_string(),
            points.map_or_else(|| "unknown".into(), |p| p.to_string()),
        )),
        None => checks.push(Check::skipped(
            format!("{name}: points count"),
            "no points count recorded: not compared",
        )),
    }
    let vectors = |config: &Value| config["params"]["vectors"].clone();
    checks.push(Check::compare(
        format!("{name}: vector configuration"),
        vectors(&record.config).to_string(),
        vectors(&info["config"]).to_string(),
    ));
    checks.push(match &record.sample {
        Some(sample) => {
            let found = q
                .exact_search(target, &sample.vector, sample.using.as_deref(), 1)
                .await?;
            Check::compare(
                format!("{name}: sample search (point {})", sample.id),
                format!("nearest point {}", sample.nearest),
                found.first().map_or_else(
                    || "no point found".into(),
                    |id| format!("nearest point {id}"),
                ),
            )
        }
        None => Check::skipped(
            format!("{name}: sample search"),
            "no sample point recorded: search not tried",
        ),
    });
    Ok(checks)
}

/// For a collection backed up shard by shard: its exact points count within what the backup
/// saw, and its shard layout as recorded.
async fn check_layout(
    q: &Qdrant,
    name: &str,
    record: &CollectionRecord,
    layout: &ShardLayout,
    target: &str,
    info: &Value,
) -> Result<[Check; 2], OpError> {
    let found = q.exact_count(target).await?;
    let (low, high) = layout.count_range();
    let expected = if low == high {
        low.to_string()
    } else {
        format!("between {low} and {high} (writes during the backup)")
    };
    let count = Check::fact(
        format!("{name}: points count (exact)"),
        &expected,
        found.to_string(),
        (low..=high).contains(&found),
    );
    let shape = |shards: usize, params: &Value| {
        format!(
            "{shards} shard(s), replication factor {}, write consistency {}, sharding {}",
            params["replication_factor"].as_u64().unwrap_or(1),
            params["write_consistency_factor"].as_u64().unwrap_or(1),
            params["sharding_method"].as_str().unwrap_or("auto"),
        )
    };
    let scratch_shards = q.collection_cluster(target).await?.shards().len();
    let shards = Check::compare(
        format!("{name}: shard layout"),
        shape(layout.shards.len(), &record.config["params"]),
        shape(scratch_shards, &info["config"]["params"]),
    );
    Ok([count, shards])
}
