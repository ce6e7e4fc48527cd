//! The committed `crds/` must be what the types generate: a change to
//! `zerocopy-api` without `cargo run -p zerocopy-operator --bin crdgen` fails here.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

#[test]
fn committed_crds_match_the_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    let generated = zerocopy_operator::crds::all().unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    names.sort();
    let mut expected: Vec<String> = generated.iter().map(|(n, _)| n.clone()).collect();
    expected.sort();
    assert_eq!(names, expected, "crds/ holds other files than the generated ones");
    for (file, yaml) in generated {
        let committed = std::fs::read_to_string(dir.join(&file)).unwrap();
        assert!(
            committed == yaml,
            "crds/{file} is out of date: run `cargo run -p zerocopy-operator --bin crdgen` and commit the result"
        );
    }
}
