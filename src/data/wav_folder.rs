//! A folder of WAV files as one μ-law coded corpus.
//!
//! Files are found recursively, decoded, mixed to mono, resampled to the model rate, trimmed of
//! leading and trailing silence and μ-law encoded. The codes of all kept files are stored once
//! in a cache file that later runs read through memmap2; its name is a hash of every file's
//! path, size and modification time and of the audio settings, so any change rebuilds it.
//!
//! The train/validation split is by file, and deterministic from the file names: no
//! validation audio is ever part of a training window.

use std::path::{Path, PathBuf};

use candle_core::Device;
use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use super::{Batch, BatchSource};
use crate::audio::mel::{self, MelConfig};
use crate::audio::{mulaw, resample, wav};
use crate::rng::{Rng, fnv1a};
use crate::{Error, Result};

/// How audio is turned into codes. Stored in every checkpoint: generation and evaluation must
/// use the settings the model was trained with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AudioSettings {
    /// The model's sample rate in Hz; files at other rates are resampled.
    pub sample_rate: u32,
    /// Leading and trailing samples quieter than this many dB below the file's peak are cut.
    pub trim_db: f32,
    /// Files shorter than this after trimming are dropped (seconds).
    pub min_seconds: f32,
}

impl Default for AudioSettings {
    fn default() -> Self {
        AudioSettings { sample_rate: 16000, trim_db: 40.0, min_seconds: 0.05 }
    }
}

impl AudioSettings {
    /// Checks the ranges: a rate from 1 kHz to 192 kHz, a finite trim depth ≥ 0 dB, a finite
    /// minimum length from 0 to 1 hour.
    pub fn validate(&self) -> Result<()> {
        if !(1000..=192_000).contains(&self.sample_rate) {
            return Err(Error::Config(format!(
                "sample rate {} Hz: it must be from 1000 to 192000 Hz",
                self.sample_rate
            )));
        }
        if !(self.trim_db >= 0.0 && self.trim_db.is_finite()) {
            return Err(Error::Config(format!(
                "trim depth {} dB: it must be a finite number ≥ 0 (how far below the peak counts as silence)",
                self.trim_db
            )));
        }
        if !(0.0..=3600.0).contains(&self.min_seconds) {
            return Err(Error::Config(format!("min_seconds {}: it must be from 0 to 3600", self.min_seconds)));
        }
        Ok(())
    }

    /// Turns one decoded file into training codes: resample, trim, encode. `Err` holds why the
    /// file was dropped (silence, too short).
    pub fn encode(&self, audio: &wav::Mono) -> std::result::Result<Vec<u8>, String> {
        Ok(mulaw::encode_all(&self.prepare(audio)?))
    }

    /// The samples training codes are made of: resampled and trimmed (what a vocoder's
    /// features are computed from). `Err` holds why the file was dropped.
    pub fn prepare(&self, audio: &wav::Mono) -> std::result::Result<Vec<f32>, String> {
        self.prepare_at_speed(audio, 1.0)
    }

    /// [`AudioSettings::prepare`] of the file played `speed` times faster (its pitch and tempo
    /// scaled together: speed perturbation, Ko et al. 2015): it is read as if it had been
    /// recorded at `speed` times its rate, then resampled to the model's.
    pub fn prepare_at_speed(&self, audio: &wav::Mono, speed: f64) -> std::result::Result<Vec<f32>, String> {
        let from = (audio.sample_rate as f64 * speed).round() as u32;
        let samples = resample::resample(&audio.samples, from, self.sample_rate).map_err(|e| e.to_string())?;
        if samples.iter().all(|&x| x == 0.0) {
            return Err("digital silence".into());
        }
        let kept = self.trim(&samples);
        let seconds = kept.len() as f32 / self.sample_rate as f32;
        if seconds < self.min_seconds {
            return Err(format!("only {seconds:.3} s above the silence threshold (minimum {} s)", self.min_seconds));
        }
        Ok(kept.to_vec())
    }

    /// Turns one decoded file into the codes `wavegen eval` scores: as for training, but any
    /// length counts and digital silence is scored as it is. `Err` only for a file of no samples.
    pub fn encode_for_scoring(&self, audio: &wav::Mono) -> std::result::Result<Vec<u8>, String> {
        Ok(mulaw::encode_all(&self.prepare_for_scoring(audio)?))
    }

    /// The samples behind [`AudioSettings::encode_for_scoring`]'s codes (a vocoder's features
    /// are computed from them).
    pub fn prepare_for_scoring(&self, audio: &wav::Mono) -> std::result::Result<Vec<f32>, String> {
        let samples =
            resample::resample(&audio.samples, audio.sample_rate, self.sample_rate).map_err(|e| e.to_string())?;
        if samples.is_empty() {
            return Err("the file holds no samples: nothing to score".into());
        }
        Ok(self.trim(&samples).to_vec())
    }

    /// `samples` without the leading and trailing part quieter than `trim_db` below the peak
    /// (all of it when it is silent).
    fn trim<'a>(&self, samples: &'a [f32]) -> &'a [f32] {
        let peak = samples.iter().fold(0.0f32, |m, &x| m.max(x.abs()));
        if peak == 0.0 {
            return samples;
        }
        let threshold = peak * 10f32.powf(-self.trim_db / 20.0);
        let first = samples.iter().position(|&x| x.abs() >= threshold).unwrap_or(0);
        let last = samples.iter().rposition(|&x| x.abs() >= threshold).unwrap_or(0);
        &samples[first..=last]
    }
}

