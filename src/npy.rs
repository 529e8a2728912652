//! The `.npy` header, so an array can also be exposed as a file numpy can `np.load` or
//! `np.memmap` directly.
//!
//! The header is reproduced byte for byte as numpy itself writes it (`np.save`), not merely as
//! something numpy can parse. That costs nothing and means a file served by zarrfs is
//! indistinguishable from one numpy saved, so checksums and tools that compare files agree.

use std::fmt::Write as _;

/// `\x93NUMPY` followed by the two version bytes.
const MAGIC_LEN: usize = 8;
/// numpy pads the header so the data starts on this boundary: enough for any dtype's alignment
/// and for `mmap` at an offset inside the file.
const ARRAY_ALIGN: usize = 64;
/// numpy leaves room for the length of axis 0 to grow to this many digits, so appending to a
/// file can rewrite the header in place. We mimic it only to match numpy's bytes exactly.
const GROWTH_AXIS_MAX_DIGITS: usize = 21;

/// The header that precedes the data in a `.npy` file, as numpy writes it: magic, version,
/// little-endian header length, the dict `{'descr': ..., 'fortran_order': False, 'shape': (...), }`,
/// space-padded and newline-terminated so the data starts at a multiple of 64 bytes. Version 1.0
/// when the header length fits in u16, else 2.0.
///
/// `descr` is a numpy typestr such as `<f4`, `|u1` or `>i4`; it is written inside single quotes
/// without escaping, so it must not contain `'` or `\` (no typestr does). `fortran_order` is
/// always `False` because the flat files are C order.
///
/// Like numpy, the padding is always at least one space: when the text would already end on a
/// 64-byte boundary a whole extra 64 bytes is added. That looks wasteful but is what numpy
/// produces.
pub fn header(descr: &str, shape: &[u64]) -> Vec<u8> {
    debug_assert!(!descr.contains(['\'', '\\']), "descr {descr:?} would need Python string escaping");
    let mut dict = String::with_capacity(128 + shape.len() * 22);
    // Keys in sorted order and values as Python's repr(), exactly as numpy formats them.
    write!(dict, "{{'descr': '{descr}', 'fortran_order': False, 'shape': (").unwrap();
    for (i, d) in shape.iter().enumerate() {
        if i > 0 {
            dict.push_str(", ");
        }
        write!(dict, "{d}").unwrap();
    }
    // A 1-tuple needs the trailing comma to stay a tuple in Python.
    if shape.len() == 1 {
        dict.push(',');
    }
    dict.push_str("), }");
    if let Some(first) = shape.first() {
        let digits = first.to_string().len();
        dict.extend(std::iter::repeat_n(' ', GROWTH_AXIS_MAX_DIGITS - digits));
    }

    // `+ 1` for the terminating newline. numpy tries the 1.0 layout (u16 length) first and only
    // falls back to 2.0 (u32 length) when the padded header does not fit, since older readers
    // only understand 1.0.
    let text_len = dict.len() + 1;
    let padded = |len_field: usize| {
        let pad = ARRAY_ALIGN - (MAGIC_LEN + len_field + text_len) % ARRAY_ALIGN;
        (pad, text_len + pad)
    };
    let (pad, total_text) = padded(2);
    let (major, pad, total_text) = if total_text <= u16::MAX as usize {
        (1u8, pad, total_text)
    } else {
        let (pad, total_text) = padded(4);
        (2u8, pad, total_text)
    };

    let mut out = Vec::with_capacity(MAGIC_LEN + 4 + total_text);
    out.extend_from_slice(b"\x93NUMPY");
    out.push(major);
    out.push(0);
    if major == 1 {
        out.extend_from_slice(&(total_text as u16).to_le_bytes());
    } else {
        let len = u32::try_from(total_text).expect(".npy header longer than 4 GiB");
        out.extend_from_slice(&len.to_le_bytes());
    }
    out.extend_from_slice(dict.as_bytes());
    out.resize(out.len() + pad, b' ');
    out.push(b'\n');
    debug_assert_eq!(out.len() % ARRAY_ALIGN, 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expected bytes were produced with numpy 2.4 (`np.lib.format._write_array_header`, which
    /// `np.save` uses) and pasted here.
    fn numpy_v1(dict: &str, total: usize) -> Vec<u8> {
        let mut v = b"\x93NUMPY\x01\x00".to_vec();
        v.extend_from_slice(&((total - 10) as u16).to_le_bytes());
        v.extend_from_slice(dict.as_bytes());
        v.resize(total - 1, b' ');
        v.push(b'\n');
        v
    }

    #[test]
    fn matches_numpy_scalar() {
        let expected = b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (), }                                                              \n";
        assert_eq!(header("<f4", &[]), expected.to_vec());
    }

    #[test]
    fn matches_numpy_1d() {
        let expected = b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (5,), }                                                            \n";
        assert_eq!(header("<f4", &[5]), expected.to_vec());
        let expected = b"\x93NUMPY\x01\x00v\x00{'descr': '<c8', 'fortran_order': False, 'shape': (0,), }                                                            \n";
        assert_eq!(header("<c8", &[0]), expected.to_vec());
    }

    #[test]
    fn matches_numpy_nd() {
        let expected = b"\x93NUMPY\x01\x00v\x00{'descr': '|u1', 'fortran_order': False, 'shape': (3, 4), }                                                          \n";
        assert_eq!(header("|u1", &[3, 4]), expected.to_vec());
        let expected = b"\x93NUMPY\x01\x00v\x00{'descr': '>i4', 'fortran_order': False, 'shape': (2, 3, 4), }                                                       \n";
        assert_eq!(header(">i4", &[2, 3, 4]), expected.to_vec());
        let expected = b"\x93NUMPY\x01\x00v\x00{'descr': '|b1', 'fortran_order': False, 'shape': (1, 1), }                                                          \n";
        assert_eq!(header("|b1", &[1, 1]), expected.to_vec());
        let expected = b"\x93NUMPY\x01\x00v\x00{'descr': '<f8', 'fortran_order': False, 'shape': (1000000000000, 7), }                                              \n";
        assert_eq!(header("<f8", &[1_000_000_000_000, 7]), expected.to_vec());
    }

    #[test]
    fn matches_numpy_max_dim() {
        let expected = b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (18446744073709551615,), }                                         \n";
        assert_eq!(header("<f4", &[u64::MAX]), expected.to_vec());
    }

    /// When the text lands exactly on a 64-byte boundary numpy still pads a full 64 bytes
    /// (numpy: 256 bytes for 36 ones, not 192).
    #[test]
    fn matches_numpy_full_block_padding() {
        let shape = [1u64; 36];
        let ones = vec!["1"; 36].join(", ");
        let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({ones}), }}");
        let h = header("<f4", &shape);
        assert_eq!(h.len(), 256);
        assert_eq!(&h[8..10], b"\xf6\x00");
        assert_eq!(h, numpy_v1(&dict, 256));
    }

    #[test]
    fn aligned_for_many_shapes() {
        for rank in 0..70usize {
            for base in [0u64, 1, 7, 12345, u64::MAX] {
                let shape: Vec<u64> = (0..rank as u64).map(|i| base.wrapping_add(i)).collect();
                for descr in ["<f4", "|u1", "<c16"] {
                    let h = header(descr, &shape);
                    assert_eq!(h.len() % 64, 0, "{descr} {shape:?}");
                    assert_eq!(h[6], 1);
                    let hlen = u16::from_le_bytes([h[8], h[9]]) as usize;
                    assert_eq!(hlen + 10, h.len());
                    assert_eq!(*h.last().unwrap(), b'\n');
                }
            }
        }
    }

    /// numpy (`_write_array_header` with version=None) writes 90112 bytes, version 2.0, length
    /// field 0x00015ff4, for 30000 ones.
    #[test]
    fn switches_to_version_2_for_huge_rank() {
        let shape = vec![1u64; 30000];
        let h = header("<f4", &shape);
        assert_eq!(h.len(), 90112);
        assert_eq!(&h[..12], b"\x93NUMPY\x02\x00\xf4\x5f\x01\x00");
        let ones = vec!["1"; 30000].join(", ");
        let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({ones}), }}");
        assert_eq!(&h[12..12 + dict.len()], dict.as_bytes());
        assert!(h[12 + dict.len()..h.len() - 1].iter().all(|&b| b == b' '));
        assert_eq!(*h.last().unwrap(), b'\n');
    }
}
