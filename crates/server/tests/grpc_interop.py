"""Google's gRPC implementation (grpcio, C core) as an independent client of kmsgate.

Driven by crates/server/tests/grpc.rs (`python_grpcio_client`):

    grpc_interop.py ADDR CA_PEM CLIENT_PEM CLIENT_KEY PLUGIN_SOCKET

Over mTLS: grpc.health.v1, the kmsgate.v1 messages built from the server's own reflection answers, a key
created, used and rotated, and an error whose google.rpc.Status details grpcio-status validates. Over the KMS
v2 plugin socket: the upstream messages declared here independently. Prints "ok" and exits 0 on success.
"""

import sys

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from grpc_status import rpc_status

addr, ca, cert, key, socket = sys.argv[1:6]


def read(path):
    with open(path, "rb") as f:
        return f.read()


creds = grpc.ssl_channel_credentials(read(ca), read(key), read(cert))
channel = grpc.secure_channel(addr, creds, options=[("grpc.ssl_target_name_override", "localhost")])

# Health.
health = health_pb2_grpc.HealthStub(channel)
assert health.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.SERVING
assert (
    health.Check(health_pb2.HealthCheckRequest(service="kmsgate.v1.KeyManagementService")).status
    == health_pb2.HealthCheckResponse.SERVING
)

# The API's messages, from the server's reflection service.
pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
kms = pool.FindServiceByName("kmsgate.v1.KeyManagementService")


def msg(name):
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("kmsgate.v1." + name))


def enum(name, value):
    return pool.FindEnumTypeByName("kmsgate.v1." + name).values_by_name[value].number


def call(method, request, timeout=10):
    m = kms.FindMethodByName(method)
    reply = message_factory.GetMessageClass(m.output_type)
    stub = channel.unary_unary(
        "/%s/%s" % (kms.full_name, method),
        request_serializer=lambda r: r.SerializeToString(),
        response_deserializer=reply.FromString,
    )
    return stub(request, timeout=timeout)


created = call("CreateKey", msg("CreateKeyRequest")(spec=enum("KeySpec", "KEY_SPEC_AES_256"), aliases=["alias/py"]))
key_id = created.key.key_id
assert created.key.state == enum("KeyState", "KEY_STATE_ENABLED")

e = call("Encrypt", msg("EncryptRequest")(key_id="alias/py", plaintext=b"from python", aad=b"ctx"))
assert e.key_id == key_id and len(e.iv) == 12 and len(e.tag) == 16
call("RotateKey", msg("RotateKeyRequest")(key_id=key_id))
d = call(
    "Decrypt",
    msg("DecryptRequest")(
        key_id=e.key_id, key_version=e.key_version, iv=e.iv, ciphertext=e.ciphertext, tag=e.tag, aad=b"ctx"
    ),
)
assert d.plaintext == b"from python", d

r = call("Random", msg("RandomRequest")(length=24), timeout=5)
assert len(r.random) == 24

# An error: the code, and rich details that grpcio-status accepts (code and message must match the call's).
try:
    call("DescribeKey", msg("DescribeKeyRequest")(key_id="no-such-key"))
    raise AssertionError("DescribeKey of an unknown key succeeded")
except grpc.RpcError as err:
    assert err.code() == grpc.StatusCode.NOT_FOUND, err
    status = rpc_status.from_call(err)
    assert status is not None, "no grpc-status-details-bin"
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert (info.reason, info.domain) == ("key_not_found", "kmsgate"), info

unknown = channel.unary_unary(
    "/kmsgate.v1.KeyManagementService/NoSuchMethod",
    request_serializer=lambda r: r.SerializeToString(),
    response_deserializer=msg("KeyResponse").FromString,
)
try:
    unknown(msg("DisableKeyRequest")(key_id=key_id), timeout=5)
    raise AssertionError("an unknown method succeeded")
except grpc.RpcError as err:
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED, err

# The Kubernetes KMS v2 plugin, with the upstream messages declared here (package v2, upstream numbers).
fdp = descriptor_pb2.FileDescriptorProto(name="upstream_kms_v2.proto", package="v2", syntax="proto3")
STRING = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
BYTES = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
OPTIONAL = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
for name, fields in [
    ("StatusRequest", []),
    ("StatusResponse", [("version", 1, STRING), ("healthz", 2, STRING), ("key_id", 3, STRING)]),
    ("EncryptRequest", [("plaintext", 1, BYTES), ("uid", 2, STRING)]),
    ("EncryptResponse", [("ciphertext", 1, BYTES), ("key_id", 2, STRING)]),
    ("DecryptRequest", [("ciphertext", 1, BYTES), ("uid", 2, STRING), ("key_id", 3, STRING)]),
    ("DecryptResponse", [("plaintext", 1, BYTES)]),
]:
    m = fdp.message_type.add(name=name)
    for fname, number, ftype in fields:
        m.field.add(name=fname, number=number, type=ftype, label=OPTIONAL)
upstream = descriptor_pool.DescriptorPool()
upstream.Add(fdp)


def v2(name):
    return message_factory.GetMessageClass(upstream.FindMessageTypeByName("v2." + name))


# grpc C core sends the socket path as :authority by default, which HTTP/2 servers (hyper's h2 here) refuse as a
# malformed authority; the kube-apiserver (grpc-go) sends "localhost", as this does.
plugin = grpc.insecure_channel("unix:" + socket, options=[("grpc.default_authority", "localhost")])


def plugin_call(method, request, reply):
    stub = plugin.unary_unary(
        "/v2.KeyManagementService/" + method,
        request_serializer=lambda r: r.SerializeToString(),
        response_deserializer=v2(reply).FromString,
    )
    return stub(request, timeout=5)


st = plugin_call("Status", v2("StatusRequest")(), "StatusResponse")
assert (st.version, st.healthz) == ("v2", "ok"), st
enc = plugin_call("Encrypt", v2("EncryptRequest")(plaintext=b"dek-from-python", uid="py"), "EncryptResponse")
assert enc.key_id == st.key_id and len(enc.ciphertext) < 1024
dec = plugin_call(
    "Decrypt", v2("DecryptRequest")(ciphertext=enc.ciphertext, uid="py", key_id=enc.key_id), "DecryptResponse"
)
assert dec.plaintext == b"dek-from-python"

print("ok")