/// One file of the corpus.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CorpusFile {
    /// Path relative to the corpus root, with `/` separators.
    pub name: String,
    /// Offset of its codes in the cache file.
    pub offset: usize,
    /// Number of codes (samples at the model rate, after trimming).
    pub len: usize,
    /// Seconds removed by trimming.
    pub trimmed_seconds: f64,
}

impl CorpusFile {
    /// Its first-level subfolder: the global-conditioning label, if it has one.
    pub fn label(&self) -> Option<&str> {
        self.name.split_once('/').map(|(first, _)| first)
    }
}

/// What happened to the files of a folder.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ScanReport {
    /// `.wav` files found.
    pub found: usize,
    /// Seconds of audio kept (after trimming, at the model rate).
    pub kept_seconds: f64,
    /// Seconds trimmed away as leading or trailing silence.
    pub trimmed_seconds: f64,
    /// Files dropped, and why.
    pub dropped: Vec<(String, String)>,
}

#[derive(Serialize, Deserialize)]
struct CacheIndex {
    fingerprint: u64,
    files: Vec<CorpusFile>,
    report: ScanReport,
}

/// A folder's audio as μ-law codes, memory-mapped; for a vocoder, with its log-mel features.
pub struct Corpus {
    /// The folder.
    pub root: PathBuf,
    /// The kept files, sorted by name.
    pub files: Vec<CorpusFile>,
    /// What was kept and dropped.
    pub report: ScanReport,
    codes: Mmap,
    features: Option<Features>,
}

/// Every file's log-mel features, memory-mapped: `frames × bands` f32 (little-endian) per file,
/// one file after the other, file i holding `mel.frames(len_i)` frames.
struct Features {
    mel: MelConfig,
    bytes: Mmap,
    /// Where each file's first frame starts, in frames.
    first_frame: Vec<usize>,
}

impl std::fmt::Debug for Corpus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Corpus").field("root", &self.root).field("files", &self.files.len()).finish()
    }
}

/// The `.wav` files under a folder.
#[derive(Debug, Clone, Default)]
pub struct WavFiles {
    /// (name relative to the root with `/` separators, path to open), sorted by name. A name
    /// that is not UTF-8 is shown with replacement characters; the path is exact.
    pub files: Vec<(String, PathBuf)>,
    /// Entries passed over, and why (a dangling link, a FIFO, a second name of a file …).
    pub skipped: Vec<(String, String)>,
}

/// Every `.wav` file under `root` (any case of the extension), following links but entering
/// each folder once (by canonical path: a link loop is not a longer list) and listing each file
/// once (two names of one file would put it on both sides of the validation split). Entries
/// that cannot be used are listed in `skipped`, never an error of the whole walk.
pub fn find_wav_files(root: &Path) -> Result<WavFiles> {
    use std::collections::{HashMap, HashSet};
    struct Walk {
        root: PathBuf,
        seen_dirs: HashSet<PathBuf>,
        found: Vec<(String, PathBuf, PathBuf)>, // name, path, canonical path
        skipped: Vec<(String, String)>,
    }
    fn name_of(root: &Path, path: &Path) -> String {
        let rel = path.strip_prefix(root).unwrap_or(path);
        rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/")
    }
    fn walk(w: &mut Walk, dir: &Path) {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => return w.skipped.push((name_of(&w.root, dir), format!("cannot list the folder: {e}"))),
        };
        let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        entries.sort();
        for path in entries {
            let name = name_of(&w.root, &path);
            let is_wav = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("wav"));
            // `metadata` follows links: what counts is what a link points at.
            let meta = match std::fs::metadata(&path) {
                Ok(m) => m,
                Err(_) if is_wav || std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) => {
                    w.skipped.push((name, "a link to nothing (dangling symbolic link)".into()));
                    continue;
                }
                Err(_) => continue,
            };
            if meta.is_dir() {
                match path.canonicalize() {
                    Ok(canonical) if w.seen_dirs.insert(canonical.clone()) => walk(w, &path),
                    Ok(_) => w.skipped.push((name, "a folder already searched (a link back into the tree)".into())),
                    Err(e) => w.skipped.push((name, format!("cannot resolve the folder: {e}"))),
                }
            } else if is_wav {
                if !meta.is_file() {
                    w.skipped.push((name, "not a regular file (a FIFO, socket or device)".into()));
                    continue;
                }
                let canonical = path.canonicalize().unwrap_or_else(|_| path.clone());
                w.found.push((name, path, canonical));
            }
        }
    }
    if !root.is_dir() {
        return Err(Error::NoAudio { path: root.into(), reason: "not a folder (pass a folder of .wav files)".into() });
    }
    let canonical_root = root.canonicalize().map_err(|e| Error::io(root, e))?;
    let mut w =
        Walk { root: root.to_path_buf(), seen_dirs: HashSet::from([canonical_root]), found: vec![], skipped: vec![] };
    walk(&mut w, root);
    w.found.sort_by(|a, b| a.0.cmp(&b.0));
    let mut first_name: HashMap<PathBuf, String> = HashMap::new();
    let mut files = Vec::new();
    for (name, path, canonical) in w.found {
        match first_name.get(&canonical) {
            Some(first) => w.skipped.push((name, format!("the same file as {first}"))),
            None => {
                first_name.insert(canonical, name.clone());
                files.push((name, path));
            }
        }
    }
    Ok(WavFiles { files, skipped: w.skipped })
}

