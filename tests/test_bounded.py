"Memory and metrics of a real `mlkit serve` stay bounded under requests nobody authorised"
import httpx
import psutil
import pytest

from anydata import write_project
from service_util import Server
from mlkit.retrain import run_steps

API = 'api-token-for-bounds'
AUTH = {'Authorization': f'Bearer {API}'}


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    "A binary project with a champion, served by `mlkit serve` with one worker and an API token"
    ini, _ = write_project(tmp_path_factory.mktemp('bounded'), 'rare_binary')
    run_steps(str(ini))
    srv = Server(ini, env={'MLKIT_API_TOKEN': API}).start()
    yield srv
    srv.stop()


def workers_rss(srv):
    "Resident memory of the server's processes but the first (the workers and BentoML's helpers), in bytes"
    return sum(p.memory_info().rss for p in psutil.Process(srv.proc.pid).children(recursive=True))


def metrics_size(c):
    r = c.get('/metrics', headers=AUTH)
    assert r.status_code == 200
    return len(r.content)


def test_unknown_paths_without_a_token_add_no_series_nor_memory(server):
    "1,000 distinct made-up paths, all refused with a 401: /metrics and the workers' memory stay where they were"
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for i in range(200): c.get(f'/warm-up/{i}')  # the server's first answers allocate what it keeps
        size0, rss0 = metrics_size(c), workers_rss(server)
        codes = {c.get(f'/no/such/path/{i}').status_code for i in range(500)}
        codes |= {c.post(f'/made-up-{i}', json={}).status_code for i in range(500)}
        size1, rss1 = metrics_size(c), workers_rss(server)
        assert codes == {401}
        assert 'made-up' not in c.get('/metrics', headers=AUTH).text and 'no/such' not in c.get('/metrics', headers=AUTH).text
        assert size1 <= size0 * 1.05, (size0, size1)
        assert rss1 <= rss0 * 1.05, (rss0, rss1)
        assert c.get('/metadata', headers=AUTH).status_code == 200


def test_wide_records_are_refused_before_any_work(server):
    "Records with thousands of made-up keys get a 413 naming the limit; the service keeps answering normal requests"
    from mlkit.config import load_settings
    from mlkit.service import ServingState
    con = ServingState.load(load_settings(server.ini, env={})).champion.contract
    from mlkit.contract import features
    rec = {f: None for f in features(con)}
    wide = [{**rec, **{f'k{j}': 0 for j in range(10_000)}} for _ in range(55)]
    with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as c:
        r = c.post('/predict', json={'records': wide})
        assert r.status_code == 413, r.text
        assert '[serve] max_record_keys' in r.json()['error'] and r.json()['errors'][0]['rule'] == 'max_record_keys'
        many = [{**rec, **{f'extra_{j}': j for j in range(len(con['columns']))}} for _ in range(1000)]
        r = c.post('/predict', json={'records': many})
        assert r.status_code == 413, r.text
        assert '[serve] max_fields' in r.json()['error']
        assert c.get('/metadata').status_code == 200
