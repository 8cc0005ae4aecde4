"The BentoML service, served for real by `mlkit serve` on 127.0.0.1"
import json, math, os, threading, time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from conftest import ROOT
from service_util import Server
from mlkit.config import load_settings
from mlkit.datasets import churn_day
from mlkit.jobs import scratch_project
from mlkit.predlog import PredictionLog
import mlkit.logread  # noqa: F401  adds PredictionLog.count and .read
from mlkit.registry import Registry
from mlkit.retrain import run_steps
from mlkit.service import frame_to_records
from mlkit.store import load_pipeline

API, ADMIN = 'api-token-7f3a', 'admin-token-91c2'
H = {'Authorization': f'Bearer {API}'}


@pytest.fixture(scope='module')
def project(tmp_path_factory):
    "A project with a champion (the job's pick: logistic regression on churn) and a newer challenger (gradient boosting, asked for by name)"
    os.environ['MLKIT_SCHEDULE_MIN_RETRAIN_INTERVAL_HOURS'] = '0'
    try:
        ini = scratch_project(ROOT/'settings.ini', tmp_path_factory.mktemp('svc'))
        champ = run_steps(str(ini))['model_tag']
        chal = run_steps(str(ini), model='hist_gradient_boosting')['model_tag']
    finally: os.environ.pop('MLKIT_SCHEDULE_MIN_RETRAIN_INTERVAL_HOURS')
    s = load_settings(ini, env={})
    reg = Registry.from_settings(s)
    if reg.champion()['tag'] != champ:
        reg.rollback('test', 'keep the first model as champion')
        reg.set_stage(chal, 'challenger', actor='test', reason='challenger for routing tests')
    return ini, champ, chal


def records(n=200, day=0, seed=0):
    df = churn_day(day, n=n, seed=seed)
    return df, frame_to_records(df.drop(columns=['churned', 'event_time']))


@pytest.fixture(scope='module')
def server(project):
    ini, champ, chal = project
    srv = Server(ini, env={'MLKIT_API_TOKEN': API, 'MLKIT_ADMIN_TOKEN': ADMIN, 'MLKIT_SERVE_MAX_BODY_MB': '1'}, workers=2).start()
    yield srv
    srv.stop()


def test_predictions_equal_the_pipeline(project, server):
    ini, champ, _ = project
    df, recs = records(300)
    r = httpx.post(f'{server.url}/predict', json={'records': recs}, headers=H, timeout=30)
    assert r.status_code == 200, r.text
    ans = r.json()
    pipe, _ = load_pipeline(champ, load_settings(ini, env={}))
    assert [a['prediction'] for a in ans] == pipe.predict(df).tolist()
    proba = pipe.predict_proba(df)[:, 1]
    assert max(abs(a['probabilities']['1'] - p) for a, p in zip(ans, proba)) < 1e-5
    assert {a['model'] for a in ans} == {champ} and {a['variant'] for a in ans} == {'champion'}
    assert len({a['request_id'] for a in ans}) == 300


def post(server, body, raw=False, headers=H):
    data = body if raw else json.dumps(body)
    return httpx.post(f'{server.url}/predict', content=data, headers={**headers, 'Content-Type': 'application/json'}, timeout=30)


def test_requests_are_not_traced_by_default(server):
    "[serve] tracing = false: BentoML makes no OpenTelemetry span (its request id header comes from the span)"
    r = post(server, {'records': records(1)[1]})
    assert r.status_code == 200 and r.headers['content-type'] == 'application/json'
    assert 'x-bentoml-request-id' not in r.headers


