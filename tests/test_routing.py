"Traffic routing between champion and challenger: sticky, uniform buckets; the canary's ramp and rollbacks; shadow runs off the request path; thread safety"
import hashlib, json, os, re, statistics, subprocess, sys, threading, time, uuid

import numpy as np
import pytest
from hypothesis import given, settings as hsettings, strategies as st
from scipy import stats

from mlkit.config import ServeSettings
from mlkit.errors import RoutingError, SettingsError
from mlkit.routing import ENTITY_MAXLEN, Canary, Router, ShadowRunner, bucket, entity_id, routing_key

N = 10_000
SHAPES = {  # entity ids as they come: sequential integers are the hard case for a weak hash
    'int': [str(i) for i in range(N)],
    'prefixed': [f"customer-{i:06d}" for i in range(N)],
    'uuid': [str(uuid.UUID(int=int.from_bytes(hashlib.sha256(str(i).encode()).digest()[:16], 'big'))) for i in range(N)],
    'email': [f"user{i}@example.com" for i in range(N)],
}


def challengers(router, keys):
    return {k for k in keys if router.route(k) == 'challenger'}


# ---------------------------------------------------------------- buckets

def test_bucket_is_blake2b_of_salt_and_key():
    "The documented construction, recomputed independently: changing it would reshuffle every entity on upgrade"
    for salt, key in [('', 'a'), ('model:v2', 'customer-17'), ('s', 'ü-ñ')]:
        h = hashlib.blake2b(f"{salt}\x00{key}".encode(), digest_size=8).digest()
        assert bucket(key, salt) == int.from_bytes(h, 'big') / 2**64


def test_bucket_and_routing_same_in_other_processes():
    "Same buckets and same routing in fresh interpreters with different hash seeds (so no use of hash())"
    keys = SHAPES['prefixed'][:2000]
    code = ("import json,sys; from mlkit.routing import bucket, Router; keys=json.load(sys.stdin); r=Router('ab', 0.3, 'v2');"
            "print(json.dumps([[bucket(k, 'v2') for k in keys], [r.route(k) for k in keys]]))")
    here = [[bucket(k, 'v2') for k in keys], [Router('ab', 0.3, 'v2').route(k) for k in keys]]
    for seed in ('0', '12345'):
        out = subprocess.run([sys.executable, '-c', code], input=json.dumps(keys), capture_output=True, text=True, check=True,
                             env={**os.environ, 'PYTHONHASHSEED': seed})
        assert json.loads(out.stdout) == here


@pytest.mark.parametrize('shape', SHAPES)
def test_bucket_uniform(shape):
    "Buckets of 10,000 ids are uniform on [0, 1): chi-square over 20 bins and Kolmogorov-Smirnov, p > 0.001"
    b = np.array([bucket(k, 'salt') for k in SHAPES[shape]])
    assert ((0 <= b) & (b < 1)).all()
    counts = np.histogram(b, bins=20, range=(0, 1))[0]
    assert stats.chisquare(counts).pvalue > 0.001, counts
    assert stats.kstest(b, 'uniform').pvalue > 0.001


def test_routing_key_entity_or_request_id():
    assert routing_key({'customer_id': 17}, 'customer_id', 'req-9') == '17'
    assert routing_key({'customer_id': '17'}, 'customer_id', 'req-9') == '17'  # JSON number or string: same entity
    for rec in ({}, {'customer_id': None}, {'customer_id': ''}, {'customer_id': '\x00'}):
        assert routing_key(rec, 'customer_id', 'req-9') == 'req-9'
    assert routing_key({'customer_id': 17}, '', 'req-9') == 'req-9'


def test_entity_id_is_what_the_log_can_store():
    "Text without NUL, at most 200 characters (longer ids hashed, each to its own key); a NaN id is the text 'nan', as the service always had it"
    assert entity_id({'c': 'a\x00b'}, 'c') == 'ab' == routing_key({'c': 'a\x00b'}, 'c', 'r')
    assert entity_id({'c': float('nan')}, 'c') == 'nan'
    assert entity_id({'c': 'x' * ENTITY_MAXLEN}, 'c') == 'x' * ENTITY_MAXLEN
    long = [entity_id({'c': 'x' * n}, 'c') for n in (201, 202, 5000)]
    assert all(e.startswith('sha256:') and len(e) <= ENTITY_MAXLEN for e in long) and len(set(long)) == 3
    assert routing_key({'c': 'x' * 5000}, 'c', 'r') == long[2]  # routed by what is logged


@hsettings(max_examples=300, deadline=None)
@given(v=st.one_of(st.none(), st.text(max_size=300), st.integers(), st.floats()), rid=st.text(min_size=1, max_size=20))
def test_entity_id_property(v, rid):
    e = entity_id({'c': v}, 'c')
    assert e is None or (0 < len(e) <= ENTITY_MAXLEN and '\x00' not in e)
    assert routing_key({'c': v}, 'c', rid) == (e if e is not None else rid)


