//! `oci://registry/repository:tag|@sha256:…`: an OCI artifact whose layers
//! are files, as CNCF ModelPack (`modctl`) and `oras push` write them. The
//! manifest is fetched (and checked against the digest when the reference is
//! one); each layer is a file named by its `org.cncf.model.filepath` or
//! `org.opencontainers.image.title` annotation and verified by its own
//! digest, so the source is content-addressed and needs no pins.
//!
//! The distribution API is spoken over the agent's own HTTP client (not a
//! registry crate with a client of its own) so that the source policy covers
//! registries and the blob redirects they answer with (S3, CDNs): every hop
//! resolved once and checked, no https→http downgrade.

use base64::Engine;
use reqwest::header::HeaderValue;
use reqwest::StatusCode;
use serde::Deserialize;

use super::http::{get_document, HttpSource};
use super::FetchError;
use crate::secrets::SecretData;

/// OCI image manifest.
pub const MANIFEST_V1: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index (several manifests).
pub const INDEX_V1: &str = "application/vnd.oci.image.index.v1+json";
/// Docker's manifest list (several manifests).
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Largest manifest read.
const MAX_MANIFEST: usize = 4 << 20;
/// Layer annotation ModelPack uses for a file's path in the model directory.
const FILEPATH_ANNOTATION: &str = "org.cncf.model.filepath";
/// Layer annotation oras uses for a file's name.
const TITLE_ANNOTATION: &str = "org.opencontainers.image.title";
/// oras marks a layer that is a packed directory with it.
const UNPACK_ANNOTATION: &str = "io.deis.oras.content.unpack";

/// A resolved artifact: its manifest digest and its files.
#[derive(Debug, Clone)]
pub struct Artifact {
    /// `sha256:<hex>` of the manifest.
    pub digest: String,
    /// One per layer.
    pub files: Vec<ArtifactFile>,
    /// `Authorization` for the blob requests (a registry token), if any.
    pub auth: Option<HeaderValue>,
}

/// One layer as a file.
#[derive(Debug, Clone)]
pub struct ArtifactFile {
    /// Path in the model directory.
    pub path: String,
    /// Hex sha256 of the layer (its digest).
    pub sha256: String,
    /// Size from the descriptor.
    pub size: u64,
    /// `<base>/v2/<repository>/blobs/sha256:<hex>`.
    pub url: url::Url,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    schema_version: Option<u32>,
    media_type: Option<String>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    annotations: std::collections::BTreeMap<String, String>,
}

/// Where a registry is reached: the spec's endpoint, else `https://<registry>`.
pub fn base_url(registry: &str, endpoint: Option<&str>) -> Result<url::Url, FetchError> {
    let text = endpoint.map_or_else(|| format!("https://{registry}"), str::to_string);
    url::Url::parse(&text).map_err(|e| FetchError::Refused(format!("{text} is not a registry address: {e}")))
}

/// Resolves `reference` in `repository` to its manifest and files.
pub async fn resolve(
    http: &HttpSource,
    base: &url::Url,
    registry: &str,
    repository: &str,
    reference: &str,
    credentials: Option<&SecretData>,
) -> Result<Artifact, FetchError> {
    let manifest_url = join(base, &format!("v2/{repository}/manifests/{reference}"))?;
    let accept = HeaderValue::from_static(
        "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json",
    );
    let basic = credentials.map(|c| basic_auth(c, registry)).transpose()?.flatten();
    let mut auth = None;
    let (mut status, mut headers, mut body) =
        get_document(http, &manifest_url, auth.as_ref(), Some(&accept), MAX_MANIFEST).await?;
    if status == StatusCode::UNAUTHORIZED {
        // The registry names where to get a token (or asks for Basic).
        let challenge = headers
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        auth = Some(authorize(http, base, &challenge, repository, basic.as_ref()).await?);
        (status, headers, body) = get_document(http, &manifest_url, auth.as_ref(), Some(&accept), MAX_MANIFEST).await?;
    }
    match status.as_u16() {
        200 => {}
        401 | 403 => {
            return Err(FetchError::Unreachable(format!(
                "{manifest_url}: access denied (HTTP {}); give the source a pull Secret (source.secretRef: .dockerconfigjson, or username and password)",
                status.as_u16()
            )))
        }
        404 => {
            return Err(FetchError::Unreachable(format!(
                "{manifest_url}: {repository}:{reference} does not exist in {registry}"
            )))
        }
        s => return Err(FetchError::Status(s)),
    }
    let digest = format!("sha256:{}", hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&body)));
    if reference.starts_with("sha256:") && reference != digest {
        return Err(FetchError::Unreachable(format!(
            "{manifest_url}: the registry sent a manifest with digest {digest}, not the {reference} asked for"
        )));
    }
    let content_type = headers
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let manifest: Manifest = serde_json::from_slice(&body)
        .map_err(|e| FetchError::Unreachable(format!("{manifest_url}: not an OCI manifest: {e}")))?;
    let media_type = manifest.media_type.clone().unwrap_or(content_type);
    if media_type == INDEX_V1 || media_type == DOCKER_LIST {
        return Err(FetchError::Unreachable(format!(
            "{manifest_url}: {reference} is an index of several manifests ({media_type}); name one manifest by its digest (oci://{registry}/{repository}@sha256:…)"
        )));
    }
    if manifest.schema_version != Some(2) || !(media_type == MANIFEST_V1 || media_type.is_empty()) {
        return Err(FetchError::Unreachable(format!(
            "{manifest_url}: manifest media type {media_type:?} is not an OCI image manifest ({MANIFEST_V1})"
        )));
    }
    let mut files = Vec::new();
    for layer in manifest.layers {
        let path = layer_path(&layer).map_err(FetchError::Unreachable)?;
        let sha256 = layer
            .digest
            .strip_prefix("sha256:")
            .filter(|h| zerocopy_api::validation::is_sha256_hex(h))
            .ok_or_else(|| {
                FetchError::Unreachable(format!("layer {path}: digest {:?} is not sha256:<hex>", layer.digest))
            })?
            .to_ascii_lowercase();
        files.push(ArtifactFile {
            url: join(base, &format!("v2/{repository}/blobs/{}", layer.digest))?,
            path,
            sha256,
            size: layer.size,
        });
    }
    if files.is_empty() {
        return Err(FetchError::Unreachable(format!(
            "{manifest_url}: the artifact has no layers"
        )));
    }
    Ok(Artifact { digest, files, auth })
}

