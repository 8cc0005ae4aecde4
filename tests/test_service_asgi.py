"The BentoML service's ASGI app in process (`MlkitService.to_asgi()` with Starlette's TestClient): the middle test level"
import importlib.util, json, os, sys

import pytest
from starlette.testclient import TestClient

from conftest import ROOT
from mlkit.config import load_settings
from mlkit.datasets import churn_day
from mlkit.jobs import scratch_project
from mlkit.predlog import PredictionLog
from mlkit.registry import Registry
from mlkit.retrain import run_steps
from mlkit.service import frame_to_records
from mlkit.store import load_pipeline, store_home

API, ADMIN = 'api-token-asgi-1', 'admin-token-asgi-2'
H, ADMIN_H = {'Authorization': f'Bearer {API}'}, {'Authorization': f'Bearer {ADMIN}'}
SERVICE_MODULE = 'mlkit_bento_service'  # the bento's service.py, loaded from its file (bentos/ is no package)


@pytest.fixture(scope='module')
def project(tmp_path_factory):
    "A project with a champion (the job's pick: logistic regression on churn) and a newer challenger (gradient boosting, asked for by name)"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('MLKIT_SCHEDULE_MIN_RETRAIN_INTERVAL_HOURS', '0')
        ini = scratch_project(ROOT/'settings.ini', tmp_path_factory.mktemp('asgi'))
        champ = run_steps(str(ini))['model_tag']
        chal = run_steps(str(ini), model='hist_gradient_boosting', force=True)['model_tag']
    reg = Registry.from_settings(load_settings(ini, env={}))
    if reg.champion()['tag'] != champ:  # the gate promoted the newer one: put the first back
        reg.rollback('test', 'keep the first model as champion')
        reg.set_stage(chal, 'challenger', actor='test', reason='challenger for the reload test')
    reg.close()
    return ini, champ, chal


@pytest.fixture(scope='module')
def service(project):
    "The bento's service class, imported for this project (its settings are read once, at import), with tokens set"
    ini = project[0]
    assert SERVICE_MODULE not in sys.modules, f"{SERVICE_MODULE} was imported before with other settings"
    with pytest.MonkeyPatch.context() as mp:
        for k in [k for k in os.environ if k.startswith('MLKIT_')]: mp.delenv(k)
        mp.setenv('MLKIT_SETTINGS', str(ini))
        mp.setenv('BENTOML_HOME', str(store_home(load_settings(ini, env={}))))
        mp.setenv('BENTOML_DO_NOT_TRACK', 'True')
        mp.setenv('MLKIT_API_TOKEN', API)  # the gatekeeper reads the tokens when the app is built
        mp.setenv('MLKIT_ADMIN_TOKEN', ADMIN)
        for k in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'): mp.setenv(k, os.environ.get(k, '1'))  # the module sets them
        spec = importlib.util.spec_from_file_location(SERVICE_MODULE, ROOT/'bentos'/'mlkit_service'/'service.py')
        mod = sys.modules[SERVICE_MODULE] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod, mod.MlkitService.to_asgi()  # Starlette builds the middleware (the gatekeeper) at the first call: keep the env till the end
    sys.modules.pop(SERVICE_MODULE, None)


@pytest.fixture(scope='module')
def client(service):
    with TestClient(service[1]) as c:  # runs the lifespan: the service's __init__ loads the models, on_shutdown closes the log
        yield c


def records(n, day=0, seed=0):
    df = churn_day(day, n=n, seed=seed)
    return df, frame_to_records(df.drop(columns=['churned', 'event_time']))


def test_predict_answers_like_the_champion_pipeline(project, client):
    ini, champ, _ = project
    df, recs = records(40)
    r = client.post('/predict', json={'records': recs}, headers=H)
    assert r.status_code == 200, r.text
    ans = r.json()
    pipe, _ = load_pipeline(champ, load_settings(ini, env={}))
    assert [a['prediction'] for a in ans] == pipe.predict(df).tolist()
    assert {a['model'] for a in ans} == {champ} and {a['variant'] for a in ans} == {'champion'}
    assert len({a['request_id'] for a in ans}) == 40


@pytest.mark.parametrize('change,status,field,words', [
    (dict(monthly_charges='a lot'), 422, 'monthly_charges', "record 0: 'monthly_charges' must be a number"),
    (dict(tenure_months=None), 422, 'tenure_months', "'tenure_months' may not be null"),
    (dict(request_id=''), 422, 'request_id', "'request_id' must be a non-empty string"),
    (dict(autopay='sometimes'), 422, 'autopay', "'autopay' must be true or false"),
])
def test_invalid_records_get_4xx_naming_the_field(client, change, status, field, words):
    rec = dict(records(1)[1][0], **change)
    r = client.post('/predict', json={'records': [rec]}, headers=H)
    assert r.status_code == status, r.text
    assert words in r.json()['error'], r.json()
    assert [e['field'] for e in r.json()['errors']] == [field]


def test_malformed_bodies_get_400(client):
    for body in (b'{"records": [', b'[]', b'{"records": {}}'):
        r = client.post('/predict', content=body, headers={**H, 'Content-Type': 'application/json'})
        assert r.status_code == 400 and r.json()['error'], (body, r.text)


