"""mlkit's BentoML service. Wiring only: settings, metrics and the pieces of `mlkit.service` (nbs/50_service.ipynb),
where the logic is tested: the gatekeeper (tokens, validation), predict_records, Outcomes (metrics, the canary) and
the ReloadWatcher.

Run it with `mlkit serve` (models from the project's registry and model store) or build it with `mlkit build`
(models bundled in the bento). Endpoints: POST /predict, POST /feedback, GET /metadata, POST /admin/reload,
BentoML's /livez, /readyz and /metrics; GET /docs.json is the OpenAPI document the gatekeeper makes (`openapi_spec`).
"""
import json, os, sys
from pathlib import Path
from typing import Annotated

from mlkit.config import load_settings

SETTINGS = load_settings()
SERVE = SETTINGS.serve
for _var in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'):
    os.environ[_var] = str(SERVE.threads)  # before numpy loads: more threads per worker collapse throughput

import bentoml
from bentoml.validators import ContentType
from starlette.responses import JSONResponse
from threadpoolctl import threadpool_limits

from mlkit import service as svc
from mlkit.gatekeeper import Gatekeeper, patch_bentoml_order, patch_bentoml_timeout
from mlkit.predlog import PredictionLog
from mlkit.routing import ShadowRunner
from mlkit.servenv import record_serving_env

patch_bentoml_timeout()  # BentoML's own keeps every request's timer alive for the whole timeout
patch_bentoml_order()  # the gatekeeper in front of BentoML's metrics: what it refuses adds no series

HERE = Path(__file__).resolve().parent
REFS = json.loads((HERE/'serving.json').read_text()) if (HERE/'serving.json').is_file() else {}
CURRENT = {}  # the worker's ServingState and PredictionLog, read by the gatekeeper middleware
STAMP = SETTINGS.state_dir/'serving.stamp'  # touched by a reload: every worker reloads
ENTITY = SERVE.entity_field or SETTINGS.data.id_column
# in shadow mode the challenger's work waits this long for more requests, so they share one call: at concurrency 32
# it cut the CPU shadow mode adds per request from about 70% to 10-25%; its rows reach the log that much later
SHADOW_LINGER_S = 0.2

PREDICTIONS = bentoml.metrics.Counter(name='mlkit_predictions', documentation='Predictions answered, per variant and model',
                                      labelnames=['variant', 'model'])
ERRORS = bentoml.metrics.Counter(name='mlkit_prediction_errors', documentation='Failed predictions, per variant', labelnames=['variant'])
LATENCY = bentoml.metrics.Histogram(name='mlkit_model_latency_seconds', documentation='Model time per batch, per variant',
                                    labelnames=['variant'], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))


# without an exporter configured, BentoML's spans are made and dropped: about a tenth of a worker's time per request
TRACING = {} if SERVE.tracing else {'tracing': {'excluded_urls': ['.*']}}


@bentoml.service(workers=SERVE.workers, logging={'access': {'enabled': SERVE.access_log}}, traffic={'timeout': 60}, **TRACING)
class MlkitService:
    champion_model = bentoml.models.BentoModel(REFS['champion']) if REFS.get('champion') else None
    challenger_model = bentoml.models.BentoModel(REFS['challenger']) if REFS.get('challenger') else None

    def __init__(self):
        self._limits = threadpool_limits(SERVE.threads)
        self._bundled = dict(champion=self.champion_model, challenger=self.challenger_model)
        self.log = CURRENT['log'] = PredictionLog.from_settings(SETTINGS)
        try: record_serving_env(self.log.engine)  # the versions this worker serves with, for the monitoring job's dependency check
        except Exception as e: print(f"mlkit: serving versions not recorded: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        self.shadow = ShadowRunner(linger=SHADOW_LINGER_S)
        self.observe = svc.Outcomes(lambda: self.state, PREDICTIONS, ERRORS, LATENCY)
        self.watcher = svc.ReloadWatcher(STAMP, self._load)
        try: self._load()
        except Exception as e:  # no crash loop: the worker stays up, not ready, answering 503 with the reason until a reload succeeds
            self.state = CURRENT['state'] = None
            CURRENT['error'] = f"no model loaded: {type(e).__name__}: {e}"
            print(f"mlkit: {CURRENT['error']}", file=sys.stderr, flush=True)
        self.watcher.start()

    def _load(self):
        "The watcher's reload: load the models and swap them in with one reference swap (a request uses one state throughout)"
        self.state = CURRENT['state'] = svc.ServingState.load(SETTINGS, bundled=self._bundled)
        CURRENT.pop('error', None)
        svc.settle_heap()  # libraries and models loaded: full garbage collections now skip them
        return self.state

    # the media type is given: BentoML would otherwise derive it from the output's JSON schema for every answer
    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=SERVE.max_batch_size, max_latency_ms=SERVE.max_latency_ms)
    def predict(self, records: list[dict]) -> Annotated[list[dict], ContentType('application/json')]:
        "Predict each record: prediction, class probabilities, model tag, variant, request id, warnings, ignored fields"
        return svc.predict_records(self.state, records, self.log, ENTITY, self.shadow, self.observe)

    @bentoml.api
    def feedback(self, items: list[dict]) -> dict:
        "Delayed labels: [{request_id, label}, ...] (checked by the gatekeeper), joined to the logged predictions; 409 for one labelled already"
        status, body = svc.answer_feedback(self.state, self.log, items)
        return body if status == 200 else JSONResponse(body, status_code=status)

    @bentoml.api(route='/admin/reload')
    def reload(self) -> dict:
        "Reload the champion and challenger (after a promotion or rollback) in every worker; in-flight requests finish on the old ones; 503 naming why it failed"
        status, body = svc.answer_reload(self.watcher, serving=self.state is not None)
        return body if status == 200 else JSONResponse(body, status_code=status)

    def __is_ready__(self) -> bool:
        return self.state is not None

    @bentoml.on_shutdown
    def close(self):
        self.watcher.stop()
        self.shadow.close(wait=True)
        self.log.close()


MlkitService.add_asgi_middleware(Gatekeeper, get_state=lambda: CURRENT.get('state'), get_error=lambda: CURRENT.get('error'), max_body_mb=SERVE.max_body_mb,
                                 unknown_category=SERVE.unknown_category, max_records=SERVE.max_records,
                                 get_log=lambda: CURRENT.get('log'), max_record_keys=SERVE.max_record_keys,
                                 max_fields=SERVE.max_fields, durable_s=SERVE.log_wait_s if SERVE.log_durable else 0)
