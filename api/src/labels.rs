//! Label, annotation and driver names. One place, so a rename cannot drift.

/// API group of every zerocopy kind.
pub const GROUP: &str = "zerocopy.dev";
/// Served version.
pub const VERSION: &str = "v1alpha1";
/// CSI driver name pods reference in `volumes[].csi.driver`.
pub const CSI_DRIVER: &str = "csi.zerocopy.dev";
/// Prefix of every label and annotation the project writes.
pub const PREFIX: &str = "zerocopy.dev/";
/// Label on a ModelReplica naming the node it is placed on.
pub const NODE_LABEL: &str = "zerocopy.dev/node";
/// `volumeAttributes` key naming the ModelWrapper to mount.
pub const VOLUME_ATTRIBUTE_WRAPPER: &str = "modelWrapper";
/// `volumeAttributes.catalog: "true"`: mount every wrapper of the pod's
/// namespace that is Ready on the node, and those that become Ready later.
pub const VOLUME_ATTRIBUTE_CATALOG: &str = "catalog";
/// Node label prefix set where a wrapper is Ready.
pub const READY_LABEL_PREFIX: &str = "ready.zerocopy.dev/";
/// Label on a ModelReplica naming its ModelWrapper.
pub const WRAPPER_LABEL: &str = "zerocopy.dev/wrapper";
/// Lease annotation: the agent's capacity in bytes.
pub const LEASE_CAPACITY: &str = "zerocopy.dev/capacity-bytes";
/// Lease annotation: bytes the agent's generations use.
pub const LEASE_USED: &str = "zerocopy.dev/used-bytes";
/// Agent Lease annotation: who consumes on this node, comma-separated:
/// `<namespace>` for a pod mounting the namespace catalog, `<namespace>/<wrapper>`
/// for a pod mounting one wrapper; kept for a grace period after the last
/// such pod left. Wrappers with `placement: Consumers` go where they are listed.
pub const LEASE_CONSUMERS: &str = "zerocopy.dev/consumers";
/// Field manager of every write the operator makes.
pub const OPERATOR_MANAGER: &str = "zerocopy-operator";
/// Field manager of replica status writes by node agents.
pub const AGENT_MANAGER: &str = "zerocopy-node-agent";
/// Annotation on a ModelWrapper (copied to its ModelReplicas): lowercase hex
/// sha256 of the bearer token an uploader of its `upload:` sources presents.
/// Only someone who may write the ModelWrapper can set it.
pub const UPLOAD_TOKEN_ANNOTATION: &str = "zerocopy.dev/upload-token-sha256";
/// Env var with the mounted pipeline's path.
pub const PATH_ENV: &str = "MODELWRAPPER_PATH";
/// Env var with a ModelTask's input.
pub const TASK_INPUT_ENV: &str = "MODELTASK_INPUT";
/// Env var with a ModelTask's name.
pub const TASK_NAME_ENV: &str = "MODELTASK_NAME";

/// The node label set where `namespace/name` is Ready. Label names are at
/// most 63 characters after the prefix, so long names are shortened with a
/// digest that keeps them unique.
pub fn ready_label(namespace: &str, name: &str) -> String {
    use sha2::Digest;
    let key = format!("{namespace}.{name}");
    let key = if key.len() <= 63 {
        key
    } else {
        let digest = hex::encode(sha2::Sha256::digest(key.as_bytes()));
        format!("{}-{}", &key[..46].trim_end_matches(['.', '-']), &digest[..16])
    };
    format!("{READY_LABEL_PREFIX}{key}")
}

/// Name of the ModelReplica of `wrapper` on `node` (DNS-1123, at most 253).
pub fn replica_name(wrapper: &str, node: &str) -> String {
    use sha2::Digest;
    let name = format!("{wrapper}.{node}");
    if name.len() <= 253 {
        return name;
    }
    let digest = hex::encode(sha2::Sha256::digest(name.as_bytes()));
    format!("{}.{}", &name[..200].trim_end_matches(['.', '-']), &digest[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_labels_fit_label_rules() {
        assert_eq!(ready_label("ml", "bert"), "ready.zerocopy.dev/ml.bert");
        let long = ready_label(
            "a-very-long-namespace-name-for-tests",
            "and-a-very-long-wrapper-name-too",
        );
        let key = long.strip_prefix(READY_LABEL_PREFIX).unwrap();
        assert!(key.len() <= 63, "{key}");
        assert_ne!(
            long,
            ready_label(
                "a-very-long-namespace-name-for-tests",
                "and-a-very-long-wrapper-name-to0"
            )
        );
    }
}
