"Notifications from real job runs to a webhook receiver on 127.0.0.1: one JSON body per event, with the documented fields"
import json, os, subprocess
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest

from conftest import BIN, ROOT
from mlkit import datasets
from mlkit.config import load_settings
from mlkit.demo import WebhookPrinter  # an incoming-webhook stand-in on 127.0.0.1 that keeps every JSON body
from mlkit.jobs import scratch_project
from mlkit.monitor import run_steps as monitor_steps
from mlkit.registry import Registry
from mlkit.retrain import run_steps as retrain_steps
from mlkit.simulate import log_traffic

FIELDS = {'event', 'project', 'run_id', 'kind', 'trigger', 'verdict', 'reasons', 'model_tag', 'champion', 'report', 'at', 'text'}


@pytest.fixture(scope='module')
def hook():
    with WebhookPrinter(out=lambda line: None) as r: yield r


@pytest.fixture(scope='module')
def project(tmp_path_factory, hook):
    ini = scratch_project(ROOT/'settings.ini', tmp_path_factory.mktemp('notify'))
    ini.write_text(ini.read_text().replace('webhooks =', f'webhooks = http://127.0.0.1:{hook.server_address[1]}/services/SECRET'))
    return ini


def mlkit(ini, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith('MLKIT_')}
    env.update(BENTOML_DO_NOT_TRACK='True')
    return subprocess.run([str(BIN/'mlkit'), *args], cwd=ini.parent, env=env, capture_output=True, text=True, timeout=900)


def last(hook, event):
    got = [b for b in hook.bodies if b['event'] == event]
    assert got, (event, hook.events())
    return got[-1]


def test_a_promotion_from_the_retraining_job(project, hook):
    r = mlkit(project, 'retrain')
    assert r.returncode == 0, r.stdout + r.stderr
    b = last(hook, 'promotion')
    assert FIELDS <= set(b), b
    run = json.loads((load_settings(project, env={}).state_dir/'runs'/b['run_id']/'summary.json').read_text())
    assert (b['kind'], b['verdict'], b['model_tag'], b['champion'], b['trigger']) == ('retrain', 'promote', run['model_tag'], run['model_tag'], 'manual')
    assert b['reasons'] == run['reasons'] and b['report'].endswith(f"{b['run_id']}/retrain.ipynb")
    assert b['text'].startswith(f"mlkit {b['project']}: new champion (retrain run {b['run_id']})"), b['text']
    with Registry.from_settings(load_settings(project, env={})) as reg:
        sent = reg.audit_log(10, 'notify.sent', b['run_id'])
    assert [a['details']['event'] for a in sent] == ['promotion'] and 'SECRET' not in json.dumps(sent, default=str)


def test_a_rate_limit_refusal_and_a_failed_run(project, hook):
    r = mlkit(project, 'retrain', '--trigger', 'schedule')  # minutes after the first: inside [schedule] min_retrain_interval_hours
    assert r.returncode == 3, r.stdout + r.stderr
    b = last(hook, 'rate_limit')
    assert b['verdict'] == 'refused' and b['trigger'] == 'schedule' and 'next allowed at' in b['reasons'][0], b
    r = mlkit(project, 'retrain', '-p', 'hyperparameters', 'notjson')
    assert r.returncode == 1, r.stdout + r.stderr
    b = last(hook, 'failed')
    assert b['kind'] == 'retrain' and 'hyperparameters' in b['reasons'][0], b


def test_poisoned_data_is_refused_by_the_gate(project, hook, tmp_path):
    df = datasets.churn(n=1500, seed=5)
    bad = pd.concat([df] * 3, ignore_index=True)  # two thirds of the rows repeat others
    bad.to_parquet(tmp_path/'dup.parquet')
    s = retrain_steps(str(project), data=str(tmp_path/'dup.parquet'))
    assert s['decision'] == 'reject', s
    b = last(hook, 'refused')
    assert b['run_id'] == s['run_id'] and any('duplicates' in x for x in b['reasons']), b


def test_a_retrain_verdict_and_a_rollback(project, hook, tmp_path):
    s = load_settings(project, env={})
    day = datetime(2026, 3, 1, tzinfo=timezone.utc)
    drifted = datasets.churn_day(30, n=1000, seed=9, drift={'shift': {'monthly_charges': 30}})
    log_traffic(s, drifted, ts=day + pd.to_timedelta(np.linspace(0, 86_000, len(drifted)), unit='s'), label_share=0.3)
    m = monitor_steps(str(project), since='2026-03-01', until='2026-03-01')
    assert m['verdict'] == 'retrain', m['line']
    b = last(hook, 'retrain')
    assert b['run_id'] == m['run_id'] and b['kind'] == 'monitor' and b['report'].endswith('report.html'), b
    assert any('monthly_charges' in x for x in b['reasons']), b
    with Registry.from_settings(s) as reg: first = reg.champion()['tag']
    datasets.churn(n=1500, seed=7).to_parquet(tmp_path/'fresh.parquet')
    again = retrain_steps(str(project), data=str(tmp_path/'fresh.parquet'))
    assert again['decision'] in ('promote', 'challenger'), again
    if again['decision'] == 'challenger':
        assert mlkit(project, 'promote', again['model_tag'], '--reason', 'try the new one').returncode == 0
    r = mlkit(project, 'rollback', '--reason', 'it was worse')
    assert r.returncode == 0, r.stdout + r.stderr
    b = last(hook, 'rollback')
    assert (b['champion'], b['previous'], b['reasons']) == (first, again['model_tag'], ['it was worse']), b
