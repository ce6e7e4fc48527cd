//! Validation of what a NodePublish/NodeUnpublish request asks for. Pure, so
//! every rule is unit-tested without a socket.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use zerocopy_api::labels::{VOLUME_ATTRIBUTE_CATALOG, VOLUME_ATTRIBUTE_WRAPPER};
use zerocopy_api::validation::{is_dns1123_label, is_dns1123_subdomain};

use super::{EPHEMERAL, POD_NAME, POD_NAMESPACE, POD_UID};

/// A request that is wrong; maps to `InvalidArgument`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

/// A validated NodePublishVolume request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishTarget {
    /// Kubelet's volume id.
    pub volume_id: String,
    /// Where to mount.
    pub target: PathBuf,
    /// The pod's namespace, where the wrapper is looked up.
    pub namespace: String,
    /// The ModelWrapper's name; empty for a catalog volume.
    pub wrapper: String,
    /// A namespace catalog volume (`volumeAttributes.catalog: "true"`).
    pub catalog: bool,
    /// The pod, for the ledger and logs.
    pub pod: String,
    /// The pod's UID, if kubelet sent it.
    pub pod_uid: String,
}

/// Checks a target path: absolute, no `.`/`..` components, and inside
/// `kubelet_dir` when one is configured.
pub fn check_target(target: &str, kubelet_dir: Option<&Path>) -> Result<PathBuf, Invalid> {
    if target.is_empty() {
        return Err(Invalid("target_path is required".into()));
    }
    let path = Path::new(target);
    if !path.is_absolute() {
        return Err(Invalid(format!("target_path {target:?} must be an absolute path")));
    }
    if path
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(Invalid(format!(
            "target_path {target:?} must not contain '.' or '..' components"
        )));
    }
    if let Some(dir) = kubelet_dir {
        if !path.starts_with(dir) || path == dir {
            return Err(Invalid(format!(
                "target_path {target:?} is outside the kubelet directory {}",
                dir.display()
            )));
        }
    }
    Ok(path.to_path_buf())
}

