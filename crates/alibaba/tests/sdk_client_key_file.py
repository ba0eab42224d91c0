"""Drives a running `kmsgate serve` with Alibaba's instance SDK (PyPI alibabacloud-dkms-gcs) configured the
vendor's way: Config(client_key_file=<clientKey_KAAP.<uuid>.json>, password=<its _Password.txt>), the files
`kmsgate alibaba client-keys create` wrote. Prints one JSON object; crates/server/tests/alibaba_process.rs
asserts on it.

argv: mode endpoint client_key_file password_file [key_id]
modes:
  use            Encrypt/Decrypt round trip and GenerateRandom, signed with the PKCS#12 key
  algorithms     AES_GCM (default), AES_CBC and AES_ECB with PKCS7_PADDING / NO_PADDING, cross-checked
  throttle       a ClientKey with a small QPS limit: 429 Rejected.Throttling without retries; with the SDK's
                 default retries every call succeeds in bounded time
  wait-disabled  Encrypt every 50 ms until the gateway refuses the key (it was disabled by the CLI)
"""
import json
import sys
import time

from openapi.models import Config
from openapi_util.models import RuntimeOptions
from sdk.client import Client
from sdk import models as g

mode, endpoint, key_file, password_file = sys.argv[1:5]
key_id = sys.argv[5] if len(sys.argv) > 5 else None
password = open(password_file).read()
client = Client(Config(protocol="http", endpoint=endpoint, client_key_file=key_file, password=password))
out = {}


def error(fn, with_message=False):
    """(code, httpCode, requestId present) of the TeaException fn raises, as the SDK parsed our envelope."""
    try:
        fn()
    except Exception as ex:  # TeaException, or UnretryableException wrapping one
        ex = getattr(ex, "inner_exception", None) or ex
        data = getattr(ex, "data", None) or {}
        r = [getattr(ex, "code", None), data.get("httpCode"), bool(data.get("requestId"))]
        return r + [getattr(ex, "message", None)] if with_message else r
    return ["no error", None, False] + ([None] if with_message else [])


def xor(a, b):
    return bytes(x ^ y for x, y in zip(a, b))


if mode == "use":
    e = client.encrypt(g.EncryptRequest(key_id=key_id, plaintext=b"from the client key file", aad=b"ctx"))
    d = client.decrypt(g.DecryptRequest(key_id=key_id, ciphertext_blob=e.ciphertext_blob, iv=e.iv, aad=b"ctx"))
    out["decrypt"] = d.plaintext.decode()
    out["random_len"] = len(client.generate_random(g.GenerateRandomRequest(length=16)).random)
    # The wrapper (alibabacloud-kms-python-sdk) with the same files.
    from alibabacloud_kms_kms20160120.transfer_client import TransferClient
    from alibabacloud_kms_kms20160120.models import KmsConfig
    from alibabacloud_kms20160120 import models as m
    t = TransferClient(kms_config=KmsConfig(protocol="http", endpoint=endpoint, client_key_file=key_file,
                                            password=password))
    te = t.encrypt(m.EncryptRequest(key_id=key_id, plaintext="via the wrapper"))
    out["transfer_decrypt"] = t.decrypt(m.DecryptRequest(ciphertext_blob=te.body.ciphertext_blob)).body.plaintext

