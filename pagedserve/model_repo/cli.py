"""`pagedserve model keygen|sign|push|pull|verify`.

    pagedserve model keygen KEY                 Ed25519 key pair: KEY (private, 0600) and KEY.pub
    pagedserve model sign DIR [--key KEY]       write DIR/SHA256SUMS (and SHA256SUMS.sig with a key)
    pagedserve model push DIR URL [--key KEY]   upload DIR with its manifest (signed with a key)
    pagedserve model pull URL [--public-key P] [--cache-dir D]   download + verify; prints the directory
    pagedserve model verify DIR|URL [--public-key P]             exit 0 if it verifies, 1 naming the file

Exit status: 0 on success, 1 on a refused model or an I/O error (the message on stderr), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pagedserve model", allow_abbrev=False,
                                description="Model repository: manifests, signatures, object storage.")  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)
    k = sub.add_parser("keygen", help="make an Ed25519 signing key pair")
    k.add_argument("key", help="private key path (the public key goes to KEY.pub)")
    s = sub.add_parser("sign", help="write SHA256SUMS (and SHA256SUMS.sig with --key)")
    s.add_argument("dir")
    s.add_argument("--key", default=None, help="Ed25519 private key (PEM file)")
    u = sub.add_parser("push", help="upload a model directory with its manifest to an fsspec URL")
    u.add_argument("dir")
    u.add_argument("url", help="s3://bucket/prefix, gs://..., file:///...")
    u.add_argument("--key", default=None, help="sign a fresh manifest with this Ed25519 private key")
    d = sub.add_parser("pull", help="download a model into the local cache and verify it")
    d.add_argument("url")
    d.add_argument("--cache-dir", default=None, help="cache root (default: $PAGEDSERVE_MODEL_CACHE "
                                                     "or ~/.cache/pagedserve/models)")  # fmt: skip
    v = sub.add_parser("verify", help="check a model directory (or URL) against its manifest")
    v.add_argument("target", metavar="DIR|URL")
    for sp in (d, v):
        sp.add_argument("--public-key", default=None, help="require SHA256SUMS.sig to verify with this key")
    for sp in (u, d):
        sp.add_argument("--jobs", type=int, default=8, help="files transferred at once (default 8)")
        sp.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def model_main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    for noisy in ("botocore", "aiobotocore", "s3fs", "fsspec"):  # credential-discovery chatter
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from pagedserve.model_repo import repo, signing

    try:
        if args.command == "keygen":
            priv, pub = signing.generate_keypair(args.key)
            print(f"wrote {priv} (keep it secret) and {pub}")
        elif args.command == "sign":
            manifest, sig = repo.sign_dir(args.dir, args.key)
            print(f"wrote {manifest}" + (f" and {sig}" if sig else " (unsigned)"))
        elif args.command == "push":
            repo.push(args.dir, args.url, args.key, args.jobs, progress=not args.quiet)
            print(f"pushed {args.dir} to {args.url}")
        elif args.command == "pull":
            print(repo.pull(args.url, args.public_key, args.cache_dir, args.jobs, progress=not args.quiet))
        else:
            repo.verify(args.target, args.public_key)
            print(f"OK {args.target}" + (" (signature verified)" if args.public_key else ""))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
