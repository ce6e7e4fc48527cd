//! Tenant-written source URIs, file paths from remote listings and globs:
//! never panic, and a path judged safe can never leave the component
//! directory it is joined to (no absolute path, no `..`, no hidden part).
#![no_main]

use libfuzzer_sys::fuzz_target;
use zerocopy_api::source::{is_safe_relative_path, DirectorySource, Selection};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = DirectorySource::parse(text);
    let mut parts = text.splitn(3, '\n');
    let include: Vec<String> = parts.next().map(|p| vec![p.to_string()]).unwrap_or_default();
    let exclude: Vec<String> = parts.next().map(|p| vec![p.to_string()]).unwrap_or_default();
    if let Ok(selection) = Selection::new(&include, &exclude) {
        let _ = selection.takes(text);
    }
    if is_safe_relative_path(text) {
        let joined = std::path::Path::new("/component").join(text);
        let mut depth = 0usize;
        for part in joined.components().skip(2) {
            match part {
                std::path::Component::Normal(p) => {
                    assert!(!p.to_string_lossy().starts_with('.'), "hidden part in {text:?}");
                    depth += 1;
                }
                other => panic!("{text:?} judged safe but has {other:?}"),
            }
        }
        assert!(depth >= 1);
    }
});
