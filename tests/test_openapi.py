"The OpenAPI document at /docs.json of a real `mlkit serve`: schemathesis finds no 5xx and no answer the document does not describe"
import json, subprocess, sys, textwrap, time
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import pytest

from anydata import write_project
from conftest import BIN, ROOT
from service_util import BASE_ENV, Server
from mlkit.config import load_settings
from mlkit.retrain import run_steps
from mlkit.store import model_info, store_home

API, ADMIN = 'api-token-for-openapi', 'admin-token-for-openapi'
# what the answers must be: no 5xx, and each status, media type, header and body as the document has it; a method a
# path does not take answered 405 with `Allow`; a declared token enforced. Not checked: that every body the document
# allows is accepted (a request_id used before is refused, 409) nor that every body it does not is refused (a value
# outside the contract's range, an unknown category are answered with a warning)
CHECKS = ['not_a_server_error', 'status_code_conformance', 'content_type_conformance', 'response_headers_conformance',
          'response_schema_conformance', 'unsupported_method', 'allow_header_conformance', 'missing_required_header', 'ignored_auth']
EXAMPLES = 25  # per operation and phase: about 20 s per run on 2 cores


@pytest.fixture(scope='module')
def project(tmp_path_factory):
    "A multiclass project (categorical columns with missing values) with a champion"
    ini, _ = write_project(tmp_path_factory.mktemp('openapi'), 'four_classes')
    run_steps(str(ini))
    return ini


@pytest.fixture(scope='module', params=['no tokens', 'tokens'])
def server(request, project):
    "`mlkit serve` without tokens, and with the API and admin tokens set"
    env = {'MLKIT_API_TOKEN': API, 'MLKIT_ADMIN_TOKEN': ADMIN} if request.param == 'tokens' else {}
    with Server(project, env=env) as srv:
        srv.auth = {'Authorization': f'Bearer {API}'} if env else {}
        yield srv


def document(srv):
    r = httpx.get(f'{srv.url}/docs.json', headers=srv.auth, timeout=10)
    assert r.status_code == 200 and r.headers['content-type'] == 'application/json', r.text[:300]
    return r.json()


def schemathesis(srv, folder:Path, spec:dict, *args):
    "Run `st run` on `spec` against `srv`; (its JUnit test cases by operation: failure messages, its output)"
    folder.mkdir(parents=True, exist_ok=True)
    (folder/'openapi.json').write_text(json.dumps(spec))
    # the tokens by the document's security schemes: the admin token for /admin/reload, the API token elsewhere
    (folder/'schemathesis.toml').write_text(textwrap.dedent(f'''
        [auth.openapi.apiToken]
        bearer = "{API}"
        [auth.openapi.adminToken]
        bearer = "{ADMIN}"
        ''') if srv.auth else '')
    cmd = [str(BIN/'st'), '--config-file', str(folder/'schemathesis.toml'), 'run', str(folder/'openapi.json'), '--url', srv.url,
           '--checks', ','.join(CHECKS), '--phases', 'examples,coverage,fuzzing', '--max-examples', str(EXAMPLES), '--seed', '20261204',
           '--report', 'junit', '--report-dir', str(folder/'report'), '--no-color', *args]
    r = subprocess.run(cmd, cwd=folder, env=BASE_ENV, capture_output=True, text=True, timeout=600)
    (xml,) = (folder/'report').glob('junit-*.xml')
    cases = {c.get('name'): [f.get('message') or f.text or '' for f in c if f.tag in ('failure', 'error')] for c in ET.parse(xml).iter('testcase')}
    return r.returncode, cases, r.stdout[-6000:]


def test_schemathesis_finds_no_server_error_nor_undescribed_answer(server, tmp_path):
    spec = document(server)
    before = httpx.get(f'{server.url}/metadata', headers=server.auth, timeout=10).json()['loaded_at']
    t = time.monotonic()
    code, cases, out = schemathesis(server, tmp_path, spec)
    print(f"schemathesis: {len(cases)} operations in {time.monotonic() - t:.1f} s")
    ops = {f'{m.upper()} {p}' for p, item in spec['paths'].items() for m in item}
    assert set(cases) == ops, (set(cases) ^ ops, out)  # every operation tested
    assert {op: f for op, f in cases.items() if f} == {} and code == 0, out
    if server.auth:  # /admin/reload was called with the admin token, and answered as described
        assert httpx.get(f'{server.url}/metadata', headers=server.auth, timeout=10).json()['loaded_at'] != before
    assert 'Traceback' not in server.log_path.read_text()


def test_schemathesis_reports_an_answer_the_document_lacks(server, tmp_path):
    "The same run on a document without /predict's 422 and with a wrong answer schema: both found"
    spec = document(server)
    del spec['paths']['/predict']['post']['responses']['422']
    spec['components']['schemas']['Answer']['properties']['model'] = dict(type='integer')
    code, cases, out = schemathesis(server, tmp_path, spec, '--include-path', '/predict', '--max-examples', '5', '--continue-on-failure')
    assert code != 0 and list(cases) == ['POST /predict'] and cases['POST /predict'], out
    assert 'ST103 Undocumented status code' in out and 'ST108 Response violates schema' in out, out


