//! Checkpoints: a directory whose committed state is one folder of files,
//! - `model.safetensors`: the weights, named as each model file documents (a shipping copy
//!   made by `wavegen mnist compact` holds `model.safetensors.gz` instead);
//! - `optimizer.safetensors`: AdamW's moments (`m.NAME`, `v.NAME`), needed only to resume;
//! - `config.json`: a [`Record`] (for wavegen's runs `tasks::run::Manifest`: model config,
//!   data settings, training settings and state), with the length and SHA-256 of each file.
//!
//! A commit writes a new folder `step-NNNNNNNNN/` (every file fsynced, config.json last), then
//! switches the symbolic link `current` to it with one rename, the atomic step; the previous
//! folder stays until the commit after next, so a reader that opened it can finish. A crash at
//! any instruction leaves `current` on a complete folder. Folders `current` does not name are
//! leftovers of an interrupted commit and are removed by the next writer (or reader that can
//! take the lock). A folder holding `config.json` and the files directly (the shipped
//! checkpoints, and what older versions wrote) is read as one committed state.
//!
//! Writers hold the directory's [`DirLock`]; see `docs/checkpoint-format.md`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::optim::AdamW;
use super::params::{Params, parse_safetensors, safetensors_bytes};
use crate::fsutil::DirLock;
use crate::{Error, Result};

/// The `format` field of every config.json this version writes.
pub const FORMAT: &str = "wavegen-checkpoint/1";
/// The weights file of a checkpoint directory.
pub const MODEL_FILE: &str = "model.safetensors";
/// The gzip-compressed weights file of a shipping copy (read when `MODEL_FILE` is absent).
pub const MODEL_FILE_GZ: &str = "model.safetensors.gz";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const MANIFEST_FILE: &str = "config.json";

/// What the checkpoint machinery needs of a config.json. The core knows none of the models or
/// data that sit on it: the manifest of wavegen's runs is `tasks::run::Manifest`.
pub trait Record: Serialize + DeserializeOwned + Clone {
    /// The `format` field ([`FORMAT`] for what this version writes).
    fn format(&self) -> &str;
    /// The training step this state is of (also written into each tensor file, so that a file
    /// of another step is caught).
    fn step(&self) -> u64;
    /// AdamW's update count.
    fn optimizer_steps(&self) -> u64;
    /// Length and SHA-256 of each tensor file of the committed folder, by name.
    fn files(&self) -> &BTreeMap<String, FileSum>;
    /// Replaces the file sums (the commit records those of the files it wrote).
    fn set_files(&mut self, files: BTreeMap<String, FileSum>);
    /// Checks every setting against its limit, before anything is built from it.
    fn validate(&self) -> Result<()>;
}

/// The symbolic link that names the committed folder.
pub const CURRENT: &str = "current";
const STEP_PREFIX: &str = "step-";
/// No weights or optimizer file may be larger (a bounded read, whatever the file claims).
const MAX_TENSOR_FILE_BYTES: u64 = 4 << 30;
const MAX_MANIFEST_BYTES: u64 = 256 << 20;

/// One file of a committed folder as config.json records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileSum {
    /// Its length.
    pub bytes: u64,
    /// SHA-256 of its content, lower-case hex.
    pub sha256: String,
}

/// SHA-256 of `bytes` as lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A committed checkpoint, opened: the folder its files are in, and its config.json.
#[derive(Debug, Clone)]
pub struct Checkpoint<M> {
    /// The folder holding config.json and the tensor files (`DIR/step-…` or `DIR` itself).
    pub dir: PathBuf,
    /// config.json.
    pub manifest: M,
}

/// Resolves what the user passed as `--checkpoint`: the directory, or a file inside it.
pub fn resolve_dir(path: &Path) -> PathBuf {
    let is_member = path
        .file_name()
        .is_some_and(|n| n == MANIFEST_FILE || n == MODEL_FILE || n == MODEL_FILE_GZ || n == OPTIMIZER_FILE);
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if is_member && !path.is_dir() && parent.is_dir() { parent.to_path_buf() } else { path.to_path_buf() }
}

