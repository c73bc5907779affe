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

/// The key Secret of the examples (helm/examples/soma-backup.yaml): encryption is on by default,
/// and the chart refuses to render without one.
const KEY_SECRET: &str = "soma-backup-key";

/// `values` with the encryption key Secret the chart requires by default, unless they say
/// something about encryption themselves.
fn with_key(values: &Value) -> Value {
    let mut v = values.clone();
    if v.pointer("/agent/encryption").is_none() {
        v["agent"]["encryption"] = json!({"existingSecret": KEY_SECRET});
    }
    v
}

/// `install` (and optionally `upgrade`) with JSON values (given the key Secret, see
/// [`with_key`]); returns {"install": STEP, "upgrade": STEP}.
fn install(values: &Value, extra: &[&str]) -> Value {
    install_as_given(&with_key(values), extra)
}

/// [`install`] with exactly `values`.
fn install_as_given(values: &Value, extra: &[&str]) -> Value {
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

/// The rules a Role must have, and nothing more: see "soma-backup.rbacRules". The agent token's
/// Secret (agent.token, on by default) is readable by its name only, and no other Secret.
fn assert_least_rights(role: &Value) {
    let mut rules: Vec<(Vec<String>, Vec<String>, BTreeSet<String>)> = role["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .filter(|r| {
            if r["resources"] != json!(["secrets"]) {
                return true;
            }
            assert_eq!(
                (&r["apiGroups"], &r["resourceNames"], &r["verbs"]),
                (&json!([""]), &json!(["soma-agent-token"]), &json!(["get"])),
                "Role {}: secrets only by the agent token's name, only get: {r}",
                role["metadata"]["name"]
            );
            false
        })
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
fn lint_is_clean_with_every_example() {
    let chart = chart();
    let mut runs = Vec::new();
    for f in [
        "soma-backup.yaml",
        "soma-backup-disaster-recovery.yaml",
        "unattended.yaml",
    ] {
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
    for f in [
        "soma-backup.yaml",
        "soma-backup-disaster-recovery.yaml",
        "unattended.yaml",
    ] {
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
        let role = find(&objs, "Role", &hook_sa);
        assert_least_rights(role);
        // kubectl-soma in the Job reads the agent token the pods' annotation names.
        assert!(
            role["rules"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["resources"] == json!(["secrets"])),
            "Role {hook_sa} cannot read the agent token: {role}"
        );

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
    // The agent token's Secret: created with the release, a random 48-character token.
    // (`created` leaves Secrets out: Helm stores its releases in Secrets.)
    let secret = &inst["events"]
        .as_array()
        .expect("events")
        .iter()
        .find(|e| e["verb"] == "create" && e["kind"] == "Secret" && e["name"] == "soma-agent-token")
        .unwrap_or_else(|| panic!("Secret/soma-agent-token was not created"))["object"];
    let token = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(secret["data"]["token"].as_str().expect("data.token"))
            .expect("base64 token")
    };
    assert_eq!(token.len(), 48, "{secret}");
    assert!(token.iter().all(u8::is_ascii_alphanumeric), "{secret}");
    // Labelled as the agent token of soma-backup: the only Secrets kubectl-soma reads a token from.
    let labels = &secret["metadata"]["labels"];
    assert_eq!(
        labels["app.kubernetes.io/part-of"],
        json!("soma-backup"),
        "{secret}"
    );
    assert_eq!(
        labels["app.kubernetes.io/component"],
        json!("agent-token"),
        "{secret}"
    );
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
    // The defaults plus the key Secret encryption needs.
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

/// The release notes Helm stored with the release (its Secret holds the release as base64 of
/// gzipped JSON, base64-encoded again as Secret data).
fn notes(step: &Value) -> String {
    use base64::Engine as _;
    use std::io::Read as _;
    let release = step["events"]
        .as_array()
        .expect("events")
        .iter()
        .rfind(|e| {
            e["kind"] == "Secret"
                && e["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("sh.helm.release."))
        })
        .expect("the release Secret");
    let b64 = base64::engine::general_purpose::STANDARD;
    let data = release["object"]["data"]["release"]
        .as_str()
        .expect("release");
    let gzipped = b64
        .decode(b64.decode(data).expect("Secret data"))
        .expect("release encoding");
    let mut text = String::new();
    flate2::read::GzDecoder::new(&gzipped[..])
        .read_to_string(&mut text)
        .expect("gzipped release");
    let release: Value = serde_json::from_str(&text).expect("release JSON");
    release["info"]["notes"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Encryption at rest is the default: without a key Secret the chart refuses to render, naming
/// the value to set and the explicit way out; with `agent.encryption.enabled=false` it renders
/// sidecars without keys, and the release notes warn that backups are stored unencrypted.
#[test]
fn encryption_is_on_by_default_and_off_only_when_said_with_a_warning() {
    let out = install_as_given(&json!({}), &[]);
    let inst = &out["install"];
    assert_eq!(inst["ok"], json!(false), "defaults without a key installed");
    let error = inst["error"].as_str().unwrap();
    assert!(
        error.contains("agent.encryption.existingSecret is required")
            && error.contains("kubectl create secret generic soma-backup-key")
            && error.contains("agent.encryption.enabled=false"),
        "{error}"
    );

    let out = install(&json!({}), &[]);
    step_ok(&out["install"], "helm install with a key Secret");
    let text = notes(&out["install"]);
    assert!(text.contains("release platform"), "{text}");
    assert!(!text.contains("UNENCRYPTED"), "{text}");

    let out = install(&json!({"agent": {"encryption": {"enabled": false}}}), &[]);
    step_ok(
        &out["install"],
        "helm install with encryption.enabled=false",
    );
    let text = notes(&out["install"]);
    assert!(
        text.contains("WARNING: agent.encryption.enabled=false: backups are stored UNENCRYPTED"),
        "{text}"
    );

    let error = render_error(&json!({"agent": {"encryption": {
        "enabled": false, "existingSecret": KEY_SECRET,
    }}}));
    assert!(
        error.contains("agent.encryption.enabled is false") && error.contains("soma-backup-key"),
        "{error}"
    );

    // What the sidecar gets either way.
    let on = render_pod(&json!({}));
    let off =
        render_pod(&json!({"agent": {"encryption": {"enabled": false, "existingSecret": ""}}}));
    let (on_agent, off_agent) = (
        container(&on.pod, "soma-agent"),
        container(&off.pod, "soma-agent"),
    );
    assert_eq!(
        env_value(on_agent, "SOMA_ENCRYPTION_KEY_FILE"),
        "/var/run/secrets/soma-encryption/key"
    );
    assert!(named(&on.pod["volumes"], "soma-encryption-keys").is_some());
    assert!(
        env_var(off_agent, "SOMA_ENCRYPTION_KEY_FILE").is_none(),
        "{off_agent}"
    );
    assert!(named(&off_agent["volumeMounts"], "soma-encryption-keys").is_none());
    assert!(named(&off.pod["volumes"], "soma-encryption-keys").is_none());
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
    let after_s = with_key(&after).to_string();
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
        // The only port is the metrics listener, which serves no API (metrics.enabled).
        assert_eq!(
            c["ports"],
            json!([{"name": "metrics", "containerPort": 9464, "protocol": "TCP"}]),
            "the agent exposes only its metrics port"
        );
        assert_eq!(env_value(c, "SOMA_METRICS_LISTEN"), "0.0.0.0:9464");
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
            // A `*_FILE` variable holds a path to a mounted Secret, not the secret.
            let looks_secret = ["PASSWORD", "SECRET", "API_KEY", "TOKEN"]
                .iter()
                .any(|s| name.contains(s))
                && !name.ends_with("_FILE");
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

        // Read-only root filesystem: /tmp is an emptyDir. The API token is a mounted Secret,
        // named by the pod annotation kubectl-soma reads; so is the encryption key (on by
        // default).
        assert_eq!(
            c["volumeMounts"],
            json!([
                {"name": "soma-agent-tmp", "mountPath": "/tmp"},
                {"name": "soma-agent-token", "mountPath": "/var/run/secrets/soma-agent", "readOnly": true},
                {"name": "soma-encryption-keys", "mountPath": "/var/run/secrets/soma-encryption", "readOnly": true}
            ])
        );
        assert_eq!(
            r["volumes"],
            json!([
                {"name": "soma-agent-tmp", "emptyDir": {"sizeLimit": "64Mi"}},
                {"name": "soma-encryption-keys", "secret": {"secretName": "soma-backup-key", "defaultMode": 0o444}},
                {"name": "soma-agent-token", "secret": {"secretName": "soma-agent-token", "items": [{"key": "token", "path": "token"}]}}
            ])
        );
        assert_eq!(
            env_value(c, "SOMA_ENCRYPTION_KEY_FILE"),
            "/var/run/secrets/soma-encryption/key"
        );
        assert_eq!(
            env_value(c, "SOMA_AGENT_TOKEN_FILE"),
            "/var/run/secrets/soma-agent/token"
        );
        // Discovery.
        assert_eq!(
            r["labels"],
            json!({"soma.dev/agent": "true", "soma.dev/engine": engine_name})
        );
        assert_eq!(
            r["annotations"],
            json!({"soma.dev/agent-port": "50051", "soma.dev/token-secret": "soma-agent-token"})
        );
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

// ---------------------------------------------------------------------------------------------
// Continuous WAL archiving (postgres.walStream) and the physical restore (restore.physical).
// ---------------------------------------------------------------------------------------------

/// The soma-backup values behind helm/examples/postgresql-bitnami-wal.yaml and
/// postgresql-bitnami-pitr.yaml, on top of helm/examples/soma-backup.yaml (their header comments
/// repeat them).
fn pitr_example_values() -> Value {
    json!({
        "postgres": {"walStream": {
            "enabled": true,
            "replicationUrl": "postgresql://soma_replication@127.0.0.1:5432/postgres",
            "replicationPasswordSecret": {"name": "soma-replication", "key": "password"},
        }},
        "restore": {"physical": {"enabled": true, "targetTime": "2026-11-24T11:55:00Z"}},
    })
}

/// A PostgreSQL StatefulSet as a chart that depends on soma-backup writes it (the chart README's
/// "Your own chart"): every named template included where it belongs. Laid out like bitnami's:
/// the volume claim "data" at /bitnami/postgresql, PGDATA below it.
const POD_TEMPLATE: &str = r#"{{- $soma := index .Values "soma-backup" }}
{{- $pg := dict "engine" "postgres" "Values" $soma }}
{{- $restore := dict "Values" $soma }}
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: pg
spec:
  serviceName: pg
  selector:
    matchLabels:
      app: pg
  template:
    metadata:
      labels:
        app: pg
        {{- include "soma-backup.agentPodLabels" $pg | nindent 8 }}
      annotations:
        {{- include "soma-backup.agentPodAnnotations" $pg | nindent 8 }}
    spec:
      initContainers:
        {{- include "soma-backup.physicalRestoreInitContainers" $restore | nindent 8 }}
      containers:
        - name: postgresql
          image: bitnami/postgresql:16
          env:
            - name: PGDATA
              value: /bitnami/postgresql/data
            {{- include "soma-backup.physicalRestoreEnv" $restore | nindent 12 }}
          volumeMounts:
            - name: data
              mountPath: /bitnami/postgresql
            {{- include "soma-backup.physicalRestoreVolumeMounts" $restore | nindent 12 }}
        {{- include "soma-backup.agentContainer" $pg | nindent 8 }}
      volumes:
        {{- include "soma-backup.agentVolumes" $pg | nindent 8 }}
        {{- include "soma-backup.physicalRestoreVolumes" $restore | nindent 8 }}
  volumeClaimTemplates:
    - metadata:
        name: data
      spec:
        accessModes: ["ReadWriteOnce"]
        resources:
          requests:
            storage: 1Gi
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: rendered-templates
data:
  container.json: {{ include "soma-backup.agentContainer" $pg | fromYamlArray | toJson | quote }}
  volumes.json: {{ include "soma-backup.agentVolumes" $pg | fromYamlArray | toJson | quote }}
  initContainers.json: {{ include "soma-backup.physicalRestoreInitContainers" $restore | fromYamlArray | toJson | quote }}
  restoreVolumes.json: {{ include "soma-backup.physicalRestoreVolumes" $restore | fromYamlArray | toJson | quote }}
  restoreVolumeMounts.json: {{ include "soma-backup.physicalRestoreVolumeMounts" $restore | fromYamlArray | toJson | quote }}
  restoreEnv.json: {{ include "soma-backup.physicalRestoreEnv" $restore | fromYamlArray | toJson | quote }}
  labels.json: {{ include "soma-backup.agentPodLabels" $pg | fromYaml | toJson | quote }}
  qdrantContainer.json: {{ include "soma-backup.agentContainer" (dict "engine" "qdrant" "Values" $soma) | fromYamlArray | toJson | quote }}
  qdrantVolumes.json: {{ include "soma-backup.agentVolumes" (dict "engine" "qdrant" "Values" $soma) | fromYamlArray | toJson | quote }}
  {{- range $path, $_ := .Files.Glob "examples/*.yaml" }}
  file.{{ base $path }}: {{ $.Files.Get $path | fromYaml | toJson | quote }}
  {{- end }}
"#;

/// What the scratch chart of [`POD_TEMPLATE`] rendered: the pod template's spec, each named
/// template on its own (`container`, `volumes`, `initContainers`, `restoreVolumes`,
/// `restoreVolumeMounts`, `restoreEnv`, the PostgreSQL pod's `labels`, and the Qdrant sidecar's
/// `qdrantContainer` and `qdrantVolumes`), and helm/examples/*.yaml as Helm parses them.
struct Rendered {
    pod: Value,
    parts: Value,
    files: Value,
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Installs a scratch parent chart of soma-backup whose values are helm/examples/soma-backup.yaml
/// with `overlay` set over them (`--set-json`), and whose template is [`POD_TEMPLATE`].
fn render_pod(overlay: &Value) -> Rendered {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("umbrella");
    copy_dir(&chart(), &root.join("charts/soma-backup"));
    copy_dir(&examples_dir(), &root.join("examples"));
    std::fs::create_dir_all(root.join("templates")).unwrap();
    std::fs::write(root.join("templates/postgresql.yaml"), POD_TEMPLATE).unwrap();
    std::fs::write(
        root.join("Chart.yaml"),
        "apiVersion: v2\nname: umbrella\nversion: 0.1.0\n\
         dependencies:\n  - name: soma-backup\n    version: \">=0.0.0-0\"\n",
    )
    .unwrap();
    let example = std::fs::read_to_string(examples_dir().join("soma-backup.yaml")).unwrap();
    let nested: String = example
        .lines()
        .map(|l| format!("  {l}\n"))
        .collect::<String>();
    std::fs::write(root.join("values.yaml"), format!("soma-backup:\n{nested}")).unwrap();

    let values = json!({"soma-backup": overlay}).to_string();
    let out = engine(&["install", path_str(&root), "--set-json", &values]);
    step_ok(
        &out["install"],
        &format!("rendering the named templates with {overlay}"),
    );
    let objs = created(&out["install"]);
    let pod = find(&objs, "StatefulSet", "pg")["spec"]["template"]["spec"].clone();
    let data = &find(&objs, "ConfigMap", "rendered-templates")["data"];
    let mut parts = serde_json::Map::new();
    let mut files = serde_json::Map::new();
    for (key, text) in data.as_object().expect("data") {
        let parsed: Value = serde_json::from_str(text.as_str().unwrap()).expect("JSON");
        if let Some(file) = key.strip_prefix("file.") {
            files.insert(file.to_owned(), parsed);
        } else {
            // An empty template renders null: no items.
            let parsed = if parsed.is_null() { json!([]) } else { parsed };
            parts.insert(key.trim_end_matches(".json").to_owned(), parsed);
        }
    }
    Rendered {
        pod,
        parts: Value::Object(parts),
        files: Value::Object(files),
    }
}

fn named<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list.as_array()
        .into_iter()
        .flatten()
        .find(|item| item["name"] == name)
}

fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    named(&pod["containers"], name)
        .or_else(|| named(&pod["initContainers"], name))
        .unwrap_or_else(|| panic!("no container {name} in {pod}"))
}

/// Every secret of every container comes from a secretKeyRef, never as a literal value, and no
/// URL carries a password.
fn assert_secrets_only_by_reference(pod: &Value) {
    let containers = pod["containers"]
        .as_array()
        .into_iter()
        .chain(pod["initContainers"].as_array())
        .flatten();
    for c in containers {
        let cname = c["name"].as_str().unwrap_or("?");
        for var in c["env"].as_array().into_iter().flatten() {
            let name = var["name"].as_str().unwrap();
            // A `*_FILE` variable holds a path to a mounted Secret, not the secret.
            let looks_secret = ["PASSWORD", "SECRET", "API_KEY", "TOKEN", "ACCESS_KEY"]
                .iter()
                .any(|s| name.contains(s))
                && !name.ends_with("_FILE");
            if looks_secret {
                assert!(
                    var.get("value").is_none(),
                    "{cname}: {name} has a literal value"
                );
                let r = &var["valueFrom"]["secretKeyRef"];
                assert!(
                    r["name"].is_string() && r["key"].is_string(),
                    "{cname}: {name} must come from a secretKeyRef: {var}"
                );
            }
            if let Some(value) = var["value"].as_str()
                && let Some((_, rest)) = value.split_once("://")
            {
                let authority = rest.split('/').next().unwrap();
                let userinfo = authority.rsplit_once('@').map(|(u, _)| u).unwrap_or("");
                assert!(
                    !userinfo.contains(':') && !value.to_lowercase().contains("password"),
                    "{cname}: {name} carries a password: {value}"
                );
            }
        }
        // Arguments are visible in `ps` and in the pod spec: never a secret there either.
        for word in c["args"].as_array().into_iter().flatten() {
            let word = word.as_str().unwrap().to_lowercase();
            assert!(
                !word.contains("password") && !word.contains("secret"),
                "{cname}: argument {word}"
            );
        }
    }
}

/// Every volumeMount names a volume of the pod (or a volume claim template); no volume twice.
fn assert_mounts_resolve(pod: &Value, claims: &[&str]) {
    let mut volumes: Vec<&str> = pod["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    let unique: BTreeSet<&str> = volumes.iter().copied().collect();
    assert_eq!(
        unique.len(),
        volumes.len(),
        "duplicate volumes: {volumes:?}"
    );
    volumes.extend_from_slice(claims);
    let containers = pod["containers"]
        .as_array()
        .into_iter()
        .chain(pod["initContainers"].as_array())
        .flatten();
    for c in containers {
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            let name = m["name"].as_str().unwrap();
            assert!(
                volumes.contains(&name),
                "{}: mounts {name}, which is not a volume of the pod ({volumes:?})",
                c["name"]
            );
        }
    }
}

fn env_value<'a>(container: &'a Value, name: &str) -> &'a str {
    env_var(container, name).unwrap_or_else(|| panic!("{}: no {name}", container["name"]))["value"]
        .as_str()
        .unwrap_or_else(|| panic!("{}: {name} has no literal value", container["name"]))
}

#[test]
fn lint_is_clean_with_wal_streaming_and_a_physical_restore() {
    let chart = chart();
    let store = json!({
        "bucket": "soma-backups", "prefix": "prod",
        "credentials": {"source": "secret", "existingSecret": "soma-backup-s3"},
    });
    let runs = [
        (
            "postgres.walStream",
            json!({"store": store, "postgres": pitr_example_values()["postgres"]}),
        ),
        (
            "restore.physical with targetTime",
            json!({"store": store, "restore": pitr_example_values()["restore"]}),
        ),
        (
            "restore.physical with targetLsn, a backup id and another prefix",
            json!({"store": store, "restore": {"physical": {
                "enabled": true, "backup": "20261124T120000Z-pg-physical-7f3a",
                "targetLsn": "16/B374D848", "storePrefix": "prod-old",
            }}}),
        ),
        (
            "both, with IRSA, a PVC spool and the official image's layout",
            json!({
                "store": {"bucket": "soma-backups", "credentials": {"source": "serviceAccount"}},
                "postgres": {"walStream": {"enabled": true,
                    "spool": {"volume": {"persistentVolumeClaim": {"claimName": "wal-spool"}}}}},
                "restore": {"physical": {"enabled": true,
                    "pgdataPath": "/var/lib/postgresql/data/pgdata",
                    "dataVolume": {"name": "pgdata", "mountPath": "/var/lib/postgresql/data"},
                    "runAsUser": 999, "runAsGroup": 999, "postgresEnv": []}},
            }),
        ),
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    for (what, values) in runs {
        // JSON is YAML: the file helm_engine.py nests under the chart's name.
        let file = dir.path().join("values.yaml");
        std::fs::write(&file, with_key(&values).to_string()).unwrap();
        let result = engine(&["lint", path_str(&chart), "--values", path_str(&file)]);
        let bad: Vec<&Value> = result["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .filter(|m| m["severity"].as_i64().unwrap_or(3) >= 2)
            .collect();
        assert!(
            bad.is_empty(),
            "helm lint with {what}: warnings or errors at {bad:?}"
        );
        // The chart renders no object of its own for either: they go into the PostgreSQL pod.
        let out = install(&values, &[]);
        step_ok(&out["install"], &format!("helm install with {what}"));
        assert!(
            created(&out["install"]).is_empty(),
            "{what} created objects"
        );
    }
}

/// The chart refuses what the agent would refuse later, in the pod, at 3 a.m.
#[test]
fn wal_streaming_and_physical_restore_values_are_checked() {
    let base = json!({"store": {"bucket": "soma-backups"}});
    let with = |extra: Value| {
        let mut v = base.clone();
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };
    for (values, expect) in [
        (
            with(json!({"restore": {"physical": {"enabled": true,
                "targetTime": "2026-11-24T11:55:00Z", "targetLsn": "16/B374D848"}}})),
            "/restore/physical",
        ),
        (
            with(json!({"restore": {"physical": {"enabled": true, "targetTime": "yesterday"}}})),
            "/restore/physical/targetTime",
        ),
        (
            with(json!({"restore": {"physical": {"enabled": true, "targetLsn": "0x16B3"}}})),
            "/restore/physical/targetLsn",
        ),
        (
            with(json!({"restore": {"physical": {"enabled": true,
                "pgdataPath": "/bitnami/postgresql"}}})),
            "must be a directory below restore.physical.dataVolume.mountPath",
        ),
        (
            with(json!({"postgres": {"walStream": {"enabled": true,
                "replicationUrl": "postgresql://soma_replication:hunter2@127.0.0.1:5432/postgres"}}})),
            "/postgres/walStream/replicationUrl",
        ),
        (
            with(json!({"postgres": {"walStream": {"enabled": true,
                "replicationUrl": "postgresql://soma_replication@127.0.0.1/postgres?password=x"}}})),
            "/postgres/walStream/replicationUrl",
        ),
        (
            with(json!({"postgres": {"walStream": {"enabled": true, "slot": "Soma-Archive"}}})),
            "/postgres/walStream/slot",
        ),
        (
            json!({"postgres": {"walStream": {"enabled": true}}}),
            "store.bucket is required",
        ),
        (
            json!({"restore": {"physical": {"enabled": true}}}),
            "store.bucket is required",
        ),
    ] {
        let out = install(&values, &[]);
        let inst = &out["install"];
        assert_eq!(inst["ok"], json!(false), "{values} was accepted");
        let error = inst["error"].as_str().unwrap();
        assert!(error.contains(expect), "{values}: {error}");
    }
}

#[test]
fn wal_streaming_sidecar_ships_through_a_spool_volume() {
    // Off (the default): the sidecar is exactly as before, no WAL settings, no spool.
    let r = render_pod(&json!({}));
    let agent = container(&r.pod, "soma-agent");
    for var in agent["env"].as_array().unwrap() {
        let name = var["name"].as_str().unwrap();
        assert!(
            !name.starts_with("SOMA_WAL_") && !name.starts_with("SOMA_REPLICATION_"),
            "{name} without walStream"
        );
    }
    assert!(named(&r.pod["volumes"], "soma-agent-wal-spool").is_none());
    assert!(r.parts["initContainers"].as_array().unwrap().is_empty());

    // On, with a replication role.
    let r = render_pod(&pitr_example_values());
    let agent = container(&r.pod, "soma-agent");
    assert_hardened(agent);
    assert_eq!(env_value(agent, "SOMA_WAL_STREAM"), "true");
    assert_eq!(
        env_value(agent, "SOMA_WAL_SPOOL"),
        "/var/lib/soma-backup/wal-spool"
    );
    assert_eq!(env_value(agent, "SOMA_WAL_SLOT"), "soma_wal_archive");
    assert_eq!(env_value(agent, "SOMA_WAL_PARTIAL_INTERVAL"), "5s");
    assert_eq!(env_value(agent, "SOMA_WAL_DRAIN_TIMEOUT"), "10s");
    assert_eq!(
        env_value(agent, "SOMA_REPLICATION_URL"),
        "postgresql://soma_replication@127.0.0.1:5432/postgres"
    );
    assert_eq!(
        env_var(agent, "SOMA_REPLICATION_PASSWORD").unwrap()["valueFrom"],
        json!({"secretKeyRef": {"name": "soma-replication", "key": "password"}})
    );
    // The spool is a volume (the root filesystem is read-only, and it must outlive the container).
    assert_eq!(
        agent["volumeMounts"],
        json!([
            {"name": "soma-agent-tmp", "mountPath": "/tmp"},
            {"name": "soma-agent-token", "mountPath": "/var/run/secrets/soma-agent", "readOnly": true},
            {"name": "soma-encryption-keys", "mountPath": "/var/run/secrets/soma-encryption", "readOnly": true},
            {"name": "soma-agent-wal-spool", "mountPath": "/var/lib/soma-backup/wal-spool"},
        ])
    );
    assert_eq!(
        named(&r.pod["volumes"], "soma-agent-wal-spool").unwrap(),
        &json!({"name": "soma-agent-wal-spool", "emptyDir": {"sizeLimit": "4Gi"}})
    );
    assert_secrets_only_by_reference(&r.pod);
    assert_mounts_resolve(&r.pod, &["data"]);

    // Another spool path and volume, no replication role of its own (PGPASSWORD serves both).
    let r = render_pod(&json!({"postgres": {"walStream": {
        "enabled": true, "slot": "archive_2", "partialInterval": "500ms",
        "spool": {"path": "/spool", "sizeLimit": "",
                  "volume": {"persistentVolumeClaim": {"claimName": "wal-spool"}}},
    }}}));
    let agent = container(&r.pod, "soma-agent");
    assert_eq!(env_value(agent, "SOMA_WAL_SPOOL"), "/spool");
    assert_eq!(env_value(agent, "SOMA_WAL_SLOT"), "archive_2");
    assert_eq!(env_value(agent, "SOMA_WAL_PARTIAL_INTERVAL"), "500ms");
    assert!(env_var(agent, "SOMA_REPLICATION_URL").is_none());
    assert!(env_var(agent, "SOMA_REPLICATION_PASSWORD").is_none());
    assert!(env_var(agent, "PGPASSWORD").unwrap()["valueFrom"]["secretKeyRef"].is_object());
    assert_eq!(
        named(&r.pod["volumes"], "soma-agent-wal-spool").unwrap(),
        &json!({"name": "soma-agent-wal-spool",
                "persistentVolumeClaim": {"claimName": "wal-spool"}})
    );
    assert_mounts_resolve(&r.pod, &["data"]);
}

#[test]
fn physical_restore_init_container_lays_the_backup_down_before_postgresql() {
    let r = render_pod(&pitr_example_values());
    let inits = r.pod["initContainers"].as_array().expect("initContainers");
    assert_eq!(inits.len(), 1, "{inits:?}");
    let init = &inits[0];
    assert_eq!(init["name"], json!("soma-restore-pgdata"));
    assert_eq!(
        init["image"],
        json!(format!("soma-backup:{}", app_version()))
    );
    assert_hardened(init);
    // PostgreSQL's own user, so the restored files are PostgreSQL's (bitnami: 1001).
    assert_eq!(init["securityContext"]["runAsUser"], json!(1001));
    assert_eq!(init["securityContext"]["runAsGroup"], json!(1001));

    // sh -c GUARD soma-restore-pgdata ARGS...: the guard ends in `soma-agent "$@"`, so the agent
    // gets exactly these arguments.
    let command = strings(&init["command"]);
    assert_eq!(command.len(), 4, "{command:?}");
    assert_eq!(command[..2], ["/bin/sh", "-c"]);
    assert_eq!(command[3], "soma-restore-pgdata");
    let script = &command[2];
    assert_eq!(
        strings(&init["args"]),
        [
            "restore-pgdata",
            "--backup",
            "latest",
            "--pgdata",
            "/bitnami/postgresql/data",
            "--target-time",
            "2026-11-24T11:55:00Z",
            "--agent-binary",
            "/soma-bin/soma-agent",
        ]
    );
    assert!(
        script.lines().any(|l| l.trim() == r#"soma-agent "$@""#),
        "the guard must run the agent with the container's arguments:\n{script}"
    );
    // The skip-if-restored guard, and what it says.
    assert!(
        script.contains(r#"elif [ -e "$PGDATA/PG_VERSION" ]; then"#),
        "no PG_VERSION guard:\n{script}"
    );
    assert!(script.contains("skipping the restore"), "{script}");
    assert!(
        script.contains(r#"cp "$(command -v soma-agent)" /soma-bin/soma-agent"#),
        "{script}"
    );
    assert_eq!(env_value(init, "PGDATA"), "/bitnami/postgresql/data");
    assert_eq!(env_value(init, "SOMA_STORE"), "s3://soma-backups/prod");
    assert_eq!(env_value(init, "AWS_REGION"), "eu-west-1");
    assert_eq!(
        init["volumeMounts"],
        json!([
            {"name": "data", "mountPath": "/bitnami/postgresql"},
            {"name": "soma-agent-bin", "mountPath": "/soma-bin"},
            {"name": "soma-restore-tmp", "mountPath": "/tmp"},
            {"name": "soma-encryption-keys", "mountPath": "/var/run/secrets/soma-encryption", "readOnly": true},
        ])
    );

    // PostgreSQL runs restore_command = '/soma-bin/soma-agent wal-fetch ...': it needs the binary
    // (read-only) and the store's credentials, the same Secret as the sidecar's.
    let pg = container(&r.pod, "postgresql");
    assert!(
        pg["volumeMounts"].as_array().unwrap().contains(
            &json!({"name": "soma-agent-bin", "mountPath": "/soma-bin", "readOnly": true})
        ),
        "{}",
        pg["volumeMounts"]
    );
    let agent = container(&r.pod, "soma-agent");
    for name in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
        let from_pg = env_var(pg, name).unwrap_or_else(|| panic!("postgresql: no {name}"));
        assert_eq!(
            from_pg["valueFrom"],
            env_var(agent, name).unwrap()["valueFrom"],
            "{name}"
        );
        assert_eq!(
            env_var(init, name).unwrap()["valueFrom"],
            from_pg["valueFrom"],
            "{name}"
        );
    }
    assert_eq!(env_value(pg, "AWS_REGION"), "eu-west-1");
    // bitnami's entrypoint would delete recovery.signal without it.
    assert_eq!(env_value(pg, "POSTGRESQL_PERFORM_RESTORE"), "yes");
    assert_eq!(
        named(&r.pod["volumes"], "soma-agent-bin").unwrap(),
        &json!({"name": "soma-agent-bin", "emptyDir": {"sizeLimit": "256Mi"}})
    );
    assert_secrets_only_by_reference(&r.pod);
    assert_mounts_resolve(&r.pod, &["data"]);

    // The other targets, a named backup, another prefix, another image's layout.
    for (physical, target, store) in [
        (
            json!({"targetLsn": "16/B374D848", "backup": "20261124T120000Z-pg-physical-7f3a"}),
            vec!["--target-lsn", "16/B374D848"],
            "s3://soma-backups/prod",
        ),
        (
            json!({"storePrefix": "/prod-old/"}),
            vec!["--target", "latest"],
            "s3://soma-backups/prod-old",
        ),
    ] {
        let mut physical = physical;
        physical["enabled"] = json!(true);
        let r = render_pod(&json!({"restore": {"physical": physical.clone()}}));
        let init = container(&r.pod, "soma-restore-pgdata");
        let args = strings(&init["args"]);
        let backup = physical["backup"].as_str().unwrap_or("latest");
        assert_eq!(args[..3], ["restore-pgdata", "--backup", backup]);
        assert_eq!(args[5..args.len() - 2], target, "{args:?}");
        assert_eq!(env_value(init, "SOMA_STORE"), store);
        // The sidecar keeps archiving to its own prefix.
        assert_eq!(
            env_value(container(&r.pod, "soma-agent"), "SOMA_STORE"),
            "s3://soma-backups/prod"
        );
    }
    let r = render_pod(&json!({"restore": {"physical": {
        "enabled": true, "pgdataPath": "/var/lib/postgresql/data/pgdata/",
        "dataVolume": {"name": "data", "mountPath": "/var/lib/postgresql/data", "subPath": "pg"},
        "runAsUser": 999, "runAsGroup": null, "postgresEnv": [],
    }}}));
    let init = container(&r.pod, "soma-restore-pgdata");
    assert_eq!(env_value(init, "PGDATA"), "/var/lib/postgresql/data/pgdata");
    assert_eq!(
        init["volumeMounts"][0],
        json!({"name": "data", "mountPath": "/var/lib/postgresql/data", "subPath": "pg"})
    );
    assert_eq!(init["securityContext"]["runAsUser"], json!(999));
    // No group of its own: the agent's securityContext's.
    assert_eq!(init["securityContext"]["runAsGroup"], json!(65532));
    assert!(
        env_var(
            container(&r.pod, "postgresql"),
            "POSTGRESQL_PERFORM_RESTORE"
        )
        .is_none()
    );
}

/// The init container's shell guard, run for real with a stub soma-agent: a restored (or
/// initialised) data directory is skipped, an interrupted restore is redone from scratch, and a
/// directory of unknown files is refused.
#[test]
fn physical_restore_guard_skips_restored_data_and_redoes_interrupted_restores() {
    let r = render_pod(&pitr_example_values());
    let init = container(&r.pod, "soma-restore-pgdata");
    let command = strings(&init["command"]);
    let args = strings(&init["args"]);

    let dir = tempfile::tempdir().expect("tempdir");
    let bin = dir.path().join("soma-bin");
    let stub_dir = dir.path().join("stub");
    let volume = dir.path().join("volume");
    for d in [&bin, &stub_dir, &volume] {
        std::fs::create_dir(d).unwrap();
    }
    let pgdata = volume.join("data");
    let marker = volume.join("data.soma-restore-incomplete");
    let calls = dir.path().join("calls");
    assert_eq!(
        command[2].matches("/soma-bin/").count(),
        1,
        "{}",
        command[2]
    );
    let script = command[2].replace("/soma-bin/", &format!("{}/", bin.display()));
    // The stub writes PG_VERSION first, as a real base backup may; STUB_DIE=1 stops it there.
    std::fs::write(
        stub_dir.join("soma-agent"),
        format!(
            "#!/bin/sh\nprintf '%s\\n' \"$*\" >> '{}'\nmkdir -p \"$PGDATA/base\"\n\
             echo 16 > \"$PGDATA/PG_VERSION\"\n[ -z \"$STUB_DIE\" ] || exit 137\n\
             touch \"$PGDATA/base/done\"\n",
            calls.display()
        ),
    )
    .unwrap();
    let status = Command::new("chmod")
        .arg("+x")
        .arg(stub_dir.join("soma-agent"))
        .status()
        .unwrap();
    assert!(status.success());

    let run = |die: bool| {
        let _ = std::fs::remove_file(&calls);
        let out = Command::new("/bin/sh")
            .arg("-c")
            .arg(&script)
            .arg(&command[3])
            .args(&args)
            .env("PGDATA", &pgdata)
            .env("STUB_DIE", if die { "1" } else { "" })
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    stub_dir.display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .output()
            .expect("run the guard");
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let called = std::fs::read_to_string(&calls).unwrap_or_default();
        (out.status.code(), log, called)
    };
    let agent_args = format!("{}\n", args.join(" "));

    // 1. A missing data directory: restored, the binary copied for PostgreSQL, no marker left.
    let (code, log, called) = run(false);
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(called, agent_args);
    assert!(
        pgdata.join("base/done").exists() && !marker.exists(),
        "{log}"
    );
    assert!(bin.join("soma-agent").exists(), "the binary was not copied");

    // 2. The pod restarts: PG_VERSION is there, so no second restore; the binary is copied again
    //    (a new pod's emptyDir is empty, and recovery may still be running).
    std::fs::remove_file(bin.join("soma-agent")).unwrap();
    let (code, log, called) = run(false);
    assert_eq!(code, Some(0), "{log}");
    assert!(called.is_empty(), "restored twice: {called}");
    assert!(
        log.contains("PG_VERSION exists") && log.contains("skipping the restore"),
        "the log must say why: {log}"
    );
    assert!(bin.join("soma-agent").exists());
    assert!(pgdata.join("base/done").exists());

    // 3. A restore killed halfway leaves PG_VERSION behind, and the marker...
    std::fs::remove_dir_all(&pgdata).unwrap();
    let (code, log, _) = run(true);
    assert_ne!(code, Some(0), "{log}");
    assert!(pgdata.join("PG_VERSION").exists() && marker.exists());
    std::fs::write(pgdata.join("base/half-written"), "x").unwrap();
    // ...so the next start does not take it for a restored cluster: it starts over.
    let (code, log, called) = run(false);
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(called, agent_args, "{log}");
    assert!(log.contains("interrupted"), "{log}");
    assert!(!pgdata.join("base/half-written").exists(), "leftovers kept");
    assert!(pgdata.join("base/done").exists() && !marker.exists());

    // 4. Files that no restore wrote (no PG_VERSION, no marker): refused, untouched.
    std::fs::remove_dir_all(&pgdata).unwrap();
    std::fs::create_dir(&pgdata).unwrap();
    std::fs::write(pgdata.join("notes.txt"), "mine").unwrap();
    let (code, log, called) = run(false);
    assert_eq!(code, Some(1), "{log}");
    assert!(called.is_empty(), "{called}");
    assert!(pgdata.join("notes.txt").exists() && !marker.exists());
    assert!(log.contains("not empty"), "{log}");
}

/// helm/examples/postgresql-bitnami-wal.yaml and postgresql-bitnami-pitr.yaml are exactly what the
/// named templates render, and the PostgreSQL settings they carry match the sidecar's.
#[test]
fn pitr_examples_equal_the_named_templates() {
    let r = render_pod(&pitr_example_values());
    let parts = &r.parts;
    let wal = &r.files["postgresql-bitnami-wal.yaml"]["primary"];
    assert_eq!(
        wal["sidecars"], parts["container"],
        "postgresql-bitnami-wal.yaml primary.sidecars"
    );
    assert_eq!(
        wal["extraVolumes"], parts["volumes"],
        "postgresql-bitnami-wal.yaml primary.extraVolumes"
    );

    let pitr = &r.files["postgresql-bitnami-pitr.yaml"]["primary"];
    assert_eq!(
        pitr["initContainers"], parts["initContainers"],
        "postgresql-bitnami-pitr.yaml primary.initContainers"
    );
    let mut volumes = parts["volumes"].as_array().unwrap().clone();
    volumes.extend(parts["restoreVolumes"].as_array().unwrap().iter().cloned());
    assert_eq!(
        pitr["extraVolumes"],
        Value::Array(volumes),
        "postgresql-bitnami-pitr.yaml primary.extraVolumes: the sidecar's, then the restore's"
    );
    assert_eq!(
        pitr["extraVolumeMounts"], parts["restoreVolumeMounts"],
        "postgresql-bitnami-pitr.yaml primary.extraVolumeMounts"
    );
    assert_eq!(
        pitr["extraEnvVars"], parts["restoreEnv"],
        "postgresql-bitnami-pitr.yaml primary.extraEnvVars"
    );
    // The PITR file is layered on the others: it must not replace what it does not repeat.
    for key in ["sidecars", "podLabels", "podAnnotations"] {
        assert!(
            pitr.get(key).is_none(),
            "postgresql-bitnami-pitr.yaml sets {key}"
        );
    }

    // The server side of WAL streaming: the settings, and a replication entry for the very role
    // the sidecar connects as, from inside the pod.
    let conf = wal["extendedConfiguration"]
        .as_str()
        .expect("extendedConfiguration");
    for setting in [
        "wal_level = replica",
        "max_wal_senders = ",
        "max_replication_slots = ",
        "max_slot_wal_keep_size = 10GB",
    ] {
        assert!(conf.contains(setting), "no {setting:?} in:\n{conf}");
    }
    let hba = wal["pgHbaConfiguration"]
        .as_str()
        .expect("pgHbaConfiguration");
    let agent = &parts["container"][0];
    let url = env_value(agent, "SOMA_REPLICATION_URL");
    let role = url
        .trim_start_matches("postgresql://")
        .split('@')
        .next()
        .unwrap();
    assert!(
        hba.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() >= 5
                && f[0] == "host"
                && f[1] == "replication"
                && f[2] == role
                && f[3] == "127.0.0.1/32"
        }),
        "no `host replication {role} 127.0.0.1/32` entry in:\n{hba}"
    );
    // The base sidecar example is unchanged: it never streams WAL.
    let base = &r.files["postgresql-bitnami.yaml"]["primary"]["sidecars"][0];
    assert!(env_var(base, "SOMA_WAL_STREAM").is_none());
}

// ---------------------------------------------------------------------------------------------
// Unattended operation: schedules, retention and drills in the agent; metrics, probes and alerts.
// ---------------------------------------------------------------------------------------------

/// One error of a render that must fail: the install's error text.
fn render_error(values: &Value) -> String {
    let out = install(values, &[]);
    let inst = &out["install"];
    assert_eq!(inst["ok"], json!(false), "{values} was accepted");
    inst["error"].as_str().expect("error text").to_owned()
}

#[test]
fn agent_schedules_render_into_soma_schedules_per_engine() {
    // Without schedules nothing of the scheduler reaches the sidecar, and no drill volume.
    let r = render_pod(&json!({}));
    let agent = container(&r.pod, "soma-agent");
    for name in [
        "SOMA_SCHEDULES",
        "SOMA_SCHEDULE_TIMEZONE",
        "SOMA_SCHEDULE_JITTER",
        "SOMA_RETENTION",
        "SOMA_DRILL_DIR",
    ] {
        assert!(env_var(agent, name).is_none(), "{name} without schedules");
    }
    assert!(named(&r.pod["volumes"], "soma-agent-drill").is_none());

    let r = render_pod(&json!({"agent": {
        "schedules": [
            "backup 0 3 * * *",
            "backup-physical  0 2 * * SUN",
            "backup-qdrant 30 3 * * 1-5",
            "verify-latest 0 */6 * * *",
            "prune 30 4 1,15 * *",
            "drill 0 5 * JAN,jul 6",
        ],
        "scheduleTimeZone": "Europe/Paris",
        "scheduleJitter": "2m",
        "retention": "keep-last=7,keep-daily=30,keep-weekly=8,keep-monthly=12,max-age=400d",
    }}));
    let agent = container(&r.pod, "soma-agent");
    // One entry per line, whitespace normalised; the Qdrant-only entry is not PostgreSQL's.
    assert_eq!(
        env_value(agent, "SOMA_SCHEDULES"),
        "backup 0 3 * * *\nbackup-physical 0 2 * * SUN\nverify-latest 0 */6 * * *\n\
         prune 30 4 1,15 * *\ndrill 0 5 * JAN,jul 6"
    );
    assert_eq!(env_value(agent, "SOMA_SCHEDULE_TIMEZONE"), "Europe/Paris");
    assert_eq!(env_value(agent, "SOMA_SCHEDULE_JITTER"), "2m");
    assert_eq!(
        env_value(agent, "SOMA_RETENTION"),
        "keep-last=7,keep-daily=30,keep-weekly=8,keep-monthly=12,max-age=400d"
    );
    // A drill schedule brings the scratch volume for physical drills.
    assert_eq!(
        env_value(agent, "SOMA_DRILL_DIR"),
        "/var/lib/soma-backup/drill"
    );
    assert!(
        agent["volumeMounts"].as_array().unwrap().contains(
            &json!({"name": "soma-agent-drill", "mountPath": "/var/lib/soma-backup/drill"})
        ),
        "{}",
        agent["volumeMounts"]
    );
    assert_eq!(
        named(&r.pod["volumes"], "soma-agent-drill").unwrap(),
        &json!({"name": "soma-agent-drill", "emptyDir": {"sizeLimit": "20Gi"}})
    );
    assert_mounts_resolve(&r.pod, &["data"]);
    assert_secrets_only_by_reference(&r.pod);

    // The Qdrant sidecar gets the same list without the PostgreSQL-only entries, and no drill
    // volume: its drills restore into a scratch collection on the Qdrant server.
    let q = &r.parts["qdrantContainer"][0];
    assert_eq!(
        env_value(q, "SOMA_SCHEDULES"),
        "backup 0 3 * * *\nbackup-qdrant 30 3 * * 1-5\nverify-latest 0 */6 * * *\n\
         prune 30 4 1,15 * *\ndrill 0 5 * JAN,jul 6"
    );
    assert_eq!(
        env_value(q, "SOMA_RETENTION"),
        r#"keep-last=7,keep-daily=30,keep-weekly=8,keep-monthly=12,max-age=400d"#
    );
    assert!(env_var(q, "SOMA_DRILL_DIR").is_none());
    assert!(named(&r.parts["qdrantVolumes"], "soma-agent-drill").is_none());

    // Drills on demand only (no schedule), on an existing claim, elsewhere; UTC and the default
    // jitter when not set.
    let r = render_pod(&json!({"agent": {
        "schedules": ["backup 0 3 * * *"],
        "drill": {"enabled": true, "dir": "/drill/", "claimName": "pg-drill"},
    }}));
    let agent = container(&r.pod, "soma-agent");
    assert_eq!(env_value(agent, "SOMA_SCHEDULES"), "backup 0 3 * * *");
    assert!(env_var(agent, "SOMA_SCHEDULE_TIMEZONE").is_none(), "UTC");
    assert_eq!(env_value(agent, "SOMA_SCHEDULE_JITTER"), "60s");
    assert!(env_var(agent, "SOMA_RETENTION").is_none());
    assert_eq!(env_value(agent, "SOMA_DRILL_DIR"), "/drill");
    assert_eq!(
        named(&r.pod["volumes"], "soma-agent-drill").unwrap(),
        &json!({"name": "soma-agent-drill", "persistentVolumeClaim": {"claimName": "pg-drill"}})
    );
    assert_mounts_resolve(&r.pod, &["data"]);

    // A Qdrant-only list leaves the PostgreSQL sidecar without SOMA_SCHEDULES at all.
    let r = render_pod(&json!({"agent": {"schedules": ["backup-qdrant 0 3 * * *"]}}));
    assert!(env_var(container(&r.pod, "soma-agent"), "SOMA_SCHEDULES").is_none());
    assert_eq!(
        env_value(&r.parts["qdrantContainer"][0], "SOMA_SCHEDULES"),
        "backup-qdrant 0 3 * * *"
    );
}

/// The agent would refuse these at start-up, in the database pod, in a crash loop nobody
/// watches: the chart refuses them at `helm install`, naming the entry and what is wrong.
#[test]
fn bad_schedules_and_retention_fail_the_render_naming_them() {
    let with = |agent: Value| json!({"store": {"bucket": "soma-backups"}, "agent": agent});
    for (agent, expect) in [
        (
            json!({"schedules": ["backup 0 3 * * *", "backups 0 3 * * *"]}),
            vec![
                r#"agent.schedules[1] "backups 0 3 * * *""#,
                r#"unknown action "backups""#,
                "backup-physical",
            ],
        ),
        (
            json!({"schedules": ["backup 0 3 * *"]}),
            vec![
                r#"agent.schedules[0] "backup 0 3 * *""#,
                "must have 5 fields",
                "it has 4",
            ],
        ),
        (
            json!({"schedules": ["backup 0 0 3 * * *"]}),
            vec!["must have 5 fields", "it has 6"],
        ),
        (
            json!({"schedules": ["backup @daily"]}),
            vec!["must have 5 fields"],
        ),
        (
            json!({"schedules": ["verify-latest 60 3 * * *"]}),
            vec![
                r#"agent.schedules[0] "verify-latest 60 3 * * *""#,
                r#"the minute field "60" holds 60, outside 0-59"#,
            ],
        ),
        (
            json!({"schedules": ["backup 0 24 * * *"]}),
            vec!["the hour field", "outside 0-23"],
        ),
        (
            json!({"schedules": ["backup 0 3 0 * *"]}),
            vec!["the day of month field", "outside 1-31"],
        ),
        (
            json!({"schedules": ["backup 0 3 * FOO *"]}),
            vec![r#"the month field "FOO" holds "FOO", which is not a month name"#],
        ),
        (
            json!({"schedules": ["backup 0 3 * * MON#2"]}),
            vec![r#"the day of week field "MON#2" may only hold"#],
        ),
        (
            json!({"schedules": ["backup */0 3 * * *"]}),
            vec!["has a step of 0"],
        ),
        (
            json!({"schedules": ["prune 30 4 * * *"]}),
            vec![
                r#"agent.schedules[0] "prune 30 4 * * *""#,
                "a prune schedule needs agent.retention",
            ],
        ),
        (
            json!({"retention": "keep-last=seven"}),
            vec!["/agent/retention"],
        ),
        (
            json!({"retention": "keep-yearly=3"}),
            vec!["/agent/retention"],
        ),
        (
            json!({"scheduleTimeZone": "Paris time"}),
            vec!["/agent/scheduleTimeZone"],
        ),
        (
            json!({"scheduleJitter": "1 minute"}),
            vec!["/agent/scheduleJitter"],
        ),
        (
            json!({"schedules": "backup 0 3 * * *"}),
            vec!["/agent/schedules"],
        ),
    ] {
        let values = with(agent);
        let error = render_error(&values);
        for e in expect {
            assert!(error.contains(e), "{values}: no {e:?} in: {error}");
        }
    }
    // Also with no bucket (nothing of the sidecar rendered yet): lint and install check them.
    let error = render_error(&json!({"agent": {"schedules": ["restore 0 3 * * *"]}}));
    assert!(error.contains(r#"unknown action "restore""#), "{error}");
}

#[test]
fn metrics_port_env_and_probes_render() {
    // The defaults: metrics on, port 9464 named "metrics", both probes on it.
    let r = render_pod(&json!({}));
    let agent = container(&r.pod, "soma-agent");
    assert_eq!(env_value(agent, "SOMA_METRICS_LISTEN"), "0.0.0.0:9464");
    // The gRPC API stays on loopback whatever the metrics listener does.
    assert_eq!(env_value(agent, "SOMA_LISTEN"), "127.0.0.1:50051");
    assert_eq!(
        agent["ports"],
        json!([{"name": "metrics", "containerPort": 9464, "protocol": "TCP"}])
    );
    assert_eq!(
        agent["livenessProbe"],
        json!({"httpGet": {"path": "/livez", "port": "metrics"},
               "initialDelaySeconds": 10, "periodSeconds": 30, "timeoutSeconds": 5,
               "failureThreshold": 3})
    );
    assert_eq!(
        agent["readinessProbe"],
        json!({"httpGet": {"path": "/readyz", "port": "metrics"},
               "initialDelaySeconds": 0, "periodSeconds": 10, "timeoutSeconds": 5,
               "failureThreshold": 3})
    );
    // The stuck-WAL threshold only matters (and only appears) with WAL streaming.
    assert!(env_var(agent, "SOMA_WAL_STUCK_AFTER").is_none());

    // Another port, tuned probes, WAL streaming with its own stuck threshold.
    let mut values = pitr_example_values();
    values["agent"] = json!({"walStuckAfter": "15m"});
    values["metrics"] = json!({
        "port": 9300,
        "livenessProbe": {"periodSeconds": 60, "failureThreshold": 5},
        "readinessProbe": {"enabled": false},
    });
    let r = render_pod(&values);
    let agent = container(&r.pod, "soma-agent");
    assert_eq!(env_value(agent, "SOMA_METRICS_LISTEN"), "0.0.0.0:9300");
    assert_eq!(env_value(agent, "SOMA_WAL_STUCK_AFTER"), "15m");
    assert_eq!(agent["ports"][0]["containerPort"], json!(9300));
    assert_eq!(agent["livenessProbe"]["periodSeconds"], json!(60));
    assert_eq!(agent["livenessProbe"]["failureThreshold"], json!(5));
    assert_eq!(agent["livenessProbe"]["httpGet"]["port"], json!("metrics"));
    assert!(agent.get("readinessProbe").is_none());
    assert_secrets_only_by_reference(&r.pod);

    // Off: no listener, no port, no probe (they would fail against nothing).
    let r = render_pod(&json!({"metrics": {"enabled": false}}));
    let agent = container(&r.pod, "soma-agent");
    assert!(env_var(agent, "SOMA_METRICS_LISTEN").is_none());
    for key in ["ports", "livenessProbe", "readinessProbe"] {
        assert!(agent.get(key).is_none(), "{key} with metrics.enabled=false");
    }

    // The metrics listener cannot share the gRPC port.
    let error = render_error(&json!({
        "store": {"bucket": "soma-backups"},
        "postgres": {"walStream": {"enabled": true}},
        "metrics": {"port": 50051},
    }));
    assert!(
        error.contains("metrics.port and agent.port are both 50051"),
        "{error}"
    );
}

const ALERTS: [&str; 9] = [
    "SomaBackupTooOld",
    "SomaBackupFailing",
    "SomaWalArchiveLagging",
    "SomaWalArchiveStopped",
    "SomaDrillFailed",
    "SomaDrillTooOld",
    "SomaStoreDown",
    "SomaQdrantShardUnavailable",
    "SomaAgentMetricsAbsent",
];

/// The monitoring objects an install created: (kind, name, object), without the Secret.
fn monitoring_objects(values: &Value) -> Vec<(String, String, Value)> {
    let out = install(values, &[]);
    step_ok(&out["install"], &format!("helm install with {values}"));
    created(&out["install"])
}

#[test]
fn service_monitor_and_service_select_the_agent_pods_only_when_enabled() {
    // Off by default: no Service, no monitor, no rule (no Prometheus Operator needed).
    for values in [json!({}), json!({"metrics": {"enabled": true}})] {
        assert!(monitoring_objects(&values).is_empty(), "{values}");
    }

    let metrics = format!("{FULLNAME}-metrics");
    let objs = monitoring_objects(&json!({"metrics": {"serviceMonitor": {
        "enabled": true, "interval": "1m", "scrapeTimeout": "20s",
        "labels": {"release": "kube-prometheus-stack"},
    }}}));
    let kinds: Vec<&str> = objs.iter().map(|(k, _, _)| k.as_str()).collect();
    assert_eq!(kinds, ["Service", "ServiceMonitor"], "{kinds:?}");
    let svc = find(&objs, "Service", &metrics);
    let sm = find(&objs, "ServiceMonitor", &metrics);
    assert_eq!(sm["apiVersion"], json!("monitoring.coreos.com/v1"));

    // The Service selects exactly the pods the chart asks users to label as agent pods.
    let r = render_pod(&json!({}));
    let pod_labels = r.parts["labels"].as_object().unwrap();
    let selector = svc["spec"]["selector"].as_object().expect("selector");
    assert!(!selector.is_empty());
    for (k, v) in selector {
        assert_eq!(
            pod_labels.get(k),
            Some(v),
            "the Service selects {k}={v}, which agent pods ({pod_labels:?}) do not carry"
        );
    }
    assert_eq!(svc["spec"]["clusterIP"], json!("None"));
    assert_eq!(
        svc["spec"]["ports"],
        json!([{"name": "metrics", "port": 9464, "targetPort": "metrics", "protocol": "TCP"}])
    );
    // ...and the ServiceMonitor selects that Service, in the release namespace, on that port.
    let svc_labels = svc["metadata"]["labels"].as_object().unwrap();
    for (k, v) in sm["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(
            svc_labels.get(k),
            Some(v),
            "ServiceMonitor selector {k}={v}"
        );
    }
    assert_eq!(
        sm["spec"]["namespaceSelector"],
        json!({"matchNames": [NAMESPACE]})
    );
    assert_eq!(
        sm["spec"]["endpoints"],
        json!([{"port": "metrics", "path": "/metrics", "scheme": "http",
                "interval": "1m", "scrapeTimeout": "20s"}])
    );
    assert_eq!(
        sm["metadata"]["labels"]["release"],
        json!("kube-prometheus-stack")
    );

    // The PodMonitor instead: no Service at all.
    let objs = monitoring_objects(&json!({"metrics": {"podMonitor": {
        "enabled": true, "namespaceSelector": {"any": true},
    }}}));
    let kinds: Vec<&str> = objs.iter().map(|(k, _, _)| k.as_str()).collect();
    assert_eq!(kinds, ["PodMonitor"]);
    let pm = find(&objs, "PodMonitor", &metrics);
    for (k, v) in pm["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(pod_labels.get(k), Some(v), "PodMonitor selector {k}={v}");
    }
    assert_eq!(pm["spec"]["namespaceSelector"], json!({"any": true}));
    assert_eq!(
        pm["spec"]["podMetricsEndpoints"][0]["port"],
        json!("metrics")
    );

    // Contradictions are refused with what to change.
    for (values, expect) in [
        (
            json!({"metrics": {"serviceMonitor": {"enabled": true}, "podMonitor": {"enabled": true}}}),
            "enable one of them",
        ),
        (
            json!({"metrics": {"enabled": false, "serviceMonitor": {"enabled": true}}}),
            "need metrics.enabled=true",
        ),
        (
            json!({"metrics": {"prometheusRule": {"enabled": true}}}),
            "alerts.agentMetricsAbsent needs the job label",
        ),
    ] {
        let error = render_error(&values);
        assert!(error.contains(expect), "{values}: {error}");
    }
}

/// The metric names the agent exports (the lead's list in issue 12), plus Prometheus' own `up`.
const KNOWN_METRICS: [&str; 22] = [
    "soma_backup_last_success_timestamp_seconds",
    "soma_backup_last_duration_seconds",
    "soma_backup_last_bytes",
    "soma_backups",
    "soma_backup_failures_total",
    "soma_operation_failures_total",
    "soma_verify_last_success_timestamp_seconds",
    "soma_drill_last_success_timestamp_seconds",
    "soma_drill_last_rto_seconds",
    "soma_prune_last_success_timestamp_seconds",
    "soma_prune_deleted_objects_total",
    "soma_wal_streaming",
    "soma_wal_receiving",
    "soma_wal_archive_lag_bytes",
    "soma_wal_last_shipped_timestamp_seconds",
    "soma_recovery_window_start_timestamp_seconds",
    "soma_store_up",
    "soma_qdrant_shards_unavailable",
    "soma_qdrant_cluster_view_ok",
    "soma_schedule_next_run_timestamp_seconds",
    "soma_schedule_skipped_runs_total",
    "up",
];

/// A structural check of a PromQL expression (there is no promtool here): brackets balance;
/// every `{...}` is a list of `label op "string"` matchers; every `[...]` is a range duration;
/// every identifier is a known function (followed by `(`), a binary keyword or modifier
/// (`and`, `or`, `unless`, `on(...)`, ...), or one of [`KNOWN_METRICS`]; and no two operands or
/// two operators follow each other. Returns the metric names it references.
fn check_promql(expr: &str) -> Vec<String> {
    const FUNCTIONS: [&str; 6] = ["time", "increase", "absent", "max", "rate", "sum"];
    const KEYWORDS: [&str; 4] = ["and", "or", "unless", "bool"];
    const MODIFIERS: [&str; 4] = ["on", "ignoring", "by", "without"];
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    let mut stack = Vec::new();
    let mut metrics = Vec::new();
    // true when the previous token ends an operand (a number, a selector, a `)`).
    let mut after_operand = false;
    let ident = |i: &mut usize| {
        let start = *i;
        while *i < chars.len() && (chars[*i].is_ascii_alphanumeric() || chars[*i] == '_') {
            *i += 1;
        }
        chars[start..*i].iter().collect::<String>()
    };
    let skip_ws = |i: &mut usize| {
        while *i < chars.len() && chars[*i].is_whitespace() {
            *i += 1;
        }
    };
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_alphabetic() || c == '_' {
            let word = ident(&mut i);
            let mut j = i;
            skip_ws(&mut j);
            let next = chars.get(j).copied();
            if KEYWORDS.contains(&word.as_str()) {
                assert!(after_operand, "{expr}: {word} without a left operand");
                after_operand = false;
            } else if MODIFIERS.contains(&word.as_str()) {
                assert_eq!(next, Some('('), "{expr}: {word} without its label list");
                // The label list: identifiers and commas up to `)`.
                i = j + 1;
                loop {
                    skip_ws(&mut i);
                    match chars.get(i) {
                        Some(')') => break,
                        Some(',') => i += 1,
                        Some(c) if c.is_ascii_alphabetic() => {
                            ident(&mut i);
                        }
                        other => panic!("{expr}: {other:?} in the label list of {word}"),
                    }
                }
                i += 1;
            } else if next == Some('(') {
                assert!(
                    FUNCTIONS.contains(&word.as_str()),
                    "{expr}: unknown function {word}"
                );
                assert!(!after_operand, "{expr}: {word}( right after an operand");
            } else {
                assert!(
                    KNOWN_METRICS.contains(&word.as_str()),
                    "{expr}: {word} is not a metric the agent exports"
                );
                assert!(!after_operand, "{expr}: {word} right after an operand");
                metrics.push(word);
                after_operand = true;
                if next == Some('{') {
                    // Label matchers: name op "string", separated by commas.
                    i = j + 1;
                    loop {
                        skip_ws(&mut i);
                        if chars.get(i) == Some(&'}') {
                            i += 1;
                            break;
                        }
                        let label = ident(&mut i);
                        assert!(!label.is_empty(), "{expr}: a matcher without a label name");
                        skip_ws(&mut i);
                        let op: String = chars[i..]
                            .iter()
                            .take_while(|c| matches!(c, '=' | '!' | '~'))
                            .collect();
                        assert!(
                            ["=", "!=", "=~", "!~"].contains(&op.as_str()),
                            "{expr}: matcher {label}{op}"
                        );
                        i += op.len();
                        skip_ws(&mut i);
                        assert_eq!(chars.get(i), Some(&'"'), "{expr}: {label}{op} not a string");
                        i += 1;
                        while chars.get(i).is_some_and(|c| *c != '"') {
                            assert_ne!(chars[i], '\\', "{expr}: escapes in a matcher");
                            i += 1;
                        }
                        assert!(i < chars.len(), "{expr}: unterminated string");
                        i += 1;
                        skip_ws(&mut i);
                        match chars.get(i) {
                            Some(',') => i += 1,
                            Some('}') => {}
                            other => panic!("{expr}: {other:?} after the matcher on {label}"),
                        }
                    }
                }
            }
        } else if c.is_ascii_digit() {
            assert!(!after_operand, "{expr}: a number right after an operand");
            while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                i += 1;
            }
            after_operand = true;
        } else if c == '[' {
            assert!(after_operand, "{expr}: a range without a selector");
            let end = chars[i..]
                .iter()
                .position(|c| *c == ']')
                .unwrap_or_else(|| panic!("{expr}: unclosed ["))
                + i;
            let duration: String = chars[i + 1..end].iter().collect();
            let (n, unit) = duration.split_at(duration.len().saturating_sub(1));
            assert!(
                !n.is_empty()
                    && n.chars().all(|c| c.is_ascii_digit())
                    && ["s", "m", "h", "d", "w"].contains(&unit),
                "{expr}: range [{duration}] is not a duration"
            );
            i = end + 1;
        } else if c == '(' {
            assert!(!after_operand, "{expr}: ( right after an operand");
            stack.push(')');
            i += 1;
        } else if c == ')' {
            assert_eq!(stack.pop(), Some(')'), "{expr}: unbalanced )");
            after_operand = true;
            i += 1;
        } else {
            let op: String = chars[i..]
                .iter()
                .take_while(|c| matches!(c, '=' | '!' | '<' | '>' | '+' | '-' | '*' | '/'))
                .collect();
            assert!(
                ["==", "!=", ">", "<", ">=", "<=", "+", "-", "*", "/"].contains(&op.as_str()),
                "{expr}: unexpected {c:?}"
            );
            assert!(after_operand, "{expr}: {op} without a left operand");
            after_operand = false;
            i += op.len();
        }
    }
    assert!(stack.is_empty(), "{expr}: unclosed (");
    assert!(after_operand, "{expr}: ends with an operator");
    metrics
}

/// The alert rules in a PrometheusRule: name -> the rules of that name.
fn alert_rules(rule: &Value) -> Vec<(String, Value)> {
    let groups = rule["spec"]["groups"].as_array().expect("groups");
    assert_eq!(groups.len(), 1);
    groups[0]["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .map(|r| (r["alert"].as_str().expect("alert").to_owned(), r.clone()))
        .collect()
}

#[test]
fn prometheus_rule_alerts_carry_the_thresholds_from_values_and_a_runbook() {
    let metrics = format!("{FULLNAME}-metrics");
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    let values = json!({"metrics": {
        "serviceMonitor": {"enabled": true},
        "prometheusRule": {
            "enabled": true,
            "labels": {"release": "kube-prometheus-stack"},
            "alerts": {
                "backupTooOld": {"olderThan": "30h", "olderThanByKind": {"physical": "8d"},
                                 "for": "20m", "severity": "critical"},
                "walArchiveLagging": {"lagBytes": 536870912, "for": "7m"},
                "walArchiveStopped": {"stalledFor": "20m"},
                "drillTooOld": {"olderThan": "2w"},
                "storeDown": {"for": "3m", "severity": "warning"},
            },
        },
    }});
    let objs = monitoring_objects(&values);
    let rule = find(&objs, "PrometheusRule", &metrics);
    assert_eq!(rule["apiVersion"], json!("monitoring.coreos.com/v1"));
    assert_eq!(
        rule["metadata"]["labels"]["release"],
        json!("kube-prometheus-stack")
    );
    let rules = alert_rules(rule);
    let names: BTreeSet<&str> = rules.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ALERTS.iter().copied().collect(), "alert names");

    let mut referenced = BTreeSet::new();
    for (name, r) in &rules {
        let expr = r["expr"].as_str().expect("expr");
        referenced.extend(check_promql(expr));
        // Only this release's namespace: another namespace's agents have their own rules.
        assert!(
            expr.contains(&format!("namespace=\"{NAMESPACE}\"")),
            "{name}: {expr}"
        );
        let severity = r["labels"]["severity"].as_str().unwrap_or("");
        assert!(
            ["critical", "warning", "info"].contains(&severity),
            "{name}: severity {severity:?}"
        );
        let summary = r["annotations"]["summary"].as_str().expect("summary");
        let description = r["annotations"]["description"]
            .as_str()
            .expect("description");
        assert!(
            description.contains("{{ $labels.pod }}") && description.contains("$labels.namespace"),
            "{name}: the description must name the pod: {description}"
        );
        if expr.contains("soma_backup_") || expr.contains("soma_drill_") {
            assert!(
                summary.contains("{{ $labels.target }}"),
                "{name}: the summary must name the target: {summary}"
            );
        }
        // The runbook link points at this alert's own section of the README.
        let url = r["annotations"]["runbook_url"]
            .as_str()
            .expect("runbook_url");
        assert_eq!(
            url,
            format!(
                "https://example.invalid/soma-backup/blob/main/README.md#{}",
                name.to_lowercase()
            )
        );
        assert!(
            readme.lines().any(|l| l == format!("### {name}")),
            "README.md has no `### {name}` runbook section"
        );
    }
    // Every metric an alert needs is one the agent exports, and the alerts use the key ones.
    for m in [
        "soma_backup_last_success_timestamp_seconds",
        "soma_backup_failures_total",
        "soma_wal_archive_lag_bytes",
        "soma_wal_streaming",
        "soma_wal_receiving",
        "soma_wal_last_shipped_timestamp_seconds",
        "soma_operation_failures_total",
        "soma_drill_last_success_timestamp_seconds",
        "soma_store_up",
        "soma_qdrant_shards_unavailable",
        "up",
    ] {
        assert!(referenced.contains(m), "no alert uses {m}");
    }

    let by_name = |name: &str| -> Vec<&Value> {
        rules
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, r)| r)
            .collect()
    };
    let one = |name: &str| -> &Value {
        let r = by_name(name);
        assert_eq!(r.len(), 1, "{name}");
        r[0]
    };
    // Thresholds from the values, turned into seconds where compared with timestamps.
    let too_old = by_name("SomaBackupTooOld");
    let exprs: Vec<&str> = too_old
        .iter()
        .map(|r| r["expr"].as_str().unwrap())
        .collect();
    assert_eq!(
        exprs,
        [
            format!(
                "time() - soma_backup_last_success_timestamp_seconds\
                 {{namespace=\"{NAMESPACE}\", kind!~\"physical\"}} > 108000"
            ),
            format!(
                "time() - soma_backup_last_success_timestamp_seconds\
                 {{namespace=\"{NAMESPACE}\", kind=\"physical\"}} > 691200"
            ),
        ]
    );
    for r in &too_old {
        assert_eq!(r["for"], json!("20m"));
        assert_eq!(r["labels"]["severity"], json!("critical"));
    }
    assert_eq!(
        one("SomaBackupFailing")["expr"],
        json!(format!(
            "increase(soma_backup_failures_total{{namespace=\"{NAMESPACE}\"}}[1h]) > 0"
        ))
    );
    let lag = one("SomaWalArchiveLagging");
    assert_eq!(
        lag["expr"],
        json!(format!(
            "soma_wal_archive_lag_bytes{{namespace=\"{NAMESPACE}\"}} > 536870912"
        ))
    );
    assert_eq!(lag["for"], json!("7m"));
    let stopped = one("SomaWalArchiveStopped")["expr"].as_str().unwrap();
    assert!(
        stopped.contains("soma_wal_receiving{namespace=\"soma-ns\"} == 0"),
        "{stopped}"
    );
    assert!(
        stopped.contains(
            "time() - soma_wal_last_shipped_timestamp_seconds{namespace=\"soma-ns\"} > 1200"
        ),
        "{stopped}"
    );
    assert!(
        one("SomaDrillFailed")["expr"].as_str().unwrap().contains(
            "soma_operation_failures_total{operation=\"drill\", namespace=\"soma-ns\"}[1d]"
        ),
    );
    assert!(
        one("SomaDrillTooOld")["expr"]
            .as_str()
            .unwrap()
            .ends_with("> 1209600"),
        "2w"
    );
    let store = one("SomaStoreDown");
    assert_eq!(
        store["expr"],
        json!(format!("soma_store_up{{namespace=\"{NAMESPACE}\"}} == 0"))
    );
    assert_eq!(store["for"], json!("3m"));
    assert_eq!(store["labels"]["severity"], json!("warning"));
    // Target down: the job the ServiceMonitor gives the samples is the Service's name.
    assert_eq!(
        one("SomaAgentMetricsAbsent")["expr"],
        json!(format!(
            "up{{job=\"{metrics}\", namespace=\"{NAMESPACE}\"}} == 0 or \
             absent(up{{job=\"{metrics}\", namespace=\"{NAMESPACE}\"}})"
        ))
    );

    // With the PodMonitor the job is "<namespace>/<PodMonitor>"; alerts can be turned off.
    let objs = monitoring_objects(&json!({"metrics": {
        "podMonitor": {"enabled": true},
        "prometheusRule": {"enabled": true, "alerts": {
            "drillFailed": {"enabled": false}, "drillTooOld": {"enabled": false},
        }},
    }}));
    let rules = alert_rules(find(&objs, "PrometheusRule", &metrics));
    let names: Vec<&str> = rules.iter().map(|(n, _)| n.as_str()).collect();
    assert!(!names.contains(&"SomaDrillFailed") && !names.contains(&"SomaDrillTooOld"));
    let absent = &rules
        .iter()
        .find(|(n, _)| n == "SomaAgentMetricsAbsent")
        .unwrap()
        .1;
    assert!(
        absent["expr"]
            .as_str()
            .unwrap()
            .starts_with(&format!("up{{job=\"{NAMESPACE}/{metrics}\", ")),
        "{}",
        absent["expr"]
    );
    for (_, r) in &rules {
        check_promql(r["expr"].as_str().unwrap());
    }

    // A duration Prometheus would not understand is refused by the schema.
    let error = render_error(&json!({"metrics": {"serviceMonitor": {"enabled": true},
        "prometheusRule": {"enabled": true, "alerts": {"backupTooOld": {"olderThan": "1 day"}}}}}));
    assert!(
        error.contains("/metrics/prometheusRule/alerts/backupTooOld/olderThan"),
        "{error}"
    );
}

/// The PromQL check itself refuses what Prometheus would refuse.
#[test]
fn promql_check_catches_broken_expressions() {
    for bad in [
        "soma_store_up{namespace=\"x\"} == ",
        "(soma_store_up == 0",
        "soma_store_upp == 0",
        "increase(soma_backup_failures_total[1 h]) > 0",
        "soma_store_up{namespace=x} == 0",
        "soma_store_up soma_wal_streaming",
        "rat(soma_store_up[5m])",
    ] {
        let result = std::panic::catch_unwind(|| check_promql(bad));
        assert!(result.is_err(), "accepted {bad:?}");
    }
}

#[test]
fn lint_is_clean_with_everything_unattended_enabled() {
    let chart = chart();
    let dir = tempfile::tempdir().expect("tempdir");
    for (what, values) in [
        (
            "schedules, drills on a claim, WAL streaming, PodMonitor and every alert",
            json!({
                "store": {"bucket": "soma-backups"},
                "postgres": {"walStream": {"enabled": true}},
                "agent": {
                    "schedules": ["backup 0 3 * * *", "prune 0 4 * * *", "drill 0 5 * * 6"],
                    "retention": "keep-daily=7", "scheduleTimeZone": "America/New_York",
                    "drill": {"enabled": true, "claimName": "pg-drill"},
                },
                "metrics": {"podMonitor": {"enabled": true},
                            "prometheusRule": {"enabled": true, "job": "soma"}},
            }),
        ),
        (
            "metrics off, the CronJob instead of agent schedules",
            json!({"metrics": {"enabled": false}, "schedule": {"enabled": true}}),
        ),
    ] {
        let file = dir.path().join("values.yaml");
        std::fs::write(&file, with_key(&values).to_string()).unwrap();
        let result = engine(&["lint", path_str(&chart), "--values", path_str(&file)]);
        let bad: Vec<&Value> = result["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .filter(|m| m["severity"].as_i64().unwrap_or(3) >= 2)
            .collect();
        assert!(bad.is_empty(), "helm lint with {what}: {bad:?}");
        step_ok(&install(&values, &[])["install"], what);
    }
}

/// agent.encryption: the key Secret is mounted (read-only) and named by
/// SOMA_ENCRYPTION_KEY_FILE in every container that reads or writes the store — the sidecar, the
/// physical restore's init container and PostgreSQL, whose restore_command (wal-fetch) opens the
/// encrypted WAL — at the same path, since restore_command names the key files by path; the pod
/// has the volume once. store.readOnlyCredentials: the containers that only read get the
/// read-only keys, the sidecar keeps the read-write ones.
#[test]
fn encryption_keys_and_read_only_credentials_reach_the_containers_that_need_them() {
    let mut values = pitr_example_values();
    values["agent"]["encryption"] =
        json!({"existingSecret": "soma-backup-key", "keys": ["new", "old"]});
    values["store"]["readOnlyCredentials"] = json!({"existingSecret": "soma-backup-s3-readonly"});
    let r = render_pod(&values);
    assert_secrets_only_by_reference(&r.pod);
    assert_mounts_resolve(&r.pod, &["data"]);
    let keys = named(&r.pod["volumes"], "soma-encryption-keys").expect("the keys' volume");
    assert_eq!(keys["secret"]["secretName"], json!("soma-backup-key"));
    // Readable by whichever user each container runs as (the sidecar's 65532, PostgreSQL's own),
    // without needing the pod's fsGroup; only the containers that mount it can see it.
    assert_eq!(keys["secret"]["defaultMode"], json!(0o444));
    let files = "/var/run/secrets/soma-encryption/new,/var/run/secrets/soma-encryption/old";
    for name in ["soma-agent", "soma-restore-pgdata", "postgresql"] {
        let c = container(&r.pod, name);
        assert_eq!(env_value(c, "SOMA_ENCRYPTION_KEY_FILE"), files, "{name}");
        let mount = named(&c["volumeMounts"], "soma-encryption-keys")
            .unwrap_or_else(|| panic!("{name} does not mount the keys"));
        assert_eq!(
            mount["mountPath"],
            json!("/var/run/secrets/soma-encryption")
        );
        assert_eq!(mount["readOnly"], json!(true));
        let secret = &env_var(c, "AWS_SECRET_ACCESS_KEY").expect("S3 keys")["valueFrom"]["secretKeyRef"]
            ["name"];
        let expected = if name == "soma-agent" {
            "soma-backup-s3"
        } else {
            "soma-backup-s3-readonly"
        };
        assert_eq!(secret, &json!(expected), "{name}'s S3 credentials");
    }
    // A key name that is a hidden file (the Secret volume's ..data link) is refused at render time.
    let err = render_error(&json!({"agent": {"encryption": {
        "existingSecret": "soma-backup-key", "keys": ["..data"],
    }}}));
    assert!(err.contains("agent.encryption.keys"), "{err}");
}

/// The port in an http(s) URL, or the scheme's default.
fn url_port(url: &str) -> u16 {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let authority = rest.split('/').next().unwrap();
    match authority.rsplit_once(':') {
        Some((_, port)) => port.parse().expect("a port"),
        None if scheme == "https" => 443,
        None => 80,
    }
}

/// helm/examples/qdrant.yaml is a distributed Qdrant: three nodes in cluster mode, the agent in the
/// pod template (so beside every node), talking to its own node on loopback and able to reach the
/// other nodes' REST API on the port they serve it. Backups run once per schedule: the CronJob of
/// soma-backup.yaml (which picks one Qdrant agent per cluster), never a schedule inside the
/// sidecars, which every node would run.
#[test]
fn qdrant_example_is_a_three_node_cluster_with_the_agent_beside_every_node() {
    let out = engine(&["examples", path_str(&chart()), path_str(&examples_dir())]);
    assert!(
        out.get("error").is_none(),
        "rendering failed: {}",
        out["error"]
    );
    let q = &out["files"]["qdrant.yaml"];
    assert_eq!(q["replicaCount"], json!(3), "qdrant.yaml replicaCount");
    assert_eq!(
        q["config"]["cluster"]["enabled"],
        json!(true),
        "qdrant.yaml config.cluster.enabled: distributed mode"
    );
    // The qdrant chart puts sidecarContainers into the StatefulSet's one pod template: every node
    // gets the agent, and the discovery labels with it.
    let agents: Vec<&Value> = q["sidecarContainers"]
        .as_array()
        .expect("sidecarContainers")
        .iter()
        .filter(|c| c["name"] == "soma-agent")
        .collect();
    assert_eq!(
        agents.len(),
        1,
        "one agent per pod: {}",
        q["sidecarContainers"]
    );
    let agent = agents[0];
    assert_eq!(
        q["podLabels"],
        json!({"soma.dev/agent": "true", "soma.dev/engine": "qdrant"})
    );

    // Its own node on loopback: a Service would hand each request to any node.
    let url = env_value(agent, "SOMA_QDRANT_URL");
    let host = url
        .split_once("://")
        .unwrap()
        .1
        .split(['/', ':'])
        .next()
        .unwrap();
    assert_eq!(
        host, "127.0.0.1",
        "SOMA_QDRANT_URL must be the pod's own node: {url}"
    );
    // The peers' REST port: the qdrant chart's "http" service port (6333 unless the example
    // overrides service.ports) is where the agent looks for them.
    let served = q["service"]["ports"]
        .as_array()
        .and_then(|ports| ports.iter().find(|p| p["name"] == "http"))
        .map(|p| p["targetPort"].as_u64().expect("a numeric targetPort") as u16)
        .unwrap_or(6333);
    let peer_port = env_var(agent, "SOMA_QDRANT_PEER_PORT")
        .map(|v| v["value"].as_str().unwrap().parse::<u16>().expect("a port"))
        .unwrap_or_else(|| url_port(url));
    assert_eq!(
        peer_port, served,
        "the agent looks for the other nodes' REST API on {peer_port}, they serve it on {served}"
    );
    // Full-storage snapshots do not exist in distributed mode.
    assert_ne!(env_value(agent, "SOMA_QDRANT_MODE"), "full-storage");

    // One backup per schedule: no sidecar schedule (each of the 3 nodes would run it), and the
    // CronJob of soma-backup.yaml backs Qdrant up.
    assert!(
        env_var(agent, "SOMA_SCHEDULES").is_none(),
        "qdrant.yaml: a schedule in the sidecar runs on every node"
    );
    let soma = &out["files"]["soma-backup.yaml"];
    assert_eq!(soma["schedule"]["enabled"], json!(true));
    let command = soma["schedule"]["command"].as_str().unwrap();
    assert!(
        ["all", "qdrant"].contains(&command),
        "soma-backup.yaml's CronJob does not back Qdrant up: {command}"
    );
    let objs = created(
        &engine(&[
            "install",
            path_str(&chart()),
            "--values",
            path_str(&examples_dir().join("soma-backup.yaml")),
        ])["install"],
    );
    let cron = find(&objs, "CronJob", &format!("{FULLNAME}-scheduled-backup"));
    let c = &cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        strings(&c["args"]),
        ["backup", command, "-n", NAMESPACE],
        "the CronJob's command"
    );
}

/// qdrant.peerPort reaches the sidecar as SOMA_QDRANT_PEER_PORT only when set (the agent's own
/// default is the port of qdrant.url); a value that is no port fails the render naming it.
#[test]
fn qdrant_peer_port_reaches_the_sidecar_only_when_set() {
    let r = render_pod(&json!({}));
    let q = &r.parts["qdrantContainer"][0];
    assert!(env_var(q, "SOMA_QDRANT_PEER_PORT").is_none(), "{q}");
    assert!(env_var(container(&r.pod, "soma-agent"), "SOMA_QDRANT_PEER_PORT").is_none());

    let r = render_pod(&json!({"qdrant": {"peerPort": 7333}}));
    assert_eq!(
        env_value(&r.parts["qdrantContainer"][0], "SOMA_QDRANT_PEER_PORT"),
        "7333"
    );
    // Not PostgreSQL's business.
    assert!(env_var(container(&r.pod, "soma-agent"), "SOMA_QDRANT_PEER_PORT").is_none());

    for bad in [json!(0), json!(65536), json!("6333"), json!(6333.5)] {
        let err = render_error(&json!({"qdrant": {"peerPort": bad}}));
        assert!(
            err.contains("qdrant") && err.contains("peerPort"),
            "{bad}: {err}"
        );
    }
}
