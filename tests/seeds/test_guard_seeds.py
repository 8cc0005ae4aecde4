"""The label-noise check and the promotion gate over 10 seeds, for binary, multiclass and regression data other than churn:
a clean retrain on fresh data from the same distribution is promoted, a batch with 20% flipped labels (shuffled targets
for regression) is refused by `label_noise`. Each seed is its own project: a champion, then both batches, through
`run_steps`, the code path of the retraining job."""
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))  # conftest and anydata of tests/

from conftest import ROOT
from anydata import four_classes
from mlkit import datasets
from mlkit.jobs import scratch_project
from mlkit.retrain import run_steps

SEEDS, ROWS, RATE = range(10), 1500, 0.2
pytestmark = pytest.mark.skipif(not os.environ.get('MLKIT_SEED_TESTS'), reason='ten seeds per task take minutes: `make test-seeds`')


def balanced_binary(n, seed):
    "Binary target `bought` (yes/no, about half each) from two numbers and a categorical column"
    rng = np.random.default_rng(seed)
    x1, x2 = rng.normal(size=(2, n))
    plan = rng.choice(['free', 'basic', 'pro'], n)
    z = 3*x1 - 2*x2 + 1.5*(plan == 'pro') - 0.5
    bought = np.where(rng.random(n) < 1/(1 + np.exp(-z)), 'yes', 'no')
    return pd.DataFrame(dict(usage=x1.round(3), tickets=x2.round(3), plan=plan, bought=bought))


# name: (make(n, seed), target, task, primary metric)
TASKS = {
    'binary': (balanced_binary, 'bought', 'classification', 'roc_auc'),
    'multiclass': (lambda n, seed: four_classes(n, seed).drop(columns=['row_id', 'event_time']), 'segment', 'classification', 'accuracy'),
    'regression': (lambda n, seed: datasets.housing(n, seed), 'price', 'regression', 'rmse'),
}


def noisy(df, target, task, seed):
    "A copy of `df` with `RATE` of its labels replaced: another class, or (regression) the targets of those rows shuffled"
    rng = np.random.default_rng(seed)
    out, pos = df.copy(), rng.choice(len(df), round(RATE * len(df)), replace=False)
    col, old = out.columns.get_loc(target), df[target].to_numpy()[pos]
    if task == 'regression': new = old[rng.permutation(len(pos))]
    else:
        classes = np.sort(df[target].unique())
        new = np.array([rng.choice(classes[classes != v]) for v in old], dtype=object)
    out.iloc[pos, col] = new
    return out


@pytest.mark.parametrize('name', list(TASKS))
def test_clean_retrains_promoted_noisy_batches_refused(tmp_path, monkeypatch, name):
    make, target, task, metric = TASKS[name]
    env = {'MLKIT_DATA_TARGET': target, 'MLKIT_DATA_TASK': task, 'MLKIT_DATA_ID_COLUMN': '', 'MLKIT_DATA_TIMESTAMP_COLUMN': '',
           'MLKIT_GATE_PRIMARY_METRIC': metric, 'MLKIT_GATE_SLICES': '',
           'MLKIT_SCHEDULE_MIN_RETRAIN_INTERVAL_HOURS': '0', 'MLKIT_SCHEDULE_MAX_RETRAINS_PER_DAY': '1000'}
    for k, v in env.items(): monkeypatch.setenv(k, v)
    promoted, refused, failures = 0, 0, []
    for seed in SEEDS:
        d = tmp_path/str(seed)
        ini = scratch_project(ROOT/'settings.ini', d)
        make(ROWS, seed).to_csv(d/'champion.csv', index=False)
        first = run_steps(str(ini), data=str(d/'champion.csv'))
        assert first['decision'] == 'promote', first['reasons']
        noisy(make(ROWS, 1000 + seed), target, task, seed).to_csv(d/'noisy.csv', index=False)
        bad = run_steps(str(ini), data=str(d/'noisy.csv'))
        failed = [c['name'] for c in bad['checks'] if not c['passed']]
        if bad['decision'] == 'reject' and 'label_noise' in failed: refused += 1
        else: failures.append(('noisy', seed, bad['decision'], bad['checks']))
        make(ROWS, 2000 + seed).to_csv(d/'clean.csv', index=False)
        good = run_steps(str(ini), data=str(d/'clean.csv'))
        if good['decision'] == 'promote': promoted += 1
        else: failures.append(('clean', seed, good['decision'], good['reasons'], good['checks']))
    print(f"{name}: promoted {promoted}/{len(SEEDS)} clean, refused {refused}/{len(SEEDS)} noisy (label_noise)")
    assert promoted >= 9 and refused >= 9, failures
