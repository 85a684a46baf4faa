//! `wavegen data fetch` and `wavegen data list`: the datasets, downloaded from their public
//! sources, converted where needed, and checked against SHA-256 sums written here.
//!
//! A download goes to `.NAME.part` beside its destination and resumes from there (an HTTP
//! `Range` request) when it was cut short. Nothing appears under a final name until its content
//! has been checked: a file is renamed into place, an archive's members one by one after each
//! is verified. The sums are of the content the loaders read (the IDX bytes inside a gzip file,
//! each WAV file), so they hold for any mirror that serves the same data.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::Reporter;
use crate::core::checkpoint::sha256_hex;
use crate::{Error, Result};

/// One IDX file of a dataset.
pub struct IdxFile {
    /// Where it is published (tried in order).
    pub urls: &'static [&'static str],
    /// Its path under the data folder (always gzip-compressed IDX).
    pub file: &'static str,
    /// SHA-256 of the uncompressed IDX content.
    pub sha256: &'static str,
}

/// How a dataset is obtained.
pub enum Source {
    /// MNIST-like IDX files, published gzip-compressed.
    Idx(&'static [IdxFile]),
    /// Larochelle's `.amat` text files (one image of 784 0/1 values per line), converted to IDX.
    Amat(&'static [IdxFile]),
    /// A `.tar.gz` archive whose `*/SUBDIR/*.wav` members are the data; each is checked against
    /// the list of sums (`sha256sum` format, paths relative to the dataset folder).
    Archive {
        /// Where it is published (tried in order).
        urls: &'static [&'static str],
        /// The folder of the data inside the archive's top folder (and under the dataset's).
        subdir: &'static str,
        /// `SHA256  SUBDIR/NAME` lines.
        sums: &'static str,
    },
    /// Made on this machine by a script; the sums are those of the reference rendering.
    Rendered {
        /// The script, relative to the repository.
        script: &'static str,
        /// `SHA256  NAME` lines.
        sums: &'static str,
    },
}

/// A dataset wavegen knows.
pub struct Dataset {
    /// Its name on the command line and its folder under the data folder.
    pub name: &'static str,
    /// What it is.
    pub about: &'static str,
    /// How it is obtained.
    pub source: Source,
}

macro_rules! mnist_file {
    ($name:literal, $sha:literal) => {
        IdxFile {
            urls: &[
                concat!("https://ossci-datasets.s3.amazonaws.com/mnist/", $name, ".gz"),
                concat!("https://storage.googleapis.com/cvdf-datasets/mnist/", $name, ".gz"),
                concat!("http://yann.lecun.com/exdb/mnist/", $name, ".gz"),
            ],
            file: concat!("mnist/", $name, ".gz"),
            sha256: $sha,
        }
    };
}

macro_rules! amat_file {
    ($split:literal, $sha:literal) => {
        IdxFile {
            urls: &[concat!(
                "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/binarized_mnist_",
                $split,
                ".amat"
            )],
            file: concat!("binarized_mnist/binarized_mnist_", $split, "-images-idx3-ubyte.gz"),
            sha256: $sha,
        }
    };
}

/// Every dataset, in the order `data list` shows them.
pub const DATASETS: &[Dataset] = &[
    Dataset {
        name: "fsdd",
        about: "Free Spoken Digit Dataset v1.0.10: 3,000 recordings, 8 kHz (CC BY-SA 4.0)",
        source: Source::Archive {
            urls: &["https://github.com/Jakobovski/free-spoken-digit-dataset/archive/refs/tags/v1.0.10.tar.gz"],
            subdir: "recordings",
            sums: include_str!("../../datasets/fsdd.sha256"),
        },
    },
    Dataset {
        name: "mnist",
        about: "MNIST, 60,000 + 10,000 grey images with labels (LeCun, Cortes, Burges)",
        source: Source::Idx(&[
            mnist_file!("train-images-idx3-ubyte", "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
            mnist_file!("train-labels-idx1-ubyte", "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
            mnist_file!("t10k-images-idx3-ubyte", "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
            mnist_file!("t10k-labels-idx1-ubyte", "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
        ]),
    },
    Dataset {
        name: "binarized_mnist",
        about: "static binarized MNIST (Larochelle & Murray 2011), 50,000 / 10,000 / 10,000, from .amat",
        source: Source::Amat(&[
            amat_file!("train", "0eae7dff54784fdce12433da8ed5d8549d4676c91740d78aa0b18fa99a8b96f2"),
            amat_file!("valid", "1b017d51bf2733a6cbde62f26dd36be91c88ab4e95f8de9cdafadcb26fe9a852"),
            amat_file!("test", "491785121c5ff9ffb073809cd7c755a241b9e04052f1cf2ec7c9608a9346e097"),
        ]),
    },
    Dataset {
        name: "music16k",
        about: "16 pieces of the OpenMSX soundtrack rendered with FluidSynth at 16 kHz (GPL-2, MIT)",
        source: Source::Rendered {
            script: "datasets/render-music16k.sh",
            sums: include_str!("../../datasets/music16k.sha256"),
        },
    },
];

/// The dataset called `name`, or an error listing the names.
pub fn dataset(name: &str) -> Result<&'static Dataset> {
    DATASETS.iter().find(|d| d.name == name).ok_or_else(|| {
        let names: Vec<&str> = DATASETS.iter().map(|d| d.name).collect();
        Error::Config(format!("no dataset called {name:?}; wavegen knows {}", names.join(", ")))
    })
}

/// The state of a dataset in a data folder.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum Status {
    /// Every file there, every checksum right.
    Present {
        /// Files checked.
        files: usize,
    },
    /// Nothing there.
    Missing,
    /// Some files missing or wrong.
    Incomplete {
        /// Files missing.
        missing: Vec<String>,
        /// Files whose content differs from the sum.
        corrupt: Vec<String>,
    },
    /// (A rendered set) every file there, but not the reference rendering.
    Different {
        /// Files that differ.
        files: usize,
    },
}

/// The name → SHA-256 of a `sha256sum`-format list.
fn parse_sums(sums: &str) -> BTreeMap<&str, &str> {
    sums.lines().filter_map(|l| l.split_once("  ")).map(|(sum, name)| (name.trim(), sum.trim())).collect()
}

/// SHA-256 of a gzip file's content (or of the file, if it is not gzip), reading at most 1 GiB.
fn content_sha256(path: &Path) -> Result<String> {
    let raw = crate::fsutil::read_regular(path, 1 << 30)?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .take(1 << 30)
            .read_to_end(&mut out)
            .map_err(|e| Error::Dataset { path: path.into(), reason: format!("broken gzip data: {e}") })?;
        Ok(sha256_hex(&out))
    } else {
        Ok(sha256_hex(&raw))
    }
}

impl Dataset {
    /// (path under the data folder, expected SHA-256 of its content) of every file.
    fn expected(&self) -> Vec<(String, &'static str)> {
        match &self.source {
            Source::Idx(files) | Source::Amat(files) => files.iter().map(|f| (f.file.to_string(), f.sha256)).collect(),
            Source::Archive { sums, .. } | Source::Rendered { sums, .. } => {
                parse_sums(sums).into_iter().map(|(name, sum)| (format!("{}/{name}", self.name), sum)).collect()
            }
        }
    }

    /// Checks the dataset's files under `data`.
    pub fn status(&self, data: &Path) -> Status {
        let expected = self.expected();
        let (mut missing, mut corrupt) = (Vec::new(), Vec::new());
        for (file, sum) in &expected {
            let path = data.join(file);
            if !path.exists() {
                missing.push(file.clone());
            } else if content_sha256(&path).ok().as_deref() != Some(*sum) {
                corrupt.push(file.clone());
            }
        }
        match (missing.len(), corrupt.len()) {
            (0, 0) => Status::Present { files: expected.len() },
            (m, _) if m == expected.len() => Status::Missing,
            (0, c) if matches!(self.source, Source::Rendered { .. }) => Status::Different { files: c },
            _ => Status::Incomplete { missing, corrupt },
        }
    }
}

/// Where downloads come from.
#[derive(Debug, Clone, Default)]
pub struct FetchOptions {
    /// Fetch every file from `MIRROR/FILE` (FILE: the last part of its public address) instead
    /// of its public source: a local copy, or a test server.
    pub mirror: Option<String>,
}

/// What a fetch did.
#[derive(Debug, Clone, Serialize)]
pub struct FetchReport {
    /// The dataset.
    pub name: String,
    /// Files written.
    pub fetched: usize,
    /// Files that were there and right already.
    pub already_present: usize,
}

/// Downloads (or finishes) the dataset `name` into `data`.
pub fn fetch(name: &str, data: &Path, opts: &FetchOptions, reporter: &mut dyn Reporter) -> Result<FetchReport> {
    fetch_dataset(dataset(name)?, data, opts, reporter)
}

/// Downloads (or finishes) `set` into `data`.
pub fn fetch_dataset(
    set: &Dataset,
    data: &Path,
    opts: &FetchOptions,
    reporter: &mut dyn Reporter,
) -> Result<FetchReport> {
    let name = set.name;
    let mut report = FetchReport { name: name.into(), fetched: 0, already_present: 0 };
    let urls = |urls: &'static [&'static str]| -> Vec<String> {
        match &opts.mirror {
            Some(m) => vec![format!("{}/{}", m.trim_end_matches('/'), urls[0].rsplit('/').next().unwrap_or_default())],
            None => urls.iter().map(|u| u.to_string()).collect(),
        }
    };
    match &set.source {
        Source::Rendered { script, .. } => Err(Error::Dataset {
            path: data.join(name),
            reason: format!(
                "{name} is rendered on your machine, not downloaded (its MIDI files and soundfont are Debian packages): from the wavegen repository, run `sh {script} {}` (it installs fluidsynth, fluid-soundfont-gm, openttd-openmsx and sox with apt-get if they are missing; about a minute)",
                data.join(name).display()
            ),
        }),
        Source::Idx(files) | Source::Amat(files) => {
            let amat = matches!(set.source, Source::Amat(_));
            for f in files.iter() {
                let dest = data.join(f.file);
                if dest.exists() && content_sha256(&dest).ok().as_deref() == Some(f.sha256) {
                    report.already_present += 1;
                    continue;
                }
                let part = download(&urls(f.urls), &dest, reporter)?;
                let placed =
                    if amat { place_amat(&part, &dest, f.sha256) } else { place_gzip_idx(&part, &dest, f.sha256) };
                placed.inspect_err(|_| {
                    let _ = std::fs::remove_file(&part);
                })?;
                report.fetched += 1;
            }
            Ok(report)
        }
        Source::Archive { urls: sources, subdir, sums } => {
            let sums = parse_sums(sums);
            let folder = data.join(name);
            let wanted: Vec<(&str, &str)> = sums
                .iter()
                .map(|(n, s)| (*n, *s))
                .filter(|(n, s)| content_sha256(&folder.join(n)).ok().as_deref() != Some(*s))
                .collect();
            report.already_present = sums.len() - wanted.len();
            if wanted.is_empty() {
                return Ok(report);
            }
            let archive_name = sources[0].rsplit('/').next().unwrap_or("archive.tar.gz");
            let part = download(&urls(sources), &data.join(format!("{name}-{archive_name}")), reporter)?;
            report.fetched = extract(&part, &folder, subdir, &sums, reporter)?;
            std::fs::remove_file(&part).map_err(|e| Error::io(&part, e))?;
            Ok(report)
        }
    }
}

/// Downloads the first of `urls` that answers into `.NAME.part` beside `dest`, resuming a
/// partial file left by an earlier attempt; returns the partial file's path (complete now).
fn download(urls: &[String], dest: &Path, reporter: &mut dyn Reporter) -> Result<PathBuf> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let part = dir.join(format!(".{name}.part"));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(std::time::Duration::from_secs(20)))
        .timeout_recv_body(Some(std::time::Duration::from_secs(60)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut last_error = None;
    for url in urls {
        match download_one(&agent, url, &part, &name, reporter) {
            Ok(()) => return Ok(part),
            Err(e) => {
                reporter.note(&format!("{url}: {e}"));
                last_error = Some(e);
            }
        }
    }
    Err(last_error.unwrap_or_else(|| Error::Config("no address to download from".into())))
}

fn download_one(agent: &ureq::Agent, url: &str, part: &Path, name: &str, reporter: &mut dyn Reporter) -> Result<()> {
    let have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    let mut request = agent.get(url);
    if have > 0 {
        request = request.header("Range", format!("bytes={have}-"));
    }
    let failed = |reason: String| Error::Dataset { path: PathBuf::from(url), reason };
    let response = request
        .call()
        .map_err(|e| failed(format!("cannot download ({e}): check the network connection, or use --mirror")))?;
    let status = response.status().as_u16();
    let resume = match status {
        206 => true,
        200 => false,
        416 if have > 0 => {
            // The partial file is already as long as the resource (or longer): start again.
            std::fs::remove_file(part).map_err(|e| Error::io(part, e))?;
            return download_one(agent, url, part, name, reporter);
        }
        404 => return Err(failed("404 Not Found: the file is not there any more; try --mirror".into())),
        s => return Err(failed(format!("the server answered HTTP {s}"))),
    };
    let length = response.headers().get("content-length").and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let start = if resume { have } else { 0 };
    let total = length.map(|l| l + start).unwrap_or(0);
    if resume {
        reporter.note(&format!("{name}: resuming at {start} bytes"));
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(resume)
        .write(true)
        .truncate(!resume)
        .open(part)
        .map_err(|e| Error::io(part, e))?;
    let mut body = response.into_body().into_reader();
    let mut buffer = vec![0u8; 1 << 16];
    let mut done = start;
    loop {
        let n = match body.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                // What arrived stays in the partial file: the next run resumes from there.
                file.sync_all().map_err(|e| Error::io(part, e))?;
                return Err(failed(format!(
                    "the transfer broke off after {done} of {total} bytes ({e}); run the command again to resume"
                )));
            }
        };
        file.write_all(&buffer[..n]).map_err(|e| Error::io(part, e))?;
        done += n as u64;
        reporter.progress(&format!("downloading {name}"), done, total.max(done));
    }
    file.sync_all().map_err(|e| Error::io(part, e))?;
    if total > 0 && done != total {
        return Err(failed(format!("got {done} of {total} bytes; run the command again to resume")));
    }
    Ok(())
}