def test_bad_inputs_get_4xx_naming_the_problem(server):
    _, recs = records(3)
    good = recs[0]
    cases = [
        (b'{"records": [', 400, 'malformed JSON'),
        (b'', 400, 'empty body'),
        (json.dumps([good]).encode(), 400, 'must be a JSON object'),
        (json.dumps({'records': {}}).encode(), 400, '"records" must be a list'),
        (json.dumps({'records': []}).encode(), 422, 'empty'),
        (json.dumps({'records': [{k: v for k, v in good.items() if k != 'tenure_months'}]}).encode(), 422, "missing required feature 'tenure_months'"),
        (json.dumps({'records': [good, dict(good, monthly_charges='a lot')]}).encode(), 422, "record 1: 'monthly_charges' must be a number"),
        (json.dumps({'records': [dict(good, tenure_months=None)]}).encode(), 422, "'tenure_months' may not be null"),
        (json.dumps({'records': [dict(good, age=float('nan'))]}).encode(), 422, "'age' must be a finite number, got nan"),
        (json.dumps({'records': [dict(good, autopay='sometimes')]}).encode(), 422, "'autopay' must be true or false"),
        (json.dumps({'records': [7]}).encode(), 422, 'a record must be a JSON object'),
        (json.dumps({'records': [good] * 1001}).encode(), 413, 'the limit is 1000'),
        (b'{"records": [' + b'1,' * 600_000 + b'1]}', 413, 'over the 1 MiB limit'),
    ]
    for body, status, words in cases:
        r = post(server, body, raw=True)
        assert r.status_code == status, (words, r.status_code, r.text[:300])
        assert words in r.json()['error'], (words, r.json())
    r = post(server, {'records': [dict(good, monthly_charges='x')]})
    (e,) = r.json()['errors']
    assert (e['index'], e['field'], e['rule']) == (0, 'monthly_charges', 'type')


def test_extra_fields_and_unknown_categories_are_reported(server):
    _, recs = records(1)
    r = post(server, {'records': [dict(recs[0], favourite_colour='blue', plan='platinum')]})
    assert r.status_code == 200, r.text
    (a,) = r.json()
    assert a['ignored_fields'] == ['favourite_colour']
    assert any("'plan' = 'platinum' is an unknown category" in w for w in a['warnings'])


FEATURE_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
                           st.text(max_size=20), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
FEATURES = ['customer_id', 'tenure_months', 'monthly_charges', 'age', 'plan', 'region', 'contract', 'support_calls', 'autopay']
RECORD = st.fixed_dictionaries({}, optional={f: FEATURE_VALUES for f in FEATURES + ['extra']})
VALID = records(1)[1][0]
ONE_FIELD_CHANGED = st.builds(lambda k, v: {'records': [dict(VALID, **{k: v})]}, st.sampled_from(FEATURES + ['extra', 'request_id']),
                              st.one_of(FEATURE_VALUES, st.text(min_size=190, max_size=260)))
BODY = st.one_of(ONE_FIELD_CHANGED, st.fixed_dictionaries({'records': st.lists(RECORD, max_size=5)}), st.lists(RECORD, max_size=3),
                 st.fixed_dictionaries({'records': FEATURE_VALUES}), FEATURE_VALUES)


def test_a_thousand_generated_bodies_never_get_a_5xx(server):
    seen = []
    client = httpx.Client(headers={**H, 'Content-Type': 'application/json'}, timeout=30)

    @hsettings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(BODY)
    def check(body):
        r = client.post(f'{server.url}/predict', content=json.dumps(body, allow_nan=True))
        seen.append(r.status_code)
        assert r.status_code < 500, (body, r.status_code, r.text[:300])
        r.json()  # every answer is JSON

    check()
    assert len(seen) >= 1000
    assert {200, 422} <= set(seen)


def test_tokens(server):
    _, recs = records(1)
    assert httpx.post(f'{server.url}/predict', json={'records': recs}, timeout=10).status_code == 401
    assert httpx.post(f'{server.url}/predict', json={'records': recs}, headers={'Authorization': 'Bearer nope'}, timeout=10).status_code == 401
    assert httpx.get(f'{server.url}/metadata', timeout=10).status_code == 401
    assert httpx.get(f'{server.url}/livez', timeout=10).status_code == 200
    assert httpx.get(f'{server.url}/readyz', timeout=10).status_code == 200
    assert httpx.post(f'{server.url}/admin/reload', headers=H, timeout=30).status_code == 401
    assert httpx.get(f'{server.url}/metrics', headers=H, timeout=10).status_code == 200


