//! Planning through the engine seam: each engine's plan says what the job holds and reads, and a
//! request this agent cannot serve is refused with the same message, before any job starts.
//! The engines are configured by URL only: planning never connects.

use chrono::{TimeZone, Utc};
use soma_proto::v1;

use super::*;
use crate::catalog::{Target, Tool};

async fn context(postgres: bool, qdrant: bool) -> (tempfile::TempDir, Context) {
    crate::ops::test_context(
        postgres.then(|| {
            crate::engine::postgres::Postgres::new("postgresql://soma@127.0.0.1:1/appdb", None)
                .unwrap()
        }),
        qdrant
            .then(|| crate::engine::qdrant::Qdrant::new("http://127.0.0.1:1", None, None).unwrap()),
    )
    .await
}

/// Commits a completed manifest of `engine` and `kind` (members for a set) and returns it.
async fn commit(
    ctx: &Context,
    second: u32,
    engine: Engine,
    kind: Kind,
    name: &str,
    members: &[Manifest],
) -> Manifest {
    let at = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, second).unwrap();
    let m = Manifest::completed(
        BackupId::new(at, engine.id_engine(), name),
        engine,
        kind,
        Target {
            name: name.into(),
            server: "localhost".into(),
            server_version: "15".into(),
        },
        Tool {
            name: "test".into(),
            version: "1".into(),
        },
        at,
    )
    .with_members(members);
    ctx.catalog.commit(&m).await.unwrap();
    m
}

fn restore_of(id: &BackupId) -> v1::RestoreRequest {
    v1::RestoreRequest {
        backup_id: id.to_string(),
        ..Default::default()
    }
}

async fn restore_error(ctx: &Context, id: &BackupId) -> OpError {
    RestorePlan::from_request(ctx, restore_of(id))
        .await
        .unwrap_err()
}

fn backup(ctx: &Context, req: v1::BackupRequest) -> Result<BackupPlan, OpError> {
    BackupPlan::from_request(ctx, req, Utc::now())
}

fn about(job: &JobInfo) -> (&str, &str, &str) {
    (&job.about.engine, &job.about.target, &job.about.kind)
}

#[tokio::test]
async fn each_engine_plans_its_backup_with_the_job_it_runs_as() {
    let (_dir, ctx) = context(true, true).await;
    let postgres = |database: &str, physical, all_databases| v1::BackupRequest {
        engine: v1::Engine::Postgres as i32,
        database: database.into(),
        physical,
        all_databases,
        ..Default::default()
    };

    let plan = backup(&ctx, postgres("", false, false)).unwrap();
    let job = plan.job();
    assert_eq!(about(&job), ("postgres", "appdb", "logical"));
    assert_eq!(job.targets, vec![JobTarget::Database("appdb".into())]);
    assert_eq!(plan.ids(), vec![plan.id().clone()]);
    assert!(plan.id().as_str().contains("appdb"), "{}", plan.id());

    let job = backup(&ctx, postgres("other", false, false)).unwrap().job();
    assert_eq!(about(&job), ("postgres", "other", "logical"));
    let job = backup(&ctx, postgres("", false, true)).unwrap().job();
    assert_eq!(
        about(&job),
        (
            "postgres",
            crate::ops::postgres::ALL_DATABASES,
            "logical-cluster"
        )
    );
    assert_eq!(job.targets, vec![JobTarget::Cluster]);
    let job = backup(&ctx, postgres("", true, false)).unwrap().job();
    assert_eq!(about(&job), ("postgres", "cluster", "physical"));
    assert_eq!(job.targets, vec![JobTarget::Cluster]);

    let qdrant = |collections: &[&str], mode: v1::QdrantMode| v1::BackupRequest {
        engine: v1::Engine::Qdrant as i32,
        collections: collections.iter().map(|c| c.to_string()).collect(),
        qdrant_mode: mode as i32,
        ..Default::default()
    };
    let job = backup(&ctx, qdrant(&[], v1::QdrantMode::Unspecified))
        .unwrap()
        .job();
    assert_eq!(about(&job), ("qdrant", "all", "collection-snapshots"));
    assert_eq!(job.targets, vec![JobTarget::Qdrant]);
    let plan = backup(&ctx, qdrant(&["a", "b"], v1::QdrantMode::ShardStream)).unwrap();
    assert_eq!(
        about(&plan.job()),
        ("qdrant", "a,b", "shard-stream-snapshots")
    );
    assert!(
        plan.id().as_str().contains("2-collections"),
        "{}",
        plan.id()
    );
}

