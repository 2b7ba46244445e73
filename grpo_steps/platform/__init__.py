"""The platform: what every stage runs on, and nothing of a particular stage.

The configuration (config.py: params.yaml, typed, each setting declared once), what a stage is and how one runs
(stage.py: the record type, tracked in-process or launched, locked), tracking (tracking.py: the one MLflow
wrapper), results (results.py), launching training stages on several processes and nodes (launch.py), lineage for
the registry (lineage.py), resumable checkpoints (checkpoint.py: grpo's own; trainer_checkpoints.py: sft's), file
I/O and locks (io.py), secrets (secrets.py), loading, building, placing and saving models (modeling.py), the
accuracy judge (judge.py), dvc.yaml (dvc_yaml.py, rendered from the stage records it is given) and the checks
before any work (preflight.py).
"""
