//! Directory sources (`ComponentSpec.source`): what a URI names, which of its
//! paths are taken, and which paths may exist inside a generation at all.
//! Shared by validation (operator, agent) and the fill engine.

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};

/// Paths taken when a source gives no `include`: every file except weight
/// formats other than safetensors (a Hugging Face repo often carries the same
/// weights as PyTorch pickles, ONNX, TensorFlow, Flax, Rust and GGUF files).
pub const DEFAULT_EXCLUDES: [&str; 15] = [
    "**/*.bin",
    "**/*.pt",
    "**/*.pth",
    "**/*.ckpt",
    "**/*.h5",
    "**/*.msgpack",
    "**/*.ot",
    "**/*.onnx",
    "**/*.onnx_data",
    "**/*.gguf",
    "**/*.tflite",
    "**/*.mlmodel",
    "**/*.npz",
    "onnx/**",
    "openvino/**",
];

/// Most files one directory source may select.
pub const MAX_FILES: usize = 10_000;
/// Longest include/exclude glob, and most globs of each kind.
pub const MAX_GLOB_LEN: usize = 256;
/// Most include (or exclude) globs of one source.
pub const MAX_GLOBS: usize = 64;

/// Where a directory source's files come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirectorySource {
    /// `hf://org/repo[@revision]`.
    HuggingFace {
        /// `org/repo` (or a bare `repo`).
        repo: String,
        /// Commit, branch or tag; `None`: `main`.
        revision: Option<String>,
    },
    /// `file:///dir/`: a directory on the node.
    Directory {
        /// Absolute path.
        path: String,
    },
    /// `oci://registry/repository:tag` or `…@sha256:<hex>`: an OCI artifact
    /// whose layers are files (a CNCF ModelPack model, `oras push`).
    Oci {
        /// `host[:port]`.
        registry: String,
        /// `org/name`.
        repository: String,
        /// A tag, or `sha256:<hex>`.
        reference: String,
    },
    /// `az://account/container/prefix/`: every blob below a prefix of an
    /// Azure Blob Storage container (or Azurite).
    Azure {
        /// Storage account.
        account: String,
        /// Container.
        container: String,
        /// Blob name prefix, ending in `/` (empty: the whole container).
        prefix: String,
    },
    /// `gs://bucket/prefix/`: every object below a prefix of a Google Cloud
    /// Storage bucket (JSON API).
    Gcs {
        /// Bucket name.
        bucket: String,
        /// Object name prefix, ending in `/` (empty: the whole bucket).
        prefix: String,
    },
    /// `s3://bucket/prefix/`: every object below a prefix of an S3 (or
    /// S3-compatible) bucket.
    S3 {
        /// Bucket name.
        bucket: String,
        /// Key prefix, ending in `/` (empty: the whole bucket).
        prefix: String,
    },
}