#[tokio::test]
async fn backup_all_is_a_set_of_every_configured_engine_in_order() {
    let (_dir, ctx) = context(true, true).await;
    let all = |physical, set_id: &str| v1::BackupRequest {
        all: true,
        physical,
        set_id: set_id.into(),
        ..Default::default()
    };
    let plan = backup(&ctx, all(false, "")).unwrap();
    let job = plan.job();
    assert_eq!(about(&job), ("set", "all", "set"));
    assert_eq!(job.targets, vec![JobTarget::Cluster, JobTarget::Qdrant]);
    let BackupPlan::Set {
        members, commit, ..
    } = &plan
    else {
        panic!("backup all is not a set: {plan:?}");
    };
    assert!(*commit);
    let kinds: Vec<_> = members.iter().map(|m| (m.engine(), m.kind())).collect();
    assert_eq!(
        kinds,
        vec![
            (Engine::Postgres, Kind::LogicalCluster),
            (Engine::Qdrant, Kind::QdrantCollections)
        ]
    );
    // The set's own id first, then its members', each written by this agent.
    let ids = plan.ids();
    assert_eq!(ids.len(), 3);
    assert_eq!(&ids[0], plan.id());
    assert_eq!(ids[1], *members[0].id());

    let plan = backup(&ctx, all(true, "")).unwrap();
    let BackupPlan::Set { members, .. } = &plan else {
        panic!("backup all is not a set: {plan:?}");
    };
    assert_eq!(members[0].kind(), Kind::Physical);

    // A platform set's id is the plugin's to write: not among those an interruption removes.
    let set_id = BackupId::new(Utc::now(), crate::catalog::IdEngine::Set, "platform");
    let plan = backup(&ctx, all(false, set_id.as_str())).unwrap();
    assert_eq!(plan.id(), &set_id);
    assert!(!plan.ids().contains(&set_id));
    assert_eq!(plan.ids().len(), 2);

    let (_dir, only_qdrant) = context(false, true).await;
    let plan = backup(&only_qdrant, all(false, "")).unwrap();
    assert_eq!(plan.job().targets, vec![JobTarget::Qdrant]);
}

#[tokio::test]
async fn a_backup_this_agent_cannot_take_is_refused_with_what_to_configure() {
    let (_dir, none) = context(false, false).await;
    let err = backup(
        &none,
        v1::BackupRequest {
            all: true,
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("no engine configured (--postgres-url, --qdrant-url)"),
        "{err}"
    );
    let err = backup(&none, v1::BackupRequest::default())
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("missing engine"), "{err}");
    let set = v1::BackupRequest {
        engine: v1::Engine::Set as i32,
        ..Default::default()
    };
    assert!(
        backup(&none, set)
            .unwrap_err()
            .to_string()
            .starts_with("missing engine")
    );
    for (engine, flag) in [
        (v1::Engine::Postgres, "--postgres-url"),
        (v1::Engine::Qdrant, "--qdrant-url"),
    ] {
        let req = v1::BackupRequest {
            engine: engine as i32,
            ..Default::default()
        };
        let err = backup(&none, req).unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
        assert!(err.to_string().contains(flag), "{err}");
    }
}

