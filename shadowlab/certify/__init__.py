"""Certifiers: randomized smoothing (Cohen et al. 2019) and bound propagation (IBP, CROWN, CROWN-IBP) with the per-
image verdicts of certifiably trained networks; auto_LiRPA as an optional second backend.
"""
