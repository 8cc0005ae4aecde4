"`mlkit export`: Kubernetes manifests valid against the Kubernetes schemas in strict mode, an Airflow DAG file, clear refusals"
import ast, os, subprocess

import kubernetes_validate
import yaml

from conftest import BIN, ROOT
from mlkit.config import load_settings
from mlkit.jobs import scratch_project


def mlkit(ini, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith('MLKIT_')}
    env.update(BENTOML_DO_NOT_TRACK='True')
    return subprocess.run([str(BIN/'mlkit'), *args], cwd=ini.parent, env=env, capture_output=True, text=True, timeout=300)


def test_k8s_manifests_pass_strict_schema_validation(tmp_path):
    ini = scratch_project(ROOT/'settings.ini', tmp_path)
    r = mlkit(ini, 'export', 'k8s', 'k8s', '--image', 'registry.example/mlkit-service:abc123', '--replicas', '3')
    assert r.returncode == 0, r.stdout + r.stderr
    docs = [d for f in sorted((tmp_path/'k8s').glob('*.yaml')) for d in yaml.safe_load_all(f.read_text())]
    assert sorted(d['kind'] for d in docs) == ['CronJob', 'CronJob', 'Deployment', 'PersistentVolumeClaim', 'Service']
    version = kubernetes_validate.latest_version()
    for d in docs: kubernetes_validate.validate(d, version, strict=True)
    dep = next(d for d in docs if d['kind'] == 'Deployment')
    c = dep['spec']['template']['spec']['containers'][0]
    assert dep['spec']['replicas'] == 3 and c['image'] == 'registry.example/mlkit-service:abc123'
    assert c['resources']['requests'] and c['resources']['limits']
    tokens = [e for e in c['env'] if e['name'].endswith('TOKEN')]
    assert len(tokens) == 2 and all('value' not in e and e['valueFrom']['secretKeyRef'] for e in tokens), tokens  # by reference only
    crons = {d['metadata']['name']: d['spec'] for d in docs if d['kind'] == 'CronJob'}
    s = load_settings(ini, env={})
    assert {n.rsplit('-', 1)[1]: (c['schedule'], c['concurrencyPolicy']) for n, c in crons.items()} == \
        {'retrain': (s.schedule.retrain, 'Forbid'), 'monitor': (s.schedule.monitor, 'Forbid')}


def test_k8s_without_a_bento_or_image_says_what_to_do(tmp_path):
    ini = scratch_project(ROOT/'settings.ini', tmp_path)
    r = mlkit(ini, 'export', 'k8s', 'out')
    assert r.returncode == 1 and 'run `mlkit build` first, or pass --image' in r.stderr and 'Traceback' not in r.stderr, r.stderr
    assert not (tmp_path/'out'/'service.yaml').exists()


def test_airflow_dag_file(tmp_path):
    ini = scratch_project(ROOT/'settings.ini', tmp_path)
    r = mlkit(ini, 'export', 'airflow', 'dags', '--kernel', 'mlkit')
    assert r.returncode == 0, r.stdout + r.stderr
    (dag,) = (tmp_path/'dags').glob('*.py')
    text = dag.read_text()
    ast.parse(text)
    assert "KERNEL = 'mlkit'" in text and repr(str(ini)) in text and text.count('    JobNotebook(\n') == 2, text