impl Corpus {
    /// Opens the corpus of `root`, decoding it only if `cache_dir` holds no up-to-date cache.
    /// `progress(done, total)` is called while files are decoded.
    pub fn open(
        root: &Path,
        settings: &AudioSettings,
        cache_dir: &Path,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        Self::open_with_features(root, settings, None, cache_dir, progress)
    }

    /// [`Corpus::open`], with the log-mel features of every file under `mel` (computed from the
    /// same resampled, trimmed samples as the codes, and cached beside them) when it is given.
    pub fn open_with_features(
        root: &Path,
        settings: &AudioSettings,
        mel: Option<&MelConfig>,
        cache_dir: &Path,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        Self::open_at_speed(root, settings, mel, 1.0, cache_dir, progress)
    }

    /// [`Corpus::open_with_features`] of the folder's files played `speed` times faster (see
    /// [`AudioSettings::prepare_at_speed`]): codes and features both made from the changed audio,
    /// so a vocoder trained on the copy learns the same mapping at other pitches and tempi.
    pub fn open_at_speed(
        root: &Path,
        settings: &AudioSettings,
        mel: Option<&MelConfig>,
        speed: f64,
        cache_dir: &Path,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        check_speed(speed)?;
        let found = find_wav_files(root)?;
        if found.files.is_empty() {
            return Err(Error::NoAudio {
                path: root.into(),
                reason: "no .wav files found (searched all subfolders)".into(),
            });
        }
        if let Some(m) = mel {
            m.validate()?;
            if m.sample_rate != settings.sample_rate {
                return Err(Error::Config(format!(
                    "mel features at {} Hz for audio at {} Hz: they must be computed at the model's rate",
                    m.sample_rate, settings.sample_rate
                )));
            }
        }
        let fingerprint = fingerprint(root, &found.files, settings, speed)?;
        let stem = cache_dir.join(format!("corpus-{fingerprint:016x}"));
        let (index_path, codes_path) = (stem.with_extension("json"), stem.with_extension("codes"));
        // The features' file is named after the codes' fingerprint and the analysis settings.
        let mel_path = mel.map(|m| {
            let key = serde_json::to_string(m).expect("invariant: plain data serialises");
            cache_dir.join(format!("corpus-{fingerprint:016x}-mel-{:016x}.f32", fnv1a(key.as_bytes())))
        });
        let cached = read_index(&index_path, fingerprint).filter(|_| mel_path.as_ref().is_none_or(|p| p.is_file()));
        let index = match cached {
            Some(index) => index,
            None => {
                let (index, codes, features) = build(&found, settings, mel, speed, fingerprint, progress);
                crate::fsutil::write_bytes_atomically(&codes_path, &codes)?;
                if let Some(path) = &mel_path {
                    crate::fsutil::write_bytes_atomically(path, &features)?;
                }
                let json = serde_json::to_vec(&index).expect("invariant: plain data serialises");
                crate::fsutil::write_bytes_atomically(&index_path, &json)?;
                index
            }
        };
        if index.files.is_empty() {
            let reasons: Vec<String> =
                index.report.dropped.iter().take(3).map(|(f, why)| format!("{f}: {why}")).collect();
            return Err(Error::NoAudio {
                path: root.into(),
                reason: format!("none of the {} .wav files is usable ({})", index.report.found, reasons.join("; ")),
            });
        }
        let file = std::fs::File::open(&codes_path).map_err(|e| Error::io(&codes_path, e))?;
        // SAFETY: the cache file is written once, atomically, and never modified in place.
        let codes = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&codes_path, e))?;
        let expected: usize = index.files.iter().map(|f| f.len).sum();
        if codes.len() != expected {
            return Err(Error::io(
                &codes_path,
                std::io::Error::other(format!(
                    "cache holds {} codes, its index says {expected}: delete the file to rebuild it",
                    codes.len()
                )),
            ));
        }
        let features = match (mel, &mel_path) {
            (Some(m), Some(path)) => {
                let mut first_frame = Vec::with_capacity(index.files.len());
                let mut total = 0;
                for f in &index.files {
                    first_frame.push(total);
                    total += m.frames(f.len);
                }
                let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
                // SAFETY: the cache file is written once, atomically, and never modified in place.
                let bytes = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
                if bytes.len() != total * m.bands * 4 {
                    return Err(Error::io(
                        path,
                        std::io::Error::other(format!(
                            "the features cache holds {} bytes, {} expected: delete it to rebuild it",
                            bytes.len(),
                            total * m.bands * 4
                        )),
                    ));
                }
                Some(Features { mel: m.clone(), bytes, first_frame })
            }
            _ => None,
        };
        Ok(Corpus { root: root.into(), files: index.files, report: index.report, codes, features })
    }

    /// The analysis of the features, if the corpus has them.
    pub fn mel(&self) -> Option<&MelConfig> {
        self.features.as_ref().map(|f| &f.mel)
    }

    /// Writes frame `frame` of file `i`'s features into `out` (`bands` values); frames outside
    /// the file read as silence, the features' floor (as the zeros a centred frame reads past
    /// the signal). Does nothing when the corpus has no features.
    pub fn copy_frame(&self, i: usize, frame: isize, out: &mut [f32]) {
        let Some(f) = &self.features else { return };
        let bands = f.mel.bands;
        if frame < 0 || frame as usize >= f.mel.frames(self.files[i].len) {
            out.fill(mel::FLOOR.ln()); // as `Mel::copy_frame`
            return;
        }
        let at = (f.first_frame[i] + frame as usize) * bands * 4;
        for (o, b) in out.iter_mut().zip(f.bytes[at..at + bands * 4].chunks_exact(4)) {
            *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
    }

    /// Each band's mean and standard deviation over every frame of the files `indices` (what
    /// a vocoder standardises its input with); `None` without features.
    pub fn feature_statistics(&self, indices: &[usize]) -> Option<(Vec<f32>, Vec<f32>)> {
        let bands = self.features.as_ref()?.mel.bands;
        let (mut sum, mut squares, mut n) = (vec![0f64; bands], vec![0f64; bands], 0usize);
        let mut frame = vec![0f32; bands];
        for &i in indices {
            for f in 0..self.mel()?.frames(self.files[i].len) {
                self.copy_frame(i, f as isize, &mut frame);
                for ((s, q), &x) in sum.iter_mut().zip(squares.iter_mut()).zip(&frame) {
                    *s += x as f64;
                    *q += (x as f64) * (x as f64);
                }
                n += 1;
            }
        }
        let n = n.max(1) as f64;
        let mean: Vec<f32> = sum.iter().map(|s| (s / n) as f32).collect();
        // A band that never moves (silence, or above the content's bandwidth) gets deviation 1.
        let deviation = sum
            .iter()
            .zip(&squares)
            .map(|(s, q)| {
                let var = (q / n - (s / n) * (s / n)).max(0.0);
                if var > 1e-6 { var.sqrt() as f32 } else { 1.0 }
            })
            .collect();
        Some((mean, deviation))
    }

    /// The codes of file `i`.
    pub fn codes(&self, i: usize) -> &[u8] {
        let f = &self.files[i];
        &self.codes[f.offset..f.offset + f.len]
    }

    /// The default training window for the files `indices`: long windows waste least compute on
    /// each window's receptive-field context (measured: 2 × 8,192 target samples train 1.3×
    /// faster per sample than 8 × 2,048), but a window longer than the files is padding. So the
    /// median file length rounded up to a power of two, from 1,024 to 8,192 (and a batch of
    /// [`SAMPLES_PER_STEP`] / window windows).
    pub fn default_window(&self, indices: &[usize]) -> usize {
        window_for(indices.iter().map(|&i| self.files[i].len).collect())
    }

    /// Total seconds of the files `indices` at `rate`.
    pub fn seconds(&self, indices: &[usize], rate: u32) -> f64 {
        indices.iter().map(|&i| self.files[i].len).sum::<usize>() as f64 / rate as f64
    }

    /// The sorted distinct labels (first-level subfolders) of the files.
    pub fn labels(&self) -> Vec<String> {
        let mut labels: Vec<String> = self.files.iter().filter_map(|f| f.label().map(String::from)).collect();
        labels.sort();
        labels.dedup();
        labels
    }
}

