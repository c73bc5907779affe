//! The Helm chart (`helm/soma-backup`), its examples and the `helm soma-restore` plugin, checked
//! with the real Helm engine.
//!
//! There is no `helm` binary here; Helm 4's Go library ships in the PyPI package `helm-sdkpy`.
//! `tests/helm/helm_engine.py` drives it from a venv (`$SOMA_HELM_VENV`, default
//! `/opt/soma-helm-venv`): `helm lint`, and real `helm install` / `helm upgrade` runs against
//! `tests/helm/fake_kube.py`, an in-memory Kubernetes API server (discovery, CRUD, watch lists)
//! that records every object Helm creates, updates or deletes, as the JSON Helm sent. So these
//! tests see what a cluster would see: which objects, in which order, hooks as Helm classified
//! them, and that a failing hook Job fails the install or stops the upgrade.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

/// The namespace and release helm_engine.py installs into.
const NAMESPACE: &str = "soma-ns";
const FULLNAME: &str = "platform-soma-backup";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn chart() -> PathBuf {
    repo().join("helm/soma-backup")
}

fn examples_dir() -> PathBuf {
    repo().join("helm/examples")
}

/// helm-sdkpy 0.1.32 embeds Helm v4.3.0; fake_kube.py follows what that client-go asks for.
const INSTALL_VENV: &str = "python3 -m venv /opt/soma-helm-venv && \
     /opt/soma-helm-venv/bin/pip install --ignore-requires-python helm-sdkpy==0.1.32";

/// The venv's python, with helm_sdkpy importable; panics with the install command otherwise.
fn python() -> PathBuf {
    let venv = std::env::var_os("SOMA_HELM_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/soma-helm-venv"));
    let python = venv.join("bin/python");
    let ok = python.exists()
        && Command::new(&python)
            .args(["-c", "import helm_sdkpy"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
    assert!(
        ok,
        "the Helm engine (PyPI helm-sdkpy) is not installed in {}: run `{INSTALL_VENV}` \
         (or set SOMA_HELM_VENV to a venv that has it)",
        venv.display()
    );
    python
}

/// Runs tests/helm/helm_engine.py and returns its JSON answer.
fn engine(args: &[&str]) -> Value {
    let script = repo().join("tests/helm/helm_engine.py");
    let out = Command::new(python())
        .arg(&script)
        .args(args)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("run helm_engine.py");
    assert!(
        out.status.success(),
        "helm_engine.py {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "helm_engine.py {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `install` (and optionally `upgrade`) with JSON values; returns {"install": STEP, "upgrade": STEP}.
fn install(values: &Value, extra: &[&str]) -> Value {
    let chart = chart();
    let values = values.to_string();
    let mut args = vec!["install", path_str(&chart), "--set-json", &values];
    args.extend_from_slice(extra);
    engine(&args)
}

fn step_ok(step: &Value, what: &str) {
    assert_eq!(
        step["ok"],
        json!(true),
        "{what} failed: {}",
        step["error"].as_str().unwrap_or("?")
    );
}

/// Objects created in a step, in order: (kind, name, object).
fn created(step: &Value) -> Vec<(String, String, Value)> {
    step["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["verb"] == "create" && e["kind"] != "Secret")
        .map(|e| {
            (
                e["kind"].as_str().unwrap().to_owned(),
                e["name"].as_str().unwrap().to_owned(),
                e["object"].clone(),
            )
        })
        .collect()
}

fn position(list: &[(String, String, Value)], kind: &str, name: &str) -> usize {
    list.iter()
        .position(|(k, n, _)| k == kind && n == name)
        .unwrap_or_else(|| {
            let seen: Vec<_> = list.iter().map(|(k, n, _)| format!("{k}/{n}")).collect();
            panic!("{kind}/{name} was not created; created: {seen:?}")
        })
}

fn find<'a>(list: &'a [(String, String, Value)], kind: &str, name: &str) -> &'a Value {
    &list[position(list, kind, name)].2
}

fn hook<'a>(step: &'a Value, kind: &str, name: &str) -> &'a Value {
    step["hooks"]
        .as_array()
        .expect("hooks")
        .iter()
        .find(|h| h["kind"] == kind && h["name"] == name)
        .unwrap_or_else(|| {
            panic!(
                "Helm does not know {kind}/{name} as a hook: {}",
                step["hooks"]
            )
        })
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().expect("string").to_owned())
        .collect()
}

