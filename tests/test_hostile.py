"Hostile requests to a real `mlkit serve` on 127.0.0.1, for a binary, a multiclass and a regression model"
import json, math, time, urllib.parse, uuid

import httpx
import pytest

from anydata import CASES, write_project
from service_util import Server
from mlkit.config import load_settings
from mlkit.contract import features
from mlkit.predlog import PredictionLog
import mlkit.logread  # noqa: F401  adds PredictionLog.read
from mlkit.retrain import run_steps
from mlkit.service import frame_to_records
from mlkit.store import load_pipeline

JSON = {'Content-Type': 'application/json'}


@pytest.fixture(scope='module', params=list(CASES))
def case(request, tmp_path_factory):
    "A project for one data set with a champion, served by `mlkit serve`"
    name = request.param
    ini, df = write_project(tmp_path_factory.mktemp(name), name)
    tag = run_steps(str(ini))['model_tag']
    s = load_settings(ini, env={})
    _, info = load_pipeline(tag, s)
    con = info['metadata']['contract']
    target = CASES[name][1]
    recs = frame_to_records(df.drop(columns=[target, 'event_time']).head(20))
    srv = Server(ini).start()
    yield dict(name=name, ini=ini, settings=s, server=srv, url=srv.url, recs=recs, contract=con,
               numeric=next(f for f in features(con) if con['columns'][f]['kind'] == 'numeric'),
               good_label=CASES[name][5], bad_labels=CASES[name][6])
    srv.stop()


def logged(case, ids):
    "The logged champion rows of `ids`, by request id: their label (None when unlabelled)"
    log = PredictionLog.from_settings(case['settings'])
    try:
        log.flush()
        df = log.read(with_features=False)
    finally: log.close()
    df = df[df.request_id.isin(ids) & ~df.shadow.astype(bool)]
    return {r: None if l is None or (isinstance(l, float) and math.isnan(l)) else l for r, l in zip(df.request_id, df.label)}


def fresh(prefix): return f'{prefix}-{uuid.uuid4().hex[:12]}'


def wait_logged(case, ids, timeout=10):
    "Wait until every id in `ids` is in the log (other workers write within flush_ms)"
    deadline = time.monotonic() + timeout
    while (got := logged(case, ids)).keys() != set(ids) and time.monotonic() < deadline: time.sleep(0.2)
    return got


def test_a_body_that_is_json_and_a_form_is_refused(case):
    "JSON to the gatekeeper, a form to BentoML: its `records` field breaks the contract and the 1,000 cap"
    good = case['recs'][0]
    ids = [fresh('bypass') for _ in range(3000)]
    bad = [dict(good, **{case['numeric']: 'not a number'}, request_id=i) for i in ids]
    body = json.dumps({'records': [good], 'pad': '&records=' + urllib.parse.quote(json.dumps(bad)) + '&x='})
    for ctype in ('application/x-www-form-urlencoded', 'multipart/form-data', 'text/plain', None):
        r = httpx.post(f"{case['url']}/predict", content=body, headers={'Content-Type': ctype} if ctype else {}, timeout=60)
        assert r.status_code == 415, (ctype, r.status_code, r.text[:300])
        assert 'application/json' in r.json()['error']
    r = httpx.post(f"{case['url']}/predict", content=body, headers={'Content-Type': 'application/json; charset=utf-8'}, timeout=60)
    assert r.status_code == 200 and len(r.json()) == 1, r.text[:300]  # as JSON: the one valid record
    assert logged(case, ids) == {}


