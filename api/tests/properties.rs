//! Property tests for the parsers that read untrusted bytes: the safetensors
//! header validator (every weights file a tenant points at) and the manifest
//! parser (every generation a loader opens). Arbitrary input never panics;
//! headers laid out as the safetensors writer does are accepted; one wrong
//! span is always refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use zerocopy_api::manifest::Manifest;
use zerocopy_api::safetensors::{validate_header, Dtype};

const DTYPES: [(&str, u64); 6] = [("F64", 8), ("I64", 8), ("F32", 4), ("I32", 4), ("BF16", 2), ("U8", 1)];

/// A header as the safetensors writer lays it out: tensors by descending
/// alignment, contiguous, the JSON padded with spaces to 8 bytes. Returns
/// (header JSON, file size, spans).
fn layout(tensors: &[(usize, Vec<u64>)]) -> (Vec<u8>, u64, Vec<(u64, u64)>) {
    let mut sorted: Vec<&(usize, Vec<u64>)> = tensors.iter().collect();
    sorted.sort_by_key(|(d, _)| std::cmp::Reverse(DTYPES[*d].1));
    let mut entries = serde_json::Map::new();
    let mut offset = 0u64;
    let mut spans = Vec::new();
    for (i, (d, shape)) in sorted.iter().enumerate() {
        let (name, size) = DTYPES[*d];
        let bytes = shape.iter().product::<u64>() * size;
        entries.insert(
            format!("t{i}"),
            serde_json::json!({"dtype": name, "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        spans.push((offset, offset + bytes));
        offset += bytes;
    }
    let mut json = serde_json::to_vec(&entries).unwrap();
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let file_size = 8 + json.len() as u64 + offset;
    (json, file_size, spans)
}

fn tensors() -> impl Strategy<Value = Vec<(usize, Vec<u64>)>> {
    prop::collection::vec((0..DTYPES.len(), prop::collection::vec(0u64..6, 0..4)), 1..8)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_header_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600), size in any::<u64>()) {
        let _ = validate_header(&bytes, size);
    }

    #[test]
    fn arbitrary_json_headers_never_panic(
        entries in prop::collection::vec(("[a-z_]{1,6}", "[A-Z0-9]{1,5}", prop::collection::vec(any::<u64>(), 0..3), any::<u64>(), any::<u64>()), 0..6),
        size in any::<u64>(),
    ) {
        let mut map = serde_json::Map::new();
        for (name, dtype, shape, a, b) in entries {
            map.insert(name, serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [a, b]}));
        }
        let _ = validate_header(&serde_json::to_vec(&map).unwrap(), size);
    }

    #[test]
    fn arbitrary_manifests_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = Manifest::from_json(&bytes);
    }

    #[test]
    fn writer_layouts_are_accepted(ts in tensors()) {
        let (json, size, spans) = layout(&ts);
        let header = validate_header(&json, size).unwrap();
        prop_assert_eq!(header.tensors.len(), ts.len());
        prop_assert_eq!(header.data_offset, 8 + json.len() as u64);
        for t in &header.tensors {
            prop_assert!(spans.contains(&(t.begin, t.end)));
            prop_assert_eq!(t.end - t.begin, t.shape.iter().product::<u64>() * t.dtype.size());
            prop_assert!(Dtype::parse(t.dtype.as_str()).is_some());
        }
    }

    #[test]
    fn one_wrong_span_is_refused(ts in tensors(), pick in any::<prop::sample::Index>(), delta in 1u64..64) {
        let (json, size, _) = layout(&ts);
        let mut value: serde_json::Value = serde_json::from_slice(&json).unwrap();
        let names: Vec<String> = value.as_object().unwrap().keys().cloned().collect();
        let name = &names[pick.index(names.len())];
        let end = value[name]["data_offsets"][1].as_u64().unwrap();
        value[name]["data_offsets"][1] = serde_json::json!(end + delta);
        let bad = serde_json::to_vec(&value).unwrap();
        prop_assert!(validate_header(&bad, size + delta + 64).is_err());
    }
}
