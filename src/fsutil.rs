//! Files written so that nothing is ever half-done or damaged, and read so that nothing hangs.
//!
//! - [`Output`]: a file the user named. A regular file (or a new name) is written to a
//!   temporary file in the same folder, fsynced and renamed over the target, then the folder is
//!   fsynced: a crash leaves the old file or the new one. Anything else (`/dev/null`, a FIFO,
//!   `/dev/stdout`) is written through, never replaced; a symbolic link is followed and its
//!   target replaced. On error or drop before [`Output::commit`] the temporary file is removed.
//! - [`DirLock`]: one writer per checkpoint directory (an advisory lock that names its holder).
//! - [`read_regular`]: reads a file only if it is a regular file of bounded size (a FIFO named
//!   `model.safetensors` would otherwise block forever).
//! - [`crash_point`]: a test-only hook that kills the process at a named point.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// A file being written for the user; see the module docs for what happens to each kind of target.
pub struct Output {
    /// The name the user gave.
    path: PathBuf,
    /// The temporary file and the path it is renamed to (the symlink's target for a link), or
    /// `None` when writing through to a device or FIFO.
    replace: Option<(PathBuf, PathBuf)>,
    file: Option<File>,
}

impl Output {
    /// Opens `path` for writing.
    pub fn create(path: &Path) -> Result<Output> {
        let fail = |e: std::io::Error| Error::io(path, e);
        match std::fs::metadata(path) {
            // Follows links: what matters is the kind of file at the end of them.
            Ok(meta) if meta.is_dir() => Err(fail(std::io::Error::other("is a folder: give a file name inside it"))),
            Ok(meta) if !meta.is_file() => {
                // A device, FIFO or socket: write into it, never rename over it.
                let file = std::fs::OpenOptions::new().write(true).open(path).map_err(fail)?;
                Ok(Output { path: path.into(), replace: None, file: Some(file) })
            }
            Ok(_) => {
                // A regular file, maybe behind links: replace the final target, keep the links.
                let target = path.canonicalize().map_err(fail)?;
                Self::replacing(path, target)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if std::fs::symlink_metadata(path).is_ok() {
                    return Err(fail(std::io::Error::other(
                        "is a symbolic link to nothing: remove it or point it at a file",
                    )));
                }
                Self::replacing(path, path.to_path_buf())
            }
            Err(e) => Err(fail(e)),
        }
    }

    fn replacing(path: &Path, target: PathBuf) -> Result<Output> {
        let dir = parent_of(&target);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        remove_stale_temporaries(&dir, &name);
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(Output { path: path.into(), replace: Some((tmp, target)), file: Some(file) })
    }

    /// Whether the target is replaced by a temporary file (which can seek), rather than
    /// written through (a device or FIFO, which may not).
    pub fn is_replacing(&self) -> bool {
        self.replace.is_some()
    }

    /// The open file to write into.
    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("invariant: open until committed")
    }

    /// Makes the written content the file's: fsync and rename for a replaced file.
    pub fn commit(mut self) -> Result<()> {
        let file = self.file.take().expect("invariant: open until committed");
        let Some((tmp, target)) = self.replace.take() else {
            return Ok(()); // written through
        };
        let result = file.sync_all().and_then(|_| std::fs::rename(&tmp, &target));
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io(&self.path, e));
        }
        sync_dir(&parent_of(&target));
        Ok(())
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        // Not committed: an error happened; leave no partial file behind.
        if let Some((tmp, _)) = &self.replace {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Makes a rename in `dir` durable; not every platform can open a folder, so best effort.
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Removes `.NAME.PID.tmp` files in `dir` left by processes that no longer run (killed while
/// writing NAME).
fn remove_stale_temporaries(dir: &Path, name: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let prefix = format!(".{name}.");
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|rest| rest.strip_suffix(".tmp"))
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !process_is_alive(pid) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Whether a process with this id runs (on other platforms than Unix: assumed so).
pub fn process_is_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
        // SAFETY: signal 0 only checks that the process exists.
        let r = unsafe { libc::kill(pid, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Writes `path` as a whole; `fill` writes the content.
pub fn write_atomically(path: &Path, fill: impl FnOnce(&mut File) -> std::io::Result<()>) -> Result<()> {
    let mut out = Output::create(path)?;
    fill(out.file()).map_err(|e| Error::io(path, e))?;
    out.commit()
}

/// Writes bytes as a whole.
pub fn write_bytes_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomically(path, |f| f.write_all(bytes))
}

/// Writes an 8-bit PNG as a whole: `pixels` row-major, one byte per pixel for grey, three for RGB.
pub fn write_png(path: &Path, width: usize, height: usize, pixels: &[u8], rgb: bool) -> Result<()> {
    write_atomically(path, |file| {
        let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), width as u32, height as u32);
        encoder.set_color(if rgb { png::ColorType::Rgb } else { png::ColorType::Grayscale });
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(std::io::Error::other)?;
        writer.write_image_data(pixels).map_err(std::io::Error::other)?;
        writer.finish().map_err(std::io::Error::other)
    })
}

/// Opens `path` for reading only if it is a regular file: a FIFO, device or folder is refused
/// without blocking (the file is opened non-blocking, then checked).
pub fn open_regular(path: &Path) -> Result<(File, u64)> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return Err(Error::io(path, std::io::Error::other("is a folder, not a file")));
    }
    if !meta.is_file() {
        return Err(Error::io(path, std::io::Error::other("not a regular file (a FIFO, socket or device)")));
    }
    Ok((file, meta.len()))
}

