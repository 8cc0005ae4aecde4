"Start and stop a real `mlkit serve` (bentoml serve) on 127.0.0.1 for tests"
import os, signal, subprocess, time
from pathlib import Path

import httpx

from conftest import BIN, free_port

BASE_ENV = {k: v for k, v in os.environ.items() if not k.startswith('MLKIT_') and k != 'IN_TEST'}


class Server:
    def __init__(self, ini, env=None, cmd=None, log=None, workers=1, ready=None):
        self.ini, self.port = Path(ini), free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        self.log_path = Path(log or self.ini.parent/f'server-{self.port}.log')
        self.env = {**BASE_ENV, 'MLKIT_SETTINGS': str(self.ini), 'MLKIT_SERVE_WORKERS': str(workers), 'BENTOML_DO_NOT_TRACK': 'True',
                    **(env or {})}
        self.cmd = cmd or [str(BIN/'mlkit'), 'serve', '--port', str(self.port)]
        if ready: self.ready = lambda: ready(self)

    def ready(self):
        "Whether the server answers its readiness probe"
        return httpx.get(f'{self.url}/readyz', timeout=2).status_code == 200

    def start(self, timeout=180):
        self.proc = subprocess.Popen([c.replace('{port}', str(self.port)) for c in self.cmd], env=self.env,
                                     stdout=open(self.log_path, 'w'), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None: raise RuntimeError(f"server exited: {self.log_path.read_text()[-3000:]}")
            try:
                if self.ready(): return self
            except httpx.HTTPError: pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server not ready in {timeout} s: {self.log_path.read_text()[-3000:]}")

    def stop(self, sig=signal.SIGTERM, timeout=60):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try: self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL); self.proc.wait()
        return self.proc.returncode

    def __enter__(self): return self.start()
    def __exit__(self, *a): self.stop()
