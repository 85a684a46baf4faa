//! `wavegen data fetch` without the internet: a small HTTP server on 127.0.0.1 serves fixture
//! files, and cuts a transfer short, serves damaged content or answers 404 on request. The
//! ignored test fetches every real dataset from a mirror made of `WAVEGEN_DATA`.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};

use wavegen::core::checkpoint::sha256_hex;
use wavegen::tasks::Silent;
use wavegen::tasks::fetch::{Dataset, FetchOptions, IdxFile, Source, Status, fetch_dataset};

/// How the server answers one path.
#[derive(Clone)]
enum Reply {
    /// The content, honouring `Range: bytes=N-`.
    File(Vec<u8>),
    /// The first time, the headers of the whole file but only its first half, then the
    /// connection closes; afterwards as `File`.
    CutOnce(Vec<u8>),
}

/// The requests a server saw: (path, Range header).
type RequestLog = Arc<Mutex<Vec<(String, Option<String>)>>>;

struct Server {
    base: String,
    log: RequestLog,
}

fn serve(routes: HashMap<String, Reply>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let log = Arc::new(Mutex::new(Vec::new()));
    let seen = log.clone();
    let routes = Arc::new(Mutex::new(routes));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            if reader.read_line(&mut request).is_err() {
                continue;
            }
            let path = request.split_whitespace().nth(1).unwrap_or("/").trim_start_matches('/').to_string();
            let mut range = None;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    range = v.trim().trim_end_matches('-').parse::<usize>().ok();
                }
            }
            seen.lock().unwrap().push((path.clone(), range.map(|r| format!("bytes={r}-"))));
            let reply = routes.lock().unwrap().get(&path).cloned();
            let _ = match reply {
                None => stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
                Some(Reply::CutOnce(body)) => {
                    routes.lock().unwrap().insert(path, Reply::File(body.clone()));
                    let head =
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                    stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(&body[..body.len() / 2]))
                }
                Some(Reply::File(body)) => {
                    let from = range.unwrap_or(0).min(body.len());
                    let status = if range.is_some() { "206 Partial Content" } else { "200 OK" };
                    let head = format!(
                        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len() - from
                    );
                    stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(&body[from..]))
                }
            };
        }
    });
    Server { base, log }
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

fn inflate(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap()).read_to_end(&mut out).unwrap();
    out
}

/// A dataset of the fixture MNIST test images (as served: gzip IDX) and a second file.
fn tiny_dataset(images: &[u8], labels: &[u8]) -> Dataset {
    let files = vec![
        IdxFile {
            urls: &["https://example.invalid/tiny/images.gz"],
            file: "tiny/images-idx3-ubyte.gz",
            sha256: leak(sha256_hex(images)),
        },
        IdxFile {
            urls: &["https://example.invalid/tiny/labels.gz"],
            file: "tiny/labels-idx1-ubyte.gz",
            sha256: leak(sha256_hex(labels)),
        },
    ];
    Dataset { name: "tiny", about: "test", source: Source::Idx(Box::leak(files.into_boxed_slice())) }
}

#[test]
fn fetch_resumes_verifies_and_places_files_whole() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mnist");
    let images = inflate(&fixtures.join("t10k-images-idx3-ubyte.gz"));
    let labels = inflate(&fixtures.join("t10k-labels-idx1-ubyte.gz"));
    let set = tiny_dataset(&images, &labels);
    let server = serve(HashMap::from([
        ("images.gz".to_string(), Reply::CutOnce(gzip(&images))),
        ("labels.gz".to_string(), Reply::File(gzip(&labels))),
    ]));
    let dir = tempfile::tempdir().unwrap();
    let opts = FetchOptions { mirror: Some(server.base.clone()) };

    // The first transfer breaks off half-way: an error that says to run again, a partial
    // file, nothing under the final name.
    let err = fetch_dataset(&set, dir.path(), &opts, &mut Silent).unwrap_err().to_string();
    assert!(err.contains("broke off") || err.contains("run the command again"), "{err}");
    let final_name = dir.path().join("tiny/images-idx3-ubyte.gz");
    assert!(!final_name.exists());
    let part = dir.path().join("tiny/.images-idx3-ubyte.gz.part");
    let half = std::fs::metadata(&part).unwrap().len();
    assert!(half > 0);
    assert!(matches!(set.status(dir.path()), Status::Missing));

    // Again: it resumes where it stopped (a Range request), checks and places both files.
    let report = fetch_dataset(&set, dir.path(), &opts, &mut Silent).unwrap();
    assert_eq!((report.fetched, report.already_present), (2, 0));
    assert!(server.log.lock().unwrap().contains(&("images.gz".into(), Some(format!("bytes={half}-")))));
    assert_eq!(inflate(&final_name), images);
    assert!(!part.exists());
    assert_eq!(set.status(dir.path()), Status::Present { files: 2 });
    let loaded = wavegen::data::mnist::read_idx(&final_name).unwrap();
    assert_eq!(loaded.dims, vec![100, 28, 28]);

    // A third time: nothing to do.
    let report = fetch_dataset(&set, dir.path(), &opts, &mut Silent).unwrap();
    assert_eq!((report.fetched, report.already_present), (0, 2));

    // A damaged file on disk is reported, and fetched again.
    std::fs::write(&final_name, gzip(b"garbage")).unwrap();
    assert!(matches!(set.status(dir.path()), Status::Incomplete { ref corrupt, .. } if corrupt.len() == 1));
    assert_eq!(fetch_dataset(&set, dir.path(), &opts, &mut Silent).unwrap().fetched, 1);
}

