"""A request-body limit as a deployment adds one: Starlette's RequestBodyLimitMiddleware, through
vLLM's `--middleware` flag (which takes a class and no arguments). It answers 413 in plain text;
the server must still answer in the OpenAI error shape."""

from starlette.middleware.body_limit import RequestBodyLimitMiddleware

LIMIT = 8 * 1024 * 1024


class EightMegabyteBodyLimit(RequestBodyLimitMiddleware):
    def __init__(self, app) -> None:
        super().__init__(app, max_body_size=LIMIT)