/// The speeds a corpus may be played at: from half to twice as fast.
pub const SPEEDS: std::ops::RangeInclusive<f64> = 0.5..=2.0;

/// Refuses a speed outside [`SPEEDS`].
pub fn check_speed(speed: f64) -> Result<()> {
    if !SPEEDS.contains(&speed) {
        return Err(Error::Config(format!(
            "speed {speed}: a speed perturbation must be from {} to {} (1 is the audio as recorded)",
            SPEEDS.start(),
            SPEEDS.end()
        )));
    }
    Ok(())
}

fn fingerprint(root: &Path, files: &[(String, PathBuf)], settings: &AudioSettings, speed: f64) -> Result<u64> {
    const CACHE_FORMAT: u32 = 2;
    let mut key = format!("v{CACHE_FORMAT} {:?} {}\n", settings, mulaw::MU);
    if speed != 1.0 {
        // (Only then, so that the caches made before speed perturbation stay valid.)
        key.push_str(&format!("speed {speed}\n"));
    }
    key.push_str(&root.canonicalize().unwrap_or_else(|_| root.to_path_buf()).to_string_lossy());
    for (name, path) in files {
        // A file that vanished since the walk is decoded (and dropped) like any unreadable one.
        let (len, mtime) = std::fs::metadata(path).map_or((0, 0), |meta| {
            let mtime = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            (meta.len(), mtime)
        });
        key.push_str(&format!("\n{name} {len} {mtime}"));
    }
    Ok(fnv1a(key.as_bytes()))
}

