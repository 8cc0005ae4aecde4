"Data sets other than churn, made here or from scikit-learn (nothing downloaded), with settings.ini written for each"
import re
from pathlib import Path

import numpy as np
import pandas as pd

from conftest import ROOT


def _stamp(df, seed, start='2026-11-01'):
    "Add an id and an event-time column (one row per customer, spread over 30 days)"
    rng = np.random.default_rng(seed + 1000)
    df.insert(0, 'row_id', [f'r{seed}-{i}' for i in range(len(df))])
    df['event_time'] = pd.Timestamp(start) + pd.to_timedelta(np.sort(rng.uniform(0, 30*86400, len(df))), unit='s')
    return df


def rare_binary(n=600, seed=0):
    "Binary target `is fraud` with about 6 % positives; names with spaces, a boolean and a categorical column"
    rng = np.random.default_rng(seed)
    amount = rng.lognormal(3, 1, n).round(2)
    foreign = rng.random(n) < 0.2
    channel = rng.choice(['web', 'shop', 'phone'], n, p=[0.5, 0.3, 0.2])
    age = rng.integers(0, 3000, n)
    z = -3.1 + 0.5*(np.log(amount) - 3) + 1.6*foreign + 0.8*(channel == 'phone') - 0.0003*age
    y = (rng.random(n) < 1/(1 + np.exp(-z))).astype(np.int64)
    df = pd.DataFrame({'amount eur': amount, 'is foreign': foreign, 'sales channel': channel,
                       'account age days': age, 'is fraud': y})
    return _stamp(df, seed)


def four_classes(n=600, seed=0):
    "Multiclass target `segment` (4 classes) with categorical columns and missing values"
    rng = np.random.default_rng(seed)
    region = rng.choice(['north', 'south', 'east', 'west'], n)
    plan = rng.choice(['free', 'basic', 'pro'], n, p=[0.4, 0.4, 0.2])
    spend = rng.gamma(2, 30, n).round(2)
    visits = rng.poisson(5, n).astype(float)
    score = (spend/40 + (plan == 'pro')*1.5 + (plan == 'basic')*0.7 + (region == 'east')*0.5 + visits/5
             + rng.normal(0, 0.5, n))
    segment = np.array(['bronze', 'silver', 'gold', 'platinum'])[np.digitize(score, np.quantile(score, [.3, .6, .85]))]
    df = pd.DataFrame(dict(region=region, plan=plan, spend=spend, visits=visits, segment=segment))
    for c, rate in [('region', 0.05), ('spend', 0.04), ('visits', 0.06)]:
        df[c] = df[c].where(rng.random(n) >= rate)
    return _stamp(df, seed)


def diabetes(n=None, seed=0):
    "Regression: scikit-learn's diabetes table (442 rows, shipped with scikit-learn), target `progression`"
    from sklearn.datasets import load_diabetes
    df = load_diabetes(as_frame=True, scaled=False).frame.rename(columns={'target': 'progression'})
    df['sex'] = df['sex'].map({1.0: 'f', 2.0: 'm'})
    df = df.sample(frac=1, random_state=seed).reset_index(drop=True)
    if n: df = df.head(n)
    return _stamp(df, seed)


# name: (make, target, task, primary metric, slice columns, a good label, bad labels)
CASES = {
    'rare_binary': (rare_binary, 'is fraud', 'classification', 'roc_auc', ['sales channel'],
                    1, {'unknown class': 7, 'boolean': True, 'string': 'yes'}),
    'four_classes': (four_classes, 'segment', 'classification', 'accuracy', ['plan'],
                     'gold', {'unknown class': 'diamond', 'boolean': True, 'number': 3}),
    'diabetes': (diabetes, 'progression', 'regression', 'rmse', ['sex'],
                 151.0, {'NaN': float('nan'), 'string': 'high', 'boolean': True}),
}


def write_project(folder, name, **make_kw):
    "Write the data set `name` as CSV and a settings.ini for it in `folder`; return (settings path, table)"
    make, target, task, metric, slices, *_ = CASES[name]
    folder = Path(folder); folder.mkdir(parents=True, exist_ok=True)
    df = make(**make_kw)
    df.to_csv(folder/'data.csv', index=False)
    text = (ROOT/'settings.ini').read_text()
    subs = {('project', 'name'): name.replace('_', '-'), ('project', 'state_dir'): str(folder/'.mlkit'),
            ('data', 'source'): str(folder/'data.csv'), ('data', 'target'): target, ('data', 'task'): task,
            ('data', 'id_column'): 'row_id', ('data', 'timestamp_column'): 'event_time',
            ('gate', 'primary_metric'): metric, ('gate', 'slices'): ', '.join(slices),
            ('schedule', 'min_retrain_interval_hours'): '0', ('schedule', 'max_retrains_per_day'): '50'}
    out, section = [], None
    for line in text.splitlines():
        if m := re.match(r'\s*\[(\w+)\]', line): section = m.group(1)
        elif m := re.match(r'\s*(\w+)\s*=', line):
            if (section, m.group(1)) in subs: line = f"{m.group(1)} = {subs[(section, m.group(1))]}"
        out.append(line)
    (folder/'settings.ini').write_text('\n'.join(out) + '\n')
    return folder/'settings.ini', df