/// The rules a Role must have, and nothing more: see "soma-backup.rbacRules".
fn assert_least_rights(role: &Value) {
    let mut rules: Vec<(Vec<String>, Vec<String>, BTreeSet<String>)> = role["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .map(|r| {
            assert!(
                r.get("resourceNames").is_none() && r.get("nonResourceURLs").is_none(),
                "unexpected rule {r}"
            );
            (
                strings(&r["apiGroups"]),
                strings(&r["resources"]),
                strings(&r["verbs"]).into_iter().collect(),
            )
        })
        .collect();
    rules.sort();
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(
        rules,
        vec![
            (
                vec![String::new()],
                vec!["pods".into()],
                set(&["get", "list"])
            ),
            (
                vec![String::new()],
                vec!["pods/portforward".into()],
                set(&["create", "get"])
            ),
        ],
        "Role {} must grant exactly get/list on pods and create/get on pods/portforward",
        role["metadata"]["name"]
    );
}

fn assert_hardened(container: &Value) {
    let sc = &container["securityContext"];
    let what = container["name"].as_str().unwrap_or("?");
    assert_eq!(sc["runAsNonRoot"], json!(true), "{what}: runAsNonRoot");
    assert_eq!(
        sc["readOnlyRootFilesystem"],
        json!(true),
        "{what}: readOnlyRootFilesystem"
    );
    assert_eq!(
        sc["allowPrivilegeEscalation"],
        json!(false),
        "{what}: allowPrivilegeEscalation"
    );
    assert_ne!(sc["privileged"], json!(true), "{what}: privileged");
    assert_eq!(
        sc["capabilities"]["drop"],
        json!(["ALL"]),
        "{what}: capabilities.drop"
    );
    assert!(
        sc["capabilities"].get("add").is_none(),
        "{what}: capabilities.add"
    );
    assert_eq!(
        sc["seccompProfile"]["type"],
        json!("RuntimeDefault"),
        "{what}: seccomp"
    );
    assert!(
        sc["runAsUser"].as_i64().unwrap_or(0) > 0,
        "{what}: runAsUser"
    );
}