fn read_index(path: &Path, fingerprint: u64) -> Option<CacheIndex> {
    let bytes = crate::fsutil::read_regular(path, 1 << 30).ok()?;
    let index: CacheIndex = serde_json::from_slice(&bytes).ok()?;
    (index.fingerprint == fingerprint).then_some(index)
}

/// Decodes every file: the index, the codes and (with `mel`) the features' bytes.
fn build(
    found: &WavFiles,
    settings: &AudioSettings,
    mel: Option<&MelConfig>,
    speed: f64,
    fingerprint: u64,
    progress: &mut dyn FnMut(usize, usize),
) -> (CacheIndex, Vec<u8>, Vec<u8>) {
    let mut codes = Vec::new();
    let mut features = Vec::new();
    let mut files = Vec::new();
    let total = found.files.len();
    let mut report =
        ScanReport { found: total + found.skipped.len(), dropped: found.skipped.clone(), ..Default::default() };
    for (i, (name, path)) in found.files.iter().enumerate() {
        progress(i, total);
        let prepared = wav::read_mono(path).map_err(|e| e.to_string()).and_then(|audio| {
            let samples = settings.prepare_at_speed(&audio, speed)?;
            Ok((samples, audio.seconds() / speed))
        });
        match prepared {
            Ok((samples, seconds_in)) => {
                let c = mulaw::encode_all(&samples);
                if let Some(m) = mel {
                    let f = mel::log_mel(&samples, m).expect("invariant: the analysis was validated");
                    features.extend(f.values.iter().flat_map(|x| x.to_le_bytes()));
                }
                let seconds_kept = c.len() as f64 / settings.sample_rate as f64;
                let trimmed_seconds = (seconds_in - seconds_kept).max(0.0);
                report.kept_seconds += seconds_kept;
                report.trimmed_seconds += trimmed_seconds;
                files.push(CorpusFile { name: name.clone(), offset: codes.len(), len: c.len(), trimmed_seconds });
                codes.extend_from_slice(&c);
            }
            Err(why) => report.dropped.push((name.clone(), why)),
        }
    }
    progress(total, total);
    (CacheIndex { fingerprint, files, report }, codes, features)
}

/// Splits file names into (train, validation) indices: the validation files are the
/// `max(1, round(fraction · n))` names with the smallest stable hash, so the split depends
/// only on the names, not on their order or on the machine.
pub fn split_by_name(names: &[&str], fraction: f64) -> Result<(Vec<usize>, Vec<usize>)> {
    if !(0.0..1.0).contains(&fraction) {
        return Err(Error::Config(format!("--val-fraction must be in [0, 1), got {fraction}")));
    }
    if names.len() < 2 {
        return Err(Error::Config(format!(
            "{} usable file(s): a validation split needs at least 2 files (or pass --val-dir)",
            names.len()
        )));
    }
    let n_val = ((fraction * names.len() as f64).round() as usize).clamp(1, names.len() - 1);
    let mut order: Vec<usize> = (0..names.len()).collect();
    order.sort_by_key(|&i| (fnv1a(names[i].as_bytes()), i));
    let mut val: Vec<usize> = order[..n_val].to_vec();
    let mut train: Vec<usize> = order[n_val..].to_vec();
    val.sort();
    train.sort();
    Ok((train, val))
}

/// The share of training windows that start at a file's first sample, when the file is longer
/// than a window. Generation starts from silence, so the model must learn how a file begins after
/// silence; but uniform starts show it that almost never (in music pieces of 1.5M samples, one
/// window in 360 has a 4,096-sample receptive field reaching before the file), and a model trained
/// so stayed silent when sampled from silence.
pub const OPENING_SHARE: usize = 8;

/// The first target position of a training window of `window` samples in a file of `len`:
/// the file's start for one window in [`OPENING_SHARE`], otherwise uniform over the file.
fn draw_start(len: usize, window: usize, rng: &mut Rng) -> usize {
    let last = len.saturating_sub(window);
    if last == 0 || rng.below(OPENING_SHARE) == 0 { 0 } else { rng.below(last + 1) }
}

/// Target samples per training step when the window is chosen for the data.
pub const SAMPLES_PER_STEP: usize = 16_384;

/// [`Corpus::default_window`] for files of these lengths.
fn window_for(mut lengths: Vec<usize>) -> usize {
    lengths.sort_unstable();
    let median = lengths.get(lengths.len() / 2).copied().unwrap_or(0);
    median.next_power_of_two().clamp(1024, 8192)
}

/// A window of `context + len` tokens whose targets start at position `start` of `codes`:
/// positions before the file are the silence code (generation starts from silence too) and
/// count nowhere; positions past its end are padding and masked out.
pub fn window(codes: &[u8], start: usize, context: usize, len: usize) -> (Vec<u32>, Vec<f32>) {
    let silence = mulaw::silence() as u32;
    let mut tokens = Vec::with_capacity(context + len);
    let mut mask = Vec::with_capacity(context + len);
    for i in 0..context + len {
        let p = (start + i).checked_sub(context);
        let code = p.and_then(|p| codes.get(p));
        tokens.push(code.map_or(silence, |&c| c as u32));
        mask.push(if i >= context && code.is_some() { 1.0 } else { 0.0 });
    }
    (tokens, mask)
}