#[tokio::test]
async fn each_backup_is_restored_through_its_engine_and_a_set_through_its_members() {
    let (_dir, ctx) = context(true, true).await;
    let logical = commit(&ctx, 1, Engine::Postgres, Kind::Logical, "app", &[]).await;
    let qdrant = commit(&ctx, 2, Engine::Qdrant, Kind::QdrantCollections, "all", &[]).await;
    let set = commit(
        &ctx,
        3,
        Engine::Set,
        Kind::Set,
        "all",
        &[logical.clone(), qdrant.clone()],
    )
    .await;

    let plan = RestorePlan::from_request(&ctx, restore_of(&logical.id))
        .await
        .unwrap();
    let job = plan.job();
    assert_eq!(job.id, logical.id.to_string());
    assert_eq!(job.targets, vec![JobTarget::Database("app".into())]);
    assert_eq!(job.uses, vec![logical.id.clone()]);
    assert_eq!(about(&job), ("postgres", "", ""));
    assert!(matches!(
        plan.interrupted(),
        crate::runner::Interrupted::Nothing
    ));
    let into_other = v1::RestoreRequest {
        database: "copy".into(),
        ..restore_of(&logical.id)
    };
    let job = RestorePlan::from_request(&ctx, into_other)
        .await
        .unwrap()
        .job();
    assert_eq!(job.targets, vec![JobTarget::Database("copy".into())]);

    let job = RestorePlan::from_request(&ctx, restore_of(&qdrant.id))
        .await
        .unwrap()
        .job();
    assert_eq!(job.targets, vec![JobTarget::Qdrant]);
    assert_eq!(about(&job), ("qdrant", "", ""));

    // A set's members are restored whole: the request's database is not theirs.
    let whole = v1::RestoreRequest {
        database: "copy".into(),
        ..restore_of(&set.id)
    };
    let job = RestorePlan::from_request(&ctx, whole).await.unwrap().job();
    assert_eq!(about(&job), ("set", "", ""));
    assert_eq!(
        job.targets,
        vec![JobTarget::Database("app".into()), JobTarget::Qdrant]
    );
    assert_eq!(job.uses, vec![set.id.clone(), logical.id, qdrant.id]);
}

#[tokio::test]
async fn a_restore_this_agent_cannot_run_is_refused_with_the_same_advice() {
    let (_dir, ctx) = context(true, false).await;
    let physical = commit(&ctx, 1, Engine::Postgres, Kind::Physical, "cluster", &[]).await;
    let logical = commit(&ctx, 2, Engine::Postgres, Kind::Logical, "app", &[]).await;
    let qdrant = commit(&ctx, 3, Engine::Qdrant, Kind::QdrantCollections, "all", &[]).await;
    let with_base = commit(
        &ctx,
        4,
        Engine::Set,
        Kind::Set,
        "all",
        &[logical.clone(), physical.clone()],
    )
    .await;
    let inner = commit(
        &ctx,
        5,
        Engine::Set,
        Kind::Set,
        "inner",
        std::slice::from_ref(&logical),
    )
    .await;
    let nested = commit(
        &ctx,
        6,
        Engine::Set,
        Kind::Set,
        "outer",
        std::slice::from_ref(&inner),
    )
    .await;
    let with_qdrant = commit(
        &ctx,
        7,
        Engine::Set,
        Kind::Set,
        "mixed",
        &[logical.clone(), qdrant.clone()],
    )
    .await;

    let err = restore_error(&ctx, &physical.id).await.to_string();
    assert_eq!(
        err,
        format!(
            "backup {} is a physical base backup: restore it into an empty data directory with --pgdata DIR (and --target-time / --target-lsn), or run `soma-agent restore-pgdata` where PostgreSQL's data lives",
            physical.id
        )
    );
    let err = restore_error(&ctx, &with_base.id).await.to_string();
    assert!(
        err.starts_with(&format!(
            "backup set {} holds a physical PostgreSQL base backup ({}), which is restored into an empty data directory: run `soma-agent restore-pgdata --backup {}`",
            with_base.id, physical.id, physical.id
        )),
        "{err}"
    );
    let err = restore_error(&ctx, &nested.id).await;
    assert_eq!(err.code(), tonic::Code::DataLoss, "{err}");
    assert!(err.to_string().contains(inner.id.as_str()), "{err}");
    let err = restore_error(&ctx, &qdrant.id).await;
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert!(err.to_string().contains("--qdrant-url"), "{err}");
    let err = restore_error(&ctx, &with_qdrant.id).await;
    assert!(err.to_string().contains("--qdrant-url"), "{err}");

    let (_dir, none) = context(false, false).await;
    let copied = commit(&none, 2, Engine::Postgres, Kind::Logical, "app", &[]).await;
    let err = restore_error(&none, &copied.id).await;
    assert!(err.to_string().contains("--postgres-url"), "{err}");
}
