//! `auto-ai-router`: validate a seed-format config.yaml, render an Envoy bootstrap, run Envoy,
//! sync models.yaml with the providers' model lists.

use auto_ai_router::prepare::{load_files, Prepared};
use auto_ai_router::render::{self, RenderOptions};
use auto_ai_router::sync::{self, SyncOptions};
use auto_ai_router::{locate, private, run};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "auto-ai-router", version, about = "OpenAI-compatible AI router on Envoy: validate, render, run, models sync")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct Source {
    /// The router's config.yaml (the Go router's format).
    #[arg(long, short = 'c')]
    config: PathBuf,
    /// models.yaml (default: models.yaml beside config.yaml, if present).
    #[arg(long, short = 'm')]
    models: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct Layout {
    /// filter.wasm as Envoy will see it (default: the project's release build).
    #[arg(long)]
    wasm: Option<PathBuf>,
    /// Listener address, `ADDR`, `ADDR:PORT` or `:PORT` (default 0.0.0.0 and server.port).
    #[arg(long)]
    listen: Option<String>,
    /// Admin interface port (always bound to 127.0.0.1 unless --admin-address).
    #[arg(long, default_value_t = 9901)]
    admin_port: u16,
    #[arg(long, default_value = "127.0.0.1")]
    admin_address: String,
    /// CA bundle for https providers (default: the system bundle).
    #[arg(long)]
    ca_bundle: Option<String>,
    /// Upstream connect timeout in seconds.
    #[arg(long, default_value_t = 10)]
    connect_timeout: u64,
    /// Access log on stdout: on or off (default: on for logging_level info/debug).
    #[arg(long, value_parser = ["on", "off"])]
    access_log: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check config.yaml (and models.yaml) exactly as the filter will; exit 0 or print the error.
    Validate {
        #[command(flatten)]
        source: Source,
        /// Also require every os.environ/ variable to be set here.
        #[arg(long)]
        strict_env: bool,
    },
    /// Render a complete Envoy v3 bootstrap (no secret values in it).
    Render {
        #[command(flatten)]
        source: Source,
        #[command(flatten)]
        layout: Layout,
        /// Output file (default: stdout).
        #[arg(long, short = 'o')]
        out: Option<PathBuf>,
        /// Also write NAME=value lines for secrets that config.yaml has literally (mode 0600),
        /// e.g. for docker-compose's env_file.
        #[arg(long)]
        env_file: Option<PathBuf>,
    },
    /// Render into a temporary directory and run Envoy in the foreground.
    Run {
        #[command(flatten)]
        source: Source,
        #[command(flatten)]
        layout: Layout,
        /// Envoy's log level for everything but the filter (the filter follows logging_level).
        #[arg(long, default_value = "warning")]
        envoy_log_level: String,
        /// Extra arguments for Envoy (after --).
        #[arg(last = true)]
        envoy_args: Vec<String>,
    },
    /// models.yaml maintenance.
    Models {
        #[command(subcommand)]
        cmd: ModelsCmd,
    },
}

#[derive(Subcommand)]
enum ModelsCmd {
    /// Fetch every credential's GET /v1/models and append the models models.yaml does not list yet
    /// (rpm = server.default_models_rpm), keeping existing entries and comments; models.yaml beside
    /// config.yaml is created when missing. Exit 0; 1 on a config or file error; 2 when no
    /// credential answered.
    Sync {
        #[command(flatten)]
        source: Source,
        /// Print what would be added; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Per-request timeout in seconds.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
        /// PEM file of CA certificates for https providers (default: the Mozilla roots built in).
        #[arg(long)]
        ca_bundle: Option<PathBuf>,
    },
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::from(1)
}

fn parse_listen(s: &str) -> Result<(Option<String>, Option<u16>), String> {
    let bad = || format!("--listen {s:?}: use ADDR, ADDR:PORT or :PORT");
    if let Some(rest) = s.strip_prefix('[') {
        let (addr, after) = rest.split_once(']').ok_or_else(bad)?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse().map_err(|_| bad())?),
            None if after.is_empty() => None,
            None => return Err(bad()),
        };
        return Ok((Some(addr.to_string()), port));
    }
    match s.matches(':').count() {
        0 => Ok((Some(s.to_string()), None)),
        1 => {
            let (a, p) = s.split_once(':').unwrap();
            let port = p.parse().map_err(|_| bad())?;
            Ok(((!a.is_empty()).then(|| a.to_string()), Some(port)))
        }
        _ => Ok((Some(s.to_string()), None)), // a bare IPv6 address
    }
}

