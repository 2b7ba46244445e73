"""The data layer: where prompts and preference pairs come from and what they must look like.

The embedded synthetic task (task.py), your files in JSONL, Parquet, CSV or GSM8K form (ingest.py), reading them
(files.py), the pandera contracts the validate stage checks (schemas.py), the one rendering of a prompt for the
policy (prompts.py), the project's tokenizers (tokenizer.py), and the `task` and `data` settings (settings.py).
It imports the algorithm at most, never the platform: no config, tracking or stage here.
"""
