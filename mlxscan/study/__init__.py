"""Studies: a declared sequence of mlxscan commands run into one directory, their claims, and the gate.

    spec.py        the study file (TOML), validated strictly
    runner.py      `mlxscan study run`: steps in-process, resumable, provenance in study.json
    adapters*.py   from each step's saved files to Claims (mlxscan.claims)
    evidence.py    effect, CI, p and split-half replication from per-stimulus arrays (word bootstrap)
    verify.py      `mlxscan study verify`: recompute every claim and compare
"""
