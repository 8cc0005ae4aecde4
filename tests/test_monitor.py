"The monitoring job: verdicts on simulated logs over many seeds, delayed labels, A/B calls, the guarded retrain trigger"
import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT
from mlkit import datasets
from mlkit.config import load_settings
from mlkit.jobs import scratch_project
from mlkit.monitor import run_steps as monitor_steps
from mlkit.simulate import log_traffic
from mlkit.predlog import PredictionLog
from mlkit.registry import Registry
from mlkit.retrain import run_steps as retrain_steps

DAY0 = datetime(2026, 2, 1, tzinfo=timezone.utc)
N = 1000


def day(k):
    return DAY0 + timedelta(days=k)


def log_day(settings, k, df, **kw):
    "Log `df` as the traffic of simulated day k, spread over the day"
    ts = day(k) + pd.to_timedelta(np.linspace(0, 86_000, len(df)), unit='s')
    return log_traffic(settings, df, ts=ts, **kw)


def monitor_day(settings, k, **kw):
    d = day(k).date().isoformat()
    return monitor_steps(str(settings.file), since=d, until=d, **kw)


@pytest.fixture(scope='module')
def project(tmp_path_factory):
    "A scratch project with a champion trained on the embedded data set"
    ini = scratch_project(ROOT/'settings.ini', tmp_path_factory.mktemp('monitor'))
    retrain_steps(str(ini))
    return load_settings(ini, env={})


def kinds(summary, subject=None):
    return {f['kind'] for f in summary['findings'] if subject is None or f['subject'] == subject}


def test_no_drift_is_ok_in_at_least_9_of_10_seeds(project):
    verdicts = []
    for seed in range(10):
        log_day(project, seed, datasets.churn_day(seed, n=N, seed=100 + seed), label_share=0.3)
        verdicts.append(monitor_day(project, seed))
    oks = [s['verdict'] == 'ok' for s in verdicts]
    assert sum(oks) >= 9, [s['line'] for s in verdicts]
    assert all(s['rows'] == N for s in verdicts)
    # summary.json has every figure: one drift row per feature, the quality with its labeled share
    saved = json.loads((project.state_dir/'runs'/verdicts[0]['run_id']/'summary.json').read_text())
    assert {r['feature'] for r in saved['drift']['features']} == {'tenure_months', 'monthly_charges', 'age', 'plan', 'region',
                                                                  'contract', 'support_calls', 'autopay'}
    assert 0.25 < saved['quality']['overall']['labeled_share'] < 0.35


DRIFTS = [
    ('shifted numeric feature', {'shift': {'monthly_charges': 30}}, 'monthly_charges', {'feature_drift'}, 'retrain'),
    ('new category', {'new_category': {'region': 'central'}}, 'region', {'feature_drift'}, 'retrain'),
    ('column stuck at a default', {'stuck': {'plan': 'basic'}}, 'plan', {'skew'}, 'warn'),
    ('label shift', {'label_shift': 0.3}, 'churned', {'label_drift'}, 'retrain'),
]


@pytest.mark.parametrize('name,drift,feature,kind,level', DRIFTS, ids=[d[0] for d in DRIFTS])
def test_each_drift_is_named_with_its_feature_and_reason(project, name, drift, feature, kind, level):
    first = 20 + 5 * [d[0] for d in DRIFTS].index(name)
    for seed in range(5):
        k = first + seed
        log_day(project, k, datasets.churn_day(k, n=N, seed=200 + seed, drift=drift), label_share=0.3)
        s = monitor_day(project, k)
        assert s['verdict'] == level, s['line']
        assert kind <= kinds(s, feature), (s['findings'], s['notes'])
        assert feature in s['line'], s['line']
        if name == 'new category': assert 'central' in s['line'], s['line']
        if kind == {'skew'}:  # a broken upstream column is not a reason to retrain
            assert not any(f['level'] == 'retrain' for f in s['findings']), s['findings']


def test_delayed_labels_narrow_the_interval_as_they_arrive(project):
    k = 40
    df = datasets.churn_day(k, n=3000, seed=7)
    ids = log_day(project, k, df, label_share=0.0)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(df))
    widths, shares = [], []
    with PredictionLog.from_settings(project) as plog:
        for lo, hi in ((0, 300), (300, 900), (900, 1800)):  # 10%, then 30%, then 60% labeled
            plog.feedback([dict(request_id=ids[i], label=int(df.churned.iloc[i])) for i in order[lo:hi]])
            q = monitor_day(project, k)['quality']['overall']
            widths.append(q['high'] - q['low'])
            shares.append(q['labeled_share'])
    assert shares == pytest.approx([0.1, 0.3, 0.6], abs=0.01)
    assert widths[0] > widths[1] > widths[2], widths


