//! 2-D float arrays in NumPy's `.npy` format (version 1.0: the magic `\x93NUMPY`, the version
//! bytes, a little-endian u16 header length, an ASCII dict `{'descr': '<f4', 'fortran_order':
//! False, 'shape': (R, C), }` padded with spaces to a multiple of 64 bytes and ending in a
//! newline, then the data row-major). This is how TTS tools exchange mel spectrograms. Reading
//! also takes version 2.0 and 3.0 headers, f8 data and Fortran order; anything else is refused
//! with what was found.

use std::path::Path;

use crate::fsutil::{read_regular, write_bytes_atomically};
use crate::{Error, Result};

const MAGIC: &[u8] = b"\x93NUMPY";
/// The largest file read: 2 GiB.
const MAX_BYTES: u64 = 2 << 30;

/// A 2-D array of f32, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Array2 {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// `rows × cols` values, row after row.
    pub values: Vec<f32>,
}

/// The bytes of `a` as a version 1.0 `.npy` file of little-endian f32.
pub fn encode(a: &Array2) -> Vec<u8> {
    let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {}), }}", a.rows, a.cols);
    // magic (6) + version (2) + length (2) + dict + padding + newline: a multiple of 64.
    let unpadded = MAGIC.len() + 4 + dict.len() + 1;
    let header_len = dict.len() + 1 + (64 - unpadded % 64) % 64;
    let mut bytes = Vec::with_capacity(10 + header_len + 4 * a.values.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&[1, 0]);
    bytes.extend_from_slice(&(header_len as u16).to_le_bytes());
    bytes.extend_from_slice(dict.as_bytes());
    bytes.resize(10 + header_len - 1, b' ');
    bytes.push(b'\n');
    for v in &a.values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    bytes
}

/// Writes `a` to `path` as a whole (atomically).
pub fn write(path: &Path, a: &Array2) -> Result<()> {
    write_bytes_atomically(path, &encode(a))
}

/// Reads a 2-D float array from `path`.
pub fn read(path: &Path) -> Result<Array2> {
    decode(&read_regular(path, MAX_BYTES)?).map_err(|reason| Error::io(path, std::io::Error::other(reason)))
}

/// The value of `key` in a header dict, as written (up to the next top-level comma or brace).
fn field<'a>(dict: &'a str, key: &str) -> Option<&'a str> {
    let at = dict.find(&format!("'{key}'")).or_else(|| dict.find(&format!("\"{key}\"")))?;
    let rest = dict[at + key.len() + 2..].trim_start().strip_prefix(':')?.trim_start();
    let end = if rest.starts_with('(') { rest.find(')')? + 1 } else { rest.find([',', '}'])? };
    Some(rest[..end].trim())
}

