//! Loading: `config.yaml` + `models.yaml` → the validated `Config`, the plugin configuration handed
//! to the filter (secrets replaced by `os.environ/NAME` references) and the environment Envoy needs.

use filter::config::{self, Config, ConfigError, RawConfig, ENV_PREFIX};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Envoy cluster name reserved for the admin interface (`/metrics`).
pub const ADMIN_CLUSTER: &str = "auto_ai_router_admin";
/// Envoy cluster name reserved for "no credential left" (an endpoint-less cluster: Envoy answers
/// 503 at once instead of retrying on the previous attempt's cluster; see render).
pub const NO_CREDENTIAL_CLUSTER: &str = "auto_ai_router_no_credential";

/// An environment variable Envoy must be started with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvVar {
    pub name: String,
    /// Where in the config it is used, e.g. `credentials[0] (openai_main): api_key`.
    pub used_by: String,
    /// The secret, when config.yaml had it literally and the CLI moved it to this variable.
    pub literal: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Prepared {
    /// The compiled configuration (secrets from the environment are placeholders when unset).
    pub config: Config,
    /// The document handed to the filter: no secret values, only `os.environ/NAME` references.
    pub plugin: RawConfig,
    /// Every variable the filter reads, sorted by name.
    pub env: Vec<EnvVar>,
    /// `os.environ/` variables that are not set in this process's environment.
    pub unset_env: Vec<String>,
    pub config_path: Option<PathBuf>,
    pub models_path: Option<PathBuf>,
}

