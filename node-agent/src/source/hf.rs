//! `hf://org/repo[@revision]`: a Hugging Face Hub repository (or a mirror
//! speaking the Hub API). One API call resolves the revision to a commit and
//! lists every file with its size and digest: the sha256 of LFS files, the
//! git blob id of the others, so each file is verified without the user
//! pasting a hash. Files are then downloaded from
//! `<endpoint>/<repo>/resolve/<commit>/<path>`, the URL `huggingface_hub`
//! uses (the Hub redirects large files to its CDN; every hop is checked by
//! the source policy, and the token is not sent past the first host).

use reqwest::header::HeaderValue;
use serde::Deserialize;

use super::http::{get_document, HttpSource};
use super::FetchError;

/// Where `hf://` goes when neither the spec nor `--hf-endpoint` says.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// Largest repository listing read (a repo with 10,000 files is ~2 MiB).
const MAX_LISTING: usize = 32 << 20;

/// What the Hub says a revision holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// The commit the revision resolved to.
    pub commit: String,
    /// Every file of the commit.
    pub files: Vec<RepoFile>,
}

/// One file of a repository at a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoFile {
    /// Path in the repository.
    pub path: String,
    /// Size in bytes, when the Hub says.
    pub size: Option<u64>,
    /// How to check the bytes.
    pub digest: RepoDigest,
}

/// The digest the Hub gives for a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepoDigest {
    /// LFS files: sha256 of the content.
    Sha256(String),
    /// Files in git itself: the git blob id, sha1 of `blob <len>\0<content>`.
    GitBlob(String),
    /// The listing gave neither (an old mirror): the fill refuses the file
    /// unless the spec pins it.
    None,
}

