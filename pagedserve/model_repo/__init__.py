"""Model repository: fsspec URLs pulled into a local cache, SHA256SUMS manifests, Ed25519 signatures.

See repo.py for the flow; `pagedserve model --help` for the commands.
"""

from pagedserve.model_repo.manifest import MANIFEST_NAME, SIGNATURE_NAME, ModelVerificationError
from pagedserve.model_repo.remote import is_url
from pagedserve.model_repo.repo import prepare_model, pull, push, sign_dir, verify

__all__ = ["MANIFEST_NAME", "SIGNATURE_NAME", "ModelVerificationError", "is_url", "prepare_model", "pull",
           "push", "sign_dir", "verify"]