#[test]
fn wrong_content_and_missing_files_are_clear_errors() {
    let set = tiny_dataset(b"the real images", b"the real labels");
    let server = serve(HashMap::from([("images.gz".to_string(), Reply::File(gzip(b"something else")))]));
    let dir = tempfile::tempdir().unwrap();
    let opts = FetchOptions { mirror: Some(server.base.clone()) };
    let err = fetch_dataset(&set, dir.path(), &opts, &mut Silent).unwrap_err().to_string();
    assert!(err.contains("images-idx3-ubyte.gz") && err.contains("SHA-256"), "{err}");
    assert!(!dir.path().join("tiny/images-idx3-ubyte.gz").exists());
    assert!(!dir.path().join("tiny/.images-idx3-ubyte.gz.part").exists(), "a damaged download is not resumed");

    // 404, through the command line, with the real catalogue and the local server as mirror.
    let out = common::wavegen(
        &["data", "fetch", "mnist", "--data", dir.path().to_str().unwrap(), "--mirror", &server.base],
        dir.path(),
    );
    let line = common::error_line(&out);
    assert!(line.contains("train-images-idx3-ubyte.gz") && line.contains("404"), "{line}");
    // Nothing listening: says to check the network.
    let out = common::wavegen(
        &["data", "fetch", "fsdd", "--data", dir.path().to_str().unwrap(), "--mirror", "http://127.0.0.1:9"],
        dir.path(),
    );
    assert!(common::error_line(&out).contains("network"), "{}", String::from_utf8_lossy(&out.stderr));
    // An unknown name is refused before anything is downloaded; music16k says how to render it.
    let out = common::wavegen(&["data", "fetch", "cifar10"], dir.path());
    assert!(common::error_line(&out).contains("fsdd, mnist, binarized_mnist, music16k"));
    let out = common::wavegen(&["data", "fetch", "music16k", "--data", dir.path().to_str().unwrap()], dir.path());
    assert!(common::error_line(&out).contains("render-music16k.sh"));
}

/// The real datasets of `WAVEGEN_DATA`, served as their public sources publish them: MNIST as
/// gzip files, binarized MNIST as `.amat` text, FSDD as the v1.0.10 release archive.
#[test]
#[ignore = "needs the full datasets in WAVEGEN_DATA (about 20 s)"]
fn every_dataset_fetches_from_a_mirror_of_the_real_files() {
    let data = std::path::PathBuf::from(std::env::var_os("WAVEGEN_DATA").expect("WAVEGEN_DATA"));
    let mut routes = HashMap::new();
    for f in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    {
        routes.insert(format!("{f}.gz"), Reply::File(std::fs::read(data.join(format!("mnist/{f}.gz"))).unwrap()));
    }
    for split in ["train", "valid", "test"] {
        let idx = inflate(&data.join(format!("binarized_mnist/binarized_mnist_{split}-images-idx3-ubyte.gz")));
        let mut amat = String::new();
        for image in idx[16..].chunks(784) {
            let line: Vec<&str> = image.iter().map(|&p| if p == 1 { "1" } else { "0" }).collect();
            amat.push_str(&line.join(" "));
            amat.push('\n');
        }
        let amat = amat.into_bytes();
        let reply = if split == "train" { Reply::CutOnce(amat) } else { Reply::File(amat) };
        routes.insert(format!("binarized_mnist_{split}.amat"), reply);
    }
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    tar.append_dir_all("free-spoken-digit-dataset-1.0.10/recordings", data.join("fsdd/recordings")).unwrap();
    routes.insert("v1.0.10.tar.gz".into(), Reply::File(tar.into_inner().unwrap().finish().unwrap()));
    let server = serve(routes);

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let fetch = common::wavegen(&["data", "fetch", "--data", d, "--mirror", &server.base], dir.path());
    assert!(!fetch.status.success(), "the first .amat transfer is cut short");
    let fetch = common::wavegen(&["data", "fetch", "--data", d, "--mirror", &server.base], dir.path());
    assert!(fetch.status.success(), "{}", String::from_utf8_lossy(&fetch.stderr));
    let list = common::json(&common::wavegen(&["data", "list", "--data", d, "--json"], dir.path()));
    for name in ["fsdd", "mnist", "binarized_mnist"] {
        assert_eq!(list["datasets"][name]["state"], "present", "{name}: {list}");
    }
    assert_eq!(list["datasets"]["music16k"]["state"], "missing");
}
