//! The safetensors header validator on arbitrary bytes: the first 8 bytes
//! are the file size the header is checked against, the rest the header.
//! Beyond "never panics", a header it accepts must keep the promises every
//! loader relies on when it maps the file: spans sorted, contiguous from 0,
//! ending exactly at the end of the file, each span = shape × dtype size and
//! aligned to its element size.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zerocopy_api::safetensors::validate_header;

fuzz_target!(|data: &[u8]| {
    let Some((size, header)) = data.split_first_chunk::<8>() else {
        return;
    };
    let file_size = u64::from_le_bytes(*size);
    let Ok(parsed) = validate_header(header, file_size) else {
        return;
    };
    assert_eq!(parsed.data_offset, 8 + header.len() as u64);
    let mut covered = 0u64;
    for t in &parsed.tensors {
        assert_eq!(t.begin, covered, "{}: gap or overlap", t.name);
        let elements = t
            .shape
            .iter()
            .try_fold(1u64, |n, d| n.checked_mul(*d))
            .expect("shape overflow accepted");
        assert_eq!(
            t.end - t.begin,
            elements * t.dtype.size(),
            "{}: span is not shape × dtype",
            t.name
        );
        assert_eq!(
            (parsed.data_offset + t.begin) % t.dtype.size(),
            0,
            "{}: misaligned",
            t.name
        );
        covered = t.end;
    }
    assert_eq!(
        parsed.data_offset + covered,
        file_size,
        "data does not end at the end of the file"
    );
});