impl DirectorySource {
    /// Parses a directory source URI, or says what is wrong and what to write.
    pub fn parse(uri: &str) -> Result<Self, String> {
        if let Some(rest) = uri.strip_prefix("hf://") {
            let (repo, revision) = match rest.split_once('@') {
                Some((repo, rev)) => (repo, Some(rev)),
                None => (rest, None),
            };
            let parts: Vec<&str> = repo.split('/').collect();
            let name_ok = |p: &&str| {
                !p.is_empty()
                    && p.len() <= 96
                    && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                    && !p.starts_with(['.', '-'])
                    && !p.contains("..")
            };
            if parts.is_empty() || parts.len() > 2 || !parts.iter().all(name_ok) {
                return Err(format!(
                    "{uri:?} does not name a Hugging Face repository: write hf://org/repo or hf://org/repo@<commit>"
                ));
            }
            if let Some(rev) = revision {
                let rev_ok = !rev.is_empty()
                    && rev.len() <= 256
                    && rev.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
                    && !rev.split('/').any(|p| p.is_empty() || p == "." || p == "..");
                if !rev_ok {
                    return Err(format!(
                        "{uri:?}: {rev:?} is not a revision (a 40-hex commit, a branch or a tag)"
                    ));
                }
            }
            return Ok(Self::HuggingFace {
                repo: repo.to_string(),
                revision: revision.map(str::to_string),
            });
        }
        if let Some(rest) = uri.strip_prefix("oci://") {
            return parse_oci(uri, rest);
        }
        match url::Url::parse(uri) {
            Ok(u) if u.scheme() == "file" => {
                if u.host_str().is_some_and(|h| !h.is_empty() && h != "localhost") {
                    return Err(format!("{uri:?} names a host; a directory source is file:///abs/dir/"));
                }
                Ok(Self::Directory {
                    path: u.path().to_string(),
                })
            }
            // Url::parse would quietly resolve `a/../b`; a prefix is taken as written.
            Ok(u)
                if u.scheme() == "s3"
                    && uri.split('/').skip(3).any(|p| {
                        let p = p.to_ascii_lowercase().replace("%2e", ".");
                        p == "." || p == ".."
                    }) =>
            {
                Err(format!(
                    "{uri:?}: the prefix must be a plain path (no '.', '..' or empty parts)"
                ))
            }
            Ok(u) if u.scheme() == "s3" || u.scheme() == "gs" => {
                let (store, extra) = if u.scheme() == "s3" { ("an S3", b'.') } else { ("a Cloud Storage", b'_') };
                let bucket = u.host_str().unwrap_or_default();
                let bucket_ok = (3..=63).contains(&bucket.len())
                    && bucket.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.' || b == extra
                    });
                if !bucket_ok {
                    return Err(format!(
                        "{uri:?} does not name {store} bucket: write {}://bucket/prefix/",
                        u.scheme()
                    ));
                }
                // Url::parse would quietly resolve `a/../b`; a prefix is taken as written.
                let dotted = uri.split('/').skip(3).any(|p| {
                    let p = p.to_ascii_lowercase().replace("%2e", ".");
                    p == "." || p == ".."
                });
                let mut prefix = u.path().trim_start_matches('/').to_string();
                if !prefix.is_empty() && !prefix.ends_with('/') {
                    prefix.push('/');
                }
                if dotted || (!prefix.is_empty() && !is_safe_relative_path(prefix.trim_end_matches('/'))) {
                    return Err(format!("{uri:?}: the prefix must be a plain path (no '.', '..' or empty parts)"));
                }
                let bucket = bucket.to_string();
                Ok(if u.scheme() == "s3" {
                    Self::S3 { bucket, prefix }
                } else {
                    Self::Gcs { bucket, prefix }
                })
            }
            Ok(u) if u.scheme() == "az" => parse_azure(uri, &u),
            Ok(u) => Err(format!(
                "scheme {}:// cannot list files; a directory source is hf://org/repo@commit or file:///dir/ (one file over http(s) goes in weights: instead)",
                u.scheme()
            )),
            Err(e) => Err(format!(
                "{uri:?} is not a URI ({e}); write hf://org/repo@commit or file:///dir/"
            )),
        }
    }
}

fn parse_azure(uri: &str, u: &url::Url) -> Result<DirectorySource, String> {
    let bad = || format!("{uri:?} does not name an Azure blob prefix: write az://account/container/prefix/");
    let account = u.host_str().unwrap_or_default();
    let account_ok =
        (3..=24).contains(&account.len()) && account.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let path = u.path().trim_start_matches('/');
    let (container, prefix) = path.split_once('/').unwrap_or((path, ""));
    let container_ok = (3..=63).contains(&container.len())
        && container
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !account_ok || !container_ok {
        return Err(bad());
    }
    // Url::parse would quietly resolve `a/../b`; a prefix is taken as written.
    let dotted = uri.split('/').skip(4).any(|p| {
        let p = p.to_ascii_lowercase().replace("%2e", ".");
        p == "." || p == ".."
    });
    let mut prefix = prefix.to_string();
    if !prefix.is_empty() && !prefix.ends_with('/') {
        prefix.push('/');
    }
    if dotted || (!prefix.is_empty() && !is_safe_relative_path(prefix.trim_end_matches('/'))) {
        return Err(format!(
            "{uri:?}: the prefix must be a plain path (no '.', '..' or empty parts)"
        ));
    }
    Ok(DirectorySource::Azure {
        account: account.to_string(),
        container: container.to_string(),
        prefix,
    })
}