/// The left context of a window for a model that sees `receptive_field` samples: a vocoder's
/// windows start on frame boundaries of `hop`, so its context is rounded up to whole frames.
pub fn frame_context(receptive_field: usize, hop: Option<usize>) -> usize {
    hop.map_or(receptive_field, |h| receptive_field.div_ceil(h) * h)
}

/// Appends a vocoder's features for a window of `len` positions whose first is sample
/// `first_sample` of its file (negative before it; a multiple of `hop`), for a frame network
/// that reads `context` frames on either side: frames −context … ⌈len / hop⌉ − 1 + context of
/// the window, `(rows, bands)` flat, `frame(f, row)` writing frame f of the file.
pub fn window_frames(
    first_sample: isize,
    len: usize,
    (hop, context): (usize, usize),
    bands: usize,
    mut frame: impl FnMut(isize, &mut [f32]),
    out: &mut Vec<f32>,
) {
    let first = first_sample.div_euclid(hop as isize) - context as isize;
    let at = out.len();
    out.resize(at + (len.div_ceil(hop) + 2 * context) * bands, 0.0);
    for (r, row) in out[at..].chunks_exact_mut(bands).enumerate() {
        frame(first + r as isize, row);
    }
}

/// Training and validation windows drawn from a corpus (or from two: `--val-dir`), the training
/// windows also from speed-perturbed copies of the training files.
pub struct AudioBatches<'a> {
    /// Every training file, as (corpus, index in it): the training files, then their copies.
    train: Vec<(&'a Corpus, usize)>,
    /// Cumulative lengths of the training files, for drawing a file in proportion to its length.
    cumulative: Vec<usize>,
    val: &'a Corpus,
    val_files: Vec<usize>,
    /// Left context of every window: the model's receptive field.
    pub context: usize,
    /// Target positions per window.
    pub window: usize,
    /// Windows per training batch.
    pub batch_size: usize,
    /// At most this many validation windows, spread evenly over the validation files.
    pub max_val_windows: usize,
    /// The label index of each entry of `train` and of each file of `val`, when the model is
    /// conditioned.
    labels: Option<(Vec<u32>, Vec<u32>)>,
    /// For a vocoder (a corpus with features): the samples per frame. Windows then start on a
    /// frame boundary and carry their frames.
    hop: Option<usize>,
    /// The frames a vocoder's frame network reads on either side of each frame (1 unless
    /// [`AudioBatches::frame_context`] says otherwise).
    frame_context: usize,
}

impl<'a> AudioBatches<'a> {
    /// Batches of `batch_size` windows of `context + window` codes. Training windows are drawn
    /// from the files `train_files` of `train` and from the files of the same names in each of
    /// `copies` (the training folder at other speeds; never the validation files).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        train: &'a Corpus,
        train_files: Vec<usize>,
        copies: &[&'a Corpus],
        val: &'a Corpus,
        val_files: Vec<usize>,
        context: usize,
        window: usize,
        batch_size: usize,
        max_val_windows: usize,
        label_names: Option<&[String]>,
    ) -> Result<Self> {
        let mut entries: Vec<(&Corpus, usize)> = train_files.iter().map(|&i| (train, i)).collect();
        for &copy in copies {
            if copy.mel() != train.mel() {
                return Err(Error::Config("a speed-perturbed copy must have the training corpus's features".into()));
            }
            let index: std::collections::HashMap<&str, usize> =
                copy.files.iter().enumerate().map(|(i, f)| (f.name.as_str(), i)).collect();
            // A file the copy dropped (too short once sped up) is simply not drawn from it.
            entries.extend(
                train_files.iter().filter_map(|&i| index.get(train.files[i].name.as_str())).map(|&i| (copy, i)),
            );
        }
        let mut total = 0;
        let cumulative = entries
            .iter()
            .map(|&(c, i)| {
                total += c.files[i].len;
                total
            })
            .collect();
        let labels = match label_names {
            None => None,
            Some(names) => {
                let of_entries =
                    entries.iter().map(|&(c, i)| label_index(&c.files[i], names)).collect::<Result<Vec<u32>>>()?;
                Some((of_entries, label_indices(val, names)?))
            }
        };
        let hop = train.mel().map(|m| m.hop);
        if let Some(hop) = hop.filter(|&h| !window.is_multiple_of(h)) {
            return Err(Error::Config(format!(
                "a vocoder's windows must be whole frames: --window {window} is not a multiple of the hop {hop}"
            )));
        }
        if val.mel() != train.mel() {
            return Err(Error::Config("the validation corpus must have the training corpus's features".into()));
        }
        let context = frame_context(context, hop);
        Ok(AudioBatches {
            train: entries,
            cumulative,
            val,
            val_files,
            context,
            window,
            batch_size,
            max_val_windows,
            labels,
            hop,
            frame_context: 1,
        })
    }

    /// Windows that carry `c` extra frames on either side, for a frame network that reads them.
    pub fn frame_context(self, c: usize) -> Self {
        AudioBatches { frame_context: c, ..self }
    }

