//! `crds/` is exactly what `prefect-operator crd` prints.

#[test]
fn crd_file_matches_the_types() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crds/prefectdeployments.prefect.io.yaml"
    );
    let on_disk = std::fs::read_to_string(path).expect("crds/ file exists");
    assert!(
        on_disk == prefect_operator::api::crd_yaml(),
        "crds/prefectdeployments.prefect.io.yaml is stale: regenerate it with `cargo run -- crd > crds/prefectdeployments.prefect.io.yaml`"
    );
}

#[test]
fn crd_subcommand_prints_the_file() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_prefect-operator"))
        .arg("crd")
        .output()
        .unwrap();
    assert!(out.status.success());
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crds/prefectdeployments.prefect.io.yaml"
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        std::fs::read_to_string(path).unwrap()
    );
}

/// Structural schemas refuse `null` among an enum's values (a 1.20 apiserver rejects the
/// whole CRD with a misleading message): optional enums must list their values only.
#[test]
fn no_enum_lists_null() {
    let crd: serde_json::Value = serde_yaml::from_str(&prefect_operator::api::crd_yaml()).unwrap();
    let mut stack = vec![(String::new(), &crd)];
    while let Some((path, v)) = stack.pop() {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(values) = m.get("enum").and_then(|e| e.as_array()) {
                    assert!(values.iter().all(|x| !x.is_null()), "{path}: {values:?}");
                }
                stack.extend(m.iter().map(|(k, c)| (format!("{path}.{k}"), c)));
            }
            serde_json::Value::Array(a) => stack.extend(
                a.iter()
                    .enumerate()
                    .map(|(i, c)| (format!("{path}[{i}]"), c)),
            ),
            _ => {}
        }
    }
}
