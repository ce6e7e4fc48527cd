//! Safetensors header rules the fill engine enforces before anything is
//! published, and the loaders rely on.
//!
//! Written here rather than taken from the `safetensors` crate because the
//! fill engine needs every rule (including element alignment in the file, so
//! zero-copy views are aligned) checked against a header alone, before the
//! data is read, with an error that names the tensor and the rule.

use std::collections::BTreeMap;

use serde::Deserialize;

/// Headers larger than this are refused (the reference implementation's limit).
pub const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

/// Element types of safetensors v1 that have a whole-byte size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Dtype {
    /// bool
    Bool,
    /// u8
    U8,
    /// i8
    I8,
    /// float8 e5m2
    F8E5M2,
    /// float8 e4m3
    F8E4M3,
    /// i16
    I16,
    /// u16
    U16,
    /// float16
    F16,
    /// bfloat16
    BF16,
    /// i32
    I32,
    /// u32
    U32,
    /// float32
    F32,
    /// i64
    I64,
    /// u64
    U64,
    /// float64
    F64,
}

impl Dtype {
    /// Parses the header's dtype string.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "BOOL" => Self::Bool,
            "U8" => Self::U8,
            "I8" => Self::I8,
            "F8_E5M2" => Self::F8E5M2,
            "F8_E4M3" => Self::F8E4M3,
            "I16" => Self::I16,
            "U16" => Self::U16,
            "F16" => Self::F16,
            "BF16" => Self::BF16,
            "I32" => Self::I32,
            "U32" => Self::U32,
            "F32" => Self::F32,
            "I64" => Self::I64,
            "U64" => Self::U64,
            "F64" => Self::F64,
            _ => return None,
        })
    }

    /// The header's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bool => "BOOL",
            Self::U8 => "U8",
            Self::I8 => "I8",
            Self::F8E5M2 => "F8_E5M2",
            Self::F8E4M3 => "F8_E4M3",
            Self::I16 => "I16",
            Self::U16 => "U16",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::I32 => "I32",
            Self::U32 => "U32",
            Self::F32 => "F32",
            Self::I64 => "I64",
            Self::U64 => "U64",
            Self::F64 => "F64",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            Self::Bool | Self::U8 | Self::I8 | Self::F8E5M2 | Self::F8E4M3 => 1,
            Self::I16 | Self::U16 | Self::F16 | Self::BF16 => 2,
            Self::I32 | Self::U32 | Self::F32 => 4,
            Self::I64 | Self::U64 | Self::F64 => 8,
        }
    }
}

/// One tensor as the header describes it; offsets relative to the data start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Key in the header.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions.
    pub shape: Vec<u64>,
    /// First byte, relative to [`Header::data_offset`].
    pub begin: u64,
    /// One past the last byte.
    pub end: u64,
}

/// A header that passed every rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 8 + header length: where tensor data starts in the file.
    pub data_offset: u64,
    /// Sorted by `begin`.
    pub tensors: Vec<TensorInfo>,
    /// The optional `__metadata__` string map.
    pub metadata: BTreeMap<String, String>,
}

impl Header {
    /// Distinct dtype names, sorted.
    pub fn dtype_names(&self) -> Vec<String> {
        let set: std::collections::BTreeSet<Dtype> = self.tensors.iter().map(|t| t.dtype).collect();
        set.into_iter().map(|d| d.as_str().to_string()).collect()
    }
}