def test_ab_calls_a_better_challenger_and_not_an_equal_one(project, monkeypatch):
    # a weak model (one boosting round of a stump) answers as the champion, the real champion as the challenger
    weak = retrain_steps(str(project.file), hyperparameters={'max_iter': 1, 'max_depth': 1}, force=True)['model_tag']
    strong = Registry.from_settings(project).champion()['tag']
    called = []
    for seed in range(3):
        k = 50 + 2 * seed
        df = datasets.churn_day(k, n=4000, seed=300 + seed)
        half = np.random.default_rng(seed).random(len(df)) < 0.5
        log_day(project, k, df[half], variant='champion', tag=weak, label_share=0.5, seed=seed)
        log_day(project, k, df[~half], variant='challenger', tag=strong, label_share=0.5, seed=seed)
        better = monitor_day(project, k)
        assert better['ab']['recommendation'] == 'promote_challenger', better['ab']
        assert 'ab' in kinds(better, strong) and f"mlkit promote {strong}" in better['line']
        df = datasets.churn_day(k + 1, n=4000, seed=400 + seed)  # the same model on both arms
        log_day(project, k + 1, df[half], variant='champion', tag=strong, label_share=0.5, seed=seed)
        log_day(project, k + 1, df[~half], variant='challenger', tag=strong, label_share=0.5, seed=seed)
        called.append(monitor_day(project, k + 1)['ab']['recommendation'])
    assert 'promote_challenger' not in called, called


def test_a_window_without_traffic_warns(project):
    s = monitor_day(project, 99)
    assert s['rows'] == 0 and s['verdict'] == 'warn' and 'too few to judge drift' in s['line']


def test_drift_triggers_one_guarded_retrain_and_a_second_is_refused(tmp_path):
    ini = scratch_project(ROOT/'settings.ini', tmp_path)
    text = ini.read_text().replace('auto_retrain = false', 'auto_retrain = true')
    text = text.replace('min_retrain_interval_hours = 6', 'min_retrain_interval_hours = 0').replace('max_retrains_per_day = 4', 'max_retrains_per_day = 2')
    ini.write_text(text)
    retrain_steps(str(ini))  # the champion: retrain 1 of the 2 allowed today
    s = load_settings(ini, env={})
    reg = Registry.from_settings(s)
    champion = reg.champion()['tag']
    log_day(s, 0, datasets.churn_day(0, n=N, seed=1, drift={'shift': {'monthly_charges': 30}}), label_share=0.3)
    # the new training data looks poisoned (a fifth of its labels flipped): the retraining run must not promote
    poisoned = tmp_path/'poisoned.csv'
    datasets.poison(datasets.churn(4000, seed=5), 'flip_labels', 0.2).to_csv(poisoned, index=False)

    first = monitor_day(s, 0, retrain_data=str(poisoned))
    assert first['verdict'] == 'retrain'
    assert first['retrain']['action'] == 'retrained', first['retrain']
    assert first['retrain']['decision'] == 'reject', first['retrain']
    assert 'label_noise' in first['retrain']['detail'] and f"the champion stays {champion}" in first['retrain']['detail']
    assert reg.champion()['tag'] == champion

    second = monitor_day(s, 0, retrain_data=str(poisoned))
    assert second['verdict'] == 'retrain'
    assert second['retrain']['action'] == 'refused', second['retrain']
    assert 'rate limit' in second['retrain']['detail']

    retrains = [r for r in reg.list_runs(50, kind='retrain') if r['trigger'] == 'monitor']
    assert sorted(r['status'] for r in retrains) == ['refused', 'succeeded']
    actions = [a['action'] for a in reg.audit_log(50)]
    assert actions.count('monitor.trigger') == 2 and actions.count('retrain.refused') == 1
    assert reg.champion()['tag'] == champion


from test_predlog import pg, pg_url  # noqa: E402,F401  (a real PostgreSQL server on 127.0.0.1)


def test_monitoring_reads_a_postgresql_log(tmp_path, pg_url):
    ini = scratch_project(ROOT/'settings.ini', tmp_path)
    ini.write_text(ini.read_text().replace('[serve]\n', f'[serve]\nlog_url = {pg_url}\n'))
    retrain_steps(str(ini))
    s = load_settings(ini, env={})
    log_day(s, 0, datasets.churn_day(0, n=N, seed=1), label_share=0.3)
    log_day(s, 1, datasets.churn_day(1, n=N, seed=2, drift={'new_category': {'region': 'central'}}), label_share=0.3)
    assert PredictionLog.from_settings(s).engine.dialect.name == 'postgresql'
    clean, drifted = monitor_day(s, 0), monitor_day(s, 1)
    assert clean['rows'] == drifted['rows'] == N
    assert clean['verdict'] == 'ok', clean['line']
    assert drifted['verdict'] == 'retrain' and 'region' in drifted['line'] and 'central' in drifted['line'], drifted['line']
    assert 0.25 < drifted['quality']['overall']['labeled_share'] < 0.35