/// The folder holding the committed files of `dir`: `current`'s target, or `dir` itself for a
/// flat checkpoint; `None` if nothing is committed.
fn committed_folder(dir: &Path) -> Result<Option<PathBuf>> {
    let pointer = dir.join(CURRENT);
    match std::fs::read_link(&pointer) {
        Ok(target) => {
            let folder = dir.join(&target);
            if !folder.join(MANIFEST_FILE).is_file() {
                return Err(Error::checkpoint(
                    dir,
                    format!(
                        "`{CURRENT}` names {}, which holds no {MANIFEST_FILE}: the directory was changed by hand; point `{CURRENT}` at a complete step-… folder",
                        target.display()
                    ),
                ));
            }
            Ok(Some(folder))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Ok(dir.join(MANIFEST_FILE).exists().then(|| dir.to_path_buf()))
        }
        Err(e) => Err(Error::io(&pointer, e)),
    }
}

/// Whether `dir` holds a committed checkpoint.
pub fn exists(dir: &Path) -> bool {
    matches!(committed_folder(dir), Ok(Some(_)))
}

/// Opens the committed checkpoint of `path` (a checkpoint directory, or a file in one) and
/// checks its config.json: format, and every setting within its limits.
pub fn open<M: Record>(path: &Path) -> Result<Checkpoint<M>> {
    let dir = resolve_dir(path);
    match std::fs::metadata(&dir) {
        Err(_) => {
            return Err(Error::checkpoint(
                &dir,
                "no such directory (train one with `wavegen train` or `wavegen mnist train`)",
            ));
        }
        Ok(m) if !m.is_dir() => {
            return Err(Error::checkpoint(
                &dir,
                "is a file, not a checkpoint directory: pass the folder that holds config.json",
            ));
        }
        Ok(_) => {}
    }
    let Some(folder) = committed_folder(&dir)? else {
        let interrupted = list_step_folders(&dir).next().is_some();
        return Err(Error::checkpoint(
            &dir,
            if interrupted {
                "holds no committed checkpoint: training was stopped before its first checkpoint was complete; train again into it (without --resume) or choose another directory".to_string()
            } else {
                format!("holds no checkpoint ({MANIFEST_FILE} is missing): is this a wavegen checkpoint directory?")
            },
        ));
    };
    remove_leftovers_if_free(&dir);
    let path = folder.join(MANIFEST_FILE);
    let bytes = crate::fsutil::read_regular(&path, MAX_MANIFEST_BYTES)?;
    let manifest: M = serde_json::from_slice(&bytes).map_err(|e| Error::Json { path: path.clone(), source: e })?;
    if manifest.format() != FORMAT {
        return Err(Error::checkpoint(&path, format!("format {:?}, this wavegen reads {FORMAT:?}", manifest.format())));
    }
    manifest.validate().map_err(|e| Error::checkpoint(&path, e.to_string()))?;
    Ok(Checkpoint { dir: folder, manifest })
}

/// A checkpoint held in memory (the default model compiled into the binary): its config.json
/// and weights file, checked as those of a directory are; `name` stands for the path in errors.
pub fn from_bytes<M: Record>(name: &Path, config: &[u8], weights: &[u8]) -> Result<(M, HashMap<String, Tensor>)> {
    let manifest: M =
        serde_json::from_slice(config).map_err(|e| Error::Json { path: name.join(MANIFEST_FILE), source: e })?;
    manifest.validate().map_err(|e| Error::checkpoint(name, e.to_string()))?;
    let path = name.join(MODEL_FILE);
    let (tensors, meta) = parse_safetensors(&path, weights.to_vec())?;
    check_step(&path, &meta, manifest.step())?;
    Ok((manifest, tensors))
}

