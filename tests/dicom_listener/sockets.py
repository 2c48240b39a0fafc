"""Raw-socket peers and quick probes for the listener tests."""

from __future__ import annotations

import select
import socket
import struct
import subprocess
import time
from io import BytesIO

from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.peers import dcmtk

LOOPBACK = "127.0.0.1"


def associate_rq(
    calling: str = "MODALITY", called: str = "GATEWAY", context: tuple[str, str] | None = None
) -> bytes:
    """A valid A-ASSOCIATE-RQ PDU proposing Verification (or ``context``: abstract syntax, transfer syntax),
    as a modality would send it."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16382
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.3.0.4"
    primitive.user_information = [max_length, implementation]
    proposed = build_context(Verification) if context is None else build_context(*context)
    proposed.context_id = 1
    primitive.presentation_context_definition_list = [proposed]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def store_partially(port: int, ds: Dataset, calling: str = "PYNETDICOM") -> socket.socket:
    """Associate over a raw socket, send a C-STORE-RQ command and the first fragment of ``ds`` (explicit VR
    little endian), then stop sending; returns the open socket."""
    sock = connect(port)
    sock.sendall(associate_rq(calling, context=(str(ds.SOPClassUID), ExplicitVRLittleEndian)))
    header = _recv_exactly(sock, 6)
    assert header[0] == 0x02, f"association not accepted (PDU type 0x{header[0]:02X})"
    _recv_exactly(sock, struct.unpack(">L", header[2:])[0])
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = ds.SOPClassUID
    request.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.Priority = 2
    encoded = encode(ds, False, True)
    assert encoded is not None, "dataset cannot be encoded"
    request.DataSet = BytesIO(encoded)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    fragments = message.encode_msg(1, 16382)
    for primitive in (next(fragments), next(fragments)):  # the command, the dataset's first fragment
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        sock.sendall(pdu.encode())
    return sock


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "closed by the server"
        data += chunk
    return data


def pdu_header(pdu_type: int, length: int) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, length)


def connect(port: int) -> socket.socket:
    return socket.create_connection((LOOPBACK, port), timeout=10)


def closed_by_server(sock: socket.socket, within: float) -> bytes | None:
    """Everything the server sent before closing ``sock``, or None if it is still open after ``within`` s."""
    received = b""
    deadline = time.monotonic() + within
    while (remaining := deadline - time.monotonic()) > 0:
        if not select.select([sock], [], [], remaining)[0]:
            return None
        try:
            chunk = sock.recv(65536)
        except OSError:
            return received
        if not chunk:
            return received
        received += chunk
    return None


def echo(port: int, calling: str = "PYNETDICOM", timeout: float = 10) -> int | None:
    """C-ECHO with pynetdicom; the status, or None if no association."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    assoc = ae.associate(LOOPBACK, port, ae_title="GATEWAY")
    if not assoc.is_established:
        return None
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def echoscu(port: int, calling: str = "MODALITY") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dcmtk("echoscu"), "-to", "10", "-aet", calling, "-aec", "GATEWAY", LOOPBACK, str(port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
