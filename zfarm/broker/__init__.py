"""The broker: one ROUTER endpoint (:mod:`zfarm.broker.broker`) around a sans-IO core
(:mod:`zfarm.broker.scheduler`, a thin facade over parts that each own one noun).

See docs/development.md for the parts and the job transition table.
"""