def test_routing_mistakes_name_the_setting():
    cases = [(lambda: Router('blue-green'), '[serve] mode must be one of'),
             (lambda: Router('ab', share=-0.1), '[serve] challenger_share must be a number between 0 and 1'),
             (lambda: canary(start=0), '[serve] challenger_share must be above 0 in canary mode'),
             (lambda: canary(max_share=0), '[serve] canary_max_share must be above 0 in canary mode'),
             (lambda: canary(step=2), '[serve] canary_step must be a number between 0 and 1'),
             (lambda: canary(max_error_rate=-1), '[serve] canary_max_error_rate must be a number between 0 and 1'),
             (lambda: canary(min_requests=0), '[serve] canary_min_requests must be a positive integer'),
             (lambda: canary(max_latency_ratio=0), '[serve] canary_max_latency_ratio must be a positive number'),
             (lambda: Router.from_settings(ServeSettings(mode='canary', challenger_share=0.0)), '[serve] challenger_share must be above 0')]
    for make, words in cases:
        with pytest.raises(RoutingError, match=re.escape(words)) as e: make()
        assert isinstance(e.value, SettingsError) and isinstance(e.value, ValueError)


# ---------------------------------------------------------------- A/B

def test_ab_sticky_for_10000_entities():
    "Each of 10,000 entities, routed 5 times in shuffled order, gets one answer; a second Router gives the same"
    keys = SHAPES['prefixed']
    r = Router('ab', share=0.3, salt='model:v2')
    first = {k: r.route(k) for k in keys}
    rng = np.random.default_rng(0)
    for _ in range(5):
        for i in rng.permutation(N):
            assert r.route(keys[i]) == first[keys[i]]
    other = Router.from_settings(ServeSettings(mode='ab', challenger_share=0.3), salt='model:v2')
    assert {k: other.route(k) for k in keys} == first
    assert 0 < sum(v == 'challenger' for v in first.values()) < N  # both variants are in use


@pytest.mark.parametrize('share', [0.05, 0.1, 0.3, 0.5])
@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('salt', ['', 'model:v2', 'model:v3'])
def test_ab_share_within_2_points(share, shape, salt):
    "The observed challenger share over 10,000 entities is within 2 percentage points of the setting"
    observed = len(challengers(Router('ab', share, salt), SHAPES[shape])) / N
    assert abs(observed - share) <= 0.02, (observed, share)


def test_new_salt_draws_an_independent_group():
    "Challenger groups under two salts overlap as independent draws would (share^2), not as the same group"
    keys = SHAPES['int']
    a, b = challengers(Router('ab', 0.3, 'model:v2'), keys), challengers(Router('ab', 0.3, 'model:v3'), keys)
    assert abs(len(a & b) / N - 0.09) < 0.015, len(a & b) / N


def test_champion_and_shadow_modes_never_route_to_challenger():
    keys = SHAPES['uuid']
    for mode in ('champion', 'shadow'):
        r = Router(mode, share=0.9)
        assert not challengers(r, keys)
        assert r.shadow() == (mode == 'shadow')
        assert r.describe()['share'] == 0.0


def test_monotone_in_share_10000_entities():
    "When the share rises, the challenger group only grows: nobody goes back to the champion"
    keys = SHAPES['email']
    groups = [challengers(Router('ab', s, 'v2'), keys) for s in (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0)]
    assert groups[0] == set() and groups[-1] == set(keys)
    for small, big in zip(groups, groups[1:]):
        assert small < big


@hsettings(max_examples=300, deadline=None)
@given(key=st.text(max_size=40), salt=st.text(max_size=20), s1=st.floats(0, 1), s2=st.floats(0, 1))
def test_monotone_in_share_property(key, salt, s1, s2):
    lo, hi = sorted((s1, s2))
    if Router('ab', lo, salt).route(key) == 'challenger': assert Router('ab', hi, salt).route(key) == 'challenger'


# ---------------------------------------------------------------- canary

def canary(**kw):
    return Canary(**{**dict(start=0.1, step=0.1, max_share=0.5, min_requests=200, max_error_rate=0.02, max_latency_ratio=1.5), **kw})


def traffic(c, n, rng, error_rate=0.0, slowdown=1.0):
    "n challenger requests and the champion requests beside them (9 per challenger request), lognormal latencies"
    for _ in range(n):
        for _ in range(9): c.observe('champion', True, float(rng.lognormal(3, 0.4)))
        c.observe('challenger', bool(rng.random() >= error_rate), float(rng.lognormal(3, 0.4)) * slowdown)


