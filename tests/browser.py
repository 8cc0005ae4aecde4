"Headless Chromium driven over the DevTools protocol: load a page, collect its script errors, take a screenshot"
import base64, json, shutil, subprocess, tempfile, time, urllib.request
from pathlib import Path

import websocket

from conftest import free_port

FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage', '--remote-allow-origins=*',
         '--remote-debugging-address=127.0.0.1']


def chromium() -> str:
    exe = shutil.which('chromium') or shutil.which('chromium-browser')
    if not exe: raise RuntimeError("Chromium is not installed: `make test` installs Debian's chromium package (apt-get install chromium)")
    return exe


class Browser:
    "One headless Chromium on a loopback debugging port, with one page"
    def __init__(self, width=1280, height=1800, timeout=60):
        self.port, self.timeout, self.seq, self.events = free_port(), timeout, 0, []
        self.profile = tempfile.mkdtemp(prefix='mlkit-chromium-')
        self.proc = subprocess.Popen([chromium(), *FLAGS, f'--remote-debugging-port={self.port}', f'--user-data-dir={self.profile}',
                                      f'--window-size={width},{height}', 'about:blank'],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                pages = json.loads(urllib.request.urlopen(f'http://127.0.0.1:{self.port}/json/list', timeout=2).read())
                url = next(p['webSocketDebuggerUrl'] for p in pages if p['type'] == 'page')
                break
            except (OSError, StopIteration, ValueError):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close(); raise RuntimeError('Chromium did not open its debugging port')
                time.sleep(0.2)
        self.ws = websocket.create_connection(url, timeout=timeout, suppress_origin=True)
        for m in ('Page.enable', 'Runtime.enable', 'Log.enable'): self.call(m)
        self.call('Emulation.setDeviceMetricsOverride', width=width, height=height, deviceScaleFactor=1, mobile=False)

    def call(self, method, **params):
        "Send one command and wait for its answer, keeping the events that arrive meanwhile"
        self.seq += 1
        self.ws.send(json.dumps(dict(id=self.seq, method=method, params=params)))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get('id') == self.seq:
                if 'error' in msg: raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get('result', {})
            self.events.append(msg)

    def wait_for(self, event, timeout=None):
        deadline = time.monotonic() + (timeout or self.timeout)
        while not any(e.get('method') == event for e in self.events):
            if time.monotonic() > deadline: raise TimeoutError(f'no {event} from Chromium')
            self.events.append(json.loads(self.ws.recv()))

    def open(self, url):
        self.call('Page.navigate', url=url)
        self.wait_for('Page.loadEventFired')

    def evaluate(self, js):
        res = self.call('Runtime.evaluate', expression=js, returnByValue=True, awaitPromise=True)
        if 'exceptionDetails' in res: raise RuntimeError(f"script failed: {res['exceptionDetails']}")
        return res['result'].get('value')

    def errors(self) -> list:
        "Uncaught exceptions, console errors and failed loads the page reported"
        out = []
        for e in self.events:
            m, p = e.get('method'), e.get('params', {})
            if m == 'Runtime.exceptionThrown':
                d = p['exceptionDetails']
                out.append((d.get('exception') or {}).get('description') or d.get('text', 'exception'))
            elif m == 'Runtime.consoleAPICalled' and p.get('type') == 'error': out.append(str(p.get('args')))
            elif m == 'Log.entryAdded' and p['entry'].get('level') == 'error': out.append(p['entry'].get('text', ''))
        return out

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call('Page.captureScreenshot', format='png', captureBeyondViewport=True)['data'])

    def close(self):
        try: self.ws.close()
        except Exception: pass
        self.proc.terminate()
        try: self.proc.wait(10)
        except subprocess.TimeoutExpired: self.proc.kill(); self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self): return self
    def __exit__(self, *a): self.close()
