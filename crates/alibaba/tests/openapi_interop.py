"""Drives kmsgate's Alibaba KMS OpenAPI (RPC, 2016-01-20) with Alibaba's own SDKs from PyPI:
alibabacloud-kms20160120 on tea-openapi (ACS3-HMAC-SHA256 by default, and signature v1 with
signature_algorithm="v2") and aliyun-python-sdk-kms on aliyun-python-sdk-core (signature v1), plus the
instance SDK's TransferClient for ciphertext conversion. Prints one JSON object of results.

argv: endpoint strict_endpoint access_key_file revoked_access_key_id client_key_id client_key_pem
     broken_version_id faulty_endpoint quota_endpoint sealing_key_id expired_secret_name
(strict_endpoint: the same gateway with a 1-second import-token lifetime and 1 request/s per AccessKey;
broken_version_id: a key version whose index record is malformed; faulty_endpoint: see the end;
sealing_key_id: the tenant's internal key that seals the AccessKey secrets)
"""
import base64
import hashlib
import json
import sys
import time
import uuid

from alibabacloud_tea_openapi.models import Config
from alibabacloud_kms20160120.client import Client as TeaClient
from alibabacloud_kms20160120 import models as m
from alibabacloud_tea_openapi import utils_models as um
from alibabacloud_tea_util.models import RuntimeOptions
from aliyunsdkcore.client import AcsClient
from aliyunsdkcore.request import CommonRequest
from aliyunsdkkms.request.v20160120 import (
    CreateKeyRequest, EncryptRequest, DecryptRequest, DescribeKeyRequest, ListKeysRequest, CreateAliasRequest,
    GenerateDataKeyRequest, AsymmetricSignRequest, GetSecretValueRequest)
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, ec

endpoint, strict_endpoint, ak_file, revoked_ak, ck_id, ck_pem = sys.argv[1:7]
ak, secret = open(ak_file).read().splitlines()[1].split(",")
host, port = endpoint.split(":")
out = {}


def tea(sig=None, ep=endpoint, ak_=ak, secret_=secret):
    cfg = Config(access_key_id=ak_, access_key_secret=secret_, endpoint=ep, protocol="http", region_id="cn-hangzhou")
    if sig:
        cfg.signature_algorithm = sig
    return TeaClient(cfg)