def test_canary_ramps_step_by_step_and_stops_at_max():
    c, rng = canary(), np.random.default_rng(1)
    seen = []
    for _ in range(8):
        traffic(c, 199, rng, error_rate=0.005)
        before = c.share
        traffic(c, 1, rng)
        seen.append((before, c.share, c.state))
    shares = [round(after, 6) for _, after, _ in seen]
    assert [round(b, 6) for b, _, _ in seen] == [0.1] + shares[:-1]  # the share moves only when a window completes
    assert shares == [0.2, 0.3, 0.4, 0.5, 0.5, 0.5, 0.5, 0.5]
    assert [s for _, _, s in seen] == ['ramping'] * 3 + ['at_max'] * 5
    assert c.describe()['steps'] == 4 and c.describe()['rollbacks'] == 0


@pytest.mark.parametrize('at', [0, 2])  # windows of healthy traffic before the breach
def test_canary_rolls_back_on_error_rate(at):
    c, rng = canary(), np.random.default_rng(2)
    traffic(c, 200 * at, rng)
    assert c.share == pytest.approx(0.1 + 0.1 * at)
    traffic(c, 200, rng, error_rate=0.10)
    d = c.describe()
    assert (c.share, c.state, d['rollbacks']) == (0.0, 'rolled_back', 1)
    assert 'error rate' in d['reason']
    traffic(c, 2000, rng)  # healthy again: still 0 until reset
    assert c.share == 0.0 and c.state == 'rolled_back'
    c.reset()
    assert (c.share, c.state) == (0.1, 'ramping')
    traffic(c, 200, rng)
    assert c.share == pytest.approx(0.2)


def test_canary_error_breach_acts_before_the_window_fills():
    "With a 2% limit on 200 requests, the 5th error rolls back at once (4 would still be within the limit)"
    c = canary()
    for i in range(4): c.observe('challenger', False, 10.0)
    assert c.state == 'ramping'
    c.observe('challenger', False, 10.0)
    assert (c.share, c.state) == (0.0, 'rolled_back')
    assert c.describe()['window']['challenger'] == 0


def test_canary_error_rate_at_the_limit_is_healthy():
    c = canary()
    for i in range(200): c.observe('challenger', i % 50 != 0, 10.0)  # exactly 4 errors = 2%
    assert (c.share, c.state) == (pytest.approx(0.2), 'ramping')


@pytest.mark.parametrize('slowdown,rolled_back', [(1.2, False), (2.0, True)])
def test_canary_latency_breach(slowdown, rolled_back):
    "Challenger p99 over 1.5 x the champion's p99 in the same window rolls back; 1.2 x does not"
    c, rng = canary(), np.random.default_rng(3)
    traffic(c, 200, rng)
    traffic(c, 200, rng, slowdown=slowdown)
    if rolled_back:
        assert (c.share, c.state) == (0.0, 'rolled_back')
        assert 'p99 latency' in c.reason
    else:
        assert (c.share, c.state) == (pytest.approx(0.3), 'ramping')


def test_canary_latency_is_judged_against_the_same_window():
    "A champion that slows down with the challenger (shared load) is no breach"
    c = canary()
    for ms in (10.0, 40.0):  # second window: both four times slower
        for _ in range(200):
            c.observe('champion', True, ms)
            c.observe('challenger', True, ms * 1.1)
    assert (c.share, c.state) == (pytest.approx(0.3), 'ramping')


def test_canary_router_end_to_end_entities_only_move_forward():
    "Simulated traffic from 300 entities: the share ramps to max, each entity's answers go champion..., challenger... only; a breach sends all back"
    c = canary(min_requests=100, max_share=0.6)
    r, rng = Router('canary', salt='model:v2', canary=c), np.random.default_rng(4)
    ents = [f"e{i}" for i in range(300)]
    history = {e: [] for e in ents}
    shares = []
    for _ in range(100_000):
        if c.state == 'at_max': break
        e = ents[rng.integers(len(ents))]
        v = r.route(e)
        history[e].append(v)
        r.observe(v, True, float(rng.lognormal(3, 0.4)))
        if not shares or shares[-1] != c.share: shares.append(c.share)
    assert [round(s, 6) for s in shares] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    for seq in history.values():
        assert seq == sorted(seq, key=lambda v: v == 'challenger'), seq  # champion* challenger*
    moved = sum(s[0] == 'champion' and s[-1] == 'challenger' for s in history.values() if s)
    assert moved > 0.3 * len(ents), moved  # about half the entities really moved as the share rose
    assert abs(len(challengers(r, SHAPES['prefixed'])) / N - 0.6) <= 0.02
    for _ in range(10): r.observe('challenger', False, 10.0)
    assert r.describe()['canary']['state'] == 'rolled_back' and not challengers(r, SHAPES['prefixed'])