/// Why a file is not an acceptable safetensors file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Fewer than 8 bytes.
    #[error("file is {0} bytes: too short for a safetensors header (needs at least 8)")]
    TooShort(u64),
    /// Length prefix beyond the limit.
    #[error("header length {0} exceeds the {MAX_HEADER_BYTES}-byte limit: not a safetensors file, or a corrupt one")]
    HeaderTooLarge(u64),
    /// Length prefix beyond the end of the file.
    #[error("header length {header} does not fit in a {file}-byte file: the file is truncated or not safetensors")]
    HeaderBeyondFile {
        /// Declared header length.
        header: u64,
        /// File size.
        file: u64,
    },
    /// Not a JSON object of the expected shape.
    #[error("header is not valid safetensors JSON: {0}")]
    Json(String),
    /// A dtype this format does not support.
    #[error("tensor {tensor:?} has unsupported dtype {dtype:?}")]
    Dtype {
        /// Tensor name.
        tensor: String,
        /// What the header says.
        dtype: String,
    },
    /// Offsets reversed.
    #[error("tensor {tensor:?} has data_offsets [{begin}, {end}] with begin after end")]
    ReversedOffsets {
        /// Tensor name.
        tensor: String,
        /// Start.
        begin: u64,
        /// End.
        end: u64,
    },
    /// shape × dtype size differs from the byte span.
    #[error("tensor {tensor:?}: shape {shape:?} of {dtype} needs {expected} bytes but data_offsets span {actual}")]
    SpanMismatch {
        /// Tensor name.
        tensor: String,
        /// Dimensions.
        shape: Vec<u64>,
        /// dtype name.
        dtype: &'static str,
        /// shape × element size.
        expected: u64,
        /// end − begin.
        actual: u64,
    },
    /// Data beyond the end of the file.
    #[error(
        "tensor {tensor:?} ends at data byte {end} but the file holds {available} data bytes: the file is truncated"
    )]
    OutOfBounds {
        /// Tensor name.
        tensor: String,
        /// End offset.
        end: u64,
        /// Data bytes in the file.
        available: u64,
    },
    /// Two tensors share bytes.
    #[error("tensors {first:?} and {second:?} overlap")]
    Overlap {
        /// Earlier tensor.
        first: String,
        /// Later tensor.
        second: String,
    },
    /// Bytes that belong to no tensor.
    #[error("data bytes {from}..{to} belong to no tensor: the header does not cover the file")]
    Gap {
        /// Start of the gap.
        from: u64,
        /// End of the gap.
        to: u64,
    },
    /// A tensor whose data is not aligned to its element size in the file.
    #[error("tensor {tensor:?} ({dtype}) starts at file offset {offset}, not a multiple of {align}: zero-copy views would be misaligned; re-save it with the safetensors library")]
    Misaligned {
        /// Tensor name.
        tensor: String,
        /// dtype name.
        dtype: &'static str,
        /// Absolute offset in the file.
        offset: u64,
        /// Required alignment.
        align: u64,
    },
}

