"JupyterLab starts from the project's environment and lists the notebooks"
import json, secrets, subprocess, time, urllib.request
from conftest import BIN, ROOT, free_port


def test_jupyter_lab_lists_notebooks(tmp_path):
    port, token = free_port(), secrets.token_hex(16)
    cmd = [str(BIN/'jupyter'), 'lab', '--no-browser', '--allow-root', '--ip=127.0.0.1', f'--port={port}',
           f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={ROOT}', '--ServerApp.port_retries=0']
    log = open(tmp_path/'lab.log', 'w')
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={'HOME': str(tmp_path), 'PATH': f'{BIN}:/usr/bin:/bin',
                            'JUPYTER_CONFIG_DIR': str(tmp_path/'cfg'), 'JUPYTER_RUNTIME_DIR': str(tmp_path/'rt')})
    try:
        url = f'http://127.0.0.1:{port}/api/contents/nbs'
        deadline, listing = time.monotonic() + 90, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                req = urllib.request.Request(url, headers={'Authorization': f'token {token}'})
                with urllib.request.urlopen(req, timeout=5) as r: listing = json.load(r); break
            except OSError: time.sleep(0.5)
        assert listing is not None, (tmp_path/'lab.log').read_text()
        names = {o['name'] for o in listing['content']}
        assert {'00_errors.ipynb', '01_config.ipynb', 'index.ipynb'} <= names, names
        # without the token the server refuses
        try:
            urllib.request.urlopen(url, timeout=5)
            raise AssertionError('contents API answered without a token')
        except urllib.error.HTTPError as e: assert e.code == 403
    finally:
        proc.terminate()
        try: proc.wait(30)
        except subprocess.TimeoutExpired: proc.kill()
        log.close()
