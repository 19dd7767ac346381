//! Files and directories only the current user can read: the `run` directory (its bootstrap names
//! every secret variable) and `render --env-file`'s secrets.

use std::ffi::{CString, OsString};
use std::io::Write;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A new directory `<parent>/<prefix>XXXXXX` with a random suffix, mode 0700, created by
/// mkdtemp(3): never an existing directory or symlink someone else planted at a guessable name.
pub fn temp_dir(parent: &Path, prefix: &str) -> std::io::Result<PathBuf> {
    let mut template = parent.join(format!("{prefix}XXXXXX")).into_os_string().into_vec();
    template.push(0);
    let template = CString::from_vec_with_nul(template).map_err(std::io::Error::other)?;
    let raw = template.into_raw();
    // SAFETY: `raw` is a NUL-terminated buffer we own; mkdtemp rewrites the Xs in place.
    let made = unsafe { libc::mkdtemp(raw) };
    let template = unsafe { CString::from_raw(raw) };
    if made.is_null() {
        return Err(std::io::Error::last_os_error());
    }
    Ok(PathBuf::from(OsString::from_vec(template.into_bytes())))
}

/// Writes `body` to `path` with mode 0600, also when the file already existed with another mode
/// (open's mode applies only to files it creates).
pub fn write(path: &Path, body: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    // Before the secrets go in: an old 0644 file must not be readable with them.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(body.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn temp_dirs_are_private_and_unpredictable() {
        let parent = std::env::temp_dir();
        let a = temp_dir(&parent, "aar-private-test-").unwrap();
        let b = temp_dir(&parent, "aar-private-test-").unwrap();
        assert_ne!(a, b);
        for d in [&a, &b] {
            assert!(d.is_dir() && d.starts_with(&parent), "{}", d.display());
            assert_eq!(mode(d), 0o700, "{}", d.display());
            let name = d.file_name().unwrap().as_bytes();
            assert_eq!(name.len(), "aar-private-test-".len() + 6);
            assert!(!name.ends_with(b"XXXXXX"));
        }
        for d in [a, b] {
            std::fs::remove_dir(d).unwrap();
        }
        assert!(temp_dir(Path::new("/nonexistent-aar-dir"), "x-").is_err());
    }

    #[test]
    fn write_forces_0600_on_new_and_existing_files() {
        let dir = temp_dir(&std::env::temp_dir(), "aar-private-test-").unwrap();
        let new = dir.join("new.env");
        write(&new, "A=1\n").unwrap();
        assert_eq!(mode(&new), 0o600);
        let old = dir.join("old.env");
        std::fs::write(&old, "stale, longer than the new content\n").unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
        write(&old, "B=2\n").unwrap();
        assert_eq!(mode(&old), 0o600);
        assert_eq!(std::fs::read_to_string(&old).unwrap(), "B=2\n");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