impl<M: Record> Checkpoint<M> {
    /// The weights file: `model.safetensors`, or the compressed one of a shipping copy.
    pub fn weights_file(&self) -> PathBuf {
        let gz = self.dir.join(MODEL_FILE_GZ);
        if !self.dir.join(MODEL_FILE).exists() && gz.exists() { gz } else { self.dir.join(MODEL_FILE) }
    }

    /// The weights by name, as stored (checksum and step checked).
    pub fn weights(&self) -> Result<HashMap<String, Tensor>> {
        Ok(self.read_tensors(&self.weights_file())?.0)
    }

    /// Loads the weights into `params` (whose model was built from the manifest); fails on a
    /// checksum mismatch, a missing or misshapen tensor, or weights that are not finite.
    pub fn load_weights(&self, params: &Params) -> Result<()> {
        let path = self.weights_file();
        let (tensors, _) = self.read_tensors(&path)?;
        params.assign(&tensors, &path)
    }

    /// Restores the optimizer moments; fails if they are missing (a checkpoint saved without
    /// them cannot be resumed exactly).
    pub fn load_optimizer(&self, opt: &mut AdamW) -> Result<()> {
        let path = self.dir.join(OPTIMIZER_FILE);
        let (tensors, _) = self.read_tensors(&path)?;
        opt.load_state(&tensors, self.manifest.optimizer_steps())
            .ok_or_else(|| Error::checkpoint(&path, "optimizer state does not match the model's parameters"))
    }

    fn read_tensors(&self, path: &Path) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let bytes = crate::fsutil::read_regular(path, MAX_TENSOR_FILE_BYTES)?;
        if let Some(sum) = self.manifest.files().get(&name)
            && (bytes.len() as u64 != sum.bytes || sha256_hex(&bytes) != sum.sha256)
        {
            return Err(Error::checkpoint(
                path,
                format!(
                    "damaged: its content does not match the checksum in {MANIFEST_FILE} ({} bytes, {} expected); restore it from a copy, or retrain",
                    bytes.len(),
                    sum.bytes
                ),
            ));
        }
        let (tensors, meta) = parse_safetensors(path, bytes)?;
        check_step(path, &meta, self.manifest.step())?;
        Ok((tensors, meta))
    }
}

fn check_step(path: &Path, meta: &HashMap<String, String>, expected: u64) -> Result<()> {
    match meta.get("step").map(|s| s.parse::<u64>()) {
        Some(Ok(step)) if step == expected => Ok(()),
        Some(Ok(step)) => Err(Error::checkpoint(
            path,
            format!(
                "holds step {step} but config.json says step {expected}: the checkpoint was interrupted while being written"
            ),
        )),
        _ => Ok(()), // written by another tool: nothing to check against
    }
}

/// Commits a checkpoint to `dir`: weights, optimizer (if given) and config.json, as one atomic
/// step. The caller holds `dir`'s [`DirLock`] (or that of a directory above it).
pub fn save<M: Record>(dir: &Path, manifest: &M, params: &Params, opt: Option<&AdamW>) -> Result<()> {
    let mut files = vec![(MODEL_FILE, safetensors_bytes(&params.tensors(), metadata(manifest))?)];
    if let Some(opt) = opt {
        files.push((OPTIMIZER_FILE, safetensors_bytes(&opt.state_tensors()?, metadata(manifest))?));
    }
    commit(dir, manifest, &files)
}

/// Commits a shipping copy to `dir`: `weights` (named tensors of any float type: loading
/// converts) gzip-compressed, and config.json; no optimizer, so it cannot be resumed.
pub fn save_shipping_copy<M: Record>(dir: &Path, manifest: &M, weights: &[(String, Tensor)]) -> Result<()> {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let zipped = gz.write_all(&safetensors_bytes(weights, metadata(manifest))?).and_then(|_| gz.finish());
    let zipped = zipped.map_err(|e| Error::io(dir.join(MODEL_FILE_GZ), e))?;
    commit(dir, manifest, &[(MODEL_FILE_GZ, zipped)])
}

