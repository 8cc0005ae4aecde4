"The retraining job end to end: papermill runs, run records, poisoning defences, the gate, the rate limit, preflight, a changed target"
import json, os, subprocess, sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import BIN, ROOT
from mlkit import datasets
from mlkit.config import load_settings
from mlkit.jobs import scratch_project
from mlkit.registry import Registry
from mlkit.retrain import run_steps
from mlkit.store import load_pipeline

NO_LIMIT = {'MLKIT_SCHEDULE_MIN_RETRAIN_INTERVAL_HOURS': '0', 'MLKIT_SCHEDULE_MAX_RETRAINS_PER_DAY': '1000'}


def mlkit(*args, ini, env=None, timeout=600):
    e = {k: v for k, v in os.environ.items() if not k.startswith('MLKIT_') and k != 'IN_TEST'}
    e.update({'MLKIT_SETTINGS': str(ini), **(env or {})})
    return subprocess.run([str(BIN/'mlkit'), *args], env=e, capture_output=True, text=True, timeout=timeout, cwd=Path(ini).parent)


@pytest.fixture
def ini(tmp_path):
    return scratch_project(ROOT/'settings.ini', tmp_path)


@pytest.fixture
def no_limit(monkeypatch):
    for k, v in NO_LIMIT.items(): monkeypatch.setenv(k, v)


def test_cli_retrain_twice_same_metrics_and_lineage(ini):
    r1 = mlkit('retrain', ini=ini)
    assert r1.returncode == 0, r1.stderr
    assert 'promote' in r1.stdout and 'champion: ' in r1.stdout
    s = load_settings(ini, env={})
    reg = Registry.from_settings(s)
    (run1,) = reg.list_runs()
    summary1 = json.loads((s.state_dir/'runs'/run1['id']/'summary.json').read_text())
    assert (s.state_dir/'runs'/run1['id']/'retrain.ipynb').is_file()
    assert (s.state_dir/'runs'/run1['id']/'metrics.json').is_file()
    assert summary1['status'] == 'succeeded' and summary1['decision'] == 'promote'

    refused = mlkit('retrain', '--trigger', 'schedule', ini=ini)  # an automatic retrain inside the rate limit
    assert refused.returncode == 3
    assert 'refused by the rate limit' in refused.stderr and 'next allowed at' in refused.stderr
    assert 'manual ones are counted, never refused' in refused.stderr

    r2 = mlkit('retrain', '--trigger', 'schedule', '--force', ini=ini)
    assert r2.returncode == 0, r2.stderr
    run2 = reg.list_runs(limit=1)[0]
    summary2 = json.loads((s.state_dir/'runs'/run2['id']/'summary.json').read_text())
    assert summary2['metrics']['holdout'] == summary1['metrics']['holdout']
    assert summary2['metrics']['test'] == summary1['metrics']['test']
    assert summary2['forced'] is True
    actions = [a['action'] for a in reg.audit_log(20)]
    assert 'retrain.forced' in actions and 'retrain.refused' in actions

    models = mlkit('models', ini=ini)
    assert models.returncode == 0
    assert summary1['model_tag'] in models.stdout and summary2['model_tag'] in models.stdout
    m2 = reg.get_model(summary2['model_tag'])
    assert m2['stage'] == 'champion' and m2['parent_tag'] == summary1['model_tag']
    assert reg.get_model(summary1['model_tag'])['stage'] == 'archived'
    runs = mlkit('runs', ini=ini)
    assert run1['id'] in runs.stdout and 'refused' in runs.stdout

    rb = mlkit('rollback', '--reason', 'test rollback', ini=ini)
    assert rb.returncode == 0, rb.stderr
    assert reg.champion()['tag'] == summary1['model_tag']
    pr = mlkit('promote', summary2['model_tag'], '--reason', 'back again', ini=ini)
    assert pr.returncode == 0, pr.stderr
    assert reg.champion()['tag'] == summary2['model_tag']
    assert {'rollback', 'promote'} <= {a['action'] for a in reg.audit_log(50)}


