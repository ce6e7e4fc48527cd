//! The Rust loader over a volume written byte by byte.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: panics are the failure report

use std::fs;
use std::path::Path;

use zerocopy_api::format::{FORMAT_V1, FORMAT_V2};
use zerocopy_api::manifest::{
    Manifest, ManifestComponent, ManifestDirectory, ManifestEntry, ManifestFile, ManifestWeights, SafetensorsSummary,
};
use zerocopy_api::spec::Mode;

/// Writes a one-component volume holding `l.weight` (3×4) and `l.bias` (3).
fn volume(dir: &Path) -> (Vec<f32>, Vec<f32>) {
    let w: Vec<f32> = (0..12).map(|i| i as f32 * 0.5).collect();
    let b: Vec<f32> = vec![1.0, -1.0, 0.25];
    let header = r#"{"l.bias":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},"l.weight":{"dtype":"F32","shape":[3,4],"data_offsets":[12,60]}}"#;
    let mut h = header.as_bytes().to_vec();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut file = (h.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&h);
    let data_offset = file.len() as u64;
    for v in b.iter().chain(&w) {
        file.extend_from_slice(&v.to_le_bytes());
    }
    fs::write(dir.join("lin.safetensors"), &file).unwrap();
    let m = Manifest {
        format: FORMAT_V1.into(),
        namespace: "t".into(),
        name: "m".into(),
        generation: "0123456789abcdef".into(),
        mode: Mode::Actor,
        created: "2026-01-01T00:00:00Z".into(),
        total_bytes: file.len() as u64,
        huge_pages: false,
        prefault: false,
        components: vec![ManifestComponent {
            name: "lin".into(),
            weights: Some(ManifestWeights {
                file: ManifestFile {
                    file: "lin.safetensors".into(),
                    bytes: file.len() as u64,
                    sha256: String::new(),
                    source: String::new(),
                },
                tensors: 2,
                dtypes: vec!["F32".into()],
                data_offset,
            }),
            directory: None,
            skeleton: None,
        }],
        pipeline_skeleton: None,
    };
    fs::write(dir.join("manifest.json"), serde_json::to_vec(&m).unwrap()).unwrap();
    (w, b)
}

/// One F32 tensor as a safetensors file.
fn one_tensor_file(name: &str, shape: &[usize], values: &[f32]) -> Vec<u8> {
    let n = values.len() * 4;
    let header = format!(r#"{{"{name}":{{"dtype":"F32","shape":{shape:?},"data_offsets":[0,{n}]}}}}"#);
    let mut h = header.into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut file = (h.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&h);
    for v in values {
        file.extend_from_slice(&v.to_le_bytes());
    }
    file
}

/// A format v2 volume: component `lin` is a directory with `config.json`
/// and two shards, `l.weight` in one and `l.bias` in the other (and, with
/// `duplicate`, `l.bias` in both).
fn directory_volume(dir: &Path, duplicate: bool) -> (Vec<f32>, Vec<f32>) {
    let w: Vec<f32> = (0..12).map(|i| i as f32 * 0.5).collect();
    let b: Vec<f32> = vec![1.0, -1.0, 0.25];
    fs::create_dir_all(dir.join("lin")).unwrap();
    let (first, second) = if duplicate {
        (one_tensor_file("l.bias", &[3], &b), one_tensor_file("l.bias", &[3], &b))
    } else {
        (
            one_tensor_file("l.weight", &[3, 4], &w),
            one_tensor_file("l.bias", &[3], &b),
        )
    };
    let mut files = Vec::new();
    for (name, bytes) in [
        ("lin/model-00001-of-00002.safetensors", &first),
        ("lin/model-00002-of-00002.safetensors", &second),
    ] {
        fs::write(dir.join(name), bytes).unwrap();
        files.push(ManifestEntry {
            file: ManifestFile {
                file: name.into(),
                bytes: bytes.len() as u64,
                sha256: String::new(),
                source: String::new(),
            },
            safetensors: Some(SafetensorsSummary {
                tensors: 1,
                dtypes: vec!["F32".into()],
                data_offset: 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()),
            }),
        });
    }
    fs::write(dir.join("lin/config.json"), "{}").unwrap();
    let m = Manifest {
        format: FORMAT_V2.into(),
        namespace: "t".into(),
        name: "m".into(),
        generation: "0123456789abcdef".into(),
        mode: Mode::Actor,
        created: "2026-01-01T00:00:00Z".into(),
        total_bytes: (first.len() + second.len() + 2) as u64,
        huge_pages: false,
        prefault: false,
        components: vec![ManifestComponent {
            name: "lin".into(),
            weights: None,
            directory: Some(ManifestDirectory {
                path: "lin".into(),
                revision: None,
                weights: files.iter().map(|f| f.file.file.clone()).collect(),
                files,
            }),
            skeleton: None,
        }],
        pipeline_skeleton: None,
    };
    fs::write(dir.join("manifest.json"), serde_json::to_vec(&m).unwrap()).unwrap();
    (w, b)
}

