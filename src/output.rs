//! Writing output files without losing any: every output goes to a temporary file in
//! its own directory and is renamed over the destination once complete (a rename
//! within one file system is atomic, so a full disk or a crash leaves the old file or
//! none, never half of one); no output may replace a file this run reads, or write
//! into a checkpoint directory it reads; an existing file is replaced only with
//! `--force` (except fusec's own dumps, see [`Replace`]), keeping its permissions.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Why an output was not written. Every case is about the run's environment or
/// arguments, so the command line reports it as bad input (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("{}: the file exists; pass --force to replace it", path.display())]
    Exists { path: PathBuf },
    #[error("{}: refusing to replace {}, which this run reads", path.display(), input.display())]
    ReplacesInput { path: PathBuf, input: PathBuf },
    #[error("{}: refusing to write into the checkpoint directory {}, which this run reads", path.display(), dir.display())]
    IntoCheckpoint { path: PathBuf, dir: PathBuf },
    #[error("{}: exists and is not a regular file", path.display())]
    NotAFile { path: PathBuf },
    /// The I/O error is part of the message (not a `source`), so that `{:#}` does not
    /// print it twice.
    #[error("{}: cannot write: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// Whether an output may replace a file of the same name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replace {
    /// Only with `--force`: a file the user named.
    IfForced,
    /// Always: a file of fusec's own output directory with a fixed name (`fusec
    /// compile`'s `eager.fir`, `kernels.cu`, ...), which each compile rewrites.
    Own,
}

/// A file's identity: device and inode, the same for every path (links included)
/// that reaches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

fn file_id(path: &Path) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| FileId {
        dev: m.dev(),
        ino: m.ino(),
    })
}

/// The files and checkpoint directories a run reads, which its outputs must leave
/// alone, and whether `--force` was given.
#[derive(Debug, Default)]
pub struct Outputs {
    force: bool,
    inputs: Vec<(PathBuf, FileId)>,
    checkpoint_dirs: Vec<(PathBuf, FileId)>,
}

impl Outputs {
    pub fn new(force: bool) -> Self {
        Self {
            force,
            ..Self::default()
        }
    }

    /// Records an input: a file, or a directory whose files (a Hugging Face model
    /// directory, a checkpoint) are all inputs and which no output may be written
    /// into. A path that does not exist is ignored (reading it fails elsewhere).
    pub fn reads(&mut self, path: &Path) {
        let Some(id) = file_id(path) else {
            return;
        };
        if path.is_dir() {
            self.checkpoint_dirs.push((path.to_path_buf(), id));
            if let Ok(entries) = std::fs::read_dir(path) {
                for e in entries.flatten() {
                    let p = e.path();
                    if p.is_file() {
                        if let Some(id) = file_id(&p) {
                            self.inputs.push((p, id));
                        }
                    }
                }
            }
        } else {
            // A weights file's shard index names the shards beside it.
            if let Some(dir) = path
                .file_name()
                .and_then(|n| n.to_str())
                .filter(|n| n.ends_with(".index.json"))
                .and(path.parent())
            {
                self.reads(dir);
            }
            self.inputs.push((path.to_path_buf(), id));
        }
    }

    /// Checks that `path` may be written: not an input, not inside a checkpoint
    /// directory, not an existing file unless `replace` allows it, never something
    /// other than a regular file.
    pub fn check(&self, path: &Path, replace: Replace) -> Result<(), OutputError> {
        let dir = parent_of(path);
        if let Some(dir_id) = file_id(dir) {
            if let Some((d, _)) = self.checkpoint_dirs.iter().find(|(_, id)| *id == dir_id) {
                return Err(OutputError::IntoCheckpoint {
                    path: path.to_path_buf(),
                    dir: d.clone(),
                });
            }
        }
        let Ok(meta) = std::fs::metadata(path) else {
            return Ok(());
        };
        if let Some(id) = file_id(path) {
            if let Some((input, _)) = self.inputs.iter().find(|(_, i)| *i == id) {
                return Err(OutputError::ReplacesInput {
                    path: path.to_path_buf(),
                    input: input.clone(),
                });
            }
        }
        if !meta.is_file() {
            return Err(OutputError::NotAFile {
                path: path.to_path_buf(),
            });
        }
        if replace == Replace::IfForced && !self.force {
            return Err(OutputError::Exists {
                path: path.to_path_buf(),
            });
        }
        Ok(())
    }

