"Start-up with models that cannot be loaded: a real `mlkit serve` or `bentoml serve` fails loudly, never in a crash loop; what a worker runs with, seen by the monitoring job"
import subprocess, time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from anydata import write_project
from conftest import BIN, free_port
from service_util import BASE_ENV, Server
from mlkit.bento import serve_command, service_env
from mlkit.config import load_settings
from mlkit.demo import WebhookPrinter
from mlkit.monitor import run_steps as monitor_steps
from mlkit.predlog import PredictionLog
from mlkit.registry import Registry
from mlkit.retrain import run_steps
from mlkit.servenv import record_serving_env, serving_envs, versions
from mlkit.store import model_info

ADMIN = 'admin-token-for-startup'


@pytest.fixture(scope='module')
def project(tmp_path_factory):
    "A multiclass project with a champion and a newer challenger"
    ini, _ = write_project(tmp_path_factory.mktemp('startup'), 'four_classes')
    first = run_steps(str(ini))['model_tag']
    chal = run_steps(str(ini), model='hist_gradient_boosting', force=True)['model_tag']
    s = load_settings(ini, env={})
    with Registry.from_settings(s) as reg:
        if reg.champion()['tag'] == chal:
            reg.rollback('test', 'keep the first model as champion')
            reg.set_stage(chal, 'challenger', actor='test', reason='a challenger for the A/B mode')
        assert reg.champion()['tag'] == first
    return ini, s, first, chal


def _tampered(path:Path):
    "Edit a model.yaml the way someone with write access to the store only would: a numeric column made categorical"
    doc = yaml.safe_load(path.read_text())
    cols = doc['metadata']['contract']['columns']
    name = next(c for c, spec in cols.items() if spec.get('kind') == 'numeric')
    cols[name]['kind'] = 'categorical'
    return yaml.safe_dump(doc, sort_keys=False)


def test_a_challenger_that_cannot_be_loaded_leaves_the_champion_serving(project):
    ini, s, first, chal = project
    art = Path(model_info(chal, s)['artifact'])
    good = art.read_bytes()
    art.write_bytes(good[:-10] + b'0123456789')
    try:
        with Server(ini, env={'MLKIT_SERVE_MODE': 'ab'}) as srv:
            meta = httpx.get(f'{srv.url}/metadata', timeout=10).json()
            assert meta['champion']['tag'] == first and meta['challenger'] is None, meta
            assert len(meta['warnings']) == 1 and 'challenger could not be loaded' in meta['warnings'][0], meta
            assert 'sha256 mismatch' in meta['warnings'][0] and chal in meta['warnings'][0], meta
            rec = {'region': 'north', 'plan': 'pro', 'spend': 50.0, 'visits': 3.0}
            r = httpx.post(f'{srv.url}/predict', json={'records': [rec] * 20}, timeout=30)
            assert r.status_code == 200 and {a['variant'] for a in r.json()} == {'champion'}, r.text
        assert 'warning: the challenger could not be loaded' in srv.log_path.read_text()
    finally: art.write_bytes(good)


