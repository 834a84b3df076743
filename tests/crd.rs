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