#[derive(Deserialize)]
struct RawTensor {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

/// Reads the 8-byte little-endian header length prefix.
pub fn header_len(prefix: &[u8; 8]) -> u64 {
    u64::from_le_bytes(*prefix)
}

/// Validates a header against the size of the file it came from.
///
/// `header_json` is the `N` bytes after the 8-byte prefix, `file_size` the
/// whole file. Every rule: size limit, JSON, dtypes, span = shape × dtype,
/// in bounds, no overlaps, full coverage, element alignment.
pub fn validate_header(header_json: &[u8], file_size: u64) -> Result<Header, HeaderError> {
    let n = header_json.len() as u64;
    check_header_len(n, file_size)?;
    let data_offset = 8 + n;
    let available = file_size - data_offset;

    let raw: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(header_json).map_err(|e| HeaderError::Json(e.to_string()))?;
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::with_capacity(raw.len());
    for (name, value) in raw {
        if name == "__metadata__" {
            metadata = serde_json::from_value(value)
                .map_err(|e| HeaderError::Json(format!("__metadata__ must map strings to strings: {e}")))?;
            continue;
        }
        let t: RawTensor =
            serde_json::from_value(value).map_err(|e| HeaderError::Json(format!("tensor {name:?}: {e}")))?;
        let dtype = Dtype::parse(&t.dtype).ok_or_else(|| HeaderError::Dtype {
            tensor: name.clone(),
            dtype: t.dtype.clone(),
        })?;
        let (begin, end) = t.data_offsets;
        if begin > end {
            return Err(HeaderError::ReversedOffsets {
                tensor: name,
                begin,
                end,
            });
        }
        let expected = t
            .shape
            .iter()
            .try_fold(dtype.size(), |acc, d| acc.checked_mul(*d))
            .ok_or_else(|| HeaderError::Json(format!("tensor {name:?}: shape {:?} overflows", t.shape)))?;
        if expected != end - begin {
            return Err(HeaderError::SpanMismatch {
                tensor: name,
                shape: t.shape,
                dtype: dtype.as_str(),
                expected,
                actual: end - begin,
            });
        }
        if end > available {
            return Err(HeaderError::OutOfBounds {
                tensor: name,
                end,
                available,
            });
        }
        let offset = data_offset + begin;
        if !offset.is_multiple_of(dtype.size()) {
            return Err(HeaderError::Misaligned {
                tensor: name,
                dtype: dtype.as_str(),
                offset,
                align: dtype.size(),
            });
        }
        tensors.push(TensorInfo {
            name,
            dtype,
            shape: t.shape,
            begin,
            end,
        });
    }
    // Empty tensors occupy no bytes and may sit anywhere; order by span.
    tensors.sort_by_key(|t| (t.begin, t.end));
    let mut covered = 0u64;
    let mut last: Option<&TensorInfo> = None;
    for t in tensors.iter().filter(|t| t.end > t.begin) {
        if t.begin < covered {
            let first = last.map(|l| l.name.clone()).unwrap_or_default();
            return Err(HeaderError::Overlap {
                first,
                second: t.name.clone(),
            });
        }
        if t.begin > covered {
            return Err(HeaderError::Gap {
                from: covered,
                to: t.begin,
            });
        }
        covered = t.end;
        last = Some(t);
    }
    if covered != available {
        return Err(HeaderError::Gap {
            from: covered,
            to: available,
        });
    }
    Ok(Header {
        data_offset,
        tensors,
        metadata,
    })
}

/// Checks the declared header length before it is read.
pub fn check_header_len(n: u64, file_size: u64) -> Result<(), HeaderError> {
    if file_size < 8 {
        return Err(HeaderError::TooShort(file_size));
    }
    if n > MAX_HEADER_BYTES {
        return Err(HeaderError::HeaderTooLarge(n));
    }
    if 8 + n > file_size {
        return Err(HeaderError::HeaderBeyondFile {
            header: n,
            file: file_size,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a file image: header JSON padded with spaces to 8 bytes, then data.
    fn file(header: &str, data_len: u64) -> (Vec<u8>, u64) {
        let mut h = header.as_bytes().to_vec();
        while !h.len().is_multiple_of(8) {
            h.push(b' ');
        }
        let size = 8 + h.len() as u64 + data_len;
        (h, size)
    }

    fn check(header: &str, data_len: u64) -> Result<Header, HeaderError> {
        let (h, size) = file(header, data_len);
        validate_header(&h, size)
    }

    #[test]
    fn accepts_a_well_formed_header() {
        let h = check(
            r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"F16","shape":[2],"data_offsets":[8,12]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"e":{"dtype":"F32","shape":[0],"data_offsets":[12,12]}}"#,
            12,
        )
        .unwrap();
        let names: Vec<&str> = h.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "e"]);
        assert_eq!(h.dtype_names(), ["F16", "F32"]);
        assert_eq!(h.metadata["format"], "pt");
        assert_eq!(h.data_offset % 8, 0);
    }

    #[test]
    fn rejects_each_malformed_case_by_name() {
        let t = |dtype: &str, shape: &str, b: u64, e: u64| {
            format!(r#""{dtype}_t":{{"dtype":"{dtype}","shape":{shape},"data_offsets":[{b},{e}]}}"#)
        };
        let cases: Vec<(String, u64, &str)> = vec![
            ("not json".into(), 0, "not valid safetensors JSON"),
            (format!("{{{}}}", t("Q7", "[1]", 0, 1)), 1, "unsupported dtype \"Q7\""),
            (format!("{{{}}}", t("F32", "[3]", 0, 8)), 8, "needs 12 bytes but data_offsets span 8"),
            (format!("{{{}}}", t("F32", "[2]", 0, 8)), 4, "truncated"),
            (format!("{{{}}}", t("F32", "[1]", 4, 0)), 8, "begin after end"),
            (r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#.into(), 8, "overlap"),
            (format!("{{{}}}", t("F32", "[1]", 4, 8)), 8, "bytes 0..4 belong to no tensor"),
            (format!("{{{}}}", t("F32", "[1]", 0, 4)), 8, "bytes 4..8 belong to no tensor"),
            (r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"b":{"dtype":"F32","shape":[1],"data_offsets":[1,5]}}"#.into(), 5, "not a multiple of 4"),
            (r#"{"__metadata__":{"a":1}}"#.into(), 0, "__metadata__"),
        ];
        for (header, data, want) in cases {
            let err = check(&header, data).unwrap_err().to_string();
            assert!(err.contains(want), "header {header}: got {err:?}, want {want:?}");
        }
    }

    #[test]
    fn rejects_bad_length_prefixes() {
        assert_eq!(check_header_len(0, 4), Err(HeaderError::TooShort(4)));
        assert!(matches!(
            check_header_len(MAX_HEADER_BYTES + 1, u64::MAX),
            Err(HeaderError::HeaderTooLarge(_))
        ));
        assert!(matches!(
            check_header_len(100, 50),
            Err(HeaderError::HeaderBeyondFile { .. })
        ));
    }
}
