"`mlkit new` on data mlkit never saw: the new project's model notebook is its model, and the project's own tests pass"
import json, os, re, subprocess, sys

import pytest

from conftest import BIN
import numpy as np
import pandas as pd

from anydata import CASES, _stamp
from mlkit.config import load_settings
from mlkit.registry import Registry
from mlkit.store import load_pipeline


def run(argv, cwd, env=None, timeout=1200):
    e = {k: v for k, v in os.environ.items() if not k.startswith('MLKIT_')}
    e.update(BENTOML_DO_NOT_TRACK='True', **(env or {}))
    return subprocess.run([str(a) for a in argv], cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)


def quadrants(n=900, seed=0):
    """Two classes by whether two measurements have the same sign (XOR), which no linear model separates; names with spaces, a categorical with
    missing values, a boolean with missing values, a categorical of 400 values, times"""
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=n), rng.normal(size=n)
    df = pd.DataFrame({'x pos': x, 'y pos': y, 'shop': rng.choice(['a', 'b', 'c'], n), 'member': rng.random(n) < 0.4,
                       'zone': np.where(x * y > 0, 'same sign', 'mixed')})
    df.loc[rng.random(n) < 0.03, 'shop'] = None
    df['member'] = df['member'].astype(object).where(rng.random(n) >= 0.05, None)  # a boolean with missing values
    df['store id'] = [f"store-{k}" for k in rng.integers(0, 400, n)]  # a high-cardinality categorical
    return _stamp(df, seed)


def new(tmp_path, name):
    "`mlkit new` on the data set `name` written as CSV; returns the project folder and what mlkit printed"
    make, target, task = (quadrants, 'zone', 'classification') if name == 'quadrants' else CASES[name][:3]
    csv = tmp_path/f'{name}.csv'
    make().to_csv(csv, index=False)
    r = run([BIN/'mlkit', 'new', tmp_path/'proj', '--data', csv, '--target', target], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"task: {task}" in r.stdout, r.stdout
    return tmp_path/'proj', r.stdout


def set_make_model(project, body):
    "Replace make_model in the project's model notebook, as a data scientist would edit it"
    nb_path = project/'nbs'/'00_model.ipynb'
    nb = json.loads(nb_path.read_text())
    cell = next(c for c in nb['cells'] if 'def make_model' in ''.join(c['source']))
    cell['source'] = body.strip().splitlines(keepends=True)
    nb_path.write_text(json.dumps(nb, indent=1) + '\n')


def test_a_new_project_with_a_model_of_its_own_trains_serves_and_monitors(tmp_path):
    project, out = new(tmp_path, 'quadrants')
    assert 'primary metric: roc_auc' in out and 'id column: row_id' in out and 'time column: event_time' in out, out
    lib = re.search(r'package (\w+)\)', out).group(1)
    set_make_model(project, '''
#| export
from sklearn.neighbors import KNeighborsClassifier

def make_model(seed:int=42):
    "A KNN behind this project's own ClipOutliers (neither is one of mlkit's built-in models)"
    return make_pipeline(ClipOutliers(), KNeighborsClassifier(15))
''')
    r = run([BIN/'nbdev-export'], cwd=project)  # the project's `make export`
    assert r.returncode == 0, r.stderr
    assert 'KNeighborsClassifier' in (project/lib/'model.py').read_text()
    r = run([BIN/'nbdev-test'], cwd=project, env={'PYTHONPATH': str(project)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = run([BIN/'python', '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-x'], cwd=project, env={'PYTHONPATH': str(project)})
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
    assert '2 passed' in r.stdout, r.stdout[-2000:]
    # in the project itself: the notebook's KNN beats the linear model on XOR data, so the champion is the project's own model,
    # stored with skops and loaded back with its ClipOutliers, which the project's settings trust
    r = run([BIN/'mlkit', 'retrain'], cwd=project)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = load_settings(project/'settings.ini', env={})
    sys.path.insert(0, str(project))  # the project's package, as its own venv would have it
    pipe, info = load_pipeline(Registry.from_settings(s).champion()['tag'], s)
    assert info['metadata']['params']['estimator'] == f'{lib}.model:make_model', info['metadata']['params']
    own = [st for _, st in pipe.steps[-1][1].steps]
    assert [type(st).__name__ for st in own] == ['ClipOutliers', 'KNeighborsClassifier']
    assert type(own[0]).__module__ == f'{lib}.model'


def test_new_refuses_bad_input_and_writes_nothing(tmp_path):
    csv = tmp_path/'one.csv'
    CASES['four_classes'][0]().assign(segment='gold').to_csv(csv, index=False)
    r = run([BIN/'mlkit', 'new', tmp_path/'p', '--data', csv, '--target', 'segment'], cwd=tmp_path)
    assert r.returncode == 1 and "target 'segment' has a single class ('gold')" in r.stderr and not (tmp_path/'p').exists(), r.stderr
    (tmp_path/'full').mkdir(); (tmp_path/'full'/'x').write_text('mine')
    r = run([BIN/'mlkit', 'new', tmp_path/'full', '--data', csv, '--target', 'segment'], cwd=tmp_path)
    assert r.returncode == 1 and 'is not empty: give a new folder, or --force' in r.stderr
    assert sorted(p.name for p in (tmp_path/'full').iterdir()) == ['x']