def test_feedback_joins_the_logged_prediction(project, server):
    ini = project[0]
    df, recs = records(20, day=1)
    ans = post(server, {'records': recs}).json()
    ids = [a['request_id'] for a in ans]
    items = [dict(request_id=i, label=int(y)) for i, y in zip(ids[:10], df['churned'][:10])] + [dict(request_id='no-such-id', label=1)]
    r = httpx.post(f'{server.url}/feedback', json={'items': items}, headers=H, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()['joined'] == 10 and r.json()['unknown'] == ['no-such-id']
    bad = httpx.post(f'{server.url}/feedback', json={'items': [{'label': 1}]}, headers=H, timeout=30)
    assert bad.status_code == 422 and bad.json()['errors'][0]['field'] == 'request_id'
    wrong = [dict(request_id=ids[0], label=5), dict(request_id=ids[1], label=True)]  # not classes of the champion
    bad = httpx.post(f'{server.url}/feedback', json={'items': wrong}, headers=H, timeout=30)
    assert bad.status_code == 422 and [(e['index'], e['field']) for e in bad.json()['errors']] == [(0, 'label'), (1, 'label')], bad.text
    assert "feedback item 0" in bad.json()['error'] and "not one of the model's classes" in bad.json()['error'], bad.text
    log = PredictionLog.from_settings(load_settings(ini, env={}))
    got = log.read(with_features=False).set_index('request_id')
    for i, y in zip(ids[:10], df['churned'][:10]): assert float(got.loc[i, 'label']) == float(y)
    assert got.loc[ids[15], 'label'] is None or pd.isna(got.loc[ids[15], 'label'])


def test_metadata_and_metrics(project, server):
    md = httpx.get(f'{server.url}/metadata', headers=H, timeout=10).json()
    assert md['champion']['tag'] == project[1] and md['routing']['mode'] == 'champion'
    assert md['champion']['metrics']['roc_auc'] > 0.7 and md['champion']['data_fingerprint']
    text = httpx.get(f'{server.url}/metrics', headers=H, timeout=10).text
    assert 'mlkit_predictions_total{' in text and 'variant="champion"' in text and 'mlkit_model_latency_seconds' in text


def test_reload_switches_model_under_load_without_failures(project, server):
    ini, champ, chal = project
    _, recs = records(50, day=2)
    stop, results = threading.Event(), []

    def load():
        with httpx.Client(headers=H, timeout=30) as c:
            k = 0
            while not stop.is_set():
                r = c.post(f'{server.url}/predict', json={'records': [recs[k % 50]]})
                results.append((r.status_code, r.json()[0]['model'] if r.status_code == 200 else r.text))
                k += 1

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads: t.start()
    time.sleep(2)
    reg = Registry.from_settings(load_settings(ini, env={}))
    reg.promote(chal, 'test', 'reload test')
    r = httpx.post(f'{server.url}/admin/reload', headers={'Authorization': f'Bearer {ADMIN}'}, timeout=60)
    assert r.status_code == 200, r.text
    time.sleep(3)  # the other worker notices within a second
    n_after = len(results)
    time.sleep(2)
    stop.set()
    for t in threads: t.join()
    reg.rollback('test', 'restore the champion after the reload test')
    reg.set_stage(chal, 'challenger', actor='test', reason='challenger again for the routing tests')
    httpx.post(f'{server.url}/admin/reload', headers={'Authorization': f'Bearer {ADMIN}'}, timeout=60)
    assert [s for s, _ in results if s != 200] == []
    models = [m for _, m in results]
    assert models[0] == champ and set(models[n_after:]) == {chal}, (models[0], set(models[n_after:]))
    log = (server.log_path).read_text()
    assert API not in log and ADMIN not in log


def test_ab_routing_is_sticky_and_split_as_set(project):
    ini, champ, chal = project
    with Server(ini, env={'MLKIT_SERVE_MODE': 'ab', 'MLKIT_SERVE_CHALLENGER_SHARE': '0.3'}) as srv:
        base = records(100)[1][0]
        seen = {}
        with httpx.Client(timeout=60) as c:
            for rep in range(2):
                for b in range(100):
                    batch = [dict(base, customer_id=f'E{b * 100 + i:05d}') for i in range(100)]
                    for rec, a in zip(batch, c.post(f'{srv.url}/predict', json={'records': batch}).json()):
                        seen.setdefault(rec['customer_id'], set()).add(a['variant'])
    assert len(seen) == 10_000
    assert all(len(v) == 1 for v in seen.values())
    share = sum(v == {'challenger'} for v in seen.values()) / len(seen)
    assert abs(share - 0.3) <= 0.02, share


def test_shadow_answers_with_the_champion_and_logs_the_challenger(project):
    ini, champ, chal = project
    _, recs = records(40, day=3)
    with Server(ini, env={'MLKIT_SERVE_MODE': 'shadow'}) as srv:
        ans = httpx.post(f'{srv.url}/predict', json={'records': recs}, timeout=30).json()
        assert {a['model'] for a in ans} == {champ}
        time.sleep(1.5)
    log = PredictionLog.from_settings(load_settings(ini, env={})).read(with_features=False)
    ids = {a['request_id'] for a in ans}
    mine = log[log.request_id.isin(ids)]
    assert set(mine[mine.shadow.astype(bool)].model_tag) == {chal}
    assert len(mine[mine.shadow.astype(bool)]) == 40 and len(mine[~mine.shadow.astype(bool)]) == 40


def test_canary_share_rises_while_healthy(project):
    ini, champ, chal = project
    env = {'MLKIT_SERVE_MODE': 'canary', 'MLKIT_SERVE_CHALLENGER_SHARE': '0.1', 'MLKIT_SERVE_CANARY_STEP': '0.2',
           'MLKIT_SERVE_CANARY_MIN_REQUESTS': '20', 'MLKIT_SERVE_CANARY_MAX_LATENCY_RATIO': '100'}
    with Server(ini, env=env) as srv, httpx.Client(timeout=30) as c:
        before = c.get(f'{srv.url}/metadata').json()['routing']
        base = records(1)[1][0]
        for b in range(60):
            c.post(f'{srv.url}/predict', json={'records': [dict(base, customer_id=f'K{b}-{i}') for i in range(50)]})
        after = c.get(f'{srv.url}/metadata').json()['routing']
    assert before['share'] == pytest.approx(0.1)
    assert after['share'] > before['share'], after


def test_every_prediction_is_logged_through_sigterm(project, tmp_path):
    "20,000 single-record requests across 2 workers, then SIGTERM: the log holds every answered prediction"
    ini = scratch_project(ROOT/'settings.ini', tmp_path)
    os.environ['MLKIT_SCHEDULE_MIN_RETRAIN_INTERVAL_HOURS'] = '0'
    try: run_steps(str(ini))
    finally: os.environ.pop('MLKIT_SCHEDULE_MIN_RETRAIN_INTERVAL_HOURS')
    _, recs = records(200, day=4)
    srv = Server(ini, workers=2).start()
    ok = []
    def worker(k):
        with httpx.Client(timeout=60) as c:
            for j in range(k, 20_000, 16):
                r = c.post(f'{srv.url}/predict', json={'records': [recs[j % 200]]})
                if r.status_code == 200: ok.append(r.json()[0]['request_id'])
    try:
        with ThreadPoolExecutor(16) as ex: list(ex.map(worker, range(16)))
    finally: srv.stop()
    assert len(ok) == 20_000
    log = PredictionLog.from_settings(load_settings(ini, env={}))
    assert log.count() == 20_000
    assert set(log.read(with_features=False).request_id) == set(ok)


def test_built_bento_answers_like_mlkit_serve(project, server, tmp_path):
    import subprocess
    from conftest import BIN
    ini, champ, chal = project
    env = {k: v for k, v in os.environ.items() if not k.startswith('MLKIT_') and k != 'IN_TEST'}
    r = subprocess.run([str(BIN/'mlkit'), 'build'], env={**env, 'MLKIT_SETTINGS': str(ini)}, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    archive = next(l.split('archive: ', 1)[1] for l in r.stdout.splitlines() if l.startswith('archive: '))
    tag = next(l.split()[1] for l in r.stdout.splitlines() if l.startswith('built '))
    home = tmp_path/'fresh-bentoml-home'  # a machine that has only the archive
    r = subprocess.run([str(BIN/'bentoml'), 'import', archive], env={**env, 'BENTOML_HOME': str(home), 'BENTOML_DO_NOT_TRACK': 'True'},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    state = tmp_path/'bento-state'
    bento = Server(ini, cmd=[str(BIN/'bentoml'), 'serve', tag, '--host', '127.0.0.1', '--port', '{port}'],
                   env={'BENTOML_HOME': str(home), 'MLKIT_PROJECT_STATE_DIR': str(state)})
    bento.env.pop('MLKIT_SETTINGS')  # the bento carries its own settings.ini
    df, recs = records(100, day=5)
    with bento:
        md = httpx.get(f'{bento.url}/metadata', timeout=10).json()
        assert md['source'] == 'bundled' and md['champion']['tag'] == champ
        got = httpx.post(f'{bento.url}/predict', json={'records': recs}, timeout=30).json()
    want = post(server, {'records': recs}).json()
    assert [(a['prediction'], a['probabilities'], a['model']) for a in got] == [(a['prediction'], a['probabilities'], a['model']) for a in want]
