//! YAML helpers shared by the deployment-file tests (deploy.rs, istio_oci.rs).
#![allow(dead_code)]

use serde_yaml::Value;
use std::path::{Path, PathBuf};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Every YAML document of `path` (relative paths are from the repository root).
pub fn docs(path: impl AsRef<Path>) -> Vec<Value> {
    let path = repo().join(path);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::with::singleton_map_recursive::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .collect()
}

/// The value at a dotted path (`spec.servers.0.hosts`); panics naming the missing step.
pub fn get<'a>(v: &'a Value, path: &str) -> &'a Value {
    let mut cur = v;
    for key in path.split('.') {
        cur = match key.parse::<usize>() {
            Ok(i) => cur.get(i),
            Err(_) => cur.get(key),
        }
        .unwrap_or_else(|| panic!("missing {path} (at {key}) in {v:?}"));
    }
    cur
}

pub fn str_of<'a>(v: &'a Value, path: &str) -> &'a str {
    get(v, path).as_str().unwrap_or_else(|| panic!("{path} is not a string"))
}