def paths_bentoml_answers(ini):
    "The routes of the service's app as BentoML builds it (in a fresh process: the service module reads its settings at import)"
    code = textwrap.dedent(f'''
        import importlib.util, json, sys
        from starlette.routing import Mount
        spec = importlib.util.spec_from_file_location('mlkit_bento_service', {str(ROOT/'bentos'/'mlkit_service'/'service.py')!r})
        mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
        app = mod.MlkitService.to_asgi()  # as `bentoml serve` builds it; the models load at its start-up, not run here
        print(json.dumps([[r.path + '/', None] if isinstance(r, Mount) else [r.path, sorted(r.methods or [])] for r in app.routes]))
        ''')
    env = {**BASE_ENV, 'MLKIT_SETTINGS': str(ini), 'BENTOML_HOME': str(store_home(load_settings(ini, env={}))), 'BENTOML_DO_NOT_TRACK': 'True'}
    r = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_the_document_lists_every_path_the_service_answers(server, project):
    spec = document(server)
    routes = paths_bentoml_answers(project)
    assert len(routes) >= 10, routes
    for path, methods in routes:
        if methods is None:  # a folder of files
            assert any(p.startswith(path) and '{' in p for p in spec['paths']), (path, list(spec['paths']))
            continue
        assert path in spec['paths'], (path, list(spec['paths']))
        assert {m.lower() for m in methods} - {'head'} == set(spec['paths'][path]), (path, methods, spec['paths'][path])
    assert {'/metadata'} <= set(spec['paths'])  # answered by the gatekeeper itself
    for path, item in spec['paths'].items():  # and each path of the document is answered
        if '{' in path: path = path.replace('{file}', 'swagger-ui.css')
        for method in item:
            r = httpx.request(method.upper(), f'{server.url}{path}', headers={**server.auth, **({'Authorization': f'Bearer {ADMIN}'} if 'admin' in path else {})},
                              json={} if method == 'post' else None, timeout=60)
            assert str(r.status_code) in item[method]['responses'] and r.status_code != 404, (method, path, r.status_code, r.text[:200])


def test_a_wrong_method_gets_405_naming_the_right_one(server):
    for method, path, allow in [('GET', '/predict', 'POST'), ('PUT', '/feedback', 'POST'), ('GET', '/admin/reload', 'POST'),
                                ('DELETE', '/metadata', 'GET, HEAD'), ('POST', '/livez', 'GET, HEAD'), ('PATCH', '/docs.json', 'GET, HEAD'),
                                ('POST', '/static_content/swagger-ui.css', 'GET, HEAD')]:
        r = httpx.request(method, f'{server.url}{path}', timeout=10)  # no token: the method is answered first
        assert (r.status_code, r.headers.get('allow'), r.headers['content-type']) == (405, allow, 'application/json'), (method, path, r.text)
        assert f"{method} is not answered at {path}" in r.json()['error'], r.text
    if server.auth:
        assert httpx.get(f'{server.url}/no/such/path', timeout=10).status_code == 401  # a path the service does not have: the token first
        assert httpx.get(f'{server.url}/no/such/path', headers=server.auth, timeout=10).status_code == 404


def test_a_failed_reload_answers_503_with_the_reason(server, project):
    if not server.auth:  # no admin token: the endpoint is disabled, as the document says
        r = httpx.post(f'{server.url}/admin/reload', timeout=10)
        assert r.status_code == 403 and 'disabled' in r.json()['error'], r.text
        return
    s = load_settings(project, env={})
    tag = httpx.get(f'{server.url}/metadata', headers=server.auth, timeout=10).json()['champion']['tag']
    art = Path(model_info(tag, s)['artifact'])
    good = art.read_bytes()
    admin = {'Authorization': f'Bearer {ADMIN}'}
    art.write_bytes(good[:-10] + b'0123456789')
    try: r = httpx.post(f'{server.url}/admin/reload', headers=admin, timeout=60)
    finally: art.write_bytes(good)
    assert r.status_code == 503 and r.headers['content-type'] == 'application/json', r.text
    assert 'the reload failed, the models loaded before are still served' in r.json()['error'] and 'sha256 mismatch' in r.json()['error'], r.text
    rec = {'region': 'north', 'plan': 'pro', 'spend': 50.0, 'visits': 3.0}
    r = httpx.post(f'{server.url}/predict', json={'records': [rec]}, headers=server.auth, timeout=30)
    assert r.status_code == 200 and r.json()[0]['model'] == tag, r.text
    assert httpx.post(f'{server.url}/admin/reload', headers=admin, timeout=60).status_code == 200
