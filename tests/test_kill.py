"`kill -9` of the retraining job at any point leaves the champion and the registry consistent; the next run works"
import json, os, signal, subprocess, sys, textwrap, time
from pathlib import Path

import psutil
import pytest

from conftest import BIN, ROOT
from mlkit.config import load_settings
from mlkit.jobs import scratch_project
from mlkit.registry import Registry
from mlkit.retrain import run_steps
from mlkit.store import list_store, load_pipeline

ENV = {**{k: v for k, v in os.environ.items() if not k.startswith('MLKIT_') and k != 'IN_TEST'},
       'MLKIT_SCHEDULE_MIN_RETRAIN_INTERVAL_HOURS': '0', 'MLKIT_SCHEDULE_MAX_RETRAINS_PER_DAY': '1000'}

# Each point SIGKILLs the process from inside one step of `run_steps`: the new model is half-way into the store,
# in the store but not in the registry, registered but not promoted, and inside the promotion transaction.
POINTS = {
    'store-publish': ('mlkit.store', '_publish', 'before'),
    'register-model': ('mlkit.registry.Registry', 'register_model', 'before'),
    'before-promote': ('mlkit.registry.Registry', 'promote', 'before'),
    'inside-promote-transaction': ('mlkit.registry', '_switch', 'after'),
}

CHILD = textwrap.dedent('''
    import importlib, os, signal, sys
    ini, target, attr, when = sys.argv[1:5]
    mod, _, cls = target.partition('.Registry')
    owner = importlib.import_module(mod)
    if cls or target.endswith('Registry'): owner = getattr(owner, 'Registry')
    original = getattr(owner, attr)
    def die(*a, **k):
        if when == 'after': original(*a, **k)
        os.kill(os.getpid(), signal.SIGKILL)
    setattr(owner, attr, die)
    from mlkit.retrain import run_steps
    run_steps(ini, force=True)
''')


def consistent(ini, champion):
    "The champion is unchanged, there is one, it loads, and every registered model and store entry is whole"
    s = load_settings(ini, env={})
    reg = Registry.from_settings(s)
    assert reg.champion()['tag'] == champion
    assert sum(m['stage'] == 'champion' for m in reg.list_models()) == 1
    load_pipeline(champion, s, reg.get_model(champion)['artifact_sha256'])
    for m in reg.list_models(): load_pipeline(m['tag'], s, m['artifact_sha256'])
    assert not [e for e in list_store(s) if e.get('error')]
    for f in (s.state_dir/'runs').rglob('*.json'): json.loads(f.read_text())
    reg.reap_stale_runs()
    assert not [r for r in reg.list_runs(100) if r['status'] == 'running']


@pytest.fixture(scope='module')
def project(tmp_path_factory):
    ini = scratch_project(ROOT/'settings.ini', tmp_path_factory.mktemp('kill'))
    champion = run_steps(str(ini))['model_tag']
    return ini, champion


@pytest.mark.parametrize('point', list(POINTS))
def test_kill_inside_a_step(project, point):
    ini, champion = project
    r = subprocess.run([sys.executable, '-c', CHILD, str(ini), *POINTS[point]], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    consistent(ini, champion)


@pytest.mark.parametrize('delay', [1.0, 2.5, 4.0])
def test_kill_the_job_process_tree(project, delay):
    ini, champion = project
    p = subprocess.Popen([str(BIN/'mlkit'), 'retrain', '--force'], env={**ENV, 'MLKIT_SETTINGS': str(ini)},
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    time.sleep(delay)
    procs = [psutil.Process(p.pid)]
    try: procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess: pass
    for q in procs:
        try: q.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess: pass
    p.wait()
    assert p.returncode == -signal.SIGKILL, 'the job ended before it was killed: raise nothing, lower the delay'
    consistent(ini, champion)


def test_next_run_works_after_the_kills(project):
    ini, champion = project
    s = run_steps(str(ini), force=True)
    assert s['status'] == 'succeeded' and s['decision'] == 'promote'
    assert Registry.from_settings(load_settings(ini, env={})).champion()['tag'] == s['model_tag'] != champion