elif mode == "algorithms":
    def enc(alg, pad, pt, iv=None):
        return client.encrypt(g.EncryptRequest(key_id=key_id, plaintext=pt, algorithm=alg, padding_mode=pad, iv=iv))

    def dec(alg, pad, ct, iv=None):
        return client.decrypt(g.DecryptRequest(key_id=key_id, ciphertext_blob=ct, algorithm=alg, padding_mode=pad,
                                               iv=iv)).plaintext

    msg = b"twenty-one bytes!!!!!"  # not a multiple of 16
    block2 = b"0123456789abcdef" * 2
    gcm = enc(None, None, msg)
    out["gcm_default"] = [gcm.algorithm, len(gcm.iv), dec(None, None, gcm.ciphertext_blob, gcm.iv) == msg]
    # CBC with PKCS#7: 21 bytes pad to 32; the server chooses a 16-byte IV.
    cbc = enc("AES_CBC", "PKCS7_PADDING", msg)
    out["cbc_pkcs7"] = [cbc.algorithm, cbc.padding_mode, len(cbc.iv), len(cbc.ciphertext_blob),
                        dec("AES_CBC", "PKCS7_PADDING", cbc.ciphertext_blob, cbc.iv) == msg]
    # The padding mode defaults to PKCS#7.
    cbc_default = enc("AES_CBC", None, msg, cbc.iv)
    out["cbc_default_padding_is_pkcs7"] = cbc_default.ciphertext_blob == cbc.ciphertext_blob
    # CBC without padding, caller IV: the first block must equal ECB(P0 xor IV), the second ECB(P1 xor C0).
    iv = bytes(range(16))
    raw = enc("AES_CBC", "NO_PADDING", block2, iv)
    ecb = enc("AES_ECB", "NO_PADDING", xor(block2[:16], iv) + xor(block2[16:], raw.ciphertext_blob[:16]))
    out["cbc_is_cbc"] = [len(raw.ciphertext_blob), raw.ciphertext_blob == ecb.ciphertext_blob, raw.iv == iv]
    out["cbc_no_padding_opens"] = dec("AES_CBC", "NO_PADDING", raw.ciphertext_blob, iv) == block2
    # ECB: equal blocks encrypt equally, and PKCS#7 adds a full block to 32 bytes.
    e2 = enc("AES_ECB", "NO_PADDING", b"A" * 32)
    out["ecb_equal_blocks"] = [len(e2.iv), e2.ciphertext_blob[:16] == e2.ciphertext_blob[16:]]
    e3 = enc("AES_ECB", "PKCS7_PADDING", block2)
    out["ecb_pkcs7"] = [len(e3.ciphertext_blob), dec("AES_ECB", "PKCS7_PADDING", e3.ciphertext_blob) == block2]
    # Errors: no padding on a partial block; a 12-byte IV for CBC; an unknown padding mode; Aad with CBC.
    out["err_partial_block"] = error(lambda: enc("AES_CBC", "NO_PADDING", msg))
    out["err_cbc_iv"] = error(lambda: enc("AES_CBC", "PKCS7_PADDING", msg, b"x" * 12))
    out["err_padding_mode"] = error(lambda: enc("AES_CBC", "ZERO_PADDING", msg))
    out["err_cbc_aad"] = error(lambda: client.encrypt(g.EncryptRequest(
        key_id=key_id, plaintext=msg, algorithm="AES_CBC", aad=b"ctx")))
    out["err_bad_padding"] = error(lambda: dec("AES_CBC", "PKCS7_PADDING", raw.ciphertext_blob, iv))

elif mode == "throttle":
    no_retry = RuntimeOptions(autoretry=False)
    codes = []
    # Different bodies, so no two requests carry the same signature (that would be refused as a replay).
    for n in range(4):
        codes.append(error(lambda: client.generate_random_with_options(
            g.GenerateRandomRequest(length=4 + n), no_retry), with_message=True))
    out["burst"] = codes
    # With the SDK's defaults (4 attempts, 1 s apart) a throttled call is retried until a token is back.
    started = time.monotonic()
    ok = 0
    for n in range(3):
        if len(client.generate_random(g.GenerateRandomRequest(length=10 + n)).random) == 10 + n:
            ok += 1
    out["retried_ok"] = ok
    out["retried_secs"] = time.monotonic() - started

elif mode == "wait-disabled":
    started = time.monotonic()
    attempts = 0
    result = ["no error", None, False]
    while time.monotonic() - started < 10:
        attempts += 1
        # A fresh plaintext each time: an identical request within the same second would be a replay.
        result = error(lambda: client.encrypt(g.EncryptRequest(key_id=key_id, plaintext=b"x%d" % attempts)))
        if result[0] != "no error":
            break
        time.sleep(0.05)
    out["error"] = result
    out["attempts"] = attempts
    out["secs"] = time.monotonic() - started

print(json.dumps(out))