fn options(layout: &Layout, wasm: PathBuf) -> Result<RenderOptions, String> {
    let mut o = RenderOptions {
        wasm_path: wasm.display().to_string(),
        admin_port: layout.admin_port,
        admin_address: layout.admin_address.clone(),
        connect_timeout_secs: layout.connect_timeout,
        access_log: layout.access_log.as_deref().map(|v| v == "on"),
        ..RenderOptions::default()
    };
    if let Some(ca) = &layout.ca_bundle {
        o.ca_bundle = ca.clone();
    }
    if let Some(l) = &layout.listen {
        let (addr, port) = parse_listen(l)?;
        if let Some(a) = addr {
            o.listen_address = a;
        }
        o.listen_port = port;
    }
    Ok(o)
}

fn describe(p: &Prepared) -> String {
    let c = &p.config;
    let creds: Vec<String> = c.credentials.iter().map(|c| format!("{} ({})", c.name, c.base_url)).collect();
    format!("{} credential(s): {}; {} model limit(s); port {}", c.credentials.len(), creds.join(", "), c.models.len(), c.server.port)
}

/// `s` as one word for a POSIX shell (and for docker-compose's env_file, which strips the quotes).
fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-./:@%+=,".contains(&b)) {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// `path` from `/`, so the printed command works from any directory.
fn absolute(path: &std::path::Path) -> String {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()).display().to_string()
}