/// Holds off a second Ctrl-C (or SIGTERM) while a commit runs: the signal handler takes this
/// lock before it exits, and keeps it, so the process never dies half-way through a commit.
pub static COMMIT: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The commit: a new step folder, each file written and fsynced, config.json (with every
/// file's length and checksum) last, the folder fsynced, then `current` switched by a rename.
fn commit<M: Record>(dir: &Path, manifest: &M, files: &[(&str, Vec<u8>)]) -> Result<()> {
    let _commit = COMMIT.lock().unwrap_or_else(|e| e.into_inner());
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let previous = std::fs::read_link(dir.join(CURRENT)).ok();
    let name = fresh_step_name(dir, manifest.step(), previous.as_deref())?;
    let folder = dir.join(&name);
    std::fs::create_dir(&folder).map_err(|e| Error::io(&folder, e))?;
    let mut sums = BTreeMap::new();
    for (file, bytes) in files {
        write_durably(&folder.join(file), bytes)?;
        sums.insert(file.to_string(), FileSum { bytes: bytes.len() as u64, sha256: sha256_hex(bytes) });
        crate::fsutil::crash_point("checkpoint-file");
    }
    let mut manifest = manifest.clone();
    manifest.set_files(sums);
    let json = serde_json::to_vec_pretty(&manifest).expect("invariant: plain data serialises");
    write_durably(&folder.join(MANIFEST_FILE), &json)?;
    crate::fsutil::sync_dir(&folder);
    crate::fsutil::crash_point("checkpoint-staged");
    switch_current(dir, &name)?;
    crate::fsutil::crash_point("checkpoint-committed");
    // The commit is done; what follows only frees space.
    remove_leftovers(dir, &name, previous.as_deref());
    Ok(())
}

fn write_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    file.write_all(bytes).and_then(|_| file.sync_all()).map_err(|e| Error::io(path, e))
}

/// `step-000000051`, or `step-000000051-2`, … when that name is the committed folder (a
/// second commit at the same step, e.g. the final one). A folder of that name that is not
/// committed is an interrupted commit's leftover, and is replaced.
fn fresh_step_name(dir: &Path, step: u64, current: Option<&Path>) -> Result<String> {
    let base = format!("{STEP_PREFIX}{step:09}");
    for i in 1..100 {
        let name = if i == 1 { base.clone() } else { format!("{base}-{i}") };
        if current.is_some_and(|c| c == Path::new(&name)) {
            continue;
        }
        let path = dir.join(&name);
        let _ = std::fs::remove_dir_all(&path);
        if !path.exists() {
            return Ok(name);
        }
    }
    Err(Error::checkpoint(dir, format!("cannot remove the leftover folders {base}…: check its permissions")))
}

/// Points `dir/current` at `name` with one rename (the atomic step of a commit).
fn switch_current(dir: &Path, name: &str) -> Result<()> {
    let tmp = dir.join(format!(".{CURRENT}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    #[cfg(unix)]
    std::os::unix::fs::symlink(name, &tmp).map_err(|e| Error::io(&tmp, e))?;
    #[cfg(windows)]
    std::os::windows::fs::symlink_dir(name, &tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = std::fs::rename(&tmp, dir.join(CURRENT)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(dir.join(CURRENT), e));
    }
    crate::fsutil::sync_dir(dir);
    Ok(())
}

fn list_step_folders(dir: &Path) -> impl Iterator<Item = String> {
    std::fs::read_dir(dir).into_iter().flatten().flatten().filter_map(|e| {
        let name = e.file_name().to_str()?.to_string();
        let is_step = name.strip_prefix(STEP_PREFIX).is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()));
        (is_step && e.file_type().ok()?.is_dir()).then_some(name)
    })
}

