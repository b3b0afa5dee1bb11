"""``lmlab serve``: a live, read-only dashboard of the experiments under a directory.

Starlette + uvicorn (the ``serve`` extra: ``pip install 'lmlab[serve]'``) serve a JSON API over
the stores and one static page that draws it with uPlot, shipped in ``static/vendor/uplot``
(no CDN: clusters and these machines have no internet). See :mod:`lmlab.serve.app`.
"""

from lmlab.serve.app import create_app, run
from lmlab.serve.catalog import Catalog, discover

__all__ = ["Catalog", "create_app", "discover", "run"]