/// Validates a publish request's fields.
pub fn check_publish(
    volume_id: &str,
    target: &str,
    readonly: bool,
    volume_context: &HashMap<String, String>,
    kubelet_dir: Option<&Path>,
) -> Result<PublishTarget, Invalid> {
    if volume_id.is_empty() {
        return Err(Invalid("volume_id is required".into()));
    }
    let target = check_target(target, kubelet_dir)?;
    if !readonly {
        return Err(Invalid(
            "this driver only publishes read-only: set `readOnly: true` on the pod's csi volume".into(),
        ));
    }
    let wrapper = volume_context
        .get(VOLUME_ATTRIBUTE_WRAPPER)
        .map(String::as_str)
        .unwrap_or_default();
    let catalog = match volume_context.get(VOLUME_ATTRIBUTE_CATALOG).map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(Invalid(format!(
                "volumeAttributes.{VOLUME_ATTRIBUTE_CATALOG} is {other:?}; use \"true\" (quoted) to mount every wrapper of the namespace"
            )))
        }
    };
    if catalog && !wrapper.is_empty() {
        return Err(Invalid(format!(
            "volumeAttributes has both {VOLUME_ATTRIBUTE_WRAPPER} and {VOLUME_ATTRIBUTE_CATALOG}: a volume is one wrapper or the namespace catalog; use two volumes"
        )));
    }
    if wrapper.is_empty() && !catalog {
        return Err(Invalid(format!(
            "volumeAttributes.{VOLUME_ATTRIBUTE_WRAPPER} is required: name the ModelWrapper to mount, e.g. volumeAttributes: {{{VOLUME_ATTRIBUTE_WRAPPER}: bert}}, or set {VOLUME_ATTRIBUTE_CATALOG}: \"true\" to mount every wrapper of the namespace"
        )));
    }
    if !catalog && !is_dns1123_subdomain(wrapper) {
        return Err(Invalid(format!(
            "volumeAttributes.{VOLUME_ATTRIBUTE_WRAPPER} {wrapper:?} is not a valid object name"
        )));
    }
    let namespace = volume_context
        .get(POD_NAMESPACE)
        .map(String::as_str)
        .unwrap_or_default();
    if namespace.is_empty() {
        return Err(Invalid(format!(
            "{POD_NAMESPACE} is missing from the volume context: the CSIDriver object needs podInfoOnMount: true"
        )));
    }
    if !is_dns1123_label(namespace) {
        return Err(Invalid(format!(
            "{POD_NAMESPACE} {namespace:?} is not a valid namespace"
        )));
    }
    // The namespace is the only isolation between tenants: a publish that
    // does not come from kubelet for a pod's inline volume (a
    // PersistentVolume naming us, or the CSIDriver edited) is refused.
    if volume_context.get(EPHEMERAL).map(String::as_str) != Some("true") {
        return Err(Invalid(format!(
            "{EPHEMERAL}=true is missing: this driver serves only CSI ephemeral inline volumes of pods (CSIDriver volumeLifecycleModes: [Ephemeral], podInfoOnMount: true); a PersistentVolume cannot use it"
        )));
    }
    let pod = volume_context.get(POD_NAME).cloned().unwrap_or_default();
    let pod_uid = volume_context.get(POD_UID).cloned().unwrap_or_default();
    if pod.is_empty() || pod_uid.is_empty() {
        return Err(Invalid(format!(
            "{POD_NAME} and {POD_UID} are required in the volume context: the CSIDriver object needs podInfoOnMount: true"
        )));
    }
    Ok(PublishTarget {
        volume_id: volume_id.into(),
        target,
        namespace: namespace.into(),
        wrapper: wrapper.into(),
        catalog,
        pod,
        pod_uid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_good_request_passes() {
        let c = ctx(&[
            ("modelWrapper", "bert"),
            (POD_NAMESPACE, "ml"),
            (POD_NAME, "p"),
            (POD_UID, "u"),
            (EPHEMERAL, "true"),
        ]);
        let t = check_publish(
            "v1",
            "/var/lib/kubelet/pods/u/volumes/x/mount",
            true,
            &c,
            Some(Path::new("/var/lib/kubelet")),
        )
        .unwrap();
        assert_eq!(
            (t.namespace.as_str(), t.wrapper.as_str(), t.pod.as_str(), t.catalog),
            ("ml", "bert", "p", false)
        );
        let mut catalog = c.clone();
        catalog.remove("modelWrapper");
        catalog.insert("catalog".into(), "true".into());
        let t = check_publish("v2", "/var/lib/kubelet/t", true, &catalog, None).unwrap();
        assert!(t.catalog && t.wrapper.is_empty());
    }

    #[test]
    fn each_bad_field_is_named() {
        let good = ctx(&[
            ("modelWrapper", "bert"),
            (POD_NAMESPACE, "ml"),
            (POD_NAME, "p"),
            (POD_UID, "u"),
            (EPHEMERAL, "true"),
        ]);
        let k = Some(Path::new("/var/lib/kubelet"));
        type Case<'a> = (&'a str, &'a str, bool, HashMap<String, String>, &'a str);
        let cases: Vec<Case> = vec![
            ("", "/var/lib/kubelet/t", true, good.clone(), "volume_id is required"),
            ("v", "relative/t", true, good.clone(), "absolute"),
            ("v", "/var/lib/kubelet/../../etc", true, good.clone(), "'..'"),
            ("v", "/etc/t", true, good.clone(), "outside the kubelet directory"),
            ("v", "/var/lib/kubelet/t", false, good.clone(), "readOnly: true"),
            (
                "v",
                "/var/lib/kubelet/t",
                true,
                ctx(&[(POD_NAMESPACE, "ml")]),
                "volumeAttributes.modelWrapper is required",
            ),
            (
                "v",
                "/var/lib/kubelet/t",
                true,
                ctx(&[("modelWrapper", "bert")]),
                "podInfoOnMount",
            ),
            (
                "v",
                "/var/lib/kubelet/t",
                true,
                ctx(&[("modelWrapper", "../x"), (POD_NAMESPACE, "ml")]),
                "not a valid object name",
            ),
            (
                "v",
                "/var/lib/kubelet/t",
                true,
                ctx(&[
                    ("modelWrapper", "bert"),
                    (POD_NAMESPACE, "ml"),
                    (POD_NAME, "p"),
                    (POD_UID, "u"),
                ]),
                "ephemeral=true is missing",
            ),
            (
                "v",
                "/var/lib/kubelet/t",
                true,
                ctx(&[("modelWrapper", "bert"), (POD_NAMESPACE, "ml"), (EPHEMERAL, "true")]),
                "pod.uid are required",
            ),
            (
                "v",
                "/var/lib/kubelet/t",
                true,
                ctx(&[("modelWrapper", "bert"), ("catalog", "true"), (POD_NAMESPACE, "ml")]),
                "use two volumes",
            ),
            (
                "v",
                "/var/lib/kubelet/t",
                true,
                ctx(&[("catalog", "yes"), (POD_NAMESPACE, "ml")]),
                "(quoted)",
            ),
        ];
        for (id, target, ro, c, want) in cases {
            let err = check_publish(id, target, ro, &c, k).unwrap_err().0;
            assert!(err.contains(want), "{target}: {err:?} lacks {want:?}");
        }
    }
}