def test_failed_run_keeps_its_record(ini):
    r = mlkit('retrain', '--data', 'nowhere.csv', ini=ini)
    assert r.returncode == 1
    assert 'nowhere.csv: data file not found' in r.stderr
    s = load_settings(ini, env={})
    run = Registry.from_settings(s).list_runs(limit=1)[0]
    assert run['status'] == 'failed' and 'data file not found' in run['reason']
    nb = json.loads((s.state_dir/'runs'/run['id']/'retrain.ipynb').read_text())
    errors = [o for c in nb['cells'] for o in c.get('outputs', []) if o.get('output_type') == 'error']
    assert errors and errors[0]['ename'] == 'DataError'
    assert json.loads((s.state_dir/'runs'/run['id']/'summary.json').read_text())['status'] == 'failed'


def test_timeout_stops_the_run(ini):
    r = mlkit('retrain', ini=ini, env={'MLKIT_TRAIN_TIMEOUT_S': '3'})
    assert r.returncode == 1
    assert 'timed out after 3 s' in r.stderr
    s = load_settings(ini, env={})
    assert (s.state_dir/'runs').is_dir()
    run = Registry.from_settings(s).list_runs(limit=1)[0]
    assert run['status'] == 'failed' and 'timed out' in run['reason']


def test_plain_papermill_runs_the_job(ini, tmp_path):
    out = tmp_path/'out.ipynb'
    e = {k: v for k, v in os.environ.items() if not k.startswith('MLKIT_') and k != 'IN_TEST'}
    r = subprocess.run([str(BIN/'papermill'), str(ROOT/'nbs/jobs/retrain.ipynb'), str(out), '-p', 'settings_path', str(ini),
                        '-p', 'run_id', 'plain-papermill', '--no-progress-bar'], env=e, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    s = load_settings(ini, env={})
    assert Registry.from_settings(s).get_run('plain-papermill')['status'] == 'succeeded'
    assert json.loads((s.state_dir/'runs'/'plain-papermill'/'summary.json').read_text())['decision'] == 'promote'


def _poison_case(tmp_path, kind, rate):
    "Champion from churn(seed=0); then a poisoned fresh batch"
    ini = scratch_project(ROOT/'settings.ini', tmp_path/kind)
    run_steps(str(ini))
    bad = datasets.poison(datasets.churn(seed=11, start='2026-02-01'), kind, rate=rate, seed=3)
    path = tmp_path/kind/'batch.parquet'
    bad.to_parquet(path)
    return ini, path


@pytest.mark.parametrize('kind,rate,check', [('flip_labels', 0.2, 'label_noise'), ('out_of_range', 0.05, 'out_of_contract'),
                                             ('duplicates', 0.3, 'duplicates')])
def test_poisoned_batches_are_rejected(tmp_path, no_limit, kind, rate, check):
    ini, path = _poison_case(tmp_path, kind, rate)
    s = run_steps(str(ini), data=str(path))
    assert s['decision'] == 'reject', s['reasons']
    failed = [c['name'] for c in s['checks'] if not c['passed']]
    assert check in failed, s['checks']
    assert any(r.startswith(f'check {check} failed') for r in s['reasons'])
    assert Registry.from_settings(load_settings(ini)).champion()['tag'] == s['champion_before']


@pytest.mark.parametrize('kind,message', [('drop_column', "missing required column 'monthly_charges'"),
                                          ('change_dtype', "column 'tenure_months': expected numeric values")])
def test_broken_schema_stops_the_job(tmp_path, no_limit, kind, message):
    from mlkit.data import DataError
    ini, path = _poison_case(tmp_path, kind, 0.2)
    champion = Registry.from_settings(load_settings(ini)).champion()['tag']
    with pytest.raises(DataError, match=message.replace('(', r'\(').replace(')', r'\)')): run_steps(str(ini), data=str(path))
    assert Registry.from_settings(load_settings(ini)).champion()['tag'] == champion


def test_clean_retrains_are_promoted(tmp_path, no_limit):
    ini = scratch_project(ROOT/'settings.ini', tmp_path)
    run_steps(str(ini))
    decisions = []
    for seed in range(1, 11):
        path = tmp_path/f'fresh{seed}.parquet'
        datasets.churn(seed=100 + seed, start='2026-02-01').to_parquet(path)
        decisions.append(run_steps(str(ini), data=str(path)))
    promoted = [d['decision'] == 'promote' for d in decisions]
    assert sum(promoted) >= 9, [(d['decision'], d['reasons']) for d in decisions]


def test_tampered_model_is_refused(tmp_path, no_limit):
    from mlkit.store import ModelIntegrityError, model_info
    ini = scratch_project(ROOT/'settings.ini', tmp_path)
    tag = run_steps(str(ini))['model_tag']
    s = load_settings(ini)
    path = Path(model_info(tag, s)['path'])/'model.skops'
    data = bytearray(path.read_bytes())
    data[len(data)//2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match='sha256 mismatch'): load_pipeline(tag, s)
    r = mlkit('retrain', '--force', ini=ini)
    assert r.returncode == 1 and 'sha256 mismatch' in r.stderr
    assert Registry.from_settings(s).champion()['tag'] == tag


@pytest.mark.parametrize('env,metric', [
    ({'MLKIT_DATA_SOURCE': 'builtin:housing', 'MLKIT_DATA_TARGET': 'price', 'MLKIT_DATA_TASK': 'regression',
      'MLKIT_DATA_ID_COLUMN': '', 'MLKIT_DATA_TIMESTAMP_COLUMN': '', 'MLKIT_GATE_PRIMARY_METRIC': 'rmse',
      'MLKIT_GATE_SLICES': 'neighborhood'}, 'rmse'),
    ({'MLKIT_DATA_TARGET': 'contract', 'MLKIT_GATE_PRIMARY_METRIC': 'f1'}, 'f1'),
])
def test_regression_and_multiclass(tmp_path, monkeypatch, env, metric):
    for k, v in env.items(): monkeypatch.setenv(k, v)
    ini = scratch_project(ROOT/'settings.ini', tmp_path)
    s = run_steps(str(ini))
    assert s['decision'] == 'promote', s['reasons']
    assert metric in s['metrics']['holdout'] and metric in s['metrics']['baseline']
    if metric == 'rmse':
        assert s['metrics']['holdout']['r2'] > 0.5
        assert s['metrics']['slices']['neighborhood']
    else:
        pipe, _ = load_pipeline(s['model_tag'], load_settings(ini))
        assert len(pipe.classes_) == 3


def test_rerunning_a_run_id(ini, no_limit):
    from mlkit.data import DataError
    from mlkit.registry import RegistryError
    with pytest.raises(DataError): run_steps(str(ini), data='missing.csv', run_id='nightly-1')
    reg = Registry.from_settings(load_settings(ini))
    assert reg.get_run('nightly-1')['status'] == 'failed' and 'data file not found' in reg.get_run('nightly-1')['reason']
    s = run_steps(str(ini), run_id='nightly-1')  # a rerun of an unfinished id is safe
    assert s['status'] == 'succeeded' and reg.get_run('nightly-1')['status'] == 'succeeded'
    with pytest.raises(RegistryError, match="run 'nightly-1' already succeeded"): run_steps(str(ini), run_id='nightly-1')
    assert reg.champion()['tag'] == s['model_tag']


def _iris_csv(path):
    "Iris with a text target, as a CSV"
    from sklearn.datasets import load_iris
    b = load_iris(as_frame=True)
    df = b.frame.rename(columns=lambda c: c.replace(' (cm)', '').replace(' ', '_'))
    df['species'] = b.target_names[df.pop('target')]
    df.to_csv(path, index=False)
    return path


def _diabetes_csv(path):
    "The diabetes table (a continuous target), as a CSV"
    from sklearn.datasets import load_diabetes
    load_diabetes(as_frame=True).frame.to_csv(path, index=False)
    return path


def test_wrong_settings_list_every_mismatch_and_the_corrected_retry_is_not_refused(tmp_path, monkeypatch):
    from mlkit.errors import PreflightError, RetrainRefused
    ini = scratch_project(ROOT/'settings.ini', tmp_path)
    # settings written for the churn data, pointed at the diabetes table; one retrain a day, scheduled
    wrong = {'MLKIT_DATA_SOURCE': str(_diabetes_csv(tmp_path/'diabetes.csv')), 'MLKIT_DATA_TARGET': 'target',
             'MLKIT_SCHEDULE_MAX_RETRAINS_PER_DAY': '1', 'MLKIT_SCHEDULE_MIN_RETRAIN_INTERVAL_HOURS': '6'}
    r = mlkit('retrain', '--trigger', 'schedule', ini=ini, env=wrong)
    assert r.returncode == 1
    first = r.stderr.split('PreflightError: ', 1)[1].splitlines()[0]  # the one line a failed run records names them all
    assert first.startswith('5 settings do not fit the data'), r.stderr
    for setting in ('[data] task', '[gate] primary_metric', '[data] id_column', '[data] timestamp_column', '[gate] slices'): assert setting in first, first
    for k, v in wrong.items(): monkeypatch.setenv(k, v)
    with pytest.raises(PreflightError) as e: run_steps(str(ini), trigger='schedule')
    fixes = [str(m) for m in e.value.mismatches]
    assert len(fixes) == 5 and 'set [data] task = regression' in fixes[0] and 'rmse, mae, r2' in fixes[1], fixes
    reg = Registry.from_settings(load_settings(ini))
    failed = reg.list_runs(2)
    assert [(x['status'], x['data_fingerprint']) for x in failed] == [('failed', None)] * 2, failed
    assert reg.list_models() == [] and not (load_settings(ini).state_dir/'golden').exists()  # nothing trained, no holdout frozen

    fixed = {'MLKIT_DATA_TASK': 'regression', 'MLKIT_GATE_PRIMARY_METRIC': 'rmse', 'MLKIT_GATE_SLICES': '',
             'MLKIT_DATA_ID_COLUMN': '', 'MLKIT_DATA_TIMESTAMP_COLUMN': ''}
    for k, v in fixed.items(): monkeypatch.setenv(k, v)
    s = run_steps(str(ini), trigger='schedule')  # the failed attempts did not use up the one retrain a day
    assert s['status'] == 'succeeded' and s['rate_limit']['counted'] == 0, s.get('rate_limit')
    assert reg.get_run(s['run_id'])['data_fingerprint'] == s['data']['content_sha256']
    with pytest.raises(RetrainRefused, match='1 retrains in the last 24 h'): run_steps(str(ini), trigger='schedule')  # a run that trained counts
    manual = run_steps(str(ini))  # a person is shown the count, not refused
    assert manual['status'] == 'succeeded' and manual['rate_limit']['reached'] and not manual['rate_limit']['applies']


def test_a_changed_target_is_refused_naming_both(tmp_path, monkeypatch):
    from mlkit.errors import RetrainRefused
    ini = scratch_project(ROOT/'settings.ini', tmp_path)
    env = {'MLKIT_DATA_SOURCE': str(_iris_csv(tmp_path/'iris.csv')), 'MLKIT_DATA_TARGET': 'species', 'MLKIT_GATE_PRIMARY_METRIC': 'f1',
           'MLKIT_GATE_SLICES': '', 'MLKIT_DATA_ID_COLUMN': '', 'MLKIT_DATA_TIMESTAMP_COLUMN': ''}
    for k, v in env.items(): monkeypatch.setenv(k, v)
    first = run_steps(str(ini))
    assert first['decision'] == 'promote', first['reasons']
    monkeypatch.setenv('MLKIT_DATA_TARGET', 'petal_length'); monkeypatch.setenv('MLKIT_DATA_TASK', 'regression')
    monkeypatch.setenv('MLKIT_GATE_PRIMARY_METRIC', 'rmse')
    with pytest.raises(RetrainRefused) as e: run_steps(str(ini))
    msg = str(e.value)
    assert "predicts 'species' (classification), but the settings ask for 'petal_length' (regression)" in msg, msg
    assert 'set [project] name to a new name' in msg and first['model_tag'] in msg, msg
    reg = Registry.from_settings(load_settings(ini))
    run = reg.list_runs(1)[0]
    assert run['status'] == 'refused' and 'target change' in run['reason']
    assert reg.champion()['tag'] == first['model_tag'] and len(reg.list_models()) == 1
    monkeypatch.setenv('MLKIT_PROJECT_NAME', 'iris-petals')  # a new model name takes the new target
    second = run_steps(str(ini))
    assert second['status'] == 'succeeded' and second['model_tag'].startswith('iris-petals:') and second['task'] == 'regression'
    assert reg.champion('iris-petals')['tag'] == second['model_tag']
    assert reg.champion(load_settings(ini, env={}).project.name.replace('_', '-'))['tag'] == first['model_tag']
