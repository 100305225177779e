"""The start-up hook of ``stream-metrics run`` (sitecustomize.py); this folder goes on PYTHONPATH."""