    /// Writes `contents` to `path` (see the module documentation).
    pub fn write(&self, path: &Path, contents: &[u8], replace: Replace) -> Result<(), OutputError> {
        self.write_with(path, replace, |tmp| {
            let mut f = OpenOptions::new().write(true).truncate(true).open(tmp)?;
            f.write_all(contents)?;
            f.flush()
        })
    }

    /// Writes `path` through `fill`, which writes the whole file at the temporary
    /// path it is given; the temporary is renamed over `path` only if `fill`
    /// succeeds, and removed otherwise.
    pub fn write_with<E: Into<Box<dyn std::error::Error + Send + Sync>>>(
        &self,
        path: &Path,
        replace: Replace,
        fill: impl FnOnce(&Path) -> Result<(), E>,
    ) -> Result<(), OutputError> {
        self.check(path, replace)?;
        let io = |error: std::io::Error| OutputError::Io {
            path: path.to_path_buf(),
            error,
        };
        let tmp = temporary_beside(path);
        let created = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io)?;
        // The mode a new file gets (the umask applied), or the replaced file's.
        let permissions = match std::fs::metadata(path) {
            Ok(m) => m.permissions(),
            Err(_) => created.metadata().map_err(io)?.permissions(),
        };
        drop(created);
        let result = fill(&tmp)
            .map_err(|e| io(std::io::Error::other(e.into())))
            .and_then(|()| std::fs::set_permissions(&tmp, permissions).map_err(io))
            .and_then(|()| File::open(&tmp).and_then(|f| f.sync_all()).map_err(io))
            .and_then(|()| std::fs::rename(&tmp, path).map_err(io));
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

/// The directory `path` is in (`.` for a bare name).
fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A fresh name in `path`'s directory: `.NAME.fusec-tmp.PID.N`.
fn temporary_beside(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map_or_else(|| "output".into(), |n| n.to_string_lossy().into_owned());
    parent_of(path).join(format!(".{name}.fusec-tmp.{}.{n}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("fusec-output-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let d = dir("failed");
        let path = d.join("out.txt");
        std::fs::write(&path, "old").expect("write");
        let out = Outputs::new(true);
        let err = out.write_with(&path, Replace::IfForced, |tmp| {
            std::fs::write(tmp, "half")?;
            Err(std::io::Error::other("disk full"))
        });
        assert!(matches!(err, Err(OutputError::Io { .. })), "{err:?}");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "old");
        let left: Vec<_> = std::fs::read_dir(&d).expect("dir").collect();
        assert_eq!(left.len(), 1, "{left:?}");
    }

    #[test]
    fn replacing_keeps_the_mode_and_needs_force() {
        use std::os::unix::fs::PermissionsExt;
        let d = dir("mode");
        let path = d.join("out.txt");
        std::fs::write(&path, "old").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let err = Outputs::new(false).write(&path, b"new", Replace::IfForced);
        assert!(matches!(err, Err(OutputError::Exists { .. })), "{err:?}");
        Outputs::new(true)
            .write(&path, b"new", Replace::IfForced)
            .expect("forced");
        let meta = std::fs::metadata(&path).expect("meta");
        assert_eq!(meta.permissions().mode() & 0o777, 0o640);
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "new");
    }

    #[test]
    fn inputs_and_checkpoint_directories_are_never_replaced() {
        let d = dir("inputs");
        let ckpt = d.join("ckpt");
        std::fs::create_dir_all(&ckpt).expect("dir");
        std::fs::write(ckpt.join("model.safetensors"), "w").expect("write");
        std::fs::write(d.join("model.toml"), "m").expect("write");
        let mut out = Outputs::new(true);
        out.reads(&ckpt);
        out.reads(&d.join("model.toml"));
        // Another spelling of the same file is still the input.
        let again = d.join("ckpt/../model.toml");
        let err = out.write(&again, b"x", Replace::Own);
        assert!(
            matches!(err, Err(OutputError::ReplacesInput { .. })),
            "{err:?}"
        );
        let err = out.write(&ckpt.join("new.json"), b"x", Replace::Own);
        assert!(
            matches!(err, Err(OutputError::IntoCheckpoint { .. })),
            "{err:?}"
        );
        assert_eq!(
            std::fs::read_to_string(d.join("model.toml")).expect("read"),
            "m"
        );
    }

    #[test]
    fn devices_are_not_replaced() {
        let err = Outputs::new(true).write(Path::new("/dev/null"), b"x", Replace::Own);
        assert!(matches!(err, Err(OutputError::NotAFile { .. })), "{err:?}");
    }
}