fn print_env_help(p: &Prepared) {
    if p.env.is_empty() {
        return;
    }
    eprintln!("Envoy's environment must have (values are not in the bootstrap):");
    for v in &p.env {
        let origin = if v.literal.is_some() { "literal in config.yaml, moved here" } else { "os.environ/ reference" };
        eprintln!("  {:<40} {} ({origin})", v.name, v.used_by);
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Validate { source, strict_env } => {
            let p = match load_files(&source.config, source.models.as_deref()) {
                Ok(p) => p,
                Err(e) => return fail(e),
            };
            if strict_env {
                if let Err(e) = p.require_env(&|n| std::env::var(n).ok()) {
                    return fail(format!("{}: {e}", source.config.display()));
                }
            } else {
                for v in &p.unset_env {
                    eprintln!("warning: environment variable {v} is not set here; Envoy's environment needs it");
                }
            }
            println!("{}: OK ({})", source.config.display(), describe(&p));
            ExitCode::SUCCESS
        }
        Cmd::Render { source, layout, out, env_file } => {
            let p = match load_files(&source.config, source.models.as_deref()) {
                Ok(p) => p,
                Err(e) => return fail(e),
            };
            let wasm = match locate::find_wasm(layout.wasm.as_deref()) {
                Ok(w) => w,
                Err(e) => return fail(e),
            };
            let o = match options(&layout, wasm) {
                Ok(o) => o,
                Err(e) => return fail(e),
            };
            let text = render::to_yaml(&p, &render::render(&p, &o));
            match &out {
                Some(path) => {
                    if let Err(e) = std::fs::write(path, &text) {
                        return fail(format!("{}: {e}", path.display()));
                    }
                    eprintln!("wrote {}", path.display());
                }
                None => print!("{text}"),
            }
            if let Some(path) = &env_file {
                let mut body = String::new();
                for (k, v) in p.literal_env() {
                    body.push_str(&format!("{k}={}\n", shell_quote(&v)));
                }
                if let Err(e) = private::write(path, &body) {
                    return fail(format!("{}: {e}", path.display()));
                }
                eprintln!("wrote {} (secrets, mode 0600)", path.display());
            }
            print_env_help(&p);
            let bootstrap = out.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "BOOTSTRAP.yaml".into());
            let envoy = format!("envoy -c {} {}", shell_quote(&bootstrap), render::envoy_args(&p).join(" "));
            match (&env_file, p.literal_env().is_empty()) {
                // The env file holds the literal keys: a POSIX shell exports it, then starts Envoy.
                (Some(f), _) => eprintln!("Start: set -a; . {}; set +a; {envoy}", shell_quote(&absolute(f))),
                (None, true) => eprintln!("Start: {envoy}"),
                (None, false) => {
                    eprintln!(
                        "Start (after exporting the variables above; `render --env-file FILE` writes the literal ones to FILE): {envoy}"
                    )
                }
            }
            ExitCode::SUCCESS
        }
        Cmd::Run { source, layout, envoy_log_level, envoy_args } => {
            let p = match load_files(&source.config, source.models.as_deref()) {
                Ok(p) => p,
                Err(e) => return fail(e),
            };
            if let Err(e) = p.require_env(&|n| std::env::var(n).ok()) {
                return fail(format!("{}: {e}", source.config.display()));
            }
            let wasm = match locate::find_wasm(layout.wasm.as_deref()) {
                Ok(w) if w.is_file() => w.canonicalize().unwrap_or(w),
                Ok(w) => return fail(format!("{} does not exist: build it with `make wasm`", w.display())),
                Err(e) => return fail(e),
            };
            let envoy = match locate::find_envoy() {
                Ok(e) => e,
                Err(e) => return fail(e),
            };
            let o = match options(&layout, wasm) {
                Ok(o) => o,
                Err(e) => return fail(e),
            };
            // A fresh 0700 directory with a random name: a guessable one could be planted (a
            // symlink, or a directory someone else can read) before we write into it.
            let tmp = std::env::temp_dir();
            let dir = match private::temp_dir(&tmp, "auto-ai-router-") {
                Ok(d) => d,
                Err(e) => return fail(format!("a private directory in {}: {e}", tmp.display())),
            };
            let bootstrap = dir.join("envoy.yaml");
            if let Err(e) = std::fs::write(&bootstrap, render::to_yaml(&p, &render::render(&p, &o))) {
                return fail(format!("{}: {e}", bootstrap.display()));
            }
            let mut args = vec![
                "-c".to_string(),
                bootstrap.display().to_string(),
                "--disable-hot-restart".into(),
                "--log-level".into(),
                envoy_log_level,
            ];
            args.extend(render::envoy_args(&p));
            args.extend(envoy_args);
            let port = o.listen_port.unwrap_or(p.config.server.port);
            eprintln!(
                "auto-ai-router: Envoy {} listening on {}:{port} (admin {}:{}), bootstrap {}",
                envoy.display(),
                o.listen_address,
                o.admin_address,
                o.admin_port,
                bootstrap.display()
            );
            let status = run::run_foreground(&envoy, &args, &p.literal_env());
            let _ = std::fs::remove_dir_all(&dir);
            match status {
                Ok(s) => match s.code() {
                    Some(c) => ExitCode::from(c.clamp(0, 255) as u8),
                    None => ExitCode::SUCCESS, // ended by a signal we forwarded
                },
                Err(e) => fail(format!("{}: {e}", envoy.display())),
            }
        }
        Cmd::Models { cmd: ModelsCmd::Sync { source, dry_run, timeout, ca_bundle } } => {
            let opts = SyncOptions {
                config: source.config,
                models: source.models,
                dry_run,
                timeout: std::time::Duration::from_secs(timeout.max(1)),
                ca_bundle,
            };
            let report = match sync::sync(&opts, &|n| std::env::var(n).ok()) {
                Ok(r) => r,
                Err(e) => return fail(e),
            };
            let _ = report.print(dry_run, &mut std::io::stdout(), &mut std::io::stderr());
            if report.all_failed() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            }
        }
    }
}
