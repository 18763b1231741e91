"""boto3 clients as the tests and ``xo bench s3`` use them (boto3 is in the
test and bench extras)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xo.ceph.cluster import S3User

# Ceph 16.2's radosgw predates the trailing-checksum uploads newer botocore
# sends by default; ask for checksums only where S3 requires them.
S3_CONFIG: dict[str, Any] = dict(
    s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
    response_checksum_validation="when_required", connect_timeout=10, read_timeout=30)


def s3_client(endpoint: str, user: S3User | None, *, secret: str | None = None,
              retries: int = 1, pool: int = 10, verify: str | bool | None = None) -> Any:
    """A client of endpoint as user (None: anonymous, unsigned requests);
    verify: for https, the CA bundle to check the endpoint's certificate with."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    cfg = Config(**S3_CONFIG, retries={"max_attempts": retries, "mode": "standard"},
                 max_pool_connections=pool,
                 **({"signature_version": UNSIGNED} if user is None else {}))
    kw: dict[str, Any] = {}
    if user is not None:
        kw = {"aws_access_key_id": user.access_key,
              "aws_secret_access_key": secret or user.secret_key}
    if verify is not None:
        kw["verify"] = verify
    return boto3.client("s3", endpoint_url=endpoint, region_name="default", config=cfg, **kw)
