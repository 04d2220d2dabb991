"""Baselines the service is measured against (see ``bench/run_all.py``):

* ``naive``: a minimal FastAPI + Redis server, one ONNX Runtime call per request at B=1;
* batching off: the service itself, ``carryover serve --max-batch-size 1`` (``bench.servers``);
* ``raw_ort``: the model alone on the service's batch shapes, no server around it (the ceiling).
"""
