import os, shutil, socket, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the project's .venv/bin when run through `make test`


def free_port() -> int:
    "A TCP port on 127.0.0.1 nobody listens on right now"
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture
def project(tmp_path):
    "A scratch copy of the project's settings with its state folder inside `tmp_path`"
    shutil.copy(ROOT/'settings.ini', tmp_path/'settings.ini')
    return tmp_path


@pytest.fixture
def clean_env(monkeypatch):
    "The process environment without MLKIT_* variables"
    for k in list(os.environ):
        if k.startswith('MLKIT_'): monkeypatch.delenv(k)
    return os.environ
