"""``memplan serve``: the planner as a local web page (the ``web`` extra).

:mod:`memplan.web.inputs` and :mod:`memplan.web.jobs` turn a request body into the Python API's
answer and need nothing beyond memplan; :mod:`memplan.web.worker` runs each answer in a child
process under a time limit; :mod:`memplan.web.app` is the Starlette application and the uvicorn
server (imported only by ``memplan serve``); ``static/`` holds the page, which fetches nothing
from elsewhere.
"""
