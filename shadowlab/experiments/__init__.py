"""The paper's Tables 1 and 2: their settings, per-image work, controls, resumable torchrun-sharded runs, re-judging of
committed results and the cost model.
"""
