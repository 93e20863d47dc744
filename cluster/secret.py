"""Print one secret from the cloud's secret store to stdout, for the start commands of
cluster/aws.yaml and cluster/gcp.yaml:

    WANDB_API_KEY="$(python cluster/secret.py aws spacetime/wandb-api-key)"
    WANDB_API_KEY="$(python cluster/secret.py gcp spacetime-wandb-api-key)"

The value goes only to stdout, which the shell captures into the variable: nothing is written
to disk or to a log. Credentials are the node's own (EC2 instance profile, GCE service
account), read from the instance metadata service; none are configured anywhere. When the
secret is missing or unreadable this prints nothing, says why on stderr (without any value)
and exits 0, so the node still starts and W&B runs offline (a start command that needs the
value, like RAY_AUTH_TOKEN's, then fails on its own). Standard library + boto3 (AWS).

Endpoints are the clouds' own unless the node's environment names others, with the settings
the AWS SDKs and gcloud read: AWS_EC2_METADATA_SERVICE_ENDPOINT, AWS_ENDPOINT_URL(_SECRETS_
MANAGER) (boto3 itself), GCE_METADATA_HOST, CLOUDSDK_API_ENDPOINT_OVERRIDES_SECRETMANAGER
(e.g. a regional or private endpoint; tests point them at local fakes).
"""

from __future__ import annotations

import base64
import json
import os
import sys
import urllib.request

TIMEOUT = 5


def _http(url: str, headers: dict | None = None, method: str = "GET") -> str:
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    with urllib.request.urlopen(req, timeout=TIMEOUT) as r:  # noqa: S310 - metadata/API hosts
        return r.read().decode()


def aws(secret_id: str) -> str:
    import boto3

    imds = os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://169.254.169.254")
    imds = imds.rstrip("/")
    token = _http(f"{imds}/latest/api/token", method="PUT",
                  headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    region = _http(f"{imds}/latest/meta-data/placement/region",
                   headers={"X-aws-ec2-metadata-token": token})
    client = boto3.client("secretsmanager", region_name=region)
    return client.get_secret_value(SecretId=secret_id)["SecretString"]


def gcp(secret: str) -> str:
    meta = f"http://{os.environ.get('GCE_METADATA_HOST', '169.254.169.254')}/computeMetadata/v1"
    api = os.environ.get("CLOUDSDK_API_ENDPOINT_OVERRIDES_SECRETMANAGER",
                         "https://secretmanager.googleapis.com/").rstrip("/")
    flavor = {"Metadata-Flavor": "Google"}
    project = _http(f"{meta}/project/project-id", flavor)
    token = json.loads(_http(f"{meta}/instance/service-accounts/default/token", flavor))
    url = f"{api}/v1/projects/{project}/secrets/{secret}/versions/latest:access"
    body = json.loads(_http(url, {"Authorization": f"Bearer {token['access_token']}"}))
    return base64.b64decode(body["payload"]["data"]).decode()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("aws", "gcp"):
        print("usage: secret.py aws|gcp SECRET_NAME", file=sys.stderr)
        return 2
    cloud, name = argv
    try:
        value = (aws if cloud == "aws" else gcp)(name)
    except Exception as e:  # noqa: BLE001 - report the kind of failure, never a value
        print(f"secret.py: cannot read {cloud} secret '{name}' ({type(e).__name__}); "
              f"continuing without it", file=sys.stderr)
        return 0
    sys.stdout.write(value.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