def test_from_settings_canary():
    s = ServeSettings(mode='canary', challenger_share=0.05, canary_step=0.2, canary_max_share=0.45, canary_min_requests=7,
                      canary_max_error_rate=0.1, canary_max_latency_ratio=2.0)
    d = Router.from_settings(s, salt='t').describe()
    assert (d['mode'], d['share'], d['salt']) == ('canary', 0.05, 't')
    assert {k: d['canary'][k] for k in ('state', 'start', 'step', 'max_share', 'min_requests', 'max_error_rate', 'max_latency_ratio')} == \
        dict(state='ramping', start=0.05, step=0.2, max_share=0.45, min_requests=7, max_error_rate=0.1, max_latency_ratio=2.0)


# ---------------------------------------------------------------- shadow runner

def test_shadow_submit_returns_fast_while_work_sleeps_50ms():
    "submit() of 50 ms work returns in well under a millisecond; the work runs on the worker, not the caller"
    ran_on = []
    def work(): ran_on.append(threading.current_thread().name); time.sleep(0.05)
    sr = ShadowRunner(maxsize=100)
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        assert sr.submit(work)
        times.append(time.perf_counter() - t0)
        time.sleep(0.001)
    t0 = time.perf_counter()
    sr.close(wait=True)
    drained = time.perf_counter() - t0
    assert statistics.median(times) < 1e-4 and max(times) < 1e-3, times
    assert drained > 0.5  # the 20 x 50 ms of work was still queued: it really ran in the background
    assert sr.stats() == dict(submitted=20, done=20, failed=0, dropped=0)
    assert set(ran_on) == {'mlkit-shadow'}


def test_shadow_full_queue_drops_and_counts_without_blocking():
    started, release = threading.Event(), threading.Event()
    def block(): started.set(); release.wait(10)
    sr = ShadowRunner(maxsize=10)
    sr.submit(block); assert started.wait(5)  # the worker is busy: the queue fills
    times, accepted = [], []
    for _ in range(100):
        t0 = time.perf_counter()
        accepted.append(sr.submit(time.sleep, 0.05))
        times.append(time.perf_counter() - t0)
    assert accepted == [True] * 10 + [False] * 90
    assert max(times) < 1e-3, max(times)
    assert sr.stats() == dict(submitted=101, done=0, failed=0, dropped=90) and sr.pending == 10
    sr.close(wait=False, timeout=0)  # the 10 queued pieces are dropped too...
    release.set()
    sr.close(timeout=5)               # ...and the running one finishes
    assert sr.stats() == dict(submitted=101, done=1, failed=0, dropped=100)


def test_shadow_failures_are_counted_and_the_worker_survives():
    out = []
    with ShadowRunner() as sr:
        for i in range(10): sr.submit(out.append, i) if i % 2 else sr.submit(lambda: 1 / 0)
    assert sr.stats() == dict(submitted=10, done=5, failed=5, dropped=0)
    assert out == [1, 3, 5, 7, 9]


# ---------------------------------------------------------------- threads

@pytest.fixture
def busy_switching():
    "Switch threads as often as possible so races show"
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def test_route_thread_safe_ab_8_threads(busy_switching):
    keys = SHAPES['uuid']
    r = Router('ab', 0.3, 'v2')
    expected = [r.route(k) for k in keys]
    results = [None] * 8
    def run(i): results[i] = [r.route(k) for k in keys]
    ts = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in ts: t.start()
    for t in ts: t.join()
    assert all(res == expected for res in results)


def test_canary_thread_safe_8_threads(busy_switching):
    "4 threads report answers while 4 route: no report is lost, the share steps exactly, entities only move forward"
    c = canary(start=0.01, step=0.01, max_share=1.0, min_requests=500, max_error_rate=0.5)
    r = Router('canary', salt='v2', canary=c)
    keys = SHAPES['prefixed'][:500]
    per_thread, done = 5000, threading.Event()
    seqs = [dict() for _ in range(4)]
    def report():
        for i in range(per_thread):
            r.observe('challenger' if i % 2 else 'champion', True, 10.0)
    def route(j):
        while not done.is_set():
            for k in keys: seqs[j].setdefault(k, []).append(r.route(k))
    routers = [threading.Thread(target=route, args=(j,)) for j in range(4)]
    reporters = [threading.Thread(target=report) for _ in range(4)]
    for t in routers + reporters: t.start()
    for t in reporters: t.join()
    done.set()
    for t in routers: t.join()
    d = c.describe()
    assert d['observed'] == 4 * per_thread
    assert d['steps'] == (4 * per_thread // 2) // 500 == 20
    assert c.share == pytest.approx(0.21)
    for s in seqs:
        for seq in s.values():
            assert seq == sorted(seq, key=lambda v: v == 'challenger')
