"""Worker process entry point: ``python -m potluck.sharding.orchestration.worker --connect HOST:PORT --rank R ...``.

The worker memory-maps its shard file, compiles its ONNX Runtime stages, connects to the master's
:class:`~potluck.sharding.collective.star.StarMaster` and serves broadcasts until the master says ``stop`` or
goes away. The 32-byte session key arrives as hex on the first line of **stdin** (never argv, which
``ps`` shows to every user).

Exit codes: 0 after ``stop`` or when the master went away, 2 for bad arguments/key/shard,
3 when the master could not be reached or refused us, 4 for a protocol violation.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from potluck.errors import (
    ConnectError,
    ModelFileError,
    PeerRefused,
    ProtocolViolation,
    ShardPlanError,
    TransferError,
)
from potluck.sharding.collective.star import StarWorker
from potluck.sharding.compute.engine import ATTENTION_MODES, EngineOptions, RankCompute, serve_worker
from potluck.sharding.format.shard_file import read_shard

log = logging.getLogger("potluck.sharding.orchestration.worker")


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="potluck-shard-worker", description=__doc__)
    p.add_argument("--connect", type=_address, required=True, help="master address HOST:PORT")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--shard", required=True, help="shard file to memory-map")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    p.add_argument("--accuracy-level", type=int, default=4, choices=(0, 1, 2, 3, 4))
    p.add_argument("--attention", default="exact", choices=ATTENTION_MODES)
    p.add_argument("--memory-budget", type=int, default=0, help="resident bytes for the model (0: no limit)")
    p.add_argument("--spill-dir", type=Path, default=None, help="per-layer files of a windowed rank")
    p.add_argument("--drop-cache", action="store_true", help="drop released layers from the page cache")
    p.add_argument("--timeout", type=float, default=10.0, help="collective deadline, seconds")
    p.add_argument(
        "--poll-us", type=float, default=0.0, help="busy-poll each receive this long before blocking (0: block)"
    )
    p.add_argument("--log-level", default="warning")
    return p.parse_args(argv)


def run(args: argparse.Namespace, key_hex: str) -> int:
    """Load the shard, join the group, serve. Returns the process exit code."""
    try:
        key = bytes.fromhex(key_hex.strip())
    except ValueError:
        log.error("session key on stdin is not hex")
        return 2
    try:
        shard = read_shard(args.shard)
        if int(shard.meta.get("rank", -1)) != args.rank:
            raise ShardPlanError(f"shard {args.shard} is for rank {shard.meta.get('rank')}, not {args.rank}")
        n_ctx = int(shard.meta["plan"]["n_ctx"])
        options = EngineOptions(
            n_ctx=n_ctx,
            threads=args.threads,
            spinning=False,
            accuracy_level=args.accuracy_level,
            attention=args.attention,
            memory_budget=args.memory_budget,
            spill_dir=args.spill_dir,
            drop_cache=args.drop_cache,
        )
        compute = RankCompute.from_shard(shard, options)
    except (ModelFileError, ShardPlanError, KeyError, TypeError, ValueError) as exc:
        log.error("rank %d: cannot load shard: %s", args.rank, exc)
        return 2
    try:
        collective = StarWorker.connect(
            args.connect, args.rank, args.world_size, key, timeout_s=args.timeout, poll_s=args.poll_us * 1e-6
        )
    except (ConnectError, PeerRefused, ProtocolViolation) as exc:
        log.error("rank %d: cannot join the master at %s: %s", args.rank, args.connect, exc)
        return 3
    try:
        serve_worker(collective, compute)
    except TransferError as exc:
        log.info("rank %d: master went away: %s", args.rank, exc)
    except ProtocolViolation as exc:
        log.error("rank %d: %s", args.rank, exc)
        return 4
    finally:
        collective.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="worker %(process)d %(name)s: %(message)s")
    return run(args, sys.stdin.readline())


if __name__ == "__main__":
    sys.exit(main())