/// Reads a regular file of at most `limit` bytes (see [`open_regular`]).
pub fn read_regular(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let (file, len) = open_regular(path)?;
    if len > limit {
        return Err(Error::io(
            path,
            std::io::Error::other(format!("{len} bytes, more than the {limit} this file may have")),
        ));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    // `take` too: the file may grow while it is read.
    file.take(limit).read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
    Ok(bytes)
}

/// An advisory lock on a directory (`DIR/.lock`, holding the owner's process id), held until
/// dropped: one writer per checkpoint directory.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

/// The lock file's name inside a locked directory.
pub const LOCK_FILE: &str = ".lock";

impl DirLock {
    /// Takes the lock of `dir` (creating the folder), or fails naming the process that holds it.
    pub fn acquire(dir: &Path) -> Result<DirLock> {
        Self::try_acquire(dir)?.ok_or_else(|| {
            let holder = std::fs::read_to_string(dir.join(LOCK_FILE)).unwrap_or_default();
            let holder = holder.trim();
            let who = if holder.is_empty() { "another process".to_string() } else { format!("process {holder}") };
            Error::checkpoint(
                dir,
                format!("in use by {who} (another `wavegen train`?): wait for it to finish, or stop it first"),
            )
        })
    }

    /// Takes the lock if no one holds it; `Ok(None)` if someone does.
    pub fn try_acquire(dir: &Path) -> Result<Option<DirLock>> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
        }
        // Who holds it, for the error message of the next one who tries.
        let _ = file.set_len(0).and_then(|_| writeln!(file, "{}", std::process::id()));
        Ok(Some(DirLock { _file: file }))
    }
}

/// Test-only fault injection: when `WAVEGEN_CRASH_AT` is `NAME:N`, the N-th time the process
/// passes the point `name` it kills itself with SIGKILL, as a power cut would stop it. The
/// crash-consistency tests use it to stop a checkpoint commit between any two of its steps.
pub fn crash_point(name: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static PASSED: AtomicU64 = AtomicU64::new(0);
    let Some(spec) = std::env::var_os("WAVEGEN_CRASH_AT") else { return };
    let Some((point, n)) = spec.to_str().and_then(|s| s.rsplit_once(':')) else { return };
    if point != name {
        return;
    }
    let passed = PASSED.fetch_add(1, Ordering::SeqCst) + 1;
    if n.parse::<u64>().is_ok_and(|n| n == passed) {
        #[cfg(unix)]
        // SAFETY: sends SIGKILL to this very process.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_content_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.json");
        write_bytes_atomically(&p, b"one").unwrap();
        write_bytes_atomically(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_failed_write_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.json");
        write_bytes_atomically(&p, b"old").unwrap();
        let err = write_atomically(&p, |_| Err(std::io::Error::other("disk full")));
        assert!(err.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[cfg(unix)]
    #[test]
    fn links_are_followed_devices_written_through_and_stale_temporaries_removed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("real.wav");
        std::fs::write(&target, b"old").unwrap();
        let link = dir.path().join("link.wav");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        write_bytes_atomically(&link, b"new").unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the link stays a link");
        assert_eq!(std::fs::read(&target).unwrap(), b"new");

        write_bytes_atomically(Path::new("/dev/null"), b"into the void").unwrap();
        assert!(!std::fs::metadata("/dev/null").unwrap().is_file(), "/dev/null is still a device");

        let dangling = dir.path().join("dangling.wav");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
        let err = write_bytes_atomically(&dangling, b"x").unwrap_err().to_string();
        assert!(err.contains("dangling.wav") && err.contains("link to nothing"), "{err}");

        // A temporary file of a process that no longer runs (pid 2^22 + 1 is above pid_max).
        let stale = dir.path().join(".real.wav.4194305.tmp");
        std::fs::write(&stale, b"half").unwrap();
        write_bytes_atomically(&target, b"again").unwrap();
        assert!(!stale.exists());
    }

    #[test]
    fn a_second_lock_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let _held = DirLock::acquire(dir.path()).unwrap();
        let err = DirLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(err.contains(&format!("process {}", std::process::id())), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("model.safetensors");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = read_regular(&fifo, 1 << 20).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
    }
}
