"""Drives kmsgate's Alibaba instance API with Alibaba's own SDKs (PyPI: alibabacloud-dkms-gcs and the
alibabacloud-kms-python-sdk TransferClient) over HTTPS with the gateway's CA. Prints one JSON object of results;
the Rust test (crates/server/tests/alibaba_interop.rs) asserts on it.

argv: endpoint ca_file client_key_id private_key_file other_private_key_file json_of_key_ids
"""
import json
import sys
import time

from openapi.models import Config
from sdk.client import Client
from sdk import models as g
from alibabacloud_tea_util.client import Client as UtilClient
from alibabacloud_kms_kms20160120.transfer_client import TransferClient
from alibabacloud_kms_kms20160120.models import KmsConfig
from alibabacloud_kms20160120 import models as m

endpoint, ca, kid, key_file, other_key_file, ids = sys.argv[1:7]
ids = json.loads(ids)
out = {}


def client(key_id=kid, key_path=key_file):
    return Client(Config(protocol="https", endpoint=endpoint, access_key_id=key_id,
                         private_key=open(key_path).read(), ca_file_path=ca))


def error(fn):
    """(code, httpCode, requestId present) of the TeaException fn raises; the SDK's own parsing of our envelope."""
    try:
        fn()
    except Exception as ex:  # TeaException, or UnretryableException wrapping one
        ex = getattr(ex, "inner_exception", None) or ex
        data = getattr(ex, "data", None) or {}
        return [getattr(ex, "code", None), data.get("httpCode"), bool(data.get("requestId"))]
    return ["no error", None, False]


c = client()
aes, rsa, ec = ids["aes"], ids["rsa"], ids["ec"]

e = c.encrypt(g.EncryptRequest(key_id=aes, plaintext=b"hello", aad=b"ctx"))
out["decrypt"] = c.decrypt(g.DecryptRequest(key_id=aes, ciphertext_blob=e.ciphertext_blob, iv=e.iv, aad=b"ctx")).plaintext.decode()
ae = c.advance_encrypt(g.AdvanceEncryptRequest(key_id=aes, plaintext=b"advance"))
out["advance_decrypt"] = c.advance_decrypt(g.AdvanceDecryptRequest(ciphertext_blob=ae.ciphertext_blob)).plaintext.decode()
out["random_len"] = len(c.generate_random(g.GenerateRandomRequest(length=32)).random)
dk = c.generate_data_key(g.GenerateDataKeyRequest(key_id=aes, number_of_bytes=32))
out["data_key_opens"] = c.decrypt(g.DecryptRequest(key_id=aes, ciphertext_blob=dk.ciphertext_blob, iv=dk.iv)).plaintext == dk.plaintext
adk = c.advance_generate_data_key(g.AdvanceGenerateDataKeyRequest(key_id=aes, number_of_bytes=16))
out["advance_data_key_opens"] = c.advance_decrypt(g.AdvanceDecryptRequest(ciphertext_blob=adk.ciphertext_blob)).plaintext == adk.plaintext
for alg, key in (("RSA_PKCS1_SHA_256", rsa), ("RSA_PSS_SHA_256", rsa), ("ECDSA_SHA_256", ec)):
    s = c.sign(g.SignRequest(key_id=key, algorithm=alg, message=b"msg", message_type="RAW"))
    out["verify_" + alg] = c.verify(g.VerifyRequest(key_id=key, algorithm=alg, message=b"msg", message_type="RAW",
                                                    signature=s.signature)).value
out["public_key"] = c.get_public_key(g.GetPublicKeyRequest(key_id=rsa)).public_key.startswith("-----BEGIN PUBLIC KEY-----")
sv = c.get_secret_value(g.GetSecretValueRequest(secret_name="app/db"))
out["secret"] = [sv.secret_data, sv.version_stages]
sv = c.get_secret_value(g.GetSecretValueRequest(secret_name="app/db", version_stage="ACSPrevious"))
out["secret_previous"] = [sv.secret_data, sv.version_stages]

