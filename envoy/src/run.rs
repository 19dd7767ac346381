//! Running Envoy in the foreground with signals forwarded.

use std::path::Path;
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicI32, Ordering};

static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // kill(2) is async-signal-safe.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// Runs `envoy` with `args` and extra environment `env`, forwarding SIGINT, SIGTERM and SIGHUP to
/// it, and returns its exit status.
pub fn run_foreground(envoy: &Path, args: &[String], env: &[(String, String)]) -> std::io::Result<ExitStatus> {
    let mut cmd = Command::new(envoy);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn()?;
    CHILD.store(child.id() as i32, Ordering::SeqCst);
    unsafe {
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::signal(sig, forward as *const () as libc::sighandler_t);
        }
    }
    let status = child.wait();
    CHILD.store(0, Ordering::SeqCst);
    status
}