/// A layer's file path, or why the layer is not a plain file.
fn layer_path(layer: &Descriptor) -> Result<String, String> {
    let mt = layer.media_type.as_str();
    let name = layer
        .annotations
        .get(FILEPATH_ANNOTATION)
        .or_else(|| layer.annotations.get(TITLE_ANNOTATION))
        .ok_or_else(|| {
            format!(
                "layer {} ({mt}) names no file ({FILEPATH_ANNOTATION} or {TITLE_ANNOTATION} annotation)",
                layer.digest
            )
        })?;
    let packed = mt.ends_with(".tar") && mt.starts_with("application/vnd.cncf.model.")
        || mt.contains("+gzip")
        || mt.contains("+zstd")
        || layer.annotations.contains_key(UNPACK_ANNOTATION);
    if packed {
        return Err(format!(
            "layer {name} has media type {mt}: a packed (tar/compressed) layer cannot be mapped in place; push the files raw (modctl build --raw, or oras push of each file)"
        ));
    }
    let raw = (mt.starts_with("application/vnd.cncf.model.") && mt.ends_with(".raw"))
        || mt == "application/vnd.oci.image.layer.v1.tar"
        || mt == "application/octet-stream";
    if !raw {
        return Err(format!(
            "layer {name} has unknown media type {mt:?}; expected a ModelPack raw layer (application/vnd.cncf.model.*.raw) or a plain file"
        ));
    }
    Ok(name.clone())
}

/// A Basic credential from a pull Secret: `.dockerconfigjson` (the entry for
/// `registry`), else `username` and `password` keys.
fn basic_auth(secret: &SecretData, registry: &str) -> Result<Option<String>, FetchError> {
    if let Some(config) = secret.get(".dockerconfigjson") {
        let parsed: serde_json::Value = serde_json::from_str(config)
            .map_err(|e| FetchError::Unreachable(format!("the pull Secret's .dockerconfigjson is not JSON: {e}")))?;
        let entry = parsed.get("auths").and_then(|a| {
            a.get(registry)
                .or_else(|| a.get(format!("https://{registry}").as_str()))
                .or_else(|| a.get(format!("http://{registry}").as_str()))
        });
        let Some(entry) = entry else {
            return Err(FetchError::Unreachable(format!(
                "the pull Secret's .dockerconfigjson has no entry for {registry}"
            )));
        };
        if let Some(auth) = entry.get("auth").and_then(|v| v.as_str()) {
            return Ok(Some(auth.to_string()));
        }
        let user = entry.get("username").and_then(|v| v.as_str()).unwrap_or_default();
        let pass = entry.get("password").and_then(|v| v.as_str()).unwrap_or_default();
        return Ok(Some(
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}")),
        ));
    }
    match (secret.get("username"), secret.get("password")) {
        (Some(u), Some(p)) => Ok(Some(base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            u.trim(),
            p.trim()
        )))),
        _ => Err(FetchError::Unreachable(
            "the pull Secret has neither .dockerconfigjson nor username and password".into(),
        )),
    }
}

