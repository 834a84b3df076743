//! Reading PrefectDeployment manifests from files, directories or stdin, and checking
//! one the way the apiserver and the controller together would: the CRD's OpenAPI
//! schema, then the typed decode, then `validate()` (which holds the CEL rules' checks
//! and everything the controller adds). Used by the `validate`, `diff` and `convert`
//! commands; no cluster and no Prefect.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::Value;

use crate::api::PrefectDeployment;
use crate::validate::{validate, Problem, ValidSpec};

/// Largest manifest file read; bigger ones are refused rather than loaded.
const MAX_FILE_BYTES: u64 = 16 << 20;

/// One YAML/JSON document that is a PrefectDeployment, with where it came from.
#[derive(Debug, Clone)]
pub struct Document {
    /// The file (or `-` for stdin).
    pub file: String,
    /// Where in the file: `document 2`, or `document 1, items[3]` inside a List.
    pub place: String,
    pub value: Value,
}

impl Document {
    /// `namespace/name` as far as the manifest says.
    pub fn object_name(&self) -> String {
        let meta = &self.value["metadata"];
        let name = meta["name"].as_str().unwrap_or("(no name)");
        match meta["namespace"].as_str() {
            Some(ns) => format!("{ns}/{name}"),
            None => name.to_string(),
        }
    }

    /// `file: document N (namespace/name)`, the prefix of every line about it.
    pub fn label(&self) -> String {
        format!("{}: {} ({})", self.file, self.place, self.object_name())
    }
}

/// A file that could not be read or parsed, as one line naming it.
#[derive(Debug, Clone)]
pub struct ReadError(pub String);

/// Every PrefectDeployment in `paths` (files, directories searched for `.yaml`, `.yml`
/// and `.json`, or `-` for stdin), in order. Other kinds are skipped; a `List` is
/// opened. Unreadable files and YAML errors are returned apart, one line each.
pub fn load(paths: &[PathBuf]) -> (Vec<Document>, Vec<ReadError>) {
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    for path in paths {
        for file in files(path, &mut errors) {
            let name = file.display().to_string();
            match read(&file) {
                Ok(text) => parse(&name, &text, &mut docs, &mut errors),
                Err(e) => errors.push(ReadError(format!("{name}: {e}"))),
            }
        }
    }
    (docs, errors)
}

fn files(path: &Path, errors: &mut Vec<ReadError>) -> Vec<PathBuf> {
    if path.as_os_str() == "-" || !path.is_dir() {
        return vec![path.to_path_buf()];
    }
    let mut out = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) => {
                errors.push(ReadError(format!("{}: {e}", dir.display())));
                continue;
            }
        };
        for entry in entries.flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if p
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
            {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn read(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let mut text = String::new();
    let limit = MAX_FILE_BYTES + 1;
    let n = if path.as_os_str() == "-" {
        std::io::stdin().take(limit).read_to_string(&mut text)
    } else {
        std::fs::File::open(path).and_then(|f| f.take(limit).read_to_string(&mut text))
    }
    .map_err(|e| e.to_string())?;
    if n as u64 > MAX_FILE_BYTES {
        return Err(format!("larger than {} MiB", MAX_FILE_BYTES >> 20));
    }
    Ok(text)
}

fn parse(file: &str, text: &str, docs: &mut Vec<Document>, errors: &mut Vec<ReadError>) {
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let place = format!("document {}", i + 1);
        let value: Value = match serde::Deserialize::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                errors.push(ReadError(format!("{file}: {place}: not valid YAML: {e}")));
                // The parser cannot resynchronise after an error.
                break;
            }
        };
        if value.is_null() {
            continue;
        }
        let kind = value["kind"].as_str().unwrap_or_default();
        if kind.ends_with("List") {
            for (j, item) in value["items"].as_array().into_iter().flatten().enumerate() {
                if is_prefect_deployment(item) {
                    docs.push(Document {
                        file: file.into(),
                        place: format!("{place}, items[{j}]"),
                        value: item.clone(),
                    });
                }
            }
        } else if is_prefect_deployment(&value) {
            docs.push(Document {
                file: file.into(),
                place,
                value,
            });
        }
    }
}

fn is_prefect_deployment(v: &Value) -> bool {
    v["kind"] == "PrefectDeployment"
        && v["apiVersion"]
            .as_str()
            .is_some_and(|a| a.starts_with("prefect.io/"))
}

/// A manifest that passed every check, decoded.
pub struct Checked {
    pub resource: PrefectDeployment,
}

impl Checked {
    /// The validated spec (cannot fail: `check` ran the same validation).
    pub fn valid(&self) -> Result<ValidSpec<'_>, Problem> {
        validate(&self.resource.spec, &self.name())
    }

    pub fn name(&self) -> String {
        self.resource.metadata.name.clone().unwrap_or_default()
    }
}