#[test]
fn a_directory_component_maps_every_shard() {
    let dir = tempfile::tempdir().unwrap();
    let (w, b) = directory_volume(dir.path(), false);
    let p = zerocopy_loader::load(dir.path()).unwrap();
    let c = p.component("lin").unwrap();
    assert_eq!(c.shards().len(), 2);
    let names: Vec<String> = c.tensors().map(|v| v.info.name.clone()).collect();
    assert_eq!(names, ["l.weight", "l.bias"]);
    let ranges = c.mapped_ranges();
    for (name, expect) in [("l.weight", &w), ("l.bias", &b)] {
        let v = c.tensor_view(name).unwrap();
        assert!(
            ranges.iter().any(|r| r.contains(&(v.data.as_ptr() as usize))),
            "{name} outside the mappings"
        );
        let got: Vec<f32> = v
            .data
            .chunks(4)
            .map(|x| f32::from_le_bytes(x.try_into().unwrap()))
            .collect();
        assert_eq!(&got, expect);
    }
}

#[test]
fn a_directory_component_names_its_attribute_in_its_attribute_file() {
    let dir = tempfile::tempdir().unwrap();
    directory_volume(dir.path(), false);
    let p = zerocopy_loader::load(dir.path()).unwrap();
    assert_eq!(p.component("lin").unwrap().attribute(), None);
    // As export() writes it for an attribute the component name does not give back.
    let body = br#"{"attribute": "textEncoder"}"#;
    fs::write(dir.path().join("lin/zerocopy-attribute.json"), body).unwrap();
    let manifest_path = dir.path().join("manifest.json");
    let mut manifest: serde_json::Value = serde_json::from_slice(&fs::read(&manifest_path).unwrap()).unwrap();
    manifest["components"][0]["directory"]["files"]
        .as_array_mut()
        .unwrap()
        .push(
            serde_json::json!({"file": "lin/zerocopy-attribute.json", "bytes": body.len(), "sha256": "", "source": ""}),
        );
    fs::write(&manifest_path, serde_json::to_vec(&manifest).unwrap()).unwrap();
    let p = zerocopy_loader::load(dir.path()).unwrap();
    assert_eq!(p.component("lin").unwrap().attribute(), Some("textEncoder"));
    // Not an identifier: ignored, not trusted.
    fs::write(
        dir.path().join("lin/zerocopy-attribute.json"),
        br#"{"attribute": "a.b"}"#,
    )
    .unwrap();
    let p = zerocopy_loader::load(dir.path()).unwrap();
    assert_eq!(p.component("lin").unwrap().attribute(), None);
}

#[test]
fn shards_holding_the_same_tensor_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    directory_volume(dir.path(), true);
    let err = zerocopy_loader::load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("l.bias") && err.contains("model-00002-of-00002"), "{err}");
}

#[test]
fn views_lie_inside_the_mapping() {
    let dir = tempfile::tempdir().unwrap();
    let (w, _) = volume(dir.path());
    let p = zerocopy_loader::load(dir.path()).unwrap();
    let c = p.component("lin").unwrap();
    let v = c.tensor_view("l.weight").unwrap();
    assert_eq!(v.info.shape, [3, 4]);
    assert!(c.mapped_ranges()[0].contains(&(v.data.as_ptr() as usize)));
    let first = f32::from_le_bytes(v.data[4..8].try_into().unwrap());
    assert_eq!(first, w[1]);
}

#[test]
fn a_damaged_volume_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    volume(dir.path());
    let f = dir.path().join("lin.safetensors");
    let mut bytes = fs::read(&f).unwrap();
    bytes.truncate(bytes.len() - 4);
    fs::write(&f, bytes).unwrap();
    let err = zerocopy_loader::load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("manifest says") && err.contains("refill"), "{err}");
    fs::remove_file(dir.path().join("manifest.json")).unwrap();
    let err = zerocopy_loader::load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("manifest.json"), "{err}");
}

#[cfg(feature = "tch")]
mod tch_tests {
    use super::*;
    use tch::nn::{self, Module};
    use tch::{Device, Kind, Tensor};

