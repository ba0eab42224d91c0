#!/usr/bin/env python3
"""Signs one XKS request with botocore's SigV4 signer (an implementation independent of kmsgate's) and
prints the headers to send as a JSON object.

Input on stdin, JSON: {"url", "body", "access_key_id", "secret", "region"} and optionally "method"
(default POST) and "headers" (extra headers to sign, e.g. {"Content-Type": "application/json"}).
botocore signs the Host of the URL (with the port when it is not the scheme's default) and X-Amz-Date,
plus the extra headers; the caller must send Host exactly as the URL's netloc.
"""
import json
import sys

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials


def main() -> None:
    args = json.load(sys.stdin)
    headers = args.get("headers", {"Content-Type": "application/json"})
    request = AWSRequest(
        method=args.get("method", "POST"),
        url=args["url"],
        data=args["body"].encode("utf-8"),
        headers=headers,
    )
    SigV4Auth(Credentials(args["access_key_id"], args["secret"]), "kms-xks-proxy", args["region"]).add_auth(request)
    json.dump({k: v for k, v in request.headers.items()}, sys.stdout)


if __name__ == "__main__":
    main()
