"What the prediction log keeps about people, through a real service: pseudonymized entity ids, features dropped or hashed, purge and forget from the command line"
import json, os, subprocess
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from conftest import BIN
from anydata import write_project
from service_util import Server
from mlkit.config import load_settings
from mlkit.privacy import log_key, pseudonym
from mlkit.registry import Registry
from mlkit.service import frame_to_records

LOG_FEATURES = 'amount eur:hash, sales channel:drop'


def mlkit(*args, cwd):
    env = {k: v for k, v in os.environ.items() if not k.startswith('MLKIT_')}
    env['BENTOML_DO_NOT_TRACK'] = 'True'
    return subprocess.run([str(BIN/'mlkit'), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def set_serve(ini, **keys):
    "Write `keys` into the [serve] section of `ini`"
    text = ini.read_text().replace('[serve]\n', '[serve]\n' + ''.join(f"{k} = {v}\n" for k, v in keys.items()), 1)
    ini.write_text(text)


def stored(ini, sql):
    s = load_settings(ini, env={})
    e = sa.create_engine(f"sqlite:///{s.state_dir/'predictions.db'}")
    try:
        with e.connect() as c: return c.execute(sa.text(sql)).all()
    finally: e.dispose()


@pytest.fixture(scope='module')
def project(tmp_path_factory):
    "rare_binary (names with spaces, a boolean, a categorical) retrained, then 300 rows predicted through a real service"
    d = tmp_path_factory.mktemp('privacy')
    ini, df = write_project(d, 'rare_binary')
    set_serve(ini, log_features=LOG_FEATURES)
    r = mlkit('retrain', cwd=d)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    X = df.drop(columns=['is fraud', 'event_time']).head(300)
    with Server(ini) as srv:
        r = httpx.post(f'{srv.url}/predict', json={'records': frame_to_records(X)}, timeout=60)
        assert r.status_code == 200, r.text
    return dict(ini=ini, df=df, X=X)


def test_the_log_holds_pseudonyms_not_ids_and_no_dropped_or_hashed_value(project):
    ini, X = project['ini'], project['X']
    key = log_key(load_settings(ini, env={}).state_dir)
    rows = stored(ini, "SELECT entity, features FROM predictions ORDER BY id")
    assert len(rows) == 300
    assert [e for e, _ in rows] == [pseudonym(key, i) for i in X['row_id']]
    feats = [json.loads(f) for _, f in rows]
    assert all('sales channel' not in f for f in feats)
    assert [f['amount eur'] for f in feats] == [pseudonym(key, v, 'feature:amount eur') for v in X['amount eur']]
    assert [f['account age days'] for f in feats] == X['account age days'].tolist()  # features not named are kept as sent
    files = b''.join(p.read_bytes() for p in (ini.parent/'.mlkit').glob('predictions.db*'))
    assert not [i for i in X['row_id'] if i.encode() in files]


def test_monitoring_skips_the_features_the_log_leaves_out(project):
    r = mlkit('monitor', cwd=project['ini'].parent)
    assert r.returncode in (0, 4, 5), r.stdout[-2000:] + r.stderr[-3000:]
    report = next(l for l in r.stdout.splitlines() if l.startswith('report: ')).split(': ', 1)[1]
    summary = json.loads((Path(report).parent/'summary.json').read_text())
    about = {f['subject'] for f in summary['findings']}
    assert not about & {'amount eur', 'sales channel'}, summary['findings']
    assert any('amount eur (hash)' in n and 'sales channel (drop)' in n for n in summary['notes']), summary['notes']


def test_forget_deletes_one_entity_and_audits_it_by_pseudonym(project):
    ini = project['ini']
    victim = project['X']['row_id'].iloc[7]
    key = log_key(load_settings(ini, env={}).state_dir)
    r = mlkit('logs', 'forget', victim, '--reason', 'erasure request', cwd=ini.parent)
    assert r.returncode == 0, r.stderr
    assert 'deleted 1 predictions' in r.stdout
    assert stored(ini, "SELECT count(*) FROM predictions") == [(299,)]
    assert stored(ini, f"SELECT count(*) FROM predictions WHERE entity = '{pseudonym(key, victim)}'") == [(0,)]
    audit = Registry.from_settings(load_settings(ini, env={})).audit_log(limit=1)[0]
    assert (audit['action'], audit['target'], audit['reason']) == ('logs.forget', pseudonym(key, victim), 'erasure request')
    assert victim not in json.dumps(audit, default=str)


def test_purge_deletes_what_is_older_and_refuses_a_bad_date(project):
    ini = project['ini']
    r = mlkit('logs', 'purge', '--before', 'last week', cwd=ini.parent)
    assert r.returncode != 0 and "before 'last week' is not an ISO date or time" in r.stderr
    assert stored(ini, "SELECT count(*) FROM predictions") == [(299,)]  # nothing lost to a bad command
    r = mlkit('logs', 'purge', '--before', '2000-01-01', cwd=ini.parent)
    assert r.returncode == 0 and 'deleted 0 predictions' in r.stdout, r.stdout + r.stderr
    r = mlkit('logs', 'purge', '--before', '2999-01-01', '--reason', 'retention', cwd=ini.parent)
    assert r.returncode == 0 and 'deleted 299 predictions' in r.stdout, r.stdout + r.stderr
    assert stored(ini, "SELECT count(*) FROM predictions") == [(0,)]


def test_a_misspelt_log_feature_stops_the_service_naming_it(project, tmp_path):
    ini = tmp_path/'settings.ini'
    ini.write_text(project['ini'].read_text().replace(LOG_FEATURES, 'amount:hash'))
    r = mlkit('serve', '--port', '1', cwd=tmp_path)  # stops before it binds
    assert r.returncode != 0
    assert "[serve] log_features names 'amount', not a feature of the model" in r.stderr, r.stderr[-2000:]