def labels(ini, ids):
    log = PredictionLog.from_settings(load_settings(ini, env={}))
    try: got = log.read(with_features=False).set_index('request_id')
    finally: log.close()
    return [json.loads(got.loc[i, 'label']) if isinstance(got.loc[i, 'label'], str) else got.loc[i, 'label'] for i in ids]


def test_feedback_joins_and_refuses_what_would_spoil_the_log(project, client):
    ini = project[0]
    df, recs = records(6, day=1)
    ids = [a['request_id'] for a in client.post('/predict', json={'records': recs}, headers=H).json()]
    items = [dict(request_id=i, label=int(y)) for i, y in zip(ids[:4], df['churned'])] + [dict(request_id='no-such-id', label=1)]
    r = client.post('/feedback', json={'items': items}, headers=H)
    assert r.status_code == 200, r.text
    assert r.json() == dict(joined=4, unknown=['no-such-id'])
    assert labels(ini, ids[:4]) == [int(y) for y in df['churned'][:4]]
    bad = [({'items': [dict(request_id=ids[0], label=None)]}, 422, 'label', 'not_null'),  # would erase the label just given
           ({'items': [dict(request_id=ids[0], label=1, score=0.3)]}, 422, 'score', 'unknown'),
           ({'items': [dict(request_id=ids[0], label=2)]}, 422, 'label', 'label'),  # not a class of the champion (0, 1)
           ({'items': [dict(request_id=ids[0], label=True)]}, 422, 'label', 'label'),
           ({'items': [dict(request_id=ids[0], label='yes')]}, 422, 'label', 'label'),
           ({'items': [dict(label=1)]}, 422, 'request_id', 'required'),
           ({'items': [dict(request_id='', label=1)]}, 422, 'request_id', 'type'),
           ({'items': [dict(request_id='r' * 201, label=1)]}, 422, 'request_id', 'type'),
           ({'items': []}, 422, 'items', 'empty'),
           ({'items': [dict(request_id='r', label=1)] * 1001}, 413, 'items', 'max_records')]
    for body, status, field, rule in bad:
        r = client.post('/feedback', json=body, headers=H)
        assert r.status_code == status, (body, r.text[:300])
        (e, *_) = r.json()['errors']
        assert (e['field'], e['rule']) == (field, rule), r.json()
    r = client.post('/feedback', content=f'{{"items": [{{"request_id": "{ids[1]}", "label": NaN}}]}}', headers={**H, 'Content-Type': 'application/json'})
    assert r.status_code == 422 and r.json()['errors'][0]['rule'] == 'not_null', r.text
    r = client.post('/feedback', json=[dict(request_id=ids[0], label=1)], headers=H)
    assert r.status_code == 400 and 'items' in r.json()['error']
    assert labels(ini, ids[:2]) == [int(y) for y in df['churned'][:2]]  # the refused items changed nothing


def test_metadata(project, client):
    ini, champ, _ = project
    r = client.get('/metadata', headers=H)
    assert r.status_code == 200, r.text
    md = r.json()
    assert (md['champion']['tag'], md['challenger'], md['routing']['mode'], md['source']) == (champ, None, 'champion', 'registry')
    assert md['champion']['metrics']['roc_auc'] > 0.7 and md['champion']['data_fingerprint']


def test_tokens(client):
    recs = records(1)[1]
    assert client.post('/predict', json={'records': recs}).status_code == 401
    assert client.post('/predict', json={'records': recs}, headers={'Authorization': 'Bearer nope'}).status_code == 401
    assert client.post('/predict', json={'records': recs}, headers=H).status_code == 200
    assert client.post('/feedback', json={'items': [dict(request_id='x', label=1)]}).status_code == 401
    assert client.get('/metadata').status_code == 401
    assert client.get('/metadata', headers=H).status_code == 200
    assert client.get('/readyz').status_code == 200 and client.get('/livez').status_code == 200
    assert client.post('/admin/reload').status_code == 401
    assert client.post('/admin/reload', headers=H).status_code == 401  # the API token is not the admin token


def test_reload_serves_the_new_champion(project, client):
    ini, champ, chal = project
    s = load_settings(ini, env={})
    recs = records(5, day=2)[1]
    model = lambda: {a['model'] for a in client.post('/predict', json={'records': recs}, headers=H).json()}
    stamp = s.state_dir/'serving.stamp'
    before = stamp.stat().st_mtime if stamp.exists() else 0.0
    reg = Registry.from_settings(s)
    reg.promote(chal, 'test', 'reload test')
    try:
        assert model() == {champ}  # promoted, not reloaded yet: the worker keeps its models
        r = client.post('/admin/reload', headers=ADMIN_H)
        assert r.status_code == 200, r.text
        assert r.json()['champion']['tag'] == chal
        assert model() == {chal}
        assert client.get('/metadata', headers=H).json()['champion']['tag'] == chal
        assert stamp.stat().st_mtime > before  # the other workers are told
    finally:
        reg.rollback('test', 'restore the champion after the reload test')
        reg.set_stage(chal, 'challenger', actor='test', reason='challenger again')
        reg.close()
    assert client.post('/admin/reload', headers=ADMIN_H).json()['champion']['tag'] == champ
    assert model() == {champ}
