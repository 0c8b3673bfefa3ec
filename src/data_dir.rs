//! The server's data dir as its identity. A server locks its data dir for as
//! long as it runs (`flotilla.lock`, an exclusive `flock`), so two live
//! processes can never share one; and it records there the election lease it
//! holds (`election-lease`). A server started again on the same data dir is
//! the same server: the lock proves the earlier run is gone (the kernel drops
//! a dead process's lock), so it revokes that run's lease at once instead of
//! waiting up to `server.session_ttl` for it to expire.
//!
//! A frozen earlier run (stopped, not dead) still holds the lock: the new one
//! refuses to start rather than revoke a lease that may still be in use.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const LOCK_FILE: &str = "flotilla.lock";
const LEASE_FILE: &str = "election-lease";

/// Why the data dir could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open the data dir {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the data dir {path} is in use by another flotilla process{}; \
         stop it, or give this one its own server.data_dir",
        .pid.as_ref().map(|pid| format!(" (pid {pid})")).unwrap_or_default()
    )]
    Locked { path: PathBuf, pid: Option<String> },
}

/// A locked data dir; the lock lasts as long as this value.
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    /// Held open: closing it releases the lock.
    _lock: File,
    /// The lease the previous run left behind, until taken.
    previous: Mutex<Option<i64>>,
}

impl DataDir {
    /// Creates `path` if needed and locks it.
    pub fn lock(path: &Path) -> Result<Self, Error> {
        let open = |source| Error::Open {
            path: path.to_owned(),
            source,
        };
        std::fs::create_dir_all(path).map_err(open)?;
        let lock_path = path.join(LOCK_FILE);
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(open)?;
        // SAFETY: flock(2) on a descriptor this function owns.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let pid = std::fs::read_to_string(&lock_path)
                    .ok()
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty());
                return Err(Error::Locked {
                    path: path.to_owned(),
                    pid,
                });
            }
            return Err(open(error));
        }
        lock.set_len(0).map_err(open)?;
        writeln!(lock, "{}", std::process::id()).map_err(open)?;
        let previous = std::fs::read_to_string(path.join(LEASE_FILE))
            .ok()
            .and_then(|s| i64::from_str_radix(s.trim(), 16).ok());
        Ok(Self {
            path: path.to_owned(),
            _lock: lock,
            previous: Mutex::new(previous),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The election lease of the previous run on this data dir, once.
    pub fn take_previous_lease(&self) -> Option<i64> {
        self.previous
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// Records the lease this run holds (written to a temporary file and
    /// renamed: a crash leaves the old or the new id, never half of one).
    pub fn record_lease(&self, lease: i64) -> std::io::Result<()> {
        let tmp = self.path.join(format!("{LEASE_FILE}.tmp"));
        std::fs::write(&tmp, format!("{lease:x}\n"))?;
        std::fs::rename(&tmp, self.path.join(LEASE_FILE))
    }

    /// This run no longer holds a lease (it resigned).
    pub fn clear_lease(&self) -> std::io::Result<()> {
        match std::fs::remove_file(self.path.join(LEASE_FILE)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_one_data_dir_is_refused_naming_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDir::lock(dir.path()).unwrap();
        let error = DataDir::lock(dir.path()).unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, Error::Locked { .. }), "{message}");
        assert!(
            message.contains(&format!("pid {}", std::process::id())),
            "{message}"
        );
        drop(first);
        DataDir::lock(dir.path()).expect("free again once the holder is gone");
    }

    #[test]
    fn the_lease_of_the_previous_run_is_handed_over_once() {
        let dir = tempfile::tempdir().unwrap();
        let run = DataDir::lock(&dir.path().join("new")).unwrap();
        assert_eq!(run.take_previous_lease(), None);
        run.record_lease(0x1234_abcd).unwrap();
        drop(run);
        let next = DataDir::lock(&dir.path().join("new")).unwrap();
        assert_eq!(next.take_previous_lease(), Some(0x1234_abcd));
        assert_eq!(next.take_previous_lease(), None, "once");
        next.clear_lease().unwrap();
        next.clear_lease().unwrap();
        drop(next);
        let after_resign = DataDir::lock(&dir.path().join("new")).unwrap();
        assert_eq!(after_resign.take_previous_lease(), None);
    }

    #[test]
    fn a_data_dir_below_a_file_is_an_open_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let error = DataDir::lock(&file.join("sub")).unwrap_err();
        assert!(matches!(error, Error::Open { .. }), "{error}");
    }
}
