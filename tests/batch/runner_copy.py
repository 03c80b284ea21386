"""One more batch runner process on a running stack, with a short lease (the tests'
copies): ``python runner_copy.py LEASE_S``. Settings and addresses come from the
environment (``TOKENMILL_HOME``/``_CONFIG``/``_KAFKA_URL``/``_REDIS_URL``), as for
``tokenmill batch-runner``; stops on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sys

from tokenmill.config import load_settings
from tokenmill.producers.batch_runner import BatchRunner

from tokenmill import tokens
from tokenmill.logs import configure
from tokenmill.stack import endpoints


async def main(lease_s: float) -> None:
    settings = load_settings()
    configure(settings.log_level)
    await asyncio.to_thread(tokens.load_counters, settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await BatchRunner(settings, endpoints(settings), lease_s=lease_s).run(stop)


if __name__ == "__main__":
    asyncio.run(main(float(sys.argv[1])))
