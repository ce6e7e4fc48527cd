//! The CSI socket: a stale socket is removed, the new one is bound with mode
//! 0600 (only root, i.e. kubelet and the registrar, may talk to it).

use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use super::identity::IdentityService;
use super::node::NodeService;
use super::proto::identity_server::IdentityServer;
use super::proto::node_server::NodeServer;

/// Unix socket paths stop near 108 bytes (sun_path).
const MAX_SOCKET_PATH: usize = 107;

/// Binds the socket, removing a stale one; refuses when another process
/// still answers on it.
pub async fn bind(socket: &Path) -> io::Result<UnixListener> {
    if socket.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "socket path {} is longer than {MAX_SOCKET_PATH} bytes; use a shorter --csi-socket",
                socket.display()
            ),
        ));
    }
    if let Some(parent) = socket.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::symlink_metadata(socket) {
        Ok(m) if m.file_type().is_socket() => {
            if tokio::net::UnixStream::connect(socket).await.is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is served by another process; stop it first", socket.display()),
                ));
            }
            tracing::info!(socket = %socket.display(), "removing stale CSI socket");
            std::fs::remove_file(socket)?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket; refusing to remove it", socket.display()),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // No window in which the socket is reachable with wider permissions.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(socket);
    nix::sys::stat::umask(old);
    let listener = bound?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves Identity and Node on `listener` until `shutdown` resolves, then
/// removes the socket file.
pub async fn serve(
    socket: &Path,
    listener: UnixListener,
    identity: IdentityService,
    node: NodeService,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    tracing::info!(socket = %socket.display(), "serving CSI");
    let result = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(identity))
        .add_service(NodeServer::new(node))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await;
    let _ = std::fs::remove_file(socket);
    result
}
