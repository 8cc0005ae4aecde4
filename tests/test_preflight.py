"Preflight: the settings checked against the loaded data, every mismatch in one error, on scikit-learn's bundled tables and generated ones"
import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_breast_cancer, load_diabetes, load_iris, load_wine

from mlkit.config import load_settings
from mlkit.errors import DataError, PreflightError, SettingsError
from mlkit.preflight import mismatches, preflight

INI = """[project]
name = preflight-test
[data]
source = data.csv
target = target
task = classification
[gate]
primary_metric = roc_auc
[train]
[serve]
[monitor]
[schedule]
"""


@pytest.fixture
def settings(tmp_path):
    (tmp_path/'settings.ini').write_text(INI)
    return lambda **env: load_settings(tmp_path/'settings.ini', env={f'MLKIT_{k.upper()}': v for k, v in env.items()})


def frame(loader):
    return loader(as_frame=True).frame


def test_settings_that_fit_give_nothing(settings):
    assert mismatches(frame(load_wine), settings()) == []
    assert mismatches(frame(load_breast_cancer), settings(gate_primary_metric='log_loss')) == []
    assert mismatches(frame(load_diabetes), settings(data_task='regression', gate_primary_metric='mae')) == []
    assert preflight(frame(load_iris), settings(gate_primary_metric='f1')) == []


def test_every_mismatch_in_one_error(settings):
    df = frame(load_breast_cancer).assign(when='not a date')
    s = settings(gate_slices='plan, mean radius', data_id_column='patient', data_timestamp_column='when', gate_primary_metric='r2')
    with pytest.raises(PreflightError) as e: preflight(df, s, 'cancer.parquet')
    err = e.value
    assert isinstance(err, DataError) and isinstance(err, SettingsError)
    assert [m.setting for m in err.mismatches] == ['[gate] primary_metric', '[data] id_column', '[data] timestamp_column', '[gate] slices', '[gate] slices']
    lines = str(err).splitlines()
    assert lines[0].startswith('5 settings do not fit the data in cancer.parquet ([gate] primary_metric, [data] id_column, '
                               '[data] timestamp_column, [gate] slices); nothing was trained'), lines[0]
    assert len(lines) == 6 and all(' fix: ' in line for line in lines[1:]), lines
    assert "'r2' is a regression metric" in lines[1] and 'roc_auc, accuracy, f1, log_loss' in lines[1]
    assert "'not a date'" in lines[3] and "column 'mean radius' is continuous" in lines[5]


def test_classification_on_a_continuous_target_names_regression(settings):
    found = mismatches(frame(load_diabetes), settings(gate_primary_metric='f1', gate_slices='sex'))
    assert [m.setting for m in found] == ['[data] task', '[gate] primary_metric']
    assert found[0].fix.startswith('set [data] task = regression')
    assert 'once [data] task = regression' in found[1].problem and found[1].fix == 'set [gate] primary_metric to one of rmse, mae, r2'


def test_regression_on_text_names_classification(settings):
    b = load_wine(as_frame=True)
    df = b.frame.assign(target=b.target_names[b.frame['target']])
    m, metric = mismatches(df, settings(data_task='regression', gate_primary_metric='rmse'))
    assert m.setting == '[data] task' and m.fix.startswith('set [data] task = classification') and 'class_0' in m.problem
    assert metric.setting == '[gate] primary_metric' and 'once [data] task = classification' in metric.problem  # the metric that fix would need


def test_multiclass_metric_names_follow_the_metrics_table(settings):
    wine = frame(load_wine)
    assert mismatches(wine, settings(gate_primary_metric='roc_auc')) == []  # one-vs-rest under its own name
    (m,) = mismatches(wine, settings(gate_primary_metric='f1_macro'))
    assert "did you mean 'f1'?" in m.problem and 'macro average' in m.problem
    (m,) = mismatches(wine, settings(), extra_metrics={'report metric': 'mae'})
    assert m.setting == 'report metric' and "'mae' is a regression metric" in m.problem


def test_missing_target_and_too_few_rows(settings):
    rng = np.random.default_rng(0)
    small = pd.DataFrame({'x': rng.normal(size=20), 'label': rng.choice(['a', 'b'], 20)})
    (m,) = mismatches(small, settings())
    assert m.setting == '[data] target' and "no column 'target'" in m.problem and 'x, label' in m.fix
    found = mismatches(small, settings(data_target='label'))
    assert [m.setting for m in found] == ['[data] source'] and found[0].problem.startswith('20 labeled rows')
    rare = pd.DataFrame({'x': rng.normal(size=200), 'label': ['a'] * 100 + ['b'] * 97 + ['c'] * 3})
    (m,) = mismatches(rare, settings(data_target='label'))
    assert "'c': 3" in m.problem and 'stratified' in m.problem


def test_slices_with_too_many_levels(settings):
    rng = np.random.default_rng(1)
    df = pd.DataFrame({'x': rng.normal(size=300), 'target': rng.integers(0, 2, 300), 'shop': [f's{i % 40}' for i in range(300)],
                       'plan': rng.choice(['basic', 'pro'], 300)})
    (m,) = mismatches(df, settings(gate_slices='shop, plan'))
    assert m.problem == "column 'shop' has 40 distinct values (at most 20)" and 'bin it' in m.fix
    assert mismatches(df, settings(gate_slices='shop'), max_slice_levels=50) == []