/// Answers a `WWW-Authenticate` challenge: Basic with the Secret's
/// credential, or Bearer with a token from the realm it names.
async fn authorize(
    http: &HttpSource,
    base: &url::Url,
    challenge: &str,
    repository: &str,
    basic: Option<&String>,
) -> Result<HeaderValue, FetchError> {
    let sensitive = |v: String| {
        let mut h = HeaderValue::from_str(&v)
            .map_err(|_| FetchError::Unreachable("the registry credential is not printable ASCII".into()))?;
        h.set_sensitive(true);
        Ok::<_, FetchError>(h)
    };
    let (scheme, params) = challenge.split_once(' ').unwrap_or((challenge, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        let basic = basic.ok_or_else(|| {
            FetchError::Unreachable(
                "the registry asks for credentials; give the source a pull Secret (source.secretRef)".into(),
            )
        })?;
        return sensitive(format!("Basic {basic}"));
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(FetchError::Unreachable(format!(
            "the registry answered 401 with an unknown challenge {challenge:?}"
        )));
    }
    let param = |key: &str| {
        params.split(',').find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == key).then(|| v.trim_matches('"').to_string())
        })
    };
    let realm = param("realm")
        .ok_or_else(|| FetchError::Unreachable(format!("the registry's challenge has no realm: {challenge}")))?;
    let mut token_url = url::Url::parse(&realm)
        .map_err(|e| FetchError::Unreachable(format!("the registry's token realm {realm:?} is not a URL: {e}")))?;
    {
        let mut q = token_url.query_pairs_mut();
        if let Some(service) = param("service") {
            q.append_pair("service", &service);
        }
        q.append_pair(
            "scope",
            &param("scope").unwrap_or_else(|| format!("repository:{repository}:pull")),
        );
    }
    // The realm is the registry's choice: its credential goes there only
    // over https, or to the registry's own host.
    let own_host =
        token_url.host_str() == base.host_str() && token_url.port_or_known_default() == base.port_or_known_default();
    if basic.is_some() && token_url.scheme() != "https" && !own_host {
        return Err(FetchError::Refused(format!(
            "the registry names the token service {token_url}, which is neither https nor the registry itself; the pull Secret's credential is not sent there"
        )));
    }
    let basic_header = basic.map(|b| sensitive(format!("Basic {b}"))).transpose()?;
    let (status, _, body) = get_document(http, &token_url, basic_header.as_ref(), None, 1 << 20).await?;
    if !status.is_success() {
        return Err(FetchError::Unreachable(format!(
            "the registry's token service {} refused (HTTP {}); check the pull Secret",
            token_url.host_str().unwrap_or_default(),
            status.as_u16()
        )));
    }
    let answer: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| FetchError::Unreachable(format!("the token service's answer is not JSON: {e}")))?;
    let token = answer
        .get("token")
        .or_else(|| answer.get("access_token"))
        .and_then(|t| t.as_str())
        .ok_or_else(|| FetchError::Unreachable("the token service's answer has no token".into()))?;
    sensitive(format!("Bearer {token}"))
}

fn join(base: &url::Url, path: &str) -> Result<url::Url, FetchError> {
    let mut text = base.as_str().trim_end_matches('/').to_string();
    text.push('/');
    text.push_str(path);
    url::Url::parse(&text).map_err(|e| FetchError::Refused(format!("{text}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(media_type: &str, annotations: &[(&str, &str)]) -> Descriptor {
        Descriptor {
            media_type: media_type.into(),
            digest: format!("sha256:{}", "a".repeat(64)),
            size: 1,
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn layers_are_files_or_refused_by_media_type() {
        let weights = layer(
            "application/vnd.cncf.model.weight.v1.raw",
            &[
                (FILEPATH_ANNOTATION, "1_Pooling/config.json"),
                (TITLE_ANNOTATION, "config.json"),
            ],
        );
        assert_eq!(layer_path(&weights).unwrap(), "1_Pooling/config.json");
        let oras = layer(
            "application/vnd.oci.image.layer.v1.tar",
            &[(TITLE_ANNOTATION, "model.safetensors")],
        );
        assert_eq!(layer_path(&oras).unwrap(), "model.safetensors");
        let packed = layer(
            "application/vnd.cncf.model.weight.v1.tar+gzip",
            &[(TITLE_ANNOTATION, "w")],
        );
        assert!(layer_path(&packed).unwrap_err().contains("packed"));
        let unknown = layer("application/vnd.example.thing", &[(TITLE_ANNOTATION, "w")]);
        assert!(layer_path(&unknown).unwrap_err().contains("unknown media type"));
        assert!(layer_path(&layer("application/octet-stream", &[]))
            .unwrap_err()
            .contains("names no file"));
    }

    #[test]
    fn pull_secrets_read_like_image_pull_secrets() {
        let mut s = SecretData::new();
        s.insert(
            ".dockerconfigjson".into(),
            r#"{"auths":{"reg.example:5000":{"username":"u","password":"p"}}}"#.into(),
        );
        assert_eq!(basic_auth(&s, "reg.example:5000").unwrap().as_deref(), Some("dTpw"));
        assert!(basic_auth(&s, "other").is_err());
        let mut plain = SecretData::new();
        plain.insert("username".into(), "u".into());
        plain.insert("password".into(), "p\n".into());
        assert_eq!(basic_auth(&plain, "any").unwrap().as_deref(), Some("dTpw"));
    }
}