    /// The features of the window of `context + window` positions whose targets start at
    /// `start` of file `i`: frames −c … ⌈len / hop⌉ − 1 + c of the window (c the frame
    /// context), `(rows, bands)` flat.
    fn window_features(&self, corpus: &Corpus, i: usize, start: usize, out: &mut Vec<f32>) {
        let (Some(hop), Some(mel)) = (self.hop, corpus.mel()) else { return };
        let first_sample = start as isize - self.context as isize;
        window_frames(
            first_sample,
            self.context + self.window,
            (hop, self.frame_context),
            mel.bands,
            |f, row| corpus.copy_frame(i, f, row),
            out,
        );
    }

    /// The batch of these rows, with their features (for a vocoder).
    fn batch(
        &self,
        tokens: &[Vec<u32>],
        mask: &[Vec<f32>],
        labels: Option<Vec<u32>>,
        feats: Vec<f32>,
    ) -> Result<Batch> {
        let mut batch = Batch::from_rows(tokens, mask, labels, &Device::Cpu)?;
        if let Some(bands) = self.val.mel().map(|m| m.bands).filter(|_| self.hop.is_some()) {
            let rows = feats.len() / (bands * tokens.len().max(1));
            batch.features = Some(candle_core::Tensor::from_vec(feats, (tokens.len(), rows, bands), &Device::Cpu)?);
        }
        Ok(batch)
    }

    /// All validation windows (file index, target start), before capping.
    fn all_val_windows(&self) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for &f in &self.val_files {
            let mut start = 0;
            while start < self.val.files[f].len {
                out.push((f, start));
                start += self.window;
            }
        }
        out
    }
}

fn label_indices(corpus: &Corpus, names: &[String]) -> Result<Vec<u32>> {
    corpus.files.iter().map(|f| label_index(f, names)).collect()
}

/// The index in `names` of the file's label.
fn label_index(f: &CorpusFile, names: &[String]) -> Result<u32> {
    let label = f.label().ok_or_else(|| {
        Error::Config(format!(
            "{}: not in a subfolder, so it has no label (conditioning needs one subfolder per label)",
            f.name
        ))
    })?;
    names
        .iter()
        .position(|n| n == label)
        .map(|i| i as u32)
        .ok_or_else(|| Error::Config(format!("{}: label {label:?} is not one of the model's labels {names:?}", f.name)))
}