#[derive(Deserialize)]
struct RevisionInfo {
    sha: Option<String>,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Sibling {
    rfilename: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    blob_id: Option<String>,
    #[serde(default)]
    lfs: Option<Lfs>,
}

#[derive(Deserialize)]
struct Lfs {
    sha256: String,
    #[serde(default)]
    size: Option<u64>,
}

/// `<endpoint>/api/models/<repo>/revision/<revision>?blobs=true`.
pub fn revision_url(endpoint: &url::Url, repo: &str, revision: &str) -> Result<url::Url, FetchError> {
    let mut u = endpoint.clone();
    {
        let mut seg = u
            .path_segments_mut()
            .map_err(|_| FetchError::Refused(format!("{endpoint} cannot be a hub endpoint")))?;
        seg.pop_if_empty().push("api").push("models");
        for part in repo.split('/') {
            seg.push(part);
        }
        // A revision such as refs/pr/1 is one path segment, its '/' escaped.
        seg.push("revision").push(revision);
    }
    u.set_query(Some("blobs=true"));
    Ok(u)
}

/// `<endpoint>/<repo>/resolve/<commit>/<path>`.
pub fn resolve_url(endpoint: &url::Url, repo: &str, commit: &str, path: &str) -> Result<url::Url, FetchError> {
    let mut u = endpoint.clone();
    {
        let mut seg = u
            .path_segments_mut()
            .map_err(|_| FetchError::Refused(format!("{endpoint} cannot be a hub endpoint")))?;
        seg.pop_if_empty();
        for part in repo.split('/') {
            seg.push(part);
        }
        seg.push("resolve").push(commit);
        for part in path.split('/') {
            seg.push(part);
        }
    }
    u.set_query(None);
    Ok(u)
}

/// Resolves `revision` and lists the repository's files.
pub async fn list(
    http: &HttpSource,
    endpoint: &url::Url,
    repo: &str,
    revision: &str,
    auth: Option<&HeaderValue>,
) -> Result<Listing, FetchError> {
    let url = revision_url(endpoint, repo, revision)?;
    let (status, headers, body) = get_document(http, &url, auth, None, MAX_LISTING).await?;
    if !status.is_success() {
        // The Hub says which: RepoNotFound, RevisionNotFound, GatedRepo…
        let code = headers
            .get("x-error-code")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let message = headers
            .get("x-error-message")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let what = match (status.as_u16(), code) {
            (_, "RevisionNotFound") => format!("revision {revision:?} does not exist in {repo}"),
            (_, "RepoNotFound") | (404, _) => format!(
                "repository {repo} (revision {revision:?}) was not found, or it is private and the token does not reach it"
            ),
            (401 | 403, _) => format!(
                "access to {repo} was denied (HTTP {}): the repository is gated or private; give a token (source.secretRef) whose account accepted its terms",
                status.as_u16()
            ),
            (s, _) => format!("the hub answered HTTP {s} listing {repo}@{revision}"),
        };
        let detail = if message.is_empty() {
            String::new()
        } else {
            format!(" (hub: {message})")
        };
        return Err(FetchError::Unreachable(format!("{url}: {what}{detail}")));
    }
    parse_listing(&body).map_err(|e| FetchError::Unreachable(format!("{url}: not a Hub revision listing: {e}")))
}

/// Parses the Hub's answer to a revision listing.
pub fn parse_listing(body: &[u8]) -> Result<Listing, String> {
    let info: RevisionInfo = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let commit = info.sha.ok_or("it names no commit (\"sha\")")?;
    if !zerocopy_api::source::is_commit(&commit) {
        return Err(format!("{commit:?} is not a commit id"));
    }
    let files = info
        .siblings
        .into_iter()
        .map(|s| {
            let (size, digest) = match s.lfs {
                Some(lfs) => (lfs.size.or(s.size), RepoDigest::Sha256(lfs.sha256.to_ascii_lowercase())),
                None => (
                    s.size,
                    s.blob_id
                        .map(|b| RepoDigest::GitBlob(b.to_ascii_lowercase()))
                        .unwrap_or(RepoDigest::None),
                ),
            };
            RepoFile {
                path: s.rfilename,
                size,
                digest,
            }
        })
        .collect();
    Ok(Listing { commit, files })
}

/// The git blob id of `content`'s bytes, as `git hash-object` prints it.
pub fn git_blob_id(reader: &mut impl std::io::Read, len: u64) -> std::io::Result<String> {
    use sha1::{Digest, Sha1};
    let mut h = Sha1::new();
    h.update(format!("blob {len}\0").as_bytes());
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_escape_revisions_and_keep_paths() {
        let ep = url::Url::parse("https://hub.example/mirror/").unwrap();
        assert_eq!(
            revision_url(&ep, "org/repo", "refs/pr/1").unwrap().as_str(),
            "https://hub.example/mirror/api/models/org/repo/revision/refs%2Fpr%2F1?blobs=true"
        );
        assert_eq!(
            resolve_url(&ep, "org/repo", "abc", "1_Pooling/config.json")
                .unwrap()
                .as_str(),
            "https://hub.example/mirror/org/repo/resolve/abc/1_Pooling/config.json"
        );
    }

    #[test]
    fn listing_takes_lfs_sha256_and_blob_ids() {
        let body = br#"{"id":"o/r","sha":"0123456789abcdef0123456789abcdef01234567","siblings":[
            {"rfilename":"config.json","size":612,"blobId":"ABCDEF"},
            {"rfilename":"model.safetensors","size":90868376,"blobId":"x","lfs":{"sha256":"53AA","size":90868376,"pointerSize":135}},
            {"rfilename":"old"}]}"#;
        let l = parse_listing(body).unwrap();
        assert_eq!(l.commit, "0123456789abcdef0123456789abcdef01234567");
        assert_eq!(l.files[0].digest, RepoDigest::GitBlob("abcdef".into()));
        assert_eq!(l.files[1].digest, RepoDigest::Sha256("53aa".into()));
        assert_eq!(l.files[1].size, Some(90868376));
        assert_eq!(l.files[2].digest, RepoDigest::None);
        assert!(parse_listing(br#"{"sha":"main","siblings":[]}"#).is_err());
        assert!(parse_listing(b"[]").is_err());
    }

    #[test]
    fn git_blob_ids_match_git() {
        // `printf 'hello\n' | git hash-object --stdin`
        let id = git_blob_id(&mut &b"hello\n"[..], 6).unwrap();
        assert_eq!(id, "ce013625030ba8dba906f756967f9e9ca394464a");
    }
}
