"Labels by source through a real service: one source sending wrong labels is named by the monitoring job, honest sources are not"
import json, os, subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
import sqlalchemy as sa

from conftest import BIN
from anydata import CASES, write_project
from service_util import Server
from mlkit.config import load_settings
from mlkit.predlog import PredictionLog
from mlkit.service import frame_to_records


def mlkit(*args, cwd):
    env = {k: v for k, v in os.environ.items() if not k.startswith('MLKIT_')}
    env['BENTOML_DO_NOT_TRACK'] = 'True'
    return subprocess.run([str(BIN/'mlkit'), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def corrupt(name, labels, rng):
    "Wrong labels for a share of `labels`: the next class for a classification, far off for a regression"
    if CASES[name][2] == 'regression':
        return [float(y) + float(np.std(labels)) * 2.5 * rng.choice([-1, 1]) for y in labels]
    classes = sorted(set(labels))
    return [classes[(classes.index(y) + 1) % len(classes)] if rng.random() < 0.7 else y for y in labels]


def plain(v): return v.item() if hasattr(v, 'item') else v


def predict_and_label(srv, name, df, bad_source):
    "Predict every row of `df` through HTTP, then send its labels in two halves: `crm` honest, `partner` honest or wrong"
    target = CASES[name][1]
    X = df.drop(columns=[target, 'event_time'])
    r = httpx.post(f'{srv.url}/predict', json={'records': frame_to_records(X)}, timeout=120)
    assert r.status_code == 200, r.text
    ids, y = [a['request_id'] for a in r.json()], [plain(v) for v in df[target]]
    rng = np.random.default_rng(1)
    partner = corrupt(name, y[1::2], rng) if bad_source else y[1::2]
    items = ([dict(request_id=i, label=l, source='crm') for i, l in zip(ids[0::2], y[0::2])] +
             [dict(request_id=i, label=l, source='partner') for i, l in zip(ids[1::2], partner)])
    r = httpx.post(f'{srv.url}/feedback', json={'items': items}, timeout=60)
    assert r.status_code == 200 and r.json()['joined'] == len(items), r.text
    return ids


def monitor_summary(ini):
    r = mlkit('monitor', cwd=ini.parent)
    assert r.returncode in (0, 4, 5), r.stdout[-2000:] + r.stderr[-3000:]
    report = next(l for l in r.stdout.splitlines() if l.startswith('report: ')).split(': ', 1)[1]
    return json.loads((Path(report).parent/'summary.json').read_text())


@pytest.mark.parametrize('name', ['four_classes', 'diabetes'])
def test_a_source_of_wrong_labels_is_named_and_honest_sources_are_not(name, tmp_path):
    ini, df = write_project(tmp_path, name)
    r = mlkit('retrain', cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    fresh = CASES[name][0](seed=5)  # rows of the same kind (diabetes: the same rows, shuffled)
    with Server(ini) as srv:
        ids = predict_and_label(srv, name, fresh, bad_source=False)
        clean = monitor_summary(ini)
        predict_and_label(srv, name, fresh, bad_source=True)
        poisoned = monitor_summary(ini)
    with PredictionLog.from_settings(load_settings(ini, env={})) as plog:  # the source is stored with each label
        with plog.engine.connect() as c:
            got = dict(c.execute(sa.text("SELECT request_id, label_source FROM predictions WHERE request_id IN (:a, :b)"),
                                 dict(a=ids[0], b=ids[1])).all())
    assert got == {ids[0]: 'crm', ids[1]: 'partner'}, got
    by_source = lambda s: {r['source']: r for r in s['feedback']['sources']}
    assert {k: (v['tested'], v['passed']) for k, v in by_source(clean).items()} == {'crm': (True, True), 'partner': (True, True)}, clean['feedback']
    assert not [f for f in clean['findings'] if f['kind'] == 'labels'], clean['findings']
    assert by_source(poisoned)['crm']['passed'] and not by_source(poisoned)['partner']['passed'], poisoned['feedback']
    flagged = [f for f in poisoned['findings'] if f['kind'] == 'labels']
    assert [(f['level'], f['subject']) for f in flagged] == [('warn', 'partner')], flagged
    assert "labels from source 'partner' contradict the champion" in flagged[0]['detail']
    assert poisoned['verdict'] in ('warn', 'retrain')