    #[test]
    fn a_var_store_binds_without_copying_and_computes_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let (w, b) = volume(dir.path());
        let p = zerocopy_loader::load(dir.path()).unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let linear = nn::linear(vs.root() / "l", 4, 3, Default::default());
        let binding = p.bind("lin", vs).unwrap();
        assert_eq!(binding.bound, ["l.bias", "l.weight"]);
        assert!(binding.unused.is_empty());
        let range = p.component("lin").unwrap().mapped_ranges()[0].clone();
        for (name, t) in binding.variables() {
            assert!(range.contains(&(t.data_ptr() as usize)), "{name} was copied");
        }
        let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).reshape([1, 4]);
        let y = tch::no_grad(|| linear.forward(&x));
        let expect: Vec<f32> = (0..3)
            .map(|r| (0..4).map(|c| w[r * 4 + c] * (c + 1) as f32).sum::<f32>() + b[r])
            .collect();
        let got: Vec<f32> = Vec::try_from(y.flatten(0, -1)).unwrap();
        assert_eq!(got, expect);
    }

    #[test]
    fn a_mismatching_var_store_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        volume(dir.path());
        let p = zerocopy_loader::load(dir.path()).unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = nn::linear(vs.root() / "l", 5, 3, Default::default());
        let err = p.bind("lin", vs).unwrap_err().to_string();
        assert!(
            err.contains("l.weight") && err.contains("[3, 4]") && err.contains("[3, 5]"),
            "{err}"
        );
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = vs.root().zeros("other", &[1]);
        let err = p.bind("lin", vs).unwrap_err().to_string();
        assert!(err.contains("missing from the weights: other"), "{err}");
        let t = p.component("lin").unwrap().tensor("l.bias").unwrap();
        assert_eq!(t.kind(), Kind::Float);
    }

    fn mapped(path: &std::path::Path) -> bool {
        fs::read_to_string("/proc/self/maps")
            .unwrap()
            .contains(&path.display().to_string())
    }

    #[test]
    fn tensors_views_and_variables_keep_the_mapping_alive() {
        let dir = tempfile::tempdir().unwrap();
        let (w, b) = volume(dir.path());
        let file = dir.path().join("lin.safetensors");
        let p = zerocopy_loader::load(dir.path()).unwrap();
        // Everything safe code can derive from a loaded tensor: a view, a
        // slice, a shallow clone, and a VarStore variable.
        let weight = p.component("lin").unwrap().tensor("l.weight").unwrap();
        let view = weight.view([12]);
        let slice = weight.slice(0, 1, 2, 1);
        let clone = weight.shallow_clone();
        drop(weight);
        let vs = nn::VarStore::new(Device::Cpu);
        let linear = nn::linear(vs.root() / "l", 4, 3, Default::default());
        let binding = p.bind("lin", vs).unwrap();
        drop(p);
        // With the mapping tied to the Pipeline's lifetime, these reads hit
        // unmapped memory (SIGSEGV) once the pipeline is dropped.
        assert!(mapped(&file), "the pipeline is gone but tensors still use the mapping");
        assert_eq!(Vec::<f32>::try_from(&view).unwrap(), w);
        assert_eq!(Vec::<f32>::try_from(slice.flatten(0, -1)).unwrap(), w[4..8]);
        assert_eq!(f32::try_from(clone.get(2).get(3)).unwrap(), w[11]);
        let y = tch::no_grad(|| linear.forward(&Tensor::zeros([1, 4], (Kind::Float, Device::Cpu))));
        assert_eq!(Vec::<f32>::try_from(y.flatten(0, -1)).unwrap(), b);
        drop((view, slice, clone, y, linear, binding));
        assert!(!mapped(&file), "the mapping outlived its last tensor");
    }

    /// Every tensor of every component on `device` equals the mapped one,
    /// byte for byte, and lives on `device`, outside the mapping.
    fn assert_copies_on(device: Device) {
        let dir = tempfile::tempdir().unwrap();
        directory_volume(dir.path(), false);
        let p = zerocopy_loader::load(dir.path()).unwrap();
        for c in p.components() {
            let mapped: Vec<(String, Tensor)> = c.tch_tensors().unwrap();
            let moved = c.tch_tensors_on(device).unwrap();
            assert_eq!(mapped.len(), moved.len());
            assert!(!moved.is_empty());
            let ranges = c.mapped_ranges();
            for ((name, a), (moved_name, b)) in mapped.iter().zip(&moved) {
                assert_eq!(name, moved_name);
                assert_eq!(b.device(), device, "{name}");
                assert_eq!((a.kind(), a.size()), (b.kind(), b.size()), "{name}");
                assert!(
                    !ranges.iter().any(|r| r.contains(&(b.data_ptr() as usize))),
                    "{name} still maps the file"
                );
                let bytes = |t: &Tensor| {
                    Vec::<u8>::try_from(t.to_device(Device::Cpu).view_dtype(Kind::Uint8).flatten(0, -1)).unwrap()
                };
                assert_eq!(bytes(a), bytes(b), "{name}");
            }
        }
    }

    #[test]
    fn tensors_copied_to_the_cpu_equal_the_mapped_ones() {
        assert_copies_on(Device::Cpu);
    }

    #[test]
    fn tensors_copied_to_a_gpu_equal_the_mapped_ones() {
        if !tch::Cuda::is_available() {
            eprintln!("no CUDA device: skipped (the GPU path ran on the device machine only)");
            return;
        }
        assert_copies_on(Device::Cuda(0));
    }
}
