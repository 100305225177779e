"""LLaMA-Factory's tests run in its own environment only (scripts/test-llamafactory): it pins
transformers, datasets and TRL below the main suite's. Elsewhere there is nothing to collect."""
import importlib.util

if importlib.util.find_spec("llamafactory") is None:
    collect_ignore_glob = ["test_*.py"]
