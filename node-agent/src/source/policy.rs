//! Which sources the agent may read: deny by default in a cluster, allow by
//! chart value. A tenant writes the URIs; the agent is privileged and root,
//! so a URI must never reach node files, cloud metadata or internal services
//! unless the cluster admin said so (docs/security.md).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ipnet::IpNet;

/// What sources a fill may read, set by flags (chart values), never by a spec.
#[derive(Debug, Clone)]
pub struct SourcePolicy {
    /// Every source needs a sha256 (cluster mode): skeletons are pickles
    /// that run code in every pod that loads them.
    pub require_sha256: bool,
    /// `file://` only below these directories; `None` allows any path
    /// (standalone: the machine's own user wrote the YAML).
    pub file_dirs: Option<Vec<PathBuf>>,
    /// Loopback, private and other internal addresses are allowed (standalone).
    pub allow_internal: bool,
    /// Internal networks the admin allowed anyway (e.g. an in-cluster MinIO).
    pub allowed_networks: Vec<IpNet>,
    /// Honour HTTP(S)_PROXY from the environment. A proxy resolves the names
    /// itself, past the checks here, so in a cluster it is opt-in and the
    /// proxy must enforce the same egress rules.
    pub use_env_proxy: bool,
}

impl SourcePolicy {
    /// Standalone: the YAML's author owns the machine; only link-local and
    /// metadata addresses stay blocked.
    pub fn standalone() -> Self {
        Self {
            require_sha256: false,
            file_dirs: None,
            allow_internal: true,
            allowed_networks: Vec::new(),
            use_env_proxy: true,
        }
    }

    /// Cluster (`run`): pinned sources, no node files but below `file_dirs`,
    /// no internal addresses but in `allowed_networks`.
    pub fn cluster(file_dirs: Vec<PathBuf>, allowed_networks: Vec<IpNet>) -> Self {
        Self {
            require_sha256: true,
            file_dirs: Some(file_dirs),
            allow_internal: false,
            allowed_networks,
            use_env_proxy: false,
        }
    }

    /// Why `ip` may not be fetched from, or `None` when it may.
    pub fn refuse_address(&self, ip: IpAddr) -> Option<String> {
        let ip = canonical(ip);
        match classify(ip) {
            AddressClass::Public => None,
            AddressClass::Forbidden(what) => Some(format!(
                "{ip} is {what}; the agent never fetches from it (cloud metadata and link-local services hold node credentials)"
            )),
            AddressClass::Internal(what) => {
                if self.allow_internal || self.allowed_networks.iter().any(|n| n.contains(&ip)) {
                    None
                } else {
                    Some(format!(
                        "{ip} is {what}; internal addresses are refused unless the cluster admin allows the network (chart value sources.allowNetworks, agent flag --allow-network CIDR)"
                    ))
                }
            }
        }
    }