fn parse_oci(uri: &str, rest: &str) -> Result<DirectorySource, String> {
    let bad = || {
        format!("{uri:?} does not name an OCI artifact: write oci://registry/repository:tag or oci://registry/repository@sha256:<digest>")
    };
    let (registry, path) = rest.split_once('/').ok_or_else(bad)?;
    let registry_ok = !registry.is_empty()
        && registry.len() <= 255
        && registry
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
    let (repository, reference) = match path.split_once('@') {
        Some((repo, digest)) => {
            let hex = digest.strip_prefix("sha256:").ok_or_else(bad)?;
            if !(hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))) {
                return Err(format!(
                    "{uri:?}: {digest:?} is not a sha256 digest (sha256:<64 lowercase hex>)"
                ));
            }
            (repo, digest.to_string())
        }
        None => match path.rsplit_once(':') {
            Some((repo, tag)) if !tag.contains('/') => (repo, tag.to_string()),
            _ => (path, "latest".to_string()),
        },
    };
    // The distribution spec's repository name and tag grammars.
    let repo_ok = !repository.is_empty()
        && repository.split('/').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && part.as_bytes()[0].is_ascii_alphanumeric()
        });
    let tag_ok = reference.starts_with("sha256:")
        || (reference.len() <= 128
            && reference
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            && !reference.starts_with(['.', '-']));
    if !registry_ok || !repo_ok || !tag_ok {
        return Err(bad());
    }
    Ok(DirectorySource::Oci {
        registry: registry.to_string(),
        repository: repository.to_string(),
        reference,
    })
}