def test_hostile_bodies_get_a_4xx_naming_the_problem(case):
    url, rid = case['url'], fresh('h')
    label = case['good_label']
    num = case['numeric']
    form = {'Content-Type': 'application/x-www-form-urlencoded'}
    cases = [  # (path, body, headers, status, words in the error, field of the first problem)
        ('/feedback', {'items': [dict(request_id='', label=label)]}, JSON, 422, 'request_id must be a non-empty string', 'request_id'),
        ('/feedback', {'items': [dict(request_id='a\x00b', label=label)]}, JSON, 422, 'request_id must be a non-empty string', 'request_id'),
        ('/feedback', {'items': [dict(request_id='r' * 201, label=label)]}, JSON, 422, 'at most 200 characters', 'request_id'),
        ('/feedback', {'items': [dict(request_id=rid, label=label, score=1)]}, JSON, 422, 'unknown key(s) score', 'score'),
        ('/feedback', 'items=' + urllib.parse.quote(json.dumps([dict(request_id='', label=label)])), form, 415, 'application/json', None),
        ('/feedback', {'items': [dict(request_id=rid, label=label)]}, {'Content-Type': 'multipart/form-data'}, 415, 'application/json', None),
        ('/predict', '{"records": [%s]}' % json.dumps(dict(case['recs'][0], **{num: 0})).replace(f'{json.dumps(num)}: 0', f'{json.dumps(num)}: 1{"0" * 400}'),
         JSON, 422, f"'{num}' must be a finite number", num),
        ('/predict', '{"records": [%s]}' % json.dumps(dict(case['recs'][0], request_id='\ud800')), JSON, 400, 'not Unicode', None),
        ('/predict', json.dumps({'records': [case['recs'][0]]}).encode('utf-16'), JSON, 400, 'not UTF-8', None),
    ]
    for path, body, headers, status, words, field in cases:
        data = body if isinstance(body, (str, bytes)) else json.dumps(body)
        r = httpx.post(f'{url}{path}', content=data, headers=headers, timeout=30)
        assert r.status_code == status, (path, str(body)[:80], r.status_code, r.text[:300])
        assert words in r.json()['error'], (words, r.json())
        if field: assert r.json()['errors'][0]['field'] == field, r.json()
    assert 'Traceback' not in case['server'].log_path.read_text()


def test_a_label_is_written_once(case):
    url, label = case['url'], case['good_label']
    ids = [fresh('lab') for _ in range(3)]
    r = httpx.post(f'{url}/predict', json={'records': [dict(rec, request_id=i) for rec, i in zip(case['recs'], ids)]}, timeout=30)
    assert r.status_code == 200, r.text
    wait_logged(case, ids)
    fb = lambda items: httpx.post(f'{url}/feedback', json={'items': items}, timeout=30)
    assert fb([dict(request_id=ids[0], label=label)]).json() == dict(joined=1, unknown=[])
    other = CASES[case['name']][5] + 1 if case['name'] == 'diabetes' else (0 if label == 1 else 'silver')
    r = fb([dict(request_id=ids[1], label=label), dict(request_id=ids[0], label=other)])
    assert r.status_code == 409, r.text
    assert ids[0] in r.json()['error'] and [(e['index'], e['rule']) for e in r.json()['errors']] == [(1, 'labelled')], r.json()
    r = fb([dict(request_id=ids[2], label=label), dict(request_id=ids[2], label=other)])
    assert r.status_code == 422 and r.json()['errors'][0]['rule'] == 'duplicate', r.text
    r = httpx.post(f'{url}/feedback', content='{"items": [{"request_id": "%s", "label": NaN}]}' % ids[0], headers=JSON, timeout=30)
    assert r.status_code == 422 and r.json()['errors'][0]['rule'] == 'not_null', r.text
    for what, bad in case['bad_labels'].items():
        r = httpx.post(f'{url}/feedback', content=json.dumps({'items': [dict(request_id=ids[1], label=bad)]}), headers=JSON, timeout=30)
        assert r.status_code == 422 and r.json()['errors'][0]['field'] == 'label', (what, r.text)
    assert logged(case, ids) == {ids[0]: label, ids[1]: None, ids[2]: None}  # the refused requests changed nothing


def test_a_request_id_names_one_prediction(case):
    url, recs = case['url'], case['recs']
    taken, victim = fresh('first'), fresh('victim')
    pred = lambda rs: httpx.post(f'{url}/predict', json={'records': rs}, timeout=30)
    assert pred([dict(recs[0], request_id=taken)]).status_code == 200
    r = pred([dict(recs[1], request_id=victim), dict(recs[2], request_id=taken)])
    assert r.status_code == 409, r.text
    assert taken in r.json()['error'] and [(e['index'], e['rule']) for e in r.json()['errors']] == [(1, 'duplicate')], r.json()
    r = pred([dict(recs[1], request_id=victim), dict(recs[2], request_id=victim)])
    assert r.status_code == 422 and r.json()['errors'][0]['rule'] == 'duplicate', r.text
    r = pred([dict(recs[1], request_id=victim, **{case['numeric']: 'x'})])
    assert r.status_code == 422, r.text
    assert pred([dict(recs[1], request_id=victim)]).status_code == 200  # refused requests claimed nothing
    assert pred([dict(recs[1], request_id=victim)]).status_code == 409
    assert set(wait_logged(case, [taken, victim])) == {taken, victim}
