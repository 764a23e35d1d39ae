"""Claiming --out before anything is written: one writer per run folder, local or in a bucket, and the one-run rule
(a new run never writes into a folder or prefix that holds one). Used by the trainer's rank 0 and by the launcher
for its whole job; no torch here, so the launcher claims the folder without importing it (state/mirror.py, which
verifies pulled checkpoints, needs torch).
"""

from __future__ import annotations

from edsr_dist.errors import UserError
from edsr_dist.locations import is_url, staging_folder
from edsr_dist.state.bucket_lock import BucketLock
from edsr_dist.state.checkpoint_files import CHECKPOINT_DIR
from edsr_dist.state.owner import Ownership
from edsr_dist.state.remote import describe_failure, filesystem
from edsr_dist.state.run_folder import METRICS, hold_run_folder


def remote_step_files(fs, root: str) -> list[str]:
    try:
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/{CHECKPOINT_DIR}", detail=False)]
    except FileNotFoundError:
        return []
    return sorted((n for n in names if n.startswith("step_") and n.endswith(".ckpt")), reverse=True)


def check_remote_out(url: str, resume: str, overwrite: bool, endpoint_url: str = "") -> None:
    """The one-run-per-folder rule for a bucket prefix: a new run never writes into a prefix that holds one."""
    fs, root = filesystem(url, endpoint_url)
    bucket = root.split("/", 1)[0]
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError:
        raise UserError(f"--out {url}: the bucket {bucket} does not exist at this endpoint; create it first "
                        "(e.g. `aws s3 mb s3://" + bucket + "`) or check the URL and AWS_ENDPOINT_URL") from None
    except Exception as exc:  # noqa: BLE001 - any client error: the store cannot be used, say why once
        raise UserError(f"cannot read --out {url}: {describe_failure(exc)}; check the URL, the endpoint "
                        "(AWS_ENDPOINT_URL or --endpoint-url) and the credentials") from None
    try:
        steps = remote_step_files(fs, root)
        metrics = fs.exists(f"{root}/{METRICS}")
    except Exception as exc:  # noqa: BLE001 - any client error: the store cannot be used, say why once
        raise UserError(f"cannot read --out {url}: {describe_failure(exc)}; check the URL, the endpoint "
                        "(AWS_ENDPOINT_URL or --endpoint-url) and the credentials") from None
    if not steps and not metrics:
        return
    found = ", ".join(([f"{len(steps)} checkpoint(s) up to {steps[0]}"] if steps else [])
                      + ([METRICS] if metrics else []))
    if resume == "auto":
        if overwrite:
            raise UserError(f"--overwrite starts a new run in {url}, --resume auto continues the one there; "
                            "pass only one of them")
        return
    raise UserError(f"--out {url} already holds a run ({found}); continue it with --resume auto, or start a new "
                    "run with another --out prefix (a run in a bucket is never moved or deleted, so --overwrite "
                    "does not apply there)")


def claim_out(out: str, cache_dir: str, resume: str, overwrite: bool, take_over: bool,
              endpoint_url: str = "") -> Ownership | None:
    """Become --out's one writer and apply the one-run rule, local or bucket, before anything is written (the
    trainer's rank 0, or the launcher for its whole job). A bucket run's owner record lives in the bucket (a
    conditional put), so two servers staging the same bucket run in their own caches still exclude each other.
    Returns the hold to release at the end (None for a worker whose launcher holds it)."""
    local = staging_folder(out, cache_dir)
    if not is_url(out):
        return hold_run_folder(local, resume, overwrite, take_over)
    check_remote_out(out, resume, overwrite, endpoint_url)
    lock = BucketLock(*filesystem(out, endpoint_url), out)
    try:
        return hold_run_folder(local, resume, overwrite, take_over, lock, shown=out)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the endpoint went away during the claim (botocore/aiohttp errors)
        raise UserError(f"--out {out}: lost the object store while claiming the run ({describe_failure(exc)}); "
                        "the run did not start; check the endpoint (AWS_ENDPOINT_URL or --endpoint-url) and start "
                        "again") from None
