"""What a client sees of a failure: its own mistakes named, the server's internals never."""

import logging

import grpc

from deployments.engine.async_engine import RequestFailed
from deployments.errors import classify
from model.errors import InvalidInputError

INTERNAL = "connect to 10.0.0.7:6379 failed: AUTH hunter2 /srv/herd/secret.py line 12"


def test_an_internal_error_reaches_the_log_not_the_client(caplog):
    with caplog.at_level(logging.ERROR, logger="deployments.errors"):
        err = classify(RuntimeError(INTERNAL))
    assert (err.grpc_code, err.http_status, err.type) == (grpc.StatusCode.INTERNAL, 500, "internal_error")
    assert "hunter2" not in err.message and "10.0.0.7" not in err.message and "RuntimeError" not in err.message
    incident = err.message.split("incident ", 1)[1].split(":", 1)[0]
    assert len(incident) == 12
    (record,) = caplog.records
    assert incident in record.getMessage() and INTERNAL in record.getMessage()


def test_a_request_that_broke_the_engine_gets_no_exception_text():
    err = classify(RequestFailed(f"request r1 failed in the engine and was stopped: ValueError: {INTERNAL}"))
    assert err.http_status == 500 and "hunter2" not in err.message


def test_every_internal_error_gets_its_own_incident():
    assert classify(RuntimeError("a")).message != classify(RuntimeError("a")).message


def test_the_clients_own_mistakes_are_still_named():
    err = classify(InvalidInputError("temperature must be >= 0"))
    assert err.http_status == 400 and err.message == "temperature must be >= 0"