impl BatchSource for AudioBatches<'_> {
    fn train_batch(&mut self, rng: &mut Rng) -> Result<Batch> {
        let total = *self.cumulative.last().expect("invariant: at least one training file");
        let (mut tokens, mut mask, mut labels, mut feats) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..self.batch_size {
            let pos = rng.below(total);
            let k = self.cumulative.partition_point(|&c| c <= pos);
            let (corpus, file) = self.train[k];
            let start = draw_start(corpus.files[file].len, self.window, rng);
            let start = self.hop.map_or(start, |h| start / h * h); // a vocoder's: on a frame boundary
            let (t, m) = window(corpus.codes(file), start, self.context, self.window);
            tokens.push(t);
            mask.push(m);
            self.window_features(corpus, file, start, &mut feats);
            if let Some((train_labels, _)) = &self.labels {
                labels.push(train_labels[k]);
            }
        }
        self.batch(&tokens, &mask, self.labels.as_ref().map(|_| labels), feats)
    }

    fn val_batches(&self) -> Result<Vec<Batch>> {
        let all = self.all_val_windows();
        let n = all.len().min(self.max_val_windows);
        // Evenly spaced picks, so a capped validation set still covers every part of the files.
        let picks: Vec<(usize, usize)> = (0..n).map(|i| all[i * all.len() / n]).collect();
        picks
            .chunks(self.batch_size)
            .map(|chunk| {
                let (tokens, mask): (Vec<_>, Vec<_>) =
                    chunk.iter().map(|&(f, s)| window(self.val.codes(f), s, self.context, self.window)).unzip();
                let labels =
                    self.labels.as_ref().map(|(_, val_labels)| chunk.iter().map(|&(f, _)| val_labels[f]).collect());
                let mut feats = Vec::new();
                for &(f, s) in chunk {
                    self.window_features(self.val, f, s, &mut feats);
                }
                self.batch(&tokens, &mask, labels, feats)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_window_fits_the_files() {
        // Spoken digits at 8 kHz (median 3,260 samples), music pieces, clicks.
        assert_eq!(window_for(vec![2100, 3260, 3900, 5000, 2900]), 4096);
        assert_eq!(window_for(vec![16000 * 90, 16000 * 120]), 8192);
        assert_eq!(window_for(vec![200, 300, 90]), 1024);
        assert_eq!(window_for(vec![]), 1024);
    }

    /// Sign changes per sample: twice the frequency of a tone, over the rate.
    fn crossings_per_sample(x: &[f32]) -> f64 {
        x.windows(2).filter(|w| (w[0] < 0.0) != (w[1] < 0.0)).count() as f64 / x.len() as f64
    }

    #[test]
    fn speed_perturbed_copies_scale_pitch_and_length_and_add_only_training_files() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("tones");
        std::fs::create_dir(&data).unwrap();
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: 8000,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        for (i, freq) in [200.0f64, 300.0, 400.0, 500.0].into_iter().enumerate() {
            let mut w = hound::WavWriter::create(data.join(format!("t{i}.wav")), spec).unwrap();
            for n in 0..4000 {
                w.write_sample((16000.0 * (std::f64::consts::TAU * freq * n as f64 / 8000.0).sin()) as i16).unwrap();
            }
            w.finalize().unwrap();
        }
        let settings = AudioSettings { sample_rate: 8000, ..AudioSettings::default() };
        let cache = dir.path().join("cache");
        let mut decoded = 0;
        let mut open = |speed| {
            Corpus::open_at_speed(&data, &settings, None, speed, &cache, &mut |done, _| decoded += done.min(1)).unwrap()
        };
        let (plain, fast, slow) = (open(1.0), open(1.25), open(0.8));
        let (plain_again, fast_again) = (open(1.0), open(1.25));
        assert_eq!(decoded, 3 * 4, "each speed decoded once, then read from its own cache");
        assert_eq!((plain_again.codes(2), fast_again.codes(2)), (plain.codes(2), fast.codes(2)));
        assert_ne!(plain.codes(2), fast.codes(2));
        assert!(Corpus::open_at_speed(&data, &settings, None, 3.0, &cache, &mut |_, _| {}).is_err());

        for (copy, speed) in [(&fast, 1.25), (&slow, 0.8)] {
            for i in 0..4 {
                let (a, b) = (plain.files[i].len as f64, copy.files[i].len as f64);
                assert!((b - a / speed).abs() <= 2.0, "speed {speed}, file {i}: {b} samples from {a}");
                let pitch = crossings_per_sample(&mulaw::decode_all(copy.codes(i)))
                    / crossings_per_sample(&mulaw::decode_all(plain.codes(i)));
                assert!((pitch / speed - 1.0).abs() < 0.02, "speed {speed}, file {i}: pitch × {pitch}");
            }
        }

        // File 1 is held out: the copies add the other three, and nothing of file 1.
        let batches =
            AudioBatches::new(&plain, vec![0, 2, 3], &[&fast, &slow], &plain, vec![1], 0, 256, 4, 8, None).unwrap();
        let speed_of = |c: &Corpus| {
            [(&plain, 1.0), (&fast, 1.25), (&slow, 0.8)].iter().find(|(k, _)| std::ptr::eq(*k, c)).unwrap().1
        };
        let mut drawn: Vec<(String, f64)> =
            batches.train.iter().map(|&(c, i)| (c.files[i].name.clone(), speed_of(c))).collect();
        drawn.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let want: Vec<(String, f64)> =
            ["t0.wav", "t2.wav", "t3.wav"].iter().flat_map(|n| [0.8, 1.0, 1.25].map(|s| (n.to_string(), s))).collect();
        assert_eq!(drawn, want);
        assert_eq!(
            *batches.cumulative.last().unwrap(),
            batches.train.iter().map(|&(c, i)| c.files[i].len).sum::<usize>()
        );
    }

    #[test]
    fn one_window_in_opening_share_starts_at_the_file_start() {
        let mut rng = Rng::new(7);
        let starts: Vec<usize> = (0..8000).map(|_| draw_start(100_000, 8192, &mut rng)).collect();
        assert!(starts.iter().all(|&s| s <= 100_000 - 8192));
        let openings = starts.iter().filter(|&&s| s == 0).count();
        assert!((800..1200).contains(&openings), "{openings} of 8000 windows start at 0");
        assert!(starts.iter().filter(|&&s| s > 50_000).count() > 3000, "the rest spread over the file");
        // A file no longer than the window always starts at 0.
        assert_eq!(draw_start(5000, 8192, &mut rng), 0);
    }

    #[test]
    fn window_pads_with_silence_and_masks_context_and_padding() {
        let codes = [10u8, 11, 12];
        let (t, m) = window(&codes, 0, 2, 4);
        let s = mulaw::silence() as u32;
        assert_eq!(t, vec![s, s, 10, 11, 12, s]);
        assert_eq!(m, vec![0.0, 0.0, 1.0, 1.0, 1.0, 0.0]);
        let (t, m) = window(&codes, 2, 2, 1);
        assert_eq!(t, vec![10, 11, 12]);
        assert_eq!(m, vec![0.0, 0.0, 1.0]);
    }

    #[test]
    fn split_is_deterministic_disjoint_and_order_free() {
        let names: Vec<String> = (0..100).map(|i| format!("f{i}.wav")).collect();
        let refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
        let (train, val) = split_by_name(&refs, 0.05).unwrap();
        assert_eq!(val.len(), 5);
        assert_eq!(train.len() + val.len(), 100);
        assert!(val.iter().all(|v| !train.contains(v)));
        let mut reversed = refs.clone();
        reversed.reverse();
        let (_, val_rev) = split_by_name(&reversed, 0.05).unwrap();
        let a: Vec<&str> = val.iter().map(|&i| refs[i]).collect();
        let mut b: Vec<&str> = val_rev.iter().map(|&i| reversed[i]).collect();
        b.sort();
        assert_eq!(a, b);
        assert_eq!(split_by_name(&refs[..2], 0.0).unwrap().1.len(), 1, "at least one validation file");
        assert!(split_by_name(&refs[..1], 0.05).is_err());
    }
}
