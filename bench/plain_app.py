"""The baseline of bench/serve.py: a plain FastAPI + uvicorn app that calls the champion's predict once per request.

Run by bench/serve.py as `uvicorn plain_app:app --workers 2` with MLKIT_SETTINGS pointing at the benchmark's project.
"""
import os
for _v in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'): os.environ[_v] = '1'

import pandas as pd
from fastapi import FastAPI, Request

from mlkit.config import load_settings
from mlkit.service import serving_refs
from mlkit.store import load_pipeline

SETTINGS = load_settings()
PIPE, _ = load_pipeline(serving_refs(SETTINGS)['champion'][0], SETTINGS)
CLASSES = [c.item() if hasattr(c, 'item') else c for c in PIPE.classes_]
app = FastAPI()


@app.post('/predict')
async def predict(request: Request):
    body = await request.json()
    proba = PIPE.predict_proba(pd.DataFrame.from_records(body['records']))
    return [dict(prediction=CLASSES[int(p.argmax())], probabilities={str(c): float(x) for c, x in zip(CLASSES, p)}) for p in proba]
