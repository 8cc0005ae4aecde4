"One door into the champion seat: models trained elsewhere go through `mlkit register` and the gate, on data other than churn"
import hashlib, json, os, subprocess, textwrap

import numpy as np
import pytest
import skops.io
from sklearn.compose import make_column_transformer
from sklearn.dummy import DummyClassifier
from sklearn.impute import SimpleImputer
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from conftest import BIN
from anydata import four_classes, write_project
from mlkit.config import load_settings
from mlkit.registry import Registry
from mlkit.store import load_pipeline, save_pipeline

NUM, CAT = ['spend', 'visits'], ['region', 'plan']


def mlkit(*args, cwd, env=None):
    e = {k: v for k, v in os.environ.items() if not k.startswith('MLKIT_')}
    e.update(BENTOML_DO_NOT_TRACK='True', **(env or {}))
    return subprocess.run([str(BIN/'mlkit'), *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=600)


def knn(extra=()):
    "A pipeline a data scientist trained elsewhere: imputation, scaling, one-hot, then KNN (not one of mlkit's built-in models)"
    pre = make_column_transformer((make_pipeline(SimpleImputer(strategy='median'), StandardScaler()), NUM),
                                  (make_pipeline(SimpleImputer(strategy='most_frequent'), OneHotEncoder(handle_unknown='ignore')), CAT))
    return make_pipeline(*extra, pre, KNeighborsClassifier(15))


@pytest.fixture(scope='module')
def project(tmp_path_factory):
    d = tmp_path_factory.mktemp('register')
    ini, df = write_project(d, 'four_classes')
    r = mlkit('retrain', cwd=d)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return dict(dir=d, ini=ini, df=df, elsewhere=four_classes(n=1500, seed=3))


def champion(project):
    return Registry.from_settings(load_settings(project['ini'], env={})).champion()['tag']


def test_a_model_trained_elsewhere_goes_through_the_gate_with_its_lineage(project):
    d, other = project['dir'], project['elsewhere']
    pipe = knn().fit(other, other['segment'])
    skops.io.dump(pipe, d/'knn.skops')
    before = champion(project)
    r = mlkit('register', 'knn.skops', '--reason', 'tuned in a notebook', cwd=d)
    assert r.returncode in (0, 4, 5), r.stdout[-2000:] + r.stderr[-3000:]
    reg = Registry.from_settings(load_settings(project['ini'], env={}))
    run = reg.list_runs(limit=1)[0]
    assert (run['kind'], run['status']) == ('register', 'succeeded'), run
    summary = json.loads((d/'.mlkit'/'runs'/run['id']/'summary.json').read_text())
    assert summary['model']['sha256'] == hashlib.sha256((d/'knn.skops').read_bytes()).hexdigest()
    assert summary['model']['estimator'] == 'KNeighborsClassifier'
    assert {c['name'] for c in summary['checks']} >= {'label_shift', 'label_noise', 'out_of_contract'}  # the poisoning checks ran
    assert 'baseline' in summary['metrics'] and 'champion' in summary['metrics'] and summary['metrics']['comparison']['n'] > 0
    tag = summary['model_tag']
    if summary['decision'] == 'promote': assert champion(project) == tag
    else: assert champion(project) == before
    stored, info = load_pipeline(tag, load_settings(project['ini'], env={}))
    assert info['metadata']['parent'] == before and info['metadata']['params']['trained_elsewhere']
    X = project['df'].drop(columns=['segment']).head(100)
    assert (stored.predict(X) == pipe.predict(X)).all()  # the registered model answers as the file's pipeline does


def test_a_worse_model_is_rejected_and_the_champion_stays(project):
    d, other = project['dir'], project['elsewhere']
    skops.io.dump(DummyClassifier(strategy='most_frequent').fit(other[NUM], other['segment']), d/'dummy.skops')
    before = champion(project)
    r = mlkit('register', 'dummy.skops', cwd=d)
    assert r.returncode == 5, r.stdout[-2000:] + r.stderr[-3000:]
    assert 'reject' in r.stdout and champion(project) == before


@pytest.mark.parametrize('name, content, message', [
    ('model.pkl', b'\x80\x04.', "mlkit does not load pickle or joblib files"),
    ('broken.skops', b'PK\x03\x04 not really', "broken.skops is not a readable skops file"),
    ('missing.skops', None, "missing.skops: no such file"),
])
def test_a_file_mlkit_will_not_open_is_refused_before_any_run(project, name, content, message):
    d = project['dir']
    if content is not None: (d/name).write_bytes(content)
    runs = len(Registry.from_settings(load_settings(project['ini'], env={})).list_runs(limit=1000))
    r = mlkit('register', name, cwd=d)
    assert r.returncode == 1 and message in r.stderr, r.stderr[-2000:]
    assert 'Traceback' not in r.stderr
    assert len(Registry.from_settings(load_settings(project['ini'], env={})).list_runs(limit=1000)) == runs


def test_the_project_trusts_its_own_transformer_only_when_it_says_so(project, tmp_path):
    d, other = project['dir'], project['elsewhere']
    pkg = tmp_path/'lib'/'acme_steps'
    pkg.mkdir(parents=True)
    (pkg/'__init__.py').write_text(textwrap.dedent('''
        from sklearn.base import BaseEstimator, TransformerMixin
        class SpendCap(TransformerMixin, BaseEstimator):
            "Cap spend at a quantile learned in fit"
            def __init__(self, q=0.99): self.q = q
            def fit(self, X, y=None): self.cap_ = float(X['spend'].quantile(self.q)); return self
            def transform(self, X): return X.assign(spend=X['spend'].clip(upper=self.cap_))
    '''))
    env = {'PYTHONPATH': str(tmp_path/'lib')}
    script = ("import sys, skops.io; sys.path.insert(0, 'tests'); import acme_steps, test_register as t, anydata; "
              f"df = anydata.four_classes(n=1500, seed=3); skops.io.dump(t.knn([acme_steps.SpendCap()]).fit(df, df['segment']), r'{d/'own.skops'}')")
    subprocess.run([str(BIN/'python'), '-c', script], check=True, env={**os.environ, **env}, cwd=os.path.dirname(os.path.dirname(__file__)))
    r = mlkit('register', 'own.skops', cwd=d, env=env)
    assert r.returncode == 1 and 'holds types neither mlkit nor the project trusts: acme_steps.SpendCap' in r.stderr, r.stderr[-2000:]
    ini = d/'trusting.ini'
    ini.write_text(project['ini'].read_text().replace('[project]\n', '[project]\ntrusted_modules = acme_steps\n', 1))
    r = mlkit('--settings', str(ini), 'register', 'own.skops', cwd=d, env=env)
    assert r.returncode in (0, 4, 5), r.stdout[-2000:] + r.stderr[-3000:]


def test_a_model_saved_by_hand_cannot_be_promoted(project):
    s = load_settings(project['ini'], env={})
    other = project['elsewhere']
    saved = save_pipeline(knn().fit(other, other['segment']), s, metadata={'note': 'by hand'})
    reg = Registry.from_settings(s)
    reg.register_model(saved['tag'], None, {'accuracy': 0.99}, 'fp', saved['sha256'], entry_sha256=saved['entry_sha256'])
    before = champion(project)
    r = mlkit('promote', saved['tag'], '--reason', 'trust me', cwd=project['dir'])
    assert r.returncode == 1 and 'it never passed the gate' in r.stderr, r.stderr
    assert champion(project) == before
