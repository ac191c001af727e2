"""The worker: a pure core (:mod:`zfarm.worker.core`), its shell (:mod:`zfarm.worker.shell`) and the
slot processes that run the jobs (:mod:`zfarm.worker.chaperone`).

The broker and the client import nothing from here.
"""