/// The only container of a Job's pod.
fn job_container(job: &Value) -> &Value {
    let containers = job["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    assert_eq!(containers.len(), 1, "{}", job["metadata"]["name"]);
    &containers[0]
}

#[test]
fn lint_is_clean_with_defaults_and_every_example() {
    let chart = chart();
    let mut runs = vec![(String::from("default values"), None)];
    for f in ["soma-backup.yaml", "soma-backup-disaster-recovery.yaml"] {
        runs.push((f.to_owned(), Some(examples_dir().join(f))));
    }
    for (what, values) in runs {
        let mut args = vec!["lint", path_str(&chart)];
        if let Some(v) = &values {
            args.extend_from_slice(&["--values", path_str(v)]);
        }
        let result = engine(&args);
        let bad: Vec<&Value> = result["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .filter(|m| m["severity"].as_i64().unwrap_or(3) >= 2)
            .collect();
        // helm-sdkpy drops the messages' text; an install with the same values prints it.
        assert!(
            bad.is_empty(),
            "helm lint with {what}: warnings or errors (severity 2/3) at {bad:?}; \
             `helm_engine.py install helm/soma-backup --values FILE` shows the error text"
        );
    }
}

#[test]
fn every_example_installs() {
    let chart = chart();
    for f in ["soma-backup.yaml", "soma-backup-disaster-recovery.yaml"] {
        let values = examples_dir().join(f);
        let out = engine(&["install", path_str(&chart), "--values", path_str(&values)]);
        step_ok(
            &out["install"],
            &format!("helm install -f helm/examples/{f}"),
        );
    }
}

#[test]
fn restore_and_pre_upgrade_hooks_run_with_their_own_least_rbac() {
    let values = json!({
        "restore": {"enabled": true},
        "backup": {"beforeUpgrade": true},
        "schedule": {"enabled": true},
    });
    let out = install(&values, &["--upgrade"]);
    let (inst, upg) = (&out["install"], &out["upgrade"]);
    step_ok(inst, "helm install");
    step_ok(upg, "helm upgrade");

    let hook_sa = format!("{FULLNAME}-hook");
    let restore_job = format!("{FULLNAME}-restore");
    let backup_job = format!("{FULLNAME}-pre-upgrade-backup");

    // Helm's own reading of the annotations.
    let restore = hook(inst, "Job", &restore_job);
    assert_eq!(restore["events"], json!(["post-install"]));
    assert_eq!(restore["delete_policies"], json!(["before-hook-creation"]));
    let backup = hook(inst, "Job", &backup_job);
    assert_eq!(backup["events"], json!(["pre-upgrade"]));
    assert_eq!(backup["delete_policies"], json!(["before-hook-creation"]));
    for kind in ["ServiceAccount", "Role", "RoleBinding"] {
        let h = hook(inst, kind, &hook_sa);
        let events: BTreeSet<String> = strings(&h["events"]).into_iter().collect();
        assert_eq!(
            events,
            ["post-install", "pre-upgrade"].map(String::from).into(),
            "{kind} hook events"
        );
        assert!(
            h["weight"].as_i64().unwrap() < restore["weight"].as_i64().unwrap(),
            "{kind} must be weighted before the Jobs"
        );
        assert_eq!(
            h["delete_policies"],
            json!(["before-hook-creation", "hook-succeeded"]),
            "{kind} delete policies"
        );
    }

    // What the cluster saw: on install the hook's RBAC, then the restore Job; on upgrade the hook's
    // RBAC, then the backup Job, each Job after the objects it needs.
    for (step, job_name, args) in [
        (
            inst,
            &restore_job,
            vec!["restore", "latest", "-n", NAMESPACE],
        ),
        (upg, &backup_job, vec!["backup", "all", "-n", NAMESPACE]),
    ] {
        let objs = created(step);
        let job_at = position(&objs, "Job", job_name);
        for kind in ["ServiceAccount", "Role", "RoleBinding"] {
            assert!(
                position(&objs, kind, &hook_sa) < job_at,
                "{kind}/{hook_sa} must exist before Job/{job_name}"
            );
        }
        let binding = find(&objs, "RoleBinding", &hook_sa);
        assert_eq!(binding["roleRef"]["kind"], json!("Role"));
        assert_eq!(binding["roleRef"]["name"], json!(hook_sa));
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": hook_sa, "namespace": NAMESPACE}])
        );
        assert_least_rights(find(&objs, "Role", &hook_sa));

        let job = find(&objs, "Job", job_name);
        let annotations = &job["metadata"]["annotations"];
        assert_eq!(
            annotations["helm.sh/hook-delete-policy"],
            json!("before-hook-creation")
        );
        assert_eq!(
            job["spec"]["backoffLimit"],
            json!(0),
            "{job_name}: no retries"
        );
        assert!(job["spec"]["activeDeadlineSeconds"].as_i64().unwrap() > 0);
        let pod = &job["spec"]["template"]["spec"];
        assert_eq!(pod["serviceAccountName"], json!(hook_sa));
        assert_eq!(pod["restartPolicy"], json!("Never"));
        let c = job_container(job);
        assert_eq!(c["command"], json!(["kubectl-soma"]));
        assert_eq!(strings(&c["args"]), args, "{job_name} arguments");
        assert_eq!(c["image"], json!(format!("soma-backup:{}", app_version())));
        assert!(
            c.get("env").is_none(),
            "{job_name}: the plugin needs no environment"
        );
        assert_hardened(c);
        // Jobs never carry the discovery labels: they are not agents.
        assert!(
            job["spec"]["template"]["metadata"]["labels"]
                .get("soma.dev/agent")
                .is_none()
        );
    }
    // The hook's rights are removed again once its hooks succeeded.
    for step in [inst, upg] {
        let deleted: BTreeSet<String> = step["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["verb"] == "delete")
            .map(|e| {
                format!(
                    "{}/{}",
                    e["kind"].as_str().unwrap(),
                    e["name"].as_str().unwrap()
                )
            })
            .collect();
        for kind in ["ServiceAccount", "Role", "RoleBinding"] {
            assert!(
                deleted.contains(&format!("{kind}/{hook_sa}")),
                "{kind} left behind"
            );
        }
        assert!(
            !deleted.iter().any(|d| d.starts_with("Job/")),
            "a Job was deleted"
        );
    }

    // The scheduled backup: standing RBAC with the same rules, as regular resources.
    let objs = created(inst);
    assert_least_rights(find(&objs, "Role", FULLNAME));
    let cron = find(&objs, "CronJob", &format!("{FULLNAME}-scheduled-backup"));
    assert_eq!(cron["spec"]["schedule"], json!("0 3 * * *"));
    assert_eq!(cron["spec"]["concurrencyPolicy"], json!("Forbid"));
    let job = &cron["spec"]["jobTemplate"];
    assert_eq!(
        job["spec"]["template"]["spec"]["serviceAccountName"],
        json!(FULLNAME)
    );
    let c = job_container(job);
    assert_eq!(strings(&c["args"]), ["backup", "all", "-n", NAMESPACE]);
    assert_hardened(c);

    // Namespaced rights only, and nothing secret in the chart's own objects.
    for step in [inst, upg] {
        for (kind, name, _) in created(step) {
            assert!(
                !["ClusterRole", "ClusterRoleBinding", "Secret"].contains(&kind.as_str()),
                "the chart created {kind}/{name}"
            );
        }
    }
}

#[test]
fn default_values_render_nothing_but_a_failed_restore_fails_the_install() {
    let out = install(&json!({}), &[]);
    step_ok(&out["install"], "helm install with defaults");
    assert!(
        created(&out["install"]).is_empty(),
        "defaults created objects"
    );

    let restore_job = format!("{FULLNAME}-restore");
    let out = install(
        &json!({"restore": {"enabled": true, "backupId": "20261124T120000Z-pg-appdb-7f3a"}}),
        &["--fail-job", &restore_job],
    );
    let inst = &out["install"];
    assert_eq!(
        inst["ok"],
        json!(false),
        "the install must fail with the restore"
    );
    let error = inst["error"].as_str().unwrap();
    assert!(
        error.contains("post-install") && error.contains(&restore_job),
        "error should name the failed restore hook: {error}"
    );
    let objs = created(inst);
    let job = find(&objs, "Job", &restore_job);
    assert_eq!(
        strings(&job_container(job)["args"]),
        ["restore", "20261124T120000Z-pg-appdb-7f3a", "-n", NAMESPACE]
    );
    // Its logs stay readable: the failed Job is not deleted (only before the next run).
    let deleted_job = inst["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["verb"] == "delete" && e["kind"] == "Job");
    assert!(!deleted_job, "the failed restore Job was deleted");
}

#[test]
fn a_failed_pre_upgrade_backup_stops_the_upgrade() {
    let before = json!({"backup": {"beforeUpgrade": true}, "schedule": {"enabled": true}});
    let after = json!({
        "backup": {"beforeUpgrade": true},
        "schedule": {"enabled": true, "cron": "0 4 * * *"},
    });
    let cron = format!("{FULLNAME}-scheduled-backup");
    let updated_cron = |step: &Value| {
        step["events"].as_array().unwrap().iter().any(|e| {
            e["verb"] == "update"
                && e["kind"] == "CronJob"
                && e["object"]["spec"]["schedule"] == "0 4 * * *"
        })
    };

    // The backup succeeds: the upgrade proceeds and changes the CronJob.
    let after_s = after.to_string();
    let ok = install(&before, &["--upgrade", "--upgrade-set-json", &after_s]);
    step_ok(&ok["upgrade"], "helm upgrade");
    assert!(
        updated_cron(&ok["upgrade"]),
        "the upgrade did not apply the new schedule"
    );

    // The backup fails: the upgrade fails and applies nothing.
    let job = format!("{FULLNAME}-pre-upgrade-backup");
    let failed = install(
        &before,
        &[
            "--upgrade",
            "--upgrade-set-json",
            &after_s,
            "--fail-job",
            &job,
        ],
    );
    let upg = &failed["upgrade"];
    assert_eq!(
        upg["ok"],
        json!(false),
        "the upgrade must fail with the backup"
    );
    let error = upg["error"].as_str().unwrap();
    assert!(
        error.contains("pre-upgrade") && error.contains(&job),
        "{error}"
    );
    assert!(
        !updated_cron(upg),
        "{cron} was changed although the backup failed"
    );
}

fn app_version() -> String {
    let text = std::fs::read_to_string(chart().join("Chart.yaml")).expect("Chart.yaml");
    text.lines()
        .find_map(|l| l.strip_prefix("appVersion:"))
        .expect("appVersion")
        .trim()
        .trim_matches('"')
        .to_owned()
}

fn env_var<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == name)
}

#[test]
fn agent_sidecar_keeps_secrets_in_secrets_and_listens_on_loopback() {
    let chart = chart();
    let examples = examples_dir();
    let out = engine(&["examples", path_str(&chart), path_str(&examples)]);
    assert!(
        out.get("error").is_none(),
        "rendering failed: {}",
        out["error"]
    );
    let rendered = &out["rendered"];

    for engine_name in ["postgres", "qdrant"] {
        let r = &rendered[engine_name];
        let containers = r["container"].as_array().expect("one container");
        assert_eq!(containers.len(), 1);
        let c = &containers[0];
        assert_eq!(c["name"], json!("soma-agent"));
        assert_eq!(c["image"], json!(format!("soma-backup:{}", app_version())));
        assert_hardened(c);

        // Configuration through the environment only: no arguments, nothing to leak in `ps`.
        assert!(c.get("args").is_none() && c.get("command").is_none(), "{c}");
        let listen = env_var(c, "SOMA_LISTEN").expect("SOMA_LISTEN")["value"]
            .as_str()
            .unwrap();
        assert_eq!(
            listen, "127.0.0.1:50051",
            "the agent must listen on loopback only"
        );
        assert!(c.get("ports").is_none(), "the agent exposes no port");
        assert_eq!(
            env_var(c, "SOMA_STORE").unwrap()["value"],
            json!("s3://soma-backups/prod")
        );
        assert_eq!(
            env_var(c, "SOMA_LOG_FORMAT").unwrap()["value"],
            json!("json")
        );
        assert_eq!(
            env_var(c, "AWS_REGION").unwrap()["value"],
            json!("eu-west-1")
        );

        // Every secret comes from a Secret, never as a literal value.
        let mut secrets = vec!["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"];
        secrets.push(if engine_name == "postgres" {
            "PGPASSWORD"
        } else {
            "SOMA_QDRANT_API_KEY"
        });
        for name in &secrets {
            let var = env_var(c, name).unwrap_or_else(|| panic!("{engine_name}: no {name}"));
            assert!(
                var.get("value").is_none(),
                "{engine_name}: {name} has a literal value"
            );
            let r = &var["valueFrom"]["secretKeyRef"];
            assert!(
                r["name"].is_string() && r["key"].is_string(),
                "{name}: {var}"
            );
        }
        for var in c["env"].as_array().unwrap() {
            let name = var["name"].as_str().unwrap();
            let looks_secret = ["PASSWORD", "SECRET", "API_KEY", "TOKEN"]
                .iter()
                .any(|s| name.contains(s));
            assert!(
                !looks_secret || var.get("value").is_none(),
                "{engine_name}: {name} must come from a secretKeyRef"
            );
        }
        if engine_name == "postgres" {
            let url = env_var(c, "SOMA_POSTGRES_URL").unwrap()["value"]
                .as_str()
                .unwrap();
            assert_eq!(url, "postgresql://postgres@127.0.0.1:5432/appdb");
            let userinfo = url
                .trim_start_matches("postgresql://")
                .split('@')
                .next()
                .unwrap();
            assert!(
                !userinfo.contains(':'),
                "password in SOMA_POSTGRES_URL: {url}"
            );
        } else {
            assert_eq!(
                env_var(c, "SOMA_QDRANT_URL").unwrap()["value"],
                json!("http://127.0.0.1:6333")
            );
        }

        // Read-only root filesystem: /tmp is an emptyDir.
        assert_eq!(
            c["volumeMounts"],
            json!([{"name": "soma-agent-tmp", "mountPath": "/tmp"}])
        );
        assert_eq!(
            r["volumes"],
            json!([{"name": "soma-agent-tmp", "emptyDir": {"sizeLimit": "64Mi"}}])
        );
        // Discovery.
        assert_eq!(
            r["labels"],
            json!({"soma.dev/agent": "true", "soma.dev/engine": engine_name})
        );
        assert_eq!(r["annotations"], json!({"soma.dev/agent-port": "50051"}));
    }

    // The ready-to-use examples are exactly what the named templates render.
    let files = &out["files"];
    let pg = &files["postgresql-bitnami.yaml"]["primary"];
    let r = &rendered["postgres"];
    assert_eq!(
        pg["sidecars"], r["container"],
        "postgresql-bitnami.yaml primary.sidecars"
    );
    assert_eq!(
        pg["podLabels"], r["labels"],
        "postgresql-bitnami.yaml primary.podLabels"
    );
    assert_eq!(
        pg["podAnnotations"], r["annotations"],
        "primary.podAnnotations"
    );
    assert_eq!(pg["extraVolumes"], r["volumes"], "primary.extraVolumes");
    let pg_secret =
        &env_var(&r["container"][0], "PGPASSWORD").unwrap()["valueFrom"]["secretKeyRef"];
    assert_eq!(
        files["postgresql-bitnami.yaml"]["auth"]["existingSecret"],
        pg_secret["name"]
    );
    assert_eq!(
        files["postgresql-bitnami.yaml"]["auth"]["secretKeys"]["adminPasswordKey"],
        pg_secret["key"]
    );

    let q = &files["qdrant.yaml"];
    let r = &rendered["qdrant"];
    assert_eq!(
        q["sidecarContainers"], r["container"],
        "qdrant.yaml sidecarContainers"
    );
    assert_eq!(q["podLabels"], r["labels"], "qdrant.yaml podLabels");
    assert_eq!(
        q["podAnnotations"], r["annotations"],
        "qdrant.yaml podAnnotations"
    );
    assert_eq!(
        q["additionalVolumes"], r["volumes"],
        "qdrant.yaml additionalVolumes"
    );
    let key = &env_var(&r["container"][0], "SOMA_QDRANT_API_KEY").unwrap()["valueFrom"];
    assert_eq!(
        q["apiKey"]["valueFrom"], *key,
        "Qdrant and the agent share the API key Secret"
    );
}

/// `helm soma-restore`: plugin.yaml points at the script, and the script finds the release's
/// namespace through `$HELM_BIN` (stubbed here) and runs `kubectl-soma restore` there.
#[test]
fn helm_plugin_restores_into_the_release_namespace() {
    let plugin = repo().join("helm/plugin");
    let manifest = std::fs::read_to_string(plugin.join("plugin.yaml")).expect("plugin.yaml");
    assert!(
        manifest.lines().any(|l| l == "name: soma-restore"),
        "{manifest}"
    );
    assert!(
        manifest
            .lines()
            .any(|l| l == r#"command: "$HELM_PLUGIN_DIR/soma-restore.sh""#),
        "{manifest}"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let log = dir.path().join("kubectl-soma.args");
    // helm stub: the release "platform" lives in namespace "apps".
    let helm = bin.join("helm");
    std::fs::write(
        &helm,
        "#!/bin/sh\n\
         case \"$1\" in\n\
         status) [ \"$2\" = platform ] && [ \"$4\" = apps ] ;;\n\
         list) if [ \"$4\" = '^platform$' ]; then printf -- '- app_version: 0.1.0\\n  chart: soma-backup-0.1.0\\n  name: platform\\n  namespace: apps\\n  revision: \"1\"\\n'; else echo '[]'; fi ;;\n\
         *) exit 9 ;;\n\
         esac\n",
    )
    .unwrap();
    std::fs::write(
        bin.join("kubectl-soma"),
        format!("#!/bin/sh\nprintf '%s\\n' \"$@\" > '{}'\n", log.display()),
    )
    .unwrap();
    for f in ["helm", "kubectl-soma"] {
        let status = Command::new("chmod")
            .arg("+x")
            .arg(bin.join(f))
            .status()
            .unwrap();
        assert!(status.success());
    }

    let run = |namespace: &str, args: &[&str]| {
        let _ = std::fs::remove_file(&log);
        let out = Command::new("sh")
            .arg(plugin.join("soma-restore.sh"))
            .args(args)
            .env("HELM_BIN", &helm)
            .env("HELM_NAMESPACE", namespace)
            .env("HELM_PLUGIN_DIR", &plugin)
            .env_remove("HELM_KUBECONTEXT")
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    bin.display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .output()
            .expect("run soma-restore.sh");
        let args = std::fs::read_to_string(&log).unwrap_or_default();
        (out, args.lines().map(String::from).collect::<Vec<_>>())
    };

    // -n apps: found there; the backup id defaults to latest.
    let (out, args) = run("apps", &["platform"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(args, ["restore", "latest", "-n", "apps"]);

    // Not in the current namespace: found in the only namespace that has it; flags pass through.
    let (out, args) = run(
        "default",
        &["platform", "20261124T120000Z-pg-appdb-7f3a", "--clean"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        args,
        [
            "restore",
            "20261124T120000Z-pg-appdb-7f3a",
            "-n",
            "apps",
            "--clean"
        ]
    );

    // No such release: a clear error, and no restore.
    let (out, args) = run("default", &["other"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no Helm release named other"));
    assert!(args.is_empty());

    // No release name: usage.
    let (out, _) = run("default", &[]);
    assert_eq!(out.status.code(), Some(2));
}

/// Kubernetes limits names: 63 characters (Jobs: their pods' job-name label), 52 for a CronJob
/// (its Jobs append 11). A 63-character full name must not push any object past them.
#[test]
fn long_names_stay_within_kubernetes_limits() {
    let long = "x".repeat(63);
    let out = install(
        &json!({
            "fullnameOverride": long,
            "restore": {"enabled": true},
            "backup": {"beforeUpgrade": true},
            "schedule": {"enabled": true},
        }),
        &["--upgrade"],
    );
    step_ok(
        &out["install"],
        "helm install with a 63-character fullnameOverride",
    );
    step_ok(
        &out["upgrade"],
        "helm upgrade with a 63-character fullnameOverride",
    );
    let mut kinds = BTreeSet::new();
    let mut service_accounts = BTreeSet::new();
    for step in [&out["install"], &out["upgrade"]] {
        for (kind, name, _) in created(step) {
            let limit = if kind == "CronJob" { 52 } else { 63 };
            assert!(name.len() <= limit, "{kind}/{name} is longer than {limit}");
            if kind == "ServiceAccount" {
                service_accounts.insert(name.clone());
            }
            kinds.insert(kind);
        }
    }
    assert!(
        kinds.contains("CronJob") && kinds.contains("Job"),
        "{kinds:?}"
    );
    // Truncation must not give the hook's ServiceAccount (deleted after each hook run) the name
    // of the CronJob's standing one.
    assert_eq!(service_accounts.len(), 2, "{service_accounts:?}");
}
