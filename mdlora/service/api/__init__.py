"""HTTP routers: ``predict`` (scoring), ``admin`` (``/v1``, bearer token), ``health``."""
