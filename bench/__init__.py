"""Side-by-side benchmarks of routheon-server, the original 1.0.7, a floor server and LiteLLM.

Run with ``make bench`` (or ``python -m bench`` inside the project venv). Everything the bench
starts listens on 127.0.0.1 on free ports and is stopped when the bench ends.
"""