/// True for a full 40-hex git commit id.
pub fn is_commit(revision: &str) -> bool {
    revision.len() == 40
        && revision
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// True for a path that can live inside a component directory: relative,
/// `/`-separated, no empty, `.` or `..` part, no hidden part (`.git…`), no
/// backslash or control character, at most 1024 bytes and 16 levels.
pub fn is_safe_relative_path(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= 1024
        && !path.starts_with('/')
        && path.split('/').count() <= 16
        && path
            .split('/')
            .all(|p| !p.is_empty() && !p.starts_with('.') && !p.bytes().any(|b| b < 0x20 || b == b'\\' || b == 0x7f))
}

/// One glob as include/exclude patterns are read: `*` stays within a path
/// part, `**` crosses them. At most [`MAX_GLOB_LEN`] bytes.
pub fn glob(pattern: &str) -> Result<Glob, String> {
    if pattern.len() > MAX_GLOB_LEN {
        return Err(format!("longer than {MAX_GLOB_LEN} characters"));
    }
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map_err(|e| e.to_string())
}

/// Which paths of a source are taken.
#[derive(Debug, Clone)]
pub struct Selection {
    include: Option<GlobSet>,
    exclude: GlobSet,
}

impl Selection {
    /// From a spec's globs, or why they cannot be used (bad or too many
    /// globs, or a set too large to compile).
    pub fn new(include: &[String], exclude: &[String]) -> Result<Self, String> {
        if include.len() > MAX_GLOBS || exclude.len() > MAX_GLOBS {
            return Err(format!("at most {MAX_GLOBS} include and {MAX_GLOBS} exclude globs"));
        }
        let set = |globs: &mut dyn Iterator<Item = &str>| -> Result<GlobSet, String> {
            let mut b = GlobSetBuilder::new();
            for g in globs {
                b.add(glob(g).map_err(|e| format!("{g:?}: {e}"))?);
            }
            b.build().map_err(|e| e.to_string())
        };
        let mut excluded: Vec<&str> = exclude.iter().map(String::as_str).collect();
        if include.is_empty() {
            excluded.extend(DEFAULT_EXCLUDES);
        }
        Ok(Self {
            include: if include.is_empty() {
                None
            } else {
                Some(set(&mut include.iter().map(String::as_str))?)
            },
            exclude: set(&mut excluded.into_iter())?,
        })
    }

    /// True when `path` is taken.
    pub fn takes(&self, path: &str) -> bool {
        is_safe_relative_path(path)
            && self.include.as_ref().is_none_or(|g| g.is_match(path))
            && !self.exclude.is_match(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_uris() {
        assert_eq!(
            DirectorySource::parse("hf://sentence-transformers/all-MiniLM-L6-v2@main").unwrap(),
            DirectorySource::HuggingFace {
                repo: "sentence-transformers/all-MiniLM-L6-v2".into(),
                revision: Some("main".into())
            }
        );
        assert_eq!(
            DirectorySource::parse("hf://gpt2").unwrap(),
            DirectorySource::HuggingFace {
                repo: "gpt2".into(),
                revision: None
            }
        );
        for bad in [
            "hf://",
            "hf://a/b/c",
            "hf://a/../b",
            "hf://a/b@",
            "hf://a/b@../x",
            "hf://a/.b",
            "hf://a b/c",
        ] {
            assert!(DirectorySource::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            DirectorySource::parse("s3://models/minilm").unwrap(),
            DirectorySource::S3 {
                bucket: "models".into(),
                prefix: "minilm/".into()
            }
        );
        assert!(DirectorySource::parse("s3://Bad_Bucket/x").is_err());
        let digest = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            DirectorySource::parse(&format!("oci://127.0.0.1:5000/models/minilm@{digest}")).unwrap(),
            DirectorySource::Oci {
                registry: "127.0.0.1:5000".into(),
                repository: "models/minilm".into(),
                reference: digest
            }
        );
        assert_eq!(
            DirectorySource::parse("oci://ghcr.io/org/model:v1.0").unwrap(),
            DirectorySource::Oci {
                registry: "ghcr.io".into(),
                repository: "org/model".into(),
                reference: "v1.0".into()
            }
        );
        for bad in [
            "oci://ghcr.io",
            "oci://ghcr.io/Org/x:v1",
            "oci://r/x@sha256:abc",
            "oci://r/x:../y",
            "oci://r//x:v1",
        ] {
            assert!(DirectorySource::parse(bad).is_err(), "{bad}");
        }
        assert!(DirectorySource::parse("s3://bucket/a/../b").is_err());
        assert!(DirectorySource::parse("s3://bucket/a/%2E%2e/b").is_err());
        assert_eq!(
            DirectorySource::parse("az://devstoreaccount1/models/minilm").unwrap(),
            DirectorySource::Azure {
                account: "devstoreaccount1".into(),
                container: "models".into(),
                prefix: "minilm/".into()
            }
        );
        for bad in [
            "az://Bad/models/x",
            "az://acct/x/y",
            "az://acct/models/../y",
            "az://acct",
        ] {
            assert!(DirectorySource::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            DirectorySource::parse("gs://my_bucket/llm/8b").unwrap(),
            DirectorySource::Gcs {
                bucket: "my_bucket".into(),
                prefix: "llm/8b/".into()
            }
        );
        for bad in [
            "gs://Bucket/x/",
            "gs://b/x/",
            "gs://bucket/x/../y/",
            "gs://bucket/x/%2e%2e/y/",
            "s3://my_bucket/x/",
        ] {
            assert!(DirectorySource::parse(bad).is_err(), "{bad}");
        }
        assert!(DirectorySource::parse("https://h/x").unwrap_err().contains("weights:"));
        assert!(is_commit("0123456789abcdef0123456789abcdef01234567"));
        assert!(!is_commit("main"));
    }

    #[test]
    fn paths_inside_a_component() {
        for ok in [
            "config.json",
            "1_Pooling/config.json",
            "a/b/model-00001-of-00004.safetensors",
        ] {
            assert!(is_safe_relative_path(ok), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "./a",
            ".gitattributes",
            "a/.git/config",
            "a\\b",
            "a\nb",
        ] {
            assert!(!is_safe_relative_path(bad), "{bad:?}");
        }
    }

    #[test]
    fn selection_defaults_skip_other_weight_formats() {
        let all = Selection::new(&[], &[]).unwrap();
        for taken in [
            "model.safetensors",
            "config.json",
            "1_Pooling/config.json",
            "tokenizer.json",
        ] {
            assert!(all.takes(taken), "{taken}");
        }
        for skipped in [
            "pytorch_model.bin",
            "onnx/model.onnx",
            "openvino/openvino_model.xml",
            "rust_model.ot",
            "tf_model.h5",
            ".gitattributes",
        ] {
            assert!(!all.takes(skipped), "{skipped}");
        }
        let some = Selection::new(&["*.json".into(), "*.safetensors".into()], &["tokenizer*".into()]).unwrap();
        assert!(some.takes("config.json"));
        assert!(!some.takes("1_Pooling/config.json"), "* stays within a path part");
        assert!(!some.takes("tokenizer.json"));
        assert!(some.takes("model.safetensors"));
        assert!(Selection::new(&["**/*.json".into()], &[])
            .unwrap()
            .takes("1_Pooling/config.json"));
        assert!(
            Selection::new(&["*a".repeat(100_000)], &[]).is_err(),
            "a huge glob is refused, not compiled"
        );
    }
}