fn wrong_sum(path: &Path, expected: &str, actual: &str) -> Error {
    Error::Dataset {
        path: path.into(),
        reason: format!(
            "the downloaded content has SHA-256 {actual}, not {expected}: it was damaged on the way or the source changed; the partial download was removed, run the command again"
        ),
    }
}

/// Checks a downloaded gzip IDX file and renames it into place.
fn place_gzip_idx(part: &Path, dest: &Path, sha256: &str) -> Result<()> {
    let actual = content_sha256(part)?;
    if actual != sha256 {
        return Err(wrong_sum(dest, sha256, &actual));
    }
    std::fs::rename(part, dest).map_err(|e| Error::io(dest, e))?;
    crate::fsutil::sync_dir(dest.parent().unwrap_or(Path::new(".")));
    Ok(())
}

/// Converts a downloaded `.amat` file (lines of 784 space-separated 0/1 values) to gzip IDX,
/// checks the IDX content and writes it into place.
fn place_amat(part: &Path, dest: &Path, sha256: &str) -> Result<()> {
    let text = crate::fsutil::read_regular(part, 1 << 30)?;
    let bad = |reason: String| Error::Dataset { path: part.into(), reason };
    let mut pixels = Vec::new();
    let mut images = 0u32;
    for (i, line) in text.split(|&b| b == b'\n').enumerate() {
        let values: Vec<&[u8]> = line.split(|b| b.is_ascii_whitespace()).filter(|v| !v.is_empty()).collect();
        if values.is_empty() {
            continue;
        }
        if values.len() != 784 {
            return Err(bad(format!("line {} has {} values, not 784", i + 1, values.len())));
        }
        for v in values {
            pixels.push(match v {
                b"0" => 0,
                b"1" => 1,
                other => {
                    return Err(bad(format!(
                        "line {}: value {:?} is not 0 or 1",
                        i + 1,
                        String::from_utf8_lossy(other)
                    )));
                }
            });
        }
        images += 1;
    }
    let mut idx = vec![0, 0, 0x08, 3];
    for d in [images, 28, 28] {
        idx.extend_from_slice(&d.to_be_bytes());
    }
    idx.extend_from_slice(&pixels);
    let actual = sha256_hex(&idx);
    if actual != sha256 {
        return Err(wrong_sum(dest, sha256, &actual));
    }
    crate::fsutil::write_atomically(dest, |file| {
        let mut gz = flate2::write::GzEncoder::new(std::io::BufWriter::new(file), flate2::Compression::default());
        gz.write_all(&idx)?;
        gz.finish()?.flush()
    })?;
    std::fs::remove_file(part).map_err(|e| Error::io(part, e))
}

