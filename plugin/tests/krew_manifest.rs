//! The krew plugin manifest (`krew/soma.yaml`) parses as YAML of krew's Plugin kind, covers
//! linux and darwin on amd64 and arm64, installs both binaries (the plugin and the
//! `kubectl_complete-soma` helper), and leaves uri and sha256 visibly to the release job.

use serde_yaml::Value;

fn manifest() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../krew/soma.yaml");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{path} is not YAML: {e}"))
}

#[test]
fn krew_manifest_names_both_binaries_on_every_platform() {
    let m = manifest();
    assert_eq!(
        m["apiVersion"].as_str(),
        Some("krew.googlecontainertools.github.com/v1alpha2")
    );
    assert_eq!(m["kind"].as_str(), Some("Plugin"));
    assert_eq!(m["metadata"]["name"].as_str(), Some("soma"));
    let spec = &m["spec"];
    for field in [
        "version",
        "shortDescription",
        "description",
        "caveats",
        "homepage",
    ] {
        assert!(
            spec[field].as_str().is_some_and(|v| !v.trim().is_empty()),
            "spec.{field} is missing"
        );
    }
    assert!(
        spec["caveats"]
            .as_str()
            .unwrap()
            .contains("kubectl_complete-soma")
    );
    let platforms = spec["platforms"].as_sequence().expect("spec.platforms");
    let mut seen = Vec::new();
    for p in platforms {
        let labels = &p["selector"]["matchLabels"];
        let (os, arch) = (
            labels["os"].as_str().unwrap(),
            labels["arch"].as_str().unwrap(),
        );
        seen.push(format!("{os}/{arch}"));
        assert_eq!(p["bin"].as_str(), Some("kubectl-soma"), "{os}/{arch}");
        let files: Vec<&str> = p["files"]
            .as_sequence()
            .expect("files")
            .iter()
            .filter_map(|f| f["from"].as_str())
            .collect();
        for binary in ["kubectl-soma", "kubectl_complete-soma"] {
            assert!(
                files.contains(&binary),
                "{os}/{arch} does not install {binary}: {files:?}"
            );
        }
        for field in ["uri", "sha256"] {
            assert!(
                p[field].as_str().unwrap().contains("RELEASE-FILLED"),
                "{os}/{arch} {field} must be an obvious placeholder for the release job"
            );
        }
    }
    seen.sort();
    assert_eq!(
        seen,
        ["darwin/amd64", "darwin/arm64", "linux/amd64", "linux/arm64"]
    );
}
