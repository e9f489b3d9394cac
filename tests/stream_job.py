"""Runs a stream in a process of its own for the resume tests (not a test module).

    python tests/stream_job.py SHARDS OUT.pt --rank R --world W --workers N --batch B
        [--repeats R] [--state STATE.pt] [--take K] [--save-state STATE.pt] [--dist-port P]
        [--remote-retries N --remote-backoff S --max-lost-share F --cache-dir DIR --progress FILE --delay S]

Loads STATE if given, takes K batches (all that are left in the epoch if K is omitted), saves
them (and the state after them) with torch.save. With --dist-port, joins a gloo process group on
127.0.0.1 so that state_dict() gathers every rank's position.
The callers pass PYTHONPATH=ROOT, so that it imports this checkout's packages.
"""

import argparse
import os
import time

import torch
import torch.distributed as dist

from data.remote import RemoteOptions
from data.stream import build_train_stream


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("shards")
    parser.add_argument("out")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--buffer", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--state")
    parser.add_argument("--take", type=int)
    parser.add_argument("--save-state")
    parser.add_argument("--dist-port", type=int)
    parser.add_argument("--remote-retries", type=int, default=6)  # remote shards (data/remote.py)
    parser.add_argument("--remote-backoff", type=float, default=1.0)
    parser.add_argument("--max-lost-share", type=float, default=0.0)
    parser.add_argument("--cache-dir")
    parser.add_argument("--progress", help="a file that gets a line per batch taken")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds per batch taken (a slow consumer)")
    args = parser.parse_args()
    remote = RemoteOptions(
        retries=args.remote_retries,
        backoff=args.remote_backoff,
        backoff_max=max(args.remote_backoff, 30.0),
        max_lost_share=args.max_lost_share,
        cache_dir=args.cache_dir,
        timeout=10.0,
    )
    if args.dist_port:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.dist_port))
        dist.init_process_group("gloo", rank=args.rank, world_size=args.world)
    stream = build_train_stream(
        args.shards,
        batch_size=args.batch,
        rank=args.rank,
        world_size=args.world,
        num_workers=args.workers,
        seed=args.seed,
        image_size=32,
        buffer_size=args.buffer,
        repeats=args.repeats,
        remote=remote,
    )
    if args.state:
        stream.load_state_dict(torch.load(args.state, weights_only=False))
    batches = []
    iterator = iter(stream)
    for batch in iterator:
        batches.append(batch)
        time.sleep(args.delay)
        if args.progress:
            with open(args.progress, "a") as progress:
                progress.write(f"{len(batches)}\n")
        if args.take is not None and len(batches) == args.take:
            break
    iterator.close()  # end the DataLoader workers now, not during the interpreter's exit next to gloo's threads
    state = stream.state_dict()
    if args.save_state and args.rank == 0:
        torch.save(state, args.save_state)
    torch.save({"batches": batches, "counters": dict(stream.counters), "len": len(stream)}, args.out)
    if args.dist_port:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    from launcher.distributed import exit_process

    main()
    exit_process(0)  # as launcher.train ends: no finalization racing gloo's threads
