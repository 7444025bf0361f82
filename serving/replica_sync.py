"""Keep one Triton replica serving the champion written in the shared model repository.

A promotion drives every replica it finds (``tasks.promote``), but a replica started by an
autoscaler while a promotion switches (or restarted from an old snapshot) may come up serving the
version before. This loop, run beside each Triton (a sidecar container in ``infra/k8s``), makes
the replica converge: the champion is the newest ensemble version in the repository (an ensemble
version is written only after its components, and a failed promotion removes it again), and a
replica that serves another version loads the components, then the ensemble, the same order a
promotion uses, so an ensemble never names components that are not loaded.

    python -m serving.replica_sync --triton 127.0.0.1:8000 --repository /models --model text_classifier
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from serving import model_repository as repo
from serving.triton_client import TritonClient, TritonUnavailable, load_and_wait

log = logging.getLogger("serving.replica_sync")


def sync_once(client: TritonClient, repository: Path, name: str) -> str:
    """Bring ``client``'s replica to the newest ensemble version on disk; says what it found or did."""
    written = repo.ensemble_versions(repository, name)
    if not written:
        return f"{name}: nothing promoted yet"
    champion = written[-1]
    served = client.ready_versions(name) if client.is_ready(name) else []
    if served == [champion]:
        return f"{name}: serving version {champion}"
    load_and_wait(client, repo.ensemble_models(name)[:-1], champion)
    load_and_wait(client, (name,), champion)
    return f"{name}: now serving version {champion} (was {served or 'nothing'})"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serving.replica_sync", description=__doc__.split("\n\n")[0])
    parser.add_argument("--triton", default="127.0.0.1:8000", help="this replica's Triton HTTP host:port")
    parser.add_argument("--repository", type=Path, required=True, help="the shared model repository")
    parser.add_argument("--model", default=repo.DEFAULT_MODEL, help="the served ensemble")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between checks")
    parser.add_argument("--once", action="store_true", help="check once and exit (status 1 on failure)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    client = TritonClient(args.triton)
    last = ""
    while True:
        try:
            client.wait_ready(timeout_s=max(args.interval, 10.0))
            state = sync_once(client, args.repository, args.model)
        except (TritonUnavailable, OSError) as error:
            state = f"{args.model}: not in sync: {error}"
            if args.once:
                print(state, file=sys.stderr)
                return 1
        if state != last:  # log changes, not every check
            log.info(state)
            last = state
        if args.once:
            return 0
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
