"Every `mlkit ...` command line in README.md's code blocks, run as written in a scratch project, exits as documented"
import os, re, shlex, signal, subprocess, time
from pathlib import Path

import httpx
import pytest
import skops.io

from conftest import BIN, ROOT, free_port
from service_util import Server
from mlkit.config import load_settings
from mlkit.datasets import churn
from mlkit.jobs import scratch_project
from mlkit.registry import Registry

README = (ROOT/'README.md').read_text()
LONG_RUNNING = {'serve', 'lab'}  # daemons: started, checked on their port, stopped
FOREGROUND = [['mlkit', 'schedule']]  # runs until stopped: started, waited for, stopped with SIGTERM


def readme_commands(text=README):
    "The `mlkit` command lines of the fenced code blocks of `text`, in order, without their comments"
    cmds = []
    for block in re.findall(r'(?ms)^```[^\n]*\n(.*?)^```', text):
        for line in block.splitlines():
            if re.match(r'\s*mlkit\s', line + ' '): cmds.append(shlex.split(line, comments=True))
    return cmds


def documented_statuses(cmd, text=README):
    "Exit statuses the README documents for `cmd`: the monitor's verdicts (**ok** (0), ...), the gate's decisions, else 0"
    if cmd[1] == 'monitor': return {int(n) for n in re.findall(r'\*\*(?:ok|warn|retrain)\*\* \((\d)[:)]', text)}
    if cmd[1] in ('retrain', 'register'): return {int(n) for n in re.findall(r'\*\*(?:promoted|challenger|rejected)\*\* \((\d)\)', text)}
    return {0}


def test_readme_commands_are_found():
    cmds = readme_commands()
    assert len(cmds) >= 10 and all(c[0] == 'mlkit' for c in cmds)
    assert readme_commands("x\n```sh\nmlkit new-thing --x 1  # note\n```\n") == [['mlkit', 'new-thing', '--x', '1']]
    assert documented_statuses(['mlkit', 'monitor']) == {0, 4, 5}
    assert documented_statuses(['mlkit', 'retrain']) == {0, 4, 5}


@pytest.fixture(scope='module')
def project(tmp_path_factory):
    d = tmp_path_factory.mktemp('readme')
    ini = scratch_project(ROOT/'settings.ini', d)
    churn(n=1500, seed=3).to_parquet(d/'new.parquet')  # `--data new.parquet`
    skops.io.dump(elsewhere_model(churn(n=1500, seed=4)), d/'model.skops')  # `mlkit register model.skops`
    churn(n=600, seed=5).to_csv(d/'customers.csv', index=False)  # `mlkit new my-model --data customers.csv`
    return ini


def elsewhere_model(df):
    "A pipeline trained outside mlkit on churn-like data, as a data scientist would"
    from sklearn.compose import make_column_transformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler
    pre = make_column_transformer((make_pipeline(SimpleImputer(), StandardScaler()), ['tenure_months', 'monthly_charges', 'age', 'support_calls']),
                                  (OneHotEncoder(handle_unknown='ignore'), ['plan', 'region', 'contract']))
    return make_pipeline(pre, LogisticRegression(max_iter=1000)).fit(df, df['churned'])


def env_for(ini):
    env = {k: v for k, v in os.environ.items() if not k.startswith('MLKIT_')}
    env.update(BENTOML_DO_NOT_TRACK='True')
    return env


def fill_in(cmd, ini):
    "Replace the README's placeholders (TAG) with a tag of the scratch project's registry"
    if not any('TAG' in c for c in cmd): return cmd
    reg = Registry.from_settings(load_settings(ini, env={}))
    champ = (reg.champion() or {}).get('tag')
    tags = [m['tag'] for m in reg.list_models()]
    other = next((t for t in tags if t != champ), champ)
    tag = other if cmd[1] == 'promote' else champ
    assert tag, f"no model in the registry for {' '.join(cmd)}"
    return [c.replace(c.split(':')[0] + ':TAG', tag) if c.endswith(':TAG') else c for c in cmd]


def run_until_idle(argv, ini, timeout=600):
    "Start a foreground command, wait until it says it waits for its next fire, SIGTERM it: it must exit 0"
    log = ini.parent/'foreground.log'
    with open(log, 'w') as f:
        p = subprocess.Popen(argv, cwd=ini.parent, env=env_for(ini), stdout=f, stderr=subprocess.STDOUT, text=True)
    try:
        end = time.monotonic() + timeout
        while 'next fire at' not in log.read_text() and p.poll() is None and time.monotonic() < end: time.sleep(0.5)
        assert p.poll() is None and 'next fire at' in log.read_text(), log.read_text()[-3000:]
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if p.poll() is None: p.kill()
    assert 'Traceback' not in log.read_text(), log.read_text()[-3000:]


@pytest.mark.parametrize('cmd', readme_commands(), ids=lambda c: ' '.join(c))
def test_readme_command(cmd, project):
    cmd = fill_in(cmd, project)
    argv = [str(BIN/'mlkit'), *cmd[1:]]
    if cmd[1] in LONG_RUNNING:
        port = free_port()
        srv = Server(project, cmd=argv, env={'MLKIT_SERVE_PORT': str(port), 'MLKIT_SETTINGS': ''})
        srv.env.pop('MLKIT_SETTINGS'); srv.env.pop('MLKIT_SERVE_WORKERS')
        srv.port, srv.url = port, f'http://127.0.0.1:{port}'
        old = os.getcwd(); os.chdir(project.parent)
        try: srv.start(timeout=240)
        finally: os.chdir(old)
        try: assert httpx.get(f'{srv.url}/livez', timeout=5).status_code == 200
        finally: rc = srv.stop()
        assert rc is not None
        return
    if cmd in FOREGROUND: return run_until_idle(argv, project)
    r = subprocess.run(argv, cwd=project.parent, env=env_for(project), capture_output=True, text=True, timeout=900)
    want = documented_statuses(cmd)
    assert r.returncode in want, f"{' '.join(cmd)}: exit {r.returncode}, README says {sorted(want)}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    assert 'Traceback' not in r.stderr, r.stderr[-3000:]