/// Checks a manifest as the apiserver (schema) and the controller (`validate()`) would.
/// The error is `field: message`.
pub fn check(manifest: &Value) -> Result<Checked, String> {
    let mut value = manifest.clone();
    // The apiserver drops nulls of non-nullable fields before validating.
    drop_nulls(&mut value);
    if let Some(e) = schema().iter_errors(&value).next() {
        let field = path_of(e.instance_path().as_str());
        let text = crate::prefect::truncate(&e.to_string(), 200);
        return Err(format!("{field}: {text}"));
    }
    if value["metadata"]["name"].as_str().is_none_or(str::is_empty) {
        return Err("metadata.name: required".into());
    }
    let resource: PrefectDeployment =
        serde_json::from_value(value).map_err(|e| format!("spec: {e}"))?;
    let name = resource.metadata.name.clone().unwrap_or_default();
    validate(&resource.spec, &name).map_err(|p| p.to_string())?;
    Ok(Checked { resource })
}

/// The CRD's OpenAPI schema as a JSON Schema validator (its `x-kubernetes-*` keywords
/// are ignored; what they check, `validate()` checks).
fn schema() -> &'static jsonschema::Validator {
    static SCHEMA: OnceLock<jsonschema::Validator> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        use kube::CustomResourceExt;
        let crd = serde_json::to_value(PrefectDeployment::crd()).expect("CRD serializes");
        let mut schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone();
        // The apiserver fills these in; a manifest does not have to.
        if let Some(req) = schema.get_mut("required").and_then(Value::as_array_mut) {
            req.retain(|r| r != "apiVersion" && r != "kind");
        }
        jsonschema::validator_for(&schema).expect("the CRD schema compiles")
    })
}

fn drop_nulls(v: &mut Value) {
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(m) => {
                m.retain(|_, x| !x.is_null());
                stack.extend(m.values_mut());
            }
            Value::Array(a) => stack.extend(a.iter_mut()),
            _ => {}
        }
    }
}

/// `/spec/deployment/schedules/0/cron` -> `spec.deployment.schedules[0].cron`.
fn path_of(pointer: &str) -> String {
    let mut out = String::new();
    for part in pointer.split('/').skip(1) {
        let part = part.replace("~1", "/").replace("~0", "~");
        if part.parse::<usize>().is_ok() {
            out.push_str(&format!("[{part}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&part);
        }
    }
    if out.is_empty() {
        "(document)".into()
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "apiVersion": "prefect.io/v1", "kind": "PrefectDeployment",
            "metadata": {"name": "a", "namespace": "ns"},
            "spec": {"server": {"remoteApiUrl": "http://p/api"}, "workPool": {"name": "w"},
                     "deployment": {"entrypoint": "f.py:main"}}
        })
    }

    #[test]
    fn checks_schema_then_validate() {
        assert!(check(&base()).is_ok());
        let mut v = base();
        v["spec"]["deployment"]["schedules"] =
            json!([{"slug": "a", "interval": 60, "max_scheduled_runs": 51}]);
        let e = check(&v).err().unwrap();
        assert!(
            e.starts_with("spec.deployment.schedules[0].max_scheduled_runs: "),
            "{e}"
        );
        let mut v = base();
        v["spec"]["deployment"]["schedules"] = json!([{"slug": "a", "cron": "61 * * * *"}]);
        let e = check(&v).err().unwrap();
        assert!(e.starts_with("spec.deployment.schedules[0].cron: "), "{e}");
        let mut v = base();
        v["spec"]["workPool"] = Value::Null;
        let e = check(&v).err().unwrap();
        assert!(e.starts_with("spec: "), "{e}");
    }

    #[test]
    fn parses_documents_and_lists() {
        let text = "kind: ConfigMap\napiVersion: v1\n---\n# empty\n---\n".to_string()
            + &serde_yaml::to_string(&base()).unwrap()
            + "---\n"
            + &serde_yaml::to_string(
                &json!({"apiVersion": "v1", "kind": "List", "items": [base(), {"kind": "Secret"}]}),
            )
            .unwrap();
        let (mut docs, mut errors) = (Vec::new(), Vec::new());
        parse("f.yaml", &text, &mut docs, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        let places: Vec<&str> = docs.iter().map(|d| d.place.as_str()).collect();
        assert_eq!(places, ["document 3", "document 4, items[0]"]);
        assert_eq!(docs[0].label(), "f.yaml: document 3 (ns/a)");
        parse("g.yaml", "a: [", &mut docs, &mut errors);
        assert!(
            errors[0]
                .0
                .starts_with("g.yaml: document 1: not valid YAML"),
            "{errors:?}"
        );
    }
}
