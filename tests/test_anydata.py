"End to end on data mlkit never saw: a rare-positive binary table, a 4-class table, scikit-learn's diabetes regression"
import json, math, os, subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import BIN
from anydata import CASES, write_project
from service_util import Server
from mlkit.config import load_settings
from mlkit.registry import Registry
from mlkit.service import frame_to_records
from mlkit.store import load_pipeline


def mlkit(*args, cwd):
    env = {k: v for k, v in os.environ.items() if not k.startswith('MLKIT_')}
    env['BENTOML_DO_NOT_TRACK'] = 'True'
    return subprocess.run([str(BIN/'mlkit'), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def strict_json(path):
    "Parse `path` as strict JSON: a bare NaN or Infinity raises"
    def refuse(c): raise ValueError(f"{path}: bare {c} is not JSON")
    return json.loads(Path(path).read_text(), parse_constant=refuse)


@pytest.fixture(scope='module', params=list(CASES))
def case(request, tmp_path_factory):
    "A project for one data set, retrained through the CLI with `-p seed 7`"
    name = request.param
    ini, df = write_project(tmp_path_factory.mktemp(name), name)
    r = mlkit('retrain', '-p', 'seed', '7', cwd=ini.parent)
    return dict(name=name, ini=ini, df=df, retrain=r)


@pytest.fixture(scope='module')
def champion(case):
    "The champion's tag (retrained without `-p` if the run with `-p` left none, so later steps still get checked)"
    s = load_settings(case['ini'], env={})
    reg = Registry.from_settings(s)
    if not reg.champion():
        r = mlkit('retrain', cwd=case['ini'].parent)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return reg.champion()['tag']


@pytest.fixture(scope='module')
def server(case, champion):
    srv = Server(case['ini']).start()
    yield srv
    srv.stop()


def features(case):
    target = CASES[case['name']][1]
    return case['df'].drop(columns=[target, 'event_time'])


def test_retrain_with_p_promotes(case):
    r = case['retrain']
    assert r.returncode == 0, f"exit {r.returncode}: {r.stdout[-2000:]} {r.stderr[-3000:]}"
    assert 'Traceback' not in r.stderr
    runs = sorted((case['ini'].parent/'.mlkit'/'runs').iterdir())
    params = strict_json(runs[-1]/'parameters.json')
    assert int(params['seed']) == 7, params
    summary = strict_json(runs[-1]/'summary.json')
    assert summary['task'] == CASES[case['name']][2]
    assert summary['decision'] == 'promote', (summary['decision'], summary.get('reasons'))


def test_serve_answers_equal_the_pipeline(case, champion, server):
    X = features(case).head(200)
    r = httpx.post(f'{server.url}/predict', json={'records': frame_to_records(X)}, timeout=60)
    assert r.status_code == 200, r.text
    ans = r.json()
    pipe, _ = load_pipeline(champion, load_settings(case['ini'], env={}))
    want = pipe.predict(X)
    got = [a['prediction'] for a in ans]
    if CASES[case['name']][2] == 'regression':
        np.testing.assert_allclose(got, want.astype(float), rtol=1e-6)
    else:
        assert [str(g) for g in got] == [str(w) for w in want]
        proba = pipe.predict_proba(X)
        for a, p in zip(ans, proba):
            assert {str(c) for c in a['probabilities']} == {str(c) for c in pipe.classes_}
            assert max(abs(a['probabilities'][str(c)] - q) for c, q in zip(pipe.classes_, p)) < 1e-5
    assert {a['model'] for a in ans} == {champion}
    case['request_ids'] = [a['request_id'] for a in ans]


def test_feedback_good_labels_200_bad_labels_422_naming_the_item(case, server):
    ids = case.get('request_ids') or pytest.skip('no predictions logged')
    target = CASES[case['name']][1]
    labels = case['df'][target].head(len(ids)).tolist()
    good = [{'request_id': i, 'label': (float(l) if isinstance(l, (float, np.floating)) else l.item() if hasattr(l, 'item') else l)}
            for i, l in zip(ids[:150], labels[:150])]
    r = httpx.post(f'{server.url}/feedback', json={'items': good}, timeout=30)
    assert r.status_code == 200, r.text
    failures = []
    for what, bad in CASES[case['name']][6].items():
        body = json.dumps({'items': [{'request_id': ids[150], 'label': good[0]['label']},
                                     {'request_id': ids[151], 'label': bad}]}, allow_nan=True)
        r = httpx.post(f'{server.url}/feedback', content=body, headers={'Content-Type': 'application/json'}, timeout=30)
        if r.status_code != 422 or 'item 1' not in r.text: failures.append(f"{what} {bad!r}: {r.status_code} {r.text[:300]}")
    assert not failures, failures


def test_monitor_with_p_gives_a_verdict_and_a_report(case, server):
    r = mlkit('monitor', '-p', 'psi_alert', '0.3', cwd=case['ini'].parent)
    assert r.returncode in (0, 4, 5), f"exit {r.returncode}: {r.stdout[-2000:]} {r.stderr[-3000:]}"
    report = next(l for l in r.stdout.splitlines() if l.startswith('report: ')).split(': ', 1)[1]
    assert Path(report).name == 'report.html' and Path(report).stat().st_size > 1000
    summary = strict_json(Path(report).parent/'summary.json')
    assert summary['exit_status'] == r.returncode
    assert summary['verdict'] in ('ok', 'warn', 'retrain') and summary['line'] in r.stdout
    assert summary['rows'] >= 200  # the served records
    assert summary['thresholds']['psi_alert'] == 0.3, summary['thresholds']  # -p reached the job


def test_every_json_the_jobs_wrote_is_strict(case, champion):
    files = list((case['ini'].parent/'.mlkit'/'runs').rglob('*.json'))
    assert files
    bad = []
    for f in files:
        try: strict_json(f)
        except ValueError as e: bad.append(str(e)[:200])
    assert not bad, bad