def test_a_tampered_champion_stops_mlkit_serve_with_the_reason(project):
    ini, s, first, _ = project
    y = Path(model_info(first, s)['path'])/'model.yaml'
    orig = y.read_text()
    y.write_text(_tampered(y))
    try:
        env = {**BASE_ENV, 'MLKIT_SETTINGS': str(ini), 'BENTOML_DO_NOT_TRACK': 'True'}
        r = subprocess.run([str(BIN/'mlkit'), 'serve', '--port', str(free_port())], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode != 0, r.stdout + r.stderr
        assert f"{y} changed since the model was registered" in r.stdout + r.stderr, r.stdout + r.stderr
    finally: y.write_text(orig)


def test_bentoml_serve_with_a_tampered_champion_answers_503_and_recovers(project):
    "Started without `mlkit serve`'s check, the worker stays up unready with the reason (no crash loop) until a reload finds a good model"
    ini, s, first, _ = project
    y = Path(model_info(first, s)['path'])/'model.yaml'
    orig = y.read_text()
    y.write_text(_tampered(y))
    env = {k: v for k, v in service_env(s).items() if not k.startswith('MLKIT_')} | {'MLKIT_SETTINGS': str(ini), 'MLKIT_ADMIN_TOKEN': ADMIN}
    cmd = serve_command(s)
    cmd[cmd.index('--port') + 1] = '{port}'
    live = lambda srv: httpx.get(f'{srv.url}/livez', timeout=2).status_code == 200
    srv = Server(ini, env=env, cmd=cmd, ready=live)
    try:
        srv.start()
        workers = lambda: sorted(p.pid for p in psutil.Process(srv.proc.pid).children(recursive=True))
        time.sleep(3)
        before = workers()
        r = httpx.get(f'{srv.url}/readyz', timeout=10)
        assert r.status_code == 503, r.text
        r = httpx.post(f'{srv.url}/predict', json={'records': [{'region': 'north'}]}, timeout=10)
        assert r.status_code == 503 and 'model.yaml changed since the model was registered' in r.json()['error'], r.text
        assert httpx.get(f'{srv.url}/metadata', timeout=10).status_code == 503
        time.sleep(5)
        assert workers() == before, "a worker was restarted: a crash loop"
        y.write_text(orig)
        r = httpx.post(f'{srv.url}/admin/reload', headers={'Authorization': f'Bearer {ADMIN}'}, json={}, timeout=30)
        assert r.status_code == 200, r.text
        assert httpx.get(f'{srv.url}/readyz', timeout=10).status_code == 200
        assert httpx.get(f'{srv.url}/metadata', timeout=10).json()['champion']['tag'] == first
    finally:
        y.write_text(orig)
        srv.stop()
    assert 'no model loaded: ModelIntegrityError' in srv.log_path.read_text()


def test_the_monitoring_job_sees_what_the_service_runs_with(project):
    "A real worker records its library versions; a worker on another scikit-learn and a retyped upstream column are a `warn` and a webhook"
    ini, s, first, _ = project
    with Server(ini) as srv: assert httpx.get(f'{srv.url}/readyz', timeout=10).status_code == 200
    plog = PredictionLog.from_settings(s)
    now = datetime.now(timezone.utc)
    seen = serving_envs(plog.engine, None, now + timedelta(minutes=1))
    assert [e['versions'] for e in seen] == [versions()], seen  # every worker started here ran with this environment
    trained = model_info(first, s)['metadata']['versions']
    assert {k: trained[k] for k in ('scikit_learn', 'pandas')} == {k: versions()[k] for k in ('scikit_learn', 'pandas')}
    record_serving_env(plog.engine, found={**versions(), 'scikit_learn': '0.0.1'}, at=now)
    src, text = Path(s.data.source), ini.read_text()
    table = src.read_text()
    hook = WebhookPrinter(out=lambda line: None)
    try:
        src.write_text(table.replace('spend', 'spend_eur', 1))  # the header: a column renamed upstream
        ini.write_text(text.replace('webhooks =', f'webhooks = http://127.0.0.1:{hook.server_address[1]}/hook'))
        day = f'{now:%Y-%m-%d}'
        m = monitor_steps(str(ini), since=day, until=day)
        assert m['verdict'] in ('warn', 'retrain'), m['line']
        dep = m['dependencies']
        assert any('scikit_learn ' + trained['scikit_learn'] + ' -> 0.0.1' in c for c in dep['changes']), dep
        assert any("upstream column(s) gone: 'spend'" in c for c in dep['schema']) and any("'spend_eur'" in c for c in dep['schema']), dep
        assert any('library versions changed since training' in r for r in m['reasons']), m['reasons']
        got = [b for b in hook.bodies if b['event'] == 'dependency']
        assert len(got) == 1 and got[0]['run_id'] == m['run_id'] and set(got[0]['reasons']) == set(dep['changes']), hook.bodies
    finally:
        src.write_text(table); ini.write_text(text); hook.shutdown(); hook.server_close()