def err(fn):
    """[code, HTTP status, message is non-empty] as the SDK parsed the error."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - every SDK exception type is reported the same way
        code = getattr(e, "code", None) or (e.get_error_code() if hasattr(e, "get_error_code") else None)
        status = getattr(e, "status_code", None) or (e.get_http_status() if hasattr(e, "get_http_status") else None)
        msg = getattr(e, "message", None) or (e.get_error_msg() if hasattr(e, "get_error_msg") else "")
        return [code, status, bool(msg)]
    return "no error"


core = AcsClient(ak, secret, "cn-hangzhou", port=int(port), auto_retry=False)


def core_req(req, client=core):
    req.set_endpoint(host)
    req.set_protocol_type("http")
    return req


def core_call(req, client=core):
    return json.loads(client.do_action_with_exception(core_req(req)))


def tea_call(client, action, query, body=None):
    """A generic call for actions the installed model version lacks (GenerateMac, VerifyMac); `body` goes in an
    application/x-www-form-urlencoded body, as kms20160120 3.x sends SecretData."""
    params = um.Params(action=action, version="2016-01-20", protocol="HTTP", pathname="/", method="POST",
                       auth_type="AK", style="RPC", req_body_type="formData", body_type="json")
    return client.call_api(params, um.OpenApiRequest(query=query, body=body), RuntimeOptions())["body"]


# ---- each client's own scheme: key, alias, crypto, data keys ---------------------------------------------
for name, c in [("acs3", tea()), ("v1", tea("v2"))]:
    k = c.create_key(m.CreateKeyRequest(description=f"{name} key", tags='[{"TagKey":"team","TagValue":"a"}]')).body.key_metadata
    alias = f"alias/{name}-{uuid.uuid4().hex[:8]}"
    c.create_alias(m.CreateAliasRequest(alias_name=alias, key_id=k.key_id))
    e = c.encrypt(m.EncryptRequest(key_id=alias, plaintext="hello " + name, encryption_context={"app": "x"})).body
    d = c.decrypt(m.DecryptRequest(ciphertext_blob=e.ciphertext_blob, encryption_context={"app": "x"})).body
    out[f"{name}_decrypt"] = d.plaintext
    out[f"{name}_wrong_context"] = err(lambda: c.decrypt(m.DecryptRequest(ciphertext_blob=e.ciphertext_blob,
                                                                           encryption_context={"app": "y"})))
    dk = c.generate_data_key(m.GenerateDataKeyRequest(key_id=k.key_id, key_spec="AES_256")).body
    out[f"{name}_data_key"] = (len(base64.b64decode(dk.plaintext)) == 32 and
                               c.decrypt(m.DecryptRequest(ciphertext_blob=dk.ciphertext_blob)).body.plaintext == dk.plaintext)
    wp = c.generate_data_key_without_plaintext(m.GenerateDataKeyWithoutPlaintextRequest(key_id=k.key_id, number_of_bytes=16)).body
    out[f"{name}_data_key_wp"] = len(base64.b64decode(c.decrypt(m.DecryptRequest(ciphertext_blob=wp.ciphertext_blob)).body.plaintext)) == 16
    out[f"{name}_describe"] = c.describe_key(m.DescribeKeyRequest(key_id=alias)).body.key_metadata.to_map()["KeyState"]
    out[f"{name}_tags"] = c.list_resource_tags(m.ListResourceTagsRequest(key_id=k.key_id)).body.to_map()["Tags"]["Tag"]

c = tea()
v1 = tea("v2")
aes = c.create_key(m.CreateKeyRequest()).body.key_metadata.key_id

# ---- aliases -------------------------------------------------------------------------------------------
alias = f"alias/app-{uuid.uuid4().hex[:8]}"
c.create_alias(m.CreateAliasRequest(alias_name=alias, key_id=aes))
other = c.create_key(m.CreateKeyRequest()).body.key_metadata.key_id
out["err_alias_exists"] = err(lambda: c.create_alias(m.CreateAliasRequest(alias_name=alias, key_id=other)))
c.update_alias(m.UpdateAliasRequest(alias_name=alias, key_id=other))
by_key = c.list_aliases_by_key_id(m.ListAliasesByKeyIdRequest(key_id=other)).body.to_map()
out["alias_moved"] = [a["AliasName"] for a in by_key["Aliases"]["Alias"]] == [alias]
out["list_aliases"] = any(a["AliasName"] == alias for a in c.list_aliases(m.ListAliasesRequest(page_size=100)).body.to_map()["Aliases"]["Alias"])
c.delete_alias(m.DeleteAliasRequest(alias_name=alias))
out["err_alias_not_found"] = err(lambda: c.delete_alias(m.DeleteAliasRequest(alias_name=alias)))
out["err_alias_key_not_found"] = err(lambda: c.encrypt(m.EncryptRequest(key_id=alias, plaintext="x")))
out["err_unsupported_alias"] = err(lambda: c.create_alias(m.CreateAliasRequest(alias_name="alias/acs/x", key_id=aes)))

# ---- paging and filters --------------------------------------------------------------------------------
page1 = c.list_keys(m.ListKeysRequest(page_number=1, page_size=2)).body.to_map()
page2 = c.list_keys(m.ListKeysRequest(page_number=2, page_size=2)).body.to_map()
listed = c.list_keys(m.ListKeysRequest(page_size=100)).body.to_map()["Keys"]["Key"]
sealing = sys.argv[10]
out["internal_hidden"] = [all(k["KeyId"] != sealing for k in listed),
                          err(lambda: c.disable_key(m.DisableKeyRequest(key_id=sealing))),
                          err(lambda: c.encrypt(m.EncryptRequest(key_id=sealing, plaintext="x"))),
                          err(lambda: c.create_alias(m.CreateAliasRequest(alias_name="alias/kmsgate-internal/x", key_id=aes)))]
out["list_keys_paging"] = (len(page1["Keys"]["Key"]) == 2 and page1["TotalCount"] >= 4 and
                           {k["KeyId"] for k in page1["Keys"]["Key"]}.isdisjoint({k["KeyId"] for k in page2["Keys"]["Key"]}))

# ---- rotation: old ciphertexts still decrypt -----------------------------------------------------------
old = c.encrypt(m.EncryptRequest(key_id=aes, plaintext="before rotation")).body
nv = c.create_key_version(m.CreateKeyVersionRequest(key_id=aes)).body.key_version.key_version_id
new = c.encrypt(m.EncryptRequest(key_id=aes, plaintext="after rotation")).body
out["rotate"] = [old.key_version_id != nv, new.key_version_id == nv,
                 c.decrypt(m.DecryptRequest(ciphertext_blob=old.ciphertext_blob)).body.plaintext,
                 c.decrypt(m.DecryptRequest(ciphertext_blob=new.ciphertext_blob)).body.plaintext]
versions = c.list_key_versions(m.ListKeyVersionsRequest(key_id=aes)).body.to_map()
out["list_key_versions"] = versions["TotalCount"]
out["describe_key_version"] = c.describe_key_version(m.DescribeKeyVersionRequest(key_id=aes, key_version_id=nv)).body.key_version.key_version_id == nv
out["err_key_version_not_found"] = err(lambda: c.describe_key_version(m.DescribeKeyVersionRequest(key_id=aes, key_version_id=str(uuid.uuid4()))))
re = c.re_encrypt(m.ReEncryptRequest(ciphertext_blob=old.ciphertext_blob, destination_key_id=other)).body
out["re_encrypt"] = [re.key_id == other, c.decrypt(m.DecryptRequest(ciphertext_blob=re.ciphertext_blob)).body.plaintext]

# ---- disable / schedule deletion -----------------------------------------------------------------------
c.disable_key(m.DisableKeyRequest(key_id=aes))
out["err_disabled"] = err(lambda: c.encrypt(m.EncryptRequest(key_id=aes, plaintext="x")))
disabled = c.list_keys(m.ListKeysRequest(page_size=100, filters='[{"Key":"KeyState","Values":["Disabled"]}]')).body.to_map()
out["list_keys_filter"] = [k["KeyId"] for k in disabled["Keys"]["Key"]] == [aes]
out["err_bad_filter"] = err(lambda: c.list_keys(m.ListKeysRequest(filters='[{"Key":"Color","Values":["red"]}]')))
out["err_disabled_decrypt"] = err(lambda: c.decrypt(m.DecryptRequest(ciphertext_blob=old.ciphertext_blob)))
c.enable_key(m.EnableKeyRequest(key_id=aes))
c.schedule_key_deletion(m.ScheduleKeyDeletionRequest(key_id=aes, pending_window_in_days=7))
out["err_pending_deletion"] = err(lambda: c.encrypt(m.EncryptRequest(key_id=aes, plaintext="x")))
out["err_state_modify"] = err(lambda: c.enable_key(m.EnableKeyRequest(key_id=aes)))
out["scheduled_state"] = c.describe_key(m.DescribeKeyRequest(key_id=aes)).body.key_metadata.key_state
c.cancel_key_deletion(m.CancelKeyDeletionRequest(key_id=aes))
out["after_cancel"] = c.decrypt(m.DecryptRequest(ciphertext_blob=new.ciphertext_blob)).body.plaintext
c.update_key_description(m.UpdateKeyDescriptionRequest(key_id=aes, description="renamed"))
out["description"] = c.describe_key(m.DescribeKeyRequest(key_id=aes)).body.key_metadata.description

# ---- asymmetric ----------------------------------------------------------------------------------------
digest = base64.b64encode(hashlib.sha256(b"signed message").digest()).decode()
for spec, alg in [("RSA_2048", "RSA_PSS_SHA_256"), ("RSA_2048", "RSA_PKCS1_SHA_256"), ("EC_P256", "ECDSA_SHA_256")]:
    key = c.create_key(m.CreateKeyRequest(key_spec=spec, key_usage="SIGN/VERIFY")).body.key_metadata
    ver = c.list_key_versions(m.ListKeyVersionsRequest(key_id=key.key_id)).body.key_versions.key_version[0].key_version_id
    sig = c.asymmetric_sign(m.AsymmetricSignRequest(key_id=key.key_id, key_version_id=ver, algorithm=alg, digest=digest)).body.value
    ok = c.asymmetric_verify(m.AsymmetricVerifyRequest(key_id=key.key_id, key_version_id=ver, algorithm=alg, digest=digest, value=sig)).body.value
    pem = c.get_public_key(m.GetPublicKeyRequest(key_id=key.key_id, key_version_id=ver)).body.public_key
    pub = serialization.load_pem_public_key(pem.encode())
    raw = base64.b64decode(sig)
    if alg == "RSA_PSS_SHA_256":
        pub.verify(raw, b"signed message", padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32), hashes.SHA256())
    elif alg == "RSA_PKCS1_SHA_256":
        pub.verify(raw, b"signed message", padding.PKCS1v15(), hashes.SHA256())
    else:
        pub.verify(raw, b"signed message", ec.ECDSA(hashes.SHA256()))
    out[f"sign_{alg}"] = ok
rsa = c.create_key(m.CreateKeyRequest(key_spec="RSA_2048", key_usage="ENCRYPT/DECRYPT")).body.key_metadata.key_id
rver = c.list_key_versions(m.ListKeyVersionsRequest(key_id=rsa)).body.key_versions.key_version[0].key_version_id
ct = c.asymmetric_encrypt(m.AsymmetricEncryptRequest(key_id=rsa, key_version_id=rver, algorithm="RSAES_OAEP_SHA_256",
                                                     plaintext=base64.b64encode(b"asym").decode())).body.ciphertext_blob
pt = c.asymmetric_decrypt(m.AsymmetricDecryptRequest(key_id=rsa, key_version_id=rver, algorithm="RSAES_OAEP_SHA_256",
                                                     ciphertext_blob=ct)).body.plaintext
out["asymmetric_decrypt"] = base64.b64decode(pt).decode()
local = serialization.load_pem_public_key(c.get_public_key(m.GetPublicKeyRequest(key_id=rsa, key_version_id=rver)).body.public_key.encode())
local_ct = local.encrypt(b"local", padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None))
out["asymmetric_local"] = base64.b64decode(c.asymmetric_decrypt(m.AsymmetricDecryptRequest(
    key_id=rsa, key_version_id=rver, algorithm="RSAES_OAEP_SHA_256", ciphertext_blob=base64.b64encode(local_ct).decode())).body.plaintext).decode()

# ---- MACs (the installed model version has no GenerateMac/VerifyMac methods: generic call_api) ----------
hm = c.create_key(m.CreateKeyRequest(key_spec="HMAC_SHA256", key_usage="GENERATE/VERIFY_MAC")).body.key_metadata.key_id
msg = base64.b64encode(b"mac me").decode()
mac = tea_call(c, "GenerateMac", {"KeyId": hm, "Message": msg})["Mac"]
# Parameters split between the query and a form body, under both signature schemes.
mac_v1 = tea_call(v1, "GenerateMac", {"KeyId": hm}, {"Message": msg})["Mac"]
out["verify_mac"] = [tea_call(c, "VerifyMac", {"KeyId": hm}, {"Message": msg, "Mac": mac})["Value"],
                     tea_call(v1, "VerifyMac", {"KeyId": hm}, {"Message": msg, "Mac": mac_v1})["Value"],
                     tea_call(c, "VerifyMac", {"KeyId": hm, "Message": base64.b64encode(b"other").decode(), "Mac": mac})["Value"]]

# ---- DryRun --------------------------------------------------------------------------------------------
out["dry_run"] = err(lambda: c.encrypt(m.EncryptRequest(key_id=other, plaintext="x", dry_run="true")))

# ---- secrets -------------------------------------------------------------------------------------------
sname = f"app/db-{uuid.uuid4().hex[:8]}"
c.create_secret(m.CreateSecretRequest(secret_name=sname, secret_data="v1-data", version_id="v1", description="db"))
out["err_secret_exists"] = err(lambda: c.create_secret(m.CreateSecretRequest(secret_name=sname, secret_data="x", version_id="v9")))
c.put_secret_value(m.PutSecretValueRequest(secret_name=sname, secret_data="v2-data", version_id="v2"))
cur = c.get_secret_value(m.GetSecretValueRequest(secret_name=sname)).body
prev = c.get_secret_value(m.GetSecretValueRequest(secret_name=sname, version_stage="ACSPrevious")).body
out["secret"] = [cur.secret_data, cur.version_id, cur.version_stages.version_stage, prev.secret_data, prev.version_stages.version_stage]
out["secret_describe"] = c.describe_secret(m.DescribeSecretRequest(secret_name=sname)).body.description
ids = c.list_secret_version_ids(m.ListSecretVersionIdsRequest(secret_name=sname)).body.to_map()
out["secret_versions"] = sorted(v["VersionId"] for v in ids["VersionIds"]["VersionId"])
c.update_secret_version_stage(m.UpdateSecretVersionStageRequest(secret_name=sname, version_stage="ACSCurrent",
                                                                 move_to_version="v1", remove_from_version="v2"))
out["secret_rolled_back"] = c.get_secret_value(m.GetSecretValueRequest(secret_name=sname)).body.secret_data
named = c.list_secrets(m.ListSecretsRequest(filters=json.dumps([{"Key": "SecretName", "Values": [sname]}]))).body.to_map()
out["secret_filter"] = [x["SecretName"] for x in named["SecretList"]["Secret"]] == [sname]
out["secret_listed"] = any(s["SecretName"] == sname for s in c.list_secrets(m.ListSecretsRequest(page_size=100)).body.to_map()["SecretList"]["Secret"])
planned = c.delete_secret(m.DeleteSecretRequest(secret_name=sname, recovery_window_in_days="7")).body.planned_delete_time
out["secret_deleted"] = [bool(planned), err(lambda: c.get_secret_value(m.GetSecretValueRequest(secret_name=sname)))]
c.restore_secret(m.RestoreSecretRequest(secret_name=sname))
out["secret_restored"] = c.get_secret_value(m.GetSecretValueRequest(secret_name=sname)).body.secret_data
c.delete_secret(m.DeleteSecretRequest(secret_name=sname, force_delete_without_recovery="true"))
out["secret_forced"] = err(lambda: c.restore_secret(m.RestoreSecretRequest(secret_name=sname)))
pw = c.get_random_password(m.GetRandomPasswordRequest(password_length="20", exclude_punctuation="true")).body.random_password
out["random_password"] = [len(pw), pw.isalnum()]

# ---- import ------------------------------------------------------------------------------------------
ext = c.create_key(m.CreateKeyRequest(origin="EXTERNAL")).body.key_metadata
out["import_state"] = ext.key_state
out["err_pending_import"] = err(lambda: c.encrypt(m.EncryptRequest(key_id=ext.key_id, plaintext="x")))
params = c.get_parameters_for_import(m.GetParametersForImportRequest(key_id=ext.key_id, wrapping_algorithm="RSAES_OAEP_SHA_256",
                                                                     wrapping_key_spec="RSA_2048")).body
wrapping = serialization.load_der_public_key(base64.b64decode(params.public_key))
material = bytes(range(32))
wrapped = base64.b64encode(wrapping.encrypt(material, padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None))).decode()
short = base64.b64encode(wrapping.encrypt(b"too short", padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None))).decode()
out["err_invalid_token"] = err(lambda: c.import_key_material(m.ImportKeyMaterialRequest(
    key_id=ext.key_id, encrypted_key_material=wrapped, import_token=str(uuid.uuid4()))))
out["err_invalid_material"] = err(lambda: c.import_key_material(m.ImportKeyMaterialRequest(
    key_id=ext.key_id, encrypted_key_material=short, import_token=params.import_token)))
c.import_key_material(m.ImportKeyMaterialRequest(key_id=ext.key_id, encrypted_key_material=wrapped, import_token=params.import_token))
ie = c.encrypt(m.EncryptRequest(key_id=ext.key_id, plaintext="imported")).body
out["imported"] = [c.describe_key(m.DescribeKeyRequest(key_id=ext.key_id)).body.key_metadata.key_state,
                   c.decrypt(m.DecryptRequest(ciphertext_blob=ie.ciphertext_blob)).body.plaintext]
# The material is the customer's: AES-256-GCM under it opens locally.
from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402
raw = base64.b64decode(ie.ciphertext_blob)
out["imported_local"] = AESGCM(material).decrypt(raw[36:48], raw[48:], None).decode()
c.delete_key_material(m.DeleteKeyMaterialRequest(key_id=ext.key_id))
out["after_delete_material"] = err(lambda: c.decrypt(m.DecryptRequest(ciphertext_blob=ie.ciphertext_blob)))
p3 = c.get_parameters_for_import(m.GetParametersForImportRequest(key_id=ext.key_id, wrapping_algorithm="RSAES_OAEP_SHA_256",
                                                                 wrapping_key_spec="RSA_2048")).body
rewrapped = serialization.load_der_public_key(base64.b64decode(p3.public_key)).encrypt(
    material, padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None))
c.import_key_material(m.ImportKeyMaterialRequest(key_id=ext.key_id, encrypted_key_material=base64.b64encode(rewrapped).decode(),
                                                 import_token=p3.import_token))
out["reimported"] = c.decrypt(m.DecryptRequest(ciphertext_blob=ie.ciphertext_blob)).body.plaintext
out["err_token_reused"] = err(lambda: c.import_key_material(m.ImportKeyMaterialRequest(
    key_id=ext.key_id, encrypted_key_material=base64.b64encode(rewrapped).decode(), import_token=p3.import_token)))
# ProtectionLevel=HSM: the PKCS#11 (SoftHSM) backend, for generated and for imported material.
hg = c.create_key(m.CreateKeyRequest(protection_level="HSM")).body.key_metadata
hge = c.encrypt(m.EncryptRequest(key_id=hg.key_id, plaintext="in the hsm")).body
out["hsm_generated"] = [hg.protection_level, c.decrypt(m.DecryptRequest(ciphertext_blob=hge.ciphertext_blob)).body.plaintext]
hx = c.create_key(m.CreateKeyRequest(origin="EXTERNAL", protection_level="HSM")).body.key_metadata
hxp = c.get_parameters_for_import(m.GetParametersForImportRequest(key_id=hx.key_id, wrapping_algorithm="RSAES_OAEP_SHA_1",
                                                                  wrapping_key_spec="RSA_2048")).body
hsm_material = bytes(range(100, 132))
hxw = serialization.load_der_public_key(base64.b64decode(hxp.public_key)).encrypt(
    hsm_material, padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None))
c.import_key_material(m.ImportKeyMaterialRequest(key_id=hx.key_id, encrypted_key_material=base64.b64encode(hxw).decode(),
                                                 import_token=hxp.import_token))
hxe = c.encrypt(m.EncryptRequest(key_id=hx.key_id, plaintext="imported into the hsm")).body
raw = base64.b64decode(hxe.ciphertext_blob)
out["hsm_imported"] = [hx.protection_level, c.describe_key(m.DescribeKeyRequest(key_id=hx.key_id)).body.key_metadata.key_state,
                       c.decrypt(m.DecryptRequest(ciphertext_blob=hxe.ciphertext_blob)).body.plaintext,
                       AESGCM(hsm_material).decrypt(raw[36:48], raw[48:], None).decode()]
out["err_unsupported_origin"] = err(lambda: c.create_key(m.CreateKeyRequest(origin="EXTERNAL", key_spec="RSA_2048", key_usage="SIGN/VERIFY")))
out["err_unsupported_protection"] = err(lambda: c.create_key(m.CreateKeyRequest(protection_level="QUANTUM")))
strict = tea(ep=strict_endpoint)
p2 = strict.get_parameters_for_import(m.GetParametersForImportRequest(key_id=ext.key_id, wrapping_algorithm="RSAES_OAEP_SHA_256",
                                                                      wrapping_key_spec="RSA_2048")).body
time.sleep(2.2)
out["err_expired_token"] = err(lambda: strict.import_key_material(m.ImportKeyMaterialRequest(
    key_id=ext.key_id, encrypted_key_material=wrapped, import_token=p2.import_token)))

# ---- TransferClient: OpenAPI ciphertexts and instance-API ciphertexts convert both ways -----------------
from alibabacloud_kms_kms20160120.transfer_client import TransferClient  # noqa: E402
from alibabacloud_kms_kms20160120.models import KmsConfig  # noqa: E402
t = TransferClient(kms_config=KmsConfig(protocol="http", endpoint=endpoint, client_key_id=ck_id, private_key=open(ck_pem).read()))
oe = c.encrypt(m.EncryptRequest(key_id=other, plaintext="openapi to instance", encryption_context={"k": "v"})).body
out["transfer_from_openapi"] = t.decrypt(m.DecryptRequest(ciphertext_blob=oe.ciphertext_blob, encryption_context={"k": "v"})).body.plaintext
te = t.encrypt(m.EncryptRequest(key_id=other, plaintext="instance to openapi", encryption_context={"k": "v"})).body
out["transfer_to_openapi"] = c.decrypt(m.DecryptRequest(ciphertext_blob=te.ciphertext_blob, encryption_context={"k": "v"})).body.plaintext
tdk = t.generate_data_key(m.GenerateDataKeyRequest(key_id=other)).body
out["transfer_data_key"] = c.decrypt(m.DecryptRequest(ciphertext_blob=tdk.ciphertext_blob)).body.plaintext == tdk.plaintext

# ---- aliyun-python-sdk-core + aliyun-python-sdk-kms (signature v1) --------------------------------------
ck = core_call(CreateKeyRequest.CreateKeyRequest())["KeyMetadata"]["KeyId"]
r = CreateAliasRequest.CreateAliasRequest(); r.set_AliasName(f"alias/core-{uuid.uuid4().hex[:8]}"); r.set_KeyId(ck)
core_call(r)
r = EncryptRequest.EncryptRequest(); r.set_KeyId(ck); r.set_Plaintext("from the old sdk"); r.set_EncryptionContext(json.dumps({"a": "b"}))
blob = core_call(r)["CiphertextBlob"]
r = DecryptRequest.DecryptRequest(); r.set_CiphertextBlob(blob); r.set_EncryptionContext(json.dumps({"a": "b"}))
out["core_decrypt"] = core_call(r)["Plaintext"]
r = GenerateDataKeyRequest.GenerateDataKeyRequest(); r.set_KeyId(ck); r.set_NumberOfBytes(32)
out["core_data_key"] = len(base64.b64decode(core_call(r)["Plaintext"])) == 32
r = CreateKeyRequest.CreateKeyRequest(); r.set_KeySpec("EC_P256"); r.set_KeyUsage("SIGN/VERIFY")
eck = core_call(r)["KeyMetadata"]
r = AsymmetricSignRequest.AsymmetricSignRequest(); r.set_KeyId(eck["KeyId"]); r.set_KeyVersionId(eck["PrimaryKeyVersion"])
r.set_Algorithm("ECDSA_SHA_256"); r.set_Digest(digest)
out["core_sign"] = len(base64.b64decode(core_call(r)["Value"])) > 60
r = ListKeysRequest.ListKeysRequest(); r.set_method("GET"); r.set_PageSize(100)
out["core_get"] = any(k["KeyId"] == ck for k in core_call(r)["Keys"]["Key"])
r = DescribeKeyRequest.DescribeKeyRequest(); r.set_KeyId("no-such-key")
out["core_err_key_not_found"] = err(lambda: core_call(r))
out["core_wrong_secret"] = err(lambda: AcsClient(ak, secret + "x", "cn-hangzhou", port=int(port), auto_retry=False)
                               .do_action_with_exception(core_req(ListKeysRequest.ListKeysRequest())))

# XML: with Format=XML (the request class's accept format; do_action_with_exception forces JSON, so the SDK's
# own lower-level call is used) the old SDK hands back the raw body, and for an error the status and an
# exception whose message carries the body it could not read as JSON.
import xml.etree.ElementTree as ET  # noqa: E402
r = DescribeKeyRequest.DescribeKeyRequest(); r.set_KeyId(ck); r.set_accept_format("XML")
status, _, body, exc = core._implementation_of_do_action(core_req(r))
x = ET.fromstring(body)
out["xml_success"] = [status, x.tag, x.find("KeyMetadata/KeyId").text == ck, x.find("RequestId") is not None]
r = DescribeKeyRequest.DescribeKeyRequest(); r.set_KeyId("no-such-key"); r.set_accept_format("XML")
status, _, body, exc = core._implementation_of_do_action(core_req(r))
xe = ET.fromstring(exc.get_error_msg().split("ServerResponseBody: ", 1)[1])
out["xml_error"] = [exc.get_http_status(), xe.tag, xe.find("Code").text, xe.find("HttpStatus").text]

# ---- authentication errors -----------------------------------------------------------------------------
out["err_wrong_secret_acs3"] = err(lambda: tea(secret_=secret + "x").list_keys(m.ListKeysRequest()))
out["err_wrong_secret_v1"] = err(lambda: tea("v2", secret_=secret + "x").list_keys(m.ListKeysRequest()))
out["err_unknown_access_key"] = err(lambda: tea(ak_="LTAI" + "0" * 20).list_keys(m.ListKeysRequest()))
out["err_revoked_access_key"] = err(lambda: tea(ak_=revoked_ak).list_keys(m.ListKeysRequest()))

# Replayed nonce, stale timestamp and a malformed Authorization: pin what the SDK takes from its nonce
# generator, its clock and its signer (the SDK still builds, sends and parses everything else).
from alibabacloud_tea_openapi.utils import Utils  # noqa: E402
real_nonce, real_time, real_auth = Utils.get_nonce, Utils.get_timestamp, Utils.get_authorization
fixed = uuid.uuid4().hex
Utils.get_nonce = staticmethod(lambda: fixed)
out["replay_first"] = c.list_keys(m.ListKeysRequest()).body.total_count > 0
out["err_replayed_nonce"] = err(lambda: c.list_keys(m.ListKeysRequest()))
fixed_v1 = uuid.uuid4().hex
Utils.get_nonce = staticmethod(lambda: fixed_v1)
out["err_replayed_nonce_v1"] = [v1.list_keys(m.ListKeysRequest()).body.total_count > 0, err(lambda: v1.list_keys(m.ListKeysRequest()))]
Utils.get_nonce = real_nonce
Utils.get_timestamp = staticmethod(lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 3600)))
out["err_stale_timestamp"] = err(lambda: c.list_keys(m.ListKeysRequest()))
out["err_stale_timestamp_v1"] = err(lambda: v1.list_keys(m.ListKeysRequest()))
Utils.get_timestamp = real_time
Utils.get_authorization = staticmethod(lambda *a: "ACS3-HMAC-SHA256 Credential=" + ak)
out["err_incomplete_signature"] = err(lambda: c.list_keys(m.ListKeysRequest()))
Utils.get_authorization = real_auth

# ---- request errors ------------------------------------------------------------------------------------
r = EncryptRequest.EncryptRequest(); r.set_Plaintext("x")
out["err_missing_parameter"] = err(lambda: core_call(r))
r = EncryptRequest.EncryptRequest(); r.set_KeyId(ck); r.set_Plaintext("x"); r.set_EncryptionContext("{not json")
out["err_parse"] = err(lambda: core_call(r))
out["err_invalid_parameter"] = err(lambda: c.schedule_key_deletion(m.ScheduleKeyDeletionRequest(key_id=ck, pending_window_in_days=3)))
put = CommonRequest(domain=host, version="2016-01-20", action_name="ListKeys")
put.set_protocol_type("http"); put.set_method("PUT")
out["err_unsupported_method"] = err(lambda: core.do_action_with_exception(put))
out["err_too_large"] = err(lambda: tea_call(c, "Encrypt", {"KeyId": ck}, {"Plaintext": "x" * (3 * 1024 * 1024 + 10)}))
out["err_plaintext_too_large"] = err(lambda: c.encrypt(m.EncryptRequest(key_id=ck, plaintext="x" * 6145)))
blob = base64.b64encode(sys.argv[7].encode() + b"\0" * 12 + b"\1" * 24).decode()
out["err_internal"] = err(lambda: c.decrypt(m.DecryptRequest(ciphertext_blob=blob)))

out["err_invalid_action"] = err(lambda: tea_call(c, "MakeCoffee", {}))
out["err_key_usage"] = err(lambda: c.asymmetric_sign(m.AsymmetricSignRequest(key_id=ck, algorithm="RSA_PSS_SHA_256", digest=digest)))
out["err_unsupported"] = err(lambda: c.create_key(m.CreateKeyRequest(enable_automatic_rotation=True, rotation_interval="30d")))
out["err_secret_expired"] = err(lambda: c.get_secret_value(m.GetSecretValueRequest(secret_name=sys.argv[11])))

# ---- the strict endpoint: 1 request/s per AccessKey -----------------------------------------------------
results = [err(lambda: strict.list_keys(m.ListKeysRequest())) for _ in range(3)]
out["err_throttled"] = [r for r in results if r != "no error"][:1]

# ---- the faulty endpoint: a dispatcher with a zero key-generation deadline and an authorizer that refuses
# ScheduleKeyDeletion; the quota endpoint: a dispatcher with a one-key quota --------------------------------
faulty = tea(ep=sys.argv[8])
out["err_unavailable"] = err(lambda: faulty.create_key(m.CreateKeyRequest(key_spec="RSA_2048", key_usage="SIGN/VERIFY")))
out["err_limit"] = err(lambda: tea(ep=sys.argv[9]).create_key(m.CreateKeyRequest()))
out["err_no_permission"] = err(lambda: faulty.schedule_key_deletion(m.ScheduleKeyDeletionRequest(key_id=ck, pending_window_in_days=7)))
print(json.dumps(out))