for api, req in (("generate_data_key_pair", g.GenerateDataKeyPairRequest(key_id=aes, key_pair_spec="RSA_2048", key_format="PEM")),
                 ("advance_generate_data_key_pair", g.AdvanceGenerateDataKeyPairRequest(key_id=aes, key_pair_spec="EC_P256"))):
    resp = getattr(c, api)(req)
    out[api] = resp.private_key_plaintext.startswith(b"-----BEGIN PRIVATE KEY-----") and resp.public_key.startswith(b"-----BEGIN PUBLIC KEY-----")
wp = c.advance_generate_data_key_pair_without_plaintext(g.AdvanceGenerateDataKeyPairWithoutPlaintextRequest(key_id=aes, key_pair_spec="EC_P256"))
out["advance_pair_opens"] = c.advance_decrypt(g.AdvanceDecryptRequest(ciphertext_blob=wp.private_key_ciphertext_blob)).plaintext.startswith(b"-----BEGIN PRIVATE KEY-----")
wp = c.generate_data_key_pair_without_plaintext(g.GenerateDataKeyPairWithoutPlaintextRequest(key_id=aes, key_pair_spec="RSA_2048"))
out["pair_opens"] = c.decrypt(g.DecryptRequest(key_id=aes, ciphertext_blob=wp.private_key_ciphertext_blob, iv=wp.iv)).plaintext.startswith(b"-----BEGIN PRIVATE KEY-----")

# The wrapper: Encrypt/Decrypt become AdvanceEncrypt/AdvanceDecrypt; legacy handlers need the
# x-kms-migrationkeyversionid response header.
kc = KmsConfig(protocol="https", endpoint=endpoint, client_key_id=kid, private_key=open(key_file).read())
kc.ca_file_path = ca
t = TransferClient(kms_config=kc)
te = t.encrypt(m.EncryptRequest(key_id=aes, plaintext="from the wrapper", encryption_context={"a": "b"}))
out["transfer_decrypt"] = t.decrypt(m.DecryptRequest(ciphertext_blob=te.body.ciphertext_blob,
                                                     encryption_context={"a": "b"})).body.plaintext
out["transfer_data_key"] = len(t.generate_data_key(m.GenerateDataKeyRequest(key_id=aes)).body.plaintext) > 0
out["transfer_public_key"] = t.get_public_key(m.GetPublicKeyRequest(key_id=rsa, key_version_id="x")).body.public_key.startswith("-----BEGIN")
# Encrypt with one SDK, decrypt with the other: the wrapper's AdvanceEncrypt blob is '$'-less base64 of
# version|iv|ciphertext, the same bytes the raw SDK's AdvanceDecrypt takes once the header is re-prepended.
import base64
raw = base64.b64decode(te.body.ciphertext_blob)
out["cross_sdk"] = c.advance_decrypt(g.AdvanceDecryptRequest(
    ciphertext_blob=b"$\x00\x02" + raw, aad=__import__("hashlib").sha256(b"a=b").hexdigest().encode())).plaintext.decode()

# Errors, as the SDK parses them.
out["err_missing_key"] = error(lambda: c.encrypt(g.EncryptRequest(key_id="no-such-key", plaintext=b"x")))
out["err_disabled"] = error(lambda: c.encrypt(g.EncryptRequest(key_id=ids["disabled"], plaintext=b"x")))
out["err_pending_deletion"] = error(lambda: c.encrypt(g.EncryptRequest(key_id=ids["pending"], plaintext=b"x")))
out["err_bad_signature"] = error(lambda: client(kid, other_key_file).generate_random(g.GenerateRandomRequest(length=4)))
out["err_unknown_client_key"] = error(lambda: client("KAAP.00000000-0000-0000-0000-000000000000").generate_random(
    g.GenerateRandomRequest(length=4)))
real_date = UtilClient.get_date_utcstring
UtilClient.get_date_utcstring = staticmethod(
    lambda: time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() - 3600)))
out["err_skewed_date"] = error(lambda: c.generate_random(g.GenerateRandomRequest(length=4)))
UtilClient.get_date_utcstring = real_date
out["err_too_large"] = error(lambda: c.encrypt(g.EncryptRequest(key_id=aes, plaintext=b"x" * (3 * 1024 * 1024 + 10))))
print(json.dumps(out))