    /// Where a `file://` path may be read from: `(allowed dir, path relative
    /// to it)`, or why not. The caller opens the relative path beneath the
    /// directory without following symlinks.
    pub fn file_location(&self, path: &Path) -> Result<Option<(PathBuf, PathBuf)>, String> {
        let Some(dirs) = &self.file_dirs else {
            return Ok(None);
        };
        for dir in dirs {
            if let Ok(rel) = path.strip_prefix(dir) {
                if !rel.as_os_str().is_empty() {
                    return Ok(Some((dir.clone(), rel.to_path_buf())));
                }
            }
        }
        let allowed = if dirs.is_empty() {
            "none is allowed".to_string()
        } else {
            format!(
                "allowed: {}",
                dirs.iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        Err(format!(
            "file:// sources in a cluster read the node's disk and are refused outside the host directories the cluster admin allowed ({allowed}; chart value sources.allowFileDirs, agent flag --allow-file-dir); publish the file over https or put it below an allowed directory"
        ))
    }
}

enum AddressClass {
    Public,
    Internal(&'static str),
    Forbidden(&'static str),
}

/// IPv6 addresses that carry an IPv4 address are judged as that IPv4:
/// IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`), NAT64's
/// well-known prefix (`64:ff9b::/96`, where DNS64 puts every A record, 10.x
/// included) and 6to4 (`2002:aabb:ccdd::/48`).
fn canonical(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else { return ip };
    if v6.is_loopback() || v6.is_unspecified() {
        return ip;
    }
    let seg = v6.segments();
    let embedded = |hi: u16, lo: u16| IpAddr::V4(Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo)));
    if let Some(v4) = v6.to_ipv4() {
        return IpAddr::V4(v4); // mapped or compatible
    }
    if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return embedded(seg[6], seg[7]);
    }
    if seg[0] == 0x2002 {
        return embedded(seg[1], seg[2]);
    }
    ip
}

fn classify(ip: IpAddr) -> AddressClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn in_v4(ip: Ipv4Addr, net: [u8; 4], prefix: u32) -> bool {
    let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
    (u32::from(ip) & mask) == (u32::from(Ipv4Addr::from(net)) & mask)
}

fn classify_v4(ip: Ipv4Addr) -> AddressClass {
    if ip.is_link_local() {
        return AddressClass::Forbidden("link-local (169.254.0.0/16, cloud metadata)");
    }
    if ip.is_unspecified() || in_v4(ip, [0, 0, 0, 0], 8) {
        return AddressClass::Forbidden("an unspecified address (0.0.0.0/8 reaches this host)");
    }
    if ip.is_multicast() || ip.is_broadcast() {
        return AddressClass::Forbidden("multicast or broadcast");
    }
    if ip.is_loopback() {
        return AddressClass::Internal("loopback");
    }
    if ip.is_private() {
        return AddressClass::Internal("a private address (10/8, 172.16/12, 192.168/16)");
    }
    if in_v4(ip, [100, 64, 0, 0], 10) {
        return AddressClass::Internal("shared address space (100.64.0.0/10)");
    }
    if in_v4(ip, [192, 0, 0, 0], 24) || in_v4(ip, [198, 18, 0, 0], 15) || in_v4(ip, [240, 0, 0, 0], 4) {
        return AddressClass::Internal("a reserved address");
    }
    AddressClass::Public
}

fn classify_v6(ip: Ipv6Addr) -> AddressClass {
    let seg = ip.segments();
    // AWS's IPv6 instance metadata endpoint.
    if ip == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
        return AddressClass::Forbidden("the cloud metadata address fd00:ec2::254");
    }
    if (seg[0] & 0xffc0) == 0xfe80 {
        return AddressClass::Forbidden("link-local (fe80::/10)");
    }
    if ip.is_unspecified() {
        return AddressClass::Forbidden("the unspecified address");
    }
    if ip.is_multicast() {
        return AddressClass::Forbidden("multicast");
    }
    if ip.is_loopback() {
        return AddressClass::Internal("loopback");
    }
    if (seg[0] & 0xfe00) == 0xfc00 {
        return AddressClass::Internal("a unique local address (fc00::/7)");
    }
    if (seg[0] & 0xffc0) == 0xfec0 {
        return AddressClass::Internal("a site-local address (fec0::/10)");
    }
    if seg[..3] == [0x64, 0xff9b, 1] {
        return AddressClass::Internal("a local-use NAT64 address (64:ff9b:1::/48)");
    }
    AddressClass::Public
}

/// A request the source policy refused inside an HTTP client (the resolver
/// below, object_store's connector). It travels through the client's chain
/// of error sources and is found again by type, not by its text.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct PolicyRefusal {
    pub message: String,
    /// Refused because a host name resolved to a refused address. Such a
    /// refusal is retried with backoff: DNS answers change (split-horizon
    /// views, failovers), unlike a refused IP literal, scheme or path.
    pub by_resolution: bool,
}

impl PolicyRefusal {
    /// The refusal somewhere in `e` or its sources, if any.
    pub fn find<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a PolicyRefusal> {
        let mut cur = Some(e);
        while let Some(err) = cur {
            if let Some(refusal) = err.downcast_ref::<PolicyRefusal>() {
                return Some(refusal);
            }
            cur = err.source();
        }
        None
    }
}

/// A resolver that resolves once and hands reqwest only checked addresses,
/// so the connection goes exactly where the check looked (no DNS rebinding).
#[derive(Debug)]
pub struct CheckedResolver {
    policy: Arc<SourcePolicy>,
}

