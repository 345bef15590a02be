"""Debian's MQTT broker, mosquitto, run for a test or a bench: on 127.0.0.1 and a free port, with a
config of its own and no persistence (a restart forgets every retained message)."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

MOSQUITTO = Path("/usr/sbin/mosquitto")


class BrokerError(RuntimeError):
    pass


class Mosquitto:
    def __init__(self, folder: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.config = folder / "mosquitto.conf"
        self.config.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self.log = folder / "mosquitto.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> None:
        """Start it (again, after ``kill``: the same port) and wait until it listens."""
        with self.log.open("a") as log:
            self.process = subprocess.Popen([str(MOSQUITTO), "-c", str(self.config)], stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise BrokerError(f"mosquitto is not listening on 127.0.0.1:{self.port}: "
                                      f"{self.log.read_text()[-500:]}") from None
                time.sleep(0.05)

    def kill(self) -> None:
        """As a crash: no goodbye to any client."""
        self.process.kill()
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