/// Extracts the `*/subdir/*.wav` members of a `.tar.gz` archive that the sums list into
/// `folder/subdir/`, each checked before it is renamed into place; fails if any is missing or
/// wrong. Returns the number of files written.
fn extract(
    archive: &Path,
    folder: &Path,
    subdir: &str,
    sums: &BTreeMap<&str, &str>,
    reporter: &mut dyn Reporter,
) -> Result<usize> {
    let (file, _) = crate::fsutil::open_regular(archive)?;
    let target = folder.join(subdir);
    std::fs::create_dir_all(&target).map_err(|e| Error::io(&target, e))?;
    let bad = |reason: String| Error::Dataset { path: archive.into(), reason };
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)));
    let mut written = 0;
    let mut seen = std::collections::BTreeSet::new();
    for entry in tar.entries().map_err(|e| bad(format!("not a readable tar.gz archive: {e}")))? {
        let mut entry = entry.map_err(|e| bad(format!("a damaged archive member: {e}")))?;
        let path = entry.path().map_err(|e| bad(e.to_string()))?.into_owned();
        // `top/subdir/NAME.wav` → `subdir/NAME.wav`, only plain names (no `..`).
        let parts: Vec<String> = path.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
        let [_, dir, file] = parts.as_slice() else { continue };
        if dir != subdir || file.contains('/') || file.starts_with('.') {
            continue;
        }
        let name = format!("{subdir}/{file}");
        let Some(expected) = sums.get(name.as_str()) else { continue };
        let mut bytes = Vec::new();
        (&mut entry).take(1 << 30).read_to_end(&mut bytes).map_err(|e| bad(format!("{name}: {e}")))?;
        let actual = sha256_hex(&bytes);
        if actual != *expected {
            return Err(wrong_sum(&folder.join(&name), expected, &actual));
        }
        crate::fsutil::write_bytes_atomically(&folder.join(&name), &bytes)?;
        seen.insert(name);
        written += 1;
        reporter.progress("extracting", written as u64, sums.len() as u64);
    }
    let missing: Vec<&&str> = sums.keys().filter(|n| !seen.contains(**n) && !folder.join(n).exists()).take(3).collect();
    if !missing.is_empty() {
        return Err(bad(format!("the archive lacks {missing:?} (and perhaps more): the source changed")));
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sum_lists_are_complete() {
        let fsdd = dataset("fsdd").unwrap().expected();
        assert_eq!(fsdd.len(), 3000);
        assert!(fsdd.iter().all(|(n, s)| n.starts_with("fsdd/recordings/") && n.ends_with(".wav") && s.len() == 64));
        assert_eq!(dataset("music16k").unwrap().expected().len(), 16);
        assert_eq!(dataset("mnist").unwrap().expected().len(), 4);
        let unknown = dataset("cifar").err().expect("no such dataset").to_string();
        assert!(unknown.contains("fsdd, mnist, binarized_mnist, music16k"), "{unknown}");
    }

    #[test]
    fn amat_text_becomes_the_idx_it_describes() {
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join(".x.part");
        let line =
            |bit: u8| (0..784).map(|i| if i % 7 == 0 { bit } else { 0 }.to_string()).collect::<Vec<_>>().join(" ");
        std::fs::write(&part, format!("{}\n{}\n", line(1), line(0))).unwrap();
        let mut idx = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 28, 0, 0, 0, 28];
        idx.extend((0..784).map(|i| u8::from(i % 7 == 0)));
        idx.extend(std::iter::repeat_n(0, 784));
        let dest = dir.path().join("out-idx3-ubyte.gz");
        place_amat(&part, &dest, &sha256_hex(&idx)).unwrap();
        assert_eq!(crate::data::mnist::read_idx(&dest).unwrap().dims, vec![2, 28, 28]);
        assert!(!part.exists());
    }
}