impl CheckedResolver {
    /// A resolver enforcing `policy`.
    pub fn new(policy: Arc<SourcePolicy>) -> Self {
        Self { policy }
    }
}

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            // Any refused address refuses the name: a name that mixes public
            // and internal answers is how rebinding attacks start.
            if let Some(reason) = addrs.iter().find_map(|a| policy.refuse_address(a.ip())) {
                let refused: Box<dyn std::error::Error + Send + Sync> = Box::new(PolicyRefusal {
                    message: format!("host {host} resolves to a refused address: {reason}"),
                    by_resolution: true,
                });
                return Err(refused);
            }
            if addrs.is_empty() {
                return Err(format!("host {host} has no addresses").into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

/// Checks one URL the agent is about to request (the first, or a redirect
/// hop): scheme, and the address when the host is an IP literal (reqwest
/// does not resolve those, so [`CheckedResolver`] never sees them).
pub fn check_url(policy: &SourcePolicy, url: &url::Url) -> Result<(), String> {
    match url.scheme() {
        "http" | "https" => {}
        other => return Err(format!("scheme {other}:// is not fetched over HTTP")),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("credentials in the URL are not accepted; use a presigned URL or a credentials Secret".into());
    }
    let ip = match url.host() {
        Some(url::Host::Ipv4(v4)) => Some(IpAddr::V4(v4)),
        Some(url::Host::Ipv6(v6)) => Some(IpAddr::V6(v6)),
        Some(url::Host::Domain(_)) => None,
        None => return Err("the URL has no host".into()),
    };
    match ip.and_then(|ip| policy.refuse_address(ip)) {
        Some(reason) => Err(reason),
        None => Ok(()),
    }
}

/// The redirect rule: at most 10 hops, each checked like the first, and never
/// from https down to http.
pub fn redirect_policy(policy: Arc<SourcePolicy>) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() >= 10 {
            return attempt.error("more than 10 redirects");
        }
        let downgrade = attempt.previous().iter().any(|u| u.scheme() == "https") && attempt.url().scheme() != "https";
        if downgrade {
            let msg = format!("redirect from https to {} refused (a downgrade)", attempt.url());
            return attempt.error(msg);
        }
        match check_url(&policy, attempt.url()) {
            Ok(()) => attempt.follow(),
            Err(reason) => {
                let msg = format!("redirect to {} refused: {reason}", attempt.url());
                attempt.error(msg)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn metadata_and_link_local_are_refused_in_every_mode() {
        let standalone = SourcePolicy::standalone();
        let everything = SourcePolicy::cluster(vec![], vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()]);
        for addr in [
            "169.254.169.254",
            "169.254.170.2",
            "fd00:ec2::254",
            "fe80::1",
            "0.0.0.0",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
            "::",
        ] {
            for p in [&standalone, &everything] {
                let why = p.refuse_address(ip(addr)).unwrap_or_else(|| panic!("{addr} allowed"));
                assert!(why.contains("never fetches"), "{why}");
            }
        }
    }

    #[test]
    fn internal_addresses_need_an_allowed_network_in_a_cluster() {
        let p = SourcePolicy::cluster(vec![], vec![]);
        for addr in [
            "127.0.0.1",
            "::1",
            "10.1.2.3",
            "172.20.0.1",
            "192.168.1.1",
            "100.64.0.10",
            "fd12::1",
            "::ffff:127.0.0.1",
        ] {
            let why = p.refuse_address(ip(addr)).unwrap_or_else(|| panic!("{addr} allowed"));
            assert!(why.contains("--allow-network"), "{why}");
        }
        assert!(p.refuse_address(ip("93.184.216.34")).is_none());
        assert!(p.refuse_address(ip("2606:2800:220:1::1")).is_none());
        let minio = SourcePolicy::cluster(vec![], vec!["10.96.0.0/12".parse().unwrap()]);
        assert!(minio.refuse_address(ip("10.96.5.5")).is_none());
        assert!(minio.refuse_address(ip("10.1.2.3")).is_some());
        assert!(SourcePolicy::standalone().refuse_address(ip("127.0.0.1")).is_none());
    }

    #[test]
    fn urls_with_ip_literals_and_odd_schemes_are_checked() {
        let p = SourcePolicy::cluster(vec![], vec![]);
        let check = |u: &str| check_url(&p, &url::Url::parse(u).unwrap());
        assert!(check("http://169.254.169.254/latest/meta-data/").is_err());
        assert!(check("http://[::1]:8080/x").is_err());
        assert!(check("http://user:pw@example.com/x").is_err());
        assert!(check("ftp://example.com/x").is_err());
        assert!(check("https://example.com/x").is_ok());
    }

    #[test]
    fn file_paths_must_lie_below_an_allowed_directory() {
        let p = SourcePolicy::cluster(vec![PathBuf::from("/mnt/models")], vec![]);
        assert_eq!(
            p.file_location(Path::new("/mnt/models/a/b.safetensors")).unwrap(),
            Some((PathBuf::from("/mnt/models"), PathBuf::from("a/b.safetensors")))
        );
        let why = p
            .file_location(Path::new("/var/lib/kubelet/pki/kubelet-client-current.pem"))
            .unwrap_err();
        assert!(why.contains("--allow-file-dir") && why.contains("/mnt/models"), "{why}");
        assert!(
            p.file_location(Path::new("/mnt/models")).is_err(),
            "the directory itself is no file"
        );
        assert!(p.file_location(Path::new("/mnt/models-other/x")).is_err());
        let none = SourcePolicy::cluster(vec![], vec![]);
        assert!(none
            .file_location(Path::new("/x"))
            .unwrap_err()
            .contains("none is allowed"));
        assert_eq!(SourcePolicy::standalone().file_location(Path::new("/x")).unwrap(), None);
    }
}