/// Parses `.npy` bytes; the error says what is wrong.
pub fn decode(bytes: &[u8]) -> std::result::Result<Array2, String> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err("not a .npy file (no \\x93NUMPY magic)".into());
    }
    let (len_bytes, start) = match bytes[6] {
        1 => (2, 10),
        2 | 3 => (4, 12),
        v => return Err(format!(".npy version {v}.{}, expected 1, 2 or 3", bytes[7])),
    };
    if bytes.len() < start {
        return Err("a truncated .npy header".into());
    }
    let header_len = if len_bytes == 2 {
        u16::from_le_bytes([bytes[8], bytes[9]]) as usize
    } else {
        u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize
    };
    let data_at = start + header_len;
    let dict = bytes.get(start..data_at).ok_or("a truncated .npy header")?;
    let dict = std::str::from_utf8(dict).map_err(|_| "a .npy header that is not text")?;
    let descr = field(dict, "descr").ok_or("no 'descr' in the .npy header")?.trim_matches(['\'', '"']);
    let fortran = match field(dict, "fortran_order") {
        Some("False") => false,
        Some("True") => true,
        other => return Err(format!("'fortran_order' is {other:?} in the .npy header")),
    };
    let shape = field(dict, "shape").ok_or("no 'shape' in the .npy header")?;
    let dims: Vec<usize> = shape
        .trim_matches(['(', ')'])
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| format!("shape {shape} in the .npy header")))
        .collect::<std::result::Result<_, _>>()?;
    let [rows, cols] = dims[..] else {
        return Err(format!("an array of shape {shape}; features are 2-D (frames, bands)"));
    };
    let size = match descr {
        "<f4" | "=f4" => 4,
        "<f8" | "=f8" => 8,
        other => return Err(format!("values of type {other}; expected little-endian float32 or float64 (<f4, <f8)")),
    };
    let count = rows.checked_mul(cols).ok_or("a shape too large")?;
    let data = &bytes[data_at..];
    if data.len() != count * size {
        return Err(format!("{} bytes of data for shape ({rows}, {cols}) of {descr}", data.len()));
    }
    let read: Vec<f32> = if size == 4 {
        data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    } else {
        data.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("invariant: 8 bytes")) as f32).collect()
    };
    let values = if fortran { (0..count).map(|i| read[(i % cols) * rows + i / cols]).collect() } else { read };
    Ok(Array2 { rows, cols, values })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_round_trip_and_the_header_is_numpys() {
        let a = Array2 { rows: 3, cols: 2, values: vec![1.0, -2.5, 0.0, f32::MAX, 1e-30, 7.0] };
        let bytes = encode(&a);
        // The header, byte for byte as numpy 1.x/2.x writes it: 118 bytes of dict and padding.
        let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), }";
        assert_eq!(&bytes[..10], b"\x93NUMPY\x01\x00\x76\x00");
        assert_eq!(&bytes[10..10 + header.len()], header.as_bytes());
        assert_eq!(bytes[127], b'\n');
        assert_eq!(bytes.len(), 128 + 24);
        assert_eq!(decode(&bytes).unwrap(), a);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mel.npy");
        write(&path, &a).unwrap();
        assert_eq!(read(&path).unwrap(), a);
    }

    /// A file as numpy writes `np.arange(6, dtype='<f8').reshape(2, 3, order='F')` with
    /// `np.save` (Fortran order, float64), built here byte by byte.
    #[test]
    fn float64_fortran_order_files_are_read() {
        let dict = "{'descr': '<f8', 'fortran_order': True, 'shape': (2, 3), }";
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        let header_len = 128 - 10;
        bytes.extend_from_slice(&(header_len as u16).to_le_bytes());
        bytes.extend_from_slice(dict.as_bytes());
        bytes.resize(127, b' ');
        bytes.push(b'\n');
        // Column-major: a[0,0], a[1,0], a[0,1], a[1,1], a[0,2], a[1,2] = 0, 1, 2, 3, 4, 5.
        for v in 0..6 {
            bytes.extend_from_slice(&(v as f64).to_le_bytes());
        }
        let a = decode(&bytes).unwrap();
        assert_eq!((a.rows, a.cols), (2, 3));
        assert_eq!(a.values, vec![0.0, 2.0, 4.0, 1.0, 3.0, 5.0]);
    }

    #[test]
    fn broken_files_are_refused_with_the_reason() {
        let good = encode(&Array2 { rows: 2, cols: 2, values: vec![0.0; 4] });
        let mut cases: Vec<(Vec<u8>, &str)> = vec![
            (b"RIFF....".to_vec(), "magic"),
            (good[..good.len() - 1].to_vec(), "bytes of data"),
            (good[..20].to_vec(), "truncated"),
        ];
        // The header with `from` replaced by `to` (of the same length).
        let swap = |from: &str, to: &str| {
            let at = good.windows(from.len()).position(|w| w == from.as_bytes()).unwrap();
            let mut bytes = good.clone();
            bytes[at..at + to.len()].copy_from_slice(to.as_bytes());
            bytes
        };
        cases.push((swap("'<f4'", "'<i4'"), "type <i4"));
        cases.push((swap("(2, 2)", "(4,)  "), "2-D"));
        for (bytes, why) in cases {
            let err = decode(&bytes).unwrap_err();
            assert!(err.contains(why), "{err:?} does not say {why:?}");
        }
    }
}
