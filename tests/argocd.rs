//! The Argo CD health check against objects captured from real test runs
//! (tests/fixtures/argocd/<expected status>-<state>.yaml), in Lua 5.4 and, where
//! installed, Lua 5.1 (the dialect Argo CD's gopher-lua speaks); and against kstatus's
//! reading of the same objects, so Argo CD and Flux agree.

mod support;

use std::path::Path;
use std::process::Command;

#[test]
fn health_of_captured_objects() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/argocd");
    let mut seen = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let stem = path.file_stem().unwrap().to_string_lossy().to_string();
        let want = match stem.split('-').next().unwrap() {
            "healthy" => "Healthy",
            "degraded" => "Degraded",
            "progressing" => "Progressing",
            other => panic!("fixture {stem}: unknown expected status {other}"),
        };
        for lua in ["lua5.4", "lua5.1"] {
            if lua == "lua5.1" && Command::new("lua5.1").arg("-v").output().is_err() {
                continue;
            }
            let (status, message) = support::argocd_health(lua, &path);
            assert_eq!(status, want, "{lua} {stem}: {message}");
        }
        // Argo CD and Flux (kstatus) read the same object the same way.
        let object: serde_json::Value =
            serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let flux = support::kstatus(&object);
        let agrees = match want {
            "Healthy" => flux == "Current",
            "Degraded" => flux == "Failed",
            _ => flux == "InProgress" || flux == "Terminating",
        };
        assert!(agrees, "{stem}: Argo CD {want}, kstatus {flux}");
        seen.insert(want);
    }
    assert_eq!(
        seen.len(),
        3,
        "fixtures cover Healthy, Degraded and Progressing"
    );
}

/// Runs an action script on a captured object under `lua`; returns its output.
fn action(lua: &str, script: &str, object: &Path) -> String {
    support::argocd_lua(lua, "action.lua", &format!("actions/{script}"), object)
}

/// The resource actions in both Lua dialects on a captured object: what each offers
/// and what each changes (applied to a real apiserver in tests/controller.rs).
#[test]
fn actions_on_a_captured_object() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/argocd/healthy-ready.yaml");
    for lua in ["lua5.4", "lua5.1"] {
        if lua == "lua5.1" && Command::new("lua5.1").arg("-v").output().is_err() {
            continue;
        }
        assert_eq!(
            action(lua, "discovery", &path),
            "pause enabled\nreconcile enabled\nresume disabled\nrun-now enabled\n",
            "{lua}"
        );
        let changed = |script: &str| -> serde_json::Value {
            serde_yaml::from_str(&action(lua, script, &path)).unwrap()
        };
        let stamp = |v: &serde_json::Value, key: &str| -> String {
            v["metadata"]["annotations"][key]
                .as_str()
                .unwrap_or_default()
                .to_string()
        };
        let r = changed("reconcile");
        assert!(
            stamp(&r, "reconcile.fluxcd.io/requestedAt").ends_with('Z'),
            "{lua}: {r}"
        );
        let r = changed("run-now");
        assert!(
            stamp(&r, "prefect.io/run-requested-at").ends_with('Z'),
            "{lua}: {r}"
        );
        assert_eq!(
            changed("pause")["spec"]["deployment"]["paused"],
            true,
            "{lua}"
        );
        assert_eq!(
            changed("resume")["spec"]["deployment"]["paused"],
            false,
            "{lua}"
        );
    }
}
