"""The CSI socket from a client built on gRPC C-core (Python grpcio), not
only from grpc-go (kubelet) and tonic (our own tests)."""

from __future__ import annotations

import importlib
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_tools import protoc

from conftest import REPO, agent_bin

PROTO = REPO / "node-agent" / "proto"


@pytest.fixture(scope="module")
def csi(tmp_path_factory: pytest.TempPathFactory):
    """Python stubs generated from the driver's own csi.proto."""
    out = tmp_path_factory.mktemp("csi_stubs")
    well_known = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
    rc = protoc.main(["protoc", f"-I{PROTO}", f"-I{well_known}", f"--python_out={out}", f"--grpc_python_out={out}", str(PROTO / "csi.proto")])
    assert rc == 0, "protoc failed"
    sys.path.insert(0, str(out))
    try:
        yield importlib.import_module("csi_pb2"), importlib.import_module("csi_pb2_grpc")
    finally:
        sys.path.remove(str(out))


@pytest.fixture
def socket(shm: Path):
    wrappers = shm / "wrappers"
    wrappers.mkdir()
    sock = shm / "csi.sock"
    log = open(shm / "agent.log", "w")
    proc = subprocess.Popen(
        [str(agent_bin()), "--root", str(shm / "root"), "--state-dir", str(shm / "state"), "--csi-socket", str(sock),
         "--node-id", "node-py", "standalone", "-q", "--serve", "--publish-wait", "1", "-f", str(wrappers)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while not sock.exists():
            assert proc.poll() is None, (shm / "agent.log").read_text()
            assert time.monotonic() < deadline, "the agent never bound its socket"
            time.sleep(0.1)
        yield sock
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def channel(sock: Path) -> grpc.Channel:
    # C-core sends the percent-encoded socket path as :authority, which the
    # Rust HTTP/2 stack rejects (docs/csi.md); kubelet (grpc-go) sends
    # "localhost", and so must a C-core client.
    return grpc.insecure_channel(f"unix:{sock}", options=[("grpc.default_authority", "localhost")])


def test_a_grpcio_client_calls_identity_and_node(csi, socket: Path) -> None:
    pb, rpc = csi
    with channel(socket) as ch:
        identity = rpc.IdentityStub(ch)
        info = identity.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=30)
        assert info.name == "csi.zerocopy.dev"
        assert identity.Probe(pb.ProbeRequest(), timeout=30).ready.value
        node = rpc.NodeStub(ch)
        assert node.NodeGetInfo(pb.NodeGetInfoRequest(), timeout=30).node_id == "node-py"
        # Errors reach the client as the documented gRPC codes and messages.
        req = pb.NodePublishVolumeRequest(
            volume_id="v1",
            target_path=str(socket.parent / "target"),
            readonly=True,
            volume_capability=pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(),
                                                  access_mode=pb.VolumeCapability.AccessMode(mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_READER_ONLY)),
            volume_context={
                "modelWrapper": "missing",
                "csi.storage.k8s.io/pod.namespace": "ml",
                "csi.storage.k8s.io/pod.name": "p",
                "csi.storage.k8s.io/pod.uid": "u",
                "csi.storage.k8s.io/ephemeral": "true",
            },
        )
        with pytest.raises(grpc.RpcError) as err:
            node.NodePublishVolume(req, timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value.details()
        assert "ml/missing" in err.value.details()


def test_without_the_authority_option_the_call_fails_as_documented(csi, socket: Path) -> None:
    """Pins the documented limitation: if the server ever accepts C-core's
    authority, this fails and docs/csi.md should drop the workaround."""
    pb, rpc = csi
    with grpc.insecure_channel(f"unix:{socket}") as ch:
        with pytest.raises(grpc.RpcError) as err:
            rpc.IdentityStub(ch).GetPluginInfo(pb.GetPluginInfoRequest(), timeout=30)
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "RST_STREAM" in (err.value.details() or "")
