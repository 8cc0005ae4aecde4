"The DAG file of `mlkit export airflow`, loaded by Airflow's own DagBag and one task run for real by `airflow tasks test`"
import json, os, subprocess, sys
from pathlib import Path

import pytest

from conftest import BIN, ROOT
from mlkit.config import load_settings
from mlkit.jobs import scratch_project
from mlkit.registry import Registry

AIRFLOW_PYTHON = os.environ.get('AIRFLOW_TEST_PYTHON', '')
pytestmark = pytest.mark.skipif(not AIRFLOW_PYTHON, reason='needs the Airflow environment of `make test-airflow`')

LOAD = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
print(json.dumps(dict(errors={k: str(v) for k, v in bag.import_errors.items()},
                      dags={d: sorted(t.task_id for t in dag.tasks) for d, dag in bag.dags.items()})))
"""


def airflow_env(tmp_path, dags):
    "Airflow's environment: its home, SQLite DB and the DAG folder in `tmp_path`, no examples; the `mlkit` kernel runs this Python"
    kernel = tmp_path/'jupyter'/'kernels'/'mlkit'
    kernel.mkdir(parents=True)
    (kernel/'kernel.json').write_text(json.dumps(dict(argv=[sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
                                                      display_name='mlkit', language='python')))
    env = {k: v for k, v in os.environ.items() if not k.startswith(('MLKIT_', 'AIRFLOW'))}
    env.update(AIRFLOW_HOME=str(tmp_path/'airflow'), AIRFLOW__CORE__DAGS_FOLDER=str(dags), AIRFLOW__CORE__LOAD_EXAMPLES='False',
               AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{tmp_path/'airflow'/'airflow.db'}", AIRFLOW__CORE__UNIT_TEST_MODE='False',
               JUPYTER_PATH=str(tmp_path/'jupyter'), BENTOML_DO_NOT_TRACK='True', PYTHONPATH=str(ROOT))
    (tmp_path/'airflow').mkdir()
    return env


def airflow(env, *args, timeout=900):
    r = subprocess.run([str(Path(AIRFLOW_PYTHON).parent/'airflow'), *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"airflow {' '.join(args)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


def test_dag_loads_in_airflow_and_its_retrain_task_runs(tmp_path):
    ini = scratch_project(ROOT/'settings.ini', tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith('MLKIT_')}
    r = subprocess.run([str(BIN/'mlkit'), 'export', 'airflow', 'dags', '--kernel', 'mlkit'], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    dags = tmp_path/'dags'
    aenv = airflow_env(tmp_path, dags)
    s = load_settings(ini, env={})
    name = next(dags.glob('*.py')).stem.removeprefix('mlkit_')

    r = subprocess.run([AIRFLOW_PYTHON, '-c', LOAD, str(dags)], env=aenv, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    bag = json.loads(r.stdout.strip().splitlines()[-1])
    assert bag['errors'] == {}, bag['errors']
    assert bag['dags'] == {f'{name}_retrain': ['retrain'], f'{name}_monitor': ['monitor']}, bag['dags']

    airflow(aenv, 'db', 'migrate')
    t = airflow(aenv, 'tasks', 'test', f'{name}_retrain', 'retrain', '2026-06-01T00:00:00+00:00')
    runs = Registry.from_settings(s).list_runs(kind='retrain')
    assert [(x['trigger'], x['status']) for x in runs] == [('schedule', 'succeeded')], (runs, t.stdout[-4000:], t.stderr[-4000:])
    assert runs[0]['id'].endswith('-retrain-airflow'), runs[0]
    out = s.state_dir/'runs'/runs[0]['id']/'retrain.ipynb'
    assert out.exists() and json.loads(out.read_text())['cells'], out