/// After a commit of `current`: removes step folders other than it and `previous`, pointer
/// temporaries, and the files of a flat checkpoint this directory held before (now superseded).
fn remove_leftovers(dir: &Path, current: &str, previous: Option<&Path>) {
    for name in list_step_folders(dir) {
        if name != current && previous.is_none_or(|p| p != Path::new(&name)) {
            let _ = std::fs::remove_dir_all(dir.join(&name));
        }
    }
    // A flat checkpoint (config.json beside the files) that the commit superseded, on resume.
    let flat_checkpoint = dir.join(MANIFEST_FILE).is_file();
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pointer_tmp = name.starts_with(&format!(".{CURRENT}.")) && name.ends_with(".tmp");
        // `.NAME.PID.tmp` files of older versions, which wrote each file in place.
        let old_tmp = [MODEL_FILE, OPTIMIZER_FILE, MANIFEST_FILE, MODEL_FILE_GZ]
            .iter()
            .any(|f| name.starts_with(&format!(".{f}.")) && name.ends_with(".tmp"));
        let flat =
            flat_checkpoint && [MODEL_FILE, OPTIMIZER_FILE, MANIFEST_FILE, MODEL_FILE_GZ].contains(&name.as_str());
        if pointer_tmp || old_tmp || flat {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Removes what interrupted commits left in `dir`, if no writer holds it (a reader's clean-up;
/// nothing is locked or created unless there is something to remove).
fn remove_leftovers_if_free(dir: &Path) {
    let Ok(current) = std::fs::read_link(dir.join(CURRENT)) else { return };
    let stale = list_step_folders(dir).any(|n| Path::new(&n) != current)
        || std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".tmp"));
    if !stale {
        return;
    }
    if let Ok(Some(_lock)) = DirLock::try_acquire(dir) {
        prepare_for_writing(dir);
    }
}

/// The right to write checkpoints into a directory: its [`DirLock`], taken after checking
/// what an interrupted commit left there. A directory that this guard created is removed
/// again when it is dropped with nothing committed in it, so a run that fails before its first
/// checkpoint (a bad folder, a bad setting) leaves nothing behind.
pub struct WriteGuard {
    dir: PathBuf,
    created: bool,
    lock: Option<DirLock>,
}

impl WriteGuard {
    /// Locks `dir` (creating it) and removes the leftovers of interrupted commits.
    pub fn acquire(dir: &Path) -> Result<WriteGuard> {
        let created = !dir.exists();
        let lock = DirLock::acquire(dir)?;
        prepare_for_writing(dir);
        Ok(WriteGuard { dir: dir.to_path_buf(), created, lock: Some(lock) })
    }
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        // A checkpoint here, or in a folder of it (`mnist train` keeps its latest state in one).
        let committed = exists(&self.dir)
            || std::fs::read_dir(&self.dir).into_iter().flatten().flatten().any(|e| exists(&e.path()));
        if self.created && !committed {
            // Still locked: nobody else can have written here.
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        self.lock.take();
    }
}

/// Fails if `dir`, which holds no committed checkpoint, holds weights or optimizer files
/// anyway: a new run would supersede (and remove) them.
pub fn refuse_foreign_files(dir: &Path) -> Result<()> {
    for name in [MODEL_FILE, MODEL_FILE_GZ, OPTIMIZER_FILE] {
        if dir.join(name).exists() {
            return Err(Error::checkpoint(
                dir,
                format!(
                    "holds {name} but no {MANIFEST_FILE}: not a checkpoint this version can continue, and a new run would replace it; choose another --out, or move the file away"
                ),
            ));
        }
    }
    Ok(())
}

/// Removes everything an interrupted commit can leave in `dir` (call holding its lock).
pub fn prepare_for_writing(dir: &Path) {
    if let Ok(current) = std::fs::read_link(dir.join(CURRENT)) {
        let current = current.to_string_lossy().into_owned();
        remove_leftovers(dir, &current, None);
    } else if !dir.join(MANIFEST_FILE).exists() {
        // Nothing committed yet: every step folder is an interrupted first commit.
        for name in list_step_folders(dir) {
            let _ = std::fs::remove_dir_all(dir.join(&name));
        }
    }
}

fn metadata<M: Record>(manifest: &M) -> HashMap<String, String> {
    HashMap::from([("step".to_string(), manifest.step().to_string()), ("format".into(), FORMAT.into())])
}