#[derive(Debug)]
pub enum LoadError {
    Io { path: PathBuf, error: std::io::Error },
    Config { file: String, error: ConfigError },
    Other(String),
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::Io { path, error } => write!(f, "{}: {error}", path.display()),
            LoadError::Config { file, error } => write!(f, "{file}: {error}"),
            LoadError::Other(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for LoadError {}

/// `AUTO_AI_ROUTER_<NAME>_API_KEY` for a credential name (upper case, other characters → `_`).
pub fn literal_key_var(credential: &str) -> String {
    let up: String = credential.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
    format!("AUTO_AI_ROUTER_{up}_API_KEY")
}

pub const MASTER_KEY_VAR: &str = "AUTO_AI_ROUTER_MASTER_KEY";

/// `models.yaml` beside `config.yaml`, if it exists.
pub fn default_models_path(config_path: &Path) -> Option<PathBuf> {
    let p = config_path.parent().unwrap_or(Path::new(".")).join("models.yaml");
    p.is_file().then_some(p)
}

/// Reads and prepares `config_path` (and `models_path`, else `models.yaml` beside it).
pub fn load_files(config_path: &Path, models_path: Option<&Path>) -> Result<Prepared, LoadError> {
    let text = std::fs::read_to_string(config_path).map_err(|error| LoadError::Io { path: config_path.to_path_buf(), error })?;
    let models_path = match models_path {
        Some(p) => Some(p.to_path_buf()),
        None => default_models_path(config_path),
    };
    let models_text = match &models_path {
        Some(p) => Some(std::fs::read_to_string(p).map_err(|error| LoadError::Io { path: p.clone(), error })?),
        None => None,
    };
    let config_name = config_path.display().to_string();
    let models_name = models_path.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
    let mut p = prepare(&text, models_text.as_deref(), &|n| std::env::var(n).ok(), &config_name, &models_name)?;
    p.config_path = Some(config_path.to_path_buf());
    p.models_path = models_path;
    Ok(p)
}

/// Parses, validates (as the filter does) and moves literal secrets out of the plugin document.
/// `env` is this process's environment; unset `os.environ/` variables are listed in `unset_env`
/// rather than failing, since Envoy may run elsewhere (`run` requires them).
pub fn prepare(
    config_text: &str,
    models_text: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
    config_name: &str,
    models_name: &str,
) -> Result<Prepared, LoadError> {
    let cfg_err = |error| LoadError::Config { file: config_name.to_string(), error };
    let mut raw = config::parse_raw(config_text).map_err(cfg_err)?;
    if let Some(m) = models_text {
        let models = config::parse_models_yaml(m).map_err(|error| LoadError::Config { file: models_name.to_string(), error })?;
        raw.models.extend(models);
    }

    let unset = RefCell::new(Vec::<String>::new());
    let lenient = |name: &str| -> Option<String> {
        match env(name) {
            Some(v) if !v.is_empty() => Some(v),
            _ => {
                unset.borrow_mut().push(name.to_string());
                Some(format!("unset-{name}"))
            }
        }
    };
    let config = config::validate(&raw, &lenient).map_err(cfg_err)?;
    let mut unset_env = unset.into_inner();
    unset_env.sort();
    unset_env.dedup();

    for c in &config.credentials {
        let reserved = match c.name.as_str() {
            ADMIN_CLUSTER => Some("the admin cluster"),
            NO_CREDENTIAL_CLUSTER => Some("the cluster that answers when no credential is left"),
            filter::retry_contract::NO_CREDENTIAL => Some("\"no credential left\" in the retry routing"),
            _ => None,
        };
        if let Some(what) = reserved {
            return Err(LoadError::Other(format!(
                "{config_name}: credentials: name \"{}\" is reserved for {what} (use another name)",
                c.name
            )));
        }
    }

    // Move literal secrets into environment variables; keep os.environ/ references as they are.
    let mut plugin = raw.clone();
    let mut env_vars: BTreeMap<String, EnvVar> = BTreeMap::new();
    let mut add = |name: String, used_by: String, literal: Option<String>| -> Result<(), LoadError> {
        if let Some(prev) = env_vars.get(&name) {
            if prev.literal != literal || literal.is_some() {
                return Err(LoadError::Other(format!(
                    "{config_name}: {used_by} and {} both need environment variable {name}; rename a credential",
                    prev.used_by
                )));
            }
            return Ok(());
        }
        env_vars.insert(name.clone(), EnvVar { name, used_by, literal });
        Ok(())
    };
    if let Some(k) = plugin.server.master_key.clone() {
        match k.strip_prefix(ENV_PREFIX) {
            Some(var) => add(var.trim().to_string(), "server.master_key".into(), None)?,
            None => {
                add(MASTER_KEY_VAR.into(), "server.master_key".into(), Some(k))?;
                plugin.server.master_key = Some(format!("{ENV_PREFIX}{MASTER_KEY_VAR}"));
            }
        }
    }
    for (i, cred) in plugin.credentials.iter_mut().enumerate() {
        let name = config.credentials[i].name.clone();
        let used_by = format!("credentials[{i}] ({name}): api_key");
        let Some(map) = cred.as_mapping_mut() else { continue };
        let key = serde_yaml::Value::String("api_key".into());
        let Some(k) = map.get(&key).and_then(|v| v.as_str()).map(str::to_string) else { continue };
        match k.strip_prefix(ENV_PREFIX) {
            Some(var) => add(var.trim().to_string(), used_by, None)?,
            None => {
                let var = literal_key_var(&name);
                add(var.clone(), used_by, Some(k))?;
                map.insert(key, serde_yaml::Value::String(format!("{ENV_PREFIX}{var}")));
            }
        }
    }

    // The plugin document must compile to the same configuration once the variables are set.
    let lookup: BTreeMap<String, String> = env_vars
        .values()
        .map(|v| (v.name.clone(), v.literal.clone().or_else(|| lenient_value(env, &v.name)).unwrap_or_default()))
        .collect();
    let recompiled = config::validate(&plugin, &|n| lookup.get(n).cloned())
        .map_err(|e| LoadError::Other(format!("internal: the rendered plugin configuration does not validate: {e}")))?;
    debug_assert_eq!(recompiled.credentials.len(), config.credentials.len());

    Ok(Prepared { config, plugin, env: env_vars.into_values().collect(), unset_env, config_path: None, models_path: None })
}

fn lenient_value(env: &dyn Fn(&str) -> Option<String>, name: &str) -> Option<String> {
    env(name).filter(|v| !v.is_empty()).or_else(|| Some(format!("unset-{name}")))
}

impl Prepared {
    /// The plugin configuration string (compact JSON) handed to the filter.
    pub fn plugin_json(&self) -> String {
        serde_json::to_string(&self.plugin).expect("the plugin document serialises")
    }

    /// Names of the variables Envoy must have (for `host_env_keys`).
    pub fn env_names(&self) -> Vec<String> {
        self.env.iter().map(|v| v.name.clone()).collect()
    }

    /// Variables (name, value) the CLI must give Envoy because config.yaml had the secret literally.
    pub fn literal_env(&self) -> Vec<(String, String)> {
        self.env.iter().filter_map(|v| v.literal.clone().map(|l| (v.name.clone(), l))).collect()
    }

    /// Fails when an `os.environ/` variable is unset, with the filter's own message.
    pub fn require_env(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let literal: BTreeMap<String, String> = self.literal_env().into_iter().collect();
        config::validate(&self.plugin, &|n| literal.get(n).cloned().or_else(|| env(n)))
    }
}
