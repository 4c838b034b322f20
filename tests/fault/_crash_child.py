"""Child process for the crash test: creates and rotates keys through a real
broker, printing one line per acknowledged change, until it is killed."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import trio

from broker.app import open_broker
from broker.auth import Principal
from broker.config import parse_config
from broker.connection import RequestContext


async def main(data_dir: Path, round_no: int) -> None:
    ctx = RequestContext(Principal(f"uid:{os.getuid()}", "local"), 0)
    rng = random.Random(round_no)
    created: list[str] = []
    async with open_broker(parse_config({}, data_dir=data_dir)) as broker:
        handle = broker.dispatcher.handle
        print("ready", flush=True)
        for i in range(100_000):
            if not created or rng.random() < 0.5:
                name = f"r{round_no}/k{i}"
                meta = await handle(ctx, "key.create", {"name": name, "type": "aes256-gcm"})
                created.append(name)
                print(f"created {name} {meta['id'].hex()}", flush=True)
            else:
                name = rng.choice(created)
                meta = await handle(ctx, "key.rotate", {"name": name})
                print(f"rotated {name} {meta['primary_version']}", flush=True)


if __name__ == "__main__":
    trio.run(main, Path(sys.argv[1]), int(sys.argv[2]))
