//! Module loading: compile once per process (per path and fuel setting), instantiate many. The
//! compiled code is also kept on disk (`<target>/host-sim-cache/`, keyed by the module's SHA-256
//! and the fuel setting), so the suite's test binaries compile a given filter.wasm once between
//! them.

use crate::abi::{self, ENV_IMPORTS, WASI_IMPORTS};
use crate::vm::VmState;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use wasmtime::{Config, Engine, InstancePre, Linker, Module};

pub(crate) struct Loaded {
    pub engine: Engine,
    pub pre: InstancePre<VmState>,
    pub fuel: bool,
}

type Cache = Mutex<HashMap<(PathBuf, bool), Arc<Loaded>>>;
static CACHE: OnceLock<Cache> = OnceLock::new();

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// Where the filter is built: `$HOSTSIM_WASM`, else `<target>/wasm32-wasip1/release/filter.wasm`.
pub fn default_wasm_path() -> PathBuf {
    if let Some(p) = std::env::var_os("HOSTSIM_WASM") {
        return PathBuf::from(p);
    }
    target_dir().join("wasm32-wasip1/release/filter.wasm")
}

pub(crate) fn load(path: &Path, fuel: bool) -> Result<Arc<Loaded>, String> {
    let cache = CACHE.get_or_init(Default::default);
    let key = (path.to_path_buf(), fuel);
    // Held across the compile so parallel tests compile the module once, not once each.
    let mut map = cache.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(l) = map.get(&key) {
        return Ok(l.clone());
    }
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}\nbuild the filter first with `make wasm`", path.display()))?;
    let loaded = Arc::new(compile(&bytes, fuel)?);
    map.insert(key, loaded.clone());
    Ok(loaded)
}

pub(crate) fn compile(bytes: &[u8], fuel: bool) -> Result<Loaded, String> {
    let mut config = Config::new();
    config.consume_fuel(fuel);
    let engine = Engine::new(&config).map_err(|e| format!("wasmtime engine: {e:?}"))?;
    let module = cached_module(&engine, bytes, fuel)?;
    let mut unknown = Vec::new();
    for imp in module.imports() {
        let known = match imp.module() {
            "env" => ENV_IMPORTS.contains(&imp.name()),
            "wasi_snapshot_preview1" => WASI_IMPORTS.contains(&imp.name()),
            _ => false,
        };
        if !known {
            unknown.push(format!("{}.{}", imp.module(), imp.name()));
        }
    }
    if !unknown.is_empty() {
        return Err(format!("the module imports functions host-sim does not provide: {}", unknown.join(", ")));
    }
    let mut linker = Linker::new(&engine);
    abi::link(&mut linker).map_err(|e| format!("linking host functions: {e:?}"))?;
    let pre = linker.instantiate_pre(&module).map_err(|e| format!("linking the module: {e:?}"))?;
    Ok(Loaded { engine, pre, fuel })
}

/// The module from the disk cache, else compiled (and cached). A cached file that this wasmtime
/// or engine configuration can't use is compiled anew and replaced.
fn cached_module(engine: &Engine, bytes: &[u8], fuel: bool) -> Result<Module, String> {
    let digest: String = Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect();
    let dir = target_dir().join("host-sim-cache");
    let file = dir.join(format!("{digest}-fuel{}.cwasm", u8::from(fuel)));
    // SAFETY: the file is one this code wrote with Module::serialize into the build's own target
    // directory; wasmtime checks its version and engine settings before using it.
    if let Ok(m) = unsafe { Module::deserialize_file(engine, &file) } {
        return Ok(m);
    }
    let module = Module::new(engine, bytes).map_err(|e| format!("compiling the module: {e:?}"))?;
    // Best effort: without the cache the next process compiles again. Written aside and renamed,
    // so a concurrent test binary never reads half a file.
    if let Ok(data) = module.serialize() {
        let tmp = dir.join(format!("{digest}.{}.tmp", std::process::id()));
        if std::fs::create_dir_all(&dir).is_ok() && std::fs::write(&tmp, data).is_ok() && std::fs::rename(&tmp, &file).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok(module)
}
