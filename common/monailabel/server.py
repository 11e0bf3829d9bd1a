"""MONAI Label's FastAPI server with errors that say what went wrong.

MONAI Label answers any exception from an app with a bare ``500 Internal Server Error``; here the
status and message tell a viewer's user what to fix: ``400`` for a request MONAI Label refuses (e.g.
an unknown model), ``409`` for a bundle that is not trained yet, ``422`` for bad input data (an image
that is not an image, a region outside the slide), ``500`` with the message otherwise. Import this
module only after MONAI Label's settings are in the environment (see :mod:`common.monailabel.__main__`).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException

from common.errors import find_input_data_error
from common.monailabel.infer import ModelNotTrainedError

__all__ = ["create_app", "error_status"]

logger = logging.getLogger(__name__)


def error_status(err: BaseException) -> tuple[int, str]:
    """HTTP status and message for an exception raised while serving a request."""
    input_error = find_input_data_error(err)
    if input_error is not None:
        return 422, str(input_error)
    if isinstance(err, ModelNotTrainedError):
        return 409, str(err)
    if isinstance(err, MONAILabelException):
        return (400 if err.error == MONAILabelError.INVALID_INPUT else 500), err.msg
    return 500, f"{type(err).__name__}: {err}"


async def _error_response(request: Request, err: Exception) -> JSONResponse:
    status, message = error_status(err)
    logger.log(logging.WARNING if status < 500 else logging.ERROR, "%s %s -> %d: %s", request.method, request.url.path, status, message)
    return JSONResponse(status_code=status, content={"detail": message})


def create_app() -> FastAPI:
    """MONAI Label's app (the app class is loaded from the settings on start-up) with our error handlers."""
    from monailabel.app import app

    app.add_exception_handler(Exception, _error_response)
    app.add_exception_handler(MONAILabelException, _error_response)
    return app
